//! The RabbitMQ sink (AMQP 0-9-1, the `lapin` client): each row is published **persistent**
//! (`delivery_mode = 2`) and **`mandatory`** to `rabbitmq.exchange` with the routing key
//! `rabbitmq.routing_key` renders (`{aggregatetype}.{type}`), on one channel in **confirm
//! mode**: it counts as sent only when the broker acks it.
//!
//! - An ack that comes with the message returned (basic.return: no queue is bound for it) is a
//!   refusal: tried `dead_letter.max_attempts` times, then dead-lettered and the row marked
//!   failed. So is a message larger than `rabbitmq.max_message_bytes` (refused before it is sent:
//!   the broker would close the channel, failing every message in flight on it).
//! - A nack, a confirm not received in `rabbitmq.ack_timeout_ms`, a closed channel or a lost
//!   connection are sent again with backoff, without limit, on a new connection: everything
//!   unconfirmed is republished (consumers deduplicate on `message_id`, the outbox id).
//! - Dead-letter records go through the default exchange to the durable queue named
//!   `dead_letter.topic` (declared at start with `rabbitmq.declare`), so they are routable by
//!   construction.
//! - Order: one channel, publishes in commit order; RabbitMQ keeps a channel's publishes in order
//!   into each queue. A message sent again after a failure may land after later ones.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind, PublisherConfirm};
use tokio::sync::{Mutex, mpsc};

use super::confirm::{Attempt, InFlight};
use super::{AckToken, Delivery, OutboxMessage, Sink, SinkError};
use crate::config::{Config, RabbitmqConfig, TopicTemplate};

/// Connects, opens a channel in confirm mode and (with `rabbitmq.declare`) declares the exchange
/// and the dead-letter queue `dead_letter_queue`.
pub async fn open_channel(
    config: &RabbitmqConfig,
    dead_letter_queue: &str,
) -> Result<(lapin::Connection, Channel), String> {
    let where_ = crate::config::redact_url(&config.url);
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(&config.url, lapin::ConnectionProperties::default()),
    )
    .await
    .map_err(|_| format!("RabbitMQ at {where_} did not answer within 10 s"))?
    .map_err(|e| {
        format!(
            "cannot connect to RabbitMQ at {where_}: {e}; check rabbitmq.url (RELAY_RABBITMQ__URL), \
             the user's password and vhost, and that the broker is up"
        )
    })?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel on RabbitMQ at {where_}: {e}"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("RabbitMQ at {where_} refused publisher confirms: {e}"))?;
    if config.declare {
        let kind = match config.exchange_type.as_str() {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            _ => ExchangeKind::Topic,
        };
        if !config.exchange.is_empty() {
            channel
                .exchange_declare(
                    config.exchange.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    format!(
                        "cannot declare exchange '{}' ({}, durable): {e}; if it exists with \
                         another type set rabbitmq.exchange_type to it, or rabbitmq.declare = false",
                        config.exchange, config.exchange_type
                    )
                })?;
        }
        channel
            .queue_declare(
                dead_letter_queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                format!("cannot declare the dead-letter queue '{dead_letter_queue}' (durable): {e}")
            })?;
    }
    Ok((conn, channel))
}

/// A message ready to be published (any number of times).
struct Prepared {
    id: uuid::Uuid,
    exchange: ShortString,
    routing_key: ShortString,
    properties: BasicProperties,
    payload: Bytes,
}

impl Prepared {
    fn new(
        msg: &OutboxMessage,
        config: &RabbitmqConfig,
        routing_key: &TopicTemplate,
        dead_letter_topic: &str,
    ) -> Result<Prepared, String> {
        let payload = msg.payload.clone().unwrap_or_default();
        if payload.len() > config.max_message_bytes {
            return Err(format!(
                "the payload is {} bytes, over rabbitmq.max_message_bytes ({}); RabbitMQ would \
                 refuse it (max_message_size)",
                payload.len(),
                config.max_message_bytes
            ));
        }
        let header = |name: &str| {
            msg.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let event_type = header("type");
        let (exchange, key) = if msg.topic == dead_letter_topic {
            (String::new(), dead_letter_topic.to_owned())
        } else {
            let key = routing_key.render(
                &header("aggregatetype"),
                &String::from_utf8_lossy(&msg.key),
                &event_type,
            );
            (config.exchange.clone(), key)
        };
        let routing_key = ShortString::try_new(key.clone()).map_err(|_| {
            format!("the routing key {key:?} is over 255 bytes; shorten rabbitmq.routing_key")
        })?;
        let mut headers = FieldTable::default();
        for (name, value) in &msg.headers {
            let name = ShortString::try_new(name.clone())
                .map_err(|_| format!("header name {name:?} is over 255 bytes"))?;
            headers.insert(
                name,
                AMQPValue::LongString(LongString::from(value.to_vec())),
            );
        }
        headers.insert(
            "aggregateid".into(),
            AMQPValue::LongString(LongString::from(msg.key.to_vec())),
        );
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(msg.id.to_string().into())
            .with_content_type("application/json".into())
            .with_timestamp(timestamp)
            .with_app_id("outbox-relay".into())
            .with_headers(headers);
        if let Ok(kind) = ShortString::try_new(event_type) {
            properties = properties.with_type(kind);
        }
        Ok(Prepared {
            id: msg.id,
            exchange: exchange.into(),
            routing_key,
            properties,
            payload,
        })
    }
}

struct Shared {
    config: RabbitmqConfig,
    dead_letter_topic: String,
    routing_key: TopicTemplate,
    /// The connection and confirm-mode channel, opened on first use and after a failure.
    channel: Mutex<Option<(lapin::Connection, Channel)>>,
}

impl Shared {
    /// Publishes `p` on the channel (opening one if needed); frames leave in call order.
    async fn start(&self, p: &Prepared) -> Result<(PublisherConfirm, u16), String> {
        let mut guard = self.channel.lock().await;
        let usable = guard
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !usable {
            *guard = None;
            let opened = open_channel(&self.config, &self.dead_letter_topic).await?;
            tracing::info!(exchange = %self.config.exchange, "RabbitMQ channel open (publisher confirms)");
            *guard = Some(opened);
        }
        let Some((_, channel)) = guard.as_ref() else {
            return Err("no RabbitMQ channel".into());
        };
        let confirm = channel
            .basic_publish(
                p.exchange.clone(),
                p.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &p.payload,
                p.properties.clone(),
            )
            .await
            .map_err(|e| format!("publish failed: {e}"))?;
        Ok((confirm, channel.id()))
    }

    /// Closes the channel `id` (if it is still the current one) so the next publish reopens.
    async fn discard(&self, id: u16) {
        let mut guard = self.channel.lock().await;
        if guard.as_ref().is_some_and(|(_, ch)| ch.id() == id) {
            *guard = None;
        }
    }

    async fn finish(
        &self,
        p: &Prepared,
        started: Result<(PublisherConfirm, u16), String>,
    ) -> Attempt {
        let (confirm, channel) = match started {
            Ok(s) => s,
            Err(e) => {
                self.channel.lock().await.take();
                return Attempt::Transient(e);
            }
        };
        let timeout = Duration::from_millis(self.config.ack_timeout_ms);
        match tokio::time::timeout(timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Attempt::Stored,
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Attempt::Refused(format!(
                "RabbitMQ returned message {} as unroutable ({} {}): no queue is bound to \
                 exchange '{}' for routing key '{}'; bind a queue for it or change \
                 rabbitmq.routing_key",
                p.id, returned.reply_code, returned.reply_text, p.exchange, p.routing_key
            )),
            Ok(Ok(Confirmation::Nack(_))) => {
                Attempt::Transient(format!("RabbitMQ nacked message {}", p.id))
            }
            Ok(Ok(Confirmation::NotRequested)) => {
                self.discard(channel).await;
                Attempt::Transient("the channel is not in confirm mode".into())
            }
            Ok(Err(e)) => {
                self.discard(channel).await;
                Attempt::Transient(format!("the channel failed before confirming: {e}"))
            }
            Err(_) => {
                self.discard(channel).await;
                Attempt::Transient(format!(
                    "no confirm within rabbitmq.ack_timeout_ms ({} ms)",
                    self.config.ack_timeout_ms
                ))
            }
        }
    }
}

/// Publishes outbox messages to RabbitMQ with publisher confirms. See the module documentation.
pub struct RabbitmqSink {
    shared: Arc<Shared>,
    /// One task per message in flight: waits for the confirm, publishes again, reports.
    in_flight: InFlight,
}

impl RabbitmqSink {
    /// A sink that connects on first use (and again after every failure).
    pub fn new(
        config: &Config,
        deliveries: mpsc::UnboundedSender<Delivery>,
    ) -> Result<RabbitmqSink, String> {
        let routing_key = TopicTemplate::parse(&config.rabbitmq.routing_key)
            .map_err(|e| format!("rabbitmq.routing_key: {e}"))?;
        Ok(RabbitmqSink {
            shared: Arc::new(Shared {
                config: config.rabbitmq.clone(),
                dead_letter_topic: config.dead_letter.topic.clone(),
                routing_key,
                channel: Mutex::new(None),
            }),
            in_flight: InFlight::new(config, "rabbitmq", deliveries),
        })
    }
}

impl Sink for RabbitmqSink {
    async fn publish(&mut self, msg: &OutboxMessage, token: AckToken) -> Result<(), SinkError> {
        let s = &self.shared;
        let prepared = Prepared::new(msg, &s.config, &s.routing_key, &s.dead_letter_topic)
            .map_err(|reason| SinkError::Rejected {
                id: msg.id,
                topic: msg.topic.clone(),
                reason,
            })?;
        // Published here, in the order messages are handed over; confirmed in the task.
        let started = s.start(&prepared).await;
        let prepared = Arc::new(prepared);
        let (shared, p) = (s.clone(), prepared.clone());
        let first = async move { shared.finish(&p, started).await };
        let shared = s.clone();
        let again = move || {
            let (shared, p) = (shared.clone(), prepared.clone());
            async move {
                let started = shared.start(&p).await;
                shared.finish(&p, started).await
            }
        };
        self.in_flight.spawn(msg.clone(), token, first, again);
        Ok(())
    }

    async fn flush(&mut self, timeout: Duration) -> usize {
        self.in_flight.flush(timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, payload: &[u8]) -> OutboxMessage {
        OutboxMessage {
            id: uuid::Uuid::nil(),
            topic: topic.into(),
            key: Bytes::from_static(b"order-7"),
            payload: Some(Bytes::copy_from_slice(payload)),
            headers: vec![
                ("id".into(), Bytes::from_static(b"x")),
                ("type".into(), Bytes::from_static(b"OrderPlaced")),
                ("aggregatetype".into(), Bytes::from_static(b"order")),
                ("trace".into(), Bytes::from_static(b"t1")),
            ],
        }
    }

    #[test]
    fn a_row_becomes_exchange_routing_key_and_properties() {
        let config = RabbitmqConfig::default();
        let template = TopicTemplate::parse(&config.routing_key).unwrap();
        let p = Prepared::new(
            &message("outbox.event.order", b"{}"),
            &config,
            &template,
            "outbox.dlq",
        )
        .unwrap();
        assert_eq!(p.exchange.as_str(), "outbox");
        assert_eq!(p.routing_key.as_str(), "order.OrderPlaced");
        assert_eq!(p.properties.delivery_mode(), &Some(2));
        assert_eq!(
            p.properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            Some(uuid::Uuid::nil().to_string())
        );
        assert_eq!(
            p.properties.kind().as_ref().map(|k| k.as_str()),
            Some("OrderPlaced")
        );
        let headers = p.properties.headers().clone().unwrap_or_default();
        assert!(headers.inner().contains_key("trace"));
        assert!(headers.inner().contains_key("aggregateid"));
        // Dead letters: the default exchange, straight to the dead-letter queue.
        let d = Prepared::new(
            &message("outbox.dlq", b"{}"),
            &config,
            &template,
            "outbox.dlq",
        )
        .unwrap();
        assert_eq!(
            (d.exchange.as_str(), d.routing_key.as_str()),
            ("", "outbox.dlq")
        );
    }

    #[test]
    fn a_message_over_the_size_limit_is_refused_before_it_is_sent() {
        let config = RabbitmqConfig {
            max_message_bytes: 4,
            ..Default::default()
        };
        let template = TopicTemplate::parse(&config.routing_key).unwrap();
        let e = Prepared::new(&message("t", b"12345"), &config, &template, "d")
            .err()
            .unwrap();
        assert!(e.contains("rabbitmq.max_message_bytes"), "{e}");
    }
}
