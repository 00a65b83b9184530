//! `outbox-relay check`: verifies the environment and prints each check as PASS or FAIL with the fix.
//!
//! Checks: Postgres reachable, `wal_level=logical`, the REPLICATION privilege, free replication
//! slots and WAL senders, the outbox table with its columns, the state table, the publication, a
//! replication connection (pg_hba), the slot if it exists (its lag, the WAL it retains,
//! `wal_status` and `safe_wal_size`: at risk or lost is a failure), the transaction oracle (a
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
    pub detail: String,
}

fn pass(name: &'static str, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        name,
        ok: true,
        detail: detail.into(),
    }
}

fn fail(name: &'static str, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        name,
        ok: false,
        detail: detail.into(),
    }
}

/// Runs every check; never stops at the first failure unless later checks cannot run.
pub async fn run_checks(config: &Config) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let pg = config.pg_config();
    let url = redact_url(&config.postgres.url);
    let client = match db::connect(&pg).await {
        Ok(c) => {
            out.push(pass("postgres connection", format!("connected to {url}")));
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
    out.push(match ReplicationClient::connect(&pg).await {
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

async fn postgres_checks(c: &tokio_postgres::Client, config: &Config) -> Vec<CheckResult> {
    vec![
        wal_level_check(c).await,
        replication_privilege_check(c).await,
        slots_check(c, config).await,
        table_check(c, config).await,
        marking_check(c, config).await,
        slot_check(c, config).await,
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
        Ok(()) => pass(
            "marking columns and grant",
            format!(
                "the relay's role may update {}, {}, {} and {} of {}",
                config.outbox.columns.delivered_at,
                config.outbox.columns.failed_at,
                config.outbox.columns.attempts,
                config.outbox.columns.last_error,
                config.outbox_table_sql()
            ),
        ),
        Err(e) => fail("marking columns and grant", e.to_string()),
    }
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

/// The transaction oracle (`sql/003_transactions.sql`): required when RocketMQ check-backs are
/// on; otherwise only reported (the HTTP endpoint answers unknown without it).
async fn oracle_check(c: &tokio_postgres::Client, config: &Config) -> CheckResult {
    let schema = &config.outbox.schema;
    let needed = !config.rocketmq.name_server.is_empty();
    match crate::oracle::installed_functions(c, schema).await {
        Ok(found) if found.len() == 3 => pass(
            "transaction oracle",
            format!("outbox_tx_begin/check/purge are installed in schema {schema}"),
        ),
        Ok(_) => {
            let detail = format!(
                "not installed in schema {schema}: apply sql/003_transactions.sql there \
                 (needed for RocketMQ check-backs and GET /v1/transactions/{{key}})"
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
    if config.sink == crate::config::SinkKind::Rocketmq {
        return rocketmq_check(config).await;
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
    let (ns, masters) =
        crate::rocketmq::client::masters_from_any(&config.rocketmq.name_servers()).await?;
    if masters.is_empty() {
        return Err(format!(
            "{} lists no master broker; start a broker registered with it",
            ns.addr()
        ));
    }
    Ok(format!(
        "RocketMQ name server {} lists {} master broker(s): {}",
        ns.addr(),
        masters.len(),
        masters.join(", ")
    ))
}

/// Prints the report; returns whether every check passed.
pub fn print_report(results: &[CheckResult]) -> bool {
    for r in results {
        println!(
            "{} {:<30} {}",
            if r.ok { "PASS" } else { "FAIL" },
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
