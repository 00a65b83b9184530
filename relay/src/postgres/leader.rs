//! One active relay per slot: a Postgres advisory lock elects it.
//!
//! Before it builds its sink or touches the slot, a relay takes the session-level advisory lock
//! `pg_try_advisory_lock(hashtext('outbox-relay:' || <slot>))` on its ordinary connection and
//! holds it for as long as that session lives. A second relay with the same slot finds the lock
//! taken, logs once that it stands by, and tries again every second; when the active relay dies
//! (its session ends: at once for a killed process, after TCP keepalives or `wal_sender_timeout`
//! for a lost host) or stops, the standby gets the lock and starts. The slot alone would not do:
//! it is free between its creation and the first `START_REPLICATION` (the first-start snapshot),
//! and an exactly-once standby would fence the active relay's Kafka producer the moment it built
//! its own.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// How often a standby tries to take the lock.
pub const STANDBY_POLL: Duration = Duration::from_secs(1);

const TRY_LOCK_SQL: &str = "SELECT pg_try_advisory_lock(hashtext('outbox-relay:' || $1))";

/// Takes the lock on `db`, waiting as long as another relay holds it. `Ok(true)` once held
/// (`waited`: whether another relay held it first), `Ok(false)` if `shutdown` came first.
pub async fn acquire(
    db: &Client,
    slot: &str,
    shutdown: &CancellationToken,
) -> Result<Option<bool>, tokio_postgres::Error> {
    let mut waited = false;
    loop {
        let held: bool = db.query_one(TRY_LOCK_SQL, &[&slot]).await?.get(0);
        if held {
            if waited {
                tracing::info!(slot, "the other relay is gone: this one is active now");
            }
            return Ok(Some(waited));
        }
        if !waited {
            waited = true;
            tracing::info!(
                slot,
                poll = ?STANDBY_POLL,
                "another relay is active on this slot; standing by to take over when it stops"
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(STANDBY_POLL) => {}
        }
    }
}
