//! Liveness and readiness, for Kubernetes probes on the admin listener.
//!
//! `/healthz` answers while the process serves HTTP. `/readyz` answers 200 only while the relay
//! streams from its slot and the broker was reachable at the last probe (every
//! `metrics.poll_interval_ms`, at most 5 s apart): the standby of an HA pair, a relay waiting for
//! Postgres, or one whose broker is down reports 503 with the reasons.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::producer::{BaseProducer, Producer};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SinkKind};
use crate::metrics::STREAMING;

/// What the probes report; shared by the runtime (streaming) and the broker probe.
#[derive(Debug)]
pub struct Health {
    streaming: AtomicBool,
    /// Why the broker is not reachable (`None`: it answered at the last probe).
    broker: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            streaming: AtomicBool::new(false),
            broker: Mutex::new(Some("not probed yet".into())),
        }
    }
}

impl Health {
    /// The relay started (true) or stopped (false) streaming from its slot.
    pub fn set_streaming(&self, on: bool) {
        self.streaming.store(on, Ordering::Release);
        metrics::gauge!(STREAMING).set(if on { 1.0 } else { 0.0 });
    }

    pub fn streaming(&self) -> bool {
        self.streaming.load(Ordering::Acquire)
    }

    fn set_broker(&self, problem: Option<String>) {
        if let Ok(mut b) = self.broker.lock() {
            *b = problem;
        }
    }

    /// `Ok` when ready; otherwise every reason it is not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if !self.streaming() {
            why.push(
                "not streaming from the replication slot (starting, reconnecting, or another relay holds the slot)"
                    .to_owned(),
            );
        }
        if let Ok(b) = self.broker.lock()
            && let Some(problem) = b.as_ref()
        {
            why.push(format!("broker not reachable: {problem}"));
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}

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
        SinkKind::Rocketmq => None,
    };
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
            None => crate::check::rocketmq_masters(&config).await.map(|_| ()),
        };
        health.set_broker(outcome.err());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_streaming_with_a_reachable_broker() {
        let h = Health::default();
        let why = h.readiness().unwrap_err();
        assert_eq!(why.len(), 2, "{why:?}");
        h.set_broker(None);
        assert!(h.readiness().unwrap_err()[0].contains("not streaming"));
        h.set_streaming(true);
        assert!(h.readiness().is_ok());
        h.set_broker(Some("connection refused".into()));
        assert!(h.readiness().unwrap_err()[0].contains("connection refused"));
    }
}
