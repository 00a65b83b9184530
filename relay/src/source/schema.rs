//! Checks, before anything is built, that the database is set up for the relay: `wal_level`,
//! the outbox and state tables, the publication, the oracle (RocketMQ sink), and that the
//! relay's role can mark rows. Every failure names its fix.

use tokio_postgres::Client;

use super::SlotError;
use crate::config::{Config, OnDelivered};
use crate::quote::quote_ident;

/// Checks the database is set up for the relay; each failure names its fix.
pub async fn preflight(db: &Client, config: &Config) -> Result<(), SlotError> {
    let wal_level: String = db
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(|e| SlotError::query("SHOW wal_level", e))?
        .get(0);
    if wal_level != "logical" {
        return Err(SlotError::Setup(format!(
            "wal_level is '{wal_level}'; set wal_level=logical in postgresql.conf and restart Postgres"
        )));
    }
    let table = config.outbox_table_sql();
    require_table(db, &table, "outbox table", "outbox.schema/outbox.table").await?;
    let state = config.state_table_sql();
    require_table(db, &state, "relay state table", "outbox.state_table").await?;
    if config.sink == crate::config::SinkKind::Rocketmq {
        let schema = &config.outbox.schema;
        let found = crate::oracle::installed_functions(db, schema)
            .await
            .map_err(|e| SlotError::query("looking up the transaction oracle", e))?;
        if !["outbox_tx_begin", "outbox_tx_check"]
            .iter()
            .all(|f| found.iter().any(|x| x == f))
        {
            return Err(SlotError::Setup(format!(
                "sink = rocketmq needs the transaction oracle in schema {schema}: apply \
                 sql/003_transactions.sql there (psql \"$DATABASE_URL\" -f sql/003_transactions.sql)"
            )));
        }
    }
    let publication = &config.postgres.publication;
    let row = db
        .query_opt(
            "SELECT p.pubinsert, EXISTS (SELECT 1 FROM pg_publication_tables t \
                 WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[publication, &config.outbox.schema, &config.outbox.table],
        )
        .await
        .map_err(|e| SlotError::query("looking up the publication", e))?;
    match row {
        None => Err(SlotError::Setup(format!(
            "publication '{publication}' does not exist; run: CREATE PUBLICATION {} FOR TABLE {table} WITH (publish = 'insert, truncate');",
            quote_ident(publication)
        ))),
        Some(r) if !r.get::<_, bool>(0) => Err(SlotError::Setup(format!(
            "publication '{publication}' does not publish inserts; run: ALTER PUBLICATION {} SET (publish = 'insert, truncate');",
            quote_ident(publication)
        ))),
        Some(r) if !r.get::<_, bool>(1) => Err(SlotError::Setup(format!(
            "publication '{publication}' does not include {table}; run: ALTER PUBLICATION {} ADD TABLE {table};",
            quote_ident(publication)
        ))),
        Some(_) => Ok(()),
    }
}

/// Checks the relay can mark rows: the marking columns exist and its role may read the outbox
/// and update them. Without this a revoked grant or a misnamed column would only show once rows
/// are in flight, as a relay that never confirms anything.
pub async fn marking_preflight(db: &Client, config: &Config) -> Result<(), SlotError> {
    let c = &config.outbox.columns;
    let table = config.outbox_table_sql();
    let mut columns = vec![
        ("outbox.columns.failed_at", c.failed_at.as_str()),
        ("outbox.columns.attempts", c.attempts.as_str()),
        ("outbox.columns.last_error", c.last_error.as_str()),
    ];
    if config.pipeline.mark_delivered && config.outbox.on_delivered == OnDelivered::Mark {
        columns.insert(0, ("outbox.columns.delivered_at", c.delivered_at.as_str()));
    }
    let names: Vec<&str> = columns.iter().map(|(_, n)| *n).collect();
    let rows = db
        .query(
            "SELECT n.name, a.attname IS NOT NULL, \
                 a.attname IS NOT NULL AND has_column_privilege($1::text::regclass, n.name, 'UPDATE'), \
                 has_table_privilege($1::text::regclass, 'SELECT'), current_user::text \
             FROM unnest($2::text[]) AS n(name) \
             LEFT JOIN pg_attribute a ON a.attrelid = $1::text::regclass AND a.attname = n.name \
                 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table, &names],
        )
        .await
        .map_err(|e| SlotError::query("checking the marking columns and grants", e))?;
    for r in &rows {
        let name: String = r.get(0);
        let user: String = r.get(4);
        let key = columns
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(k, _)| *k)
            .unwrap_or("outbox.columns");
        if !r.get::<_, bool>(1) {
            return Err(SlotError::Setup(format!(
                "column {name} of {table} does not exist, and the relay marks rows with it; apply \
                 sql/001_outbox.sql or set {key} ({}) to the column's name",
                crate::config::env_name(key)
            )));
        }
        if !r.get::<_, bool>(3) {
            return Err(SlotError::Setup(format!(
                "role {user} may not SELECT from {table}; run: GRANT SELECT, UPDATE ON {table} TO {};",
                quote_ident(&user)
            )));
        }
        if !r.get::<_, bool>(2) {
            return Err(SlotError::Setup(format!(
                "role {user} may not UPDATE column {name} of {table}, so it cannot mark rows \
                 delivered or failed; run: GRANT SELECT, UPDATE ON {table} TO {};",
                quote_ident(&user)
            )));
        }
    }
    if config.pipeline.mark_delivered {
        match config.outbox.on_delivered {
            OnDelivered::Record => ledger_preflight(db, config).await?,
            OnDelivered::Delete => {
                let may: bool = db
                    .query_one(
                        "SELECT has_table_privilege($1::text::regclass, 'DELETE')",
                        &[&table],
                    )
                    .await
                    .map_err(|e| SlotError::query("checking the DELETE grant", e))?
                    .get(0);
                if !may {
                    return Err(SlotError::Setup(format!(
                        "outbox.on_delivered = \"delete\" deletes delivered rows, and the relay's \
                         role may not DELETE from {table}; run: GRANT DELETE ON {table} TO <role>;"
                    )));
                }
            }
            OnDelivered::Mark => {}
        }
    }
    Ok(())
}

/// `outbox.on_delivered = "record"`: the ledger table, the `seq` and `delivered_at` columns it
/// works with, the watermark column, and the grants to use them.
async fn ledger_preflight(db: &Client, config: &Config) -> Result<(), SlotError> {
    let c = &config.outbox.columns;
    let table = config.outbox_table_sql();
    let ledger = config.ledger_table_sql();
    let state = config.state_table_sql();
    let row = db
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, \
                 EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $2::text::regclass \
                         AND attname = $3 AND attnum > 0 AND NOT attisdropped), \
                 EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $2::text::regclass \
                         AND attname = $4 AND attnum > 0 AND NOT attisdropped), \
                 EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $5::text::regclass \
                         AND attname = 'delivered_below' AND NOT attisdropped), \
                 current_user::text",
            &[&ledger, &table, &c.seq, &c.delivered_at, &state],
        )
        .await
        .map_err(|e| SlotError::query("checking the delivery ledger", e))?;
    let user: String = row.get(4);
    let apply =
        "apply sql/005_delivery_ledger.sql (psql \"$DATABASE_URL\" -f sql/005_delivery_ledger.sql)";
    if !row.get::<_, bool>(0) {
        return Err(SlotError::Setup(format!(
            "the delivery ledger {ledger} does not exist (outbox.on_delivered = \"record\", the \
             default); {apply}, or set outbox.ledger_table, or outbox.on_delivered = \"mark\" \
             (RELAY_OUTBOX__ON_DELIVERED) to mark rows with an UPDATE as before"
        )));
    }
    for (ok, key, name) in [
        (row.get::<_, bool>(1), "outbox.columns.seq", &c.seq),
        (
            row.get::<_, bool>(2),
            "outbox.columns.delivered_at",
            &c.delivered_at,
        ),
    ] {
        if !ok {
            return Err(SlotError::Setup(format!(
                "column {name} of {table} does not exist, and the delivery ledger                  (outbox.on_delivered = \"record\") needs it; apply sql/001_outbox.sql, set {key}                  ({}) to the column's name, or set outbox.on_delivered = \"mark\"",
                crate::config::env_name(key)
            )));
        }
    }
    if !row.get::<_, bool>(3) {
        return Err(SlotError::Setup(format!(
            "{state} has no delivered_below column (the delivery ledger's watermark); {apply}"
        )));
    }
    let grants = db
        .query_one(
            "SELECT has_table_privilege($1::text::regclass, 'INSERT'), \
                    has_table_privilege($1::text::regclass, 'SELECT'), \
                    has_column_privilege($2::text::regclass, 'delivered_below', 'UPDATE')",
            &[&ledger, &state],
        )
        .await
        .map_err(|e| SlotError::query("checking the delivery ledger's grants", e))?;
    if !(grants.get::<_, bool>(0) && grants.get::<_, bool>(1) && grants.get::<_, bool>(2)) {
        return Err(SlotError::Setup(format!(
            "role {user} cannot record deliveries in {ledger}; run: GRANT SELECT, INSERT, DELETE \
             ON {ledger} TO {u}; GRANT UPDATE (delivered_below) ON {state} TO {u};",
            u = quote_ident(&user)
        )));
    }
    Ok(())
}

async fn require_table(db: &Client, table: &str, what: &str, keys: &str) -> Result<(), SlotError> {
    let exists: bool = db
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(|e| SlotError::query(&format!("looking up the {what}"), e))?
        .get(0);
    if exists {
        Ok(())
    } else {
        Err(SlotError::Setup(format!(
            "{what} {table} does not exist; apply sql/*.sql (psql -f) or set {keys}"
        )))
    }
}
