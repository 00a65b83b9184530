//! RabbitMQ: the queue the relay's messages are routed to, and the sink-limit publisher (lapin,
//! the relay's client, on a confirm-mode channel opened by the relay's own
//! `outbox_relay::sink::rabbitmq::open_channel`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicPublishOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use outbox_relay::config::{DeadLetterConfig, PipelineConfig, RabbitmqConfig};

use crate::kafka::{Msg, SinkRun};

/// The durable queue bound with `#` to the relay's exchange: every routing key reaches it, so no
/// message is returned as unroutable (which the relay would dead-letter).
pub const QUEUE: &str = "bench";

/// The relay's RabbitMQ settings (defaults: exchange `outbox`, topic, durable, routing key
/// `{aggregatetype}.{type}`) for the broker at `url`.
pub fn config(url: &str) -> RabbitmqConfig {
    RabbitmqConfig {
        url: url.to_owned(),
        ..Default::default()
    }
}

/// A connection and a confirm-mode channel as the relay opens them (declaring the exchange and
/// the dead-letter queue), tried until the node answers or `timeout` passes (the AMQP port
/// opens a moment before the node takes connections).
pub async fn open(url: &str, timeout: Duration) -> Result<(Connection, Channel)> {
    let config = config(url);
    let dead_letter = DeadLetterConfig::default().topic;
    let deadline = Instant::now() + timeout;
    loop {
        match outbox_relay::sink::rabbitmq::open_channel(&config, &dead_letter).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                bail!("RabbitMQ did not take a connection within {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Declares the durable queue [`QUEUE`] and binds it with `#` to the relay's exchange.
pub async fn declare_queue(channel: &Channel) -> Result<()> {
    let exchange = RabbitmqConfig::default().exchange;
    channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring the durable queue {QUEUE}"))?;
    channel
        .queue_bind(
            QUEUE.into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding queue {QUEUE} to exchange {exchange} with '#'"))?;
    Ok(())
}

/// Messages in [`QUEUE`] now.
pub async fn queue_depth(channel: &Channel) -> Result<u64> {
    let q = channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("looking at queue {QUEUE}"))?;
    Ok(u64::from(q.message_count()))
}

/// Empties [`QUEUE`]; returns how many messages it held.
pub async fn purge(channel: &Channel) -> Result<u64> {
    let n = channel
        .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await
        .with_context(|| format!("purging queue {QUEUE}"))?;
    Ok(u64::from(n))
}

/// The properties the relay gives a row's message: persistent, `message_id` = the outbox id,
/// `type`, JSON content type, a timestamp, and the row's headers plus `aggregateid`.
fn properties(m: &Msg) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in [
        ("id", &m.id),
        ("type", &m.event_type),
        ("aggregatetype", &m.aggregatetype),
        ("aggregateid", &m.key),
    ] {
        headers.insert(
            name.into(),
            AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
        );
    }
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(m.id.as_str().into())
        .with_content_type("application/json".into())
        .with_timestamp(timestamp)
        .with_app_id("outbox-bench".into())
        .with_headers(headers);
    if let Ok(kind) = ShortString::try_new(m.event_type.clone()) {
        p = p.with_type(kind);
    }
    p
}

/// The sink limit: `msgs` published persistent and `mandatory` to the relay's exchange with the
/// relay's routing key (`{aggregatetype}.{type}`: they reach [`QUEUE`]) on one confirm-mode
/// channel, every confirm awaited, pipelined as the relay does it (up to
/// `pipeline.max_in_flight` publishes unconfirmed). Timed from the first publish to the last
/// confirm; a nack, a returned message or a closed channel fails the run.
pub async fn sink_limit(url: &str, msgs: &[Msg]) -> Result<SinkRun> {
    let (conn, channel) = open(url, Duration::from_secs(30)).await?;
    let exchange: ShortString = RabbitmqConfig::default().exchange.as_str().into();
    let window = PipelineConfig::default().max_in_flight.max(1);
    let total = msgs.len() as u64;
    let mut confirms = FuturesUnordered::new();
    let mut confirmed = 0_u64;
    let started = Instant::now();
    let mut last_print = Instant::now();
    for (n, m) in msgs.iter().enumerate() {
        let routing_key = ShortString::try_new(format!("{}.{}", m.aggregatetype, m.event_type))
            .map_err(|_| anyhow!("RabbitMQ sink limit: routing key of message {n} too long"))?;
        let publish = channel.basic_publish(
            exchange.clone(),
            routing_key,
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            m.payload.as_bytes(),
            properties(m),
        );
        tokio::pin!(publish);
        let confirm = loop {
            tokio::select! {
                biased;
                sent = &mut publish => break sent
                    .map_err(|e| anyhow!("RabbitMQ sink limit: publishing message {n} failed: {e}"))?,
                Some(c) = confirms.next(), if !confirms.is_empty() => {
                    take(c)?;
                    confirmed += 1;
                }
            }
        };
        confirms.push(confirm);
        while confirms.len() >= window {
            if let Some(c) = confirms.next().await {
                take(c)?;
                confirmed += 1;
            }
        }
        if last_print.elapsed() >= Duration::from_secs(3) {
            last_print = Instant::now();
            println!(
                "bench:   RabbitMQ sink limit: {} sent, {confirmed} confirmed ({:.0} msgs/s)",
                n + 1,
                confirmed as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    while let Some(c) = confirms.next().await {
        take(c)?;
        confirmed += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    if confirmed != total {
        bail!("RabbitMQ sink limit: {confirmed} confirms for {total} messages");
    }
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(SinkRun { msgs: total, secs })
}

/// A confirm that is not a plain ack fails the run.
fn take(c: lapin::Result<Confirmation>) -> Result<()> {
    match c {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => bail!(
            "RabbitMQ sink limit: a message was returned as unroutable ({} {}): is queue {QUEUE} bound?",
            returned.reply_code,
            returned.reply_text
        ),
        Ok(Confirmation::Nack(_)) => bail!("RabbitMQ sink limit: the broker nacked a message"),
        Ok(Confirmation::NotRequested) => {
            bail!("RabbitMQ sink limit: the channel is not in confirm mode")
        }
        Err(e) => bail!("RabbitMQ sink limit: the channel failed before confirming: {e}"),
    }
}
