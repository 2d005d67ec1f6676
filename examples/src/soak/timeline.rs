//! Every connection state transition of every client, with the faults injected, turned into
//! uptime, recovery and detection figures, and recovery broken down by fault kind.
//!
//! Definitions (the README's soak section says the same):
//!
//! * **connection lost**: a client's transport left an up state (`Connected` or `Syncing`) for
//!   one that is not (its typed state events);
//! * **path available again**: when the injected fault ended — at once for `cut` and `stall`
//!   (the proxy accepts new connections), when the proxy stops refusing for `refuse`, when the
//!   latency is lifted for `latency`, when the hub listens again for `restart` and `kill-node`;
//! * **recovered**: connected again with every channel re-attached and replayed (`Syncing →
//!   Connected`, or `Connecting → Connected` when no resync follows).
//!
//! An outage is attributed to the fault active when the connection was lost: of the faults
//! injected at or before the loss whose path came back no longer than the attribution window
//! before it, the one whose path came back last (one that takes connections down before
//! `latency`, which does not; one still going on before any other; equal: the later injected). So when faults overlap, the one keeping the path down gets the outage —
//! a cut during a hub restart is the restart's. Outages no fault explains are counted under
//! `unattributed`.

use std::collections::BTreeMap;
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

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultEvent {
    /// When it was injected, since the start of the run.
    pub at: Duration,
    /// What was injected.
    pub kind: FaultKind,
    /// When the path was available again (`None` while the fault lasts, or when a hub did not
    /// come back).
    pub path_back: Option<Duration>,
}

/// One client outage: connection lost, then recovered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outage {
    /// Which client.
    pub client: u32,
    /// When its connection was lost.
    pub lost: Duration,
    /// When it had recovered.
    pub recovered: Duration,
}

/// Recovery from the outages one kind of fault caused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FaultRecovery {
    /// Outages attributed to this kind.
    pub outages: u64,
    /// Connection lost → recovered.
    pub lost_to_recovered_ms: Percentiles,
    /// Path available again → recovered: what the transport adds to the outage itself (0 for
    /// a client that recovered before, e.g. by failing over to another hub node).
    pub path_to_recovered_ms: Percentiles,
    /// Outages with a path → recovered figure (those whose fault ended).
    pub path_samples: u64,
}

/// The key for outages no fault explains.
pub const UNATTRIBUTED: &str = "unattributed";

/// The run's transitions and faults.
#[derive(Debug, Default)]
pub struct Timeline {
    transitions: Vec<Transition>,
    faults: Vec<FaultEvent>,
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

    /// Records a fault injected at `at`; returns its index for [`Timeline::fault_ended`].
    pub fn fault(&mut self, at: Duration, kind: FaultKind) -> usize {
        self.faults.push(FaultEvent {
            at,
            kind,
            path_back: None,
        });
        self.faults.len() - 1
    }

    /// Records when the path was available again after fault `index`.
    pub fn fault_ended(&mut self, index: usize, at: Duration) {
        if let Some(f) = self.faults.get_mut(index) {
            f.path_back = Some(at);
        }
    }

    /// The faults injected.
    pub fn faults(&self) -> &[FaultEvent] {
        &self.faults
    }

    /// The fault an outage that began at `lost` is attributed to (see the module
    /// documentation): among those injected at or before it whose path came back at most
    /// `window` before it, the one whose path came back last.
    pub fn attribute(&self, lost: Duration, window: Duration) -> Option<&FaultEvent> {
        let end = |f: &FaultEvent| f.path_back.unwrap_or(Duration::MAX).max(f.at);
        self.faults
            .iter()
            .filter(|f| f.at <= lost && lost <= end(f).saturating_add(window))
            // A fault that takes connections down explains a loss before one that does not.
            .max_by_key(|f| (f.kind.disconnects(), end(f), f.at))
    }

    /// Every outage with the kind it is attributed to ([`UNATTRIBUTED`] when none), its
    /// lost → recovered time and, when the fault's path came back, its path → recovered time
    /// (milliseconds).
    pub fn attributed(
        &self,
        clients: u32,
        window: Duration,
    ) -> Vec<(&'static str, f64, Option<f64>)> {
        self.outages(clients)
            .into_iter()
            .map(|outage| {
                let fault = self.attribute(outage.lost, window);
                let lost = (outage.recovered - outage.lost).as_secs_f64() * 1000.0;
                let path = fault
                    .and_then(|f| f.path_back)
                    .map(|back| outage.recovered.saturating_sub(back).as_secs_f64() * 1000.0);
                (fault.map_or(UNATTRIBUTED, |f| f.kind.name()), lost, path)
            })
            .collect()
    }

    /// Recovery per fault kind (see the module documentation), plus [`UNATTRIBUTED`].
    pub fn recovery_by_fault(
        &self,
        clients: u32,
        window: Duration,
    ) -> BTreeMap<String, FaultRecovery> {
        let mut samples: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for (kind, lost, path) in self.attributed(clients, window) {
            let entry = samples.entry(kind.to_owned()).or_default();
            entry.0.push(lost);
            entry.1.extend(path);
        }
        samples
            .into_iter()
            .map(|(kind, (lost, path))| {
                let recovery = FaultRecovery {
                    outages: lost.len() as u64,
                    lost_to_recovered_ms: Percentiles::of(&lost),
                    path_to_recovered_ms: Percentiles::of(&path),
                    path_samples: path.len() as u64,
                };
                (kind, recovery)
            })
            .collect()
    }

    /// Each client's transitions in time order, clients `0..clients` (one pass over the log:
    /// a run of 10,000 clients has hundreds of thousands of transitions).
    fn by_client(&self, clients: u32) -> Vec<Vec<Transition>> {
        let mut out = vec![Vec::new(); clients as usize];
        for t in &self.transitions {
            if let Some(v) = out.get_mut(t.client as usize) {
                v.push(*t);
            }
        }
        for v in &mut out {
            v.sort_by_key(|t| t.at);
        }
        out
    }

    /// Share of client-time spent `Connected` (or `Syncing`) within `[start, end]`.
    pub fn uptime_ratio(&self, clients: u32, start: Duration, end: Duration) -> f64 {
        if clients == 0 || end <= start {
            return 0.0;
        }
        let mut up = Duration::ZERO;
        for ts in self.by_client(clients) {
            let mut state = ConnectionState::Initialized;
            let mut since = start;
            for t in ts {
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
        self.outages(clients)
            .iter()
            .map(|o| (o.recovered - o.lost).as_secs_f64() * 1000.0)
            .collect()
    }

    /// Every outage of every client (see [`Timeline::recovery_ms`] for where one ends).
    pub fn outages(&self, clients: u32) -> Vec<Outage> {
        let mut out = Vec::new();
        for (client, ts) in self.by_client(clients).into_iter().enumerate() {
            let client = client as u32;
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
                            out.push(Outage {
                                client,
                                lost,
                                recovered: t.at,
                            });
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
            .filter(|f| f.kind.disconnects())
            .map(|f| f.at)
            .collect();
        disconnecting.sort();
        let mut out = Vec::new();
        for ts in self.by_client(clients) {
            let losses: Vec<Duration> = ts
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
        for ts in self.by_client(clients) {
            let mut up = false;
            for t in ts {
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
    fn outages_are_broken_down_by_the_fault_active_at_loss() {
        let mut tl = Timeline::new();
        for tr in [
            t(0, 0, Initialized, Connecting),
            t(10, 0, Connecting, Connected),
            t(0, 1, Initialized, Connecting),
            t(10, 1, Connecting, Connected),
            // A cut at 1000: client 0 back 200 ms later.
            t(1001, 0, Connected, Disconnected),
            t(1150, 0, Connecting, Connected),
            t(1150, 0, Connected, Syncing),
            t(1201, 0, Syncing, Connected),
            // A refuse at 2000 for 1 s, overlapping a latency fault from 1900: the later one
            // (refuse) gets it; back 300 ms after the proxy accepts again.
            t(2002, 1, Connected, Disconnected),
            t(3300, 1, Connecting, Connected),
            t(3302, 1, Connected, Syncing),
            t(3302, 1, Syncing, Connected),
            // Long after every fault: nobody's fault.
            t(9000, 0, Connected, Disconnected),
            t(9050, 0, Connecting, Connected),
        ] {
            tl.transition(tr);
        }
        let cut = tl.fault(ms(1000), FaultKind::Cut);
        tl.fault_ended(cut, ms(1000));
        let latency = tl.fault(ms(1900), FaultKind::Latency(ms(50)));
        tl.fault_ended(latency, ms(2500));
        let refuse = tl.fault(ms(2000), FaultKind::Refuse(ms(1000)));
        tl.fault_ended(refuse, ms(3000));
        let by = tl.recovery_by_fault(2, ms(2000));
        assert_eq!(
            by.keys().collect::<Vec<_>>(),
            ["cut", "refuse", UNATTRIBUTED]
        );
        assert_eq!(by["cut"].outages, 1);
        assert_eq!(by["cut"].lost_to_recovered_ms.max, 200.0);
        assert_eq!(by["cut"].path_to_recovered_ms.max, 201.0);
        assert_eq!(by["refuse"].lost_to_recovered_ms.p99, 1300.0);
        assert_eq!(by["refuse"].path_to_recovered_ms.p99, 302.0);
        assert_eq!(by[UNATTRIBUTED].outages, 1);
        assert_eq!(by[UNATTRIBUTED].lost_to_recovered_ms.p50, 50.0);
        // No path time without a fault to measure it from.
        assert_eq!(
            by[UNATTRIBUTED].path_to_recovered_ms,
            Percentiles::default()
        );
    }

    #[test]
    fn a_cut_during_a_restart_is_the_restarts() {
        let mut tl = Timeline::new();
        let restart = tl.fault(ms(4000), FaultKind::Restart);
        let cut = tl.fault(ms(4000), FaultKind::Cut);
        tl.fault_ended(cut, ms(4000));
        let during = |tl: &Timeline| tl.attribute(ms(4001), ms(5000)).map(|f| f.kind);
        assert_eq!(during(&tl), Some(FaultKind::Restart), "still going on");
        tl.fault_ended(restart, ms(5200));
        assert_eq!(
            during(&tl),
            Some(FaultKind::Restart),
            "its path came back last"
        );
        // A cut after the restart ended owns the losses it causes.
        let later = tl.fault(ms(6000), FaultKind::Cut);
        tl.fault_ended(later, ms(6000));
        assert_eq!(
            tl.attribute(ms(6001), ms(5000)).map(|f| f.kind),
            Some(FaultKind::Cut)
        );
    }

    #[test]
    fn latency_does_not_claim_a_refusals_outage() {
        let mut tl = Timeline::new();
        let refuse = tl.fault(ms(5000), FaultKind::Refuse(ms(1000)));
        tl.fault_ended(refuse, ms(6000));
        let latency = tl.fault(ms(5500), FaultKind::Latency(ms(100)));
        tl.fault_ended(latency, ms(7500));
        assert_eq!(
            tl.attribute(ms(5600), ms(5000)).map(|f| f.kind),
            Some(FaultKind::Refuse(ms(1000)))
        );
    }

    #[test]
    fn a_fault_still_going_on_owns_every_loss_after_it() {
        let mut tl = Timeline::new();
        tl.fault(ms(100), FaultKind::Restart);
        assert_eq!(
            tl.attribute(ms(60_000), ms(10)).map(|f| f.kind),
            Some(FaultKind::Restart)
        );
        assert!(tl.attribute(ms(50), ms(10)).is_none(), "before the fault");
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&v);
        assert_eq!((p.p50, p.p95, p.p99, p.max), (50.0, 95.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
    }
}
