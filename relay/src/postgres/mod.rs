//! Postgres as the relay's ordinary sessions see it: connections (for queries and marking rows),
//! and the leader lock ([`leader`]).
//!
//! TLS follows `sslmode` in `postgres.url` with libpq's meanings (see [`crate::pgtls`]):
//! `prefer` (the default) uses TLS when the server offers it, `require` insists, `verify-ca` and
//! `verify-full` also check the certificate against `sslrootcert` (and the host name).

pub mod leader;

use std::future::Future;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::pgtls::{PgTarget, SslMode};

/// Opens a connection and drives it on a background task.
pub async fn connect(target: &PgTarget) -> Result<Client, tokio_postgres::Error> {
    Ok(connect_watched(target).await?.0)
}

/// Says why the server ended a connection, if it ended it because it is shutting down or
/// restarting (SQLSTATE class 57P: a fast shutdown terminates ordinary sessions before it waits
/// for replication clients): `Some(reason)` then, `None` until.
pub type ShutdownWatch = watch::Receiver<Option<String>>;

/// [`connect`], plus a watch that turns `Some` when the server closes the connection because it
/// is shutting down.
pub async fn connect_watched(
    target: &PgTarget,
) -> Result<(Client, ShutdownWatch), tokio_postgres::Error> {
    let (tx, rx) = watch::channel(None);
    let config = &target.config;
    let tls = match target.tls.mode {
        SslMode::Disable => None,
        _ => match target.tls.connector() {
            Ok(c) => Some(postgres_native_tls::MakeTlsConnector::new(c)),
            Err(e) => {
                // Validated at start; without TLS, `require` and above fail to connect below.
                tracing::warn!(error = %e, "TLS unavailable; connecting without it");
                None
            }
        },
    };
    let client = match tls {
        Some(tls) => {
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(drive(connection, tx));
            client
        }
        None => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(drive(connection, tx));
            client
        }
    };
    Ok((client, rx))
}

async fn drive(
    connection: impl Future<Output = Result<(), tokio_postgres::Error>>,
    shutdown: watch::Sender<Option<String>>,
) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %describe(&e), "Postgres connection closed");
        if is_shutdown(&e) {
            shutdown.send_replace(Some(describe(&e)));
        }
    }
}

/// SQLSTATE class 57P: admin shutdown, crash shutdown, cannot connect now.
pub fn is_shutdown(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("57P"))
}

/// A one-line description of a Postgres error, with the server's message and hint.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(h) = db.hint() {
                s.push_str(&format!(" (hint: {h})"));
            }
            s
        }
        None => {
            // The causes too: "error performing TLS handshake" alone hides which check failed.
            let mut s = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                s.push_str(&format!(": {c}"));
                cause = c.source();
            }
            s
        }
    }
}
