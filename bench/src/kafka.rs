//! Broker-side tools: topic creation, the sink-limit producer and the latency consumer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use outbox_relay::config::{KafkaConfig, PipelineConfig};

fn admin_client(brokers: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating a Kafka admin client")
}

/// Creates `topics` with `partitions` partitions (an existing topic is fine).
pub async fn create_topics(brokers: &str, topics: &[&str], partitions: i32) -> Result<()> {
    let admin = admin_client(brokers)?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new, &opts)
        .await
        .with_context(|| format!("creating topics {topics:?} on {brokers}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("creating topic {topic} on {brokers}: {code}"),
        }
    }
    Ok(())
}

/// Deletes `topics` (a missing one is fine): the phases that wrote them are over, and Tansu's
/// memory storage keeps every message it was sent, which makes it slower and bigger as a run
/// goes on.
pub async fn delete_topics(brokers: &str, topics: &[&str]) -> Result<()> {
    let admin = admin_client(brokers)?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .delete_topics(topics, &opts)
        .await
        .with_context(|| format!("deleting topics {topics:?} on {brokers}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => bail!("deleting topic {topic} on {brokers}: {code}"),
        }
    }
    Ok(())
}

/// One message to send in the sink-limit run: exactly what the relay sends for a row.
pub struct Msg {
    pub id: String,
    pub key: String,
    pub event_type: String,
    pub aggregatetype: String,
    pub payload: String,
}

impl Msg {
    /// The headers the relay puts on a row's message: id, type, aggregatetype.
    fn headers(&self) -> OwnedHeaders {
        OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: "id",
                value: Some(self.id.as_bytes()),
            })
            .insert(Header {
                key: "type",
                value: Some(self.event_type.as_bytes()),
            })
            .insert(Header {
                key: "aggregatetype",
                value: Some(self.aggregatetype.as_bytes()),
            })
    }
}

struct CountingContext {
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    total: u64,
    started: Instant,
    /// Nanoseconds from `started` to the last delivery report.
    finished_ns: AtomicU64,
}

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| e.to_string());
            }
        }
        let done = self.acked.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        if done == self.total {
            self.finished_ns
                .store(self.started.elapsed().as_nanos() as u64, Ordering::SeqCst);
        }
    }
}

/// Result of the sink-limit run.
pub struct SinkRun {
    pub msgs: u64,
    pub secs: f64,
}

/// The sink limit: a plain rdkafka producer with the relay's producer settings
/// (`outbox_relay::sink::kafka::producer_config`) sends `msgs` to `topic` as fast as librdkafka
/// takes them; timed from the first send to the last delivery report.
pub fn sink_limit(brokers: &str, topic: &str, msgs: &[Msg]) -> Result<SinkRun> {
    let kafka = KafkaConfig {
        brokers: brokers.to_owned(),
        ..Default::default()
    };
    let config =
        outbox_relay::sink::kafka::producer_config(&kafka, PipelineConfig::default().max_in_flight);
    let started = Instant::now();
    let ctx = CountingContext {
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_error: Mutex::new(None),
        total: msgs.len() as u64,
        started,
        finished_ns: AtomicU64::new(0),
    };
    let producer: ThreadedProducer<CountingContext> = config
        .create_with_context(ctx)
        .context("creating the sink-limit producer from the relay's producer_config")?;
    let started = producer.context().started;
    let mut last_print = Instant::now();
    for (n, m) in msgs.iter().enumerate() {
        let mut record = BaseRecord::to(topic)
            .key(m.key.as_bytes())
            .payload(m.payload.as_bytes())
            .headers(m.headers());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("sink limit: producing message {n} failed: {e}"),
            }
        }
        if last_print.elapsed() >= Duration::from_secs(3) {
            last_print = Instant::now();
            let acked = producer.context().acked.load(Ordering::Relaxed);
            println!(
                "bench:   sink limit: {} sent, {acked} acknowledged ({:.0} msgs/s)",
                n + 1,
                acked as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let total = msgs.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ctx = producer.context();
        let done = ctx.acked.load(Ordering::Relaxed) + ctx.failed.load(Ordering::Relaxed);
        if done >= total {
            break;
        }
        if Instant::now() > deadline {
            bail!("sink limit: only {done}/{total} delivery reports after 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let ctx = producer.context();
    let failed = ctx.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = ctx
            .first_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
            .unwrap_or_default();
        bail!("sink limit: {failed} of {total} messages failed; first error: {first}");
    }
    let secs = ctx.finished_ns.load(Ordering::SeqCst) as f64 / 1e9;
    Ok(SinkRun { msgs: total, secs })
}

/// What the latency consumer saw of one message.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub event_type: String,
    /// Wall-clock time it was handed to the consumer, microseconds since the epoch.
    pub at_us: i64,
}

/// A consumer reading a topic from its end at the start (what is written after), in its own
/// thread, noting when each message became visible to it.
pub struct LatencyConsumer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    counts: Arc<Mutex<HashMap<String, u64>>>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl LatencyConsumer {
    pub fn start(brokers: &str, topic: &str, partitions: i32) -> Result<LatencyConsumer> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "outbox-bench-latency")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .set("fetch.min.bytes", "1")
            .set("fetch.error.backoff.ms", "10")
            .create()
            .context("creating the latency consumer")?;
        // From the end as it is now, not the beginning: the messages of earlier phases are not
        // measured, and a consumer started late in a full run need not fetch half a million of
        // them while the relay produces (suspected of the relay's ack tail at the peer's load;
        // measured: not its cause, 35.8 ms at p99 either way).
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let (_, end) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .with_context(|| format!("reading the end of {topic}[{p}]"))?;
            tpl.add_partition_offset(topic, p, Offset::Offset(end))
                .context("assigning partitions to the latency consumer")?;
        }
        consumer
            .assign(&tpl)
            .context("assigning partitions to the latency consumer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, seen, counts, errors) =
                (stop.clone(), seen.clone(), counts.clone(), errors.clone());
            std::thread::Builder::new()
                .name("latency-consumer".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match consumer.poll(Duration::from_millis(50)) {
                            Some(Ok(m)) => {
                                let at_us = now_us();
                                let mut id = String::new();
                                let mut event_type = String::new();
                                if let Some(h) = m.headers() {
                                    for hdr in h.iter() {
                                        let v =
                                            String::from_utf8_lossy(hdr.value.unwrap_or_default());
                                        match hdr.key {
                                            "id" => id = v.into_owned(),
                                            "type" => event_type = v.into_owned(),
                                            _ => {}
                                        }
                                    }
                                }
                                if let Ok(mut c) = counts.lock() {
                                    *c.entry(event_type.clone()).or_default() += 1;
                                }
                                if let Ok(mut s) = seen.lock() {
                                    s.push(Seen {
                                        id,
                                        event_type,
                                        at_us,
                                    });
                                }
                            }
                            Some(Err(e)) => {
                                if e.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF)
                                    && let Ok(mut errs) = errors.lock()
                                    && errs.len() < 10
                                {
                                    errs.push(e.to_string());
                                }
                            }
                            None => {}
                        }
                    }
                })
                .context("starting the latency consumer thread")?
        };
        Ok(LatencyConsumer {
            stop,
            seen,
            counts,
            errors,
            thread: Some(thread),
        })
    }

    /// Messages seen so far with header `type = event_type`.
    pub fn count(&self, event_type: &str) -> u64 {
        self.counts
            .lock()
            .map(|c| c.get(event_type).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Everything seen with this `type`.
    pub fn seen(&self, event_type: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|m| m.event_type == event_type)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Drop for LatencyConsumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// librdkafka's version string.
pub fn librdkafka_version() -> String {
    rdkafka::util::get_rdkafka_version().1
}

/// Send → ack times (ms) of a paced plain producer.
struct PacedContext {
    acks_ms: Mutex<Vec<f64>>,
    /// Acks of messages sent before this (the warm-up) are not kept.
    measure_from: Instant,
    done: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for PacedContext {}

impl ProducerContext for PacedContext {
    type DeliveryOpaque = Box<Instant>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Instant>) {
        self.done.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(_) if *sent >= self.measure_from => {
                let ms = sent.elapsed().as_secs_f64() * 1e3;
                self.acks_ms
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(ms);
            }
            Ok(_) => {}
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The sink's own latency at a given load: a plain producer with the relay's producer settings
/// sends `msgs` (cycled) to `topic` at `rate` per second for one second of warm-up (connection,
/// metadata, producer id: not kept) and then `secs`; returns each later message's send → ack
/// time in milliseconds. What the broker and librdkafka add at that load, with no
/// Postgres and no relay in the path.
pub fn sink_latency(
    brokers: &str,
    topic: &str,
    msgs: &[Msg],
    rate: f64,
    secs: f64,
) -> Result<Vec<f64>> {
    anyhow::ensure!(
        !msgs.is_empty() && rate > 0.0,
        "sink latency: nothing to send"
    );
    let kafka = KafkaConfig {
        brokers: brokers.to_owned(),
        ..Default::default()
    };
    let config =
        outbox_relay::sink::kafka::producer_config(&kafka, PipelineConfig::default().max_in_flight);
    let started = Instant::now();
    let producer: ThreadedProducer<PacedContext> = config
        .create_with_context(PacedContext {
            acks_ms: Mutex::new(Vec::new()),
            measure_from: started + Duration::from_secs(1),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
        .context("creating the paced producer from the relay's producer_config")?;
    let total = (rate * (secs + 1.0)) as usize;
    for n in 0..total {
        // Open loop: each message goes when it is due.
        let due = started + Duration::from_secs_f64(n as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let m = &msgs[n % msgs.len()];
        let record = BaseRecord::with_opaque_to(topic, Box::new(Instant::now()))
            .key(m.key.as_bytes())
            .payload(m.payload.as_bytes())
            .headers(m.headers());
        if let Err((e, _)) = producer.send(record) {
            bail!("sink latency: producing message {n} failed: {e}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ctx = producer.context();
        let done = ctx.done.load(Ordering::Relaxed) as usize;
        let failed = ctx.failed.load(Ordering::Relaxed) as usize;
        if done >= total {
            anyhow::ensure!(
                failed == 0,
                "sink latency: {failed} of {total} messages failed"
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("sink latency: {done}/{total} delivery reports a minute after the last send");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let acks = std::mem::take(
        &mut *producer
            .context()
            .acks_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    Ok(acks)
}
