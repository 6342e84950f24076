//! Retry policy for transient sink errors: exponential backoff with jitter (backon),
//! bounded by attempts and elapsed time, honouring a delay the sink asked for.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::sinks::RetryConfig;

/// Whether a record may be tried again after `delay` under `config`: it has been
/// attempted `attempts` times, the first `elapsed` ago. Each record has its own budget, so
/// a record that keeps failing is given up on however well its batch does.
pub fn allows(config: &RetryConfig, attempts: u32, elapsed: Duration, delay: Duration) -> bool {
    (config.max_attempts == 0 || attempts < config.max_attempts)
        && config
            .max_elapsed
            .is_none_or(|limit| elapsed + delay <= limit.0)
}

/// The waits between rounds of retries: exponential with jitter from `initial_delay` to
/// `max_delay`, starting over once a round makes progress.
pub struct Backoff {
    config: RetryConfig,
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new(config: RetryConfig) -> Self {
        Backoff {
            config,
            delays: delays(config),
        }
    }

    /// Starts over from `initial_delay` (a round delivered something: the sink is
    /// working, and what failed is worth trying again soon).
    pub fn reset(&mut self) {
        self.delays = delays(self.config);
    }

    /// How long to wait before the next round; `asked` is a delay the sink requested
    /// (Retry-After), honoured when longer.
    pub fn next_delay(&mut self, asked: Option<Duration>) -> Duration {
        let computed = self.delays.next().unwrap_or(self.config.max_delay.0);
        asked.map_or(computed, |a| a.max(computed))
    }
}

fn delays(config: RetryConfig) -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(config.initial_delay.0)
        .with_max_delay(config.max_delay.0)
        .with_factor(2.0)
        .with_jitter()
        // backon is built without its `std` feature, where every generator starts from one
        // fixed seed: each batch, lane and instance would wait the same "random" delays
        // and retry in lockstep. A seed of its own per backoff.
        .with_jitter_seed(rand::random())
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units;

    fn cfg(max_attempts: u32, elapsed: Option<u64>) -> RetryConfig {
        RetryConfig {
            max_attempts,
            initial_delay: units::Duration(Duration::from_millis(100)),
            max_delay: units::Duration(Duration::from_secs(2)),
            max_elapsed: elapsed.map(|s| units::Duration(Duration::from_secs(s))),
        }
    }

    #[test]
    fn each_record_gives_up_after_max_attempts() {
        let c = cfg(3, None);
        let no_time = Duration::ZERO;
        assert!(allows(&c, 1, no_time, no_time));
        assert!(allows(&c, 2, no_time, no_time));
        assert!(!allows(&c, 3, no_time, no_time));
        assert!(
            allows(&cfg(0, None), 1_000_000, no_time, no_time),
            "0 = no limit"
        );
    }

    #[test]
    fn elapsed_limit_counts_the_next_wait() {
        let c = cfg(0, Some(10));
        assert!(allows(
            &c,
            5,
            Duration::from_secs(8),
            Duration::from_secs(2)
        ));
        assert!(!allows(
            &c,
            5,
            Duration::from_secs(8),
            Duration::from_secs(3)
        ));
    }

    #[test]
    fn delays_grow_are_capped_and_start_over_on_reset() {
        let mut b = Backoff::new(cfg(0, None));
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay(None)).collect();
        assert!(delays[0] >= Duration::from_millis(100));
        // Jitter adds at most one more base delay, and the cap holds (base ≤ 2 s, jitter ≤ 2 s).
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(4)),
            "{delays:?}"
        );
        assert!(delays[11] >= Duration::from_secs(2), "{delays:?}");
        b.reset();
        let first = b.next_delay(None);
        assert!(first < Duration::from_millis(200), "{first:?}");
    }

    #[test]
    fn jitter_differs_between_backoffs() {
        let delays = || {
            let mut b = Backoff::new(cfg(0, None));
            (0..8).map(|_| b.next_delay(None)).collect::<Vec<_>>()
        };
        // Equal sequences: the jitter is not random, and retries go out in lockstep.
        assert_ne!(delays(), delays());
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut b = Backoff::new(cfg(0, None));
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
    }
}
