//! Exactly-once delivery into Kafka (`delivery = "exactly_once"`): the transactional producer's
//! settings, the progress topic, and reading the last committed position back at start.
//!
//! Each Kafka transaction holds a batch of messages and one progress record (key: the slot name;
//! value: [`SourcePosition`] as JSON) in `exactly_once.progress_topic`. Both become visible to
//! `read_committed` consumers together or not at all. At start, after `init_transactions` has
//! fenced any older relay with the same `transactional.id` and aborted its open transaction, the
//! relay reads the slot's last committed record and does not send again what it covers.

use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::exactly_once::position::SourcePosition;

/// Turns an idempotent producer's properties into a transactional producer's.
pub fn apply_transactional(c: &mut ClientConfig, config: &Config) {
    let e = &config.exactly_once;
    // librdkafka requires message.timeout.ms <= transaction.timeout.ms; 0 ("forever") is not.
    let message_timeout = match config.kafka.message_timeout_ms {
        0 => e.transaction_timeout_ms,
        t => t.min(e.transaction_timeout_ms),
    };
    c.set("transactional.id", &e.transactional_id)
        .set(
            "transaction.timeout.ms",
            e.transaction_timeout_ms.to_string(),
        )
        .set("message.timeout.ms", message_timeout.to_string());
}

/// Whether `code` means a newer producer with the same `transactional.id` took over.
pub fn is_fencing(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

/// Client properties for connecting to the cluster (security settings passed through).
pub fn connection_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in &config.kafka.properties {
        if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
            c.set(k, v);
        }
    }
    c
}

/// Reads the last committed progress record of this relay's slot from the progress topic
/// (`read_committed`, from the end backwards). `None` when there is none yet. Blocking.
pub fn read_committed_position(
    config: &Config,
    timeout: Duration,
) -> Result<Option<SourcePosition>, String> {
    let topic = &config.exactly_once.progress_topic;
    let slot = &config.postgres.slot;
    let mut cc = connection_config(config);
    cc.set(
        "group.id",
        format!("{}.progress-reader", config.exactly_once.transactional_id),
    )
    .set("enable.auto.commit", "false")
    .set("isolation.level", "read_committed")
    .set("enable.partition.eof", "true");
    let consumer: BaseConsumer = cc
        .create()
        .map_err(|e| format!("cannot create a consumer for the progress topic: {e}"))?;
    let (low, high) = match consumer.fetch_watermarks(topic, 0, timeout) {
        Ok(w) => w,
        Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownPartition))
        | Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
            return Ok(None);
        }
        Err(e) => return Err(format!("cannot read the progress topic '{topic}': {e}")),
    };
    if high <= low {
        return Ok(None);
    }
    // The last record is almost always this slot's (one relay per progress topic is usual);
    // look further back only when it is not.
    let mut window: i64 = 64;
    loop {
        let start = high.saturating_sub(window).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(start))
            .and_then(|()| consumer.assign(&tpl))
            .map_err(|e| format!("cannot read the progress topic '{topic}': {e}"))?;
        let mut found = None;
        let deadline = Instant::now() + timeout;
        loop {
            match consumer.poll(Duration::from_millis(200)) {
                None if Instant::now() >= deadline => {
                    return Err(format!(
                        "reading the progress topic '{topic}' from offset {start} did not reach its end within {timeout:?}"
                    ));
                }
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => {
                    return Err(format!("cannot read the progress topic '{topic}': {e}"));
                }
                Some(Ok(m)) if m.key() == Some(slot.as_bytes()) => {
                    let position = SourcePosition::from_record(
                        m.payload().unwrap_or_default(),
                        slot,
                        &config.exactly_once.transactional_id,
                    )
                        .map_err(|e| {
                            format!(
                                "the progress topic '{topic}' holds, at offset {}, a record for slot '{slot}' that \
                                 cannot be read ({e}); it is not this relay's: choose another \
                                 exactly_once.progress_topic",
                                m.offset()
                            )
                        })?;
                    found = Some(position);
                }
                Some(Ok(_)) => {} // another slot's relay shares the topic
            }
        }
        if found.is_some() || start == low {
            return Ok(found);
        }
        window = window.saturating_mul(8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactional_producer_gets_a_bounded_message_timeout() {
        let mut config = Config::default();
        config.exactly_once.transactional_id = "relay-a".into();
        config.exactly_once.transaction_timeout_ms = 30_000;
        let mut c = crate::sink::kafka::producer_config(&config.kafka, 1_000);
        assert_eq!(c.get("message.timeout.ms"), Some("0"));
        apply_transactional(&mut c, &config);
        assert_eq!(c.get("transactional.id"), Some("relay-a"));
        assert_eq!(c.get("message.timeout.ms"), Some("30000"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        config.kafka.message_timeout_ms = 5_000;
        apply_transactional(&mut c, &config);
        assert_eq!(c.get("message.timeout.ms"), Some("5000"));
    }
}
