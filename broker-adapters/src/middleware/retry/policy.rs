//! [`RetryPolicy`]: how often and how long to wait between in-handler attempts.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::num::NonZeroU32;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// A validated retry policy: capped exponential backoff with jitter.
///
/// # Invariants
///
/// Checked by [`new`](Self::new) and [`with_multiplier`](Self::with_multiplier),
/// so every value of this type holds them:
///
/// - `max_attempts ≥ 1` (1 means "no in-handler retry");
/// - `initial_backoff ≤ max_backoff`;
/// - `multiplier` is finite and `≥ 1.0`, so backoffs never shrink.
///
/// # Backoff
///
/// Before retry `n` (the wait after attempt `n` failed, `n ≥ 1`) the nominal
/// backoff is `min(max_backoff, initial_backoff × multiplier^(n-1))`; the
/// actual wait is drawn from `[nominal / 2, nominal]` ("equal jitter"), so
/// consumers that failed together do not retry in lock-step, and a wait is
/// never shorter than half the nominal one. The jitter is a hash of the event
/// id and `n`: cheap, different for every event, and reproducible.
///
/// ```
/// use std::time::Duration;
/// use broker_adapters::middleware::RetryPolicy;
///
/// let policy = RetryPolicy::new(4, Duration::from_millis(100), Duration::from_secs(1))?;
/// assert_eq!(policy.nominal_backoff(1), Duration::from_millis(100));
/// assert_eq!(policy.nominal_backoff(2), Duration::from_millis(200));
/// assert_eq!(policy.nominal_backoff(9), Duration::from_secs(1)); // capped
///
/// let wait = policy.backoff(2, "event-id");
/// assert!(wait >= Duration::from_millis(100) && wait <= Duration::from_millis(200));
///
/// assert!(RetryPolicy::new(0, Duration::ZERO, Duration::ZERO).is_err());
/// # Ok::<(), broker_adapters::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    max_attempts: NonZeroU32,
    initial_backoff: Duration,
    max_backoff: Duration,
    multiplier: f64,
}

impl RetryPolicy {
    /// The default number of attempts per delivery: 3.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// The default first backoff: 100 ms.
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
    /// The default backoff cap: 2 s.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(2);
    /// The default growth factor: 2.
    pub const DEFAULT_MULTIPLIER: f64 = 2.0;

    /// A policy of up to `max_attempts` attempts per delivery, waiting from
    /// `initial_backoff` doubling up to `max_backoff` between them.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if `max_attempts` is 0 or `initial_backoff`
    /// exceeds `max_backoff`.
    pub fn new(
        max_attempts: u32,
        initial_backoff: Duration,
        max_backoff: Duration,
    ) -> Result<Self> {
        let max_attempts = NonZeroU32::new(max_attempts).ok_or_else(|| {
            config_error(
                "retry.max_attempts",
                "at least one attempt is needed".into(),
            )
        })?;
        if initial_backoff > max_backoff {
            return Err(config_error(
                "retry.initial_backoff",
                format!("{initial_backoff:?} exceeds the maximum backoff {max_backoff:?}"),
            ));
        }
        Ok(Self {
            max_attempts,
            initial_backoff,
            max_backoff,
            multiplier: Self::DEFAULT_MULTIPLIER,
        })
    }

    /// The same policy with backoffs growing by `multiplier` (default 2).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if `multiplier` is below 1 or not finite.
    pub fn with_multiplier(self, multiplier: f64) -> Result<Self> {
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(config_error(
                "retry.multiplier",
                format!("{multiplier} is not a finite number of at least 1"),
            ));
        }
        Ok(Self { multiplier, ..self })
    }

    /// Attempts per delivery, the first included.
    pub fn max_attempts(&self) -> NonZeroU32 {
        self.max_attempts
    }

    /// The nominal wait before the first retry.
    pub fn initial_backoff(&self) -> Duration {
        self.initial_backoff
    }

    /// The cap on the nominal wait.
    pub fn max_backoff(&self) -> Duration {
        self.max_backoff
    }

    /// The growth factor of the nominal wait.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The nominal (un-jittered) wait before retry `retry` (from 1):
    /// `min(max_backoff, initial_backoff × multiplier^(retry-1))`.
    pub fn nominal_backoff(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        Duration::try_from_secs_f64(secs).map_or(self.max_backoff, |d| d.min(self.max_backoff))
    }

    /// The jittered wait before retry `retry` (from 1) of the event with id
    /// `event_id`: in `[nominal / 2, nominal]`, see the type's docs.
    pub fn backoff(&self, retry: u32, event_id: &str) -> Duration {
        let nominal = self.nominal_backoff(retry);
        let half = nominal / 2;
        let mut hasher = DefaultHasher::new();
        (event_id, retry).hash(&mut hasher);
        // A uniform fraction in [0, 1] from the hash's top 53 bits.
        #[allow(clippy::cast_precision_loss)]
        let fraction = (hasher.finish() >> 11) as f64 / (1_u64 << 53) as f64;
        half + (nominal - half).mul_f64(fraction)
    }
}

impl Default for RetryPolicy {
    /// 3 attempts, 100 ms doubling up to 2 s.
    fn default() -> Self {
        Self {
            max_attempts: NonZeroU32::new(Self::DEFAULT_MAX_ATTEMPTS).unwrap_or(NonZeroU32::MIN),
            initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
            multiplier: Self::DEFAULT_MULTIPLIER,
        }
    }
}

fn config_error(key: &str, reason: String) -> Error {
    Error::new(ErrorKind::Config {
        key: key.into(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn invariants_are_checked() {
        for (policy, key) in [
            (RetryPolicy::new(0, MS, MS), "max_attempts"),
            (RetryPolicy::new(1, 2 * MS, MS), "initial_backoff"),
            (RetryPolicy::default().with_multiplier(0.5), "multiplier"),
            (
                RetryPolicy::default().with_multiplier(f64::NAN),
                "multiplier",
            ),
            (
                RetryPolicy::default().with_multiplier(f64::INFINITY),
                "multiplier",
            ),
        ] {
            let err = policy.expect_err(key);
            assert!(
                matches!(err.kind(), ErrorKind::Config { key: k, .. } if k.ends_with(key)),
                "{err}"
            );
        }
        let ok = RetryPolicy::new(1, Duration::ZERO, Duration::ZERO).expect("valid");
        assert_eq!(ok.max_attempts().get(), 1);
        assert_eq!(ok.backoff(1, "e"), Duration::ZERO);
    }

    #[test]
    fn nominal_backoff_grows_and_is_capped() {
        let policy = RetryPolicy::new(10, 10 * MS, 100 * MS)
            .and_then(|p| p.with_multiplier(3.0))
            .expect("valid");
        let waits: Vec<Duration> = (1..=5).map(|n| policy.nominal_backoff(n)).collect();
        assert_eq!(waits, [10 * MS, 30 * MS, 90 * MS, 100 * MS, 100 * MS]);
        assert_eq!(policy.nominal_backoff(u32::MAX), 100 * MS, "no overflow");
        assert_eq!(policy.nominal_backoff(0), 10 * MS, "retry 0 reads as 1");
    }

    #[test]
    fn jitter_stays_within_half_to_full_and_varies() {
        let policy = RetryPolicy::new(5, 100 * MS, 800 * MS).expect("valid");
        let mut distinct = std::collections::HashSet::new();
        for i in 0..200 {
            let id = format!("event-{i}");
            for retry in 1..5 {
                let nominal = policy.nominal_backoff(retry);
                let wait = policy.backoff(retry, &id);
                assert!(
                    wait >= nominal / 2 && wait <= nominal,
                    "{wait:?} vs {nominal:?}"
                );
                assert_eq!(wait, policy.backoff(retry, &id), "reproducible");
            }
            distinct.insert(policy.backoff(1, &id));
        }
        assert!(
            distinct.len() > 100,
            "jitter spreads events: {}",
            distinct.len()
        );
    }
}
