//! Turns an outbox row into a broker message: topic, key, headers, payload.
//!
//! Routing follows Debezium's outbox event router: the row's `topic` column wins when set, else
//! the topic template (default `outbox.event.{aggregatetype}`); the key is `aggregateid`; the value
//! is the `payload` JSON; headers are `id`, `type`, `aggregatetype` and every entry of the
//! `headers` column (a JSON object of strings). Rows reach this module from the WAL stream and from
//! the first-start snapshot in one shape, [`RawRow`], so both take the same path.

use bytes::Bytes;
use uuid::Uuid;

use crate::config::ColumnNames;
use crate::config::TopicTemplate;
use crate::replication::pgoutput::{Relation, Tuple, TupleValue};

/// One outbox row as text values, wherever it came from.
#[derive(Debug, Clone, Default)]
pub struct RawRow {
    pub id: Option<Bytes>,
    pub aggregatetype: Option<Bytes>,
    pub aggregateid: Option<Bytes>,
    pub event_type: Option<Bytes>,
    pub payload: Option<Bytes>,
    pub headers: Option<Bytes>,
    pub topic: Option<Bytes>,
    /// The row's `outbox.columns.seq` (insertion order), when the table has the column: what
    /// the delivery ledger records (`outbox.on_delivered = "record"`).
    pub seq: Option<i64>,
    /// A table-less outbox message (`pg_logical_emit_message`): there is no row to mark.
    pub emitted: bool,
}

impl RawRow {
    /// A table-less outbox message: the JSON object `outbox_emit()` writes (`id`,
    /// `aggregatetype`, `aggregateid`, `type`, `payload`, `headers`, `topic`). Content that is
    /// not such an object gives a row without those fields (dead-lettered by the routing, with
    /// the reason), under an id derived from the message's WAL position so that a message read
    /// again gets the same one.
    pub fn from_message(content: &[u8], lsn: u64) -> RawRow {
        let fallback_id = || {
            let mut name = b"outbox-relay message at ".to_vec();
            name.extend_from_slice(&lsn.to_be_bytes());
            Some(Bytes::from(
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &name).to_string(),
            ))
        };
        // Raw values: payload and headers keep the text Postgres wrote (as for a row's jsonb).
        let Ok(map) = serde_json::from_slice::<
            std::collections::HashMap<String, &serde_json::value::RawValue>,
        >(content) else {
            return RawRow {
                id: fallback_id(),
                payload: Some(Bytes::copy_from_slice(content)),
                emitted: true,
                ..RawRow::default()
            };
        };
        let json = |k: &str| match map.get(k).map(|v| v.get()) {
            Some("null") | None => None,
            Some(v) => Some(Bytes::copy_from_slice(v.as_bytes())),
        };
        let text = |k: &str| {
            let raw = map.get(k)?;
            match serde_json::from_str::<String>(raw.get()) {
                Ok(s) => Some(Bytes::from(s)),
                Err(_) => json(k),
            }
        };
        RawRow {
            id: text("id").or_else(fallback_id),
            aggregatetype: text("aggregatetype"),
            aggregateid: text("aggregateid"),
            event_type: text("type"),
            payload: json("payload"),
            headers: json("headers"),
            topic: text("topic"),
            seq: None,
            emitted: true,
        }
    }

    /// The row's id as a UUID, if it has a usable one.
    pub fn uuid(&self) -> Option<uuid::Uuid> {
        self.id
            .as_ref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| uuid::Uuid::parse_str(s).ok())
    }
}

pub use crate::sink::OutboxMessage;

/// A row that cannot become a message; the text says which row and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("outbox row {id}: {problem}")]
pub struct RowError {
    pub id: String,
    pub problem: String,
}

/// Which topics rows may publish to (`kafka.allowed_topics`). The relay's own topics (dead
/// letters, exactly-once progress) and Kafka's internal `__` topics are never a row's to write.
#[derive(Debug, Clone, Default)]
pub struct TopicPolicy {
    /// Exact names, and prefixes (entries that ended in `*`).
    names: Vec<String>,
    prefixes: Vec<String>,
    /// The relay's own topics.
    reserved: Vec<String>,
}

impl TopicPolicy {
    /// `allowed`: `kafka.allowed_topics`; empty means topics starting with `template_prefix`.
    pub fn new(allowed: &str, template_prefix: &str, reserved: Vec<String>) -> TopicPolicy {
        let mut policy = TopicPolicy {
            reserved,
            ..TopicPolicy::default()
        };
        for entry in allowed.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.strip_suffix('*') {
                Some(prefix) => policy.prefixes.push(prefix.to_owned()),
                None => policy.names.push(entry.to_owned()),
            }
        }
        if policy.names.is_empty() && policy.prefixes.is_empty() {
            policy.prefixes.push(template_prefix.to_owned());
        }
        policy
    }

    /// Whether a row may publish to `topic`; the error says why not and how to allow it.
    pub fn check(&self, topic: &str) -> Result<(), String> {
        if self.reserved.iter().any(|r| r == topic) {
            return Err(format!(
                "topic '{topic}' is the relay's own (dead-letter or exactly-once progress \
                 topic); a row may not publish there"
            ));
        }
        if topic.starts_with("__") {
            return Err(format!(
                "topic '{topic}' is internal to Kafka; a row may not publish there"
            ));
        }
        if self.names.iter().any(|n| n == topic)
            || self.prefixes.iter().any(|p| topic.starts_with(p.as_str()))
        {
            return Ok(());
        }
        Err(format!(
            "topic '{topic}' is not allowed; add it (or a prefix ending in '*') to \
             kafka.allowed_topics (RELAY_KAFKA__ALLOWED_TOPICS)"
        ))
    }
}

/// Builds messages from rows.
#[derive(Debug, Clone)]
pub struct Router {
    template: TopicTemplate,
    topics: TopicPolicy,
}

fn text(v: &Bytes) -> Result<&str, String> {
    std::str::from_utf8(v).map_err(|_| "value is not UTF-8".to_owned())
}

impl Router {
    pub fn new(template: TopicTemplate, topics: TopicPolicy) -> Self {
        Router { template, topics }
    }

    /// The topic the row is meant for, if it can be told (for dead-letter records).
    pub fn intended_topic(&self, row: &RawRow) -> Option<String> {
        if let Some(t) = row.topic.as_ref().filter(|t| !t.is_empty()) {
            return std::str::from_utf8(t).ok().map(str::to_owned);
        }
        let field = |v: &Option<Bytes>| {
            v.as_ref()
                .and_then(|b| std::str::from_utf8(b).ok())
                .map(str::to_owned)
        };
        Some(self.template.render(
            &field(&row.aggregatetype)?,
            &field(&row.aggregateid).unwrap_or_default(),
            &field(&row.event_type).unwrap_or_default(),
        ))
    }

    /// Builds the message for `row` (values are shared, not copied).
    pub fn route(&self, original: &RawRow) -> Result<OutboxMessage, RowError> {
        let row = original.clone();
        // Only for errors and warnings: not built for every row.
        let shown_id = || {
            original
                .id
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_else(|| "(id NULL)".into())
        };
        let fail = |problem: String| RowError {
            id: shown_id(),
            problem,
        };
        let required = |v: Option<Bytes>, name: &str| {
            v.ok_or_else(|| fail(format!("column '{name}' is NULL; it is required")))
        };
        let id_text = required(row.id, "id")?;
        let id = text(&id_text)
            .ok()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| fail("column 'id' is not a UUID".into()))?;
        let aggregatetype = required(row.aggregatetype, "aggregatetype")?;
        let aggregateid = required(row.aggregateid, "aggregateid")?;
        let event_type = required(row.event_type, "type")?;

        let topic = match row.topic.filter(|t| !t.is_empty()) {
            Some(t) => text(&t)
                .map_err(|e| fail(format!("column 'topic': {e}")))?
                .to_owned(),
            None => self.template.render(
                text(&aggregatetype).map_err(|e| fail(format!("column 'aggregatetype': {e}")))?,
                text(&aggregateid).map_err(|e| fail(format!("column 'aggregateid': {e}")))?,
                text(&event_type).map_err(|e| fail(format!("column 'type': {e}")))?,
            ),
        };

        self.topics.check(&topic).map_err(fail)?;

        let mut headers = vec![
            ("id".to_owned(), id_text),
            ("type".to_owned(), event_type),
            ("aggregatetype".to_owned(), aggregatetype),
        ];
        if let Some(h) = row.headers {
            let parsed: serde_json::Value = serde_json::from_slice(&h)
                .map_err(|e| fail(format!("column 'headers' is not JSON: {e}")))?;
            match parsed {
                serde_json::Value::Null => {}
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        // The relay's own headers say what the row is; the row cannot restate it.
                        if ["id", "type", "aggregatetype"]
                            .iter()
                            .any(|own| k.eq_ignore_ascii_case(own))
                        {
                            tracing::warn!(
                                row = %shown_id(),
                                header = %k,
                                "the row's headers column sets one of the relay's own headers \
                                 (id, type, aggregatetype); ignored"
                            );
                            continue;
                        }
                        match v {
                            serde_json::Value::String(s) => headers.push((k, Bytes::from(s))),
                            other => {
                                return Err(fail(format!(
                                    "column 'headers' must be a JSON object of strings; \
                                     key {k:?} holds {other}"
                                )));
                            }
                        }
                    }
                }
                other => {
                    return Err(fail(format!(
                        "column 'headers' must be a JSON object of strings, got {other}"
                    )));
                }
            }
        }
        Ok(OutboxMessage {
            id,
            topic,
            key: aggregateid,
            payload: row.payload,
            headers,
        })
    }
}

/// Where each configured column sits in a relation's tuples.
#[derive(Debug, Clone)]
pub struct ColumnMap {
    id: usize,
    aggregatetype: usize,
    aggregateid: usize,
    event_type: usize,
    payload: Option<usize>,
    headers: Option<usize>,
    topic: Option<usize>,
    seq: Option<usize>,
}

impl ColumnMap {
    /// Maps the outbox columns of `relation`; a required column that is missing is an error
    /// naming the config key to fix.
    pub fn new(relation: &Relation, names: &ColumnNames) -> Result<ColumnMap, String> {
        let find = |name: &str| relation.columns.iter().position(|c| c.name == name);
        let need = |name: &str, key: &str| {
            find(name).ok_or_else(|| {
                format!(
                    "table {}.{} has no column '{name}'; add it (see sql/) or set {key} ({}) to \
                     the column's name",
                    relation.namespace,
                    relation.name,
                    crate::config::env_name(key)
                )
            })
        };
        Ok(ColumnMap {
            id: need(&names.id, "outbox.columns.id")?,
            aggregatetype: need(&names.aggregatetype, "outbox.columns.aggregatetype")?,
            aggregateid: need(&names.aggregateid, "outbox.columns.aggregateid")?,
            event_type: need(&names.event_type, "outbox.columns.type")?,
            payload: find(&names.payload),
            headers: find(&names.headers),
            topic: find(&names.topic),
            seq: find(&names.seq),
        })
    }

    /// Picks the outbox values out of an inserted tuple.
    pub fn raw_row(&self, tuple: Tuple) -> RawRow {
        let mut values = tuple.0;
        let mut take = |i: Option<usize>| match i.and_then(|i| values.get_mut(i)) {
            Some(v) => match std::mem::replace(v, TupleValue::Null) {
                TupleValue::Text(b) => Some(b),
                TupleValue::Null | TupleValue::UnchangedToast => None,
            },
            None => None,
        };
        RawRow {
            id: take(Some(self.id)),
            aggregatetype: take(Some(self.aggregatetype)),
            aggregateid: take(Some(self.aggregateid)),
            event_type: take(Some(self.event_type)),
            payload: take(self.payload),
            headers: take(self.headers),
            topic: take(self.topic),
            seq: take(self.seq).and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok()),
            emitted: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::pgoutput::{PgOutput, encode};

    fn row(id: &str, at: &str, aid: &str) -> RawRow {
        RawRow {
            id: Some(Bytes::from(id.to_owned())),
            aggregatetype: Some(Bytes::from(at.to_owned())),
            aggregateid: Some(Bytes::from(aid.to_owned())),
            event_type: Some(Bytes::from_static(b"OrderCreated")),
            payload: Some(Bytes::from_static(b"{\"total\": 5}")),
            headers: None,
            topic: None,
            seq: None,
            emitted: false,
        }
    }

    const ID: &str = "5b3c8f5e-3f1a-4c1e-9a8e-0d6a1f2b3c4d";

    fn router() -> Router {
        Router::new(
            TopicTemplate::parse("outbox.event.{aggregatetype}").unwrap(),
            TopicPolicy::new("", "outbox.event.", vec!["outbox.dlq".into()]),
        )
    }

    #[test]
    fn routes_by_template_with_key_headers_and_payload() {
        let m = router().route(&row(ID, "order", "o-1")).unwrap();
        assert_eq!(m.topic, "outbox.event.order");
        assert_eq!(&m.key[..], b"o-1");
        assert_eq!(m.payload.as_deref(), Some(&b"{\"total\": 5}"[..]));
        assert_eq!(m.id, Uuid::parse_str(ID).unwrap());
        let names: Vec<_> = m.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["id", "type", "aggregatetype"]);
        assert_eq!(&m.headers[0].1[..], ID.as_bytes());
    }

    #[test]
    fn topic_column_overrides_template_and_headers_column_is_merged() {
        let mut r = row(ID, "order", "o-1");
        r.topic = Some(Bytes::from_static(b"custom.topic"));
        r.headers = Some(Bytes::from_static(
            b"{\"trace\": \"abc\", \"tenant\": \"t1\"}",
        ));
        let allowing = Router::new(
            TopicTemplate::parse("outbox.event.{aggregatetype}").unwrap(),
            TopicPolicy::new("outbox.event.*,custom.topic", "outbox.event.", vec![]),
        );
        let m = allowing.route(&r).unwrap();
        assert_eq!(m.topic, "custom.topic");
        assert!(router().route(&r).is_err(), "not allowed by default");
        assert!(
            m.headers
                .contains(&("trace".into(), Bytes::from_static(b"abc")))
        );
        assert!(
            m.headers
                .contains(&("tenant".into(), Bytes::from_static(b"t1")))
        );

        let mut r = row(ID, "order", "o-1");
        r.topic = Some(Bytes::new());
        assert_eq!(router().route(&r).unwrap().topic, "outbox.event.order");
    }

    #[test]
    fn rows_publish_only_to_allowed_topics_and_never_restate_the_relays_headers() {
        let policy = TopicPolicy::new(
            "",
            "outbox.event.",
            vec!["outbox.dlq".into(), "outbox-relay.progress".into()],
        );
        assert!(policy.check("outbox.event.order").is_ok());
        for refused in [
            "outbox.dlq",
            "outbox-relay.progress",
            "__consumer_offsets",
            "payments",
        ] {
            assert!(policy.check(refused).is_err(), "{refused}");
        }
        assert!(
            policy
                .check("payments")
                .unwrap_err()
                .contains("kafka.allowed_topics")
        );
        let listed = TopicPolicy::new(
            "payments, orders.*",
            "outbox.event.",
            vec!["outbox.dlq".into()],
        );
        assert!(listed.check("payments").is_ok() && listed.check("orders.eu").is_ok());
        assert!(
            listed.check("outbox.event.order").is_err(),
            "a list replaces the default"
        );
        let all = TopicPolicy::new("*", "outbox.event.", vec!["outbox.dlq".into()]);
        assert!(all.check("anything").is_ok());
        assert!(all.check("outbox.dlq").is_err() && all.check("__transaction_state").is_err());

        let mut r = row(ID, "order", "o-1");
        r.topic = Some(Bytes::from_static(b"outbox.dlq"));
        let e = router().route(&r).unwrap_err();
        assert!(e.problem.contains("relay's own"), "{e}");

        let mut r = row(ID, "order", "o-1");
        r.headers = Some(Bytes::from_static(
            b"{\"id\": \"forged\", \"Type\": \"Forged\", \"trace\": \"t\"}",
        ));
        let m = router().route(&r).unwrap();
        let names: Vec<_> = m.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["id", "type", "aggregatetype", "trace"]);
        assert_eq!(&m.headers[0].1[..], ID.as_bytes());
    }

    #[test]
    fn bad_rows_are_errors_naming_the_row() {
        let mut r = row(ID, "order", "o-1");
        r.headers = Some(Bytes::from_static(b"{\"n\": 1}"));
        let e = router().route(&r).unwrap_err();
        assert!(
            e.to_string().contains(ID) && e.problem.contains("object of strings"),
            "{e}"
        );

        let mut r = row(ID, "order", "o-1");
        r.headers = Some(Bytes::from_static(b"[1]"));
        assert!(router().route(&r).is_err());

        let mut r = row(ID, "order", "o-1");
        r.aggregateid = None;
        assert!(
            router()
                .route(&r)
                .unwrap_err()
                .problem
                .contains("aggregateid")
        );

        assert!(router().route(&row("not-a-uuid", "order", "o")).is_err());
    }

    #[test]
    fn column_map_follows_relation_and_reports_missing_columns() {
        let PgOutput::Relation(rel) = PgOutput::decode(encode::relation(
            1,
            "public",
            "outbox",
            &[
                "id",
                "extra",
                "aggregatetype",
                "aggregateid",
                "type",
                "payload",
                "seq",
            ],
        ))
        .unwrap() else {
            panic!()
        };
        let map = ColumnMap::new(&rel, &ColumnNames::default()).unwrap();
        let PgOutput::Insert { new, .. } = PgOutput::decode(encode::insert(
            1,
            &[
                Some(ID),
                Some("x"),
                Some("order"),
                Some("o-9"),
                Some("T"),
                None,
                Some("12345678901"),
            ],
        ))
        .unwrap() else {
            panic!()
        };
        let raw = map.raw_row(new);
        assert_eq!(raw.aggregateid.as_deref(), Some(&b"o-9"[..]));
        assert!(raw.payload.is_none() && raw.topic.is_none() && raw.headers.is_none());
        // The seq the delivery ledger records.
        assert_eq!(raw.seq, Some(12_345_678_901));

        let PgOutput::Relation(rel) =
            PgOutput::decode(encode::relation(1, "public", "outbox", &["id"])).unwrap()
        else {
            panic!()
        };
        let err = ColumnMap::new(&rel, &ColumnNames::default()).unwrap_err();
        assert!(
            err.contains("aggregatetype") && err.contains("RELAY_OUTBOX__COLUMNS__AGGREGATETYPE")
        );
    }

    #[test]
    fn an_emitted_message_becomes_a_row_and_bad_content_keeps_a_stable_id() {
        let content = br#"{"id": "9b2f7b0e-54d3-4c5e-9d7e-1f0d6c0a7a11", "aggregatetype": "order", "aggregateid": "42", "type": "OrderPlaced", "payload": {"n": 1, "s": "x"}, "headers": {"tenant": "acme"}, "topic": null}"#;
        let raw = RawRow::from_message(content, 7);
        assert!(raw.emitted);
        assert_eq!(
            raw.id.as_deref(),
            Some(&b"9b2f7b0e-54d3-4c5e-9d7e-1f0d6c0a7a11"[..])
        );
        assert_eq!(raw.aggregateid.as_deref(), Some(&b"42"[..]));
        assert_eq!(raw.event_type.as_deref(), Some(&b"OrderPlaced"[..]));
        // The payload keeps the text Postgres wrote.
        assert_eq!(raw.payload.as_deref(), Some(&br#"{"n": 1, "s": "x"}"#[..]));
        assert_eq!(raw.headers.as_deref(), Some(&br#"{"tenant": "acme"}"#[..]));
        assert!(raw.topic.is_none() && raw.seq.is_none());
        let msg = router().route(&raw).unwrap();
        assert_eq!(msg.topic, "outbox.event.order");

        let bad = RawRow::from_message(b"not json", 7);
        assert_eq!(
            bad.id,
            RawRow::from_message(b"other", 7).id,
            "id from the position"
        );
        assert_ne!(bad.id, RawRow::from_message(b"not json", 8).id);
        assert!(bad.uuid().is_some());
        let err = router().route(&bad).unwrap_err();
        assert!(err.problem.contains("aggregatetype"), "{err}");
    }
}
