//! What the sinks that wait for a broker's confirmation per message (NATS JetStream, RabbitMQ)
//! share: the outcome of one send, the loop that sends again until the broker stores the message
//! or refuses it for good, and the set of sends in flight ([`InFlight`]).

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{AckToken, Delivery, OutboxMessage};
use crate::config::{Config, RetryConfig};

/// How one send of a message ended.
pub enum Attempt {
    /// The broker confirmed it.
    Stored,
    /// Refused for good (too large, nowhere to go): counted toward `dead_letter.max_attempts`.
    Refused(String),
    /// Not confirmed (timeout, lost connection, nack): sent again, without limit.
    Transient(String),
}

/// How to retry, and where to report.
struct Policy {
    retry: RetryConfig,
    max_attempts: u32,
    ack_metrics: crate::metrics::AckMetrics,
    /// The broker's name, for the log.
    broker: &'static str,
}

/// The messages a sink has handed to its broker and not yet reported: one task each, which
/// waits for the confirmation and sends again until the broker stores the message. Dropping it
/// abandons them (the relay re-reads whatever was not confirmed).
pub struct InFlight {
    policy: Arc<Policy>,
    deliveries: mpsc::UnboundedSender<Delivery>,
    sends: JoinSet<()>,
}

impl InFlight {
    pub fn new(
        config: &Config,
        broker: &'static str,
        deliveries: mpsc::UnboundedSender<Delivery>,
    ) -> InFlight {
        InFlight {
            policy: Arc::new(Policy {
                retry: config.retry.clone(),
                max_attempts: config.dead_letter.max_attempts,
                ack_metrics: crate::metrics::AckMetrics::new(),
                broker,
            }),
            deliveries,
            sends: JoinSet::new(),
        }
    }

    /// Follows one message: `first` is the outcome of its first send (already on its way),
    /// `again` sends it once more. Reports it `Acked`, or `Failed` after `dead_letter.max_attempts`
    /// refusals.
    pub fn spawn<F, A, G>(&mut self, msg: OutboxMessage, token: AckToken, first: F, again: A)
    where
        F: Future<Output = Attempt> + Send + 'static,
        A: FnMut() -> G + Send + 'static,
        G: Future<Output = Attempt> + Send,
    {
        while self.sends.try_join_next().is_some() {}
        let policy = self.policy.clone();
        let deliveries = self.deliveries.clone();
        self.sends.spawn(async move {
            let first = first.await;
            until_stored(&policy, first, msg, token, deliveries, again).await;
        });
    }

    /// Waits up to `timeout` for the messages in flight; returns how many are left.
    pub async fn flush(&mut self, timeout: Duration) -> usize {
        flush(&mut self.sends, timeout).await
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.sends.abort_all();
    }
}

/// Reports `first` or, until the broker stores the message, sends it again with backoff
/// (`again`); after `max_attempts` refusals reports it `Failed` with the message for the
/// dead-letter record.
async fn until_stored<F, Fut>(
    policy: &Policy,
    first: Attempt,
    msg: OutboxMessage,
    mut token: AckToken,
    deliveries: mpsc::UnboundedSender<Delivery>,
    mut again: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt>,
{
    let mut delays = crate::retry::backoff(&policy.retry).build();
    let mut refusals = 0;
    let mut outcome = first;
    loop {
        match outcome {
            Attempt::Stored => {
                policy.ack_metrics.acked(token.commit_time, token.handed_at);
                let _ = deliveries.send(Delivery::Acked(token));
                return;
            }
            Attempt::Refused(error) => {
                refusals += 1;
                if refusals >= policy.max_attempts {
                    let _ = deliveries.send(Delivery::Failed {
                        token,
                        error,
                        message: Box::new(msg),
                    });
                    return;
                }
                tracing::warn!(id = %msg.id, broker = policy.broker, attempt = refusals, %error, "the broker refused the message; trying again");
            }
            Attempt::Transient(error) => {
                tracing::warn!(id = %msg.id, broker = policy.broker, %error, "the message was not confirmed; sending it again");
            }
        }
        token.attempt += 1;
        metrics::counter!(crate::metrics::RETRIES, "stage" => "broker").increment(1);
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(30))).await;
        outcome = again().await;
    }
}

/// Waits up to `timeout` for the sends in flight; returns how many are left.
pub async fn flush(sends: &mut JoinSet<()>, timeout: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    while !sends.is_empty() {
        match tokio::time::timeout_at(deadline, sends.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    sends.len()
}
