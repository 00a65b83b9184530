//! The chaos suite: a writer commits outbox rows continuously (many aggregates, mixed transaction
//! sizes, some rolled back) while the relay is killed with SIGKILL, Postgres restarts (fast and
//! immediate) and the broker becomes unreachable or fails requests. Postgres is the source of truth
//! at the end: every committed row must be in the broker (lost = 0), no row of a rolled-back
//! transaction may be (leaked = 0), per aggregate the first deliveries keep commit order
//! (reordered = 0), every row is marked delivered, and duplicates are counted.
//!
//! CI runs a short schedule. By hand, a longer one: `CHAOS_ROWS=200000 cargo test --release
//! --test chaos -- --nocapture` (the writer runs until that many rows are committed, faults keep
//! coming meanwhile). `CHAOS_SEED` repeats a schedule.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const WAIT: Duration = Duration::from_secs(300);
/// Where every chaos writer's rows go.
const TOPIC: &str = "outbox.event.chaos";

/// A small deterministic generator (xorshift), so a failing schedule can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        })
}

/// Target rows for the hand variant; the CI variant runs a fixed fault schedule instead.
fn target_rows() -> Option<u64> {
    std::env::var("CHAOS_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
}

/// Writers in the background: each owns a disjoint set of aggregates, so per-aggregate commit
/// order is the writer's insertion order (the table's `seq`).
struct Writers {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    rolled_back: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Writers {
    /// `max_tx`: the largest transaction a writer commits.
    fn start(url: String, writers: u64, seed: u64, max_tx: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let rolled_back = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..writers)
            .map(|w| {
                let (url, stop, committed, rolled_back) = (
                    url.clone(),
                    stop.clone(),
                    committed.clone(),
                    rolled_back.clone(),
                );
                thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(write_loop(
                        url,
                        w,
                        seed + w,
                        max_tx,
                        stop,
                        committed,
                        rolled_back,
                    ));
                })
            })
            .collect();
        Writers {
            stop,
            committed,
            rolled_back,
            threads,
        }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.rolled_back)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default()
    }
}

async fn write_loop(
    url: String,
    writer: u64,
    seed: u64,
    max_tx: u64,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    rolled_back: Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut rng = Rng::new(seed);
    let sizes: Vec<u64> = [1u64, 1, 1, 2, 5, 10, 50, 200]
        .into_iter()
        .filter(|s| *s <= max_tx)
        .collect();
    while !stop.load(Ordering::SeqCst) {
        let Ok((mut client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::SeqCst) {
            let n = sizes[rng.below(sizes.len() as u64) as usize];
            let rollback = rng.below(10) == 0;
            let aggregate_base = writer * 1000;
            let result = async {
                let tx = client.transaction().await?;
                let rows = tx
                    .query(
                        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                         SELECT 'chaos', 'w' || ($1::bigint + (g % 40)), 'Tick', \
                                jsonb_build_object('n', g, 'pad', repeat('p', 150)) \
                         FROM generate_series(1, $2::int) g ORDER BY g RETURNING id::text",
                        &[&(aggregate_base as i64), &(n as i32)],
                    )
                    .await?;
                let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                if rollback {
                    tx.rollback().await?;
                } else {
                    tx.commit().await?;
                }
                Ok::<_, tokio_postgres::Error>(ids)
            }
            .await;
            match result {
                Ok(ids) if rollback => rolled_back.lock().unwrap().extend(ids),
                Ok(ids) => {
                    committed.fetch_add(ids.len() as u64, Ordering::SeqCst);
                }
                Err(_) => break, // connection lost (Postgres restart): reconnect
            }
            tokio::time::sleep(Duration::from_millis(5 + rng.below(20))).await;
        }
    }
}

#[derive(Default, Debug)]
struct Verdict {
    rows: usize,
    lost: usize,
    leaked: usize,
    reordered: usize,
    duplicates: usize,
    undelivered: usize,
    /// A few of the lost rows' ids, to look for in the relay logs.
    lost_ids: Vec<String>,
}

/// Compares what the broker holds with what Postgres holds.
fn verify(pg: &PgCluster, brokers: &str, topic: &str, rolled_back: &[String]) -> Verdict {
    // (id, aggregateid, seq, delivered)
    let table: Vec<(String, String, i64, bool)> = pg
        .psql("SELECT id, aggregateid, seq, delivered_at IS NOT NULL FROM outbox_status")
        .lines()
        .map(|l| {
            let p: Vec<&str> = l.split('|').collect();
            (
                p[0].to_owned(),
                p[1].to_owned(),
                p[2].parse().unwrap(),
                p[3] == "t",
            )
        })
        .collect();
    let seq_of: HashMap<&str, i64> = table
        .iter()
        .map(|(id, _, s, _)| (id.as_str(), *s))
        .collect();
    let got = consume(brokers, &[topic], table.len(), WAIT, Duration::from_secs(3));
    let mut v = Verdict {
        rows: table.len(),
        undelivered: table.iter().filter(|r| !r.3).count(),
        ..Default::default()
    };
    let mut seen = HashSet::new();
    let mut by_partition: HashMap<i32, Vec<&Received>> = HashMap::new();
    for m in &got {
        by_partition.entry(m.partition).or_default().push(m);
    }
    let mut last_seq: HashMap<Vec<u8>, i64> = HashMap::new();
    for msgs in by_partition.values_mut() {
        msgs.sort_by_key(|m| m.offset);
        for m in msgs.iter() {
            if !seen.insert(m.id().to_owned()) {
                v.duplicates += 1;
                continue;
            }
            match seq_of.get(m.id()) {
                None => v.leaked += 1,
                Some(&seq) => {
                    let key = m.key.clone().unwrap_or_default();
                    if last_seq.get(&key).is_some_and(|&prev| prev > seq) {
                        v.reordered += 1;
                    }
                    last_seq.insert(key, seq);
                }
            }
        }
    }
    v.lost = table.iter().filter(|(id, ..)| !seen.contains(id)).count();
    v.lost_ids = table
        .iter()
        .filter(|(id, ..)| !seen.contains(id))
        .take(5)
        .map(|(id, ..)| id.clone())
        .collect();
    let rolled: HashSet<&String> = rolled_back.iter().collect();
    v.leaked += got
        .iter()
        .filter(|m| rolled.contains(&m.id().to_owned()))
        .count();
    v
}

fn wait_all_delivered(pg: &PgCluster) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if pg.psql("SELECT count(*) FROM outbox_status WHERE delivered_at IS NULL") == "0" {
            return true;
        }
        thread::sleep(Duration::from_millis(500));
    }
    false
}

/// Why rows are still undelivered: their state in the table, and where the relay logs of every
/// process of the run were saved.
fn undelivered_report(
    pg: &PgCluster,
    brokers: &str,
    rolled_back: &[String],
    logs: &str,
    name: &str,
) -> String {
    // Published but unmarked, or never published at all?
    let v = verify(pg, brokers, TOPIC, rolled_back);
    // What the relays warned about, across every process.
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(40)
        .collect();
    let rows = pg.psql(
        "SELECT id, aggregateid, seq, attempts, failed_at IS NOT NULL, last_error FROM outbox_status \
         WHERE delivered_at IS NULL ORDER BY seq LIMIT 10",
    );
    let slot = pg
        .psql("SELECT confirmed_flush_lsn, active, pg_current_wal_lsn() FROM pg_replication_slots");
    let path = std::env::temp_dir().join(format!("{name}-relay.log"));
    let _ = std::fs::write(&path, logs);
    format!(
        "rows left undelivered (id|aggregate|seq|attempts|failed|last_error):\n{rows}\n\
         slot (confirmed_flush|active|wal): {slot}\nagainst the broker: {v:?}\n\
         relay warnings:\n{}\nrelay logs of every process: {}",
        warnings.join("\n"),
        path.display()
    )
}

fn chaos_env(pg: &PgCluster, brokers: &str) -> Vec<(String, String)> {
    relay_env(
        pg,
        brokers,
        &[
            ("RELAY_RETRY__MAX_DELAY_MS", "1000"),
            ("RELAY_PIPELINE__MAX_IN_FLIGHT", "2000"),
            ("RELAY_KAFKA__TOPIC_PARTITIONS", "4"),
        ],
    )
}

/// [`chaos_env`] with `delivery = "exactly_once"`.
fn eos_chaos_env(
    pg: &PgCluster,
    brokers: &str,
    transactional_id: &str,
    batch_max_ms: &str,
) -> Vec<(String, String)> {
    let mut env = chaos_env(pg, brokers);
    for (k, v) in [
        ("RELAY_DELIVERY", "exactly_once"),
        ("RELAY_EXACTLY_ONCE__TRANSACTIONAL_ID", transactional_id),
        ("RELAY_EXACTLY_ONCE__BATCH_MAX_MS", batch_max_ms),
    ] {
        env.push((k.into(), v.into()));
    }
    env
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillRelay,
    PgRestartFast,
    PgRestartImmediate,
    BrokerOutage,
}

/// Faults against Postgres, the relay process and Tansu (frozen with SIGSTOP for tens of seconds,
/// so it is unreachable but keeps its data).
#[test]
fn chaos_with_kills_postgres_restarts_and_broker_outages() {
    let seed = seed();
    eprintln!("chaos seed {seed} (CHAOS_SEED={seed} repeats this schedule)");
    let mut rng = Rng::new(seed);
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let env = chaos_env(&pg, &broker.brokers());
    let mut relay = Relay::start(&env);
    let writers = Writers::start(pg.url(), 2, seed, 200);
    // Logs of every relay process, kept to explain a failure.
    let mut logs = String::new();

    let mut schedule = vec![
        Fault::KillRelay,
        Fault::KillRelay,
        Fault::KillRelay,
        Fault::PgRestartFast,
        Fault::PgRestartFast,
        Fault::PgRestartImmediate,
        Fault::PgRestartImmediate,
        Fault::BrokerOutage,
        Fault::BrokerOutage,
    ];
    let (mut kills, mut pg_restarts, mut outages) = (0, 0, 0);
    let mut peak_rss_kib = 0;
    let mut round = 0;
    loop {
        // Shuffle each round of faults.
        for i in (1..schedule.len()).rev() {
            schedule.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for fault in schedule.clone() {
            thread::sleep(rng.millis(1_000, 5_000));
            peak_rss_kib = peak_rss_kib.max(relay.peak_rss_kib().unwrap_or(0));
            match fault {
                Fault::KillRelay => {
                    relay.kill();
                    logs.push_str(&relay.log());
                    kills += 1;
                    thread::sleep(rng.millis(0, 1_500));
                    relay = Relay::start(&env);
                }
                Fault::PgRestartFast => {
                    pg.restart("fast");
                    pg_restarts += 1;
                }
                Fault::PgRestartImmediate => {
                    pg.restart("immediate");
                    pg_restarts += 1;
                }
                Fault::BrokerOutage => {
                    broker.pause();
                    let outage = rng.millis(10_000, 25_000);
                    let until = Instant::now() + outage;
                    // The writer keeps committing; the relay must stop reading at its bound.
                    while Instant::now() < until {
                        thread::sleep(Duration::from_millis(500));
                        peak_rss_kib = peak_rss_kib.max(relay.peak_rss_kib().unwrap_or(0));
                    }
                    broker.resume();
                    outages += 1;
                }
            }
        }
        round += 1;
        match target_rows() {
            Some(target) if writers.committed() < target => continue,
            _ if round >= 1 => break,
            _ => continue,
        }
    }
    let rolled_back = writers.stop();
    if !wait_all_delivered(&pg) {
        logs.push_str(&relay.log());
        panic!(
            "{}",
            undelivered_report(&pg, &broker.brokers(), &rolled_back, &logs, "chaos")
        );
    }
    peak_rss_kib = peak_rss_kib.max(relay.peak_rss_kib().unwrap_or(0));
    let v = verify(&pg, &broker.brokers(), TOPIC, &rolled_back);
    println!(
        "chaos: rows={} kills={kills} pg_restarts={pg_restarts} outages={outages} lost={} leaked={} reordered={} duplicates={} rolled_back_rows={} peak_rss_mib={}",
        v.rows,
        v.lost,
        v.leaked,
        v.reordered,
        v.duplicates,
        rolled_back.len(),
        peak_rss_kib / 1024
    );
    assert_eq!(v.lost, 0, "{v:?}");
    assert_eq!(v.leaked, 0, "{v:?}");
    assert_eq!(v.reordered, 0, "{v:?}");
    assert_eq!(v.undelivered, 0, "{v:?}");
    assert!(
        v.rows > 1_000,
        "the writer wrote too little to mean anything: {v:?}"
    );
    assert!(
        !rolled_back.is_empty(),
        "the schedule must include rollbacks"
    );
    // Bounded memory through the outages: in flight is capped at 2000 small messages.
    assert!(peak_rss_kib < 200 * 1024, "peak RSS {peak_rss_kib} KiB");
}

/// Faults only librdkafka's mock cluster can make: brokers down and up, produce requests failing
/// with NOT_ENOUGH_REPLICAS / REQUEST_TIMED_OUT / transport errors, added latency — plus kills.
#[test]
fn chaos_with_broker_failures_from_the_mock_cluster() {
    let seed = seed();
    eprintln!("chaos (mock cluster) seed {seed}");
    let mut rng = Rng::new(seed);
    let mock = MockCluster::new(3).expect("mock cluster");
    mock.create_topic(TOPIC, 4, 3).expect("create topic");
    let brokers = mock.bootstrap_servers();
    let pg = PgCluster::start();
    pg.apply_schema();
    let mut env = chaos_env(&pg, &brokers);
    let cfgdir = tempfile::tempdir().unwrap();
    let cfgfile = cfgdir.path().join("relay.toml");
    // The mock broker checks idempotent sequence numbers only for transactional producers. With
    // several requests in flight, a request failing as "possibly persisted" (timeout, transport
    // drop) followed by a later one that succeeds makes librdkafka report the first one's
    // messages delivered (IMPLICITACK: a real broker would have refused the later request with
    // OUT_OF_ORDER_SEQUENCE_NUMBER had the first not been written); the mock writes the later
    // one over the gap and the first is never in its log. One request in flight per connection
    // takes that inference out of play. `debug = "eos"` logs librdkafka's idempotence decisions
    // (IMPLICITACK, DRAIN, RESETSEQ) into the relay log kept for a failure.
    std::fs::write(
        &cfgfile,
        "[kafka.properties]\n\"max.in.flight.requests.per.connection\" = \"1\"\ndebug = \"eos\"\n",
    )
    .unwrap();
    env.push(("RELAY_CONFIG".into(), cfgfile.display().to_string()));
    env.push((
        "RUST_LOG".into(),
        "info,outbox_relay=debug,librdkafka=debug".into(),
    ));
    let mut relay = Relay::start(&env);
    // The mock cluster serves fetches slowly: a smaller load keeps the final read short.
    let writers = Writers::start(pg.url(), 2, seed, 10);

    let (mut kills, mut outages, mut error_bursts) = (0, 0, 0);
    // Logs of every relay process, kept to explain a failure.
    let mut logs = String::new();
    let mut round = 0;
    loop {
        for step in 0..6 {
            thread::sleep(rng.millis(1_000, 4_000));
            match (step + round) % 6 {
                0 => {
                    let errors = [
                        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                        RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT,
                        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                    ];
                    mock.request_errors(RDKafkaApiKey::Produce, &errors);
                    error_bursts += 1;
                }
                1 | 4 => {
                    let id = 1 + rng.below(3) as i32;
                    mock.broker_down(id).unwrap();
                    thread::sleep(rng.millis(5_000, 12_000));
                    mock.broker_up(id).unwrap();
                    outages += 1;
                }
                2 => {
                    for id in 1..=3 {
                        mock.broker_round_trip_time(id, Duration::from_millis(300))
                            .unwrap();
                    }
                    thread::sleep(rng.millis(2_000, 4_000));
                    for id in 1..=3 {
                        mock.broker_round_trip_time(id, Duration::ZERO).unwrap();
                    }
                }
                _ => {
                    relay.kill();
                    logs.push_str(&relay.log());
                    kills += 1;
                    relay = Relay::start(&env);
                }
            }
        }
        round += 1;
        // Two rounds in CI: every fault at least twice.
        match target_rows() {
            Some(target) if writers.committed() < target => continue,
            _ if round >= 2 => break,
            _ => continue,
        }
    }
    let rolled_back = writers.stop();
    if !wait_all_delivered(&pg) {
        logs.push_str(&relay.log());
        panic!(
            "{}",
            undelivered_report(&pg, &brokers, &rolled_back, &logs, "chaos-mock")
        );
    }
    let v = verify(&pg, &brokers, TOPIC, &rolled_back);
    println!(
        "chaos-mock: rows={} kills={kills} outages={outages} error_bursts={error_bursts} lost={} leaked={} reordered={} duplicates={}",
        v.rows, v.lost, v.leaked, v.reordered, v.duplicates
    );
    if v.lost > 0 {
        logs.push_str(&relay.log());
        let path = std::env::temp_dir().join("chaos-mock-relay.log");
        let _ = std::fs::write(&path, &logs);
        eprintln!("relay logs of every process: {}", path.display());
    }
    assert_eq!(v.lost, 0, "{v:?}");
    assert_eq!(v.leaked, 0, "{v:?}");
    assert_eq!(v.reordered, 0, "{v:?}");
    assert_eq!(v.undelivered, 0, "{v:?}");
    assert!(v.rows > 500, "{v:?}");
}

/// `delivery = "exactly_once"`: kill -9 the relay at random moments (inside Kafka transactions,
/// between a commit and its marking, while reading) while rows are written; a `read_committed`
/// consumer sees every committed row exactly once, in per-aggregate order. Runs against a broker
/// with real transaction markers and fencing ([`TxnBroker`]).
#[test]
fn exactly_once_survives_kills() {
    let seed = seed();
    eprintln!("eos chaos seed {seed} (CHAOS_SEED={seed} repeats this schedule)");
    let mut rng = Rng::new(seed);
    let broker = TxnBroker::start();
    let brokers = broker.brokers();
    let pg = PgCluster::start();
    pg.apply_schema();
    let env = eos_chaos_env(&pg, &brokers, "chaos-eos", "50");
    let mut relay = Relay::start(&env);
    let writers = Writers::start(pg.url(), 2, seed, 50);
    let mut kills = 0;
    let mut logs = String::new();
    loop {
        thread::sleep(rng.millis(300, 3_000));
        relay.kill();
        logs.push_str(&relay.log());
        kills += 1;
        relay = Relay::start(&env);
        match target_rows() {
            Some(target) if writers.committed() < target => continue,
            _ if kills >= 8 => break,
            _ => continue,
        }
    }
    let rolled_back = writers.stop();
    if !wait_all_delivered(&pg) {
        logs.push_str(&relay.log());
        panic!(
            "{}",
            undelivered_report(&pg, &brokers, &rolled_back, &logs, "chaos-eos")
        );
    }
    let v = verify(&pg, &brokers, TOPIC, &rolled_back);
    println!(
        "eos: rows={} kills={kills} lost={} duplicates={} reordered={} leaked={}",
        v.rows, v.lost, v.duplicates, v.reordered, v.leaked
    );
    if v.lost + v.duplicates > 0 {
        logs.push_str(&relay.log());
        let path = std::env::temp_dir().join("chaos-eos-relay.log");
        let _ = std::fs::write(&path, &logs);
        eprintln!("relay logs of every process: {}", path.display());
    }
    assert_eq!(v.lost, 0, "{v:?}");
    assert_eq!(v.duplicates, 0, "{v:?}");
    assert_eq!(v.leaked, 0, "{v:?}");
    assert_eq!(v.reordered, 0, "{v:?}");
    assert_eq!(v.undelivered, 0, "{v:?}");
    assert!(v.rows > 500, "{v:?}");
}

/// `delivery = "exactly_once"` through Postgres restarts: the relay reconnects and Postgres
/// sends every unconfirmed transaction again, including rows already in the open Kafka
/// transaction or in committed but unmarked ones; none may reach the consumer twice.
#[test]
fn exactly_once_survives_postgres_restarts() {
    let seed = seed();
    eprintln!("eos pg-restart seed {seed}");
    let mut rng = Rng::new(seed);
    let broker = TxnBroker::start();
    let brokers = broker.brokers();
    let pg = PgCluster::start();
    pg.apply_schema();
    let env = eos_chaos_env(&pg, &brokers, "chaos-eos-pg", "200");
    let relay = Relay::start(&env);
    let writers = Writers::start(pg.url(), 2, seed, 50);
    for mode in ["fast", "immediate", "fast", "immediate"] {
        thread::sleep(rng.millis(1_000, 3_000));
        pg.restart(mode);
    }
    thread::sleep(Duration::from_secs(2));
    let rolled_back = writers.stop();
    if !wait_all_delivered(&pg) {
        panic!(
            "{}",
            undelivered_report(&pg, &brokers, &rolled_back, &relay.log(), "chaos-eos-pg")
        );
    }
    let v = verify(&pg, &brokers, TOPIC, &rolled_back);
    println!(
        "eos-pg: rows={} pg_restarts=4 lost={} duplicates={} reordered={} leaked={}",
        v.rows, v.lost, v.duplicates, v.reordered, v.leaked
    );
    assert_eq!(v.lost, 0, "{v:?}\n{}", relay.log());
    assert_eq!(v.duplicates, 0, "{v:?}\n{}", relay.log());
    assert_eq!(v.leaked, 0, "{v:?}");
    assert_eq!(v.reordered, 0, "{v:?}");
    assert_eq!(v.undelivered, 0, "{v:?}");
    assert!(v.rows > 200, "{v:?}");
}
