//! A circuit breaker over connection outcomes: closed → open → half-open → closed.
//!
//! *Failures* are failed attempts and connections that died inside the stability window
//! (flapping). *Successes* are connections that stayed up for a stability window. While open, the
//! transport is `Suspended` and only probes at a slow interval; a probe puts the breaker
//! half-open, and it closes again after `success_threshold` successes — one failure re-opens it.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// The breaker's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Normal operation: attempts follow the backoff sequence.
    Closed,
    /// Too many consecutive failures: only slow probes.
    Open,
    /// A probe is being tried; successes needed before closing.
    HalfOpen,
}

/// The pure circuit breaker. Time is passed in; no timers inside.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    state: BreakerState,
    consecutive_failures: u32,
    half_open_successes: u32,
    failure_threshold: u32,
    success_threshold: u32,
    open_timeout: Duration,
    opened_at: Option<Instant>,
}

impl CircuitBreaker {
    /// A closed breaker that opens after `failure_threshold` consecutive failures, allows a probe
    /// `open_timeout` after opening, and closes after `success_threshold` half-open successes.
    /// Thresholds below 1 are treated as 1.
    pub fn new(failure_threshold: u32, success_threshold: u32, open_timeout: Duration) -> Self {
        CircuitBreaker {
            state: BreakerState::Closed,
            consecutive_failures: 0,
            half_open_successes: 0,
            failure_threshold: failure_threshold.max(1),
            success_threshold: success_threshold.max(1),
            open_timeout,
            opened_at: None,
        }
    }

    /// Current position (without advancing time; see [`CircuitBreaker::allows_attempt`]).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Consecutive failures counted so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Records a failure. Returns `true` if this failure opened the breaker.
    pub fn record_failure(&mut self, now: Instant) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.half_open_successes = 0;
        let opens = match self.state {
            BreakerState::Closed => self.consecutive_failures >= self.failure_threshold,
            BreakerState::HalfOpen => true,
            BreakerState::Open => false,
        };
        if opens {
            self.state = BreakerState::Open;
            self.opened_at = Some(now);
        }
        opens
    }

    /// Records a success. Returns `true` if this success closed the breaker.
    pub fn record_success(&mut self) -> bool {
        match self.state {
            BreakerState::Closed => {
                self.consecutive_failures = 0;
                false
            }
            BreakerState::HalfOpen | BreakerState::Open => {
                self.half_open_successes += 1;
                if self.half_open_successes >= self.success_threshold {
                    self.close();
                    true
                } else {
                    self.state = BreakerState::HalfOpen;
                    false
                }
            }
        }
    }

    /// Whether an attempt may go out now. An open breaker whose timeout has passed moves to
    /// half-open and allows one.
    pub fn allows_attempt(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed | BreakerState::HalfOpen => true,
            BreakerState::Open => {
                let due = self
                    .opened_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= self.open_timeout);
                if due {
                    self.state = BreakerState::HalfOpen;
                    self.half_open_successes = 0;
                }
                due
            }
        }
    }

    /// Forces a half-open probe now (manual reconnect): the next outcome decides.
    pub fn force_probe(&mut self) {
        if self.state == BreakerState::Open {
            self.state = BreakerState::HalfOpen;
            self.half_open_successes = 0;
        }
    }

    /// Back to closed with no history.
    pub fn close(&mut self) {
        self.state = BreakerState::Closed;
        self.consecutive_failures = 0;
        self.half_open_successes = 0;
        self.opened_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_probes_after_timeout() {
        let mut b = CircuitBreaker::new(3, 2, Duration::from_secs(60));
        let now = Instant::now();
        assert!(!b.record_failure(now));
        assert!(!b.record_failure(now));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.record_failure(now));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allows_attempt(Instant::now()));

        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!b.allows_attempt(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.allows_attempt(Instant::now()));
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_needs_success_threshold_to_close() {
        let mut b = CircuitBreaker::new(1, 2, Duration::from_secs(10));
        b.record_failure(Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.allows_attempt(Instant::now()));
        assert!(!b.record_success());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.record_success());
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_while_half_open_reopens_and_restarts_the_timeout() {
        let mut b = CircuitBreaker::new(2, 3, Duration::from_secs(10));
        b.record_failure(Instant::now());
        b.record_failure(Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.allows_attempt(Instant::now()));
        b.record_success();
        assert!(b.record_failure(Instant::now()));
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!b.allows_attempt(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.allows_attempt(Instant::now()));
    }

    #[test]
    fn successes_while_closed_reset_the_failure_count() {
        let now = Instant::now();
        let mut b = CircuitBreaker::new(3, 1, Duration::from_secs(1));
        b.record_failure(now);
        b.record_failure(now);
        b.record_success();
        b.record_failure(now);
        b.record_failure(now);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn force_probe_half_opens_an_open_breaker() {
        let now = Instant::now();
        let mut b = CircuitBreaker::new(1, 1, Duration::from_secs(3600));
        b.record_failure(now);
        b.force_probe();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.record_success());
    }
}
