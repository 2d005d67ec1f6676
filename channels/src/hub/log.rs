//! The hub's channel rules, pure: publish identity and dedupe, and resume plans. The
//! [`HubChannel`](super::hub_channel::HubChannel) actor and the stores drive them.
//!
//! * Offsets are assigned 1, 2, 3… per epoch, in the order a store appends publishes.
//! * A publish is identified by `(producer, seq)`, where the producer is the publisher's
//!   identity (as the hub's authenticator established it), its client id, its instance and the
//!   channel handle. The identity keeps publishers apart: the other parts are the client's say,
//!   so without it anyone presenting another client's ids could have that client's later
//!   publishes taken for replays. Sequences from one producer only grow, so
//!   `seq <= highest` is a replay: it is acknowledged again (with the original offset while it
//!   is remembered) and neither stored nor delivered.
//! * A resume from `(epoch, offset)` replays exactly what follows, or — when the epoch changed
//!   or history was trimmed past it — reports the gap and replays what is left.

use std::collections::VecDeque;
use std::time::Duration;

use tether_transport::hub::Identity;
use tether_transport::protocol::{ClientId, Epoch, Gap, InstanceId, Offset, Position};
use tokio::time::Instant;

/// Default number of recent `(seq, offset)` pairs remembered per producer, to re-ack replays
/// with their original offset: 1024.
pub const DEFAULT_DEDUPE_WINDOW: usize = 1024;
/// Default number of producers remembered per channel: 100,000 (least recently seen go first).
pub const DEFAULT_MAX_PRODUCERS: usize = 100_000;
/// Default time a silent producer is remembered: 24 hours (the history retention).
pub const DEFAULT_PRODUCER_TTL: Duration = Duration::from_secs(24 * 3600);

/// Identifies one publisher: a channel handle of one client process instance, of one identity.
/// Dedupe state is kept per producer, so one identity's publishes are never compared with
/// another's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProducerKey {
    /// Who publishes, as the hub's authenticator established it.
    pub identity: Identity,
    /// The client's id.
    pub client: ClientId,
    /// The client process instance.
    pub instance: InstanceId,
    /// The channel handle within that instance.
    pub producer: String,
}

impl std::fmt::Display for ProducerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.identity, self.client, self.instance, self.producer
        )
    }
}

#[derive(Debug)]
struct ProducerState {
    highest: u64,
    recent: VecDeque<(u64, Offset)>,
    last_seen: Instant,
}

impl ProducerState {
    fn new(now: Instant) -> Self {
        ProducerState {
            highest: 0,
            recent: VecDeque::new(),
            last_seen: now,
        }
    }

    /// What [`DedupeTable::check`] says of `seq`.
    fn duplicate(&self, seq: u64) -> Option<Option<Offset>> {
        (seq <= self.highest).then(|| {
            self.recent
                .binary_search_by_key(&seq, |(s, _)| *s)
                .ok()
                .map(|i| self.recent[i].1)
        })
    }

    /// Remembers `seq` stored at `offset`, seen `now`, keeping the last `window` of them.
    fn note(&mut self, seq: u64, offset: Offset, now: Instant, window: usize) {
        self.highest = self.highest.max(seq);
        self.last_seen = now;
        self.recent.push_back((seq, offset));
        while self.recent.len() > window {
            self.recent.pop_front();
        }
    }
}

/// Which `(producer, seq)` pairs a channel has already stored. Insert, lookup and eviction are
/// O(1): producers are kept in least-recently-seen order, so the ones past their TTL and, when
/// the table is full, the least recent one are found at one end. The table grows with the
/// producers it holds (a bounded `LruCache` would allocate room for all `max_producers` in
/// every channel up front).
#[derive(Debug)]
pub struct DedupeTable {
    producers: lru::LruCache<ProducerKey, ProducerState>,
    max_producers: usize,
    window: usize,
    ttl: Duration,
}

impl DedupeTable {
    /// A table remembering `window` recent offsets per producer, at most `max_producers`
    /// producers, each for `ttl` after it was last seen.
    pub fn new(window: usize, max_producers: usize, ttl: Duration) -> Self {
        DedupeTable {
            producers: lru::LruCache::unbounded(),
            max_producers: max_producers.max(1),
            window: window.max(1),
            ttl,
        }
    }

    /// `Some(offset)` when `(producer, seq)` was already stored (`offset` is `None` when it is
    /// too old to remember where); `None` when it is new.
    pub fn check(&self, producer: &ProducerKey, seq: u64) -> Option<Option<Offset>> {
        self.producers.peek(producer)?.duplicate(seq)
    }

    /// Records that `(producer, seq)` was stored at `offset`.
    pub fn record(&mut self, producer: &ProducerKey, seq: u64, offset: Offset, now: Instant) {
        self.expire(now);
        if let Some(state) = self.producers.get_mut(producer) {
            state.note(seq, offset, now, self.window);
            return;
        }
        let mut state = ProducerState::new(now);
        state.note(seq, offset, now, self.window);
        self.insert(producer, state);
    }

    /// Adds a producer not in the table, forgetting the least recently seen one when full.
    fn insert(&mut self, producer: &ProducerKey, state: ProducerState) {
        if self.producers.len() >= self.max_producers {
            // The table is full: the least recently seen producer is forgotten (its later
            // replays would be stored again). Counted, not logged: peers can cause it.
            self.producers.pop_lru();
            metrics::counter!(crate::telemetry::HUB_PRODUCERS_FORGOTTEN).increment(1);
        }
        self.producers.push(producer.clone(), state);
    }

    /// [`DedupeTable::check`] then, for the new ones, [`DedupeTable::record`], for a run of
    /// `producer`'s publishes `(seq, item)`, in order — looking the producer up once for the
    /// run instead of twice per publish, with the same outcome. For each, `admit(item, dup)`
    /// is called in order: `dup` is what `check` says; for a new one (`None`) it stores the
    /// publish and returns `Some(offset)`, which is recorded (`None` records nothing).
    pub fn admit_run<T>(
        &mut self,
        producer: &ProducerKey,
        items: impl IntoIterator<Item = (u64, T)>,
        now: Instant,
        mut admit: impl FnMut(T, Option<Option<Offset>>) -> Option<Offset>,
    ) {
        let expired =
            |state: &ProducerState| now.saturating_duration_since(state.last_seen) >= self.ttl;
        if self.producers.peek(producer).is_some_and(expired) {
            // Remembered past its TTL: its replays are still caught until `record` forgets it
            // (with every other expired producer) at its first new publish. One by one, as then.
            for (seq, item) in items {
                if let Some(offset) = admit(item, self.check(producer, seq)) {
                    self.record(producer, seq, offset, now);
                }
            }
            return;
        }
        // Not expired, or not there: expiring the others first or after the run decides
        // nothing about this producer, so the table expires once, after the run, and only
        // when something was recorded (as `record` would).
        let window = self.window;
        if let Some(state) = self.producers.peek_mut(producer) {
            let mut recorded = false;
            for (seq, item) in items {
                if let Some(offset) = admit(item, state.duplicate(seq)) {
                    state.note(seq, offset, now, window);
                    recorded = true;
                }
            }
            if recorded {
                // Seen now: the most recent (as `record` leaves it).
                self.producers.promote(producer);
                self.expire(now);
            }
            return;
        }
        let mut fresh: Option<ProducerState> = None;
        for (seq, item) in items {
            let dup = fresh.as_ref().and_then(|state| state.duplicate(seq));
            if let Some(offset) = admit(item, dup) {
                fresh
                    .get_or_insert_with(|| ProducerState::new(now))
                    .note(seq, offset, now, window);
            }
        }
        if let Some(state) = fresh {
            self.expire(now);
            self.insert(producer, state);
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

    /// Forgets producers silent for longer than the TTL (least recent first, so each check is
    /// O(1) per producer forgotten).
    fn expire(&mut self, now: Instant) {
        while let Some((_, oldest)) = self.producers.peek_lru() {
            if now.saturating_duration_since(oldest.last_seen) < self.ttl {
                break;
            }
            self.producers.pop_lru();
        }
    }
}

/// Where an attaching subscriber's replay starts, and the gap it must be told of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePlan {
    /// Whether the requested position is honoured without a gap.
    pub resumed: bool,
    /// The gap history cannot cover, if any.
    pub gap: Option<Gap>,
    /// The replay sends every retained message after this offset.
    pub start_after: Offset,
}

/// Plans a resume from `from` on a channel at `epoch` whose last offset is `head` and whose
/// oldest retained offset is `first`.
pub fn plan_resume(from: &Position, epoch: &Epoch, head: Offset, first: Offset) -> ResumePlan {
    let before_first = Offset(first.0.saturating_sub(1));
    let (start_after, gap) = if from.epoch == *epoch && from.offset > head {
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
    } else if from.epoch == *epoch {
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
                    offset: before_first,
                },
            };
            (before_first, Some(gap))
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
                offset: before_first,
            },
        };
        (before_first, Some(gap))
    };
    ResumePlan {
        resumed: gap.is_none(),
        gap,
        start_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn producer(name: &str) -> ProducerKey {
        ProducerKey {
            identity: Identity::new("alice").unwrap(),
            client: ClientId(name.into()),
            instance: InstanceId("i".into()),
            producer: String::new(),
        }
    }

    proptest! {
        /// A run admitted with one lookup decides, stores and remembers exactly what `check`
        /// then `record` per publish would: same verdicts, same producers kept and forgotten.
        #[test]
        fn admitting_a_run_is_checking_and_recording_each(
            runs in proptest::collection::vec(
                (
                    0..3usize,
                    proptest::collection::vec((0..40u64, proptest::bool::weighted(0.1)), 1..6),
                    0..4u64,
                ),
                1..40,
            ),
        ) {
            let names = ["a", "b", "c"];
            let start = Instant::now();
            // A small window, table and TTL, so trimming, eviction and expiry happen too
            // (time moves on by 0-3 s per run against a 5 s TTL); seqs come in any order, with
            // replays, and now and then a new publish is not stored.
            let mut one_by_one = DedupeTable::new(4, 2, Duration::from_secs(5));
            let mut by_run = DedupeTable::new(4, 2, Duration::from_secs(5));
            let mut next_a = 0u64;
            let mut next_b = 0u64;
            let mut elapsed = 0;
            for (who, publishes, step) in runs {
                elapsed += step;
                let now = start + Duration::from_secs(elapsed);
                let key = producer(names[who]);
                let mut expected = Vec::new();
                for &(seq, refuse) in &publishes {
                    match one_by_one.check(&key, seq) {
                        Some(dup) => expected.push(Err(dup)),
                        None if refuse => expected.push(Ok(None)),
                        None => {
                            next_a += 1;
                            one_by_one.record(&key, seq, Offset(next_a), now);
                            expected.push(Ok(Some(Offset(next_a))));
                        }
                    }
                }
                let mut got = Vec::new();
                by_run.admit_run(&key, publishes.iter().copied(), now, |refuse, dup| match dup {
                    Some(dup) => {
                        got.push(Err(dup));
                        None
                    }
                    None if refuse => {
                        got.push(Ok(None));
                        None
                    }
                    None => {
                        next_b += 1;
                        got.push(Ok(Some(Offset(next_b))));
                        Some(Offset(next_b))
                    }
                });
                prop_assert_eq!(&got, &expected);
                prop_assert_eq!(by_run.len(), one_by_one.len());
                for name in names {
                    let key = producer(name);
                    for seq in 0..50 {
                        prop_assert_eq!(by_run.check(&key, seq), one_by_one.check(&key, seq));
                    }
                }
            }
        }
    }

    fn at(epoch: &Epoch, offset: u64) -> Position {
        Position {
            epoch: epoch.clone(),
            offset: Offset(offset),
        }
    }

    #[test]
    fn resume_replays_exactly_what_follows() {
        let e = Epoch("e".into());
        let plan = plan_resume(&at(&e, 2), &e, Offset(5), Offset(1));
        assert_eq!(
            plan,
            ResumePlan {
                resumed: true,
                gap: None,
                start_after: Offset(2)
            }
        );
        // Just retained: the next offset is the first one kept.
        assert!(plan_resume(&at(&e, 2), &e, Offset(5), Offset(3)).resumed);
    }

    #[test]
    fn resume_from_beyond_the_head_reports_the_renumbered_range() {
        let e = Epoch("e".into());
        let plan = plan_resume(&at(&e, 5), &e, Offset(1), Offset(1));
        assert!(!plan.resumed);
        assert_eq!(plan.start_after, Offset(1));
        let gap = plan.gap.unwrap();
        assert_eq!(gap.from.offset, Offset(2));
        assert_eq!(gap.to, at(&e, 5));
    }

    #[test]
    fn resume_past_retention_reports_the_gap() {
        let e = Epoch("e".into());
        let plan = plan_resume(&at(&e, 4), &e, Offset(10), Offset(8));
        assert!(!plan.resumed);
        assert_eq!(
            plan.gap,
            Some(Gap {
                from: at(&e, 5),
                to: at(&e, 7),
            })
        );
        assert_eq!(plan.start_after, Offset(7));
    }

    #[test]
    fn resume_from_another_epoch_reports_the_gap_and_replays_the_new_epoch() {
        let old = Epoch("old".into());
        let new = Epoch("new".into());
        let plan = plan_resume(&at(&old, 57), &new, Offset(2), Offset(1));
        assert!(!plan.resumed);
        let gap = plan.gap.unwrap();
        assert_eq!(gap.from, at(&old, 58));
        assert_eq!(gap.to, at(&new, 0));
        assert_eq!(plan.start_after, Offset(0));
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

    #[test]
    fn silent_producers_expire_and_the_least_recent_goes_first() {
        let ttl = Duration::from_secs(10);
        let mut t = DedupeTable::new(4, 3, ttl);
        let t0 = Instant::now();
        t.record(&producer("a"), 1, Offset(1), t0);
        t.record(&producer("b"), 1, Offset(2), t0 + Duration::from_secs(5));
        // "a" is seen again: "b" is now the least recent.
        t.record(&producer("a"), 2, Offset(3), t0 + Duration::from_secs(6));
        t.record(&producer("c"), 1, Offset(4), t0 + Duration::from_secs(7));
        t.record(&producer("d"), 1, Offset(5), t0 + Duration::from_secs(8));
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.check(&producer("b"), 1),
            None,
            "full: the least recent went"
        );
        assert!(t.check(&producer("a"), 2).is_some());
        // Past the TTL of "a" (last seen at 6 s) and "c" (7 s): both go on the next record.
        t.record(
            &producer("e"),
            1,
            Offset(6),
            t0 + Duration::from_secs(17) + Duration::from_millis(500),
        );
        assert_eq!(t.check(&producer("a"), 2), None);
        assert_eq!(t.check(&producer("c"), 1), None);
        assert!(t.check(&producer("d"), 1).is_some());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_hundred_thousand_producers_stay_within_the_bound() {
        let mut t = DedupeTable::new(4, 1000, DEFAULT_PRODUCER_TTL);
        let now = Instant::now();
        for i in 0..100_000u64 {
            t.record(&producer(&format!("p{i}")), 1, Offset(i + 1), now);
        }
        assert_eq!(t.len(), 1000);
        assert!(t.check(&producer("p99999"), 1).is_some());
        assert_eq!(t.check(&producer("p0"), 1), None);
    }

    #[test]
    fn one_identity_never_dedupes_against_another_with_the_same_ids() {
        let mut t = DedupeTable::new(4, 10, DEFAULT_PRODUCER_TTL);
        let now = Instant::now();
        let alice = producer("c");
        let mallory = ProducerKey {
            identity: Identity::new("mallory").unwrap(),
            ..alice.clone()
        };
        t.record(&alice, 1, Offset(1), now);
        assert_eq!(t.check(&alice, 1), Some(Some(Offset(1))));
        assert_eq!(t.check(&mallory, 1), None, "a new publish of mallory's");
        t.record(&mallory, 1, Offset(2), now);
        assert_eq!(t.check(&mallory, 1), Some(Some(Offset(2))));
        assert_eq!(t.check(&alice, 1), Some(Some(Offset(1))));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn old_replays_beyond_the_window_are_still_recognised() {
        let mut t = DedupeTable::new(4, 10, DEFAULT_PRODUCER_TTL);
        let now = Instant::now();
        for i in 1..=10 {
            t.record(&producer("a"), i, Offset(i), now);
        }
        assert_eq!(t.check(&producer("a"), 2), Some(None));
        assert_eq!(t.check(&producer("a"), 9), Some(Some(Offset(9))));
        assert_eq!(t.check(&producer("a"), 11), None);
    }
}
