//! Named crash points, for tests that kill the relay between two steps of a protocol.
//!
//! `OUTBOX_RELAY_CRASH_AT=<name>` makes the process abort (no cleanup, like `kill -9`) the first
//! time it reaches the point called `name`. A timed `kill -9` from outside cannot hit a window a
//! few microseconds wide; these can. The points are compiled in (the tests drive the real binary)
//! and cost one load of a cached value when the variable is unset.

use std::sync::OnceLock;

/// The environment variable naming the point to crash at.
pub const CRASH_AT_ENV: &str = "OUTBOX_RELAY_CRASH_AT";

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
