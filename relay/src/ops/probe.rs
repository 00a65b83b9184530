//! The broker probe behind readiness: asks the broker every `metrics.poll_interval_ms` (at most
//! 5 s apart) and records the answer in [`crate::health::Health`].

use std::time::Duration;

use rdkafka::producer::{BaseProducer, Producer};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SinkKind};
use crate::health::Health;

/// Probes the broker until `shutdown`, recording the outcome in `health`.
pub async fn probe_broker(
    config: Config,
    health: std::sync::Arc<Health>,
    shutdown: CancellationToken,
) {
    let every = Duration::from_millis(config.metrics.poll_interval_ms.min(5_000));
    let kafka = match config.sink {
        SinkKind::Kafka => {
            match crate::sink::kafka::probe_config(&config.kafka).create::<BaseProducer>() {
                Ok(p) => Some(std::sync::Arc::new(p)),
                Err(e) => {
                    health.set_broker(Some(format!("cannot create a Kafka client: {e}")));
                    return;
                }
            }
        }
        SinkKind::Rocketmq | SinkKind::Nats | SinkKind::Rabbitmq => None,
    };
    // RabbitMQ: one connection, opened again when it is gone (nothing declared by the probe).
    let rabbit_config = crate::config::RabbitmqConfig {
        declare: false,
        ..config.rabbitmq.clone()
    };
    let mut rabbit: Option<lapin::Connection> = None;
    // NATS: one client, reconnecting by itself; each round asks JetStream for the account.
    let nats = match config.sink {
        SinkKind::Nats => match crate::sink::nats::connect(&config.nats, true).await {
            Ok(client) => Some(client),
            Err(e) => {
                health.set_broker(Some(e));
                return;
            }
        },
        _ => None,
    };
    // Whether the broker answered the last probe (`None` before the first).
    let mut answered: Option<bool> = None;
    loop {
        let outcome = match &kafka {
            Some(producer) => {
                let producer = producer.clone();
                // One topic's metadata (the dead-letter topic's; it need not exist) answers
                // whether the brokers do, without listing every topic of a big cluster.
                let topic = config.dead_letter.topic.clone();
                tokio::task::spawn_blocking(move || {
                    let answered = producer
                        .client()
                        .fetch_metadata(Some(&topic), Duration::from_secs(5))
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    // Serve the client's queued events (errors while the broker was away).
                    producer.poll(Duration::ZERO);
                    answered
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
            }
            None if config.sink == SinkKind::Rabbitmq => {
                if rabbit.as_ref().is_some_and(|c| c.status().connected()) {
                    Ok(())
                } else {
                    rabbit = None;
                    match crate::sink::rabbitmq::open_channel(&rabbit_config, "").await {
                        Ok((conn, _)) => {
                            rabbit = Some(conn);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            None => match &nats {
                Some(client) => crate::sink::nats::jetstream_answers(client).await,
                None => crate::ops::check::rocketmq_masters(&config)
                    .await
                    .map(|_| ()),
            },
        };
        // Said once per change, naming the setting: a newcomer whose broker is not there sees
        // why nothing is delivered (messages wait and are sent once it answers).
        match (&outcome, answered) {
            (Err(e), Some(true) | None) => {
                let (key, value) = broker_setting(&config);
                let env = crate::config::env_name(key);
                tracing::warn!(
                    "the broker does not answer ({key} = '{value}', {env}): {e}; is it running and \
                     reachable from here? Rows wait and are sent once it answers"
                );
            }
            (Ok(()), Some(false)) => tracing::info!("the broker answers again"),
            _ => {}
        }
        answered = Some(outcome.is_ok());
        health.set_broker(outcome.err());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The setting that says where the sink's broker is: its key and value.
fn broker_setting(config: &Config) -> (&'static str, String) {
    match config.sink {
        SinkKind::Kafka => ("kafka.brokers", config.kafka.brokers.clone()),
        SinkKind::Rocketmq => ("rocketmq.name_server", config.rocketmq.name_server.clone()),
        SinkKind::Nats => ("nats.url", crate::config::redact_url(&config.nats.url)),
        SinkKind::Rabbitmq => (
            "rabbitmq.url",
            crate::config::redact_url(&config.rabbitmq.url),
        ),
    }
}
