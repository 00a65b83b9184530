//! The outbox rows the benchmark writes, generated in Postgres (or, for COPY, here) so that
//! writing a million rows takes seconds, not minutes.
//!
//! Every row: `aggregatetype` per phase (one topic each), `aggregateid` one of 10,000 orders
//! (`order-<i mod 10000>`), `type` `OrderPlaced`, and a JSON payload of about 200 bytes (even `i`)
//! or about 1 KB (odd `i`). A backlog is written in rounds of 20,000 rows:
//! one 10,000-row transaction by `COPY … FROM STDIN`, 80 transactions of 100 rows by a multi-row
//! `INSERT … SELECT`, and 2,000 single-row transactions by `INSERT … VALUES` (a PL/pgSQL loop
//! committing after each row). By rows: 50 % / 40 % / 10 %; by transactions: 1 / 80 / 2,000.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Client;

/// Rows per round of the backlog mix.
pub const ROUND_ROWS: u64 = 20_000;
pub const COPY_TX_ROWS: u64 = 10_000;
pub const MULTI_TX_ROWS: u64 = 100;
pub const MULTI_TXS: u64 = 80;
pub const SINGLE_TXS: u64 = 2_000;
/// Distinct aggregates (`aggregateid`), i.e. message keys.
pub const AGGREGATES: u64 = 10_000;
pub const EVENT_TYPE: &str = "OrderPlaced";

/// Lengths of the `note` field that make the payload text about 200 B and about 1 KB.
const NOTE_SMALL: usize = 102;
const NOTE_LARGE: usize = 926;
const FILLER: &str = "The quick brown fox jumps over the lazy dog. ";

/// One line describing the mix, for the report.
pub fn mix_description() -> String {
    let n = |v: u64| {
        let s = v.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    format!(
        "Rounds of {} rows: 1 transaction of {} rows by COPY FROM STDIN (50 % of the rows), \
         {} transactions of {} rows by multi-row INSERT … SELECT (40 %), {} single-row \
         transactions by INSERT … VALUES (10 %); payloads alternate ~200 B / ~1 KB of JSON \
         (50/50 by row); {} aggregates (message keys)",
        n(ROUND_ROWS),
        n(COPY_TX_ROWS),
        MULTI_TXS,
        MULTI_TX_ROWS,
        n(SINGLE_TXS),
        n(AGGREGATES)
    )
}

/// The server-side generators. `bench_payload(i)` and [`payload_json`] produce the same jsonb.
const SETUP_SQL: &str = r#"
CREATE OR REPLACE FUNCTION bench_payload(i bigint) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT jsonb_build_object(
    'order_id', i,
    'customer', 'customer-' || (i % 9973),
    'currency', 'EUR',
    'total', round((i % 100000) / 100.0, 2),
    'note', substr(repeat('The quick brown fox jumps over the lazy dog. ', 30), 1,
                   CASE WHEN i % 2 = 0 THEN @SMALL@ ELSE @LARGE@ END))
$$;

-- txs transactions of rows_per_tx rows each, rows numbered from first; a commit after each.
CREATE OR REPLACE PROCEDURE bench_insert(agg_type text, ev_type text, first bigint, txs int, rows_per_tx int)
LANGUAGE plpgsql AS $$
DECLARE
  t int;
  i bigint;
BEGIN
  FOR t IN 0 .. txs - 1 LOOP
    i := first + t::bigint * rows_per_tx;
    IF rows_per_tx = 1 THEN
      INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
      VALUES (agg_type, 'order-' || (i % @AGGREGATES@), ev_type, bench_payload(i));
    ELSE
      INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
      SELECT agg_type, 'order-' || (g % @AGGREGATES@), ev_type, bench_payload(g)
      FROM generate_series(i, i + rows_per_tx - 1) g;
    END IF;
    COMMIT;
  END LOOP;
END
$$;

-- The same as bench_insert through the table-less outbox: outbox_emit (sql/006_emit.sql) writes
-- each event into the WAL; nothing goes to a table.
CREATE OR REPLACE PROCEDURE bench_emit(agg_type text, ev_type text, first bigint, txs int, rows_per_tx int)
LANGUAGE plpgsql AS $$
DECLARE
  t int;
  i bigint;
BEGIN
  FOR t IN 0 .. txs - 1 LOOP
    i := first + t::bigint * rows_per_tx;
    PERFORM outbox_emit(agg_type, 'order-' || (g % @AGGREGATES@), ev_type, bench_payload(g))
    FROM generate_series(i, i + rows_per_tx - 1) g;
    COMMIT;
  END LOOP;
END
$$;

-- Single-row transactions at a fixed rate (rate 0: as fast as this session can) for `seconds`
-- (open loop: a row due is written when due, however late the previous ones were), rows
-- numbered from first. Returns how many it wrote.
CREATE OR REPLACE PROCEDURE bench_paced(agg_type text, ev_type text, first bigint, rate float8,
                                        seconds float8, INOUT written bigint DEFAULT 0)
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
    IF rate > 0 THEN
      ahead := written / rate - elapsed;
      IF ahead > 0 THEN
        PERFORM pg_sleep(ahead);
        CONTINUE;
      END IF;
    END IF;
    -- The inserting transaction's id goes into the row (and so into a header): the relay's
    -- UPDATE gives the row a new xmin, and the commit timestamp is looked up by this id.
    INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers)
    VALUES (agg_type, 'order-' || ((first + written) % @AGGREGATES@), ev_type,
            bench_payload(first + written),
            jsonb_build_object('bench_xid', pg_current_xact_id()::text));
    COMMIT;
    written := written + 1;
  END LOOP;
END
$$;
"#;

/// Creates the generator functions and checks they agree with [`payload_json`].
pub async fn install(client: &Client) -> Result<()> {
    let sql = SETUP_SQL
        .replace("@SMALL@", &NOTE_SMALL.to_string())
        .replace("@LARGE@", &NOTE_LARGE.to_string())
        .replace("@AGGREGATES@", &AGGREGATES.to_string());
    client
        .batch_execute(&sql)
        .await
        .context("creating the workload functions (bench_payload, bench_insert, bench_paced)")?;
    for i in [0_i64, 1, 7, 99_999, 123_456_789] {
        let same: bool = client
            .query_one(
                "SELECT bench_payload($1::bigint) = $2::text::jsonb",
                &[&i, &payload_json(i as u64)],
            )
            .await
            .context("checking the payload generators")?
            .get(0);
        ensure!(
            same,
            "payload generators disagree for row {i}: the COPY rows would differ from the INSERT rows"
        );
    }
    Ok(())
}

/// The payload of row `i` as JSON text (what `bench_payload(i)` returns, before normalisation).
pub fn payload_json(i: u64) -> String {
    let note_len = if i.is_multiple_of(2) {
        NOTE_SMALL
    } else {
        NOTE_LARGE
    };
    let filler = FILLER.repeat(30);
    let v = i % 100_000;
    format!(
        r#"{{"order_id": {i}, "customer": "customer-{}", "currency": "EUR", "total": {}.{:02}, "note": "{}"}}"#,
        i % 9973,
        v / 100,
        v % 100,
        &filler[..note_len]
    )
}

/// What a write left in the table.
#[derive(Debug, Clone)]
pub struct Written {
    pub rows: u64,
    pub transactions: u64,
    /// `seq` range (first, last], as the identity column numbered them.
    pub seq_after: i64,
    pub seq_last: i64,
    /// The WAL insert positions before the first and after the last commit.
    pub start_lsn: u64,
    pub end_lsn: u64,
    pub secs: f64,
}

/// The last `seq` handed out (0 before the first row).
pub async fn last_seq(client: &Client) -> Result<i64> {
    let seq_name: String = client
        .query_one("SELECT pg_get_serial_sequence('outbox', 'seq')", &[])
        .await
        .context("looking up the seq sequence of the outbox table")?
        .get(0);
    let row = client
        .query_one(
            &format!("SELECT last_value, is_called FROM {seq_name}"),
            &[],
        )
        .await
        .context("reading the seq sequence")?;
    Ok(if row.get::<_, bool>(1) { row.get(0) } else { 0 })
}

pub async fn wal_insert_lsn(client: &Client) -> Result<u64> {
    let v: i64 = client
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
            &[],
        )
        .await
        .context("reading pg_current_wal_insert_lsn()")?
        .get(0);
    Ok(v as u64)
}

/// Writes `rows` (a multiple of [`ROUND_ROWS`]) outbox rows in the backlog mix, numbered from
/// `first`, with `aggregatetype = agg_type`.
pub async fn write_backlog(
    client: &Client,
    agg_type: &str,
    first: u64,
    rows: u64,
    label: &str,
) -> Result<Written> {
    ensure!(
        rows > 0 && rows.is_multiple_of(ROUND_ROWS),
        "backlog rows must be a positive multiple of {ROUND_ROWS}, got {rows}"
    );
    let seq_after = last_seq(client).await?;
    let start_lsn = wal_insert_lsn(client).await?;
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut i = first;
    let mut transactions = 0;
    let rounds = rows / ROUND_ROWS;
    for round in 0..rounds {
        copy_rows(client, agg_type, i, COPY_TX_ROWS).await?;
        i += COPY_TX_ROWS;
        call_insert(client, agg_type, EVENT_TYPE, i, MULTI_TXS, MULTI_TX_ROWS).await?;
        i += MULTI_TXS * MULTI_TX_ROWS;
        call_insert(client, agg_type, EVENT_TYPE, i, SINGLE_TXS, 1).await?;
        i += SINGLE_TXS;
        transactions += 1 + MULTI_TXS + SINGLE_TXS;
        if last_print.elapsed().as_secs_f64() >= 3.0 || round + 1 == rounds {
            last_print = Instant::now();
            let done = (round + 1) * ROUND_ROWS;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "bench:   {label}: {done}/{rows} rows written ({:.0} rows/s)",
                done as f64 / secs
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let end_lsn = wal_insert_lsn(client).await?;
    let seq_last = last_seq(client).await?;
    ensure!(
        (seq_last - seq_after) as u64 == rows,
        "expected {rows} new rows in outbox, the seq sequence moved by {}",
        seq_last - seq_after
    );
    Ok(Written {
        rows,
        transactions,
        seq_after,
        seq_last,
        start_lsn,
        end_lsn,
        secs,
    })
}

/// Writes `rows` events through the table-less outbox (`outbox_emit`), numbered from `first`, in
/// transactions of 100: the same payloads as a backlog, nothing in a table.
pub async fn write_emitted(
    client: &Client,
    agg_type: &str,
    first: u64,
    rows: u64,
    label: &str,
) -> Result<Written> {
    const PER_TX: u64 = 100;
    ensure!(
        rows > 0 && rows.is_multiple_of(PER_TX),
        "emitted rows must be a positive multiple of {PER_TX}, got {rows}"
    );
    let seq = last_seq(client).await?;
    let start_lsn = wal_insert_lsn(client).await?;
    let started = Instant::now();
    let txs = rows / PER_TX;
    let chunk = 1_000u64.min(txs);
    let mut done = 0;
    while done < txs {
        let n = chunk.min(txs - done);
        client
            .batch_execute(&format!(
                "CALL bench_emit({}, {}, {}, {n}, {PER_TX})",
                literal(agg_type),
                literal(EVENT_TYPE),
                first + done * PER_TX
            ))
            .await
            .with_context(|| format!("{label}: emitting {n} transactions of {PER_TX} events"))?;
        done += n;
    }
    let secs = started.elapsed().as_secs_f64();
    let end_lsn = wal_insert_lsn(client).await?;
    ensure!(
        last_seq(client).await? == seq,
        "{label}: outbox_emit wrote rows into the outbox table"
    );
    Ok(Written {
        rows,
        transactions: txs,
        seq_after: seq,
        seq_last: seq,
        start_lsn,
        end_lsn,
        secs,
    })
}

/// Writes `rows` rows numbered from `first` as ONE transaction (multi-row INSERT … SELECT).
pub async fn write_single_transaction(
    client: &Client,
    agg_type: &str,
    first: u64,
    rows: u64,
) -> Result<Written> {
    let seq_after = last_seq(client).await?;
    let start_lsn = wal_insert_lsn(client).await?;
    let started = Instant::now();
    let n = client
        .execute(
            &format!(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                 SELECT $1, 'order-' || (g % {AGGREGATES}), $2, bench_payload(g) \
                 FROM generate_series($3::bigint, $4::bigint) g"
            ),
            &[
                &agg_type,
                &EVENT_TYPE,
                &(first as i64),
                &((first + rows - 1) as i64),
            ],
        )
        .await
        .with_context(|| format!("writing one transaction of {rows} rows"))?;
    ensure!(n == rows, "inserted {n} rows, expected {rows}");
    let secs = started.elapsed().as_secs_f64();
    let end_lsn = wal_insert_lsn(client).await?;
    Ok(Written {
        rows,
        transactions: 1,
        seq_after,
        seq_last: last_seq(client).await?,
        start_lsn,
        end_lsn,
        secs,
    })
}

async fn call_insert(
    client: &Client,
    agg_type: &str,
    ev_type: &str,
    first: u64,
    txs: u64,
    rows_per_tx: u64,
) -> Result<()> {
    // Simple protocol: a procedure that commits must be the top-level statement.
    client
        .batch_execute(&format!(
            "CALL bench_insert({}, {}, {first}, {txs}, {rows_per_tx})",
            literal(agg_type),
            literal(ev_type)
        ))
        .await
        .with_context(|| format!("writing {txs} transactions of {rows_per_tx} rows"))
}

/// One transaction of `rows` rows by `COPY outbox (…) FROM STDIN` (text format).
async fn copy_rows(client: &Client, agg_type: &str, first: u64, rows: u64) -> Result<()> {
    if agg_type.contains(['\t', '\n', '\\']) {
        bail!("aggregatetype {agg_type:?} cannot be written by COPY text format as is");
    }
    let sink = client
        .copy_in("COPY outbox (aggregatetype, aggregateid, type, payload) FROM STDIN")
        .await
        .context("starting COPY outbox FROM STDIN")?;
    futures_util::pin_mut!(sink);
    let mut buf = String::with_capacity(512 * 1024);
    for i in first..first + rows {
        let _ = writeln!(
            buf,
            "{agg_type}\torder-{}\t{EVENT_TYPE}\t{}",
            i % AGGREGATES,
            payload_json(i)
        );
        if buf.len() >= 256 * 1024 {
            sink.send(Bytes::from(std::mem::take(&mut buf)))
                .await
                .context("sending COPY data")?;
            buf.reserve(512 * 1024);
        }
    }
    if !buf.is_empty() {
        sink.send(Bytes::from(buf))
            .await
            .context("sending COPY data")?;
    }
    let n = sink.finish().await.context("finishing COPY")?;
    ensure!(n == rows, "COPY wrote {n} rows, expected {rows}");
    Ok(())
}

/// Offers single-row transactions at `rate` per second (0: flat out) for `seconds`
/// (server-side pacing); returns how many rows were written.
pub async fn paced(
    client: &Client,
    agg_type: &str,
    ev_type: &str,
    first: u64,
    rate: f64,
    seconds: f64,
) -> Result<u64> {
    // Simple protocol: a procedure that commits must be the top-level statement.
    let messages = client
        .simple_query(&format!(
            "CALL bench_paced({}, {}, {first}, {rate}, {seconds})",
            literal(agg_type),
            literal(ev_type)
        ))
        .await
        .with_context(|| format!("offering {rate:.0} rows/s for {seconds} s"))?;
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("bench_paced returned no row count"))
}

/// A SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_about_200_bytes_and_1_kb() {
        let small = payload_json(2).len();
        let large = payload_json(3).len();
        assert!((180..=230).contains(&small), "small payload {small} B");
        assert!((980..=1060).contains(&large), "large payload {large} B");
    }

    #[test]
    fn the_mix_adds_up_to_a_round() {
        assert_eq!(
            COPY_TX_ROWS + MULTI_TXS * MULTI_TX_ROWS + SINGLE_TXS,
            ROUND_ROWS
        );
    }
}
