//! Latency percentiles, rates, and a completion latch for "every subscriber has everything".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

/// Latency samples in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    samples: Vec<u64>,
}

impl Latencies {
    /// Room for `n` samples up front (so recording does not reallocate while measuring).
    pub fn with_capacity(n: usize) -> Self {
        Latencies {
            samples: Vec::with_capacity(n),
        }
    }

    /// Records one sample.
    pub fn record(&mut self, micros: u64) {
        self.samples.push(micros);
    }

    /// Adds every sample of `other`.
    pub fn extend(&mut self, other: &Latencies) {
        self.samples.extend_from_slice(&other.samples);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// p50, p99 and max (nearest rank); all zero without samples.
    pub fn summary(&self) -> LatencySummary {
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let rank = |p: f64| -> u64 {
            if sorted.is_empty() {
                return 0;
            }
            let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[idx]
        };
        LatencySummary {
            samples: sorted.len(),
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            max_us: sorted.last().copied().unwrap_or(0),
        }
    }
}

/// Percentiles of a set of latency samples, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub samples: usize,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

/// `count` events over `elapsed`, per second (0 for a zero duration).
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// The median of `values` (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Throughput of several rounds of the same measurement.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoundRates {
    /// Each round's rate, in order.
    pub rounds: Vec<f64>,
}

impl RoundRates {
    /// Records one round's rate.
    pub fn push(&mut self, rate: f64) {
        self.rounds.push(rate);
    }

    /// The median round (the figure reported).
    pub fn median(&self) -> f64 {
        median(&self.rounds)
    }

    /// The slowest round (NaN without rounds).
    pub fn min(&self) -> f64 {
        self.rounds
            .iter()
            .copied()
            .reduce(f64::min)
            .unwrap_or(f64::NAN)
    }

    /// The fastest round (NaN without rounds).
    pub fn max(&self) -> f64 {
        self.rounds
            .iter()
            .copied()
            .reduce(f64::max)
            .unwrap_or(f64::NAN)
    }
}

/// `tether / raw`, or NaN when the baseline measured nothing.
pub fn ratio(tether: f64, raw: f64) -> f64 {
    if raw > 0.0 {
        tether / raw
    } else {
        f64::NAN
    }
}

/// A latch that opens when `parties` tasks have arrived, remembering the instant the last one
/// did (so the measured time ends exactly when the last subscriber had everything, not when the
/// waiter got to run).
#[derive(Debug)]
pub struct Completion {
    remaining: AtomicUsize,
    finished_at: Mutex<Option<Instant>>,
    notify: Notify,
}

impl Completion {
    /// A latch waiting for `parties` arrivals (open at once for 0).
    pub fn new(parties: usize) -> Self {
        Completion {
            remaining: AtomicUsize::new(parties),
            finished_at: Mutex::new((parties == 0).then(Instant::now)),
            notify: Notify::new(),
        }
    }

    /// One party arrived. Extra arrivals are ignored.
    pub fn arrive(&self) {
        let previous = self
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
        if previous == Ok(1) {
            *self.finished_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            self.notify.notify_waiters();
        }
    }

    /// Parties still expected.
    pub fn remaining(&self) -> usize {
        self.remaining.load(Ordering::Acquire)
    }

    /// Waits until every party arrived; returns when the last one did.
    pub async fn wait(&self) -> Instant {
        loop {
            let notified = self.notify.notified();
            if let Some(at) = *self.finished_at.lock().unwrap_or_else(|p| p.into_inner()) {
                return at;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut l = Latencies::with_capacity(100);
        for v in 1..=100 {
            l.record(v);
        }
        let s = l.summary();
        assert_eq!(
            (s.samples, s.p50_us, s.p99_us, s.max_us),
            (100, 50, 99, 100)
        );
        assert_eq!(Latencies::default().summary().p99_us, 0);
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
        assert_eq!(ratio(1.0, 4.0), 0.25);
        assert!(ratio(1.0, 0.0).is_nan());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let rates = RoundRates {
            rounds: vec![5.0, 1.0, 3.0],
        };
        assert_eq!((rates.median(), rates.min(), rates.max()), (3.0, 1.0, 5.0));
    }

    #[tokio::test]
    async fn completion_opens_on_the_last_arrival() {
        let c = std::sync::Arc::new(Completion::new(3));
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.wait().await }
        });
        c.arrive();
        c.arrive();
        assert_eq!(c.remaining(), 1);
        c.arrive();
        c.arrive();
        assert_eq!(c.remaining(), 0);
        waiter.await.unwrap();
        Completion::new(0).wait().await;
    }
}
