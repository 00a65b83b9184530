//! Ordinary (non-replication) Postgres connections, for queries and marking rows delivered.
//!
//! TLS follows `sslmode` in `postgres.url` with libpq's meaning: `prefer` (the default) uses TLS
//! when the server offers it, `require` insists, neither verifies the certificate.

use tokio_postgres::Client;

/// Opens a connection and drives it on a background task.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let tls = native_tls::TlsConnector::builder()
        .danger_accept_invalid_certs(true)
        .danger_accept_invalid_hostnames(true)
        .build()
        .map(postgres_native_tls::MakeTlsConnector::new);
    let client = match tls {
        Ok(tls) => {
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "Postgres connection closed");
                }
            });
            client
        }
        Err(e) => {
            tracing::warn!(error = %e, "TLS unavailable; connecting without it");
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "Postgres connection closed");
                }
            });
            client
        }
    };
    Ok(client)
}

/// Whether retrying the connection can help (the server is down or starting) or not (bad
/// password, missing database).
pub fn is_permanent(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let c = c.code();
        c.starts_with("28") || c == "3D000" || c.starts_with("42")
    })
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
        None => e.to_string(),
    }
}
