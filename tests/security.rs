//! Inputs the relay does not trust: what a row may name, and what Postgres (or whatever answers
//! in its place) may announce.

use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);
const LINGER: Duration = Duration::from_secs(2);

/// A row cannot publish to the relay's own topics (dead letters, exactly-once progress), to
/// Kafka's internal topics or, by default, outside the template's prefix; each such row is
/// dead-lettered and marked failed while the stream goes on. A row's headers cannot restate the
/// relay's `id`/`type`. Before: all of these were published as the row asked.
#[tokio::test(flavor = "multi_thread")]
async fn rows_cannot_publish_to_the_relays_own_or_unlisted_topics() {
    let Stack {
        pg,
        broker,
        relay: _relay,
    } = Stack::start(&[]);
    let insert = |aggregateid: &str, headers: &str, topic: &str| {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers, topic) \
             VALUES ('guarded', '{aggregateid}', 'Tested', '{{}}', {headers}, {topic}) RETURNING id"
        ))
    };
    let good = insert("a", "NULL", "NULL");
    let refused = [
        (insert("a", "NULL", "'outbox.dlq'"), "relay's own"),
        (
            insert("a", "NULL", "'outbox-relay.progress'"),
            "relay's own",
        ),
        (
            insert("a", "NULL", "'__consumer_offsets'"),
            "internal to Kafka",
        ),
        (insert("a", "NULL", "'payments'"), "kafka.allowed_topics"),
    ];
    let forged = insert(
        "a",
        "'{\"id\": \"forged\", \"type\": \"Forged\", \"trace\": \"t-1\"}'",
        "NULL",
    );

    let delivered = consume(
        &broker.brokers(),
        &["outbox.event.guarded"],
        2,
        WAIT,
        LINGER,
    );
    let ids: Vec<&str> = delivered.iter().map(Received::id).collect();
    assert_eq!(ids, [good.as_str(), forged.as_str()], "{}", _relay.log());
    let m = &delivered[1];
    assert_eq!(
        m.headers["type"], "Tested",
        "the row restated the relay's type"
    );
    assert_eq!(m.headers["trace"], "t-1");

    let dlq = consume(
        &broker.brokers(),
        &["outbox.dlq"],
        refused.len(),
        WAIT,
        LINGER,
    );
    assert_eq!(dlq.len(), refused.len(), "{dlq:?}");
    for (id, why) in &refused {
        let r = dlq
            .iter()
            .find(|m| m.id() == id)
            .unwrap_or_else(|| panic!("no dead-letter record for {id}"));
        assert!(r.headers["dlq.error"].contains(why), "{:?}", r.headers);
    }
    let failed = eventually(WAIT, || async {
        pg.psql("SELECT count(*) FROM outbox WHERE failed_at IS NOT NULL") == "4"
    })
    .await;
    assert!(failed, "the refused rows are marked failed");
    assert!(
        consume(
            &broker.brokers(),
            &["payments"],
            1,
            Duration::from_secs(3),
            LINGER
        )
        .is_empty()
    );
}

/// A message larger than `postgres.max_message_bytes` stops the relay with the key named,
/// rather than the relay reserving whatever length the connection announces (up to 2 GiB).
#[tokio::test(flavor = "multi_thread")]
async fn a_replication_message_above_the_cap_stops_the_relay_naming_the_key() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let mut relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_POSTGRES__MAX_MESSAGE_BYTES", "1048576")],
    ));
    wait_streaming(&pg.client().await, WAIT).await;
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('big', 'b', 'Big', jsonb_build_object('blob', repeat('x', 2 * 1024 * 1024)))",
    );
    let status = relay.wait_exit(WAIT).expect("the relay stops");
    let log = relay.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("above postgres.max_message_bytes (1048576)"),
        "{log}"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM outbox_status WHERE delivered_at IS NULL"),
        "1",
        "the row waits for a relay allowed to read it"
    );
}

/// Runs `openssl` with `args`, panicking with its output when it fails.
fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority, a server certificate it signed for `localhost`, and an unrelated
/// authority, in `dir`; the server certificate and key installed in `pg` with `ssl = on`.
fn install_tls(pg: &PgCluster, dir: &std::path::Path) {
    let p = |name: &str| dir.join(name).display().to_string();
    for ca in ["ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &p(&format!("{ca}.key")),
            "-out",
            &p(&format!("{ca}.crt")),
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &p("server.key"),
        "-out",
        &p("server.csr"),
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName = DNS:localhost\n").expect("san");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p("san.ext"),
        "-out",
        &p("server.crt"),
    ]);
    let data = pg.psql("SHOW data_directory");
    for f in ["server.crt", "server.key"] {
        let to = format!("{data}/{f}");
        std::fs::copy(dir.join(f), &to).expect("copy into the data directory");
        let _ = std::process::Command::new("chown")
            .args(["postgres:postgres", &to])
            .status();
    }
    let _ = std::process::Command::new("chmod")
        .args(["600", &format!("{data}/server.key")])
        .status();
    pg.psql("ALTER SYSTEM SET ssl = on");
    pg.psql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pg.psql("SHOW ssl"), "on");
}

/// `outbox-relay check` with `url`: its output.
fn check_with(pg: &PgCluster, brokers: &str, url: &str) -> String {
    let mut check = Relay::spawn(
        &relay_env(pg, brokers, &[("RELAY_POSTGRES__URL", url)]),
        &["check"],
    );
    check.wait_exit(WAIT).expect("check finishes");
    check.log()
}

/// Both connections verify the server as libpq's sslmode says: verify-full with the right
/// authority and host name passes; an unrelated authority or another host name is refused;
/// verify-ca checks the chain but not the name. Before: sslmode stopped at require (the URL
/// with verify-full did not even parse), and any certificate was accepted.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_tls_is_verified_as_sslmode_says_on_both_connections() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let dir = tempfile::tempdir().expect("tempdir");
    install_tls(&pg, dir.path());
    let broker = Tansu::start();
    let ca = dir.path().join("ca.crt").display().to_string();
    let other = dir.path().join("other-ca.crt").display().to_string();
    let url = |host: &str, mode: &str, root: &str| {
        format!(
            "postgres://postgres@{host}:{}/postgres?sslmode={mode}&sslrootcert={root}",
            pg.port
        )
    };
    let both = |out: &str, verdict: &str| {
        out.contains(&format!("{verdict} postgres connection"))
            && out.contains(&format!("{verdict} replication connection"))
    };

    let out = check_with(
        &pg,
        &broker.brokers(),
        &url("localhost", "verify-full", &ca),
    );
    assert!(both(&out, "PASS"), "right authority, right name:\n{out}");
    let out = check_with(
        &pg,
        &broker.brokers(),
        &url("localhost", "verify-full", &other),
    );
    assert!(both(&out, "FAIL"), "unrelated authority:\n{out}");
    assert!(out.contains("certificate"), "{out}");
    let out = check_with(
        &pg,
        &broker.brokers(),
        &url("127.0.0.1", "verify-full", &ca),
    );
    assert!(
        both(&out, "FAIL"),
        "a name the certificate does not carry:\n{out}"
    );
    let out = check_with(&pg, &broker.brokers(), &url("127.0.0.1", "verify-ca", &ca));
    assert!(
        both(&out, "PASS"),
        "verify-ca does not check the name:\n{out}"
    );
    let encrypted = pg
        .psql("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl");
    assert!(encrypted.parse::<i64>().is_ok(), "{encrypted}");

    // A root certificate file that is not there: a configuration error naming it, at start.
    let mut relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[(
            "RELAY_POSTGRES__URL",
            url("localhost", "verify-full", "/nonexistent/root.crt").as_str(),
        )],
    ));
    let status = relay.wait_exit(WAIT).expect("the relay stops");
    assert!(!status.success());
    assert!(
        relay.log().contains("/nonexistent/root.crt"),
        "{}",
        relay.log()
    );
}

/// `channel_binding=require`: the replication connection (like libpq, and tokio-postgres for
/// the query connection) accepts only SCRAM-SHA-256-PLUS bound to the server's certificate, so
/// neither an MD5 password request nor a server letting the relay in without SCRAM passes.
/// Before: the replication client answered MD5 and cleartext requests whatever was asked.
#[tokio::test(flavor = "multi_thread")]
async fn channel_binding_require_refuses_md5_and_unbound_logins() {
    let pg = PgCluster::start();
    pg.apply_schema();
    pg.psql(&format!(
        "SET password_encryption = 'md5'; CREATE ROLE {MD5_USER} LOGIN REPLICATION PASSWORD '{PASSWORD}'; \
         SET password_encryption = 'scram-sha-256'; CREATE ROLE {SCRAM_USER} LOGIN REPLICATION PASSWORD '{PASSWORD}';"
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    install_tls(&pg, dir.path());
    let broker = Tansu::start();
    let ca = dir.path().join("ca.crt").display().to_string();
    let url = |user: &str| {
        let password = if user == "postgres" {
            String::new()
        } else {
            format!(":{}", PASSWORD.replace(' ', "%20"))
        };
        format!(
            "postgres://{user}{password}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={ca}\
             &channel_binding=require",
            pg.port
        )
    };
    let line = |out: &str, name: &str| {
        out.lines()
            .filter(|l| ["PASS ", "FAIL ", "WARN "].iter().any(|v| l.starts_with(v)))
            .find(|l| l.contains(name))
            .unwrap_or_default()
            .to_owned()
    };

    let out = check_with(&pg, &broker.brokers(), &url(SCRAM_USER));
    assert!(
        line(&out, "postgres connection").starts_with("PASS")
            && line(&out, "replication connection").starts_with("PASS"),
        "SCRAM-SHA-256-PLUS:\n{out}"
    );
    for user in [MD5_USER, "postgres"] {
        let out = check_with(&pg, &broker.brokers(), &url(user));
        let repl = line(&out, "replication connection");
        assert!(
            repl.starts_with("FAIL") && repl.contains("channel_binding=require"),
            "{user}:\n{out}"
        );
        assert!(
            line(&out, "postgres connection").starts_with("FAIL"),
            "{user}:\n{out}"
        );
    }
}

/// The container's base images are pinned by digest (`FROM image:tag@sha256:<64 hex>`), so a
/// rebuild gets the bytes that were reviewed; `scripts/pin-images` moves the pins. Before: both
/// FROM lines named a tag only.
#[test]
fn the_dockerfile_pins_every_base_image_by_digest() {
    let dockerfile = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"),
    )
    .expect("read Dockerfile");
    let images: Vec<&str> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("FROM "))
        .map(|rest| rest.split_whitespace().next().unwrap_or(""))
        .collect();
    assert!(images.len() >= 2, "build and runtime stages: {images:?}");
    for image in images {
        let digest = image.split_once("@sha256:").map(|(_, d)| d);
        assert!(
            digest.is_some_and(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())),
            "{image} is not pinned by digest; run scripts/pin-images"
        );
    }
}
