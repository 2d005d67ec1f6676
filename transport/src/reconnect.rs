//! The ReconnectManager: when to try again, and when to stop trying so hard.
//!
//! This module is the only user of the `backoff` crate (unmaintained upstream): swapping it out
//! touches nothing else. The manager is pure — time comes in as arguments, decisions go out as
//! [`NextStep`] values — so every rule here is tested without sockets or sleeps.
//!
//! Rules, in order:
//! 1. A connection that stayed up for the stability window and then dropped is retried *at once*
//!    (jittered over `fast_retry_spread`, 0–250 ms by default) with the sequence reset.
//! 2. Every failed attempt, and every connection that died inside the stability window
//!    (flapping), is a failure: the next delay comes from the strategy's sequence with ±jitter.
//! 3. After `max_attempts` consecutive failures the circuit breaker opens: the connection is
//!    suspended and probed every `suspend_interval` forever (or fails, if so configured).
//! 4. Manual reconnects skip the wait but are rate-limited to one per `manual_reconnect_interval`.

use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use tokio::time::Instant;

use crate::breaker::{BreakerState, CircuitBreaker};
use crate::protocol::RetryWindow;

/// How delays grow between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconnectStrategy {
    /// `initial × multiplier^n`, capped at `max_delay` (default).
    Exponential,
    /// `initial × (n + 1)`, capped at `max_delay`.
    Linear,
    /// No delay between attempts (the breaker still bounds them).
    Immediate,
    /// No automatic attempts: only `reconnect_now()` connects again.
    Manual,
}

impl std::str::FromStr for ReconnectStrategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "exponential" | "exponential_backoff" => Ok(ReconnectStrategy::Exponential),
            "linear" | "linear_backoff" => Ok(ReconnectStrategy::Linear),
            "immediate" => Ok(ReconnectStrategy::Immediate),
            "manual" => Ok(ReconnectStrategy::Manual),
            other => Err(format!(
                "unknown strategy {other:?} (exponential, linear, immediate, manual)"
            )),
        }
    }
}

/// What to do when `max_attempts` consecutive attempts have failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Go `Suspended` and probe at `suspend_interval` forever (default).
    Suspend,
    /// Go `Failed`: no more automatic attempts.
    Fail,
}

/// Default first retry delay: 1 s.
pub const DEFAULT_INITIAL_DELAY: Duration = Duration::from_secs(1);
/// Default delay cap: 60 s.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(60);
/// Default growth factor: ×2.
pub const DEFAULT_MULTIPLIER: f64 = 2.0;
/// Default jitter: ±25 % (uniform in `[0.75·d, 1.25·d]`).
pub const DEFAULT_JITTER: f64 = 0.25;
/// Default consecutive failures before the breaker opens: 10.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Default probe interval while suspended: 60 s.
pub const DEFAULT_SUSPEND_INTERVAL: Duration = Duration::from_secs(60);
/// Default stability window: a connection up this long counts as a success, 2 s.
pub const DEFAULT_STABILITY_WINDOW: Duration = Duration::from_secs(2);
/// Default spread of the immediate retry after a stable connection drops: 250 ms.
pub const DEFAULT_FAST_RETRY_SPREAD: Duration = Duration::from_millis(250);
/// Default successes needed to close a half-open breaker: 2 stability windows.
pub const DEFAULT_BREAKER_SUCCESS_THRESHOLD: u32 = 2;
/// Default minimum interval between manual reconnects: 1 s.
pub const DEFAULT_MANUAL_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// Every knob of the reconnection behaviour. Built and validated through
/// [`TransportConfig`](crate::config::TransportConfig)'s builder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReconnectPolicy {
    /// How delays grow. Default [`ReconnectStrategy::Exponential`].
    pub strategy: ReconnectStrategy,
    /// First delay of the sequence. Default [`DEFAULT_INITIAL_DELAY`].
    pub initial_delay: Duration,
    /// Cap of the sequence (before jitter). Default [`DEFAULT_MAX_DELAY`].
    pub max_delay: Duration,
    /// Exponential growth factor. Default [`DEFAULT_MULTIPLIER`].
    pub multiplier: f64,
    /// Relative jitter in `[0, 1)`. Default [`DEFAULT_JITTER`].
    pub jitter: f64,
    /// Consecutive failures before the breaker opens; `None` = never. Default 10.
    pub max_attempts: Option<u32>,
    /// Suspend (default) or fail when attempts are exhausted.
    pub on_exhausted: OnExhausted,
    /// Probe interval while suspended. Default [`DEFAULT_SUSPEND_INTERVAL`].
    pub suspend_interval: Duration,
    /// How long a connection must stay up to count as stable. Default
    /// [`DEFAULT_STABILITY_WINDOW`].
    pub stability_window: Duration,
    /// Spread of the immediate retry after a stable connection drops. Default
    /// [`DEFAULT_FAST_RETRY_SPREAD`].
    pub fast_retry_spread: Duration,
    /// Stable windows needed to close a half-open breaker. Default
    /// [`DEFAULT_BREAKER_SUCCESS_THRESHOLD`].
    pub breaker_success_threshold: u32,
    /// Minimum interval between manual reconnects. Default
    /// [`DEFAULT_MANUAL_RECONNECT_INTERVAL`].
    pub manual_reconnect_interval: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            strategy: ReconnectStrategy::Exponential,
            initial_delay: DEFAULT_INITIAL_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            multiplier: DEFAULT_MULTIPLIER,
            jitter: DEFAULT_JITTER,
            max_attempts: Some(DEFAULT_MAX_ATTEMPTS),
            on_exhausted: OnExhausted::Suspend,
            suspend_interval: DEFAULT_SUSPEND_INTERVAL,
            stability_window: DEFAULT_STABILITY_WINDOW,
            fast_retry_spread: DEFAULT_FAST_RETRY_SPREAD,
            breaker_success_threshold: DEFAULT_BREAKER_SUCCESS_THRESHOLD,
            manual_reconnect_interval: DEFAULT_MANUAL_RECONNECT_INTERVAL,
        }
    }
}

/// The manager's decision after a connection ended or an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NextStep {
    /// Go `Disconnected` and try again after `delay`; that will be attempt number `attempt`.
    Retry {
        /// How long to wait.
        delay: Duration,
        /// The number the next attempt will have.
        attempt: u32,
    },
    /// The breaker is open: go `Suspended` and probe after `probe_in`.
    Suspend {
        /// How long until the probe.
        probe_in: Duration,
        /// Consecutive failures that opened the breaker.
        failures: u32,
    },
    /// Manual strategy: go `Disconnected` and wait for `reconnect_now()`.
    WaitForManual,
    /// Attempts exhausted and the policy says fail.
    GiveUp {
        /// Attempts made.
        attempts: u32,
    },
}

/// What a stability-window check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stability {
    /// The connection counts as stable; the breaker is closed and the sequence reset.
    Stable,
    /// The breaker is still half-open: check again after another window.
    CheckAgainIn(Duration),
}

/// Decides every reconnection step. See the module docs for the rules.
#[derive(Debug)]
pub struct ReconnectManager {
    policy: ReconnectPolicy,
    backoff: ExponentialBackoff,
    breaker: CircuitBreaker,
    rng: StdRng,
    /// Number of the most recently begun attempt in the current outage (0 when none).
    attempt: u32,
    /// Delays drawn from the sequence since the last reset (for the linear strategy).
    drawn: u32,
    connected_at: Option<Instant>,
    stable_counted: bool,
    last_manual: Option<Instant>,
}

impl ReconnectManager {
    /// A manager for `policy`. `seed` makes the jitter reproducible (soak runs, tests); `None`
    /// seeds from the OS.
    pub fn new(policy: ReconnectPolicy, seed: Option<u64>) -> Self {
        let backoff = ExponentialBackoff {
            current_interval: policy.initial_delay,
            initial_interval: policy.initial_delay,
            // Jitter is applied here, with a seedable generator, rather than by the crate.
            randomization_factor: 0.0,
            multiplier: policy.multiplier,
            max_interval: policy.max_delay,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        let breaker = CircuitBreaker::new(
            policy.max_attempts.unwrap_or(u32::MAX),
            policy.breaker_success_threshold,
            policy.suspend_interval,
        );
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        ReconnectManager {
            policy,
            backoff,
            breaker,
            rng,
            attempt: 0,
            drawn: 0,
            connected_at: None,
            stable_counted: false,
            last_manual: None,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &ReconnectPolicy {
        &self.policy
    }

    /// Number of the most recent attempt of the current outage (0 when connected and stable).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The breaker's current position.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// An attempt is going out now; returns its number.
    pub fn begin_attempt(&mut self, now: Instant) -> u32 {
        // A probe out of an open breaker puts it half-open.
        if !self.breaker.allows_attempt(now) {
            self.breaker.force_probe();
        }
        self.attempt = self.attempt.saturating_add(1);
        self.attempt
    }

    /// The handshake completed at `now`. Returns when to check stability.
    pub fn on_connected(&mut self, now: Instant) -> Duration {
        self.connected_at = Some(now);
        self.stable_counted = false;
        self.policy.stability_window
    }

    /// The stability timer fired: the connection has been up for a window.
    pub fn on_stable(&mut self, _now: Instant) -> Stability {
        self.breaker.record_success();
        self.stable_counted = true;
        if self.breaker.state() == BreakerState::Closed {
            self.reset_sequence();
            Stability::Stable
        } else {
            Stability::CheckAgainIn(self.policy.stability_window)
        }
    }

    /// An established connection was lost at `now`.
    pub fn on_connection_lost(&mut self, now: Instant) -> NextStep {
        let age = self
            .connected_at
            .take()
            .map(|at| now.saturating_duration_since(at))
            .unwrap_or_default();
        let stable = age >= self.policy.stability_window;
        if stable && !self.stable_counted {
            // The timer may not have run yet (same instant); the rule is about age.
            self.on_stable(now);
        }
        if stable && self.breaker.state() == BreakerState::Closed {
            self.reset_sequence();
            if self.policy.strategy == ReconnectStrategy::Manual {
                return NextStep::WaitForManual;
            }
            let spread = self.policy.fast_retry_spread;
            let delay = if spread.is_zero() {
                Duration::ZERO
            } else {
                self.rng.random_range(Duration::ZERO..=spread)
            };
            return NextStep::Retry { delay, attempt: 1 };
        }
        self.on_failure(now)
    }

    /// The hub said it is stopping (`shutting_down` with a retry window) and the connection
    /// ended at `now`: the next attempt goes out at a moment drawn uniformly in `window`, so
    /// that the fleet comes back at the rate the hub chose — never sooner than the rules for a
    /// lost connection allow (a connection that died young still counts as flapping and waits
    /// out its backoff step; an open breaker still suspends).
    pub fn on_hub_shutdown(&mut self, now: Instant, window: RetryWindow) -> NextStep {
        let pick = window.pick(self.rng.random_range(0.0..1.0));
        match self.on_connection_lost(now) {
            NextStep::Retry { delay, attempt } => NextStep::Retry {
                delay: delay.max(pick),
                attempt,
            },
            other => other,
        }
    }

    /// A connection attempt failed at `now` (refused, timed out, rejected with a retryable
    /// error).
    pub fn on_attempt_failed(&mut self, now: Instant) -> NextStep {
        self.on_failure(now)
    }

    /// A connection attempt failed at `now`, and another endpoint not yet tried in this outage
    /// remains (failover: a dead node must not cost a backoff step when others are up). The
    /// failure counts toward the breaker as usual, but the next attempt goes out at once,
    /// jittered over the fast-retry spread, without drawing a step of the sequence: an outage
    /// makes at most one such quick attempt per endpoint before backing off.
    pub fn on_attempt_failed_with_alternative(&mut self, now: Instant) -> NextStep {
        self.breaker.record_failure(now);
        if let Some(step) = self.when_open_or_manual() {
            return step;
        }
        let spread = self.policy.fast_retry_spread;
        let delay = if spread.is_zero() {
            Duration::ZERO
        } else {
            self.rng.random_range(Duration::ZERO..=spread)
        };
        NextStep::Retry {
            delay,
            attempt: self.attempt.saturating_add(1),
        }
    }

    /// A manual reconnect was requested at `now`: `Ok` if allowed (the breaker is put
    /// half-open), `Err(wait)` if rate-limited.
    pub fn on_manual_reconnect(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(last) = self.last_manual {
            let since = now.saturating_duration_since(last);
            if since < self.policy.manual_reconnect_interval {
                return Err(self.policy.manual_reconnect_interval - since);
            }
        }
        self.last_manual = Some(now);
        self.breaker.force_probe();
        Ok(())
    }

    /// Forgets the current outage entirely (used when leaving `Failed` manually).
    pub fn reset(&mut self) {
        self.breaker.close();
        self.reset_sequence();
        self.connected_at = None;
        self.stable_counted = false;
    }

    fn reset_sequence(&mut self) {
        self.backoff.reset();
        self.drawn = 0;
        self.attempt = 0;
    }

    /// The step when the breaker is open or reconnects are manual only.
    fn when_open_or_manual(&mut self) -> Option<NextStep> {
        if self.breaker.state() == BreakerState::Open {
            return Some(match self.policy.on_exhausted {
                OnExhausted::Fail => NextStep::GiveUp {
                    attempts: self.attempt,
                },
                OnExhausted::Suspend => NextStep::Suspend {
                    probe_in: self.jittered(self.policy.suspend_interval),
                    failures: self.breaker.consecutive_failures(),
                },
            });
        }
        if self.policy.strategy == ReconnectStrategy::Manual {
            return Some(NextStep::WaitForManual);
        }
        None
    }

    fn on_failure(&mut self, now: Instant) -> NextStep {
        self.breaker.record_failure(now);
        if let Some(step) = self.when_open_or_manual() {
            return step;
        }
        let base = self.next_base_delay();
        NextStep::Retry {
            delay: self.jittered(base),
            attempt: self.attempt.saturating_add(1),
        }
    }

    fn next_base_delay(&mut self) -> Duration {
        self.drawn = self.drawn.saturating_add(1);
        match self.policy.strategy {
            ReconnectStrategy::Exponential => {
                self.backoff.next_backoff().unwrap_or(self.policy.max_delay)
            }
            ReconnectStrategy::Linear => self
                .policy
                .initial_delay
                .saturating_mul(self.drawn)
                .min(self.policy.max_delay),
            ReconnectStrategy::Immediate | ReconnectStrategy::Manual => Duration::ZERO,
        }
    }

    /// Uniform in `[(1-j)·d, (1+j)·d]`.
    fn jittered(&mut self, d: Duration) -> Duration {
        let j = self.policy.jitter;
        if j <= 0.0 || d.is_zero() {
            return d;
        }
        let factor = self.rng.random_range((1.0 - j)..=(1.0 + j));
        d.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopping_hub_spreads_reconnects_uniformly_over_its_window() {
        let window = RetryWindow {
            min_ms: 1_000,
            max_ms: 5_000,
        };
        let now = Instant::now();
        let mut buckets = [0u32; 4];
        for seed in 0..2_000 {
            let mut m = ReconnectManager::new(ReconnectPolicy::default(), Some(seed));
            m.begin_attempt(now);
            m.on_connected(now);
            // Stable for a minute, then told the hub is stopping.
            let later = now + Duration::from_secs(60);
            match m.on_hub_shutdown(later, window) {
                NextStep::Retry { delay, attempt } => {
                    assert_eq!(attempt, 1);
                    let ms = delay.as_millis() as u64;
                    assert!((1_000..=5_000).contains(&ms), "{ms} ms");
                    buckets[((ms - 1_000) / 1_000).min(3) as usize] += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        // Uniform: each quarter of the window gets about a quarter of the fleet.
        for b in buckets {
            assert!((400..600).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn a_stop_right_after_connecting_still_counts_as_flapping() {
        let window = RetryWindow {
            min_ms: 10,
            max_ms: 20,
        };
        let now = Instant::now();
        let mut m = manager(no_jitter());
        m.begin_attempt(now);
        m.on_connected(now);
        match m.on_hub_shutdown(now + Duration::from_millis(100), window) {
            NextStep::Retry { delay, .. } => assert_eq!(delay, Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
    }

    fn manager(policy: ReconnectPolicy) -> ReconnectManager {
        ReconnectManager::new(policy, Some(7))
    }

    fn no_jitter() -> ReconnectPolicy {
        ReconnectPolicy {
            jitter: 0.0,
            max_attempts: None,
            ..ReconnectPolicy::default()
        }
    }

    fn fail_n(m: &mut ReconnectManager, n: usize) -> Vec<NextStep> {
        let now = Instant::now();
        (0..n)
            .map(|_| {
                m.begin_attempt(now);
                m.on_attempt_failed(now)
            })
            .collect()
    }

    fn delays(steps: &[NextStep]) -> Vec<u64> {
        steps
            .iter()
            .map(|s| match s {
                NextStep::Retry { delay, .. } => delay.as_secs(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn exponential_sequence_doubles_to_the_cap() {
        let mut m = manager(no_jitter());
        let steps = fail_n(&mut m, 9);
        assert_eq!(delays(&steps), [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        match steps[2] {
            NextStep::Retry { attempt, .. } => assert_eq!(attempt, 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn linear_and_immediate_sequences() {
        let mut m = manager(ReconnectPolicy {
            strategy: ReconnectStrategy::Linear,
            max_delay: Duration::from_secs(4),
            ..no_jitter()
        });
        assert_eq!(delays(&fail_n(&mut m, 6)), [1, 2, 3, 4, 4, 4]);

        let mut m = manager(ReconnectPolicy {
            strategy: ReconnectStrategy::Immediate,
            ..no_jitter()
        });
        assert_eq!(delays(&fail_n(&mut m, 3)), [0, 0, 0]);
    }

    #[test]
    fn manual_strategy_never_schedules() {
        let mut m = manager(ReconnectPolicy {
            strategy: ReconnectStrategy::Manual,
            ..no_jitter()
        });
        assert_eq!(fail_n(&mut m, 2), [NextStep::WaitForManual; 2]);
    }

    #[test]
    fn jitter_stays_within_25_percent_over_many_draws() {
        let mut m = manager(ReconnectPolicy {
            max_attempts: None,
            ..ReconnectPolicy::default()
        });
        let now = Instant::now();
        let mut lowest = f64::MAX;
        let mut highest = f64::MIN;
        for _ in 0..2_000 {
            m.reset();
            for base in [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0] {
                m.begin_attempt(now);
                let NextStep::Retry { delay, .. } = m.on_attempt_failed(now) else {
                    panic!("expected a retry");
                };
                let ratio = delay.as_secs_f64() / base;
                assert!((0.75..=1.25).contains(&ratio), "{delay:?} for {base}");
                lowest = lowest.min(ratio);
                highest = highest.max(ratio);
            }
        }
        // Uniform over the whole band, not a narrow slice of it.
        assert!(lowest < 0.76 && highest > 1.24, "{lowest} {highest}");
    }

    #[test]
    fn same_seed_same_delays() {
        let a = delays(&fail_n(
            &mut ReconnectManager::new(ReconnectPolicy::default(), Some(1)),
            5,
        ));
        let b = delays(&fail_n(
            &mut ReconnectManager::new(ReconnectPolicy::default(), Some(1)),
            5,
        ));
        assert_eq!(a, b);
    }

    #[tokio::test(start_paused = true)]
    async fn stable_connection_drop_retries_at_once_then_follows_the_sequence() {
        let mut m = manager(no_jitter());
        fail_n(&mut m, 3);
        m.begin_attempt(Instant::now());
        m.on_connected(Instant::now());
        tokio::time::advance(DEFAULT_STABILITY_WINDOW).await;
        assert_eq!(m.on_stable(Instant::now()), Stability::Stable);
        tokio::time::advance(Duration::from_secs(30)).await;

        match m.on_connection_lost(Instant::now()) {
            NextStep::Retry { delay, attempt } => {
                assert!(delay <= DEFAULT_FAST_RETRY_SPREAD, "{delay:?}");
                assert_eq!(attempt, 1);
            }
            other => panic!("{other:?}"),
        }
        // The fast attempt fails: the sequence starts from its beginning.
        assert_eq!(delays(&fail_n(&mut m, 2)), [1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn failover_tries_each_other_endpoint_at_once_then_backs_off() {
        let mut m = manager(no_jitter());
        m.begin_attempt(Instant::now());
        // Two other endpoints: two quick moves, then the sequence from its first step.
        for attempt in [2, 3] {
            match m.on_attempt_failed_with_alternative(Instant::now()) {
                NextStep::Retry { delay, attempt: a } => {
                    assert!(delay <= DEFAULT_FAST_RETRY_SPREAD, "{delay:?}");
                    assert_eq!(a, attempt);
                }
                other => panic!("{other:?}"),
            }
            m.begin_attempt(Instant::now());
        }
        match m.on_attempt_failed(Instant::now()) {
            NextStep::Retry { delay, .. } => assert_eq!(delay, Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failover_moves_still_count_toward_the_breaker() {
        let mut m = manager(ReconnectPolicy {
            max_attempts: Some(2),
            ..no_jitter()
        });
        m.begin_attempt(Instant::now());
        assert!(matches!(
            m.on_attempt_failed_with_alternative(Instant::now()),
            NextStep::Retry { .. }
        ));
        m.begin_attempt(Instant::now());
        assert!(matches!(
            m.on_attempt_failed_with_alternative(Instant::now()),
            NextStep::Suspend { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_dies_young_counts_as_a_failure() {
        let mut m = manager(no_jitter());
        assert_eq!(delays(&fail_n(&mut m, 2)), [1, 2]);
        m.begin_attempt(Instant::now());
        m.on_connected(Instant::now());
        tokio::time::advance(DEFAULT_STABILITY_WINDOW / 2).await;
        // Flapping: no reset, no fast path — the sequence goes on.
        match m.on_connection_lost(Instant::now()) {
            NextStep::Retry { delay, attempt } => {
                assert_eq!(delay, Duration::from_secs(4));
                assert_eq!(attempt, 4);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flapping_opens_the_breaker() {
        let mut m = manager(ReconnectPolicy {
            max_attempts: Some(3),
            ..no_jitter()
        });
        let mut last = None;
        for _ in 0..3 {
            m.begin_attempt(Instant::now());
            m.on_connected(Instant::now());
            tokio::time::advance(Duration::from_millis(100)).await;
            last = Some(m.on_connection_lost(Instant::now()));
        }
        assert!(
            matches!(last, Some(NextStep::Suspend { failures: 3, .. })),
            "{last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_attempts_suspends_then_probes_slowly_forever() {
        let mut m = manager(ReconnectPolicy {
            max_attempts: Some(10),
            ..no_jitter()
        });
        let steps = fail_n(&mut m, 10);
        assert!(steps[..9]
            .iter()
            .all(|s| matches!(s, NextStep::Retry { .. })));
        assert_eq!(
            steps[9],
            NextStep::Suspend {
                probe_in: DEFAULT_SUSPEND_INTERVAL,
                failures: 10
            }
        );
        assert_eq!(m.breaker_state(), BreakerState::Open);
        // Probes that fail keep it suspended at the slow interval.
        for _ in 0..5 {
            tokio::time::advance(DEFAULT_SUSPEND_INTERVAL).await;
            m.begin_attempt(Instant::now());
            assert_eq!(m.breaker_state(), BreakerState::HalfOpen);
            assert!(matches!(
                m.on_attempt_failed(Instant::now()),
                NextStep::Suspend { probe_in, .. } if probe_in == DEFAULT_SUSPEND_INTERVAL
            ));
        }
        // A probe that connects and stays up for two windows closes the breaker.
        tokio::time::advance(DEFAULT_SUSPEND_INTERVAL).await;
        m.begin_attempt(Instant::now());
        m.on_connected(Instant::now());
        tokio::time::advance(DEFAULT_STABILITY_WINDOW).await;
        assert_eq!(
            m.on_stable(Instant::now()),
            Stability::CheckAgainIn(DEFAULT_STABILITY_WINDOW)
        );
        tokio::time::advance(DEFAULT_STABILITY_WINDOW).await;
        assert_eq!(m.on_stable(Instant::now()), Stability::Stable);
        assert_eq!(m.breaker_state(), BreakerState::Closed);
        assert_eq!(m.attempt(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_connection_that_drops_reopens_the_breaker() {
        let mut m = manager(ReconnectPolicy {
            max_attempts: Some(1),
            ..no_jitter()
        });
        fail_n(&mut m, 1);
        tokio::time::advance(DEFAULT_SUSPEND_INTERVAL).await;
        m.begin_attempt(Instant::now());
        m.on_connected(Instant::now());
        tokio::time::advance(DEFAULT_STABILITY_WINDOW * 3 / 2).await;
        assert_eq!(
            m.on_stable(Instant::now()),
            Stability::CheckAgainIn(DEFAULT_STABILITY_WINDOW)
        );
        assert!(matches!(
            m.on_connection_lost(Instant::now()),
            NextStep::Suspend { .. }
        ));
    }

    #[test]
    fn exhaustion_can_be_configured_to_fail() {
        let mut m = manager(ReconnectPolicy {
            max_attempts: Some(2),
            on_exhausted: OnExhausted::Fail,
            ..no_jitter()
        });
        let steps = fail_n(&mut m, 2);
        assert_eq!(steps[1], NextStep::GiveUp { attempts: 2 });
    }

    #[tokio::test(start_paused = true)]
    async fn manual_reconnects_are_rate_limited() {
        let mut m = manager(ReconnectPolicy::default());
        assert_eq!(m.on_manual_reconnect(Instant::now()), Ok(()));
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(
            m.on_manual_reconnect(Instant::now()),
            Err(Duration::from_millis(700))
        );
        tokio::time::advance(Duration::from_millis(700)).await;
        assert_eq!(m.on_manual_reconnect(Instant::now()), Ok(()));
    }

    #[test]
    fn strategy_parses_from_environment_spelling() {
        assert_eq!(
            "Exponential_Backoff".parse::<ReconnectStrategy>(),
            Ok(ReconnectStrategy::Exponential)
        );
        assert_eq!("manual".parse(), Ok(ReconnectStrategy::Manual));
        assert!("sometimes".parse::<ReconnectStrategy>().is_err());
    }
}
