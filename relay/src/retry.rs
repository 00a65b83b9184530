//! The relay's one backoff: exponential with jitter, from `[retry]`, used by every retry.

use std::time::Duration;

use backon::ExponentialBuilder;
use tokio_util::sync::CancellationToken;

use crate::config::RetryConfig;

/// The exponential backoff with jitter used for every retry in the relay (unbounded: callers
/// that must give up add `.with_max_times(n)`).
pub fn backoff(cfg: &RetryConfig) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(cfg.initial_delay_ms))
        .with_max_delay(Duration::from_millis(cfg.max_delay_ms))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// Sleeps; true if `shutdown` was requested meanwhile.
pub async fn sleep_or_shutdown(wait: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = shutdown.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn backoff_grows_and_is_capped() {
        let cfg = RetryConfig {
            initial_delay_ms: 100,
            max_delay_ms: 1_000,
        };
        let delays: Vec<_> = backoff(&cfg).build().take(10).collect();
        assert_eq!(delays.len(), 10);
        // Jitter adds up to one base delay; the cap bounds the base.
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(2_000)));
        assert!(delays[9] >= Duration::from_millis(1_000));
    }
}
