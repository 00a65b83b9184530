//! `outbox-relay check`: verifies the environment and prints each check as PASS or FAIL with the fix.
//!
//! Checks: Postgres reachable, `wal_level=logical`, the REPLICATION privilege, free replication
//! slots and WAL senders, the outbox table with its columns, the state table, the publication, a
//! replication connection (pg_hba), the slot if it exists (its lag, the WAL it retains,
//! `wal_status` and `safe_wal_size`: at risk or lost is a failure), what a failover would do to
//! the slot (a warning when it would be lost or phantoms are possible), the transaction oracle (a
//! failure only when RocketMQ check-backs are on), and that the broker answers.

use std::time::Duration;

use rdkafka::producer::{BaseProducer, Producer};

use crate::config::{Config, redact_url};
use crate::postgres as db;
use crate::replication::ReplicationClient;
use crate::source as slot;
use crate::source::schema;

/// One line of the report.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: &'static str,
    pub ok: bool,
    /// Passed, but with a risk worth fixing (printed as WARN; `check` still succeeds).
    pub warning: bool,
    pub detail: String,
}

fn pass(name: &'static str, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        name,
        ok: true,
        warning: false,
        detail: detail.into(),
    }
}

fn warn(name: &'static str, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        name,
        ok: true,
        warning: true,
        detail: detail.into(),
    }
}

fn fail(name: &'static str, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        name,
        ok: false,
        warning: false,
        detail: detail.into(),
    }
}

/// Runs every check; never stops at the first failure unless later checks cannot run.
pub async fn run_checks(config: &Config) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let pg = config.pg_target();
    let url = redact_url(&config.postgres.url);
    let client = match db::connect(&pg).await {
        Ok(c) => {
            out.push(match unverified_remote(&pg) {
                Some(host) => warn(
                    "postgres connection",
                    format!(
                        "connected to {url}, but sslmode={} does not verify {host}, which is not \
                         this machine: a man in the middle could read the relay's password and \
                         the WAL; use sslmode=verify-full with sslrootcert=<the CA's \
                         certificate> in postgres.url",
                        pg.tls.mode.as_str()
                    ),
                ),
                None => pass("postgres connection", format!("connected to {url}")),
            });
            Some(c)
        }
        Err(e) => {
            out.push(fail(
                "postgres connection",
                format!(
                    "{url}: {}; check postgres.url (RELAY_POSTGRES__URL) and that the server is up",
                    db::describe(&e)
                ),
            ));
            None
        }
    };
    if let Some(c) = &client {
        out.extend(postgres_checks(c, config).await);
    }
    out.push(match ReplicationClient::connect_with_timeout(&pg, None).await {
        Ok(mut r) => match r.identify_system().await {
            Ok(id) => {
                r.close().await;
                pass(
                    "replication connection",
                    format!("IDENTIFY_SYSTEM ok (system {}, WAL at {})", id.system_id, id.xlog_pos),
                )
            }
            Err(e) => fail("replication connection", e.to_string()),
        },
        Err(e @ crate::replication::ReplicationError::Tls(_)) => {
            fail("replication connection", e.to_string())
        }
        Err(e) => fail(
            "replication connection",
            format!(
                "{e}; pg_hba.conf must admit the user to the database, e.g. 'host <database> <user> <address> scram-sha-256' (logical replication connections match their database's line, not 'replication')"
            ),
        ),
    });
    out.push(broker_check(config).await);
    out
}

/// A host of `postgres.url` beyond this machine that the TLS settings do not verify by name.
fn unverified_remote(pg: &crate::pgtls::PgTarget) -> Option<String> {
    if pg.tls.mode == crate::pgtls::SslMode::VerifyFull {
        return None;
    }
    pg.config.get_hosts().iter().find_map(|h| match h {
        tokio_postgres::config::Host::Tcp(name) => {
            let local = name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            (!local).then(|| name.clone())
        }
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(_) => None,
    })
}

async fn postgres_checks(c: &tokio_postgres::Client, config: &Config) -> Vec<CheckResult> {
    vec![
        wal_level_check(c).await,
        replication_privilege_check(c).await,
        slots_check(c, config).await,
        table_check(c, config).await,
        marking_check(c, config).await,
        slot_check(c, config).await,
        failover_check(c, config).await,
        oracle_check(c, config).await,
    ]
}

async fn wal_level_check(c: &tokio_postgres::Client) -> CheckResult {
    match c.query_one("SHOW wal_level", &[]).await {
        Ok(r) => {
            let level: String = r.get(0);
            if level == "logical" {
                pass("wal_level", "logical")
            } else {
                fail(
                    "wal_level",
                    format!(
                        "wal_level is '{level}'; set wal_level=logical in postgresql.conf and restart Postgres"
                    ),
                )
            }
        }
        Err(e) => fail("wal_level", db::describe(&e)),
    }
}

async fn replication_privilege_check(c: &tokio_postgres::Client) -> CheckResult {
    match c
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        Ok(r) => {
            let user: String = r.get(0);
            if r.get::<_, bool>(1) {
                pass("replication privilege", format!("role {user} may replicate"))
            } else {
                fail(
                    "replication privilege",
                    format!("role {user} lacks REPLICATION; run: ALTER ROLE \"{user}\" REPLICATION;"),
                )
            }
        }
        Err(e) => fail("replication privilege", db::describe(&e)),
    }
}

async fn slots_check(c: &tokio_postgres::Client, config: &Config) -> CheckResult {
    match c
        .query_one(
            "SELECT current_setting('max_replication_slots')::int - \
                 (SELECT count(*) FROM pg_replication_slots)::int, \
             current_setting('max_wal_senders')::int",
            &[],
        )
        .await
    {
        Ok(r) => {
            let free_slots: i32 = r.get(0);
            let senders: i32 = r.get(1);
            let slot_exists = slot::slot_info(c, &config.postgres.slot)
                .await
                .ok()
                .flatten()
                .is_some();
            if (free_slots > 0 || slot_exists) && senders > 0 {
                pass(
                    "slots and senders",
                    format!("{free_slots} free slots, max_wal_senders={senders}"),
                )
            } else {
                fail(
                    "slots and senders",
                    format!(
                        "{free_slots} free replication slots, max_wal_senders={senders}; raise max_replication_slots / max_wal_senders in postgresql.conf and restart"
                    ),
                )
            }
        }
        Err(e) => fail("slots and senders", db::describe(&e)),
    }
}

async fn table_check(c: &tokio_postgres::Client, config: &Config) -> CheckResult {
    match schema::preflight(c, config).await {
        Ok(()) => pass(
            "outbox table and publication",
            format!(
                "{} is published by '{}' (inserts)",
                config.outbox_table_sql(),
                config.postgres.publication
            ),
        ),
        Err(e) => fail("outbox table and publication", e.to_string()),
    }
}

async fn marking_check(c: &tokio_postgres::Client, config: &Config) -> CheckResult {
    match schema::marking_preflight(c, config).await {
        Ok(())
            if config.outbox.on_delivered == crate::config::OnDelivered::Record
                && let Some(cache) = seq_cache(c, config).await
                && cache > 1 =>
        {
            warn(
                "marking columns and grant",
                format!(
                    "the sequence of {}.{} caches {cache} values per session: a session may insert \
                     a row with a seq far below the ones other sessions commit meanwhile, after the \
                     delivery ledger's watermark moved past it, and a relay that then loses its \
                     slot would not find that row; run ALTER TABLE {} ALTER COLUMN {} SET CACHE 1",
                    config.outbox_table_sql(),
                    config.outbox.columns.seq,
                    config.outbox_table_sql(),
                    crate::quote::quote_ident(&config.outbox.columns.seq),
                ),
            )
        }
        Ok(()) => pass(
            "marking columns and grant",
            format!(
                "{}; failed rows: the relay's role may update {}, {} and {} of {}",
                match config.outbox.on_delivered {
                    crate::config::OnDelivered::Record => format!(
                        "deliveries recorded in the ledger {} (outbox.on_delivered = record)",
                        config.ledger_table_sql()
                    ),
                    crate::config::OnDelivered::Mark => format!(
                        "deliveries marked in {}",
                        config.outbox.columns.delivered_at
                    ),
                    crate::config::OnDelivered::Delete =>
                        "delivered rows deleted (outbox.on_delivered = delete)".to_owned(),
                },
                config.outbox.columns.failed_at,
                config.outbox.columns.attempts,
                config.outbox.columns.last_error,
                config.outbox_table_sql()
            ),
        ),
        Err(e) => fail("marking columns and grant", e.to_string()),
    }
}

/// The cache size of the `seq` column's sequence, if it has one the relay's role can see.
async fn seq_cache(c: &tokio_postgres::Client, config: &Config) -> Option<i64> {
    c.query_opt(
        "SELECT s.seqcache FROM pg_sequence s \
         WHERE s.seqrelid = pg_get_serial_sequence($1, $2)::regclass",
        &[&config.outbox_table_sql(), &config.outbox.columns.seq],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get(0))
}

async fn slot_check(c: &tokio_postgres::Client, config: &Config) -> CheckResult {
    match slot::slot_info(c, &config.postgres.slot).await {
        Ok(None) => pass(
            "replication slot",
            format!(
                "'{}' does not exist yet; the relay creates it on first start",
                config.postgres.slot
            ),
        ),
        Ok(Some(i)) if i.plugin.as_deref() != Some("pgoutput") => fail(
            "replication slot",
            format!(
                "'{}' uses plugin {:?}; drop it or choose another postgres.slot",
                config.postgres.slot, i.plugin
            ),
        ),
        Ok(Some(i)) if i.wal_status.as_deref() == Some("lost") => fail(
            "replication slot",
            format!(
                "'{}' was invalidated (wal_status=lost): Postgres removed WAL it needed. Start the \
                 relay to recover (new slot, undelivered rows republished from the table) and raise \
                 max_slot_wal_keep_size",
                config.postgres.slot
            ),
        ),
        Ok(Some(i)) => {
            let at_risk = i.wal_status.as_deref() == Some("unreserved");
            let detail = format!(
                "'{}': confirmed flush {}, lag {} bytes, WAL retained {} bytes, wal_status {}, safe_wal_size {}, {}",
                config.postgres.slot,
                i.confirmed_flush
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "none".into()),
                i.lag_bytes.unwrap_or(0),
                i.retained_bytes.unwrap_or(0),
                i.wal_status.as_deref().unwrap_or("unknown"),
                i.safe_wal_size
                    .map(|b| format!("{b} bytes"))
                    .unwrap_or_else(|| "unlimited".into()),
                match i.active_pid {
                    Some(pid) => format!("in use by process {pid}"),
                    None => "not in use".into(),
                }
            );
            if at_risk {
                fail(
                    "replication slot",
                    format!(
                        "{detail}; AT RISK: the slot retains more WAL than max_slot_wal_keep_size \
                         allows and will be invalidated at the next checkpoint unless the relay \
                         catches up"
                    ),
                )
            } else {
                pass("replication slot", detail)
            }
        }
        Err(e) => fail("replication slot", e.to_string()),
    }
}

/// What a failover of this server would do to the slot: Postgres 17+ failover slots synced to
/// a standby survive it; before 17 the new primary has no slot (the relay recovers by
/// republishing undelivered rows). Without `synchronized_standby_slots` the relay may publish
/// transactions a standby never received: after a failover to it, messages for rows that no
/// longer exist (phantoms).
async fn failover_check(c: &tokio_postgres::Client, config: &Config) -> CheckResult {
    const NAME: &str = "failover";
    let major = match slot::server_major(c).await {
        Ok(m) => m,
        Err(e) => return fail(NAME, e.to_string()),
    };
    // Physical slots a standby streams from now: the candidates for synchronized_standby_slots
    // (an inactive slot there, or one of a WAL archiver, would hold logical decoding back).
    let physical: Vec<String> = match c
        .query(
            "SELECT slot_name::text FROM pg_replication_slots \
             WHERE slot_type = 'physical' AND active ORDER BY slot_name",
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => return fail(NAME, db::describe(&e)),
    };
    // Physical walsenders only: logical ones (this relay, subscriptions) hold logical slots.
    let standbys: i64 = match c
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE pid NOT IN \
                 (SELECT active_pid FROM pg_replication_slots \
                  WHERE slot_type = 'logical' AND active_pid IS NOT NULL)",
            &[],
        )
        .await
    {
        Ok(r) => r.get(0),
        Err(e) => return fail(NAME, db::describe(&e)),
    };
    let slot = &config.postgres.slot;
    let standby_slots = if physical.is_empty() {
        "the physical slots of the standbys that may take over (pg_create_physical_replication_slot, primary_slot_name on each standby)".to_owned()
    } else {
        format!(
            "'{}' (the active physical slots; keep only those of standbys that may take over)",
            physical.join(",")
        )
    };
    if major < 17 {
        let detail = format!(
            "Postgres {major} has no failover slots: after a failover the new primary has no slot \
             '{slot}'; the relay then creates one and republishes every row still undelivered in \
             the table (nothing lost, duplicates), and messages it published for transactions the \
             standby had not received describe rows that no longer exist. Postgres 17+ keeps the \
             slot on a standby (README \"Failover\")"
        );
        return if standbys > 0 || !physical.is_empty() {
            warn(NAME, detail)
        } else {
            pass(
                NAME,
                format!("no standby streams from this server; {detail}"),
            )
        };
    }
    if !config.postgres.failover_slot {
        return warn(
            NAME,
            format!(
                "postgres.failover_slot is off: a failover loses slot '{slot}' (the relay then \
                 republishes every undelivered row); set it to true (RELAY_POSTGRES__FAILOVER_SLOT)"
            ),
        );
    }
    let info = match slot::slot_info(c, slot).await {
        Ok(i) => i,
        Err(e) => return fail(NAME, e.to_string()),
    };
    let synchronized: String = match c
        .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
        .await
    {
        Ok(r) => r.get(0),
        Err(e) => return fail(NAME, db::describe(&e)),
    };
    let slot_state = match info.as_ref().and_then(|i| i.failover) {
        Some(true) => format!("slot '{slot}' is a failover slot"),
        Some(false) => format!(
            "slot '{slot}' is not a failover slot yet; the relay makes it one at its next start"
        ),
        None => format!("slot '{slot}' will be created as a failover slot"),
    };
    let standby_setup = "on each standby set sync_replication_slots = on, hot_standby_feedback = \
                         on, primary_slot_name, and dbname in primary_conninfo";
    if synchronized.trim().is_empty() {
        return warn(
            NAME,
            format!(
                "{slot_state}, but synchronized_standby_slots is empty: the relay may publish \
                 transactions a standby has not received yet, and after a failover to it those \
                 messages describe rows that no longer exist (phantoms), and the standby's copy of \
                 the slot may be behind. Set synchronized_standby_slots = {standby_slots} on the \
                 primary; {standby_setup}"
            ),
        );
    }
    let waiting_on: Vec<&str> = synchronized
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty() && *n != "*" && !physical.iter().any(|p| p == n))
        .collect();
    if !waiting_on.is_empty() {
        return warn(
            NAME,
            format!(
                "{slot_state}; synchronized_standby_slots names '{}', which no standby streams \
                 from now: the primary holds every change back from the relay until it does. \
                 Start that standby, or remove the slot from synchronized_standby_slots",
                waiting_on.join(",")
            ),
        );
    }
    if info.as_ref().and_then(|i| i.failover) == Some(false) {
        return warn(NAME, format!("{slot_state}; {standby_setup}"));
    }
    pass(
        NAME,
        format!(
            "{slot_state}; the relay only receives what standby slots '{synchronized}' have \
             confirmed; {standby_setup}"
        ),
    )
}

/// The transaction oracle (`sql/003_transactions.sql`): required when RocketMQ check-backs are
/// on; otherwise only reported (the HTTP endpoint answers unknown without it).
async fn oracle_check(c: &tokio_postgres::Client, config: &Config) -> CheckResult {
    let schema = &config.outbox.schema;
    let needed =
        !config.rocketmq.name_server.is_empty() || !config.transactions.http_addr.is_empty();
    let listener = &config.transactions.http_addr;
    let exposed = listener
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| !a.ip().is_loopback());
    match crate::oracle::installed_functions(c, schema).await {
        Ok(found) if found.len() == 3 && exposed => warn(
            "transaction oracle",
            format!(
                "installed in schema {schema}; its HTTP listener {listener} is reachable beyond \
                 this host and the bearer token travels in clear text: put TLS termination (a \
                 sidecar proxy) in front of it, or keep it on a private network"
            ),
        ),
        Ok(found) if found.len() == 3 => pass(
            "transaction oracle",
            format!(
                "outbox_tx_begin/check/purge are installed in schema {schema}{}",
                if listener.is_empty() {
                    String::new()
                } else {
                    format!("; answering over HTTP on {listener} with a bearer token")
                }
            ),
        ),
        Ok(_) => {
            let detail = format!(
                "not installed in schema {schema}: apply sql/003_transactions.sql there \
                 (needed for RocketMQ check-backs and transactions.http_addr)"
            );
            if needed {
                fail("transaction oracle", detail)
            } else {
                pass("transaction oracle", detail)
            }
        }
        Err(e) => fail("transaction oracle", db::describe(&e)),
    }
}

async fn broker_check(config: &Config) -> CheckResult {
    match config.sink {
        crate::config::SinkKind::Rocketmq => return rocketmq_check(config).await,
        crate::config::SinkKind::Nats => {
            return match nats_check(config).await {
                Ok(found) => pass("broker", found),
                Err(e) => fail("broker", e),
            };
        }
        crate::config::SinkKind::Rabbitmq => {
            let r = &config.rabbitmq;
            return match crate::sink::rabbitmq::open_channel(r, &config.dead_letter.topic).await {
                Ok((conn, _)) => {
                    let _ = conn.close(200, "check done".into()).await;
                    pass(
                        "broker",
                        format!(
                            "RabbitMQ at {} accepts publisher confirms{}",
                            crate::config::redact_url(&r.url),
                            if r.declare {
                                format!(
                                    "; exchange '{}' ({}) and dead-letter queue '{}' declared",
                                    r.exchange, r.exchange_type, config.dead_letter.topic
                                )
                            } else {
                                String::new()
                            }
                        ),
                    )
                }
                Err(e) => fail("broker", e),
            };
        }
        crate::config::SinkKind::Kafka => {}
    }
    let cc = crate::sink::kafka::probe_config(&config.kafka);
    let brokers = config.kafka.brokers.clone();
    let result = tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = cc.create()?;
        producer
            .client()
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|m| m.brokers().len())
    })
    .await;
    match result {
        Ok(Ok(n)) => pass("broker", format!("{brokers} answered ({n} brokers)")),
        Ok(Err(e)) => fail(
            "broker",
            format!(
                "{brokers}: {e}; check kafka.brokers (RELAY_KAFKA__BROKERS) and that the broker is up"
            ),
        ),
        Err(e) => fail("broker", e.to_string()),
    }
}

/// `sink = "nats"`: the server answers, JetStream is on, and a stream captures the routed
/// subjects (a sample of `kafka.topic_template`) and the dead-letter subject, or will be created.
async fn nats_check(config: &Config) -> Result<String, String> {
    use crate::sink::nats;
    let n = &config.nats;
    let client = tokio::time::timeout(Duration::from_secs(15), nats::connect(n, false))
        .await
        .map_err(|_| {
            format!(
                "NATS at {} did not answer within 15 s",
                crate::config::redact_url(&n.url)
            )
        })??;
    nats::jetstream_answers(&client).await.map_err(|e| {
        format!("the NATS server answers but {e}; start it with JetStream on (nats-server -js)")
    })?;
    let js = nats::context(client, n);
    let sample = sample_subject(&config.kafka.topic_template);
    let mut captured = Vec::new();
    for subject in [sample.as_str(), config.dead_letter.topic.as_str()] {
        match js.stream_by_subject(subject).await {
            Ok(stream) => captured.push(format!("{subject} → stream {stream}")),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::context::GetStreamByNameErrorKind::NotFound =>
            {
                let covered = n.create_stream
                    && n.subjects()
                        .iter()
                        .any(|pattern| subject_matches(pattern, subject));
                if !covered {
                    return Err(format!(
                        "no JetStream stream captures {subject}{}; add it to a stream's subjects \
                         (nats.stream_subjects with nats.create_stream = true, or `nats stream edit`)",
                        if n.create_stream {
                            format!(
                                " and nats.stream_subjects ({}) does not cover it",
                                n.stream_subjects
                            )
                        } else {
                            String::new()
                        }
                    ));
                }
                captured.push(format!(
                    "{subject} → stream {} (created at start)",
                    n.stream
                ));
            }
            Err(e) => {
                return Err(format!(
                    "cannot ask JetStream which stream captures {subject}: {e}"
                ));
            }
        }
    }
    Ok(format!(
        "NATS at {} with JetStream: {}",
        crate::config::redact_url(&n.url),
        captured.join(", ")
    ))
}

/// The template with each placeholder replaced by `sample`: a subject the routing can give
/// (the template was validated at load).
fn sample_subject(template: &str) -> String {
    crate::config::TopicTemplate::parse(template)
        .map(|t| t.render("sample", "sample", "sample"))
        .unwrap_or_else(|_| template.to_owned())
}

/// Whether the NATS subject pattern `pattern` (`*` one token, `>` the rest) matches `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// `sink = "rocketmq"`: a name server answers and lists at least one master broker.
async fn rocketmq_check(config: &Config) -> CheckResult {
    match rocketmq_masters(config).await {
        Ok(found) => pass("broker", found),
        Err(e) => fail(
            "broker",
            format!(
                "{e}; check rocketmq.name_server (RELAY_ROCKETMQ__NAME_SERVER) and that the name server is up"
            ),
        ),
    }
}

/// The master brokers the first answering name server lists, described; an error when none
/// answers or it lists none.
pub async fn rocketmq_masters(config: &Config) -> Result<String, String> {
    let (ns, masters) = crate::rocketmq::client::masters_from_any(
        &config.rocketmq.name_servers(),
        crate::rocketmq::acl::Credentials::of(&config.rocketmq).as_ref(),
    )
    .await?;
    if masters.is_empty() {
        return Err(format!(
            "{} lists no master broker; start a broker registered with it",
            ns.addr()
        ));
    }
    // Each master answers a heartbeat (no producer group: nothing registered), signed when
    // ACL credentials are set: an ACL refusal shows here rather than at the first send.
    let credentials = crate::rocketmq::acl::Credentials::of(&config.rocketmq);
    for addr in &masters {
        let broker = crate::rocketmq::connection::Connection::open(
            addr,
            None,
            crate::rocketmq::client::TIMEOUT,
            credentials.clone(),
        )
        .await?;
        crate::rocketmq::client::heartbeat(&broker, "outbox-relay-check", &[]).await?;
    }
    Ok(format!(
        "RocketMQ name server {} lists {} master broker(s), each answered{}: {}",
        ns.addr(),
        masters.len(),
        if credentials.is_some() {
            " a request signed for rocketmq.access_key"
        } else {
            ""
        },
        masters.join(", ")
    ))
}

/// Prints the report; returns whether every check passed.
pub fn print_report(results: &[CheckResult]) -> bool {
    for r in results {
        println!(
            "{} {:<30} {}",
            match (r.ok, r.warning) {
                (false, _) => "FAIL",
                (true, true) => "WARN",
                (true, false) => "PASS",
            },
            r.name,
            r.detail
        );
    }
    let failed = results.iter().filter(|r| !r.ok).count();
    if failed == 0 {
        println!("all {} checks passed", results.len());
    } else {
        println!("{failed} of {} checks failed", results.len());
    }
    failed == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_subject_patterns_and_template_samples() {
        assert_eq!(
            sample_subject("outbox.event.{aggregatetype}"),
            "outbox.event.sample"
        );
        assert_eq!(
            sample_subject("a.{aggregatetype}.{type}"),
            "a.sample.sample"
        );
        assert!(subject_matches("outbox.>", "outbox.event.sample"));
        assert!(subject_matches("outbox.*.sample", "outbox.event.sample"));
        assert!(subject_matches("outbox.dlq", "outbox.dlq"));
        assert!(!subject_matches("outbox.>", "outbox"));
        assert!(!subject_matches("outbox.*", "outbox.event.sample"));
        assert!(!subject_matches("orders.>", "outbox.dlq"));
    }

    #[test]
    fn a_remote_server_not_verified_by_name_is_reported() {
        let target = |url: &str| {
            let mut c = Config::default();
            c.postgres.url = url.into();
            c.pg_target()
        };
        assert_eq!(
            unverified_remote(&target("postgres://u@db.internal/app?sslmode=require")),
            Some("db.internal".into())
        );
        assert_eq!(
            unverified_remote(&target("postgres://u@127.0.0.1,localhost/app")),
            None,
            "this machine"
        );
        let dir = std::env::temp_dir().join("outbox-relay-check-test-root.crt");
        std::fs::write(&dir, "").unwrap();
        assert_eq!(
            unverified_remote(&target(&format!(
                "postgres://u@db.internal/app?sslmode=verify-full&sslrootcert={}",
                dir.display()
            ))),
            None
        );
    }
}
