//! The RocketMQ sink: every row becomes a transactional message, visible to consumers if and
//! only if its row is marked delivered.
//!
//! 1. `publish` sends the row as a **half message** (stored, invisible) with the properties
//!    `KEYS` = the outbox id and `OUTBOX_TX_KEY` = `<outbox id>:<unique message id>`, and reports
//!    it `Acked` once the broker stored it (SEND_OK), with a [`HalfRef`] in the token.
//! 2. The marking stage marks the row delivered in a Postgres transaction that also runs
//!    `outbox_tx_begin(OUTBOX_TX_KEY)` (the oracle, `sql/003_transactions.sql`): the mark and the
//!    key's `commit` are one atomic fact.
//! 3. It then hands the half message to the [`Settler`], which sends END_TRANSACTION commit (or
//!    rollback, for a row that was already delivered or is gone).
//!
//! If the relay dies between the steps, the broker checks back; whichever relay answers asks the
//! oracle about `OUTBOX_TX_KEY`: committed if the row was marked, otherwise settled as rolled
//! back. The key is per message, not per row, so the half message of a crashed relay and the
//! one sent again after the restart are decided separately: exactly one becomes visible. While
//! this process still holds a half message it sent (between steps 1 and 3), its own check-back
//! responder answers "unknown" rather than let the oracle settle it as rolled back (see
//! [`OwnHalves`]).
//!
//! Failures: a broker that cannot be reached, is busy, or stores the half message without
//! flushing or replicating it (anything but SEND_OK) is retried with backoff, without limit, as
//! a new half message (the old one, never begun in the oracle, is rolled back by its check). A
//! message the broker refuses for good (too large, bad property, no permission) is sent up to
//! `dead_letter.max_attempts` times, then reported `Failed` (dead-lettered by the pipeline).
//! Ordering: RocketMQ transactional messages become visible in the order they are committed;
//! the relay sends and commits in commit order, but a retried message, or batches marked on
//! different connections, may overtake.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use bytes::Bytes;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;

use super::OutboxMessage;
use super::{AckToken, Delivery, Sink, SinkError};
use crate::config::{Config, RetryConfig, RocketmqConfig};
use crate::retry::backoff;
use crate::rocketmq::acl::Credentials;
use crate::rocketmq::client::{self, HalfMessage, HalfSend, Resolution, Route, SendError};
use crate::rocketmq::connection::Connection;
use crate::rocketmq::message::prop;
use crate::rocketmq::{OwnHalves, topic_name};

/// A half message the broker stored, and the oracle key that decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfRef {
    /// The master broker holding it.
    pub broker: String,
    pub half: HalfMessage,
    /// `<outbox id>:<unique message id>`, the `OUTBOX_TX_KEY` property.
    pub key: String,
}

/// How long a topic's route is used before it is asked for again.
const ROUTE_TTL: Duration = Duration::from_secs(30);

/// Property names the relay sets itself; outbox headers with these names are not copied.
const RESERVED: &[&str] = &[
    prop::KEYS,
    prop::TAGS,
    prop::UNIQ_KEY,
    prop::TRAN_MSG,
    prop::PGROUP,
    prop::OUTBOX_TX_KEY,
    prop::REAL_TOPIC,
    "REAL_QID",
    "DELAY",
    "WAIT",
];

/// What the sink and its settler share: connections, routes, the registry of own half messages.
struct Shared {
    config: RocketmqConfig,
    retry: RetryConfig,
    max_attempts: u32,
    name_server: Mutex<Option<Connection>>,
    brokers: Mutex<HashMap<String, Connection>>,
    routes: Mutex<HashMap<String, (Route, Instant)>>,
    own: OwnHalves,
    generation: u64,
    ack_metrics: crate::metrics::AckMetrics,
}

/// A message ready to be sent as a half message (any number of times).
struct Prepared {
    id: uuid::Uuid,
    topic: String,
    /// Picks the queue: messages of one aggregate go to one queue.
    key_hash: u64,
    body: Bytes,
    /// User properties: the outbox headers, `aggregateid`.
    properties: Vec<(String, String)>,
    tags: Option<String>,
}

impl Prepared {
    fn new(msg: &OutboxMessage) -> Result<Prepared, String> {
        let topic = topic_name(&msg.topic).ok_or_else(|| {
            format!(
                "'{}' cannot be a RocketMQ topic (1 to 127 letters, digits, '_', '-', '%', '|' once \
                 other characters become '_'); change the topic column or kafka.topic_template",
                msg.topic
            )
        })?;
        // The description is built only when a value is refused.
        let text = |b: &[u8], what: &dyn Fn() -> String| -> Result<String, String> {
            property_text(b)
                .map(str::to_owned)
                .map_err(|problem| format!("{} {problem}", what()))
        };
        let mut properties = Vec::with_capacity(msg.headers.len() + 1);
        let mut tags = None;
        for (name, value) in &msg.headers {
            if RESERVED.contains(&name.as_str()) || name.is_empty() {
                continue;
            }
            property_text(name.as_bytes()).map_err(|p| format!("header name {name:?} {p}"))?;
            let value = text(value, &|| format!("header {name:?}"))?;
            if name == "type" {
                tags = Some(value.clone());
            }
            properties.push((name.clone(), value));
        }
        properties.push((
            "aggregateid".to_owned(),
            text(&msg.key, &|| "aggregateid".to_owned())?,
        ));
        Ok(Prepared {
            id: msg.id,
            topic,
            key_hash: fnv1a(&msg.key),
            // RocketMQ refuses empty bodies; a NULL payload is sent as the JSON `null`.
            body: match &msg.payload {
                Some(p) if !p.is_empty() => p.clone(),
                _ => Bytes::from_static(b"null"),
            },
            properties,
            tags,
        })
    }
}

/// `b` as the text of a RocketMQ property, or why it cannot be one.
fn property_text(b: &[u8]) -> Result<&str, &'static str> {
    let s = std::str::from_utf8(b).map_err(|_| "is not UTF-8; RocketMQ properties are text")?;
    if s.contains(['\u{1}', '\u{2}']) {
        return Err(
            "holds the control character \\u0001 or \\u0002, which RocketMQ properties cannot carry",
        );
    }
    Ok(s)
}

/// FNV-1a: a stable hash (the same queue for an aggregate across restarts and versions).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Shared {
    /// A live connection to `addr` (connected outside the lock: one unreachable broker does not
    /// hold up sends to the others).
    async fn broker(&self, addr: &str) -> Result<Connection, String> {
        if let Some(c) = self
            .brokers
            .lock()
            .await
            .get(addr)
            .filter(|c| !c.is_closed())
        {
            return Ok(c.clone());
        }
        let c =
            Connection::open(addr, None, client::TIMEOUT, Credentials::of(&self.config)).await?;
        self.brokers.lock().await.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// A live connection to a name server (the first that answers).
    async fn name_server(&self) -> Result<Connection, String> {
        if let Some(c) = self
            .name_server
            .lock()
            .await
            .as_ref()
            .filter(|c| !c.is_closed())
        {
            return Ok(c.clone());
        }
        let mut last = String::from("no name server configured (rocketmq.name_server)");
        for addr in self.config.name_servers() {
            match Connection::open(&addr, None, client::TIMEOUT, Credentials::of(&self.config))
                .await
            {
                Ok(c) => {
                    *self.name_server.lock().await = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The topic's queues; creates the topic on every master broker when it is missing (and
    /// `rocketmq.create_topics` is on). `Err((message, permanent))`.
    async fn route(&self, topic: &str) -> Result<Route, (String, bool)> {
        if let Some((route, at)) = self.routes.lock().await.get(topic)
            && at.elapsed() < ROUTE_TTL
        {
            return Ok(route.clone());
        }
        let ns = self.name_server().await.map_err(|e| (e, false))?;
        let found = match client::route(&ns, topic).await {
            Ok(r) => r.filter(|r| !r.queues.is_empty()),
            Err(e) => {
                *self.name_server.lock().await = None;
                // A route known before is better than none while the name server is away.
                if let Some((route, _)) = self.routes.lock().await.get(topic) {
                    return Ok(route.clone());
                }
                return Err((e, false));
            }
        };
        let route = match found {
            Some(r) => r,
            None if !self.config.create_topics => {
                return Err((
                    format!(
                        "RocketMQ topic '{topic}' does not exist and rocketmq.create_topics is off; \
                         create it (mqadmin updateTopic) or set RELAY_ROCKETMQ__CREATE_TOPICS=true"
                    ),
                    true,
                ));
            }
            None => {
                let masters = client::master_brokers(&ns).await.map_err(|e| (e, false))?;
                if masters.is_empty() {
                    return Err(("the name server lists no master broker".into(), false));
                }
                let queues = self.config.topic_queues;
                for addr in &masters {
                    let conn = self.broker(addr).await.map_err(|e| (e, false))?;
                    client::create_topic(&conn, topic, queues)
                        .await
                        .map_err(|e| (format!("cannot create topic '{topic}': {e}"), false))?;
                }
                tracing::info!(
                    topic,
                    queues,
                    brokers = masters.len(),
                    "created RocketMQ topic"
                );
                // The name server learns of the topic with the brokers' next registration; until
                // then the route is what was just created.
                Route {
                    queues: masters
                        .iter()
                        .flat_map(|a| (0..queues).map(move |q| (a.clone(), q)))
                        .collect(),
                }
            }
        };
        self.routes
            .lock()
            .await
            .insert(topic.to_owned(), (route.clone(), Instant::now()));
        Ok(route)
    }

    /// Queues one half message of `p` (frames leave in the order of these calls) and returns a
    /// future for the broker's answer.
    async fn start_send(
        self: &Arc<Self>,
        p: &Prepared,
    ) -> Result<impl Future<Output = Result<HalfRef, SendError>> + Send + 'static + use<>, SendError>
    {
        let route = self
            .route(&p.topic)
            .await
            .map_err(|(message, permanent)| SendError { message, permanent })?;
        let (addr, queue_id) =
            route.queues[(p.key_hash % route.queues.len() as u64) as usize].clone();
        let conn = self.broker(&addr).await.map_err(|message| SendError {
            message,
            permanent: false,
        })?;
        let uniq = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        let key = format!("{}:{uniq}", p.id);
        let id = p.id.to_string();
        let mut props: Vec<(&str, &str)> = vec![(prop::OUTBOX_TX_KEY, key.as_str())];
        if let Some(tags) = &p.tags {
            props.push((prop::TAGS, tags));
        }
        props.extend(p.properties.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let cmd = client::half_command(&HalfSend {
            producer_group: &self.config.producer_group,
            topic: &p.topic,
            queue_id,
            keys: &id,
            uniq_key: &uniq,
            body: p.body.clone(),
            properties: &props,
        })?;
        // Registered before the broker can check back on it.
        self.own.insert(&key, self.generation);
        let answer = match conn.start(cmd, client::TIMEOUT).await {
            Ok(a) => a,
            Err(message) => {
                self.own.remove(&key);
                self.brokers.lock().await.remove(&addr);
                return Err(SendError {
                    message,
                    permanent: false,
                });
            }
        };
        let shared = self.clone();
        let topic = p.topic.clone();
        Ok(async move {
            let sent = match answer.await {
                Ok(resp) => client::half_sent(&resp, &shared.config.producer_group, &topic, &uniq),
                Err(message) => Err(SendError {
                    message,
                    permanent: false,
                }),
            };
            match sent {
                Ok(half) => Ok(HalfRef {
                    broker: addr,
                    half,
                    key,
                }),
                Err(e) => {
                    // Never begun in the oracle: its check-back rolls it back.
                    shared.own.remove(&key);
                    Err(e)
                }
            }
        })
    }
}

/// Sends the END_TRANSACTION that settles half messages once their rows are marked.
#[derive(Clone)]
pub struct Settler {
    shared: Arc<Shared>,
}

impl Settler {
    /// Commits or rolls back each half message, waiting (bounded) for the broker's answers. One
    /// that cannot be settled now is left to the broker's check-back, which the oracle answers
    /// the same way.
    pub async fn settle(&self, halves: Vec<(HalfRef, Resolution)>) {
        let mut answers = Vec::with_capacity(halves.len());
        for (h, resolution) in &halves {
            let cmd = client::end_transaction_command(&h.half, *resolution, false, None);
            let started = match self.shared.broker(&h.broker).await {
                Ok(conn) => conn.start(cmd, client::TIMEOUT).await,
                Err(e) => Err(e),
            };
            answers.push(started);
        }
        for ((h, resolution), started) in halves.iter().zip(answers) {
            let outcome = match started {
                Ok(answer) => match answer.await {
                    Ok(resp) => resp.ok_or_describe("END_TRANSACTION"),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            let label = match resolution {
                Resolution::Commit => "commit",
                Resolution::Rollback => "rollback",
                Resolution::Unknown => "unknown",
            };
            let result = if outcome.is_ok() { "ok" } else { "error" };
            metrics::counter!(crate::metrics::ROCKETMQ_END_TRANSACTIONS, "resolution" => label, "result" => result)
                .increment(1);
            if let Err(e) = outcome {
                tracing::warn!(key = %h.key, resolution = label, error = %e,
                    "could not settle a RocketMQ half message; the broker's check-back will (the oracle holds the outcome)");
            }
            self.shared.own.remove(&h.key);
        }
    }
}

/// Publishes outbox messages as RocketMQ transactional messages. See the module documentation.
pub struct RocketMqSink {
    shared: Arc<Shared>,
    deliveries: mpsc::UnboundedSender<Delivery>,
    /// One task per message in flight: waits for the broker's answer, retries, reports.
    sends: JoinSet<()>,
}

impl RocketMqSink {
    /// A sink whose half messages are registered in `own` (shared with the check-back responder).
    pub fn new(
        config: &Config,
        deliveries: mpsc::UnboundedSender<Delivery>,
        own: OwnHalves,
    ) -> RocketMqSink {
        let generation = own.generation();
        RocketMqSink {
            shared: Arc::new(Shared {
                config: config.rocketmq.clone(),
                retry: config.retry.clone(),
                max_attempts: config.dead_letter.max_attempts,
                name_server: Mutex::new(None),
                brokers: Mutex::new(HashMap::new()),
                routes: Mutex::new(HashMap::new()),
                own,
                generation,
                ack_metrics: crate::metrics::AckMetrics::new(),
            }),
            deliveries,
            sends: JoinSet::new(),
        }
    }

    /// The settler the marking stage commits marked rows' messages with.
    pub fn settler(&self) -> Settler {
        Settler {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for RocketMqSink {
    fn drop(&mut self) {
        // Whatever this sink had in flight is sent again by its successor under new keys; the
        // oracle decides the old ones.
        self.sends.abort_all();
        self.shared.own.forget(self.shared.generation);
    }
}

/// Waits for the answer to a started send; sends again (as a new half message) until the broker
/// stores it, or reports it failed after `max_attempts` refusals.
async fn finish_send(
    shared: Arc<Shared>,
    first: Result<impl Future<Output = Result<HalfRef, SendError>> + Send + 'static, SendError>,
    prepared: Prepared,
    msg: OutboxMessage,
    mut token: AckToken,
    deliveries: mpsc::UnboundedSender<Delivery>,
) {
    let mut delays = backoff(&shared.retry).build();
    let mut refusals = 0;
    let mut outcome = match first {
        Ok(answer) => answer.await,
        Err(e) => Err(e),
    };
    loop {
        match outcome {
            Ok(half) => {
                crate::failpoint::crash_point("rocketmq-after-half-sent");
                shared.ack_metrics.acked(token.commit_time, token.handed_at);
                token.half = Some(Box::new(half));
                let _ = deliveries.send(Delivery::Acked(token));
                return;
            }
            Err(e) if e.permanent => {
                refusals += 1;
                if refusals >= shared.max_attempts {
                    let _ = deliveries.send(Delivery::Failed {
                        token,
                        error: e.message,
                        message: Box::new(msg),
                    });
                    return;
                }
                tracing::warn!(id = %prepared.id, topic = %prepared.topic, attempt = refusals, error = %e, "RocketMQ refused the message; trying again");
            }
            Err(e) => {
                tracing::warn!(id = %prepared.id, topic = %prepared.topic, error = %e, "RocketMQ send failed; sending again");
            }
        }
        token.attempt += 1;
        metrics::counter!(crate::metrics::RETRIES, "stage" => "broker").increment(1);
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(30))).await;
        outcome = match shared.start_send(&prepared).await {
            Ok(answer) => answer.await,
            Err(e) => Err(e),
        };
    }
}

impl Sink for RocketMqSink {
    async fn publish(&mut self, msg: &OutboxMessage, token: AckToken) -> Result<(), SinkError> {
        while self.sends.try_join_next().is_some() {}
        let prepared = Prepared::new(msg).map_err(|reason| SinkError::Rejected {
            id: msg.id,
            topic: msg.topic.clone(),
            reason,
        })?;
        // Queued here, in the order messages are handed over; answered in the task.
        let first = self.shared.start_send(&prepared).await;
        self.sends.spawn(finish_send(
            self.shared.clone(),
            first,
            prepared,
            msg.clone(),
            token,
            self.deliveries.clone(),
        ));
        Ok(())
    }

    async fn flush(&mut self, timeout: Duration) -> usize {
        super::confirm::flush(&mut self.sends, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(headers: Vec<(&str, &str)>, payload: Option<&str>) -> OutboxMessage {
        OutboxMessage {
            id: uuid::Uuid::nil(),
            topic: "outbox.event.order".into(),
            key: Bytes::from_static(b"order-7"),
            payload: payload.map(|p| Bytes::from(p.to_owned())),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Bytes::from(v.to_owned())))
                .collect(),
        }
    }

    #[test]
    fn a_row_becomes_topic_tags_properties_and_body() {
        let p = Prepared::new(&message(
            vec![
                ("id", "x"),
                ("type", "OrderPlaced"),
                ("KEYS", "spoof"),
                ("trace", "t1"),
            ],
            Some("{\"a\":1}"),
        ))
        .unwrap();
        assert_eq!(p.topic, "outbox_event_order");
        assert_eq!(p.tags.as_deref(), Some("OrderPlaced"));
        assert_eq!(&p.body[..], b"{\"a\":1}");
        let names: Vec<&str> = p.properties.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["id", "type", "trace", "aggregateid"]);
        assert_eq!(p.key_hash, fnv1a(b"order-7"));
        // RocketMQ refuses empty bodies: a NULL payload is the JSON null.
        let p = Prepared::new(&message(vec![], None)).unwrap();
        assert_eq!(&p.body[..], b"null");
    }

    #[test]
    fn rows_rocketmq_cannot_carry_are_refused_with_the_reason() {
        let e = Prepared::new(&message(vec![("trace", "a\u{1}b")], None))
            .err()
            .unwrap();
        assert!(e.contains("\\u0001"), "{e}");
        let mut m = message(vec![], None);
        m.topic = "x".repeat(200);
        assert!(
            Prepared::new(&m)
                .err()
                .unwrap()
                .contains("cannot be a RocketMQ topic")
        );
    }

    #[test]
    fn one_aggregate_hashes_to_one_queue() {
        assert_eq!(fnv1a(b"order-7"), fnv1a(b"order-7"));
        assert_ne!(fnv1a(b"order-7"), fnv1a(b"order-8"));
        // FNV-1a's published test vector: stable across builds and versions.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
