//! `outbox-bench`: measures outbox-relay against the limits of its source and its sink, on one
//! machine, in one run, against one private Postgres cluster and one Tansu broker.
//!
//! 1. source limit: a backlog read straight off a fresh pgoutput slot by `pg_recvlogical`;
//! 2. sink limit: the same messages sent by a plain rdkafka producer with the relay's settings;
//! 3. the relay draining the backlog from WAL, with marking delivered on and off;
//! 4. steady state: the highest rate of single-row transactions the relay keeps up with next to
//!    their writer, then commit → consumer and commit → `delivered_at` latency at 25/50/75 % of it;
//! 5. peak RSS while one huge transaction streams;
//! 6. other sinks: for NATS JetStream and RabbitMQ each (a private server started for the phase),
//!    a plain publisher with the relay's client crate and guarantees, then the relay draining a
//!    backlog of the same rows with that sink (marking on);
//! 7. the table-less outbox and marking by UPDATE, each on a backlog of its own;
//! 8. the peer, pg-transactional-outbox with kafkajs (`bench/peer/`), with its replication and
//!    its polling listener: drain, Postgres CPU, commit → ack at half its drain rate.
//!
//! Prints a table and `e2e_vs_limit=…`, writes `BENCHMARKS.md` and `bench/chart.svg`.
//! `scripts/bench [--quick]` builds and runs it.

mod kafka;
mod nats;
mod peer;
mod procs;
mod rabbit;
mod report;
mod workload;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use futures_util::TryStreamExt;

use kafka::{LatencyConsumer, Msg};
use procs::{NatsServer, NoidaDb, PgCluster, RabbitMq, RelayProc, Tansu};
use report::{
    Concurrent, Cores, DeliveryRun, Drain, Latency, Machine, MarkStats, OtherSink, Percentiles,
    Publisher, Results, Single, SinkLimit, Source, SteadyMax, Unmarked,
};
use workload::Written;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "outbox-bench",
    about = "Benchmark outbox-relay against its source (pg_recvlogical) and sink (rdkafka) limits"
)]
struct Opts {
    /// Small sizes: 100k-row backlog, 100k-row transaction, 8 s per latency level.
    #[arg(long)]
    quick: bool,
    /// Backlog rows (a multiple of 20000). Default 1000000, quick 100000.
    #[arg(long)]
    rows: Option<u64>,
    /// Rows of the single huge transaction. Default 1000000, quick 100000.
    #[arg(long)]
    single_tx_rows: Option<u64>,
    /// Seconds per offered-load level. Default 30, quick 8.
    #[arg(long)]
    latency_seconds: Option<f64>,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// The relay binary. Default: outbox-relay next to this binary.
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// The repository root (its sql/ is applied; BENCHMARKS.md and bench/chart.svg go there
    /// unless --out-dir).
    #[arg(long)]
    repo: Option<PathBuf>,
    /// Where to write BENCHMARKS.md and bench/chart.svg. Default: the repository root.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Exit with status 1 (after writing the report) if the relay confirmed rows it never marked
    /// delivered.
    #[arg(long)]
    strict: bool,
    /// Keep the work directory (logs, data) instead of deleting it.
    #[arg(long)]
    keep_work: bool,
    /// Extra environment for every relay start, e.g. `RELAY_PIPELINE__MARK_BATCH_SIZE=5000`
    /// (repeatable; shown in the report).
    #[arg(long = "relay-env", value_name = "KEY=VALUE", value_parser = parse_env)]
    relay_env: Vec<(String, String)>,
    /// Rows of each backlog the peer (pg-transactional-outbox) drains, a multiple of 4000.
    /// Default 20000, quick 4000; 0 skips the peer.
    #[arg(long)]
    peer_rows: Option<u64>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if !k.starts_with("RELAY_") {
        return Err(format!("{k} is not a relay setting (RELAY_…)"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

const SLOT: &str = "outbox_relay";
const SOURCE_SLOT: &str = "bench_src";
/// The slot `pg_recvlogical` drains while the plain producer sends (the concurrent limit).
const CONCURRENT_SLOT: &str = "bench_both";
const BACKLOG_AGG: &str = "bench";
const BACKLOG_TOPIC: &str = "outbox.event.bench";
const SINK_TOPIC: &str = "bench.sink";
const LATENCY_AGG: &str = "latency";
const COMMIT_TO_ACK: &str = outbox_relay::metrics::COMMIT_TO_ACK;
const SINGLE_AGG: &str = "bigtx";
const SINGLE_TOPIC: &str = "outbox.event.bigtx";
const LOAD_LEVELS: [u32; 3] = [25, 50, 75];

/// Settings of the private cluster on top of initdb's.
const PG_SETTINGS: &[(&str, &str)] = &[
    ("wal_level", "logical"),
    ("track_commit_timestamp", "on"),
    ("max_replication_slots", "10"),
    ("max_wal_senders", "10"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("shared_buffers", "512MB"),
    ("max_wal_size", "8GB"),
    ("wal_sender_timeout", "60s"),
    ("logging_collector", "off"),
    // Repeatable figures: no autovacuum worker competes with a measurement for the two cores;
    // the bench runs VACUUM (ANALYZE) itself between phases. No timed checkpoint mid-run.
    ("autovacuum", "off"),
    ("checkpoint_timeout", "1h"),
];

fn main() -> ExitCode {
    let opts = Opts::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outbox-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            eprintln!("outbox-bench: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        tokio::select! {
            r = run(opts) => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("outbox-bench: FAILED: {e:#}");
                    ExitCode::FAILURE
                }
            },
            _ = int.recv() => {
                eprintln!("outbox-bench: interrupted; stopping the relay, the broker and Postgres");
                ExitCode::from(130)
            }
            _ = term.recv() => {
                eprintln!("outbox-bench: terminated; stopping the relay, the broker and Postgres");
                ExitCode::from(143)
            }
        }
    });
    // Everything owned by `run` was dropped (processes stopped, work directory removed); do not
    // wait for a blocking task that may still be sending.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// The broker the relays started now publish to.
#[derive(Debug, Clone)]
enum RelaySink {
    /// Tansu (or, while the delivery modes run, the broker with transactions).
    Kafka,
    Nats {
        url: String,
    },
    Rabbitmq {
        url: String,
    },
}

impl RelaySink {
    /// `RELAY_SINK`, for the sinks other than Kafka.
    fn name(&self) -> Option<&'static str> {
        match self {
            RelaySink::Kafka => None,
            RelaySink::Nats { .. } => Some("nats"),
            RelaySink::Rabbitmq { .. } => Some("rabbitmq"),
        }
    }
}

/// The broker of the other-sinks phase that runs now.
enum SideBroker {
    Nats(NatsServer),
    Rabbitmq(RabbitMq),
}

impl SideBroker {
    fn cpu_seconds(&self) -> f64 {
        match self {
            SideBroker::Nats(s) => s.cpu_seconds(),
            SideBroker::Rabbitmq(n) => n.cpu_seconds(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            SideBroker::Nats(_) => "nats-server",
            SideBroker::Rabbitmq(_) => "RabbitMQ",
        }
    }
}

/// Sizes of one run.
struct Plan {
    quick: bool,
    rows: u64,
    single_tx_rows: u64,
    latency_secs: f64,
    partitions: i32,
    relay_env: Vec<(String, String)>,
    peer_rows: u64,
}

/// The processes and connections of a run. Fields drop in order: the relay first, the work
/// directory last.
struct Env {
    relay: Option<RelayProc>,
    /// While the other sinks are measured: the NATS server or the RabbitMQ node.
    side_broker: Option<SideBroker>,
    /// CPU seconds of the other-sinks brokers stopped so far.
    side_cpu_done: f64,
    tansu: Tansu,
    /// While the delivery-mode comparison runs: the broker with transactions the relay uses.
    txn_broker: Option<NoidaDb>,
    /// `delivery` for the relays started now (`at_least_once` but in the comparison).
    delivery: &'static str,
    /// `sink` for the relays started now (Kafka but in the other-sinks phase).
    sink: RelaySink,
    pg: PgCluster,
    db: tokio_postgres::Client,
    relay_bin: PathBuf,
    work: PathBuf,
    work_dir_guard: Option<tempfile::TempDir>,
    plan: Plan,
    /// Next row number for payload generation (rows are numbered across the run).
    next_row: u64,
    relay_runs: u32,
    /// Where every relay of the run serves its Prometheus metrics (127.0.0.1).
    metrics_port: u16,
    /// pg_stat_statements is loaded.
    statements: bool,
    /// `outbox.on_delivered` of the relay's next start (`record`, the default, or `mark`).
    on_delivered: &'static str,
    /// What the next drain reads, when not table rows (its label).
    drain_note: Option<&'static str>,
    /// Rows the relay confirmed without marking them delivered.
    unmarked: Vec<Unmarked>,
}

/// CPU seconds of each process at one instant.
struct CpuSnapshot {
    at: Instant,
    relay: f64,
    postgres: f64,
    tansu: f64,
    /// The other-sinks phase's broker (0 when none runs).
    side: f64,
    bench: f64,
    /// All CPUs of the machine, busy seconds.
    system: f64,
}

impl CpuSnapshot {
    /// Cores each process kept busy, on average, between `earlier` and this snapshot.
    fn cores_since(&self, earlier: &CpuSnapshot) -> Cores {
        let secs = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        Cores {
            relay: (self.relay - earlier.relay) / secs,
            postgres: (self.postgres - earlier.postgres) / secs,
            tansu: (self.tansu - earlier.tansu) / secs,
            bench: (self.bench - earlier.bench) / secs,
            other: ((self.system - earlier.system)
                - (self.relay - earlier.relay)
                - (self.postgres - earlier.postgres)
                - (self.tansu - earlier.tansu)
                - (self.side - earlier.side)
                - (self.bench - earlier.bench))
                .max(0.0)
                / secs,
        }
    }
}

/// What one offered load wrote.
struct Offered {
    rows: u64,
    /// How long the writer ran.
    secs: f64,
    seq_after: i64,
    seq_last: i64,
    /// When it started, seconds since the epoch.
    started_wall: f64,
    /// From the start until every row was seen and marked.
    cores: Cores,
}

fn secs_since_epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

async fn run(opts: Opts) -> Result<()> {
    let run_started = Instant::now();
    let quick = opts.quick;
    let plan = Plan {
        quick,
        rows: opts.rows.unwrap_or(if quick { 100_000 } else { 1_000_000 }),
        single_tx_rows: opts
            .single_tx_rows
            .unwrap_or(if quick { 100_000 } else { 1_000_000 }),
        latency_secs: opts
            .latency_seconds
            .unwrap_or(if quick { 8.0 } else { 30.0 }),
        partitions: opts.partitions,
        relay_env: opts.relay_env.clone(),
        peer_rows: opts.peer_rows.unwrap_or(if quick { 4_000 } else { 20_000 }),
    };
    ensure!(
        plan.rows > 0 && plan.rows.is_multiple_of(workload::ROUND_ROWS),
        "--rows must be a positive multiple of {}",
        workload::ROUND_ROWS
    );
    ensure!(plan.single_tx_rows > 0, "--single-tx-rows must be positive");
    ensure!(plan.partitions > 0, "--partitions must be positive");
    ensure!(
        plan.latency_secs >= 1.0,
        "--latency-seconds must be at least 1"
    );
    let repo = match opts.repo {
        Some(r) => r,
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow!("cannot tell the repository root; pass --repo"))?,
    };
    ensure!(
        repo.join("sql").is_dir(),
        "{} has no sql/ directory; pass --repo <the outbox-relay checkout>",
        repo.display()
    );
    let out_dir = opts.out_dir.clone();
    let relay_bin = match opts.relay_bin {
        Some(b) => b,
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("outbox-relay"),
    };
    ensure!(
        relay_bin.is_file(),
        "relay binary {} not found: cargo build --release -p outbox-relay, or pass --relay-bin",
        relay_bin.display()
    );

    let work_dir = tempfile::Builder::new()
        .prefix("outbox-bench-")
        .tempdir()
        .context("creating a work directory")?;
    let work = work_dir.path().to_path_buf();
    let work_dir = if opts.keep_work {
        let _ = work_dir.keep();
        println!("bench: work directory (kept): {}", work.display());
        None
    } else {
        Some(work_dir)
    };
    println!(
        "bench: {} run: {}-row backlog, {}-row single transaction, {} s per latency level, {} partitions",
        if quick { "QUICK" } else { "full" },
        plan.rows,
        plan.single_tx_rows,
        plan.latency_secs,
        plan.partitions
    );
    println!("bench: starting a private Postgres cluster and a Tansu broker");
    // Postgres data lives in a subdirectory the postgres OS user owns.
    let mut settings = PG_SETTINGS.to_vec();
    let statements = procs::pg_has_library("pg_stat_statements");
    if statements {
        // Per-statement figures of the relay's marking UPDATEs.
        settings.push(("shared_preload_libraries", "pg_stat_statements"));
    }
    let pg = PgCluster::start(&work.join("pg"), &settings)?;
    let tansu = Tansu::start(&work.join("tansu.log"))?;
    let db = pg.connect().await?;
    let mut env = Env {
        relay: None,
        side_broker: None,
        side_cpu_done: 0.0,
        tansu,
        txn_broker: None,
        delivery: "at_least_once",
        sink: RelaySink::Kafka,
        pg,
        db,
        relay_bin,
        work,
        work_dir_guard: work_dir,
        plan,
        next_row: 0,
        relay_runs: 0,
        metrics_port: procs::free_port()?,
        statements,
        on_delivered: "record",
        drain_note: None,
        unmarked: Vec::new(),
    };
    let results = env.run_all(&repo, run_started).await;
    let work_dir = env.work_dir_guard.take();
    // Stops the relay, the broker and Postgres.
    drop(env);
    let results = match results {
        Ok(r) => r,
        Err(e) => {
            // Keep the logs (not the data) for a look at what went wrong.
            if let Some(dir) = work_dir {
                let path = dir.keep();
                let _ = std::fs::remove_dir_all(path.join("pg/data"));
                eprintln!(
                    "outbox-bench: logs kept in {} (relay-*.log, tansu.log, pg/postgres.log)",
                    path.display()
                );
            }
            return Err(e);
        }
    };
    drop(work_dir);
    report::print_table(&results);
    let out = out_dir.unwrap_or_else(|| repo.clone());
    report::write_files(&out, &results)?;
    println!(
        "bench: wrote {} and {} ({:.0} s in all)",
        out.join("BENCHMARKS.md").display(),
        out.join("bench/chart.svg").display(),
        results.total_secs
    );
    let unmarked: u64 = results.unmarked.iter().map(|u| u.rows).sum();
    if opts.strict && unmarked > 0 {
        println!("e2e_vs_limit={:.2}", results.e2e_vs_limit());
        bail!("--strict: the relay confirmed {unmarked} row(s) it never marked delivered");
    }
    println!("e2e_vs_limit={:.2}", results.e2e_vs_limit());
    println!("e2e_vs_concurrent={:.2}", results.e2e_vs_concurrent());
    Ok(())
}

impl Env {
    async fn run_all(&mut self, repo: &Path, run_started: Instant) -> Result<Results> {
        self.apply_schema(repo).await?;
        workload::install(&self.db).await?;
        let brokers = self.tansu.brokers();
        let p = self.plan.partitions;
        kafka::create_topics(&brokers, &[BACKLOG_TOPIC, SINK_TOPIC, SINGLE_TOPIC], p).await?;
        let machine = self.machine(repo).await;
        let cpu_start = self.cpu_snapshot();

        // The relay's first start creates its slot (nothing to snapshot: the table is empty), so
        // every later row reaches it through WAL.
        println!("bench: first relay start (creates slot {SLOT}), then stop");
        self.start_relay(true, "first-start")?;
        self.wait_streaming(true).await?;
        self.stop_relay().await?;

        // Backlog 1: read by the source-limit slot and by the relay (marking on).
        if self.statements {
            self.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                .await?;
        }
        self.sql(&format!(
            "SELECT pg_create_logical_replication_slot('{SOURCE_SLOT}', 'pgoutput'); \
             SELECT pg_create_logical_replication_slot('{CONCURRENT_SLOT}', 'pgoutput')"
        ))
        .await?;
        println!(
            "bench: writing backlog 1 ({} rows): {}",
            self.plan.rows,
            workload::mix_description()
        );
        let backlog1 = self.write_backlog("backlog 1").await?;
        self.vacuum("after writing backlog 1").await?;
        let source = self.source_limit(&backlog1).await?;
        let sink = self.sink_limit(&backlog1).await?;
        let concurrent = self.concurrent_limit(&backlog1).await?;
        let drain_on = self.drain(true, &backlog1).await?;
        // What marking leaves behind: a dead row version per row, for VACUUM to clean.
        let vacuum_after_marking = self.vacuum("after marking backlog 1 delivered").await?;

        self.skip_relay_wal().await?;
        println!(
            "bench: writing backlog 2 ({} rows), same mix",
            self.plan.rows
        );
        let backlog2 = self.write_backlog("backlog 2").await?;
        self.vacuum("after writing backlog 2").await?;
        let drain_off = self.drain(false, &backlog2).await?;

        self.skip_relay_wal().await?;
        // The latency levels measure a broker that holds only their own messages, not the
        // millions the throughput phases left in Tansu's memory storage.
        let rss_before = self.tansu.rss_kib().unwrap_or(0);
        kafka::delete_topics(&self.tansu.brokers(), &[SINK_TOPIC, BACKLOG_TOPIC]).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "bench: deleted the throughput phases' topics from Tansu (RSS {} MB -> {} MB)",
            rss_before / 1024,
            self.tansu.rss_kib().unwrap_or(0) / 1024
        );
        let (steady_max, latency) = self.latency(drain_on.rate()).await?;
        self.vacuum("after the latency runs").await?;
        self.skip_relay_wal().await?;
        let single = self.single_transaction().await?;
        self.vacuum("after the single transaction").await?;
        let delivery = self.delivery_modes(steady_max.rate() * 0.5).await?;
        let other_sinks = self.other_sinks().await?;

        // The table-less outbox: the same events written by outbox_emit (nothing in a table,
        // nothing to mark), drained from WAL.
        self.skip_relay_wal().await?;
        println!(
            "bench: writing {} events with outbox_emit (table-less outbox)",
            self.plan.rows
        );
        let emitted = workload::write_emitted(
            &self.db,
            BACKLOG_AGG,
            self.next_row,
            self.plan.rows,
            "table-less backlog",
        )
        .await?;
        self.next_row += emitted.rows;
        println!(
            "bench:   table-less backlog: {} events in {} transactions, {:.1} s ({:.0} events/s), WAL up to {}",
            emitted.rows,
            emitted.transactions,
            emitted.secs,
            emitted.rows as f64 / emitted.secs,
            fmt_lsn(emitted.end_lsn)
        );
        self.drain_note = Some("table-less messages (outbox_emit)");
        let drain_tableless = self.drain(false, &emitted).await;
        self.drain_note = None;
        let drain_tableless = drain_tableless?;

        // Last: the same drain with each row marked by an UPDATE (`outbox.on_delivered = mark`,
        // the default before the delivery ledger), on a third backlog.
        self.skip_relay_wal().await?;
        println!(
            "bench: writing backlog 3 ({} rows) for a drain with outbox.on_delivered = mark",
            self.plan.rows
        );
        let backlog3 = self.write_backlog("backlog 3").await?;
        self.vacuum("after writing backlog 3").await?;
        self.on_delivered = "mark";
        let drain_mark = self.drain(true, &backlog3).await;
        self.on_delivered = "record";
        let drain_mark = drain_mark?;

        // The peer, alone, last: its own table, publication and slot.
        self.skip_relay_wal().await?;
        let peers = if self.plan.peer_rows > 0 {
            self.peers(repo, self.plan.peer_rows).await?
        } else {
            Vec::new()
        };
        // The relay at the load the peer's replication listener was measured at.
        let (relay_at_peer_load, sink_at_peer_load) =
            match peers.iter().find(|p| p.mode == "replication") {
                Some(p) => (
                    Some(self.relay_at(p.load_rate).await?),
                    Some(self.sink_at(p.load_rate).await?),
                ),
                None => (None, None),
            };
        let peers_node = Command::new("node")
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|v| !v.is_empty() && !peers.is_empty());

        Ok(Results {
            quick: self.plan.quick,
            relay_env: self.plan.relay_env.clone(),
            rows: self.plan.rows,
            partitions: p,
            mix: workload::mix_description(),
            write_rate: (backlog1.rows + backlog2.rows) as f64 / (backlog1.secs + backlog2.secs),
            source,
            sink,
            concurrent,
            drain_on,
            drain_off,
            drain_mark,
            drain_tableless,
            vacuum_after_marking,
            steady_max,
            latency,
            latency_secs: self.plan.latency_secs,
            single,
            delivery,
            other_sinks,
            peers,
            peers_node,
            relay_at_peer_load,
            sink_at_peer_load,
            machine,
            unmarked: std::mem::take(&mut self.unmarked),
            other_cores: self.cpu_snapshot().cores_since(&cpu_start).other,
            total_secs: run_started.elapsed().as_secs_f64(),
        })
    }

    /// Moves the (stopped) relay's slot to the end of WAL. Only the relay's own marking UPDATEs
    /// (never published) were written since it stopped; without this the next measured phase
    /// would start by decoding them.
    async fn skip_relay_wal(&self) -> Result<()> {
        ensure!(
            self.relay.is_none(),
            "the relay must be stopped to move its slot"
        );
        self.sql(&format!(
            "SELECT pg_replication_slot_advance('{SLOT}', pg_current_wal_insert_lsn())"
        ))
        .await
    }

    /// `VACUUM (ANALYZE) outbox` between phases (autovacuum is off); returns its seconds.
    async fn vacuum(&self, why: &str) -> Result<f64> {
        let started = Instant::now();
        self.sql("VACUUM (ANALYZE) outbox").await?;
        let secs = started.elapsed().as_secs_f64();
        println!("bench:   VACUUM (ANALYZE) outbox {why}: {secs:.1} s");
        Ok(secs)
    }

    /// Starts counting the relay's marking UPDATEs afresh.
    async fn reset_statements(&self) -> Result<()> {
        if self.statements {
            self.sql("SELECT pg_stat_statements_reset()").await?;
        }
        Ok(())
    }

    /// The relay's marking statements since the last reset (`UPDATE … SET delivered_at = now()`,
    /// or the ledger insert); `rows`: the rows they marked.
    async fn mark_statements(&self, rows: u64) -> Result<Option<MarkStats>> {
        if !self.statements {
            return Ok(None);
        }
        let row = self
            .db
            .query_one(
                "SELECT coalesce(sum(calls), 0)::int8, coalesce(sum(total_exec_time), 0)::float8 \
                 FROM pg_stat_statements \
                 WHERE (query ILIKE 'UPDATE %' AND query ILIKE '%delivered_at% = now()%') \
                    OR query ILIKE '%INSERT INTO %outbox_delivered%'",
                &[],
            )
            .await
            .context("reading pg_stat_statements")?;
        Ok(Some(MarkStats {
            calls: row.get::<_, i64>(0) as u64,
            rows,
            total_ms: row.get(1),
            on_delivered: self.on_delivered,
        }))
    }

    async fn sql(&self, sql: &str) -> Result<()> {
        self.db
            .batch_execute(sql)
            .await
            .with_context(|| format!("Postgres: {sql}"))
    }

    async fn apply_schema(&self, repo: &Path) -> Result<()> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo.join("sql"))
            .context("reading sql/")?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        for f in files {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            self.db
                .batch_execute(&text)
                .await
                .with_context(|| format!("applying {}", f.display()))?;
        }
        Ok(())
    }

    async fn machine(&self, repo: &Path) -> Machine {
        let pg_version = self
            .db
            .query_one("SHOW server_version", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|_| "?".into());
        Machine::collect(repo, pg_version, self.tansu.version.clone())
    }

    async fn write_backlog(&mut self, label: &str) -> Result<Written> {
        let w =
            workload::write_backlog(&self.db, BACKLOG_AGG, self.next_row, self.plan.rows, label)
                .await?;
        self.next_row += w.rows;
        println!(
            "bench:   {label}: {} rows in {} transactions, {:.1} s ({:.0} rows/s), WAL up to {}",
            w.rows,
            w.transactions,
            w.secs,
            w.rows as f64 / w.secs,
            fmt_lsn(w.end_lsn)
        );
        Ok(w)
    }

    /// The Kafka-protocol broker relays started now publish to: Tansu, or the broker with
    /// transactions while the delivery modes run.
    fn kafka_brokers(&self) -> String {
        self.txn_broker
            .as_ref()
            .map_or_else(|| self.tansu.brokers(), NoidaDb::brokers)
    }

    fn relay_env(&self, mark: bool) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("RELAY_POSTGRES__URL", self.pg.url()),
            ("RELAY_KAFKA__BROKERS", self.kafka_brokers()),
            ("RELAY_DELIVERY", self.delivery.into()),
            (
                "RELAY_EXACTLY_ONCE__TRANSACTIONAL_ID",
                "outbox-bench".into(),
            ),
            ("RELAY_POSTGRES__STATUS_INTERVAL_MS", "1000".into()),
            (
                "RELAY_KAFKA__TOPIC_PARTITIONS",
                self.plan.partitions.to_string(),
            ),
            ("RELAY_PIPELINE__MARK_DELIVERED", mark.to_string()),
            ("RELAY_OUTBOX__ON_DELIVERED", self.on_delivered.into()),
            ("RELAY_LOG__LEVEL", "info".into()),
            (
                "RELAY_HTTP__ADDR",
                format!("127.0.0.1:{}", self.metrics_port),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if let Some(name) = self.sink.name() {
            env.retain(|(k, _)| {
                !k.starts_with("RELAY_KAFKA__") && !k.starts_with("RELAY_EXACTLY_ONCE__")
            });
            env.push(("RELAY_SINK".into(), name.into()));
            match &self.sink {
                RelaySink::Nats { url } => env.push(("RELAY_NATS__URL".into(), url.clone())),
                RelaySink::Rabbitmq { url } => {
                    env.push(("RELAY_RABBITMQ__URL".into(), url.clone()))
                }
                RelaySink::Kafka => {}
            }
        }
        for (k, v) in &self.plan.relay_env {
            if k == "RELAY_PIPELINE__MARK_DELIVERED" {
                continue; // each phase sets it
            }
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }

    fn start_relay(&mut self, mark: bool, label: &str) -> Result<()> {
        ensure!(self.relay.is_none(), "a relay is already running");
        self.relay_runs += 1;
        let log = self
            .work
            .join(format!("relay-{}-{label}.log", self.relay_runs));
        self.relay = Some(RelayProc::spawn(
            &self.relay_bin,
            &self.relay_env(mark),
            &log,
        )?);
        Ok(())
    }

    fn relay(&mut self) -> Result<&mut RelayProc> {
        self.relay
            .as_mut()
            .ok_or_else(|| anyhow!("the relay is not running"))
    }

    /// Waits until the relay streams from its slot (and, on first start, finished its
    /// snapshot); returns the seconds since it was started and the walsender's pid.
    async fn wait_streaming(&mut self, first_start: bool) -> Result<(f64, Option<u32>)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.relay()?.check_alive()?;
            let row = self
                .db
                .query_opt(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&SLOT],
                )
                .await
                .context("reading pg_replication_slots")?;
            let done = if first_start {
                self.db
                    .query_opt(
                        "SELECT 1 FROM outbox_relay_state WHERE slot_name = $1 AND snapshot_done_at IS NOT NULL",
                        &[&SLOT],
                    )
                    .await
                    .context("reading outbox_relay_state")?
                    .is_some()
            } else {
                true
            };
            if let Some(row) = row
                && done
            {
                let pid: Option<i32> = row.get(0);
                return Ok((
                    self.relay()?.started.elapsed().as_secs_f64(),
                    pid.map(|p| p as u32),
                ));
            }
            if Instant::now() > deadline {
                let log = self.relay()?.log.clone();
                bail!(
                    "the relay did not start streaming from slot {SLOT} within 60 s; last lines of its log:\n{}",
                    procs::tail(&log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop_relay(&mut self) -> Result<()> {
        let mut relay = self
            .relay
            .take()
            .ok_or_else(|| anyhow!("the relay is not running"))?;
        let status = relay.terminate(Duration::from_secs(90)).await?;
        if !status.success() {
            bail!(
                "the relay exited with {status} after SIGTERM (expected 0); last lines of {}:\n{}",
                relay.log.display(),
                procs::tail(&relay.log, 30)
            );
        }
        Ok(())
    }

    async fn source_limit(&mut self, w: &Written) -> Result<Source> {
        println!(
            "bench: source limit: pg_recvlogical reads {} rows off slot {SOURCE_SLOT} (pgoutput) up to {}",
            w.rows,
            fmt_lsn(w.end_lsn)
        );
        let s = self.recvlogical(SOURCE_SLOT, w).await?;
        println!(
            "bench:   source limit: {:.0} rows/s ({} rows, {:.0} MB of WAL in {:.2} s; Postgres CPU {:.1} s)",
            s.rate(),
            s.rows,
            s.wal_bytes as f64 / 1e6,
            s.secs,
            s.pg_cpu
        );
        Ok(s)
    }

    /// `pg_recvlogical` reads the backlog off `slot` (to `w.end_lsn`), then the slot is dropped.
    async fn recvlogical(&self, slot: &str, w: &Written) -> Result<Source> {
        let start_lsn: i64 = self
            .db
            .query_one(
                "SELECT (restart_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .context("reading the source slot's position")?
            .get(0);
        let pg_cpu0 = self.pg.cpu_seconds();
        let children_cpu = || {
            procs::proc_stat(std::process::id())
                .map(|s| s.cpu_all() - s.cpu_self())
                .unwrap_or(0.0)
        };
        let client_cpu0 = children_cpu();
        let started = Instant::now();
        let out = tokio::process::Command::new(self.pg.client_tool("pg_recvlogical"))
            .arg("-d")
            .arg(self.pg.conninfo())
            .args(["--slot", slot, "--start", "--no-loop", "-F", "0"])
            .args([
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=outbox_pub",
            ])
            .arg(format!("--endpos={}", fmt_lsn(w.end_lsn)))
            .args(["-f", "/dev/null"])
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(1800), out)
            .await
            .map_err(|_| {
                anyhow!("pg_recvlogical did not reach the end position within 30 minutes")
            })?
            .context("running pg_recvlogical")?;
        let secs = started.elapsed().as_secs_f64();
        // pg_recvlogical was our child: its CPU shows in our reaped-children times.
        let client_cpu = children_cpu() - client_cpu0;
        ensure!(
            out.status.success(),
            "pg_recvlogical failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let pg_cpu = self.pg.cpu_seconds() - pg_cpu0;
        // The walsender may take a moment to let go of the slot.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self
                .db
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
            {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("dropping the source-limit slot"),
            }
        }
        Ok(Source {
            rows: w.rows,
            secs,
            wal_bytes: w.end_lsn.saturating_sub(start_lsn as u64),
            pg_cpu,
            client_cpu,
        })
    }

    /// The concurrent limit: `pg_recvlogical` drains the backlog and the plain producer sends
    /// the same rows at the same time, on the same cores — the most any relay can do here.
    async fn concurrent_limit(&mut self, w: &Written) -> Result<Concurrent> {
        let msgs = self.load_messages(w).await?;
        println!(
            "bench: concurrent limit: pg_recvlogical reads {} rows off slot {CONCURRENT_SLOT} while the plain producer sends them to {SINK_TOPIC}",
            w.rows
        );
        let brokers = self.tansu.brokers();
        let send =
            tokio::task::spawn_blocking(move || kafka::sink_limit(&brokers, SINK_TOPIC, &msgs));
        let read = self.recvlogical(CONCURRENT_SLOT, w).await;
        let sent = send
            .await
            .map_err(|e| anyhow!("the concurrent sink task failed: {e}"))??;
        let read = read?;
        let c = Concurrent {
            rows: w.rows,
            source_secs: read.secs,
            sink_secs: sent.secs,
        };
        println!(
            "bench:   concurrent limit: {:.0} rows/s (pg_recvlogical {:.2} s, producer {:.2} s, at the same time)",
            c.rate(),
            c.source_secs,
            c.sink_secs
        );
        Ok(c)
    }

    /// The backlog's rows as the relay would send them.
    async fn load_messages(&self, w: &Written) -> Result<Vec<Msg>> {
        let rows = self
            .db
            .query_raw(
                "SELECT id::text, aggregateid, type, aggregatetype, payload::text FROM outbox \
                 WHERE seq > $1 AND seq <= $2",
                [w.seq_after, w.seq_last],
            )
            .await
            .context("reading the backlog for the sink limit")?;
        futures_util::pin_mut!(rows);
        let mut msgs = Vec::with_capacity(w.rows as usize);
        while let Some(r) = rows
            .try_next()
            .await
            .context("reading the backlog for the sink limit")?
        {
            msgs.push(Msg {
                id: r.get(0),
                key: r.get(1),
                event_type: r.get(2),
                aggregatetype: r.get(3),
                payload: r.get(4),
            });
        }
        ensure!(
            msgs.len() as u64 == w.rows,
            "read {} backlog rows for the sink limit, expected {}",
            msgs.len(),
            w.rows
        );
        Ok(msgs)
    }

    async fn sink_limit(&mut self, w: &Written) -> Result<SinkLimit> {
        let msgs = self.load_messages(w).await?;
        let bytes: usize = msgs.iter().map(|m| m.payload.len()).sum();
        println!(
            "bench: sink limit: a plain rdkafka producer (relay's producer_config) sends the same {} messages ({:.0} B payload on average) to {SINK_TOPIC}",
            msgs.len(),
            bytes as f64 / msgs.len() as f64
        );
        let brokers = self.tansu.brokers();
        let tansu_cpu0 = self.tansu.cpu_seconds();
        let run =
            tokio::task::spawn_blocking(move || kafka::sink_limit(&brokers, SINK_TOPIC, &msgs))
                .await
                .map_err(|e| anyhow!("the sink-limit task failed: {e}"))??;
        let s = SinkLimit {
            msgs: run.msgs,
            secs: run.secs,
            avg_payload: bytes as f64 / run.msgs as f64,
            tansu_cpu: self.tansu.cpu_seconds() - tansu_cpu0,
        };
        println!(
            "bench:   sink limit: {:.0} msgs/s ({} messages in {:.2} s; Tansu CPU {:.1} s)",
            s.rate(),
            s.msgs,
            s.secs,
            s.tansu_cpu
        );
        Ok(s)
    }

    async fn undelivered(&self, seq_after: i64, seq_last: i64) -> Result<i64> {
        Ok(self
            .db
            .query_one(
                "SELECT count(*) FROM outbox o WHERE o.seq > $1 AND o.seq <= $2 AND o.delivered_at IS NULL \
                 AND NOT o.seq <@ (SELECT coalesce(range_agg(r), '{}'::int8multirange) \
                                   FROM outbox_delivered, unnest(seqs) AS r \
                                   WHERE seqs && int8range($1 + 1, $2 + 1))",
                &[&seq_after, &seq_last],
            )
            .await
            .context("counting undelivered rows")?
            .get(0))
    }

    /// Latest `delivered_at` of a seq range, seconds since the epoch.
    async fn last_delivered(&self, seq_after: i64, seq_last: i64) -> Result<f64> {
        let v: Option<f64> = self
            .db
            .query_one(
                "SELECT extract(epoch FROM greatest( \
                     (SELECT max(delivered_at) FROM outbox WHERE seq > $1 AND seq <= $2), \
                     (SELECT max(delivered_at) FROM outbox_delivered \
                      WHERE seqs && int8range($1 + 1, $2 + 1))))::float8",
                &[&seq_after, &seq_last],
            )
            .await
            .context("reading max(delivered_at)")?
            .get(0);
        v.ok_or_else(|| anyhow!("no row of seq ({seq_after}, {seq_last}] is marked delivered"))
    }

    /// The relay slot's confirmed flush position.
    async fn slot_confirmed(&self) -> Result<u64> {
        let v: Option<i64> = self
            .db
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&SLOT],
            )
            .await
            .context("reading the relay slot's confirmed_flush_lsn")?
            .get(0);
        v.map(|v| v as u64)
            .ok_or_else(|| anyhow!("slot {SLOT} has no confirmed_flush_lsn"))
    }

    /// Waits until the relay confirmed `w` to its slot (confirmed_flush_lsn at or past the WAL
    /// position after the last commit), printing progress; fails if the relay dies or the
    /// position does not move for two minutes. Returns the instant it was seen.
    async fn wait_confirmed(
        &mut self,
        w: &Written,
        label: &str,
        since: Instant,
    ) -> Result<Instant> {
        let mut last = 0;
        let mut last_move = Instant::now();
        let mut last_print = Instant::now();
        loop {
            self.relay()?.check_alive()?;
            let confirmed = self.slot_confirmed().await?;
            let now = Instant::now();
            if confirmed >= w.end_lsn {
                return Ok(now);
            }
            if confirmed != last {
                last = confirmed;
                last_move = now;
            } else if last_move.elapsed() > Duration::from_secs(120) {
                bail!(
                    "{label}: the relay's slot stuck at {} for 2 minutes (waiting for {})",
                    fmt_lsn(confirmed),
                    fmt_lsn(w.end_lsn)
                );
            }
            if last_print.elapsed() >= Duration::from_secs(3) {
                last_print = now;
                let done = confirmed.saturating_sub(w.start_lsn) as f64
                    / w.end_lsn.saturating_sub(w.start_lsn).max(1) as f64;
                let rows = done.clamp(0.0, 1.0) * w.rows as f64;
                println!(
                    "bench:   {label}: {:.0} % of the WAL confirmed (~{rows:.0} rows, {:.0} rows/s)",
                    done * 100.0,
                    rows / since.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until no row of the seq range is undelivered.
    /// Waits until no row of the seq range is undelivered. Rows the relay has confirmed to its
    /// slot (confirmed_flush_lsn at or past `end_lsn`) and still not marked 3 s later will never
    /// be marked (the relay marks before it confirms): they are recorded, not waited for.
    async fn wait_marked(
        &mut self,
        seq_after: i64,
        seq_last: i64,
        end_lsn: u64,
        label: &str,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut confirmed_since: Option<Instant> = None;
        loop {
            self.relay()?.check_alive()?;
            let left = self.undelivered(seq_after, seq_last).await?;
            if left == 0 {
                return Ok(());
            }
            if confirmed_since.is_none() && self.slot_confirmed().await? >= end_lsn {
                confirmed_since = Some(Instant::now());
            }
            if confirmed_since.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
                let ids: Vec<String> = self
                    .db
                    .query(
                        "SELECT id::text FROM outbox_status WHERE delivered_at IS NULL AND seq > $1 AND seq <= $2 \
                         ORDER BY seq LIMIT 5",
                        &[&seq_after, &seq_last],
                    )
                    .await
                    .context("reading unmarked rows")?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                println!(
                    "bench:   WARNING {label}: the relay confirmed past {left} row(s) it never marked delivered \
                     (delivered_at still NULL), e.g. {}",
                    ids.join(", ")
                );
                self.unmarked.push(Unmarked {
                    phase: label.to_owned(),
                    rows: left as u64,
                    ids,
                });
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{label}: {left} rows still not marked delivered after 5 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The relay drains a backlog it reads from WAL (its slot predates the backlog).
    async fn drain(&mut self, mark: bool, w: &Written) -> Result<Drain> {
        let marking = match self.drain_note {
            Some(note) => note,
            None if mark => "marking on",
            None => "marking off",
        };
        let sink = self.sink.name();
        let label = match sink {
            None => format!("relay drain, {marking}"),
            Some(sink) => format!("relay drain to {sink}, {marking}"),
        };
        let label = label.as_str();
        println!(
            "bench: {label}: the relay starts and publishes {} rows from WAL",
            w.rows
        );
        self.reset_statements().await?;
        let wal0 = workload::wal_insert_lsn(&self.db).await?;
        let cpu0 = self.cpu_snapshot();
        let log_label = format!(
            "drain{}-marking-{}{}",
            sink.map(|s| format!("-{s}")).unwrap_or_default(),
            if mark { "on" } else { "off" },
            if self.drain_note.is_some() {
                "-tableless"
            } else {
                ""
            }
        );
        self.start_relay(mark, &log_label)?;
        let started = self.relay()?.started;
        let started_wall = self.relay()?.started_wall;
        let (startup_secs, walsender) = self.wait_streaming(false).await?;
        let confirmed = self.wait_confirmed(w, label, started).await?;
        if mark {
            self.wait_marked(w.seq_after, w.seq_last, w.end_lsn, label)
                .await?;
        }
        let relay = self.relay()?;
        let relay_cpu = relay.cpu_seconds().unwrap_or(f64::NAN);
        let peak_rss_kib = relay.peak_rss_kib().unwrap_or(0);
        let cpu1 = self.cpu_snapshot();
        let pg_cpu = cpu1.postgres - cpu0.postgres;
        let tansu_cpu = cpu1.tansu - cpu0.tansu;
        let broker_cpu = cpu1.side - cpu0.side;
        let other_cpu =
            cpu1.cores_since(&cpu0).other * cpu1.at.duration_since(cpu0.at).as_secs_f64();
        let walsender_cpu = walsender.and_then(procs::pid_cpu_seconds);
        let marks = self.mark_statements(if mark { w.rows } else { 0 }).await?;
        let wal_written = workload::wal_insert_lsn(&self.db)
            .await?
            .saturating_sub(wal0);
        let secs = if mark {
            self.last_delivered(w.seq_after, w.seq_last).await? - secs_since_epoch(started_wall)
        } else {
            confirmed.duration_since(started).as_secs_f64()
        };
        self.stop_relay().await?;
        let d = Drain {
            rows: w.rows,
            wal_bytes: w.end_lsn.saturating_sub(w.start_lsn),
            wal_written,
            secs,
            startup_secs,
            relay_cpu,
            peak_rss_kib,
            pg_cpu,
            walsender_cpu,
            tansu_cpu,
            broker_cpu,
            other_cpu,
            marks,
        };
        let tansu = match (sink, &self.side_broker) {
            (Some(_), Some(b)) => format!(", {} CPU {:.1} s", b.name(), d.broker_cpu),
            _ => format!(", Tansu CPU {:.1} s", d.tansu_cpu),
        };
        println!(
            "bench:   {label}: {:.0} rows/s ({} rows, {:.0} MB of WAL, in {:.2} s incl. {:.2} s start-up); relay CPU {:.1} s ({:.1} s per 1M rows), peak RSS {:.0} MB; Postgres CPU {:.1} s (walsender {}){tansu}, other processes {:.1} s",
            d.rate(),
            d.rows,
            d.wal_bytes as f64 / 1e6,
            d.secs,
            d.startup_secs,
            d.relay_cpu,
            d.cpu_per_million(),
            d.peak_rss_kib as f64 / 1024.0,
            d.pg_cpu,
            d.walsender_cpu
                .map(|c| format!("{c:.1} s"))
                .unwrap_or_else(|| "?".into()),
            d.other_cpu
        );
        if let Some(m) = d.marks {
            println!(
                "bench:   {label}: {m}; WAL written meanwhile {:.0} MB",
                d.wal_written as f64 / 1e6
            );
        }
        Ok(d)
    }

    /// CPU seconds used so far by each process of the run.
    fn cpu_snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            relay: self
                .relay
                .as_ref()
                .and_then(RelayProc::cpu_seconds)
                .unwrap_or(0.0),
            postgres: self.pg.cpu_seconds(),
            tansu: self.tansu.cpu_seconds(),
            side: self.side_cpu(),
            // With reaped children (pg_recvlogical, psql).
            bench: procs::proc_stat(std::process::id())
                .map(|s| s.cpu_all())
                .unwrap_or(0.0),
            system: procs::system_busy_seconds(),
        }
    }

    /// Steady state: single-row transactions at fixed rates with the relay running (marking
    /// on). First the highest rate this machine sustains end to end (one session committing
    /// single-row transactions flat out next to the relay), then 25/50/75 % of it.
    async fn latency(&mut self, drain_rate: f64) -> Result<(SteadyMax, Vec<Latency>)> {
        let secs = self.plan.latency_secs;
        println!(
            "bench: steady state: single-row transactions, relay running with marking on, {secs} s per level"
        );
        self.start_relay(true, "latency")?;
        self.wait_streaming(false).await?;
        let writer = self.pg.connect().await?;

        println!(
            "bench:   max: one session commits single-row transactions as fast as it can for {secs} s"
        );
        let (sat, _) = self.offer(&writer, "max", 0.0, secs).await?;
        let e2e_secs = self.last_delivered(sat.seq_after, sat.seq_last).await? - sat.started_wall;
        let max = SteadyMax {
            rows: sat.rows,
            write_secs: sat.secs,
            e2e_secs,
            cores: sat.cores,
        };
        println!(
            "bench:   max: {:.0} rows/s end to end (written at {:.0} rows/s, last row marked {:.2} s after the start); CPU cores used: {}",
            max.rate(),
            max.rows as f64 / max.write_secs,
            max.e2e_secs,
            max.cores
        );
        println!(
            "bench:   (for comparison: 25/50/75 % of the backlog drain rate {} rows/s would be {:.0}/{:.0}/{:.0} rows/s)",
            report::thousands(drain_rate),
            drain_rate * 0.25,
            drain_rate * 0.5,
            drain_rate * 0.75
        );

        let mut levels = Vec::new();
        for pct in LOAD_LEVELS {
            let rate = max.rate() * f64::from(pct) / 100.0;
            let l = self
                .measure_level(&writer, &format!("load{pct}"), pct, rate)
                .await?;
            println!(
                "bench:   {pct} % load: offered {:.0} rows/s (target {:.0}); commit→ack p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms; commit→consumer p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms; commit→delivered_at p50 {:.1} ms, p99 {:.1} ms; CPU cores used: {}",
                l.offered_rate(),
                l.target_rate,
                l.to_ack.p50,
                l.to_ack.p99,
                l.to_ack.p999,
                l.to_consumer.p50,
                l.to_consumer.p99,
                l.to_consumer.p999,
                l.to_marked.p50,
                l.to_marked.p99,
                l.cores
            );
            levels.push(l);
        }
        self.stop_relay().await?;
        Ok((max, levels))
    }

    /// One latency level: single-row transactions with `type = ev_type` offered at `rate` per
    /// second for the plan's seconds; commit → ack from the relay's histogram, the rest from the
    /// consumer and the table.
    async fn measure_level(
        &mut self,
        writer: &tokio_postgres::Client,
        ev_type: &str,
        pct: u32,
        rate: f64,
    ) -> Result<Latency> {
        let secs = self.plan.latency_secs;
        println!("bench:   {ev_type}: offering {rate:.0} single-row transactions/s for {secs} s");
        let before = report::scrape_metrics(self.metrics_port)?;
        let (o, consumer) = self.offer(writer, ev_type, rate, secs).await?;
        let after = report::scrape_metrics(self.metrics_port)?;
        let mut l = self
            .latency_stats(&consumer, ev_type, pct, rate, &o)
            .await?;
        l.to_ack = report::Histogram::delta(
            &report::parse_histogram(&before, COMMIT_TO_ACK, ""),
            &report::parse_histogram(&after, COMMIT_TO_ACK, ""),
        )
        .percentiles()
        .ok_or_else(|| anyhow!("{ev_type}: the relay's commit→ack histogram did not move"))?;
        l.stages = report::Stages::between(&before, &after);
        if let Some(st) = &l.stages {
            println!(
                "bench:   {ev_type}: commit→ack by stage (walsender / relay / broker): p50 {} ms, p99 {} ms",
                st.describe(|p| p.p50),
                st.describe(|p| p.p99)
            );
        }
        Ok(l)
    }

    /// At-least-once against exactly-once, each on a fresh broker with transactions (Tansu has
    /// no EndTxn): a backlog drained with marking on, then single-row transactions at
    /// `latency_rate` (half the steady max measured on Tansu).
    async fn delivery_modes(&mut self, latency_rate: f64) -> Result<Vec<DeliveryRun>> {
        let rows = if self.plan.quick { 20_000 } else { 200_000 };
        let p = self.plan.partitions;
        let mut runs = Vec::new();
        for mode in ["at_least_once", "exactly_once"] {
            // A checkpoint logs the running transactions, so moving the slot past it also moves
            // its restart point: the drain then decodes only its own backlog, not the phases
            // before it again.
            self.sql("CHECKPOINT").await?;
            self.skip_relay_wal().await?;
            let broker = NoidaDb::start(
                &self.work.join(format!("noida-{mode}")),
                &self.work.join(format!("noida-{mode}.log")),
            )?;
            let brokers = broker.brokers();
            kafka::create_topics(&brokers, &[BACKLOG_TOPIC], p).await?;
            self.txn_broker = Some(broker);
            self.delivery = mode;
            println!("bench: delivery = {mode} (broker with transactions at {brokers})");
            let label = format!("backlog {mode}");
            let w =
                workload::write_backlog(&self.db, BACKLOG_AGG, self.next_row, rows, &label).await?;
            self.next_row += w.rows;
            self.vacuum(&format!("after writing the {mode} backlog"))
                .await?;
            let broker_cpu0 = self.txn_broker.as_ref().map_or(0.0, NoidaDb::cpu_seconds);
            let drain = self.drain(true, &w).await?;
            let broker_cpu =
                self.txn_broker.as_ref().map_or(0.0, NoidaDb::cpu_seconds) - broker_cpu0;
            self.skip_relay_wal().await?;
            self.start_relay(true, &format!("latency-{mode}"))?;
            self.wait_streaming(false).await?;
            let writer = self.pg.connect().await?;
            let latency = self
                .measure_level(&writer, &format!("half_{mode}"), 50, latency_rate)
                .await?;
            println!(
                "bench:   delivery = {mode}: drain {:.0} rows/s after a {:.2} s start-up (relay CPU {:.1} s per 1M rows, broker CPU {:.1} s); at {:.0} rows/s commit→ack p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms",
                drain.streaming_rate(),
                drain.startup_secs,
                drain.cpu_per_million(),
                broker_cpu,
                latency.offered_rate(),
                latency.to_ack.p50,
                latency.to_ack.p99,
                latency.to_ack.p999
            );
            self.stop_relay().await?;
            self.txn_broker = None;
            runs.push(DeliveryRun {
                mode,
                drain,
                latency,
                broker_cpu,
            });
        }
        self.delivery = "at_least_once";
        Ok(runs)
    }

    /// Other sinks: NATS JetStream and RabbitMQ, each on a private server started for its phase
    /// and stopped after it. For each, a fresh backlog (the same mix, smaller than the Kafka
    /// ones) read from WAL: first its rows sent by a plain publisher with the relay's client crate
    /// and guarantees (the sink limit), then drained by the relay with that sink, marking on.
    async fn other_sinks(&mut self) -> Result<Vec<OtherSink>> {
        let rows = if self.plan.quick { 20_000 } else { 200_000 };
        let started = Instant::now();
        let nats = self.nats_sink(rows).await?;
        let rabbitmq = self.rabbitmq_sink(rows).await?;
        println!(
            "bench: other sinks measured in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        Ok(vec![nats, rabbitmq])
    }

    /// A backlog for one of the other sinks, read by the relay from WAL: its slot is moved past
    /// everything before (after a checkpoint, which moves its restart point too).
    async fn other_backlog(&mut self, rows: u64, label: &str) -> Result<Written> {
        self.sql("CHECKPOINT").await?;
        self.skip_relay_wal().await?;
        let w = workload::write_backlog(&self.db, BACKLOG_AGG, self.next_row, rows, label).await?;
        self.next_row += w.rows;
        self.vacuum(&format!("after writing the {label}")).await?;
        Ok(w)
    }

    /// The relay drains `w` with `sink` (marking on).
    async fn drain_to(&mut self, sink: RelaySink, w: &Written) -> Result<Drain> {
        self.sink = sink;
        let drain = self.drain(true, w).await;
        self.sink = RelaySink::Kafka;
        drain
    }

    /// CPU seconds of the other-sinks brokers so far (the one running and those stopped).
    fn side_cpu(&self) -> f64 {
        self.side_cpu_done
            + self
                .side_broker
                .as_ref()
                .map_or(0.0, SideBroker::cpu_seconds)
    }

    /// Stops the other-sinks broker that runs, keeping its CPU seconds.
    fn stop_side_broker(&mut self) {
        if let Some(b) = self.side_broker.take() {
            self.side_cpu_done += b.cpu_seconds();
        }
    }

    async fn nats_sink(&mut self, rows: u64) -> Result<OtherSink> {
        let started = Instant::now();
        let server = NatsServer::start(&self.work.join("nats"), &self.work.join("nats.log"))?;
        let (url, version) = (server.url(), server.version.clone());
        self.side_broker = Some(SideBroker::Nats(server));
        println!(
            "bench: NATS JetStream: {version} at {url}, file storage under the work directory"
        );
        let w = self.other_backlog(rows, "NATS backlog").await?;
        let msgs = self.load_messages(&w).await?;
        let avg_payload =
            msgs.iter().map(|m| m.payload.len()).sum::<usize>() as f64 / msgs.len() as f64;
        println!(
            "bench: NATS sink limit: a plain async-nats JetStream publisher (the relay's connect, context and stream settings) publishes the same {} messages to stream {}, every PubAck awaited",
            msgs.len(),
            nats::SINK_STREAM
        );
        let cpu0 = self.side_cpu();
        let run = nats::sink_limit(&url, &msgs).await?;
        let publisher = Publisher {
            msgs: run.msgs,
            secs: run.secs,
            avg_payload,
            broker_cpu: self.side_cpu() - cpu0,
        };
        drop(msgs);
        println!(
            "bench:   NATS sink limit: {:.0} msgs/s ({} messages in {:.2} s; nats-server CPU {:.1} s)",
            publisher.rate(),
            publisher.msgs,
            publisher.secs,
            publisher.broker_cpu
        );
        // The relay's drain starts on a server holding nothing.
        nats::delete_stream(&url, nats::SINK_STREAM).await?;
        let drain = self
            .drain_to(RelaySink::Nats { url: url.clone() }, &w)
            .await?;
        let stream = outbox_relay::config::NatsConfig::default().stream;
        let stored = nats::stream_messages(&url, &stream).await?;
        ensure!(
            stored >= w.rows,
            "NATS: stream {stream} holds {stored} messages after the relay drained {} rows",
            w.rows
        );
        self.stop_side_broker();
        let phase_secs = started.elapsed().as_secs_f64();
        println!(
            "bench:   relay drain to nats: stream {stream} holds {stored} messages; {phase_secs:.0} s for the NATS phase"
        );
        Ok(OtherSink {
            sink: "nats",
            name: "NATS JetStream",
            server: version,
            publisher,
            drain,
            stored,
            phase_secs,
        })
    }

    async fn rabbitmq_sink(&mut self, rows: u64) -> Result<OtherSink> {
        let started = Instant::now();
        let node = RabbitMq::start(&self.work.join("rabbitmq"))?;
        let (url, version) = (node.url(), node.version.clone());
        let (conn, channel) = rabbit::open(&url, Duration::from_secs(60))
            .await
            .map_err(|e| anyhow!("{e:#}\n{}", node.log_tail(20)))?;
        self.side_broker = Some(SideBroker::Rabbitmq(node));
        rabbit::declare_queue(&channel).await?;
        println!(
            "bench: RabbitMQ: {version} at {url} (booted in {:.1} s), durable queue {} bound with '#' to exchange {}",
            started.elapsed().as_secs_f64(),
            rabbit::QUEUE,
            outbox_relay::config::RabbitmqConfig::default().exchange
        );
        let w = self.other_backlog(rows, "RabbitMQ backlog").await?;
        let msgs = self.load_messages(&w).await?;
        let avg_payload =
            msgs.iter().map(|m| m.payload.len()).sum::<usize>() as f64 / msgs.len() as f64;
        println!(
            "bench: RabbitMQ sink limit: a plain lapin publisher (a confirm-mode channel opened by the relay's open_channel) publishes the same {} messages persistent and mandatory, every confirm awaited",
            msgs.len()
        );
        let cpu0 = self.side_cpu();
        let run = rabbit::sink_limit(&url, &msgs).await?;
        let publisher = Publisher {
            msgs: run.msgs,
            secs: run.secs,
            avg_payload,
            broker_cpu: self.side_cpu() - cpu0,
        };
        drop(msgs);
        let queued = rabbit::queue_depth(&channel).await?;
        ensure!(
            queued == publisher.msgs,
            "RabbitMQ: queue {} holds {queued} messages after the sink limit confirmed {}",
            rabbit::QUEUE,
            publisher.msgs
        );
        println!(
            "bench:   RabbitMQ sink limit: {:.0} msgs/s ({} messages in {:.2} s; RabbitMQ CPU {:.1} s)",
            publisher.rate(),
            publisher.msgs,
            publisher.secs,
            publisher.broker_cpu
        );
        // The relay's drain starts on an empty queue.
        rabbit::purge(&channel).await?;
        let drain = self
            .drain_to(RelaySink::Rabbitmq { url: url.clone() }, &w)
            .await?;
        let stored = rabbit::queue_depth(&channel).await?;
        ensure!(
            stored >= w.rows,
            "RabbitMQ: queue {} holds {stored} messages after the relay drained {} rows",
            rabbit::QUEUE,
            w.rows
        );
        let _ = channel.close(200, "done".into()).await;
        let _ = conn.close(200, "done".into()).await;
        self.stop_side_broker();
        let phase_secs = started.elapsed().as_secs_f64();
        println!(
            "bench:   relay drain to rabbitmq: queue {} holds {stored} messages; {phase_secs:.0} s for the RabbitMQ phase",
            rabbit::QUEUE
        );
        Ok(OtherSink {
            sink: "rabbitmq",
            name: "RabbitMQ",
            server: version,
            publisher,
            drain,
            stored,
            phase_secs,
        })
    }

    /// Single-row transactions with `type = ev_type` offered at `rate` per second (0: as fast
    /// as one session can) for `secs`, into a topic of their own (aggregate type
    /// `latency-<ev_type>`) read by a consumer started for it; returns once every row was seen
    /// and marked. A second of rows of another type goes first, unmeasured: the relay looks the
    /// new topic up once.
    ///
    /// A topic per level, not one for all: Tansu's memory storage lists every stored batch of a
    /// partition on each fetch, under the lock its produce path needs, so a consumer tailing a
    /// topic holding the earlier levels' batches slows every produce (`bench/tansu-fetch-tail.py`
    /// measures it; BENCHMARKS.md gives the figures).
    async fn offer(
        &mut self,
        writer: &tokio_postgres::Client,
        ev_type: &str,
        rate: f64,
        secs: f64,
    ) -> Result<(Offered, LatencyConsumer)> {
        let agg = format!("{LATENCY_AGG}-{ev_type}");
        let topic = format!("outbox.event.{agg}");
        let brokers = self.kafka_brokers();
        kafka::create_topics(&brokers, &[topic.as_str()], self.plan.partitions).await?;
        let consumer = LatencyConsumer::start(&brokers, &topic, self.plan.partitions)?;
        let warmup = format!("warmup-{ev_type}");
        self.write_paced(writer, &consumer, &agg, &warmup, 200.0, 1.0)
            .await?;
        let o = self
            .write_paced(writer, &consumer, &agg, ev_type, rate, secs)
            .await?;
        let errors = consumer.errors();
        if !errors.is_empty() {
            println!("bench:   {ev_type}: the latency consumer reported errors: {errors:?}");
        }
        Ok((o, consumer))
    }

    /// Runs `bench_paced` (rows of aggregate type `agg`, type `ev_type`), reporting what
    /// `consumer` has seen every 3 s, then waits until every row was seen and marked.
    async fn write_paced(
        &mut self,
        writer: &tokio_postgres::Client,
        consumer: &LatencyConsumer,
        agg: &str,
        ev_type: &str,
        rate: f64,
        secs: f64,
    ) -> Result<Offered> {
        let seq_after = workload::last_seq(&self.db).await?;
        let cpu0 = self.cpu_snapshot();
        let started_wall = secs_since_epoch(SystemTime::now());
        let started = Instant::now();
        let first = self.next_row;
        let call = workload::paced(writer, agg, ev_type, first, rate, secs);
        tokio::pin!(call);
        let mut tick = tokio::time::interval(Duration::from_secs(3));
        tick.tick().await;
        let rows = loop {
            tokio::select! {
                r = &mut call => break r?,
                _ = tick.tick() => {
                    self.relay()?.check_alive()?;
                    println!(
                        "bench:     {ev_type}: {} rows seen by the consumer after {:.0} s",
                        consumer.count(ev_type),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        };
        let offer_secs = started.elapsed().as_secs_f64();
        self.next_row += rows;
        let seq_last = workload::last_seq(&self.db).await?;
        ensure!(
            (seq_last - seq_after) as u64 == rows,
            "{ev_type}: the writer reported {rows} rows, the seq sequence moved by {}",
            seq_last - seq_after
        );
        let deadline = Instant::now() + Duration::from_secs(180);
        while consumer.count(ev_type) < rows {
            self.relay()?.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{ev_type}: the consumer saw {} of {rows} rows 3 minutes after the load ended",
                    consumer.count(ev_type)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let end_lsn = workload::wal_insert_lsn(&self.db).await?;
        let label = match ev_type.strip_prefix("load") {
            Some(pct) => format!("{pct} % load"),
            None if ev_type == "max" => "steady max".to_owned(),
            None => ev_type.to_owned(),
        };
        self.wait_marked(seq_after, seq_last, end_lsn, &label)
            .await?;
        let cores = self.cpu_snapshot().cores_since(&cpu0);
        Ok(Offered {
            rows,
            secs: offer_secs,
            seq_after,
            seq_last,
            started_wall,
            cores,
        })
    }

    async fn latency_stats(
        &self,
        consumer: &LatencyConsumer,
        ev_type: &str,
        pct: u32,
        target_rate: f64,
        o: &Offered,
    ) -> Result<Latency> {
        // The row's commit time from its inserting transaction (the xid is in its headers: with
        // on_delivered = mark the relay's UPDATE gives the row a new xmin); delivered_at from
        // the view (the ledger's time of the row's batch).
        let db_rows = self
            .db
            .query(
                "SELECT id::text, \
                   (extract(epoch FROM pg_xact_commit_timestamp((headers->>'bench_xid')::xid)) * 1e6)::int8, \
                   (extract(epoch FROM delivered_at) * 1e6)::int8 \
                 FROM outbox_status WHERE seq > $1 AND seq <= $2",
                &[&o.seq_after, &o.seq_last],
            )
            .await
            .context("reading commit timestamps (track_commit_timestamp)")?;
        let mut commit = std::collections::HashMap::with_capacity(db_rows.len());
        let mut to_marked = Vec::with_capacity(db_rows.len());
        for r in &db_rows {
            let id: String = r.get(0);
            let committed: Option<i64> = r.get(1);
            let delivered: Option<i64> = r.get(2);
            let committed = committed.ok_or_else(|| {
                anyhow!("row {id} has no commit timestamp (track_commit_timestamp off?)")
            })?;
            if let Some(d) = delivered {
                to_marked.push((d - committed) as f64 / 1000.0);
            }
            commit.insert(id, committed);
        }
        let mut to_consumer = Vec::with_capacity(commit.len());
        let mut seen_ids = std::collections::HashSet::new();
        for s in consumer.seen(ev_type) {
            if !seen_ids.insert(s.id.clone()) {
                continue; // a duplicate: the first sighting counts
            }
            let c = commit.get(&s.id).ok_or_else(|| {
                anyhow!("the consumer saw id {} that is not a {ev_type} row", s.id)
            })?;
            to_consumer.push((s.at_us - c) as f64 / 1000.0);
        }
        ensure!(
            to_consumer.len() as u64 == o.rows && commit.len() as u64 == o.rows,
            "{ev_type}: {} rows in the table, {} seen by the consumer, {} offered",
            commit.len(),
            to_consumer.len(),
            o.rows
        );
        Ok(Latency {
            pct,
            target_rate,
            rows: o.rows,
            offer_secs: o.secs,
            to_ack: Percentiles::default(),
            stages: None,
            to_consumer: Percentiles::of(to_consumer),
            to_marked: Percentiles::of(to_marked),
            cores: o.cores,
        })
    }

    /// Peak RSS while one huge transaction streams through the relay (marking on).
    async fn single_transaction(&mut self) -> Result<Single> {
        let rows = self.plan.single_tx_rows;
        println!("bench: one transaction of {rows} rows through the relay (peak RSS)");
        self.start_relay(true, "single-transaction")?;
        self.wait_streaming(false).await?;
        let idle_rss_kib = self.relay()?.peak_rss_kib().unwrap_or(0);
        let relay_cpu0 = self.relay()?.cpu_seconds().unwrap_or(0.0);
        let w =
            workload::write_single_transaction(&self.db, SINGLE_AGG, self.next_row, rows).await?;
        self.next_row += rows;
        let committed = Instant::now();
        let committed_wall = SystemTime::now();
        println!(
            "bench:   written and committed in {:.1} s; waiting for the relay",
            w.secs
        );
        self.wait_confirmed(&w, "single transaction", committed)
            .await?;
        self.wait_marked(w.seq_after, w.seq_last, w.end_lsn, "single transaction")
            .await?;
        let relay = self.relay()?;
        let peak_rss_kib = relay.peak_rss_kib().unwrap_or(0);
        let relay_cpu = relay.cpu_seconds().unwrap_or(f64::NAN) - relay_cpu0;
        let secs =
            self.last_delivered(w.seq_after, w.seq_last).await? - secs_since_epoch(committed_wall);
        self.stop_relay().await?;
        let s = Single {
            rows,
            secs,
            peak_rss_kib,
            idle_rss_kib,
            relay_cpu,
        };
        println!(
            "bench:   single transaction: peak RSS {:.0} MB (idle {:.0} MB); commit→last row marked {:.2} s ({:.0} rows/s)",
            s.peak_rss_kib as f64 / 1024.0,
            s.idle_rss_kib as f64 / 1024.0,
            s.secs,
            s.rate()
        );
        Ok(s)
    }
}
