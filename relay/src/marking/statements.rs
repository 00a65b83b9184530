//! The SQL both kinds of marking share: what is written (a row delivered, or failed with a
//! note), the statements of one marker, and what one execution did.

use tokio_postgres::Client;
use uuid::Uuid;

use crate::sink::FailureNote;

/// One write the marking stage makes.
#[derive(Clone, Copy)]
pub(super) enum Mark<'a> {
    Delivered,
    /// Rows failed (dead-lettered or parked) with the same note.
    Failed(&'a FailureNote),
}

/// What one marking statement (or transaction) did.
#[derive(Default)]
pub(super) struct Executed {
    /// Rows neither marked now nor marked before: not visible (yet), or gone.
    pub(super) missing: Vec<Uuid>,
    /// Rows with half messages: marked (now, or by an earlier attempt whose outcome was lost),
    /// their oracle keys committed with the mark.
    pub(super) marked: Vec<Uuid>,
    /// Rows with half messages that were marked before (a repeat after a restart).
    pub(super) already: Vec<Uuid>,
    /// Rows whose half message a check-back settled as rolled back before it was marked.
    pub(super) fenced: Vec<Uuid>,
}

/// The statements of one [`Marker`].
pub(super) struct MarkSql<'a> {
    pub(super) delivered: &'a str,
    pub(super) failed: &'a str,
    pub(super) already: &'a str,
    pub(super) keys: &'a str,
    pub(super) begin: &'a str,
}

/// The marking UPDATE for `ids`; returns the rows it changed.
pub(super) async fn update(
    client: &Client,
    sql: &MarkSql<'_>,
    mark: Mark<'_>,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let rows = match mark {
        Mark::Delivered => client.query(sql.delivered, &[&ids]).await?,
        Mark::Failed(note) => {
            let attempts = i32::try_from(note.attempts).unwrap_or(i32::MAX);
            client
                .query(sql.failed, &[&ids, &attempts, &note.error])
                .await?
        }
    };
    Ok(rows.iter().map(|r| r.get::<_, Uuid>(0)).collect())
}

/// Of `rest` (rows the UPDATE did not change), those marked delivered before.
pub(super) async fn already_delivered(
    client: &Client,
    sql: &MarkSql<'_>,
    rest: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>, tokio_postgres::Error> {
    if rest.is_empty() {
        return Ok(Default::default());
    }
    let rows = client.query(sql.already, &[&rest]).await?;
    Ok(rows.iter().map(|r| r.get::<_, Uuid>(0)).collect())
}

/// The rows of `live` the UPDATE did not change.
pub(super) fn unchanged(live: &[Uuid], updated: &[Uuid]) -> Vec<Uuid> {
    if updated.len() == live.len() {
        return Vec::new();
    }
    let updated: std::collections::HashSet<&Uuid> = updated.iter().collect();
    live.iter()
        .filter(|id| !updated.contains(id))
        .copied()
        .collect()
}
