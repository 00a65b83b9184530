//! Outbox rows read back by SQL (the first-start snapshot's cursor, the parked rows of a blocked
//! aggregate), in the shape the pipeline takes from the WAL: every column as text, optional
//! columns the table lacks read as NULL.

use bytes::Bytes;
use tokio_postgres::{GenericClient, Row};

use crate::config::Config;
use crate::quote::quote_ident;
use crate::routing::RawRow;

/// Parked rows taken per aggregate and try; a longer backlog continues on the next turn.
pub const PARKED_PER_TRY: i64 = 1000;

/// The columns the outbox table has.
pub struct Columns {
    present: Vec<String>,
}

impl Columns {
    pub async fn read(
        db: &impl GenericClient,
        config: &Config,
    ) -> Result<Columns, tokio_postgres::Error> {
        let present = db
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass \
                 AND attnum > 0 AND NOT attisdropped",
                &[&config.outbox_table_sql()],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(Columns { present })
    }

    pub fn has(&self, name: &str) -> bool {
        self.present.iter().any(|p| p == name)
    }

    /// `"name"::text`, or `NULL::text` when the table lacks the column.
    fn text(&self, name: &str) -> String {
        if self.has(name) {
            format!("{}::text", quote_ident(name))
        } else {
            "NULL::text".to_owned()
        }
    }

    /// The select list [`raw_row`] reads: id, aggregatetype, aggregateid, type, payload,
    /// headers, topic, seq.
    pub fn select_list(&self, config: &Config) -> String {
        let c = &config.outbox.columns;
        [
            &c.id,
            &c.aggregatetype,
            &c.aggregateid,
            &c.event_type,
            &c.payload,
            &c.headers,
            &c.topic,
            &c.seq,
        ]
        .map(|n| self.text(n))
        .join(", ")
    }
}

/// A row selected with [`Columns::select_list`].
pub fn raw_row(r: &Row) -> RawRow {
    let text = |i: usize| r.get::<_, Option<String>>(i).map(Bytes::from);
    RawRow {
        id: text(0),
        aggregatetype: text(1),
        aggregateid: text(2),
        event_type: text(3),
        payload: text(4),
        headers: text(5),
        topic: text(6),
        seq: r.get::<_, Option<String>>(7).and_then(|s| s.parse().ok()),
        emitted: false,
    }
}

/// The aggregate's parked rows (failed, not delivered), oldest first, at most
/// [`PARKED_PER_TRY`].
pub async fn parked_rows(
    db: &impl GenericClient,
    config: &Config,
    aggregatetype: &str,
    aggregateid: &str,
) -> Result<Vec<RawRow>, tokio_postgres::Error> {
    let c = &config.outbox.columns;
    let columns = Columns::read(db, config).await?;
    let sql = format!(
        "SELECT {select} FROM {table} o WHERE {at}::text = $1 AND {aid}::text = $2 \
         AND {failed} IS NOT NULL AND NOT {delivered} ORDER BY o.{seq} LIMIT {PARKED_PER_TRY}",
        select = columns.select_list(config),
        at = quote_ident(&c.aggregatetype),
        aid = quote_ident(&c.aggregateid),
        table = config.outbox_table_sql(),
        failed = quote_ident(&c.failed_at),
        delivered = crate::delivered::is_delivered(config, "o"),
        seq = quote_ident(&c.seq),
    );
    let rows = db.query(&sql, &[&aggregatetype, &aggregateid]).await?;
    Ok(rows.iter().map(raw_row).collect())
}
