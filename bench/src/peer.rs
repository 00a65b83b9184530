//! The peer in the same run: pg-transactional-outbox 0.5.7 (npm) with a kafkajs 2.2.4
//! producer (acks=-1, one request in flight; not idempotent: Tansu 0.6.0 answers kafkajs'
//! InitProducerId v1 with UNKNOWN_SERVER_ERROR) to the same Tansu broker, `bench/peer/peer.cjs`. Its own
//! table (`peer_outbox`, the library's DatabaseSetup SQL), publication and slot; rows of the
//! same shape as the relay's backlog (the payload generator, 10,000 aggregates as message keys
//! and segments, the same transaction mix scaled down); run alone, after the relay's phases.
//! For each listener (replication, then polling): the backlog drain (rows/s, Postgres CPU s per
//! 1M rows, the peer's CPU and peak RSS), then single-row transactions at half its drain rate
//! with commit → broker ack measured by the peer itself (ack time − the row's `created_at`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, ensure};

use crate::kafka::{LatencyConsumer, Msg};
use crate::procs::{self, RelayProc};
use crate::report::{Latency, Peer, PeerLatency, Percentiles};
use crate::workload::{self, literal};
use crate::{Env, kafka, secs_since_epoch};

/// The topic the peer publishes to.
const PEER_TOPIC: &str = "peer.order";
/// The topic of the sink-alone latency run at the peer's load.
const SINK_LATENCY_TOPIC: &str = "bench.sink-latency";
/// The peer's rows per round: one 2,000-row transaction, 16 of 100 rows, 400 single-row ones —
/// the relay's backlog mix (50 / 40 / 10 % of the rows) at a fifth of its size.
pub const PEER_ROUND_ROWS: u64 = 4_000;
/// How long the peer may make no progress before its unprocessed rows count as left behind.
const STALL: Duration = Duration::from_secs(15);

/// The peer's workload procedures: the relay's backlog mix and paced single-row transactions,
/// into the peer's table; `created_at` is the table's default, `clock_timestamp()`.
const PEER_SQL: &str = r#"
CREATE OR REPLACE PROCEDURE peer_insert(ev_type text, first bigint, txs int, rows_per_tx int)
LANGUAGE plpgsql AS $$
DECLARE
  t int;
  i bigint := first;
BEGIN
  FOR t IN 1..txs LOOP
    INSERT INTO peer_outbox (id, aggregate_type, aggregate_id, message_type, segment, payload)
    SELECT gen_random_uuid(), 'order', 'order-' || (n % @AGGREGATES@), ev_type,
           'order-' || (n % @AGGREGATES@), bench_payload(n)
    FROM generate_series(i, i + rows_per_tx - 1) AS n;
    COMMIT;
    i := i + rows_per_tx;
  END LOOP;
END
$$;

CREATE OR REPLACE PROCEDURE peer_paced(ev_type text, first bigint, rate float8, seconds float8,
                                       INOUT written bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz := clock_timestamp();
  elapsed float8;
  ahead float8;
BEGIN
  written := 0;
  LOOP
    elapsed := extract(epoch FROM clock_timestamp() - t0);
    EXIT WHEN elapsed >= seconds;
    ahead := written / rate - elapsed;
    IF ahead > 0 THEN
      PERFORM pg_sleep(ahead);
      CONTINUE;
    END IF;
    INSERT INTO peer_outbox (id, aggregate_type, aggregate_id, message_type, segment, payload)
    VALUES (gen_random_uuid(), 'order', 'order-' || ((first + written) % @AGGREGATES@), ev_type,
            'order-' || ((first + written) % @AGGREGATES@), bench_payload(first + written));
    COMMIT;
    written := written + 1;
  END LOOP;
END
$$;
"#;

/// `node` and the peer's folder with its npm packages installed (scripts/setup installs them).
fn peer_dir(repo: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = repo.join("bench/peer");
    let node = Command::new("sh")
        .args(["-c", "command -v node"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .ok_or_else(|| anyhow!("node is not installed: run scripts/setup (it installs npm)"))?;
    ensure!(
        dir.join("node_modules/pg-transactional-outbox").is_dir()
            && dir.join("node_modules/kafkajs").is_dir(),
        "the peer's npm packages are missing in {}: run scripts/setup, or (cd bench/peer && npm ci)",
        dir.display()
    );
    Ok((node, dir))
}

impl Env {
    /// Both of the peer's listeners, one after the other, on backlogs of `rows` rows.
    pub(crate) async fn peers(&mut self, repo: &Path, rows: u64) -> Result<Vec<Peer>> {
        ensure!(
            rows > 0 && rows.is_multiple_of(PEER_ROUND_ROWS),
            "--peer-rows must be a positive multiple of {PEER_ROUND_ROWS}"
        );
        let (node, dir) = peer_dir(repo)?;
        println!(
            "bench: the peer: pg-transactional-outbox 0.5.7 + kafkajs 2.2.4 (acks=-1; not idempotent: Tansu refuses kafkajs' InitProducerId v1) to the same Tansu, its own table, publication and slot, one message at a time (its mutex controller); {rows}-row backlogs"
        );
        let out = self.peer_command(&node, &dir, "setup").output()?;
        ensure!(
            out.status.success(),
            "the peer's setup failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let sql = PEER_SQL.replace("@AGGREGATES@", &workload::AGGREGATES.to_string());
        self.db
            .batch_execute(&sql)
            .await
            .context("creating the peer's workload procedures")?;
        kafka::create_topics(&self.tansu.brokers(), &[PEER_TOPIC], self.plan.partitions).await?;
        let mut peers = Vec::new();
        for mode in ["replication", "polling"] {
            if mode == "polling" {
                // The polling listener reads no slot: drop it so it holds no WAL meanwhile.
                self.sql("SELECT pg_drop_replication_slot('peer_outbox_slot')")
                    .await?;
            }
            // The polling listener's rate falls as the table grows (63 rows/s on 20,000 rows
            // beside the replication run's, 318 s): one round of the mix.
            let rows = if mode == "polling" {
                rows.min(PEER_ROUND_ROWS)
            } else {
                rows
            };
            peers.push(self.peer(&node, &dir, mode, rows).await?);
        }
        Ok(peers)
    }

    /// `node peer.cjs <command>` pointed at this run's Postgres and Tansu.
    fn peer_command(&self, node: &Path, dir: &Path, command: &str) -> Command {
        let mut cmd = Command::new(node);
        cmd.arg(dir.join("peer.cjs"))
            .arg(command)
            .current_dir(dir)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.pg.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("PEER_BROKERS", self.tansu.brokers())
            .env("PEER_TOPIC", PEER_TOPIC)
            // Tansu 0.6.0 refuses kafkajs' InitProducerId v1 (see peer.cjs): not idempotent.
            .env("PEER_IDEMPOTENT", "false");
        cmd
    }

    /// One listener: the backlog drain, then half its drain rate in single-row transactions.
    async fn peer(
        &mut self,
        node: &Path,
        dir: &Path,
        mode: &'static str,
        rows: u64,
    ) -> Result<Peer> {
        let label = format!("peer ({mode} listener)");
        // Each phase its own message types: rows one phase left behind stay out of the next.
        let drain_type = format!("drain-{mode}");
        let load_type = format!("load-{mode}");
        let first = self.next_row;
        let started = Instant::now();
        let txs = rows / PEER_ROUND_ROWS;
        for round in 0..txs {
            let base = first + round * PEER_ROUND_ROWS;
            for (offset, n, size) in [(0, 1, 2_000), (2_000, 16, 100), (3_600, 400, 1)] {
                self.sql(&format!(
                    "CALL peer_insert({}, {}, {n}, {size})",
                    literal(&drain_type),
                    base + offset
                ))
                .await?;
            }
        }
        self.next_row += rows;
        println!(
            "bench: {label}: wrote {rows} rows ({} transactions) in {:.1} s",
            txs * 417,
            started.elapsed().as_secs_f64()
        );
        self.vacuum("after writing the peer's backlog").await?;

        let log = self.work.join(format!("peer-{mode}.log"));
        let mut cmd = self.peer_command(node, dir, "run");
        cmd.env("PEER_MODE", mode);
        let cpu0 = self.cpu_snapshot();
        let mut proc = RelayProc::spawn_command("the peer", cmd, &log)?;
        let started_wall = secs_since_epoch(SystemTime::now());
        let drain_left = self.peer_wait(&mut proc, &label, &drain_type, &log).await?;
        ensure!(
            drain_left < rows as i64,
            "{label}: processed none of the {rows} rows; last lines of {}:\n{}",
            log.display(),
            procs::tail(&log, 20)
        );
        let last: f64 = self
            .db
            .query_one(
                "SELECT extract(epoch FROM max(processed_at))::float8 FROM peer_outbox \
                 WHERE message_type = $1",
                &[&drain_type],
            )
            .await?
            .get(0);
        let secs = last - started_wall;
        let rows = rows - drain_left as u64;
        let cpu1 = self.cpu_snapshot();
        let peer_cpu = proc.cpu_seconds().unwrap_or(f64::NAN);
        let pg_cpu = cpu1.postgres - cpu0.postgres;
        let tansu_cpu = cpu1.tansu - cpu0.tansu;
        let rate = rows as f64 / secs;
        println!(
            "bench:   {label}: {rate:.0} rows/s ({rows} rows in {secs:.2} s incl. start-up); peer CPU {peer_cpu:.1} s, peak RSS {:.0} MB; Postgres CPU {pg_cpu:.1} s ({:.1} s per 1M rows), Tansu CPU {tansu_cpu:.1} s",
            proc.peak_rss_kib().unwrap_or(0) as f64 / 1024.0,
            pg_cpu * 1e6 / rows as f64
        );

        // Half its own drain rate, as the relay's 50 % level is half of its steady max.
        let load = rate * 0.5;
        let secs_load = self.plan.latency_secs;
        println!(
            "bench:   {label}: offering {load:.0} single-row transactions/s for {secs_load} s"
        );
        let writer = self.pg.connect().await?;
        let written: u64 = writer
            .simple_query(&format!(
                "CALL peer_paced({}, {}, {load}, {secs_load})",
                literal(&load_type),
                self.next_row
            ))
            .await
            .context("offering the peer single-row transactions")?
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                _ => None,
            })
            .ok_or_else(|| anyhow!("peer_paced returned no row count"))?;
        self.next_row += written;
        let load_left = self.peer_wait(&mut proc, &label, &load_type, &log).await?;
        let peak_rss_kib = proc.peak_rss_kib().unwrap_or(0);
        proc.terminate(Duration::from_secs(15)).await?;
        let summary = std::fs::read_to_string(&log)
            .ok()
            .and_then(|s| {
                s.lines()
                    .rev()
                    .find(|l| l.starts_with('{'))
                    .map(str::to_owned)
            })
            .ok_or_else(|| anyhow!("{label}: no summary line in {}", log.display()))?;
        // None when it processed none of them.
        let latency = parse_latency(&summary, &load_type);
        let acked = latency.as_ref().map_or(0, |l| l.n);
        // More acks than rows: a message sent again after a failed attempt (at-least-once).
        ensure!(
            acked + load_left as u64 >= written,
            "{label}: the peer acked {acked} load rows; {written} were written, {load_left} of them never processed"
        );
        match &latency {
            Some(l) => println!(
                "bench:   {label}: at {load:.0} rows/s: commit→ack p50 {:.1} ms, p99 {:.1} ms ({} acks)",
                l.p50, l.p99, l.n
            ),
            None => println!("bench:   {label}: at {load:.0} rows/s: it published none of them"),
        }
        Ok(Peer {
            mode,
            rows,
            secs,
            peer_cpu,
            peak_rss_kib,
            pg_cpu,
            tansu_cpu,
            load_rate: written as f64 / secs_load,
            latency,
            unprocessed: (drain_left + load_left) as u64,
        })
    }

    /// Waits until the peer processed every row of `message_type`, or made no progress for
    /// [`STALL`]: returns how many it left unprocessed. (Its replication listener drops a row
    /// it cannot find yet — decoded before the inserting transaction is visible to its
    /// `UPDATE … WHERE id IN (SELECT … FOR UPDATE NOWAIT)` — with the warning
    /// "Could not increment the started attempts field … MESSAGE_NOT_FOUND", and never sees it
    /// again: only its polling listener would pick such a row up.)
    async fn peer_wait(
        &self,
        proc: &mut RelayProc,
        label: &str,
        message_type: &str,
        log: &Path,
    ) -> Result<i64> {
        let mut pending = self.peer_pending(message_type).await?;
        let mut moved = Instant::now();
        while pending > 0 {
            proc.check_alive()?;
            if moved.elapsed() > STALL {
                println!(
                    "bench:   {label}: {pending} {message_type} rows left unprocessed ({:.0} s without progress; the peer's warnings are in {})",
                    STALL.as_secs_f64(),
                    log.display()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.peer_pending(message_type).await?;
            if now != pending {
                pending = now;
                moved = Instant::now();
            }
        }
        Ok(pending)
    }

    /// The relay at the peer's load: single-row transactions at `rate` (what the peer's
    /// replication listener was offered), commit → ack from the relay's histogram.
    pub(crate) async fn relay_at(&mut self, rate: f64) -> Result<Latency> {
        println!("bench: the relay at the peer's load: {rate:.0} single-row transactions/s");
        self.skip_relay_wal().await?;
        self.start_relay(true, "at-peer-load")?;
        self.wait_streaming(false).await?;
        let writer = self.pg.connect().await?;
        let l = self.measure_level(&writer, "peerload", 0, rate).await?;
        println!(
            "bench:   the relay at {:.0} rows/s: commit→ack p50 {:.1} ms, p99 {:.1} ms",
            l.offered_rate(),
            l.to_ack.p50,
            l.to_ack.p99
        );
        self.stop_relay().await?;
        Ok(l)
    }

    /// The sink alone at the peer's load: a plain producer with the relay's settings, paced at
    /// `rate` for the latency seconds, to a topic of its own; send → ack in ms.
    pub(crate) async fn sink_at(&mut self, rate: f64) -> Result<Percentiles> {
        println!(
            "bench: the sink alone at the peer's load: a plain producer (the relay's settings) at {rate:.0} msgs/s"
        );
        let brokers = self.tansu.brokers();
        kafka::create_topics(&brokers, &[SINK_LATENCY_TOPIC], self.plan.partitions).await?;
        let msgs: Vec<Msg> = (0..1_000_u64)
            .map(|i| Msg {
                id: format!("00000000-0000-4000-8000-{i:012}"),
                key: format!("order-{}", i % workload::AGGREGATES),
                event_type: "OrderPlaced".to_owned(),
                aggregatetype: "order".to_owned(),
                payload: workload::payload_json(i),
            })
            .collect();
        let secs = self.plan.latency_secs;
        // A consumer tails the topic meanwhile, as one tails the relay's: the broker serves the
        // same fetches in both runs.
        let consumer = LatencyConsumer::start(&brokers, SINK_LATENCY_TOPIC, self.plan.partitions)?;
        let acks = tokio::task::spawn_blocking(move || {
            kafka::sink_latency(&brokers, SINK_LATENCY_TOPIC, &msgs, rate, secs)
        })
        .await
        .context("the paced producer's thread")??;
        drop(consumer);
        let p = Percentiles::of(acks);
        println!(
            "bench:   the sink alone at {rate:.0} msgs/s: send→ack p50 {:.1} ms, p99 {:.1} ms",
            p.p50, p.p99
        );
        Ok(p)
    }

    /// The peer's rows of `message_type` not processed yet.
    async fn peer_pending(&self, message_type: &str) -> Result<i64> {
        Ok(self
            .db
            .query_one(
                "SELECT count(*) FROM peer_outbox WHERE message_type = $1 AND processed_at IS NULL",
                &[&message_type],
            )
            .await
            .context("counting the peer's unprocessed rows")?
            .get(0))
    }
}

/// `{"handled":N,"latency_ms":{"load50":{"n":…,"p50":…,"p99":…},…}}` → the entry for `ty`.
fn parse_latency(line: &str, ty: &str) -> Option<PeerLatency> {
    let at = line.find(&format!("\"{ty}\":{{"))?;
    let rest = &line[at..];
    let body = &rest[rest.find('{')? + 1..rest.find('}')?];
    let field = |name: &str| -> Option<f64> {
        body.split(',').find_map(|kv| {
            let (k, v) = kv.split_once(':')?;
            (k.trim_matches('"') == name).then(|| v.trim().parse().ok())?
        })
    };
    Some(PeerLatency {
        n: field("n")? as u64,
        p50: field("p50")?,
        p99: field("p99")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_summary_line_is_read_per_message_type() {
        let line = r#"{"handled":4100,"latency_ms":{"OrderPlaced":{"n":4000,"p50":900,"p99":2000},"load50":{"n":100,"p50":12,"p99":48.5}}}"#;
        let l = parse_latency(line, "load50").expect("load50");
        assert_eq!((l.n, l.p50, l.p99), (100, 12.0, 48.5));
        let d = parse_latency(line, "OrderPlaced").expect("drain");
        assert_eq!(d.n, 4000);
        assert!(parse_latency(line, "load75").is_none());
    }
}
