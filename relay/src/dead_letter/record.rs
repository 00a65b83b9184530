//! The dead-letter record that takes a poison row's place: the row's key, payload (left out when
//! it may itself be too large) and headers, plus `dlq.original_topic`, `dlq.original_key`,
//! `dlq.error` and `dlq.attempts`. Published to `dead_letter.topic`; its acknowledgement marks the
//! row failed.

use bytes::Bytes;

use crate::config::Config;
use crate::routing::{OutboxMessage, RawRow, Router};

/// The dead-letter record of a message the broker rejected.
pub fn for_message(
    config: &Config,
    msg: &OutboxMessage,
    error: &str,
    attempts: u32,
) -> OutboxMessage {
    let mut headers: Vec<(String, Bytes)> = msg
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with("dlq."))
        .cloned()
        .collect();
    headers.push(("dlq.original_topic".into(), Bytes::from(msg.topic.clone())));
    finish(
        config,
        msg.id,
        msg.key.clone(),
        msg.payload.clone(),
        headers,
        error,
        attempts,
    )
}

/// The dead-letter record of a row that could not become a message; `None` without an id.
pub fn for_row(
    config: &Config,
    router: &Router,
    raw: &RawRow,
    error: &str,
) -> Option<OutboxMessage> {
    let id = raw.uuid()?;
    let mut headers = vec![("id".to_owned(), Bytes::from(id.to_string()))];
    for (name, value) in [
        ("type", &raw.event_type),
        ("aggregatetype", &raw.aggregatetype),
    ] {
        if let Some(v) = value {
            headers.push((name.to_owned(), v.clone()));
        }
    }
    if let Some(t) = router.intended_topic(raw) {
        headers.push(("dlq.original_topic".into(), Bytes::from(t)));
    }
    if let Some(h) = &raw.headers {
        headers.push(("dlq.original_headers".into(), h.clone()));
    }
    let key = raw.aggregateid.clone().unwrap_or_default();
    Some(finish(
        config,
        id,
        key,
        raw.payload.clone(),
        headers,
        error,
        0,
    ))
}

fn finish(
    config: &Config,
    id: uuid::Uuid,
    key: Bytes,
    payload: Option<Bytes>,
    mut headers: Vec<(String, Bytes)>,
    error: &str,
    attempts: u32,
) -> OutboxMessage {
    headers.push(("dlq.original_key".into(), key.clone()));
    headers.push(("dlq.error".into(), Bytes::from(error.to_owned())));
    headers.push(("dlq.attempts".into(), Bytes::from(attempts.to_string())));
    // A payload that may itself be too large for the broker is left out; its size is kept.
    let limit = usize::try_from(config.kafka.max_message_bytes / 2).unwrap_or(usize::MAX);
    let payload = match payload {
        Some(p) if p.len() > limit => {
            headers.push((
                "dlq.payload_omitted_bytes".into(),
                Bytes::from(p.len().to_string()),
            ));
            None
        }
        other => other,
    };
    OutboxMessage {
        id,
        topic: config.dead_letter.topic.clone(),
        key,
        payload,
        headers,
    }
}
