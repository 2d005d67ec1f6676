//! What clients observe, as records: applied directly to the run's [`Collector`] when the
//! clients live in the soak process, or written one JSON line each to stdout by a client
//! process (`--client-procs`) and applied by the parent, so one ledger and one timeline cover
//! every client wherever it ran.
//!
//! Times are [`monotonic_nanos`](super::clock::monotonic_nanos) readings: every process of a
//! run reads the same clock.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_transport::ConnectionState;

use super::latency::LatencyLog;
use super::ledger::{Ledger, Position, ReportedGap};
use super::timeline::{Timeline, Transition};

/// One observation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum Record {
    /// A client's transport changed state.
    Transition {
        /// When.
        mono: u64,
        /// Which client (global index).
        client: u32,
        /// State before (`ConnectionState::as_str`).
        from: String,
        /// State after.
        to: String,
    },
    /// A publish was handed to the library.
    Published,
    /// The hub acknowledged a publish.
    Acked {
        /// Publishing client.
        publisher: u32,
        /// Its sequence number.
        seq: u64,
        /// Where the hub placed it (epoch, offset), when it said.
        at: Option<Position>,
        /// When the ack arrived.
        mono: u64,
        /// Publish call → ack, microseconds.
        latency_us: u64,
    },
    /// A publish failed with an error.
    Failed,
    /// A subscriber received a message.
    Delivered {
        /// Receiving client.
        subscriber: u32,
        /// Publishing client.
        publisher: u32,
        /// Publisher's sequence number.
        seq: u64,
        /// The epoch it arrived in.
        epoch: String,
        /// When it arrived.
        mono: u64,
        /// Publish call → delivery, microseconds (the publisher's clock reading is in the
        /// payload).
        latency_us: u64,
    },
    /// A subscriber was told of a discontinuity.
    Discontinuity {
        /// Receiving client.
        subscriber: u32,
        /// The gap.
        from: Position,
        /// The gap's end.
        to: Position,
    },
}

/// A state from its `as_str` name.
pub fn state_named(name: &str) -> Option<ConnectionState> {
    ConnectionState::ALL
        .into_iter()
        .find(|s| s.as_str() == name)
}

/// Everything a run observed: the ledger, the timeline and the latencies.
#[derive(Debug)]
pub struct Collector {
    /// The run's zero, a monotonic clock reading.
    pub start_mono: u64,
    /// Every message and delivery.
    pub ledger: Ledger,
    /// Every transition and fault.
    pub timeline: Timeline,
    /// Publish → ack.
    pub ack_latency: LatencyLog,
    /// Publish → delivery.
    pub delivery_latency: LatencyLog,
}

impl Collector {
    /// A collector for clients on `channel_of` (see [`Ledger::new`]), times from `start_mono`.
    pub fn new(channel_of: Vec<usize>, start_mono: u64) -> Self {
        Collector {
            start_mono,
            ledger: Ledger::new(channel_of),
            timeline: Timeline::new(),
            ack_latency: LatencyLog::new(),
            delivery_latency: LatencyLog::new(),
        }
    }

    /// A monotonic reading as time since the run's zero.
    pub fn since_start(&self, mono: u64) -> Duration {
        Duration::from_nanos(mono.saturating_sub(self.start_mono))
    }

    /// Applies one record; `Err` for a transition naming a state that does not exist.
    pub fn apply(&mut self, record: Record) -> Result<(), String> {
        match record {
            Record::Transition {
                mono,
                client,
                from,
                to,
            } => {
                let state = |name: &str| {
                    state_named(name).ok_or_else(|| format!("unknown connection state {name:?}"))
                };
                let transition = Transition {
                    at: self.since_start(mono),
                    client,
                    from: state(&from)?,
                    to: state(&to)?,
                };
                self.timeline.transition(transition);
            }
            Record::Published => self.ledger.published(),
            Record::Acked {
                publisher,
                seq,
                at,
                mono,
                latency_us,
            } => {
                self.ledger.acked(publisher, seq, at);
                let when = self.since_start(mono);
                self.ack_latency
                    .record(when, Duration::from_micros(latency_us));
            }
            Record::Failed => self.ledger.failed(),
            Record::Delivered {
                subscriber,
                publisher,
                seq,
                epoch,
                mono,
                latency_us,
            } => {
                self.ledger.delivered(subscriber, publisher, seq, &epoch);
                let when = self.since_start(mono);
                self.delivery_latency
                    .record(when, Duration::from_micros(latency_us));
            }
            Record::Discontinuity {
                subscriber,
                from,
                to,
            } => self
                .ledger
                .discontinuity(subscriber, ReportedGap { from, to }),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_as_json_lines_and_fill_one_ledger() {
        let records = vec![
            Record::Transition {
                mono: 1_000_000_000,
                client: 1,
                from: "connecting".into(),
                to: "connected".into(),
            },
            Record::Published,
            Record::Acked {
                publisher: 0,
                seq: 1,
                at: Some(("e1".into(), 0)),
                mono: 1_002_000_000,
                latency_us: 1500,
            },
            Record::Delivered {
                subscriber: 1,
                publisher: 0,
                seq: 1,
                epoch: "e1".into(),
                mono: 1_003_000_000,
                latency_us: 2500,
            },
        ];
        let mut collector = Collector::new(vec![0, 0], 1_000_000_000);
        for record in records {
            let line = serde_json::to_string(&record).unwrap();
            assert!(!line.contains('\n'));
            collector
                .apply(serde_json::from_str(&line).unwrap())
                .unwrap();
        }
        let totals = collector.ledger.totals();
        assert_eq!(
            (totals.published, totals.acked, totals.delivered),
            (1, 1, 1)
        );
        assert_eq!(collector.ack_latency.percentiles().max, 1.5);
        assert_eq!(collector.delivery_latency.percentiles().max, 2.5);
        assert_eq!(collector.timeline.attempts(), 0);
        assert_eq!(collector.timeline.reconnects(0), 1);
    }

    #[test]
    fn an_unknown_state_is_an_error() {
        let mut collector = Collector::new(vec![0], 0);
        let bad = Record::Transition {
            mono: 0,
            client: 0,
            from: "connected".into(),
            to: "dancing".into(),
        };
        assert!(collector.apply(bad).unwrap_err().contains("dancing"));
        for state in ConnectionState::ALL {
            assert_eq!(state_named(state.as_str()), Some(state));
        }
    }
}
