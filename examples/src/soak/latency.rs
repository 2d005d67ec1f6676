//! Publish → ack and publish → delivery latencies over a run: every sample, with when it was
//! taken, so the report has exact percentiles and the picture has latency over time.

use std::time::Duration;

use super::timeline::Percentiles;

/// Latency samples: (milliseconds since the start of the run, latency in microseconds).
#[derive(Debug, Default, Clone)]
pub struct LatencyLog {
    samples: Vec<(u32, u32)>,
}

/// One step of [`LatencyLog::series`]: the window's start (seconds) and its p50 and p99 (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyStep {
    /// Start of the window, seconds since the start of the run.
    pub at_s: f64,
    /// Median latency in the window, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile in the window, milliseconds.
    pub p99_ms: f64,
}

impl LatencyLog {
    /// An empty log.
    pub fn new() -> Self {
        LatencyLog::default()
    }

    /// Records one latency, measured `at` since the start of the run.
    pub fn record(&mut self, at: Duration, latency: Duration) {
        let at = u32::try_from(at.as_millis()).unwrap_or(u32::MAX);
        let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.samples.push((at, micros));
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// p50/p95/p99/max over every sample, in milliseconds.
    pub fn percentiles(&self) -> Percentiles {
        let ms: Vec<f64> = self
            .samples
            .iter()
            .map(|(_, us)| f64::from(*us) / 1000.0)
            .collect();
        Percentiles::of(&ms)
    }

    /// p50 and p99 per window of `step`, from 0 to the last sample (windows without samples
    /// are left out).
    pub fn series(&self, step: Duration) -> Vec<LatencyStep> {
        let step_ms = step.as_millis().max(1) as u32;
        let mut buckets: std::collections::BTreeMap<u32, Vec<f64>> = Default::default();
        for (at, us) in &self.samples {
            buckets
                .entry(at / step_ms)
                .or_default()
                .push(f64::from(*us) / 1000.0);
        }
        buckets
            .into_iter()
            .map(|(bucket, values)| {
                let p = Percentiles::of(&values);
                LatencyStep {
                    at_s: f64::from(bucket * step_ms) / 1000.0,
                    p50_ms: p.p50,
                    p99_ms: p.p99,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_are_exact_in_milliseconds() {
        let mut log = LatencyLog::new();
        for i in 1..=100 {
            log.record(ms(i), Duration::from_micros(i * 1000));
        }
        let p = log.percentiles();
        assert_eq!((p.p50, p.p95, p.p99, p.max), (50.0, 95.0, 99.0, 100.0));
        assert_eq!(log.len(), 100);
        assert_eq!(LatencyLog::new().percentiles(), Percentiles::default());
    }

    #[test]
    fn series_has_one_step_per_window_with_samples() {
        let mut log = LatencyLog::new();
        log.record(ms(100), ms(1));
        log.record(ms(900), ms(3));
        log.record(ms(2500), ms(10));
        let series = log.series(Duration::from_secs(1));
        assert_eq!(
            series,
            vec![
                LatencyStep {
                    at_s: 0.0,
                    p50_ms: 1.0,
                    p99_ms: 3.0
                },
                LatencyStep {
                    at_s: 2.0,
                    p50_ms: 10.0,
                    p99_ms: 10.0
                },
            ]
        );
    }
}
