//! NATS JetStream: the sink-limit publisher (async-nats, the relay's client, connected and
//! configured by the relay's own `outbox_relay::sink::nats` functions) and what a stream holds.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use outbox_relay::config::{NatsConfig, PipelineConfig};
use outbox_relay::sink::nats as relay_nats;

use crate::kafka::{Msg, SinkRun};

/// The stream the sink-limit publisher writes to (the relay creates its own, `OUTBOX` on
/// `outbox.>`, with the same settings).
pub const SINK_STREAM: &str = "BENCH_SINK";
pub const SINK_SUBJECT: &str = "bench.sink";

/// The relay's NATS settings (defaults) for the server at `url`.
pub fn config(url: &str) -> NatsConfig {
    NatsConfig {
        url: url.to_owned(),
        ..Default::default()
    }
}

/// A JetStream context as the relay builds it (its `connect` and `context`).
async fn jetstream(config: &NatsConfig) -> Result<jetstream::Context> {
    let client = relay_nats::connect(config, false)
        .await
        .map_err(|e| anyhow!(e))?;
    Ok(relay_nats::context(client, config))
}

/// Messages stored in `stream` now.
pub async fn stream_messages(url: &str, stream: &str) -> Result<u64> {
    let js = jetstream(&config(url)).await?;
    let mut s = js
        .get_stream(stream)
        .await
        .with_context(|| format!("looking up JetStream stream {stream}"))?;
    Ok(s.info()
        .await
        .with_context(|| format!("reading the state of JetStream stream {stream}"))?
        .state
        .messages)
}

/// Deletes `stream` (its messages leave the server's store).
pub async fn delete_stream(url: &str, stream: &str) -> Result<()> {
    let js = jetstream(&config(url)).await?;
    js.delete_stream(stream)
        .await
        .with_context(|| format!("deleting JetStream stream {stream}"))?;
    Ok(())
}

/// The sink limit: `msgs` published to [`SINK_SUBJECT`] on a fresh stream [`SINK_STREAM`] made
/// by the relay's `stream_config` (file storage, 1 replica, 2-minute duplicate window), each
/// with the relay's headers (`id`, `type`, `aggregatetype`, `aggregateid`, `Nats-Msg-Id` = the
/// outbox id) and every PubAck awaited; pipelined as the relay does it (up to
/// `pipeline.max_in_flight` publishes unacknowledged, within the JetStream context's own
/// in-flight limit). Timed from the first publish to the last PubAck; any failure fails the run.
pub async fn sink_limit(url: &str, msgs: &[Msg]) -> Result<SinkRun> {
    let config = NatsConfig {
        url: url.to_owned(),
        stream: SINK_STREAM.into(),
        stream_subjects: SINK_SUBJECT.into(),
        ..Default::default()
    };
    let js = jetstream(&config).await?;
    relay_nats::ensure_stream(&js, &config)
        .await
        .map_err(|e| anyhow!(e))?;
    let window = PipelineConfig::default().max_in_flight.max(1);
    let total = msgs.len() as u64;
    let mut acks = FuturesUnordered::new();
    let mut tally = Tally::default();
    let started = Instant::now();
    let mut last_print = Instant::now();
    for (n, m) in msgs.iter().enumerate() {
        let mut headers = HeaderMap::new();
        headers.insert("id", m.id.as_str());
        headers.insert("type", m.event_type.as_str());
        headers.insert("aggregatetype", m.aggregatetype.as_str());
        headers.insert("aggregateid", m.key.as_str());
        headers.insert("Nats-Msg-Id", m.id.as_str());
        let publish = PublishMessage::build()
            .payload(Bytes::copy_from_slice(m.payload.as_bytes()))
            .headers(headers);
        // The context holds a permit per publish until its PubAck is taken: keep taking them
        // while a publish waits for one.
        let send = js.send_publish(SINK_SUBJECT, publish);
        tokio::pin!(send);
        let ack = loop {
            tokio::select! {
                biased;
                sent = &mut send => break sent
                    .map_err(|e| anyhow!("NATS sink limit: publishing message {n} failed: {e}"))?,
                Some(r) = acks.next(), if !acks.is_empty() => tally.take(r)?,
            }
        };
        acks.push(ack.into_future());
        while acks.len() >= window {
            if let Some(r) = acks.next().await {
                tally.take(r)?;
            }
        }
        if last_print.elapsed() >= Duration::from_secs(3) {
            last_print = Instant::now();
            println!(
                "bench:   NATS sink limit: {} sent, {} acknowledged ({:.0} msgs/s)",
                n + 1,
                tally.acked,
                tally.acked as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    while let Some(r) = acks.next().await {
        tally.take(r)?;
    }
    let secs = started.elapsed().as_secs_f64();
    if tally.acked != total {
        bail!(
            "NATS sink limit: {} PubAcks for {total} messages",
            tally.acked
        );
    }
    if tally.duplicates > 0 {
        bail!(
            "NATS sink limit: {} of {total} messages were taken for duplicates (a stream left from an earlier run?)",
            tally.duplicates
        );
    }
    Ok(SinkRun { msgs: total, secs })
}

/// PubAcks taken so far.
#[derive(Default)]
struct Tally {
    acked: u64,
    duplicates: u64,
}

impl Tally {
    fn take(&mut self, r: Result<PublishAck, PublishError>) -> Result<()> {
        let ack = r.map_err(|e| anyhow!("NATS sink limit: a publish was not acknowledged: {e}"))?;
        self.acked += 1;
        self.duplicates += u64::from(ack.duplicate);
        Ok(())
    }
}
