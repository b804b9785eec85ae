//! Per-client command rate limits as token buckets. A command always runs; one that takes
//! the bucket below zero makes the session stop reading until the bucket has refilled, so
//! a client over its rate is slowed, never refused.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::Instant;

use crate::config::{Config, RateLimit};

/// One rate's tokens.
#[derive(Debug)]
struct Bucket {
    limit: RateLimit,
    /// May go below zero by one command: the debt that pauses reading.
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(limit: RateLimit, now: Instant) -> Self {
        Bucket {
            limit,
            tokens: f64::from(limit.burst.max(1)),
            refilled: now,
        }
    }

    /// Takes one token; returns when the bucket is out of debt again, if it is in debt.
    fn take(&mut self, now: Instant) -> Option<Instant> {
        let burst = f64::from(self.limit.burst.max(1));
        let rate = burst / self.limit.per.as_secs_f64().max(1e-9);
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| now + std::time::Duration::from_secs_f64(-self.tokens / rate))
    }
}

/// A client's buckets: the overall one and one per limited command.
#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    overall: Option<Bucket>,
    by_command: HashMap<Arc<str>, Bucket>,
    /// Reading resumes then.
    paused_until: Option<Instant>,
}

impl RateLimits {
    /// True if the configuration limits anything: otherwise nothing is ever counted.
    pub(crate) fn configured(config: &Config) -> bool {
        config.rate_limit.is_some() || !config.command_rate_limits.is_empty()
    }

    /// Counts one command against the client's limits.
    pub(crate) fn record(&mut self, config: &Config, command: &str) {
        let now = Instant::now();
        let mut until = None;
        if let Some(limit) = config.rate_limit {
            let bucket = self.overall.get_or_insert_with(|| Bucket::new(limit, now));
            until = until.max(bucket.take(now));
        }
        if let Some(&limit) = config.command_rate_limits.get(command) {
            let bucket = match self.by_command.get_mut(command) {
                Some(bucket) => bucket,
                None => self
                    .by_command
                    .entry(command.into())
                    .or_insert_with(|| Bucket::new(limit, now)),
            };
            until = until.max(bucket.take(now));
        }
        if until.is_some() {
            self.paused_until = self.paused_until.max(until);
        }
    }

    /// When reading may resume, while it is paused.
    pub(crate) fn paused_until(&self) -> Option<Instant> {
        self.paused_until.filter(|&until| until > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_the_rate_holds() {
        let config = Config {
            rate_limit: Some(RateLimit {
                burst: 3,
                per: Duration::from_secs(1),
            }),
            ..Config::default()
        };
        let mut limits = RateLimits::default();
        for _ in 0..3 {
            limits.record(&config, "x");
            assert_eq!(limits.paused_until(), None);
        }
        limits.record(&config, "x");
        let wait = limits.paused_until().expect("in debt") - Instant::now();
        assert!(wait > Duration::from_millis(330) && wait < Duration::from_millis(340));
        tokio::time::advance(Duration::from_millis(334)).await;
        assert_eq!(limits.paused_until(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_limit_counts_only_that_command() {
        let mut config = Config::default();
        config
            .command_rate_limits
            .insert("slow".into(), RateLimit::per_second(1));
        let mut limits = RateLimits::default();
        for _ in 0..10 {
            limits.record(&config, "fast");
        }
        assert_eq!(limits.paused_until(), None);
        limits.record(&config, "slow");
        limits.record(&config, "slow");
        assert!(limits.paused_until().is_some());
    }
}
