//! The NATS JetStream sink: each row is published to the subject the routing gives and counts as
//! sent only when the stream's **PubAck** arrives (the message is stored, on the stream's
//! replicas). `Nats-Msg-Id` is the outbox id, so the stream drops every resend of a row inside
//! its duplicate window (`nats.duplicate_window_ms`): after a relay crash the rows sent again
//! are not stored twice, and the duplicates are counted (`PubAck.duplicate`).
//!
//! Failures: a publish without a PubAck in `nats.ack_timeout_ms`, a lost connection (the client
//! reconnects by itself and flushes what it buffered) or a stream that is not there *yet* are
//! sent again with backoff, without limit, under the same message id. Refused for good, and
//! dead-lettered after `dead_letter.max_attempts` sends: a message larger than the server's
//! `max_payload` or the stream's `max_msg_size`, and a subject no stream captures (asked of
//! JetStream after the "no responders" answer, so a stream that is still loading after a server
//! restart is not mistaken for a missing one). Ordering: messages are published on one
//! connection in commit order, which JetStream stores in that order; a message sent again after
//! a failure may land after later ones.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use tokio::sync::{OnceCell, mpsc};

use super::confirm::{Attempt, InFlight};
use super::{AckToken, Delivery, OutboxMessage, Sink, SinkError};
use crate::config::{Config, NatsConfig};

/// Headers JetStream (or NATS) reads itself: a row cannot set them.
fn reserved(name: &str) -> bool {
    name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-")
}

/// Connects to `nats.url`. With `keep_trying` the first connection is made in the background
/// (the relay starts while the server is away and publishes once it is back); otherwise an
/// unreachable server is an error at once (`check`).
pub async fn connect(config: &NatsConfig, keep_trying: bool) -> Result<async_nats::Client, String> {
    let mut options = async_nats::ConnectOptions::new()
        .name("outbox-relay")
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        // Publishes queue in the client while it reconnects; this many, then `publish` waits.
        .client_capacity(65_536);
    if keep_trying {
        options = options.retry_on_initial_connect();
    }
    options = options.event_callback(|event| async move {
        match event {
            async_nats::Event::Connected => tracing::info!("connected to NATS"),
            async_nats::Event::Disconnected => {
                tracing::warn!("disconnected from NATS; reconnecting (publishes wait)")
            }
            other => tracing::debug!(event = %other, "NATS client event"),
        }
    });
    if !config.token.is_empty() {
        options = options.token(config.token.clone());
    }
    if !config.nkey_seed.is_empty() {
        options = options.nkey(config.nkey_seed.clone());
    }
    if !config.credentials_file.is_empty() {
        options = options
            .credentials_file(&config.credentials_file)
            .await
            .map_err(|e| {
                format!(
                    "nats.credentials_file {}: {e}; point it at a readable .creds file",
                    config.credentials_file
                )
            })?;
    }
    if !config.tls_ca_file.is_empty() {
        options = options.add_root_certificates(config.tls_ca_file.clone().into());
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    let urls: Vec<async_nats::ServerAddr> = config
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse().map_err(|e| {
                format!(
                    "nats.url {:?}: {e}; write nats://host:4222",
                    crate::config::redact_url(u)
                )
            })
        })
        .collect::<Result<_, _>>()?;
    options.connect(urls).await.map_err(|e| {
        format!(
            "cannot connect to NATS at {}: {e}; check nats.url (RELAY_NATS__URL), the credentials \
             and that the server is up",
            crate::config::redact_url(&config.url)
        )
    })
}

/// Whether JetStream answers for this account (`$JS.API.INFO`): `Err` with the reason. Asked
/// raw, so that servers older than the client's account schema (2.9) answer too.
pub async fn jetstream_answers(client: &async_nats::Client) -> Result<(), String> {
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request("$JS.API.INFO", Bytes::new()),
    )
    .await
    .map_err(|_| "JetStream did not answer within 5 s".to_owned())?
    .map_err(|e| format!("JetStream does not answer ({e})"))?;
    let info: serde_json::Value = serde_json::from_slice(&reply.payload)
        .map_err(|e| format!("JetStream answered something else than JSON ({e})"))?;
    match info.get("error") {
        Some(error) => Err(format!("JetStream refused: {error}")),
        None => Ok(()),
    }
}

/// A JetStream context whose requests wait `nats.ack_timeout_ms` for their answer.
pub fn context(client: async_nats::Client, config: &NatsConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(config.ack_timeout_ms))
        .build(client)
}

/// The stream `nats.create_stream` creates: `nats.stream` on `nats.stream_subjects`, file
/// storage, `nats.replicas`, `nats.duplicate_window_ms`.
pub fn stream_config(config: &NatsConfig) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        subjects: config.subjects(),
        num_replicas: config.replicas,
        duplicate_window: Duration::from_millis(config.duplicate_window_ms),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Creates the stream when it does not exist (an existing one is left as it is); its name.
pub async fn ensure_stream(js: &jetstream::Context, config: &NatsConfig) -> Result<String, String> {
    let stream = js
        .get_or_create_stream(stream_config(config))
        .await
        .map_err(|e| {
            format!(
                "cannot create or look up JetStream stream {} (subjects {}): {e}; is JetStream \
                 enabled on the server (nats-server -js) and may this user manage streams?",
                config.stream, config.stream_subjects
            )
        })?;
    Ok(stream.cached_info().config.name.clone())
}

/// Whether `subject` can be published to: dot-separated non-empty tokens of printable ASCII
/// without wildcards.
pub fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && token.bytes().all(|b| b.is_ascii_graphic())
        })
}

/// A message ready to be published (any number of times).
struct Prepared {
    id: uuid::Uuid,
    subject: String,
    msg_id: String,
    headers: HeaderMap,
    payload: Bytes,
}

impl Prepared {
    fn new(msg: &OutboxMessage, dead_letter_topic: &str) -> Result<Prepared, String> {
        if !valid_subject(&msg.topic) {
            return Err(format!(
                "'{}' cannot be a NATS subject (dot-separated tokens of printable ASCII, no \
                 spaces, no '*' or '>'); change the topic column or kafka.topic_template",
                msg.topic
            ));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &msg.headers {
            if reserved(name) {
                continue;
            }
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic() && c != ':') {
                return Err(format!(
                    "header name {name:?} cannot be a NATS header (printable ASCII without ':')"
                ));
            }
            let value = header_value(value).map_err(|p| format!("header {name:?} {p}"))?;
            headers.insert(name.as_str(), value);
        }
        let key = header_value(&msg.key).map_err(|p| format!("aggregateid {p}"))?;
        headers.insert("aggregateid", key);
        // A dead-letter record carries its row's id; its message id differs so that it is not
        // taken for the row's own message by a stream capturing both subjects.
        let msg_id = if msg.topic == dead_letter_topic {
            format!("{}:dlq", msg.id)
        } else {
            msg.id.to_string()
        };
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        Ok(Prepared {
            id: msg.id,
            subject: msg.topic.clone(),
            msg_id,
            headers,
            payload: msg.payload.clone().unwrap_or_default(),
        })
    }

    fn publish(&self) -> jetstream::message::PublishMessage {
        jetstream::message::PublishMessage::build()
            .payload(self.payload.clone())
            .headers(self.headers.clone())
    }
}

fn header_value(b: &[u8]) -> Result<HeaderValue, &'static str> {
    let s = std::str::from_utf8(b).map_err(|_| "is not UTF-8; NATS headers are text")?;
    s.parse::<HeaderValue>()
        .map_err(|_| "holds a line break, which NATS headers cannot carry")
}

struct Shared {
    js: jetstream::Context,
    config: NatsConfig,
    dead_letter_topic: String,
    stream_ready: OnceCell<String>,
}

impl Shared {
    /// Publishes once and waits for the PubAck.
    async fn publish_once(&self, p: &Prepared) -> Attempt {
        let sent = self.js.send_publish(p.subject.clone(), p.publish()).await;
        self.finish(p, sent).await
    }

    /// Waits for the PubAck of a publish sent.
    async fn finish(
        &self,
        p: &Prepared,
        sent: Result<jetstream::context::PublishAckFuture, PublishError>,
    ) -> Attempt {
        let ack = match sent {
            Ok(ack) => ack,
            Err(e) => return self.classify(p, e).await,
        };
        match ack.await {
            Ok(ack) => {
                if ack.duplicate {
                    metrics::counter!(crate::metrics::NATS_DUPLICATES).increment(1);
                }
                Attempt::Stored
            }
            Err(e) => self.classify(p, e).await,
        }
    }

    async fn classify(&self, p: &Prepared, e: PublishError) -> Attempt {
        match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => Attempt::Refused(format!(
                "NATS refused message {} for subject {}: {e} (the server's max_payload)",
                p.id, p.subject
            )),
            PublishErrorKind::StreamNotFound => {
                // "No responders": no stream captures the subject, or none is loaded yet. Ask.
                match self.js.stream_by_subject(p.subject.clone()).await {
                    Ok(stream) => Attempt::Transient(format!(
                        "stream {stream} captures {} but did not answer yet",
                        p.subject
                    )),
                    Err(lookup)
                        if lookup.kind()
                            == jetstream::context::GetStreamByNameErrorKind::NotFound =>
                    {
                        Attempt::Refused(format!(
                            "no JetStream stream captures subject {}; add it to a stream's \
                             subjects (nats.stream_subjects with nats.create_stream, or nats \
                             stream edit) or route the row elsewhere",
                            p.subject
                        ))
                    }
                    Err(lookup) => Attempt::Transient(format!(
                        "no stream answered for {} and JetStream could not be asked which \
                         captures it: {lookup}",
                        p.subject
                    )),
                }
            }
            PublishErrorKind::Other if too_large_for_the_stream(&e) => Attempt::Refused(format!(
                "JetStream refused message {} for subject {}: {e} (the stream's max_msg_size)",
                p.id, p.subject
            )),
            _ => Attempt::Transient(format!(
                "publish to {} (Nats-Msg-Id {}): {e}",
                p.subject, p.msg_id
            )),
        }
    }
}

fn too_large_for_the_stream(e: &PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| j.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
}

/// Publishes outbox messages to NATS JetStream. See the module documentation.
pub struct NatsSink {
    shared: Arc<Shared>,
    /// One task per message in flight: waits for the PubAck, sends again, reports.
    in_flight: InFlight,
}

impl NatsSink {
    /// A sink on a client that connects (and reconnects) in the background.
    pub async fn new(
        config: &Config,
        deliveries: mpsc::UnboundedSender<Delivery>,
    ) -> Result<NatsSink, String> {
        let client = connect(&config.nats, true).await?;
        Ok(NatsSink {
            shared: Arc::new(Shared {
                js: context(client, &config.nats),
                config: config.nats.clone(),
                dead_letter_topic: config.dead_letter.topic.clone(),
                stream_ready: OnceCell::new(),
            }),
            in_flight: InFlight::new(config, "nats", deliveries),
        })
    }
}

impl Sink for NatsSink {
    async fn publish(&mut self, msg: &OutboxMessage, token: AckToken) -> Result<(), SinkError> {
        let prepared = Prepared::new(msg, &self.shared.dead_letter_topic).map_err(|reason| {
            SinkError::Rejected {
                id: msg.id,
                topic: msg.topic.clone(),
                reason,
            }
        })?;
        if self.shared.config.create_stream {
            let shared = &self.shared;
            shared
                .stream_ready
                .get_or_try_init(|| async {
                    let name = ensure_stream(&shared.js, &shared.config).await?;
                    tracing::info!(stream = %name, subjects = %shared.config.stream_subjects, "JetStream stream ready");
                    Ok::<_, String>(name)
                })
                .await
                .map_err(|reason| SinkError::Unavailable {
                    topic: msg.topic.clone(),
                    reason,
                })?;
        }
        // The first send leaves here, in the order messages are handed over (the client writes
        // them to its connection in this order); the PubAck is awaited in the task.
        let sent = self
            .shared
            .js
            .send_publish(prepared.subject.clone(), prepared.publish())
            .await;
        let prepared = Arc::new(prepared);
        let (shared, p) = (self.shared.clone(), prepared.clone());
        let first = async move { shared.finish(&p, sent).await };
        let shared = self.shared.clone();
        let again = move || {
            let (shared, p) = (shared.clone(), prepared.clone());
            async move { shared.publish_once(&p).await }
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

    fn message(topic: &str, headers: Vec<(&str, &[u8])>) -> OutboxMessage {
        OutboxMessage {
            id: uuid::Uuid::nil(),
            topic: topic.into(),
            key: Bytes::from_static(b"order-7"),
            payload: Some(Bytes::from_static(b"{}")),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Bytes::copy_from_slice(v)))
                .collect(),
        }
    }

    #[test]
    fn a_row_becomes_subject_headers_and_message_id() {
        let p = Prepared::new(
            &message(
                "outbox.event.order",
                vec![
                    ("id", b"x"),
                    ("type", b"OrderPlaced"),
                    ("Nats-Expected-Stream", b"OTHER"),
                    ("nats-msg-id", b"spoof"),
                    ("trace", b"t1"),
                ],
            ),
            "outbox.dlq",
        )
        .unwrap();
        assert_eq!(p.subject, "outbox.event.order");
        assert_eq!(p.msg_id, uuid::Uuid::nil().to_string());
        let get = |n: &str| p.headers.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(get("Nats-Msg-Id"), Some(uuid::Uuid::nil().to_string()));
        assert_eq!(get("type").as_deref(), Some("OrderPlaced"));
        assert_eq!(get("trace").as_deref(), Some("t1"));
        assert_eq!(get("aggregateid").as_deref(), Some("order-7"));
        assert_eq!(
            get("Nats-Expected-Stream"),
            None,
            "rows cannot steer JetStream"
        );
        // The dead-letter record of the row has a message id of its own.
        let d = Prepared::new(&message("outbox.dlq", vec![]), "outbox.dlq").unwrap();
        assert_eq!(d.msg_id, format!("{}:dlq", uuid::Uuid::nil()));
    }

    #[test]
    fn rows_nats_cannot_carry_are_refused_with_the_reason() {
        for subject in ["", "a..b", "a.*", "a.>", "has space", "tab\tx"] {
            assert!(
                Prepared::new(&message(subject, vec![]), "outbox.dlq")
                    .err()
                    .is_some_and(|e| e.contains("cannot be a NATS subject")),
                "{subject:?}"
            );
        }
        let e = Prepared::new(&message("a.b", vec![("x", b"l1\r\nl2")]), "d")
            .err()
            .unwrap();
        assert!(e.contains("line break"), "{e}");
        let e = Prepared::new(&message("a.b", vec![("bad:name", b"v")]), "d")
            .err()
            .unwrap();
        assert!(e.contains("header name"), "{e}");
        let e = Prepared::new(&message("a.b", vec![("x", &[0xff, 0xfe])]), "d")
            .err()
            .unwrap();
        assert!(e.contains("UTF-8"), "{e}");
    }
}
