//! The figures of a run and how they are shown: the printed table, `BENCHMARKS.md` and a
//! hand-written SVG chart (throughput against the two limits; latency against offered load).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::kafka::librdkafka_version;

/// The source limit: `pg_recvlogical` reading the backlog off a fresh pgoutput slot.
pub struct Source {
    pub rows: u64,
    pub secs: f64,
    pub wal_bytes: u64,
    /// CPU of the whole server (mostly the walsender decoding) while it ran.
    pub pg_cpu: f64,
    pub client_cpu: f64,
}

impl Source {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.secs
    }
}

/// The concurrent limit: `pg_recvlogical` and the plain producer on the same rows at once.
pub struct Concurrent {
    pub rows: u64,
    pub source_secs: f64,
    pub sink_secs: f64,
}

impl Concurrent {
    /// Rows per second of the slower of the two, both running at once.
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.source_secs.max(self.sink_secs)
    }
}

/// The sink limit: a plain producer with the relay's settings.
pub struct SinkLimit {
    pub msgs: u64,
    pub secs: f64,
    pub avg_payload: f64,
    pub tansu_cpu: f64,
}

impl SinkLimit {
    pub fn rate(&self) -> f64 {
        self.msgs as f64 / self.secs
    }
}

/// The relay's marking UPDATEs, from pg_stat_statements.
#[derive(Debug, Clone, Copy)]
pub struct MarkStats {
    pub calls: u64,
    pub rows: u64,
    /// Server time executing them, milliseconds.
    pub total_ms: f64,
    /// `outbox.on_delivered`: `record` (ledger inserts) or `mark` (UPDATEs).
    pub on_delivered: &'static str,
}

impl std::fmt::Display for MarkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.on_delivered {
            "mark" => "marking UPDATEs",
            _ => "ledger inserts",
        };
        if self.calls == 0 {
            return write!(f, "no {what}");
        }
        write!(
            f,
            "{} {what} of {:.0} rows each, {:.2} ms each ({:.1} s in all)",
            thousands(self.calls as f64),
            self.rows as f64 / self.calls as f64,
            self.total_ms / self.calls as f64,
            self.total_ms / 1000.0
        )
    }
}

/// One delivery mode measured on the broker with transactions (noida-db).
pub struct DeliveryRun {
    /// `at_least_once` or `exactly_once`.
    pub mode: &'static str,
    pub drain: Drain,
    /// Single-row transactions at half the steady max.
    pub latency: Latency,
    /// The broker's CPU seconds during the drain.
    pub broker_cpu: f64,
}

impl Results {
    /// Exactly-once's drain rate (after start-up) below at-least-once's, as a fraction
    /// (negative: faster).
    pub fn exactly_once_cost(&self) -> Option<f64> {
        let rate = |m: &str| {
            self.delivery
                .iter()
                .find(|d| d.mode == m)
                .map(|d| d.drain.streaming_rate())
        };
        Some(1.0 - rate("exactly_once")? / rate("at_least_once")?)
    }
}

/// The delivery-mode comparison as table rows.
fn delivery_rows(r: &Results) -> Vec<[String; 6]> {
    r.delivery
        .iter()
        .map(|d| {
            let l = &d.latency;
            [
                format!("`{}`", d.mode),
                format!(
                    "**{}** ({:.2} s start-up)",
                    thousands(d.drain.streaming_rate()),
                    d.drain.startup_secs
                ),
                format!("{:.1}", d.drain.cpu_per_million()),
                format!("{:.1}", d.broker_cpu),
                format!(
                    "{} ({})",
                    thousands(l.offered_rate()),
                    thousands(l.rows as f64)
                ),
                format!(
                    "{} / **{}** / {}",
                    ms(l.to_ack.p50),
                    ms(l.to_ack.p99),
                    ms(l.to_ack.p999)
                ),
            ]
        })
        .collect()
}

const DELIVERY_HEAD: [&str; 6] = [
    "delivery",
    "drain, marking on: rows/s after start-up",
    "relay CPU s per 1M rows",
    "broker CPU s (drain)",
    "offered rows/s (rows)",
    "commit→ack (visible) p50 / p99 / p99.9 ms",
];

/// A plain publisher on a broker other than Kafka: the sink limit for that sink.
pub struct Publisher {
    pub msgs: u64,
    /// From the first publish to the last confirmation.
    pub secs: f64,
    pub avg_payload: f64,
    /// The broker's CPU seconds meanwhile.
    pub broker_cpu: f64,
}

impl Publisher {
    pub fn rate(&self) -> f64 {
        self.msgs as f64 / self.secs
    }
}

/// One sink other than Kafka: its plain publisher and the relay draining a backlog with it.
pub struct OtherSink {
    /// `RELAY_SINK`.
    pub sink: &'static str,
    pub name: &'static str,
    /// The server's name and version.
    pub server: String,
    pub publisher: Publisher,
    /// Marking on; its `broker_cpu` is this sink's broker, its `tansu_cpu` Tansu idling.
    pub drain: Drain,
    /// Messages the stream or queue held after the drain (at least the rows: at-least-once).
    pub stored: u64,
    /// The whole phase: server start, backlog, publisher, drain.
    pub phase_secs: f64,
}

impl OtherSink {
    /// The relay's drain rate (start-up included) against the plain publisher's.
    pub fn ratio(&self) -> f64 {
        self.drain.rate() / self.publisher.rate()
    }
}

const OTHER_SINKS_HEAD: [&str; 5] = [
    "sink",
    "plain publisher msgs/s",
    "relay drain rows/s",
    "ratio",
    "detail",
];

/// The other sinks as table rows.
fn other_sink_rows(r: &Results) -> Vec<[String; 5]> {
    r.other_sinks
        .iter()
        .map(|o| {
            let (p, d) = (&o.publisher, &o.drain);
            let (store, headers) = match o.sink {
                "nats" => (
                    "stream `OUTBOX`",
                    "headers id/type/aggregatetype/aggregateid, `Nats-Msg-Id`",
                ),
                _ => (
                    "queue `bench`",
                    "persistent, mandatory, message_id, headers id/type/aggregatetype/aggregateid",
                ),
            };
            let mut detail = format!(
                "{}; publisher: the same {} messages ({headers}, payload avg {:.0} B) in {:.2} s, \
                 broker CPU {:.1} s; relay: {} rows ({:.0} MB of WAL) in {:.2} s (incl. {:.2} s \
                 start-up; {} rows/s after it); relay CPU {:.1} s = **{:.1} s per 1M rows**; relay \
                 peak RSS {}; Postgres CPU {:.1} s (walsender {}); broker CPU {:.1} s; other \
                 processes {:.1} s",
                o.server,
                thousands(p.msgs as f64),
                p.avg_payload,
                p.secs,
                p.broker_cpu,
                thousands(d.rows as f64),
                d.wal_bytes as f64 / 1e6,
                d.secs,
                d.startup_secs,
                thousands(d.streaming_rate()),
                d.relay_cpu,
                d.cpu_per_million(),
                mb(d.peak_rss_kib),
                d.pg_cpu,
                d.walsender_cpu
                    .map(|c| format!("{c:.1} s"))
                    .unwrap_or_else(|| "?".into()),
                d.broker_cpu,
                d.other_cpu
            );
            if let Some(m) = d.marks
                && m.calls > 0
            {
                detail.push_str(&format!("; {m}"));
            }
            detail.push_str(&format!(
                "; {store} held {} messages afterwards",
                thousands(o.stored as f64)
            ));
            [
                o.name.to_owned(),
                format!("**{}**", thousands(p.rate())),
                format!("**{}**", thousands(d.rate())),
                format!("{:.2}", o.ratio()),
                detail,
            ]
        })
        .collect()
}

/// The peer's commit → broker ack, measured by the peer per message (ack − the row's
/// `created_at`, `clock_timestamp()` of the single-row transaction's INSERT).
pub struct PeerLatency {
    pub n: u64,
    pub p50: f64,
    pub p99: f64,
}

/// pg-transactional-outbox with one of its listeners: a backlog drain, then half that rate.
pub struct Peer {
    /// `replication` or `polling`.
    pub mode: &'static str,
    pub rows: u64,
    /// From its start to the last row's `processed_at`.
    pub secs: f64,
    pub peer_cpu: f64,
    pub peak_rss_kib: u64,
    pub pg_cpu: f64,
    pub tansu_cpu: f64,
    /// The single-row transactions offered after the drain, per second.
    pub load_rate: f64,
    /// None when it published none of the load's rows.
    pub latency: Option<PeerLatency>,
    /// Rows it never processed (no progress for 15 s), backlog and load together.
    pub unprocessed: u64,
}

impl Peer {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.secs
    }

    pub fn pg_cpu_per_million(&self) -> f64 {
        self.pg_cpu * 1e6 / self.rows as f64
    }

    pub fn cpu_per_million(&self) -> f64 {
        self.peer_cpu * 1e6 / self.rows as f64
    }
}

const PEERS_HEAD: [&str; 7] = [
    "",
    "drain rows/s",
    "Postgres CPU s per 1M rows",
    "own CPU s per 1M rows",
    "peak RSS",
    "commit → ack p50 / p99 at 50 % load",
    "detail",
];

/// The relay (marking on) and the peer's listeners, side by side.
fn peer_rows(r: &Results) -> Vec<[String; 7]> {
    let mut rows = Vec::new();
    let d = &r.drain_on;
    let half = r.latency.iter().find(|l| l.pct == 50);
    rows.push([
        "outbox-relay (delivery ledger)".to_owned(),
        format!("**{}**", thousands(d.rate())),
        format!("{:.1}", d.pg_cpu * 1e6 / d.rows as f64),
        format!("{:.1}", d.cpu_per_million()),
        mb(d.peak_rss_kib),
        half.map_or("?".to_owned(), |l| {
            format!("{} / **{}** ms", ms(l.to_ack.p50), ms(l.to_ack.p99))
        }),
        format!(
            "{}-row backlog; latency at {} rows/s (half its steady max)",
            thousands(d.rows as f64),
            half.map_or("?".to_owned(), |l| thousands(l.offered_rate()))
        ),
    ]);
    if let Some(l) = &r.relay_at_peer_load {
        rows.push([
            "outbox-relay at the peer's load".to_owned(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            format!("{} / **{}** ms", ms(l.to_ack.p50), ms(l.to_ack.p99)),
            format!(
                "the rate the peer's replication listener was offered: {} rows/s, {} rows",
                thousands(l.offered_rate()),
                thousands(l.rows as f64)
            ),
        ]);
    }
    if let (Some(p), Some(l)) = (&r.sink_at_peer_load, &r.relay_at_peer_load) {
        rows.push([
            "(the sink alone at that load)".to_owned(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            format!("{} / **{}** ms", ms(p.p50), ms(p.p99)),
            format!(
                "a plain rdkafka producer with the relay's settings (idempotent, acks=all, linger.ms 5) sending at {} msgs/s: send → ack, no Postgres or relay in the path",
                thousands(l.offered_rate())
            ),
        ]);
    }
    for p in &r.peers {
        rows.push([
            format!("pg-transactional-outbox, {} listener", p.mode),
            format!("**{}**", thousands(p.rate())),
            format!("{:.1}", p.pg_cpu_per_million()),
            format!("{:.1}", p.cpu_per_million()),
            mb(p.peak_rss_kib),
            p.latency.as_ref().map_or("none published".to_owned(), |l| {
                format!("{} / **{}** ms", ms(l.p50), ms(l.p99))
            }),
            format!(
                "{}-row backlog in {:.1} s (incl. start-up), Tansu CPU {:.1} s; latency at {} rows/s (half its drain rate), {} acks; **{} row(s) never published**",
                thousands(p.rows as f64),
                p.secs,
                p.tansu_cpu,
                thousands(p.load_rate),
                thousands(p.latency.as_ref().map_or(0, |l| l.n) as f64),
                p.unprocessed
            ),
        ]);
    }
    rows
}

/// The relay draining a backlog from WAL.
pub struct Drain {
    pub rows: u64,
    /// WAL the backlog took (what the walsender decoded).
    pub wal_bytes: u64,
    /// WAL written while the relay drained it (its marking UPDATEs).
    pub wal_written: u64,
    /// From starting the relay to the last row marked (marking on) or on the broker (off).
    pub secs: f64,
    pub startup_secs: f64,
    /// The relay's CPU over its whole life up to the end of the drain.
    pub relay_cpu: f64,
    pub peak_rss_kib: u64,
    pub pg_cpu: f64,
    pub walsender_cpu: Option<f64>,
    pub tansu_cpu: f64,
    /// The CPU of the other-sinks phase's broker (NATS, RabbitMQ) when the relay drains to it.
    pub broker_cpu: f64,
    /// CPU used meanwhile by processes that are not part of the benchmark.
    pub other_cpu: f64,
    pub marks: Option<MarkStats>,
}

impl Drain {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.secs
    }

    /// Rows per second once streaming, start-up (connecting, and for exactly-once
    /// `init_transactions` and reading the progress topic) left out.
    pub fn streaming_rate(&self) -> f64 {
        self.rows as f64 / (self.secs - self.startup_secs).max(1e-3)
    }

    pub fn cpu_per_million(&self) -> f64 {
        self.relay_cpu / self.rows as f64 * 1e6
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles.
    pub fn of(mut v: Vec<f64>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| {
            let rank = (p * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        }
    }
}

/// A Prometheus histogram: cumulative counts per upper bound (seconds), `+Inf` last.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// What was observed between two scrapes of the same histogram.
    pub fn delta(before: &Histogram, after: &Histogram) -> Histogram {
        let buckets = after
            .buckets
            .iter()
            .map(|(le, n)| {
                let was = before
                    .buckets
                    .iter()
                    .find(|(b, _)| b == le)
                    .map_or(0.0, |(_, n)| *n);
                (*le, n - was)
            })
            .collect();
        Histogram { buckets }
    }

    /// Percentiles in milliseconds, interpolated linearly inside the bucket the rank falls in
    /// (the usual `histogram_quantile` estimate); None if nothing was observed.
    pub fn percentiles(&self) -> Option<Percentiles> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let at = |q: f64| {
            let rank = q * total;
            let mut lower = (0.0, 0.0);
            for &(le, n) in &self.buckets {
                if n >= rank {
                    if le.is_infinite() {
                        return lower.0 * 1000.0; // beyond the last bound: report the bound
                    }
                    let inside = (rank - lower.1) / (n - lower.1).max(f64::MIN_POSITIVE);
                    return (lower.0 + (le - lower.0) * inside) * 1000.0;
                }
                lower = (le, n);
            }
            lower.0 * 1000.0
        };
        Some(Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        })
    }
}

/// Reads the relay's Prometheus page on 127.0.0.1:`port`.
pub fn scrape_metrics(port: u16) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to the relay's metrics on port {port}"))?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut page = String::new();
    conn.read_to_string(&mut page)?;
    Ok(page)
}

/// Histogram `name` of a Prometheus page; `labels` selects one series (`stage="relay"`), empty
/// for a histogram without labels.
pub fn parse_histogram(page: &str, name: &str, labels: &str) -> Histogram {
    let prefix = if labels.is_empty() {
        format!("{name}_bucket{{le=\"")
    } else {
        format!("{name}_bucket{{{labels},le=\"")
    };
    let mut buckets: Vec<(f64, f64)> = page
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, value) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Histogram { buckets }
}

/// Cores each process kept busy on average over an interval.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cores {
    pub relay: f64,
    pub postgres: f64,
    pub tansu: f64,
    /// This process: the writer's driver and the latency consumer.
    pub bench: f64,
    /// Everything else on the machine (not part of the benchmark: it disturbs it).
    pub other: f64,
}

impl std::fmt::Display for Cores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "relay {:.2}, Postgres {:.2}, Tansu {:.2}, bench {:.2}, other processes {:.2}",
            self.relay, self.postgres, self.tansu, self.bench, self.other
        )
    }
}

/// The highest rate of single-row transactions sustained end to end with the relay running.
pub struct SteadyMax {
    pub rows: u64,
    /// How long the writer wrote (flat out).
    pub write_secs: f64,
    /// From the writer's start to the last row marked delivered.
    pub e2e_secs: f64,
    pub cores: Cores,
}

impl SteadyMax {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.e2e_secs
    }

    pub fn write_rate(&self) -> f64 {
        self.rows as f64 / self.write_secs
    }
}

/// One offered-load level of the steady-state run.
pub struct Latency {
    pub pct: u32,
    pub target_rate: f64,
    pub rows: u64,
    /// How long the writer took to offer them (longer than planned if Postgres fell behind).
    pub offer_secs: f64,
    /// Commit → broker acknowledgement, from the relay's histogram (bucket-interpolated).
    pub to_ack: Percentiles,
    /// The relay's split of the same path (`outbox_relay_stage_seconds`): `None` when a stage's
    /// histogram did not move.
    pub stages: Option<Stages>,
    pub to_consumer: Percentiles,
    pub to_marked: Percentiles,
    pub cores: Cores,
}

/// Commit → ack by stage (bucket-interpolated, ms): see `outbox_relay::metrics::STAGE_LATENCY`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stages {
    /// Commit → the walsender sent the row (Postgres' clock).
    pub walsender: Percentiles,
    /// The walsender's send → the relay handed the message to librdkafka.
    pub relay: Percentiles,
    /// Hand-over → acknowledgement.
    pub broker: Percentiles,
}

impl Stages {
    /// The stages between two scrapes of the relay's metrics page.
    pub fn between(before: &str, after: &str) -> Option<Stages> {
        let name = outbox_relay::metrics::STAGE_LATENCY;
        let stage = |s: &str| {
            let labels = format!("stage=\"{s}\"");
            Histogram::delta(
                &parse_histogram(before, name, &labels),
                &parse_histogram(after, name, &labels),
            )
            .percentiles()
        };
        Some(Stages {
            walsender: stage("walsender")?,
            relay: stage("relay")?,
            broker: stage("broker")?,
        })
    }

    /// `p50 / p99` of each stage, for the logs and tables.
    pub fn describe(&self, p: impl Fn(&Percentiles) -> f64) -> String {
        format!(
            "{} / {} / {}",
            ms(p(&self.walsender)),
            ms(p(&self.relay)),
            ms(p(&self.broker))
        )
    }
}

impl Latency {
    pub fn offered_rate(&self) -> f64 {
        self.rows as f64 / self.offer_secs
    }
}

/// One huge transaction through the relay.
pub struct Single {
    pub rows: u64,
    /// From the commit to the last row marked delivered.
    pub secs: f64,
    pub peak_rss_kib: u64,
    pub idle_rss_kib: u64,
    pub relay_cpu: f64,
}

impl Single {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.secs
    }
}

/// Rows of one phase the relay confirmed to its slot without marking them delivered.
pub struct Unmarked {
    pub phase: String,
    pub rows: u64,
    /// Up to five of their ids.
    pub ids: Vec<String>,
}

pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres: String,
    pub tansu: String,
    pub librdkafka: String,
    pub commit: String,
    pub date: String,
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Machine {
    pub fn collect(repo: &Path, postgres: String, tansu: String) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<f64>()
                    .ok()
            })
            .map(|kib| kib / 1024.0 / 1024.0)
            .unwrap_or(0.0);
        let repo_s = repo.to_string_lossy();
        let commit = match command_output("git", &["-C", &repo_s, "rev-parse", "--short", "HEAD"]) {
            Some(sha) => {
                let dirty = command_output(
                    "git",
                    &[
                        "-C",
                        &repo_s,
                        "status",
                        "--porcelain",
                        "--",
                        "relay",
                        "Cargo.lock",
                    ],
                )
                .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{sha} + uncommitted changes in relay/ or sql/")
                } else {
                    sha
                }
            }
            None => "unknown (not a git checkout)".into(),
        };
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            memory_gib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            postgres,
            tansu,
            librdkafka: librdkafka_version(),
            commit,
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
        }
    }
}

pub struct Results {
    pub quick: bool,
    /// Relay settings given with --relay-env.
    pub relay_env: Vec<(String, String)>,
    pub rows: u64,
    pub partitions: i32,
    pub mix: String,
    pub write_rate: f64,
    pub source: Source,
    pub sink: SinkLimit,
    pub concurrent: Concurrent,
    pub drain_on: Drain,
    pub drain_off: Drain,
    /// Marking on with `outbox.on_delivered = mark` (an UPDATE per row, the default before
    /// the delivery ledger), on a third backlog.
    pub drain_mark: Drain,
    /// The table-less outbox: events written by `outbox_emit`, drained (nothing to mark).
    pub drain_tableless: Drain,
    /// VACUUM of the outbox after the marking-on drain: the cleanup marking leaves behind.
    pub vacuum_after_marking: f64,
    pub steady_max: SteadyMax,
    pub latency: Vec<Latency>,
    pub latency_secs: f64,
    pub single: Single,
    /// At-least-once against exactly-once on a broker with transactions.
    pub delivery: Vec<DeliveryRun>,
    /// NATS JetStream and RabbitMQ: plain publisher and relay drain.
    pub other_sinks: Vec<OtherSink>,
    /// pg-transactional-outbox's replication and polling listeners.
    pub peers: Vec<Peer>,
    /// `node --version` of the peer's runs.
    pub peers_node: Option<String>,
    /// The relay offered the load the peer's replication listener was measured at.
    pub relay_at_peer_load: Option<Latency>,
    /// A plain producer with the relay's settings at that load: send → ack, ms.
    pub sink_at_peer_load: Option<Percentiles>,
    pub machine: Machine,
    pub unmarked: Vec<Unmarked>,
    /// Cores used on average by processes outside the benchmark during the run.
    pub other_cores: f64,
    pub total_secs: f64,
}

impl Results {
    /// The relay's drain rate (marking on) against the slower of its two limits.
    pub fn e2e_vs_limit(&self) -> f64 {
        self.drain_on.rate() / self.source.rate().min(self.sink.rate())
    }

    /// The relay's drain rate (marking on) against the concurrent limit.
    pub fn e2e_vs_concurrent(&self) -> f64 {
        self.drain_on.rate() / self.concurrent.rate()
    }

    /// Phases during which processes outside the benchmark used noticeable CPU.
    pub fn disturbed(&self) -> Vec<String> {
        const LIMIT: f64 = 0.15;
        let mut out = Vec::new();
        for (name, d) in [
            ("drain with marking on", &self.drain_on),
            ("drain with marking off", &self.drain_off),
            ("drain marking by UPDATE", &self.drain_mark),
            ("drain of table-less messages", &self.drain_tableless),
        ] {
            let cores = d.other_cpu / d.secs;
            if cores > LIMIT {
                out.push(format!("{name} ({cores:.2} cores)"));
            }
        }
        for o in &self.other_sinks {
            let cores = o.drain.other_cpu / o.drain.secs;
            if cores > LIMIT {
                out.push(format!("drain to {} ({cores:.2} cores)", o.sink));
            }
        }
        if self.steady_max.cores.other > LIMIT {
            out.push(format!(
                "steady max ({:.2} cores)",
                self.steady_max.cores.other
            ));
        }
        for l in &self.latency {
            if l.cores.other > LIMIT {
                out.push(format!("{} % load ({:.2} cores)", l.pct, l.cores.other));
            }
        }
        out
    }

    fn mode(&self) -> &'static str {
        if self.quick { "quick" } else { "full" }
    }
}

/// 1234567.8 → "1,234,568".
pub fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "?".into();
    }
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn mb(kib: u64) -> String {
    format!("{:.0} MB", kib as f64 / 1024.0)
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The rows of the main table: (measure, result, detail).
fn main_rows(r: &Results) -> Vec<(String, String, String)> {
    let drain = |d: &Drain| {
        let mut text = format!(
            "{} rows ({:.0} MB of WAL) in {:.2} s (incl. {:.2} s start-up); relay CPU {:.1} s = **{:.1} s per 1M rows**; \
             relay peak RSS **{}**; Postgres CPU {:.1} s (walsender {}); Tansu CPU {:.1} s; \
             other processes {:.1} s",
            thousands(d.rows as f64),
            d.wal_bytes as f64 / 1e6,
            d.secs,
            d.startup_secs,
            d.relay_cpu,
            d.cpu_per_million(),
            mb(d.peak_rss_kib),
            d.pg_cpu,
            d.walsender_cpu
                .map(|c| format!("{c:.1} s"))
                .unwrap_or_else(|| "?".into()),
            d.tansu_cpu,
            d.other_cpu
        );
        if let Some(m) = d.marks
            && m.calls > 0
        {
            text.push_str(&format!(
                "; {m}, writing {:.0} MB of WAL",
                d.wal_written as f64 / 1e6
            ));
        }
        text
    };
    vec![
        (
            "source limit: `pg_recvlogical`, pgoutput, fresh slot".into(),
            format!("**{} rows/s**", thousands(r.source.rate())),
            format!(
                "{} rows, {:.0} MB of WAL in {:.2} s; Postgres CPU {:.1} s, pg_recvlogical CPU {:.1} s",
                thousands(r.source.rows as f64),
                r.source.wal_bytes as f64 / 1e6,
                r.source.secs,
                r.source.pg_cpu,
                r.source.client_cpu
            ),
        ),
        (
            "sink limit: plain rdkafka producer, relay's settings".into(),
            format!("**{} msgs/s**", thousands(r.sink.rate())),
            format!(
                "the same {} messages (key, payload avg {:.0} B, headers id/type/aggregatetype) in {:.2} s; Tansu CPU {:.1} s",
                thousands(r.sink.msgs as f64),
                r.sink.avg_payload,
                r.sink.secs,
                r.sink.tansu_cpu
            ),
        ),
        (
            "concurrent limit: `pg_recvlogical` and the plain producer on the same rows **at the same time**".into(),
            format!("**{} rows/s**", thousands(r.concurrent.rate())),
            format!(
                "{} rows: pg_recvlogical {:.2} s, producer {:.2} s, both on the same cores — the most any relay can do on this machine",
                thousands(r.concurrent.rows as f64),
                r.concurrent.source_secs,
                r.concurrent.sink_secs
            ),
        ),
        (
            "relay drains the backlog from WAL, marking delivered **on**".into(),
            format!("**{} rows/s**", thousands(r.drain_on.rate())),
            format!(
                "{}; VACUUM afterwards {:.1} s",
                drain(&r.drain_on),
                r.vacuum_after_marking
            ),
        ),
        (
            "relay drains the backlog from WAL, marking delivered **off**".into(),
            format!("**{} rows/s**", thousands(r.drain_off.rate())),
            drain(&r.drain_off),
        ),
        (
            "relay drains the backlog from WAL, each row marked by an UPDATE (`outbox.on_delivered = mark`, the default before the delivery ledger)".into(),
            format!("**{} rows/s**", thousands(r.drain_mark.rate())),
            format!(
                "{}; {:.2} × min(source, sink)",
                drain(&r.drain_mark),
                r.drain_mark.rate() / r.source.rate().min(r.sink.rate())
            ),
        ),
        (
            "relay drains **table-less** events (`outbox_emit`, sql/006_emit.sql: the same payloads written into the WAL with `pg_logical_emit_message`, no table, nothing to mark)".into(),
            format!("**{} rows/s**", thousands(r.drain_tableless.rate())),
            format!(
                "{}; {:.2} × min(source, sink)",
                drain(&r.drain_tableless),
                r.drain_tableless.rate() / r.source.rate().min(r.sink.rate())
            ),
        ),
        (
            format!(
                "relay, one transaction of {} rows (marking on)",
                thousands(r.single.rows as f64)
            ),
            format!("peak RSS **{}**", mb(r.single.peak_rss_kib)),
            format!(
                "idle RSS {}; commit → last row marked {:.2} s ({} rows/s); relay CPU {:.1} s",
                mb(r.single.idle_rss_kib),
                r.single.secs,
                thousands(r.single.rate()),
                r.single.relay_cpu
            ),
        ),
        (
            "relay, single-row transactions written flat out by one session beside it (marking on)"
                .into(),
            format!("**{} rows/s**", thousands(r.steady_max.rate())),
            format!(
                "{} rows written in {:.1} s ({} rows/s), last one marked {:.2} s after the start; \
                 cores busy: {}. 25/50/75 % of this are the latency loads below",
                thousands(r.steady_max.rows as f64),
                r.steady_max.write_secs,
                thousands(r.steady_max.write_rate()),
                r.steady_max.e2e_secs,
                r.steady_max.cores
            ),
        ),
    ]
}

fn latency_rows(r: &Results) -> Vec<[String; 9]> {
    r.latency
        .iter()
        .map(|l| {
            [
                format!("{} %", l.pct),
                thousands(l.target_rate),
                thousands(l.offered_rate()),
                thousands(l.rows as f64),
                format!(
                    "{} / {} / {}",
                    ms(l.to_ack.p50),
                    ms(l.to_ack.p99),
                    ms(l.to_ack.p999)
                ),
                l.stages
                    .map_or_else(|| "–".to_owned(), |st| st.describe(|p| p.p99)),
                format!(
                    "{} / {} / {}",
                    ms(l.to_consumer.p50),
                    ms(l.to_consumer.p99),
                    ms(l.to_consumer.p999)
                ),
                format!(
                    "{} / {} / {}",
                    ms(l.to_marked.p50),
                    ms(l.to_marked.p99),
                    ms(l.to_marked.p999)
                ),
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
                    l.cores.relay, l.cores.postgres, l.cores.tansu, l.cores.bench, l.cores.other
                ),
            ]
        })
        .collect()
}

const LATENCY_HEAD: [&str; 9] = [
    "offered load (of the steady max)",
    "target rows/s",
    "offered rows/s",
    "rows",
    "commit→broker ack p50 / p99 / p99.9 ms",
    "p99 by stage: walsender / relay / broker ms",
    "commit→consumer p50 / p99 / p99.9 ms",
    "commit→delivered_at p50 / p99 / p99.9 ms",
    "cores busy: relay / Postgres / Tansu / bench / other processes",
];

/// The table on stdout.
pub fn print_table(r: &Results) {
    println!();
    println!(
        "outbox-relay benchmark ({}: {}-row backlog, {} partitions, {} CPUs)",
        r.mode(),
        thousands(r.rows as f64),
        r.partitions,
        r.machine.cpus
    );
    let rows = main_rows(r);
    let w0 = rows.iter().map(|x| x.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|x| x.1.len()).max().unwrap_or(0);
    for (m, v, d) in &rows {
        let strip = |s: &str| s.replace("**", "").replace('`', "");
        println!(
            "  {:<w0$}  {:>w1$}  {}",
            strip(m),
            strip(v),
            strip(d),
            w0 = w0,
            w1 = w1
        );
    }
    println!(
        "  steady state (single-row transactions, marking on, {} s per level):",
        r.latency_secs
    );
    println!(
        "  {:>6} {:>9} {:>9} {:>8}  {:>22}  {:>22}  {:>22}  {:>22}  cores: relay/pg/tansu/bench/other",
        "load",
        "target/s",
        "offered/s",
        "rows",
        "commit→broker ack ms",
        "ack p99 by stage ms",
        "commit→consumer ms",
        "commit→delivered_at ms",
    );
    println!(
        "  {:>6} {:>9} {:>9} {:>8}  {:>22}  {:>22}  {:>22}  {:>22}",
        "",
        "",
        "",
        "",
        "p50 / p99 / p99.9",
        "walsender/relay/broker",
        "p50 / p99 / p99.9",
        "p50 / p99 / p99.9"
    );
    for l in latency_rows(r) {
        println!(
            "  {:>6} {:>9} {:>9} {:>8}  {:>22}  {:>22}  {:>22}  {:>22}  {}",
            l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], l[8]
        );
    }
    if !r.delivery.is_empty() {
        println!("  delivery modes (noida-db, a broker with transactions; marking on):");
        for d in delivery_rows(r) {
            let strip = |s: &str| s.replace("**", "").replace('`', "");
            println!(
                "  {:>14}  drain {:>8} rows/s  relay {:>5} CPU s/1M  broker {:>5} CPU s  at {:>14}: commit→ack p50/p99/p99.9 {} ms",
                strip(&d[0]),
                strip(&d[1]),
                d[2],
                d[3],
                d[4],
                strip(&d[5])
            );
        }
        if let Some(cost) = r.exactly_once_cost() {
            println!("  exactly-once throughput cost: {:.1} %", cost * 100.0);
        }
    }
    if let Some(first) = r.other_sinks.first() {
        println!(
            "  other sinks ({}-row backlogs, marking on; each broker running alone):",
            thousands(first.drain.rows as f64)
        );
        for o in &r.other_sinks {
            println!(
                "  {:>14}  plain publisher {:>8} msgs/s  relay drain {:>8} rows/s  ratio {:.2}  relay {:.1} CPU s/1M  broker CPU {:.1} s ({}; phase {:.0} s)",
                o.name,
                thousands(o.publisher.rate()),
                thousands(o.drain.rate()),
                o.ratio(),
                o.drain.cpu_per_million(),
                o.drain.broker_cpu,
                o.server,
                o.phase_secs
            );
        }
    }
    if !r.peers.is_empty() {
        println!("  the peer (pg-transactional-outbox 0.5.7 + kafkajs 2.2.4), beside the relay:");
        for p in peer_rows(r) {
            let strip = |s: &str| s.replace("**", "").replace('`', "");
            println!(
                "  {:>45}  drain {:>8} rows/s  Postgres {:>6} CPU s/1M  own {:>6} CPU s/1M  RSS {:>7}  commit→ack p50/p99 {}",
                p[0],
                strip(&p[1]),
                p[2],
                p[3],
                p[4],
                strip(&p[5])
            );
        }
    }
    let disturbed = r.disturbed();
    if !disturbed.is_empty() {
        println!(
            "  DISTURBED: other processes on this machine used CPU during: {}",
            disturbed.join(", ")
        );
    }
    for u in &r.unmarked {
        println!(
            "  ANOMALY {}: {} row(s) confirmed to the slot but never marked delivered, e.g. {}",
            u.phase,
            u.rows,
            u.ids.join(", ")
        );
    }
    println!(
        "  relay (marking on) {} rows/s ÷ min(source {}, sink {}) = {:.2}",
        thousands(r.drain_on.rate()),
        thousands(r.source.rate()),
        thousands(r.sink.rate()),
        r.e2e_vs_limit()
    );
}

/// Writes `BENCHMARKS.md` and `bench/chart.svg` (which it embeds) under `out`.
pub fn write_files(out: &Path, r: &Results) -> Result<()> {
    let svg = chart_svg(r);
    let chart = out.join("bench/chart.svg");
    if let Some(dir) = chart.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&chart, svg).with_context(|| format!("writing {}", chart.display()))?;
    let md = markdown(r);
    let path = out.join("BENCHMARKS.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The issue's goals against this run, and what bounds the ones not reached.
fn goals(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n## Goals\n");
    let _ = writeln!(s, "| goal | this run | |\n|---|---|---|");
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let e2e = r.e2e_vs_limit();
    let both = r.e2e_vs_concurrent();
    let _ = writeln!(
        s,
        "| drain with marking on ≥ 0.9 × the concurrent limit (source and sink at once) | {both:.3} | {} |",
        verdict(both >= 0.9)
    );
    let _ = writeln!(
        s,
        "| drain with marking on against min(source, sink), each measured alone | {e2e:.2} | |"
    );
    let tableless = r.drain_tableless.rate() / r.source.rate().min(r.sink.rate());
    let _ = writeln!(
        s,
        "| table-less outbox (`outbox_emit`) drain ≥ 0.9 × min(source, sink) | {tableless:.3} | {} |",
        verdict(tableless >= 0.9)
    );
    let by_update = r.drain_mark.rate() / r.source.rate().min(r.sink.rate());
    let _ = writeln!(
        s,
        "| (for comparison: the same drain marking each row by an UPDATE, `outbox.on_delivered = mark`) | {by_update:.2} | |"
    );
    let half = r.latency.iter().find(|l| l.pct == 50);
    if let Some(l) = half {
        let _ = writeln!(
            s,
            "| p99 commit → broker ack ≤ 25 ms at 50 % of the max rate | {} ms | {} |",
            ms(l.to_ack.p99),
            verdict(l.to_ack.p99 <= 25.0)
        );
    }
    if let Some(cost) = r.exactly_once_cost() {
        let _ = writeln!(
            s,
            "| exactly-once costs ≤ 10 % of at-least-once's throughput (issue 6) | {:.1} % | {} |",
            cost * 100.0,
            verdict(cost <= 0.10)
        );
    }
    if let Some(p) = r.peers.iter().find(|p| p.mode == "replication") {
        let times = r.drain_on.rate() / p.rate();
        // At the same load: the relay offered the rate the peer was measured at.
        let relay_p99 = r.relay_at_peer_load.as_ref().map(|l| l.to_ack.p99);
        let peer_p99 = p.latency.as_ref().map_or(f64::INFINITY, |l| l.p99);
        let lower = relay_p99.is_some_and(|v| v < peer_p99);
        let _ = writeln!(
            s,
            "| relay ≥ 5 × pg-transactional-outbox's replication-mode drain, at lower p99 (both at the load the peer was measured at, {} rows/s) | {times:.1} ×; p99 {} vs {} ms | {} |",
            thousands(p.load_rate),
            relay_p99.map_or("?".to_owned(), ms),
            p.latency
                .as_ref()
                .map_or("(none published)".to_owned(), |l| ms(l.p99)),
            verdict(times >= 5.0 && lower)
        );
    }
    let rss = r.drain_on.peak_rss_kib.max(r.single.peak_rss_kib);
    let _ = writeln!(
        s,
        "| peak RSS ≤ 64 MB (1M-row backlog, 1M-row transaction) | {} / {} | {} |",
        mb(r.drain_on.peak_rss_kib),
        mb(r.single.peak_rss_kib),
        verdict(rss <= 64 * 1024)
    );
    let d = &r.drain_on;
    let busy = (d.relay_cpu + d.pg_cpu + d.tansu_cpu) / (d.secs * r.machine.cpus.max(1) as f64);
    let per_row = |m: &MarkStats| m.total_ms * 1000.0 / m.rows.max(1) as f64;
    let _ = writeln!(
        s,
        "\n**What bounds the drain with marking on.** The same {} cores run Postgres, the \
         walsender, the relay and Tansu: in this run Postgres used {:.1} CPU s during the {:.2} s \
         drain (the walsender {}), the relay {:.1} s and Tansu {:.1} s, so the machine was {:.0} % \
         busy. {} Marking is no longer what costs most: deliveries are recorded in the delivery \
         ledger (`outbox.on_delivered = record`, the default; sql/005_delivery_ledger.sql), one \
         insert per batch of the rows' `seq` values as an `int8multirange`, and the outbox row is \
         never updated. `bench/marking-cost.sh` measures the marking statements apart from the \
         relay (200,000 rows of this workload's shape, batches of 1,000, no relay or walsender \
         running): the ledger insert 0.8–1.6 µs and ~0 bytes of WAL per row, the UPDATE of the \
         shipped schema 8.6–20 µs and ~886 bytes (with `wal_level=logical` an UPDATE logs the whole \
         new row, and no update is HOT because the partial index names `delivered_at`), a DELETE \
         3.3–4.7 µs and 88 bytes (ranges: quiet and loaded runs of the script). The same drain \
         marking by UPDATE ran at {} rows/s{}; with marking off, {} rows/s.",
        r.machine.cpus,
        d.pg_cpu,
        d.secs,
        d.walsender_cpu
            .map_or("not measured".to_owned(), |w| format!("{w:.1} s of it")),
        d.relay_cpu,
        d.tansu_cpu,
        busy * 100.0,
        d.marks.as_ref().map_or(String::new(), |m| format!(
            "The relay's {} ledger inserts took {:.2} s of Postgres time ({:.2} µs per row).",
            m.calls,
            m.total_ms / 1000.0,
            per_row(m)
        )),
        thousands(r.drain_mark.rate()),
        r.drain_mark
            .marks
            .as_ref()
            .map_or(String::new(), |m| format!(
                ", its {} marking UPDATEs taking {:.1} s ({:.1} µs per row)",
                m.calls,
                m.total_ms / 1000.0,
                per_row(m)
            )),
        thousands(r.drain_off.rate()),
    );
    if let Some(l) = half {
        let c = &l.cores;
        let _ = writeln!(
            s,
            "\n**What bounds the latency at 50 % load.** The commit → ack median is {} ms, {} ms of \
             it librdkafka's `linger.ms` batching; during that level Postgres used {:.2} cores, \
             Tansu {:.2} and the relay {:.2}, {:.2} of the machine's {} cores.",
            ms(l.to_ack.p50),
            outbox_relay::config::KafkaConfig::default().linger_ms,
            c.postgres,
            c.tansu,
            c.relay,
            c.postgres + c.tansu + c.relay + c.bench,
            r.machine.cpus
        );
        if let Some(st) = &l.stages {
            let _ = writeln!(
                s,
                "The relay splits the same path by stage (`outbox_relay_stage_seconds`): p50 / p99 \
                 from the commit to the walsender sending the row {} / {} ms (Postgres: WAL \
                 flush, wake-up, decoding), from that send to the relay handing the message to \
                 librdkafka {} / {} ms (the relay: socket read, decode, routing; while messages \
                 come densely, its reads wait up to 1 ms to take many at once), from the hand-over \
                 to Tansu's acknowledgement {} / {} ms (librdkafka's `linger.ms` and Tansu). The \
                 broker stage bounds the tail.",
                ms(st.walsender.p50),
                ms(st.walsender.p99),
                ms(st.relay.p50),
                ms(st.relay.p99),
                ms(st.broker.p50),
                ms(st.broker.p99)
            );
        }
        if let (Some(at), Some(sink)) = (&r.relay_at_peer_load, &r.sink_at_peer_load) {
            let c = &at.cores;
            let split = at.stages.map_or(String::new(), |st| {
                format!(
                    " (by stage: walsender {} ms, relay {} ms, broker {} ms)",
                    ms(st.walsender.p99),
                    ms(st.relay.p99),
                    ms(st.broker.p99)
                )
            });
            let _ = writeln!(
                s,
                "At {} rows/s (the peer's load; {:.2} cores busy in all) the relay's commit → ack \
                 p99 was {} ms{split}; a plain producer with the relay's settings sending the same \
                 rate to the same Tansu, a consumer tailing its topic as one tails the relay's, got \
                 its acks with a p99 of {} ms. At so low a rate most of the relay's commit → ack \
                 is librdkafka's `linger.ms` (`kafka.linger_ms`, 5 ms by default), which the \
                 peer's kafkajs producer does not wait: in quick runs of this bench \
                 `kafka.linger_ms = 1` gave the relay a p99 of 5.5 ms at the peer's load (the \
                 peer's 10.0 ms in that run) but 17.3 ms at 50 % load (13.7 ms with 5), so the \
                 default stays 5.",
                thousands(at.offered_rate()),
                c.postgres + c.tansu + c.relay + c.bench + c.other,
                ms(at.to_ack.p99),
                ms(sink.p99)
            );
        }
    }
    let _ = writeln!(
        s,
        "\n**The relay's own CPU** (perf, 3 s of a 400,000-row drain with marking on, relay \
         threads only, before the two changes below): no function above 8 % of its samples. \
         Copying (`memmove`, 7 %: socket reads, librdkafka copying each payload and building \
         produce requests), thread wake-ups and switches in the kernel (~10 %: the replication \
         task, the stream loop and librdkafka's broker and delivery threads hand work to each \
         other), the allocator (`malloc` and `free`, ~12 %), clock reads (`clock_gettime`, 5 %), \
         librdkafka's partition queues (~2 %), decoding and routing (~1 % each). Changed after it: \
         the stream loop applies a socket read's batch of WAL messages in one go instead of one \
         message per round of its `select!` (each round polled the shutdown, interrupt and \
         completion arms and read the clock), and a message's headers are moved into librdkafka's \
         record instead of copied for every send: 7.8 relay CPU s per 1M rows in the first full run \
         with them, 10.2 in the one before. Tried and not kept: mimalloc as the allocator (quick runs: 8.8 \
         against 8.0 s per 1M rows with marking on, peak RSS 59–67 MB against 45–52), \
         `kafka.linger_ms = 1` (above), two marking UPDATEs at once (`pipeline.mark_connections = \
         2`: it split the batches, 261 instead of 990 rows per UPDATE in a quick run, and cost \
         more relay CPU per row for no gain here, so the default stays 1)."
    );
    s
}

fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(s, "# outbox-relay benchmarks\n");
    if r.quick {
        let _ = writeln!(
            s,
            "> **QUICK run** (`scripts/bench --quick`): {}-row backlog, {} s per latency level. \
             The figures show the shape only; `scripts/bench` (full: 1M rows) gives the real ones.\n",
            thousands(r.rows as f64),
            r.latency_secs
        );
    }
    let _ = writeln!(
        s,
        "Measured {} with `scripts/bench{}` ({} mode, {:.0} s in all), relay at commit {}.\n",
        m.date,
        if r.quick { " --quick" } else { "" },
        r.mode(),
        r.total_secs,
        m.commit
    );
    if !r.relay_env.is_empty() {
        let settings: Vec<String> = r
            .relay_env
            .iter()
            .map(|(k, v)| format!("`{k}={v}`"))
            .collect();
        let _ = writeln!(
            s,
            "Relay settings changed for this run: {}.\n",
            settings.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "**e2e_vs_limit = {:.2}**: the relay's drain rate with marking on ({} rows/s) divided by the \
         slower of its two limits (source {} rows/s, sink {} msgs/s).\n",
        r.e2e_vs_limit(),
        thousands(r.drain_on.rate()),
        thousands(r.source.rate()),
        thousands(r.sink.rate())
    );
    let _ = writeln!(
        s,
        "![Throughput against the source and sink limits; latency against offered load](bench/chart.svg)\n"
    );
    let disturbed = r.disturbed();
    if !disturbed.is_empty() {
        let _ = writeln!(
            s,
            "**Disturbed run:** processes outside the benchmark used CPU during {} \
             ({:.2} cores on average over the whole run); those figures are low.\n",
            disturbed.join(", "),
            r.other_cores
        );
    }
    if !r.unmarked.is_empty() {
        let _ = writeln!(
            s,
            "**Anomaly: rows published and confirmed to the slot but never marked delivered** \
             (`delivered_at` still NULL after the relay's slot had passed their commit; the broker has \
             them). A commit is in the WAL, and decodable, a moment before other sessions can see it; \
             a marking UPDATE that runs in that moment matches nothing, and the relay confirms the \
             transaction all the same:\n"
        );
        for u in &r.unmarked {
            let _ = writeln!(
                s,
                "- {}: {} row(s), e.g. {}",
                u.phase,
                u.rows,
                u.ids
                    .iter()
                    .map(|i| format!("`{i}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Throughput and memory\n");
    let _ = writeln!(s, "| measure | result | detail |\n|---|---|---|");
    for (a, b, c) in main_rows(r) {
        let _ = writeln!(s, "| {a} | {b} | {c} |");
    }
    let _ = writeln!(
        s,
        "\n## Steady-state latency\n\nSingle-row transactions offered at a fixed rate for {} s per level, relay running \
         with marking on; the loads are 25/50/75 % of the steady max above ({} rows/s).\n",
        r.latency_secs,
        thousands(r.steady_max.rate())
    );
    let _ = writeln!(s, "| {} |", LATENCY_HEAD.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(LATENCY_HEAD.len()));
    for l in latency_rows(r) {
        let _ = writeln!(s, "| {} |", l.join(" | "));
    }
    let _ = writeln!(
        s,
        "\ncommit → broker ack is the relay's own measurement and the one the goal is about. The \
         consumer is there to prove independently that every row reached the broker; its latency \
         is mostly Tansu's fetch path: Tansu answers a fetch when `fetch.wait.max.ms` (100 ms \
         here) runs out rather than when data arrive. With a 5 ms wait, as in earlier runs, the \
         consumer's fetch loop kept Tansu at 0.6–0.9 of a core on this 2-core machine, \
         which then slowed Postgres and the relay: commit → ack p99 at 50 % load was 20–61 ms \
         with it and 14 ms without it (quick runs).\n\n\
         Each level, and each run at a fixed load below, writes to a topic of its own (aggregate \
         type `latency-<level>`), read by a consumer started for it. Tansu 0.6.0's memory \
         storage lists every stored batch of a partition on each fetch, under the lock its \
         produce path needs, so a consumer tailing one topic shared by all levels (by the 50 % \
         level it held the saturation run's and the 25 % level's hundreds of thousands of \
         single-row batches) held up the relay's produce requests: in the two full runs before \
         this change the broker stage's p99 at 50 % load was 37–39 ms, against 6 ms for the \
         same relay outside the bench. Apart from the relay (`bench/tansu-fetch-tail.py`: idempotent, \
         linger.ms 5, 225 msgs/s to a topic holding 100,000 messages sent one at a time): \
         p99 send → ack 6.4 ms with no consumer, 78 ms with a consumer tailing it; 11.8 ms \
         with a consumer tailing a fresh topic. That is the broker under test, not the relay; \
         Kafka finds a fetch's offset through its index."
    );
    if !r.delivery.is_empty() {
        let _ = writeln!(
            s,
            "\n## Delivery modes: at-least-once and exactly-once\n\n\
             Each mode on a fresh broker with transactions (noida-db 0.2.3, a Kafka-protocol broker: \
             Tansu 0.6.0 has no EndTxn), same Postgres: a backlog of {} rows (same mix) drained with \
             marking on, then single-row transactions at half the steady max above. With \
             `exactly_once` a message counts as acknowledged when its Kafka transaction commits \
             (that is when a `read_committed` consumer can see it); transactions commit every \
             `exactly_once.batch_max_ms` = 100 ms or 5,000 messages, so its latency is mostly that \
             wait: a smaller `batch_max_ms` trades throughput for latency. Rates leave the start-up \
             out (for exactly-once it includes `init_transactions` and reading the progress topic). \
             The broker is not Tansu: compare these rows with each other, not with the tables \
             above.\n",
            r.delivery
                .first()
                .map(|d| thousands(d.drain.rows as f64))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "| {} |", DELIVERY_HEAD.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(DELIVERY_HEAD.len()));
        for d in delivery_rows(r) {
            let _ = writeln!(s, "| {} |", d.join(" | "));
        }
        if let Some(cost) = r.exactly_once_cost() {
            let _ = writeln!(
                s,
                "\nExactly-once throughput cost: **{:.1} %** of at-least-once's drain rate.",
                cost * 100.0
            );
        }
    }
    if let Some(first) = r.other_sinks.first() {
        let _ = writeln!(
            s,
            "\n## Other sinks\n\n\
             The relay with `sink = nats` and `sink = rabbitmq`, each against a private server the \
             bench starts for that phase alone (after the phases above; the server is stopped \
             after it), same machine, same Postgres. Each phase writes a fresh backlog of {} rows \
             (the same mix; smaller than the {}-row Kafka backlogs{}), read by the relay from WAL. \
             **Plain publisher**: the same rows, read back from the table, sent with the relay's \
             client crate, settings and guarantees, pipelined as the relay does (up to \
             `pipeline.max_in_flight` = {} unconfirmed); timed from the first publish to the \
             last confirmation. **Relay drain**: `RELAY_SINK=nats` or `rabbitmq`, marking on, \
             timed from process start to the last row's `delivered_at`, as the Kafka drain above. \
             Ratio = relay drain ÷ plain publisher.\n\n\
             - **NATS JetStream** (`nats-server -js`, file storage in the work directory): \
             async-nats 0.52 connected and configured by the relay's own \
             `outbox_relay::sink::nats::connect` and `context` (which also bound the PubAcks \
             pending); streams made by its `stream_config` (file storage, 1 replica, 2-minute \
             duplicate window): `BENCH_SINK` on `bench.sink` for the publisher (deleted after it), \
             `OUTBOX` on `outbox.>` created by the relay. Every message carries the relay's headers \
             and `Nats-Msg-Id` = the outbox id and counts when its PubAck arrives.\n\
             - **RabbitMQ** (a node of its own: own epmd and Erlang cookie, ports on 127.0.0.1, \
             data in the work directory): lapin 4 on one confirm-mode channel opened by the \
             relay's own `outbox_relay::sink::rabbitmq::open_channel` (durable topic exchange \
             `outbox`); every message persistent, `mandatory`, routing key `bench.OrderPlaced`, \
             `message_id` = the outbox id, the relay's headers, counted on the broker's ack. A \
             durable classic queue `bench` bound with `#` receives them (purged between the \
             publisher and the drain).\n\n\
             Broker CPU is the server's (all its processes for RabbitMQ) over each measurement; \
             like everything else it shares the same {} CPUs.\n",
            thousands(first.drain.rows as f64),
            thousands(r.rows as f64),
            if r.quick {
                "; a full run uses 200,000"
            } else {
                "; a quick run uses 20,000"
            },
            thousands(outbox_relay::config::PipelineConfig::default().max_in_flight as f64),
            r.machine.cpus
        );
        let _ = writeln!(s, "| {} |", OTHER_SINKS_HEAD.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(OTHER_SINKS_HEAD.len()));
        for o in other_sink_rows(r) {
            let _ = writeln!(s, "| {} |", o.join(" | "));
        }
    }
    if !r.peers.is_empty() {
        let _ = writeln!(
            s,
            "\n## A peer in the same run\n\n\
             [pg-transactional-outbox](https://www.npmjs.com/package/pg-transactional-outbox) \
             0.5.7 (Node.js {}) with a kafkajs 2.2.4 producer (`acks: -1`, `maxInFlightRequests: 1`; \
             not idempotent: kafkajs asks for a producer id with InitProducerId v1, which Tansu \
             0.6.0 answers with UNKNOWN_SERVER_ERROR, so the peer does less per message than the \
             relay's idempotent producer) publishing each message to the same Tansu, as \
             `bench/peer/peer.cjs` sets it up: its own table, publication and slot created by the \
             library's `DatabaseSetup` SQL, the replication listener with its mutex concurrency \
             controller (one message at a time, in WAL order, as its README's example; its \
             segment mutex controller, one at a time per aggregate, started all 10,000 messages \
             of a 10,000-row transaction at once in a first full run, hit its 15 s processing \
             timeout and stalled with 5,385 rows unprocessed), then the polling listener (its defaults: 5 rows per poll, 500 ms interval) on \
             a backlog of its own; max-attempts and poison protection on (the library's \
             defaults). Rows have this run's payloads and 10,000 aggregates, in the same \
             transaction mix at a fifth of the round size (one 2,000-row transaction, 16 of 100 \
             rows and 400 single-row ones per 4,000 rows). Each ran alone, after every relay \
             phase. Its drain ends at the last row's `processed_at` (what the library marks once \
             the handler returned, i.e. once the broker acked); its latency is the peer's own \
             measure, ack time − the row's `created_at`, over single-row transactions offered at \
             half its drain rate for {} s. The relay's row is this run's drain with marking on \
             and its 50 % load level (commit → ack from its histogram). Rows the peer never \
             published are counted after 15 s without progress: its replication listener drops \
             a row it decodes before the inserting transaction is visible to its own \
             `UPDATE … WHERE id IN (SELECT … FOR UPDATE NOWAIT)` (warning \
             \"Could not increment the started attempts field … MESSAGE_NOT_FOUND\") and does \
             not come back to it; the relay waits for such a row to become visible \
             (`world::a_row_confirmed_before_it_is_visible_is_marked_once_it_is`).\n",
            r.peers_node.as_deref().unwrap_or("?"),
            r.latency_secs
        );
        let _ = writeln!(s, "| {} |", PEERS_HEAD.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(PEERS_HEAD.len()));
        for p in peer_rows(r) {
            let _ = writeln!(s, "| {} |", p.join(" | "));
        }
    }
    s.push_str(&goals(r));
    let _ = writeln!(
        s,
        r#"
## What was measured

Everything ran on one machine in one run of `outbox-bench`, against one private Postgres cluster and
one Tansu broker that it started itself and stopped at the end (and, for the other sinks, a NATS
server and a RabbitMQ node, each running for its own phase only).

- **Workload.** {mix}. `aggregatetype` is `bench` for the backlogs, so every backlog row goes to
  `outbox.event.bench`; all topics have {parts} partitions (created before the run, replication 1).
  Backlogs were written at {write} rows/s.
- **Source limit.** A pgoutput slot (`pg_create_logical_replication_slot('bench_src', 'pgoutput')`)
  is created before backlog 1 is written; then `pg_recvlogical --start -o proto_version=1
  -o publication_names=outbox_pub --endpos=<WAL position after the backlog> -f /dev/null` is
  timed from start to exit: the walsender decoding the backlog and sending every change to a
  client that throws it away. (pg_recvlogical's own CPU, in the table, comes out of the same cores.)
- **Sink limit.** The same rows (read back from the table: id, aggregateid, type, payload as text) are
  sent by a plain rdkafka `ThreadedProducer` built with the relay's own
  `outbox_relay::sink::kafka::producer_config` (acks=all, idempotence, linger.ms 5,
  batch.size 1000000) to the fresh topic `bench.sink` with the same partition count, key and headers
  (`id`, `type`, `aggregatetype`); timed from the first send to the last delivery report.
- **Relay drain.** The relay (`target/release/outbox-relay`, configured by `RELAY_*` variables only)
  is started once on the empty table (it creates its slot) and stopped with SIGTERM; then the
  backlog is written, so the relay reads it from WAL, not from its first-start snapshot. The relay is
  started again and timed from process start (start-up included) to the last row's `delivered_at`
  (marking on), or, with `RELAY_PIPELINE__MARK_DELIVERED=false`, to the moment the slot's
  `confirmed_flush_lsn` reached the WAL position after the backlog (polled every 20 ms; the relay
  reports within 100 ms of an acknowledgement). Marking off drains backlog 2, written the same way
  after backlog 1 was drained; before it, the stopped relay's slot is moved past the marking
  UPDATEs of backlog 1 (`pg_replication_slot_advance`), so both drains decode only their backlog.
  CPU seconds are the relay process's utime+stime (`/proc/<pid>/stat`, whole life including
  start-up), peak RSS is its `VmHWM`; the Postgres (all server processes) and Tansu CPU figures are
  what those servers used over the same interval: on a {cpus}-CPU machine they compete with the relay
  for the same cores.
- **Steady max.** With the relay running (marking on), one session commits single-row
  transactions as fast as it can (a PL/pgSQL loop, `COMMIT` after each row) for {lsecs} s; the
  rate is rows ÷ (writer start → last row's `delivered_at`). This, not the backlog drain rate, is
  the base of the offered loads: the drain rate is reached with 90 % of the rows in 100- and
  10,000-row transactions and with nothing else running, while single-row transactions written on
  the same {cpus} cores cost Postgres far more per row (a commit each, written and decoded): here
  the steady max is {smax} rows/s, so 25 % of the drain rate ({quarter} rows/s) would already
  be more than the machine sustains and every level would measure a growing queue.
- **Latency.** With the relay running (marking on), the same procedure commits single-row
  transactions at a fixed rate (open loop: each row is written when due, however late the ones
  before it were) of 25, 50 and 75 % of the steady max for {lsecs} s each. Three clocks on each
  row, all from its commit: **commit → broker ack** is the relay's own
  `outbox_relay_commit_to_ack_seconds` histogram (the commit time pgoutput sends with the
  transaction, to the moment librdkafka reported the broker's acknowledgement), scraped from the
  relay's `/metrics` before and after the level; percentiles are interpolated inside its buckets
  (1 ms wide up to 10 ms, then 12, 15, 20, 25, 30, 40, 50, 75, 100 ms…), as Prometheus'
  `histogram_quantile` does. **commit → consumer** is the moment an rdkafka consumer in the bench
  process (assigned to every partition, `fetch.wait.max.ms=100`) got the message, minus the row's
  commit time (`pg_xact_commit_timestamp` of the inserting transaction,
  `track_commit_timestamp=on`; the transaction id travels in the row's `headers` as `bench_xid`,
  since the relay's UPDATE gives the row a new xmin): it adds the broker's fetch path.
  **commit → `delivered_at`** is the time until the relay marked the row (`now()` of the marking
  transaction, after the acknowledgement). "offered rows/s" is what the writer achieved; "cores
  busy" is the CPU each process used from the start of the level until its last row was marked,
  in cores.
- **One huge transaction.** {single} rows in one `INSERT … SELECT` transaction while the relay runs
  (a fresh relay process, so its `VmHWM` is this transaction's); pgoutput protocol 1 sends it after
  the commit. Peak RSS is the relay's `VmHWM` after the last row was marked.
- **Postgres settings**: `wal_level=logical`, `track_commit_timestamp=on`, `fsync=off`,
  `full_page_writes=off` (writing the backlog faster; no effect on decoding), `shared_buffers=512MB`,
  `autovacuum=off` with `VACUUM (ANALYZE) outbox` run by the bench between phases (an autovacuum
  worker cleaning a freshly written million-row table takes one of the {cpus} cores away from
  whatever is being measured, at a moment nobody controls), `checkpoint_timeout=1h`,
  `pg_stat_statements` loaded (it gives the count and time of the relay's marking UPDATEs),
  `synchronous_commit` left on (with it off the walsender waits for the WAL writer, adding up to
  `wal_writer_delay` = 200 ms to every latency). **Broker**: Tansu with in-memory storage.
  Processes: Postgres, Tansu, the relay and the bench itself all share the same {cpus} CPUs.

## Machine

| | |
|---|---|
| CPU | {cpu} × {cpus} |
| memory | {mem:.1} GiB |
| kernel | Linux {kernel} |
| PostgreSQL | {pg} |
| broker | {tansu} (memory storage) |
| librdkafka | {rdk} (bundled by rdkafka-sys, also in the relay) |
| relay | commit {commit} |
| other processes during the run | {other:.2} cores on average |
| date | {date} |

## Reproduce

```sh
scripts/bench            # full run: 1M-row backlogs, 1M-row transaction, 30 s per latency level
scripts/bench --quick    # the same, small (100k rows, 8 s per level): under 3 minutes after the build
```

`scripts/bench` runs `scripts/setup`, builds `outbox-relay` and `outbox-bench` in release mode and
runs `target/release/outbox-bench` (options: `outbox-bench --help`). It prints the table above, ends
with `e2e_vs_limit=<ratio>` and rewrites this file and `bench/chart.svg`.
"#,
        mix = r.mix,
        parts = r.partitions,
        write = thousands(r.write_rate),
        cpus = m.cpus,
        single = thousands(r.single.rows as f64),
        lsecs = r.latency_secs,
        smax = thousands(r.steady_max.rate()),
        quarter = thousands(r.drain_on.rate() / 4.0),
        cpu = m.cpu_model,
        mem = m.memory_gib,
        kernel = m.kernel,
        pg = m.postgres,
        tansu = m.tansu,
        rdk = m.librdkafka,
        commit = m.commit,
        other = r.other_cores,
        date = m.date,
    );
    s
}

/// A "nice" axis step for about `n` ticks up to `max`.
fn nice_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn short(v: f64) -> String {
    let trim = |x: f64, unit: &str| {
        if (x - x.round()).abs() < 0.05 {
            format!("{x:.0}{unit}")
        } else {
            format!("{x:.1}{unit}")
        }
    };
    if v >= 1e6 {
        trim(v / 1e6, "M")
    } else if v >= 1e3 {
        trim(v / 1e3, "k")
    } else {
        format!("{v:.0}")
    }
}

/// Two panels: throughput bars against the limits; latency percentiles against offered load.
pub fn chart_svg(r: &Results) -> String {
    let (w, h) = (1000.0, 440.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let title = format!(
        "outbox-relay benchmark{} — {} rows, {} partitions, {} CPUs, e2e_vs_limit = {:.2}",
        if r.quick { " (QUICK run)" } else { "" },
        thousands(r.rows as f64),
        r.partitions,
        r.machine.cpus,
        r.e2e_vs_limit()
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        w / 2.0,
        esc(&title)
    );
    throughput_panel(&mut s, r, 60.0, 60.0, 420.0, 300.0);
    latency_panel(&mut s, r, 590.0, 60.0, 380.0, 300.0);
    let _ = writeln!(s, "</svg>");
    s
}

fn throughput_panel(s: &mut String, r: &Results, x0: f64, y0: f64, pw: f64, ph: f64) {
    let mut bars = vec![
        ("source limit", "pg_recvlogical", r.source.rate(), "#7f8c8d"),
        ("sink limit", "rdkafka producer", r.sink.rate(), "#95a5a6"),
        ("concurrent", "both at once", r.concurrent.rate(), "#b2bec3"),
        ("relay", "marking on", r.drain_on.rate(), "#2e86de"),
        ("relay", "marking off", r.drain_off.rate(), "#54a0ff"),
        ("relay", "marking by UPDATE", r.drain_mark.rate(), "#10ac84"),
        ("relay", "table-less", r.drain_tableless.rate(), "#ee5253"),
    ];
    for p in &r.peers {
        let mode = if p.mode == "replication" {
            "peer: replication"
        } else {
            "peer: polling"
        };
        bars.push(("pg-t-outbox", mode, p.rate(), "#f39c12"));
    }
    let max = bars.iter().map(|b| b.2).fold(0.0, f64::max).max(1.0);
    let step = nice_step(max, 5.0);
    let top = (max / step).ceil() * step;
    let y = |v: f64| y0 + ph - v / top * ph;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="13" font-weight="bold">Throughput, backlog of {} rows (rows/s)</text>"#,
        x0 + pw / 2.0,
        y0 - 14.0,
        thousands(r.rows as f64)
    );
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            x0 + pw,
            x0 - 6.0,
            yy + 4.0,
            short(v)
        );
        v += step;
    }
    let slot = pw / bars.len() as f64;
    let bw = slot * 0.6;
    for (i, (l1, l2, val, color)) in bars.iter().enumerate() {
        let bx = x0 + slot * i as f64 + (slot - bw) / 2.0;
        let by = y(*val);
        let _ = writeln!(
            s,
            r#"<rect x="{bx:.1}" y="{by:.1}" width="{bw:.1}" height="{:.1}" fill="{color}"/>"#,
            (y0 + ph - by).max(0.0)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
            bx + bw / 2.0,
            by - 5.0,
            thousands(*val)
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555" font-size="11">{}</text>"##,
            bx + bw / 2.0,
            y0 + ph + 16.0,
            l1,
            bx + bw / 2.0,
            y0 + ph + 30.0,
            l2
        );
    }
    // The binding limit as a dashed line across the bars, explained under the axis.
    let limit = r.source.rate().min(r.sink.rate());
    let ly = y(limit);
    let _ = writeln!(
        s,
        r##"<line x1="{x0}" y1="{ly:.1}" x2="{}" y2="{ly:.1}" stroke="#c0392b" stroke-dasharray="5,4"/>"##,
        x0 + pw
    );
    let legend_y = y0 + ph + 50.0;
    let _ = writeln!(
        s,
        r##"<line x1="{}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="#c0392b" stroke-dasharray="5,4"/><text x="{}" y="{}" fill="#c0392b">min(source, sink) = {} rows/s: the relay's ceiling</text>"##,
        x0 + 10.0,
        x0 + 40.0,
        x0 + 46.0,
        legend_y + 4.0,
        thousands(limit)
    );
    let _ = writeln!(
        s,
        r##"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="#333"/>"##,
        y0 + ph,
        x0 + pw,
        y0 + ph,
        y0 + ph
    );
}

/// A line of the latency chart: name, colour, dash pattern, value.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Latency) -> f64,
);

fn latency_panel(s: &mut String, r: &Results, x0: f64, y0: f64, pw: f64, ph: f64) {
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="13" font-weight="bold">Latency vs offered load (ms, log scale)</text>"#,
        x0 + pw / 2.0,
        y0 - 14.0
    );
    if r.latency.is_empty() {
        return;
    }
    let series: [Series; 7] = [
        ("commit→broker ack p50", "#16a085", "1,2", |l| {
            l.to_ack.p50
        }),
        ("commit→broker ack p99", "#d35400", "1,2", |l| {
            l.to_ack.p99
        }),
        ("commit→consumer p50", "#27ae60", "", |l| {
            l.to_consumer.p50
        }),
        ("commit→consumer p99", "#e67e22", "", |l| {
            l.to_consumer.p99
        }),
        ("commit→consumer p99.9", "#c0392b", "", |l| {
            l.to_consumer.p999
        }),
        ("commit→delivered_at p50", "#2980b9", "4,3", |l| {
            l.to_marked.p50
        }),
        ("commit→delivered_at p99", "#8e44ad", "4,3", |l| {
            l.to_marked.p99
        }),
    ];
    let all: Vec<f64> = r
        .latency
        .iter()
        .flat_map(|l| series.iter().map(move |(_, _, _, f)| f(l)))
        .filter(|v| *v > 0.0)
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.01);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    let (dlo, dhi) = (lo.log10().floor(), hi.log10().ceil());
    let y = |v: f64| y0 + ph - (v.max(10f64.powf(dlo)).log10() - dlo) / (dhi - dlo) * ph;
    let xmax = r
        .latency
        .iter()
        .map(|l| l.target_rate.max(l.offered_rate()))
        .fold(0.0, f64::max)
        * 1.1;
    let x = |v: f64| x0 + v / xmax * pw;
    let mut d = dlo;
    while d <= dhi + 0.01 {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powf(d);
            if v.log10() > dhi + 1e-9 {
                break;
            }
            let yy = y(v);
            let label = if v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            };
            let stroke = if m == 1.0 { "#d0d0d0" } else { "#eeeeee" };
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="{stroke}"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{label}</text>"##,
                x0 + pw,
                x0 - 6.0,
                yy + 4.0
            );
        }
        d += 1.0;
    }
    for l in &r.latency {
        let xx = x(l.offered_rate());
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{}" x2="{xx:.1}" y2="{}" stroke="#333"/><text x="{xx:.1}" y="{}" text-anchor="middle">{} %</text><text x="{xx:.1}" y="{}" text-anchor="middle" fill="#555">{}/s</text>"##,
            y0 + ph,
            y0 + ph + 5.0,
            y0 + ph + 18.0,
            l.pct,
            y0 + ph + 32.0,
            short(l.offered_rate())
        );
    }
    for (name, color, dash, f) in &series {
        let pts: Vec<String> = r
            .latency
            .iter()
            .map(|l| format!("{:.1},{:.1}", x(l.offered_rate()), y(f(l))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            pts.join(" ")
        );
        for l in &r.latency {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{name} at {} rows/s: {:.1} ms</title></circle>"#,
                x(l.offered_rate()),
                y(f(l)),
                thousands(l.offered_rate()),
                f(l)
            );
        }
    }
    // The legend, over the lines.
    let _ = writeln!(
        s,
        r#"<rect x="{}" y="{}" width="190" height="{}" fill="white" fill-opacity="0.85"/>"#,
        x0 + 4.0,
        y0 + 1.0,
        16.0 * series.len() as f64 + 2.0
    );
    for (i, (name, color, dash, _)) in series.iter().enumerate() {
        let ly = y0 + 8.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{}">{}</text>"#,
            x0 + 10.0,
            x0 + 30.0,
            x0 + 36.0,
            ly + 4.0,
            esc(name)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">offered load: single-row transactions/s (% of the steady max)</text>"##,
        x0 + pw / 2.0,
        y0 + ph + 50.0
    );
    let _ = writeln!(
        s,
        r##"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="#333"/>"##,
        y0 + ph,
        x0 + pw,
        y0 + ph,
        y0 + ph
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_interpolate_inside_buckets() {
        let page = "# TYPE x histogram\n\
            x_bucket{le=\"0.001\"} 10\n\
            x_bucket{le=\"0.002\"} 50\n\
            x_bucket{le=\"0.01\"} 150\n\
            x_bucket{le=\"+Inf\"} 200\n\
            x_sum 3\nx_count 200\n";
        let before = parse_histogram(page, "x", "");
        assert_eq!(before.buckets.len(), 4);
        let after = parse_histogram(
            &page.replace(" 200\n", " 300\n").replace(" 150\n", " 250\n"),
            "x",
            "",
        );
        // Between the scrapes: 100 observations, all in (2 ms, 10 ms].
        let d = Histogram::delta(&before, &after);
        let p = d.percentiles().unwrap();
        assert!((p.p50 - 6.0).abs() < 1e-9, "{p:?}");
        assert!((p.p99 - 9.92).abs() < 1e-9, "{p:?}");
        // Nothing observed: no percentiles.
        assert!(Histogram::delta(&before, &before).percentiles().is_none());
        // Ranks past the last finite bound report that bound.
        let tail = parse_histogram(
            "x_bucket{le=\"0.001\"} 1\nx_bucket{le=\"+Inf\"} 100\n",
            "x",
            "",
        );
        assert_eq!(tail.percentiles().unwrap().p99, 1.0);
    }

    #[test]
    fn labelled_histograms_are_read_one_series_at_a_time() {
        let page = "y_bucket{stage=\"relay\",le=\"0.001\"} 5\n\
            y_bucket{stage=\"relay\",le=\"+Inf\"} 7\n\
            y_bucket{stage=\"broker\",le=\"0.001\"} 1\n\
            y_bucket{stage=\"broker\",le=\"+Inf\"} 9\n";
        let relay = parse_histogram(page, "y", "stage=\"relay\"");
        assert_eq!(relay.buckets, vec![(0.001, 5.0), (f64::INFINITY, 7.0)]);
        let broker = parse_histogram(page, "y", "stage=\"broker\"");
        assert_eq!(broker.buckets, vec![(0.001, 1.0), (f64::INFINITY, 9.0)]);
        assert!(parse_histogram(page, "y", "").buckets.is_empty());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=1000).map(f64::from).collect());
        assert_eq!(p.p50, 500.0);
        assert_eq!(p.p99, 990.0);
        assert_eq!(p.p999, 999.0);
        assert_eq!(Percentiles::of(vec![3.0]).p999, 3.0);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(0.0), "0");
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(200_000.0), "200k");
        assert_eq!(short(7_625.0), "7.6k");
        assert_eq!(short(1_500_000.0), "1.5M");
        assert_eq!(short(950.0), "950");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100_000.0, 5.0), 20_000.0);
        assert_eq!(nice_step(7.0, 5.0), 2.0);
    }
}
