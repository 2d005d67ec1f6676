//! Every connection state transition of every client, with the faults injected, turned into
//! uptime, recovery and detection figures.

use std::time::Duration;

use serde::Serialize;
use tether_transport::ConnectionState;

use super::faults::FaultKind;

/// One client transition, timed from the start of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// Since the start of the run.
    pub at: Duration,
    /// Which client.
    pub client: u32,
    /// State before.
    pub from: ConnectionState,
    /// State after.
    pub to: ConnectionState,
}

/// p50/p95/p99/max of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (all zero when empty).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Percentiles::default();
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Percentiles {
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// The run's transitions and faults.
#[derive(Debug, Default)]
pub struct Timeline {
    transitions: Vec<Transition>,
    faults: Vec<(Duration, FaultKind)>,
}

impl Timeline {
    /// An empty timeline.
    pub fn new() -> Self {
        Timeline::default()
    }

    /// Records a transition.
    pub fn transition(&mut self, t: Transition) {
        self.transitions.push(t);
    }

    /// Records a fault injected at `at`.
    pub fn fault(&mut self, at: Duration, kind: FaultKind) {
        self.faults.push((at, kind));
    }

    /// The faults injected.
    pub fn faults(&self) -> &[(Duration, FaultKind)] {
        &self.faults
    }

    fn of_client(&self, client: u32) -> Vec<Transition> {
        let mut v: Vec<_> = self
            .transitions
            .iter()
            .filter(|t| t.client == client)
            .copied()
            .collect();
        v.sort_by_key(|t| t.at);
        v
    }

    /// Share of client-time spent `Connected` (or `Syncing`) within `[start, end]`.
    pub fn uptime_ratio(&self, clients: u32, start: Duration, end: Duration) -> f64 {
        if clients == 0 || end <= start {
            return 0.0;
        }
        let mut up = Duration::ZERO;
        for client in 0..clients {
            let mut state = ConnectionState::Initialized;
            let mut since = start;
            for t in self.of_client(client) {
                let at = t.at.clamp(start, end);
                if state.is_up() {
                    up += at.saturating_sub(since);
                }
                state = t.to;
                since = at;
            }
            if state.is_up() {
                up += end.saturating_sub(since);
            }
        }
        up.as_secs_f64() / ((end - start).as_secs_f64() * clients as f64)
    }

    /// Connection lost → every channel re-attached and replayed (`Syncing → Connected`, or
    /// `Connecting → Connected` when no resync follows), in milliseconds, one per outage.
    pub fn recovery_ms(&self, clients: u32) -> Vec<f64> {
        let mut out = Vec::new();
        for client in 0..clients {
            let ts = self.of_client(client);
            let mut lost_at = None;
            for (i, t) in ts.iter().enumerate() {
                if t.from.is_up() && !t.to.is_up() {
                    lost_at.get_or_insert(t.at);
                } else if t.to == ConnectionState::Connected {
                    let resync_follows = ts
                        .get(i + 1)
                        .is_some_and(|n| n.to == ConnectionState::Syncing);
                    if t.from == ConnectionState::Syncing || !resync_follows {
                        if let Some(lost) = lost_at.take() {
                            out.push((t.at - lost).as_secs_f64() * 1000.0);
                        }
                    }
                }
            }
        }
        out
    }

    /// Fault injected → client noticed its connection was gone, in milliseconds: for every
    /// fault that takes connections down, each client's first loss before the next such fault
    /// (and within 30 s).
    pub fn detection_ms(&self, clients: u32) -> Vec<f64> {
        let mut disconnecting: Vec<Duration> = self
            .faults
            .iter()
            .filter(|(_, k)| k.disconnects())
            .map(|(at, _)| *at)
            .collect();
        disconnecting.sort();
        let mut out = Vec::new();
        for client in 0..clients {
            let losses: Vec<Duration> = self
                .of_client(client)
                .iter()
                .filter(|t| t.from.is_up() && !t.to.is_up())
                .map(|t| t.at)
                .collect();
            for (i, fault) in disconnecting.iter().enumerate() {
                let window_end = disconnecting
                    .get(i + 1)
                    .copied()
                    .unwrap_or(Duration::MAX)
                    .min(*fault + Duration::from_secs(30));
                if let Some(loss) = losses.iter().find(|l| **l >= *fault && **l < window_end) {
                    out.push((*loss - *fault).as_secs_f64() * 1000.0);
                }
            }
        }
        out
    }

    /// Transitions into `Connecting` (every connection attempt).
    pub fn attempts(&self) -> u64 {
        self.transitions
            .iter()
            .filter(|t| t.to == ConnectionState::Connecting)
            .count() as u64
    }

    /// Successful handshakes after each client's first.
    pub fn reconnects(&self, clients: u32) -> u64 {
        let handshakes = self
            .transitions
            .iter()
            .filter(|t| t.from == ConnectionState::Connecting && t.to == ConnectionState::Connected)
            .count() as u64;
        handshakes.saturating_sub(clients as u64)
    }

    /// Number of clients connected, sampled every `step` from 0 to `end`.
    pub fn connected_series(&self, clients: u32, step: Duration, end: Duration) -> Vec<(f64, u32)> {
        let mut events: Vec<(Duration, i32)> = Vec::new();
        for client in 0..clients {
            let mut up = false;
            for t in self.of_client(client) {
                if t.to.is_up() != up {
                    up = t.to.is_up();
                    events.push((t.at, if up { 1 } else { -1 }));
                }
            }
        }
        events.sort_by_key(|e| e.0);
        let mut out = Vec::new();
        let (mut i, mut count, mut at) = (0, 0i32, Duration::ZERO);
        while at <= end {
            while i < events.len() && events[i].0 <= at {
                count += events[i].1;
                i += 1;
            }
            out.push((at.as_secs_f64(), count.max(0) as u32));
            at += step;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConnectionState::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn t(at: u64, client: u32, from: ConnectionState, to: ConnectionState) -> Transition {
        Transition {
            at: ms(at),
            client,
            from,
            to,
        }
    }

    fn sample() -> Timeline {
        let mut tl = Timeline::new();
        for tr in [
            t(0, 0, Initialized, Connecting),
            t(10, 0, Connecting, Connected),
            t(10, 0, Connected, Syncing),
            t(20, 0, Syncing, Connected),
            t(1000, 0, Connected, Disconnected),
            t(1100, 0, Disconnected, Connecting),
            t(1110, 0, Connecting, Connected),
            t(1110, 0, Connected, Syncing),
            t(1300, 0, Syncing, Connected),
        ] {
            tl.transition(tr);
        }
        tl.fault(ms(900), FaultKind::Stall);
        tl.fault(ms(950), FaultKind::Latency(ms(5)));
        tl
    }

    #[test]
    fn recovery_runs_from_loss_to_resynced() {
        assert_eq!(sample().recovery_ms(1), vec![300.0]);
    }

    #[test]
    fn detection_runs_from_fault_to_loss() {
        assert_eq!(sample().detection_ms(1), vec![100.0]);
    }

    #[test]
    fn uptime_counts_connected_and_syncing() {
        let r = sample().uptime_ratio(1, ms(0), ms(2000));
        // Up 10..1000 and 1110..2000.
        assert!((r - (990.0 + 890.0) / 2000.0).abs() < 1e-9, "{r}");
    }

    #[test]
    fn counts_and_series() {
        let tl = sample();
        assert_eq!(tl.attempts(), 2);
        assert_eq!(tl.reconnects(1), 1);
        let series = tl.connected_series(1, ms(500), ms(1500));
        assert_eq!(series.iter().map(|s| s.1).collect::<Vec<_>>(), [0, 1, 0, 1]);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&v);
        assert_eq!((p.p50, p.p95, p.p99, p.max), (50.0, 95.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
    }
}
