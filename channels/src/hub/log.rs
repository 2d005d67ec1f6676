//! The hub's per-channel log: numbering, idempotent publish, and resume plans. Pure — the
//! [`HubChannel`](super::hub_channel::HubChannel) actor drives it.
//!
//! * Offsets are assigned 1, 2, 3… per epoch, in the order publishes are processed.
//! * A publish is identified by `(producer, seq)`, where the producer is the client id plus its
//!   instance. Sequences from one producer only grow, so `seq <= highest` is a replay: it is
//!   acknowledged again (with the original offset while it is remembered) and neither stored
//!   nor delivered.
//! * A resume from `(epoch, offset)` replays exactly what follows, or — when the epoch changed
//!   or history was trimmed past it — reports the gap and replays what is left.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytestring::ByteString;
use tether_transport::protocol::{
    ClientId, Epoch, Frame, Gap, InstanceId, Message, Offset, Payload, Position,
};
use tokio::time::Instant;

use super::history::{HistoryStore, StoredMessage};

/// Default number of recent `(seq, offset)` pairs remembered per producer, to re-ack replays
/// with their original offset: 1024.
pub const DEFAULT_DEDUPE_WINDOW: usize = 1024;
/// Default number of producers remembered per channel: 100,000 (least recently seen go first).
pub const DEFAULT_MAX_PRODUCERS: usize = 100_000;
/// Default time a silent producer is remembered: 24 hours (the history retention).
pub const DEFAULT_PRODUCER_TTL: Duration = Duration::from_secs(24 * 3600);

/// Identifies one publisher: a channel handle of one client process instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProducerKey {
    /// The client's id.
    pub client: ClientId,
    /// The client process instance.
    pub instance: InstanceId,
    /// The channel handle within that instance.
    pub producer: String,
}

impl std::fmt::Display for ProducerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.client, self.instance, self.producer)
    }
}

#[derive(Debug)]
struct ProducerState {
    highest: u64,
    recent: VecDeque<(u64, Offset)>,
    last_seen: Instant,
}

/// Which `(producer, seq)` pairs a channel has already stored.
#[derive(Debug)]
pub struct DedupeTable {
    producers: HashMap<ProducerKey, ProducerState>,
    window: usize,
    max_producers: usize,
    ttl: Duration,
}

impl DedupeTable {
    /// A table remembering `window` recent offsets per producer, at most `max_producers`
    /// producers, each for `ttl` after it was last seen.
    pub fn new(window: usize, max_producers: usize, ttl: Duration) -> Self {
        DedupeTable {
            producers: HashMap::new(),
            window: window.max(1),
            max_producers: max_producers.max(1),
            ttl,
        }
    }

    /// `Some(offset)` when `(producer, seq)` was already stored (`offset` is `None` when it is
    /// too old to remember where); `None` when it is new.
    pub fn check(&self, producer: &ProducerKey, seq: u64) -> Option<Option<Offset>> {
        let state = self.producers.get(producer)?;
        if seq > state.highest {
            return None;
        }
        let offset = state
            .recent
            .binary_search_by_key(&seq, |(s, _)| *s)
            .ok()
            .map(|i| state.recent[i].1);
        Some(offset)
    }

    /// Records that `(producer, seq)` was stored at `offset`.
    pub fn record(&mut self, producer: &ProducerKey, seq: u64, offset: Offset, now: Instant) {
        if !self.producers.contains_key(producer) && self.producers.len() >= self.max_producers {
            self.evict(now);
        }
        let state = self
            .producers
            .entry(producer.clone())
            .or_insert_with(|| ProducerState {
                highest: 0,
                recent: VecDeque::new(),
                last_seen: now,
            });
        state.highest = state.highest.max(seq);
        state.last_seen = now;
        state.recent.push_back((seq, offset));
        while state.recent.len() > self.window {
            state.recent.pop_front();
        }
    }

    /// Number of producers remembered.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// Whether no producer is remembered.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    fn evict(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.producers
            .retain(|_, p| now.saturating_duration_since(p.last_seen) < ttl);
        if self.producers.len() >= self.max_producers {
            if let Some(oldest) = self
                .producers
                .iter()
                .min_by_key(|(_, p)| p.last_seen)
                .map(|(k, _)| k.clone())
            {
                tracing::warn!(producer = %oldest, "dedupe table full; forgetting the least recent producer");
                self.producers.remove(&oldest);
            }
        }
    }
}

/// What happened to a publish.
#[derive(Debug, Clone, PartialEq)]
pub enum PublishOutcome {
    /// New: stored at `offset`; `frame` is the encoded `message` frame for every subscriber.
    Stored {
        /// Where it was stored.
        offset: Offset,
        /// The encoded `message` frame.
        frame: ByteString,
    },
    /// A replay of something already stored (at `offset`, when remembered).
    Duplicate {
        /// The original offset, if still remembered.
        offset: Option<Offset>,
    },
}

/// What an attaching subscriber gets.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumePlan {
    /// The channel's epoch.
    pub epoch: Epoch,
    /// The last offset numbered.
    pub head: Offset,
    /// Whether the requested position was honoured without a gap.
    pub resumed: bool,
    /// The gap history could not cover, if any.
    pub gap: Option<Gap>,
    /// Encoded `message` frames to send, in order, before anything live.
    pub replay: Vec<ByteString>,
}

/// One channel's log on the hub.
pub struct ChannelLog {
    name: String,
    store: Box<dyn HistoryStore>,
    dedupe: DedupeTable,
}

impl ChannelLog {
    /// A log for channel `name` over `store`.
    pub fn new(name: impl Into<String>, store: Box<dyn HistoryStore>, dedupe: DedupeTable) -> Self {
        ChannelLog {
            name: name.into(),
            store,
            dedupe,
        }
    }

    /// The channel name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current epoch.
    pub fn epoch(&self) -> &Epoch {
        self.store.epoch()
    }

    /// The last offset numbered.
    pub fn head(&self) -> Offset {
        self.store.head()
    }

    /// Messages retained.
    pub fn retained(&self) -> usize {
        self.store.len()
    }

    /// Publishes `payload` as `(producer, seq)`.
    pub fn publish(
        &mut self,
        producer: &ProducerKey,
        seq: u64,
        payload: &Payload,
        now: Instant,
    ) -> PublishOutcome {
        if let Some(offset) = self.dedupe.check(producer, seq) {
            return PublishOutcome::Duplicate { offset };
        }
        let offset = self.store.head().next();
        let frame: ByteString = Frame::Message(Message {
            channel: self.name.clone(),
            epoch: self.store.epoch().clone(),
            offset,
            payload: payload.clone(),
        })
        .encode()
        .into();
        self.store.append(StoredMessage {
            offset,
            at: now,
            frame: frame.clone(),
        });
        self.dedupe.record(producer, seq, offset, now);
        PublishOutcome::Stored { offset, frame }
    }

    /// The plan for a subscriber resuming after `from` (or starting live when `None`).
    pub fn resume(&mut self, from: Option<&Position>, now: Instant) -> ResumePlan {
        let epoch = self.store.epoch().clone();
        let head = self.store.head();
        let Some(from) = from else {
            return ResumePlan {
                epoch,
                head,
                resumed: false,
                gap: None,
                replay: Vec::new(),
            };
        };
        let first = self.store.first_retained(now);
        let (start_after, gap) = if from.epoch == epoch && from.offset > head {
            // The subscriber saw offsets this log no longer has (a store that lost its tail
            // without changing epoch): those numbers will be reused, so say so.
            let gap = Gap {
                from: Position {
                    epoch: epoch.clone(),
                    offset: head.next(),
                },
                to: from.clone(),
            };
            (head, Some(gap))
        } else if from.epoch == epoch {
            if from.offset.next() >= first {
                (from.offset, None)
            } else {
                let gap = Gap {
                    from: Position {
                        epoch: epoch.clone(),
                        offset: from.offset.next(),
                    },
                    to: Position {
                        epoch: epoch.clone(),
                        offset: Offset(first.0.saturating_sub(1)),
                    },
                };
                (Offset(first.0.saturating_sub(1)), Some(gap))
            }
        } else {
            // Another incarnation of the log: the old tail may be lost; everything of this one
            // that is retained follows.
            let gap = Gap {
                from: Position {
                    epoch: from.epoch.clone(),
                    offset: from.offset.next(),
                },
                to: Position {
                    epoch: epoch.clone(),
                    offset: Offset(first.0.saturating_sub(1)),
                },
            };
            (Offset(first.0.saturating_sub(1)), Some(gap))
        };
        let replay = self
            .store
            .read_after(start_after, now)
            .into_iter()
            .map(|m| m.frame)
            .collect();
        ResumePlan {
            epoch,
            head,
            resumed: gap.is_none(),
            gap,
            replay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::history::{MemoryHistory, Retention};

    fn log(max_messages: usize) -> ChannelLog {
        ChannelLog::new(
            "room",
            Box::new(MemoryHistory::new(Retention {
                max_messages,
                ..Retention::default()
            })),
            DedupeTable::new(4, 10, DEFAULT_PRODUCER_TTL),
        )
    }

    fn p(n: u64) -> Payload {
        Payload::from_json(&n.to_string()).unwrap()
    }

    fn producer(name: &str) -> ProducerKey {
        ProducerKey {
            client: ClientId(name.into()),
            instance: InstanceId("i".into()),
            producer: String::new(),
        }
    }

    fn offsets(frames: &[ByteString]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| match Frame::decode(f, usize::MAX).unwrap() {
                Frame::Message(m) => m.offset.0,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn offsets_are_contiguous_and_frames_are_messages() {
        let mut l = log(100);
        let now = Instant::now();
        for i in 1..=3 {
            match l.publish(&producer("a"), i, &p(i), now) {
                PublishOutcome::Stored { offset, frame } => {
                    assert_eq!(offset, Offset(i));
                    match Frame::decode(&frame, usize::MAX).unwrap() {
                        Frame::Message(m) => {
                            assert_eq!(m.payload, p(i));
                            assert_eq!(&m.epoch, l.epoch());
                        }
                        other => panic!("{other:?}"),
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn replays_are_acknowledged_with_their_original_offset_and_stored_once() {
        let mut l = log(100);
        let now = Instant::now();
        l.publish(&producer("a"), 1, &p(1), now);
        l.publish(&producer("b"), 1, &p(9), now);
        l.publish(&producer("a"), 2, &p(2), now);
        assert_eq!(
            l.publish(&producer("a"), 1, &p(1), now),
            PublishOutcome::Duplicate {
                offset: Some(Offset(1))
            }
        );
        assert_eq!(
            l.publish(&producer("a"), 2, &p(2), now),
            PublishOutcome::Duplicate {
                offset: Some(Offset(3))
            }
        );
        assert_eq!(l.head(), Offset(3));
        assert!(matches!(
            l.publish(&producer("a"), 3, &p(3), now),
            PublishOutcome::Stored {
                offset: Offset(4),
                ..
            }
        ));
    }

    #[test]
    fn old_replays_beyond_the_window_are_still_recognised() {
        let mut l = log(100);
        let now = Instant::now();
        for i in 1..=10 {
            l.publish(&producer("a"), i, &p(i), now);
        }
        assert_eq!(
            l.publish(&producer("a"), 2, &p(2), now),
            PublishOutcome::Duplicate { offset: None }
        );
        assert_eq!(l.head(), Offset(10));
    }

    #[test]
    fn resume_replays_exactly_what_follows() {
        let mut l = log(100);
        let now = Instant::now();
        for i in 1..=5 {
            l.publish(&producer("a"), i, &p(i), now);
        }
        let from = Position {
            epoch: l.epoch().clone(),
            offset: Offset(2),
        };
        let plan = l.resume(Some(&from), now);
        assert!(plan.resumed);
        assert_eq!(plan.gap, None);
        assert_eq!(plan.head, Offset(5));
        assert_eq!(offsets(&plan.replay), [3, 4, 5]);

        let live = l.resume(None, now);
        assert!(live.replay.is_empty());
        assert_eq!(live.head, Offset(5));
    }

    #[test]
    fn resume_from_beyond_the_head_reports_the_renumbered_range() {
        let mut l = log(100);
        let now = Instant::now();
        l.publish(&producer("a"), 1, &p(1), now);
        let epoch = l.epoch().clone();
        let ahead = Position {
            epoch: epoch.clone(),
            offset: Offset(5),
        };
        let plan = l.resume(Some(&ahead), now);
        assert!(!plan.resumed);
        assert!(plan.replay.is_empty());
        let gap = plan.gap.unwrap();
        assert_eq!(gap.from.offset, Offset(2));
        assert_eq!(gap.to, ahead);
    }

    #[test]
    fn resume_past_retention_reports_the_gap() {
        let mut l = log(3);
        let now = Instant::now();
        for i in 1..=10 {
            l.publish(&producer("a"), i, &p(i), now);
        }
        let epoch = l.epoch().clone();
        let plan = l.resume(
            Some(&Position {
                epoch: epoch.clone(),
                offset: Offset(4),
            }),
            now,
        );
        assert!(!plan.resumed);
        assert_eq!(
            plan.gap,
            Some(Gap {
                from: Position {
                    epoch: epoch.clone(),
                    offset: Offset(5)
                },
                to: Position {
                    epoch,
                    offset: Offset(7)
                },
            })
        );
        assert_eq!(offsets(&plan.replay), [8, 9, 10]);
    }

    #[test]
    fn resume_from_another_epoch_reports_the_gap_and_replays_the_new_epoch() {
        let mut l = log(100);
        let now = Instant::now();
        l.publish(&producer("a"), 1, &p(1), now);
        l.publish(&producer("a"), 2, &p(2), now);
        let old = Epoch("old".into());
        let plan = l.resume(
            Some(&Position {
                epoch: old.clone(),
                offset: Offset(57),
            }),
            now,
        );
        assert!(!plan.resumed);
        let gap = plan.gap.unwrap();
        assert_eq!(
            gap.from,
            Position {
                epoch: old,
                offset: Offset(58)
            }
        );
        assert_eq!(gap.to.offset, Offset(0));
        assert_eq!(&gap.to.epoch, l.epoch());
        assert_eq!(offsets(&plan.replay), [1, 2]);
    }

    #[test]
    fn a_full_dedupe_table_forgets_the_least_recent_producer() {
        let mut t = DedupeTable::new(4, 2, DEFAULT_PRODUCER_TTL);
        let t0 = Instant::now();
        t.record(&producer("a"), 1, Offset(1), t0);
        t.record(&producer("b"), 1, Offset(2), t0 + Duration::from_secs(1));
        t.record(&producer("c"), 1, Offset(3), t0 + Duration::from_secs(2));
        assert_eq!(t.len(), 2);
        assert_eq!(t.check(&producer("a"), 1), None);
        assert!(t.check(&producer("c"), 1).is_some());
    }
}
