//! Named points, for tests that kill or hold the relay between two steps of a protocol.
//!
//! `OUTBOX_RELAY_CRASH_AT=<name>` makes the process abort (no cleanup, like `kill -9`) the first
//! time it reaches the point called `name`; `OUTBOX_RELAY_PAUSE_AT=<name>:<ms>` makes it wait
//! that long each time. A timed `kill -9` from outside cannot hit a window a few microseconds
//! wide; these can. The points are compiled in (the tests drive the real binary) and cost one
//! load of a cached value when the variables are unset.

use std::sync::OnceLock;

/// The environment variable naming the point to crash at.
pub const CRASH_AT_ENV: &str = "OUTBOX_RELAY_CRASH_AT";
/// The environment variable naming the point to pause at, and for how long: `<name>:<ms>`.
pub const PAUSE_AT_ENV: &str = "OUTBOX_RELAY_PAUSE_AT";

/// Aborts the process if `OUTBOX_RELAY_CRASH_AT` names this point.
pub fn crash_point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(CRASH_AT_ENV).ok().filter(|v| !v.is_empty()));
    if at.as_deref() == Some(name) {
        tracing::error!(point = name, "{CRASH_AT_ENV} reached; aborting");
        eprintln!("outbox-relay: crash point {name} reached ({CRASH_AT_ENV}); aborting");
        std::process::abort();
    }
}

/// Waits if `OUTBOX_RELAY_PAUSE_AT` names this point (`<name>:<ms>`).
pub async fn pause_point(name: &str) {
    static AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    let at = AT.get_or_init(|| {
        let v = std::env::var(PAUSE_AT_ENV).ok()?;
        let (point, ms) = v.rsplit_once(':')?;
        Some((point.to_owned(), ms.parse().ok()?))
    });
    if let Some((point, ms)) = at
        && point == name
    {
        tracing::warn!(point = name, ms, "{PAUSE_AT_ENV} reached; pausing");
        tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
    }
}
