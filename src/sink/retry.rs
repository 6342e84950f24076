//! Retry policy for transient sink errors: exponential backoff with jitter (backon),
//! bounded by attempts and elapsed time, honouring a delay the sink asked for.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};

use crate::config::units;

/// `retry:` of a sink. By default transient errors are retried without limit (the queue
/// holds and the source is held back): nothing is dead-lettered just because a database
/// was down for a while. Set `max_attempts` or `max_elapsed` to give up into the dead letter.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included; 0 = no limit.
    #[serde(default)]
    pub max_attempts: u32,
    #[serde(default = "default_initial")]
    pub initial_delay: units::Duration,
    #[serde(default = "default_max")]
    pub max_delay: units::Duration,
    /// Give up once this long has passed since the first attempt.
    #[serde(default)]
    pub max_elapsed: Option<units::Duration>,
}

fn default_initial() -> units::Duration {
    units::Duration(Duration::from_millis(100))
}
fn default_max() -> units::Duration {
    units::Duration(Duration::from_secs(30))
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 0,
            initial_delay: default_initial(),
            max_delay: default_max(),
            max_elapsed: None,
        }
    }
}

/// The state of retrying one batch.
pub struct Backoff {
    config: RetryConfig,
    delays: backon::ExponentialBackoff,
    started: Instant,
    /// Attempts made so far.
    pub attempts: u32,
}

impl Backoff {
    pub fn new(config: RetryConfig) -> Self {
        let delays = ExponentialBuilder::default()
            .with_min_delay(config.initial_delay.0)
            .with_max_delay(config.max_delay.0)
            .with_factor(2.0)
            .with_jitter()
            // backon is built without its `std` feature, where every generator starts from
            // one fixed seed: each batch, lane and instance would wait the same
            // "random" delays and retry in lockstep. A seed of its own per backoff.
            .with_jitter_seed(rand::random())
            .without_max_times()
            .build();
        Backoff {
            config,
            delays,
            started: Instant::now(),
            attempts: 0,
        }
    }

    /// Records a failed attempt; returns how long to wait before the next one, or None
    /// when the policy says give up. `asked` is a delay the sink requested (Retry-After).
    pub fn next_delay(&mut self, asked: Option<Duration>) -> Option<Duration> {
        self.attempts += 1;
        if self.config.max_attempts != 0 && self.attempts >= self.config.max_attempts {
            return None;
        }
        let computed = self.delays.next().unwrap_or(self.config.max_delay.0);
        let delay = asked.map_or(computed, |a| a.max(computed));
        if let Some(limit) = self.config.max_elapsed
            && self.started.elapsed() + delay > limit.0
        {
            return None;
        }
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_attempts: u32, elapsed: Option<u64>) -> RetryConfig {
        RetryConfig {
            max_attempts,
            initial_delay: units::Duration(Duration::from_millis(100)),
            max_delay: units::Duration(Duration::from_secs(2)),
            max_elapsed: elapsed.map(|s| units::Duration(Duration::from_secs(s))),
        }
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let mut b = Backoff::new(cfg(3, None));
        assert!(b.next_delay(None).is_some());
        assert!(b.next_delay(None).is_some());
        assert!(b.next_delay(None).is_none());
        assert_eq!(b.attempts, 3);
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let mut b = Backoff::new(cfg(0, None));
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay(None).unwrap()).collect();
        assert!(delays[0] >= Duration::from_millis(100));
        // Jitter adds at most one more base delay, and the cap holds (base ≤ 2 s, jitter ≤ 2 s).
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(4)),
            "{delays:?}"
        );
        assert!(delays[11] >= Duration::from_secs(2), "{delays:?}");
    }

    #[test]
    fn jitter_differs_between_backoffs() {
        let delays = || {
            let mut b = Backoff::new(cfg(0, None));
            (0..8)
                .map(|_| b.next_delay(None).unwrap())
                .collect::<Vec<_>>()
        };
        // Equal sequences: the jitter is not random, and retries go out in lockstep.
        assert_ne!(delays(), delays());
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut b = Backoff::new(cfg(0, None));
        let d = b.next_delay(Some(Duration::from_secs(7))).unwrap();
        assert_eq!(d, Duration::from_secs(7));
    }

    #[test]
    fn elapsed_limit() {
        let mut b = Backoff::new(cfg(0, Some(1)));
        assert!(b.next_delay(Some(Duration::from_secs(5))).is_none());
    }
}
