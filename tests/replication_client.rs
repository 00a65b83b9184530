//! The replication client against a real server: authentication methods, TLS, slot commands.

use std::process::Command;

use crate::support::*;
use outbox_relay::replication::protocol::ServerMessage;
use outbox_relay::replication::{Lsn, ReplicationClient, ReplicationError};

async fn identify(url: &str) -> Result<Lsn, ReplicationError> {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let mut client = ReplicationClient::connect(&config).await?;
    let id = client.identify_system().await?;
    client.close().await;
    Ok(id.xlog_pos)
}

#[tokio::test]
async fn authenticates_with_trust_md5_and_scram_and_rejects_a_wrong_password() {
    let pg = PgCluster::start();
    pg.psql(&format!(
        "SET password_encryption = 'md5'; CREATE ROLE {MD5_USER} LOGIN REPLICATION PASSWORD '{PASSWORD}'; \
         SET password_encryption = 'scram-sha-256'; CREATE ROLE {SCRAM_USER} LOGIN REPLICATION PASSWORD '{PASSWORD}';"
    ));
    assert!(identify(&pg.url()).await.unwrap() > Lsn::ZERO, "trust");
    identify(&pg.url_for(MD5_USER, PASSWORD))
        .await
        .expect("md5");
    identify(&pg.url_for(SCRAM_USER, PASSWORD))
        .await
        .expect("scram-sha-256");

    for user in [MD5_USER, SCRAM_USER] {
        let err = identify(&pg.url_for(user, "nope")).await.unwrap_err();
        assert!(matches!(err, ReplicationError::Auth(_)), "{err}");
        assert_eq!(
            outbox_relay::error::Classify::action(&err),
            outbox_relay::error::Action::Stop
        );
        assert!(
            err.to_string().contains("password authentication failed"),
            "{err}"
        );
    }
    let no_password = format!("postgres://{SCRAM_USER}@127.0.0.1:{}/postgres", pg.port);
    let err = identify(&no_password).await.unwrap_err();
    assert!(err.to_string().contains("has none"), "{err}");
}

#[tokio::test]
async fn connects_over_tls_when_required() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-x509",
            "-days",
            "1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-out",
        ])
        .arg(&crt)
        .arg("-keyout")
        .arg(&key)
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl could not make a certificate");
    // The server reads the key as its own OS user; copy both where it can.
    let data_crt = pg.psql("SHOW data_directory") + "/server.crt";
    let data_key = data_crt.replace("server.crt", "server.key");
    std::fs::copy(&crt, &data_crt).unwrap();
    std::fs::copy(&key, &data_key).unwrap();
    let _ = Command::new("chown")
        .args(["postgres:postgres", &data_crt, &data_key])
        .status();
    let _ = Command::new("chmod").args(["600", &data_key]).status();
    pg.psql("ALTER SYSTEM SET ssl = on");
    pg.psql("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(pg.psql("SHOW ssl"), "on");

    let url = format!("{}?sslmode=require", pg.url());
    let config: tokio_postgres::Config = url.parse().unwrap();
    let mut client = ReplicationClient::connect(&config)
        .await
        .expect("TLS replication connection");
    client.identify_system().await.unwrap();
    let encrypted_walsenders = pg.psql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE s.ssl AND a.backend_type = 'walsender'",
    );
    assert_eq!(
        encrypted_walsenders, "1",
        "the replication connection is encrypted"
    );
    client.close().await;
}

#[tokio::test]
async fn sslmode_require_fails_clearly_when_the_server_has_no_tls() {
    let pg = PgCluster::start();
    let err = identify(&format!("{}?sslmode=require", pg.url()))
        .await
        .unwrap_err();
    assert!(matches!(err, ReplicationError::Tls(_)), "{err}");
    assert!(err.to_string().contains("does not accept TLS"), "{err}");
}

#[tokio::test]
async fn creates_a_slot_and_streams_pgoutput_with_keepalives() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let config: tokio_postgres::Config = pg.url().parse().unwrap();
    let mut client = ReplicationClient::connect(&config).await.unwrap();
    let slot = client.create_slot("probe", false, false).await.unwrap();
    assert!(slot.snapshot_name.is_none());
    assert!(slot.consistent_point > Lsn::ZERO);
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('a', 'b', 'c', '{}')");
    let mut stream = client
        .start_replication("probe", Lsn::ZERO, "outbox_pub", false)
        .await
        .unwrap();
    let mut tags = Vec::new();
    while !tags.contains(&b'C') {
        match stream.next().await.unwrap().unwrap() {
            ServerMessage::XLogData { data, .. } => tags.push(data[0]),
            ServerMessage::Keepalive { .. } => {}
        }
    }
    assert_eq!(tags, vec![b'B', b'R', b'I', b'C']);
    stream.finish(std::time::Duration::from_secs(5)).await;

    // A wrong publication name is a server error with its SQLSTATE, not a hang. Postgres 18
    // only warns and streams nothing (pgoutput skips a missing publication since 18), which is
    // why the relay checks the publication before it streams (`source::schema::preflight`).
    if pg.major() >= 18 {
        return;
    }
    let client = ReplicationClient::connect(&config).await.unwrap();
    let mut stream = client
        .start_replication("probe", Lsn::ZERO, "no_such_pub", false)
        .await
        .unwrap();
    let err = loop {
        match stream.next().await {
            Err(e) => break e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("stream ended without the error"),
        }
    };
    assert!(err.to_string().contains("no_such_pub"), "{err}");
}
