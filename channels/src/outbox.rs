//! A channel's outgoing buffer: every published message keeps its sequence number and stays
//! here until the hub acknowledges it. Pure — the ChannelActor drives it.
//!
//! Invariants:
//! * sequence numbers start at 1 and increase by one per accepted publish;
//! * the queue is in sequence order, and entries `[0, first_unsent)` are in flight, the rest
//!   unsent, so sends (and replays after a reconnect) always go out in original order, before
//!   anything newer;
//! * it is bounded by count and bytes; a publish beyond either is refused, never dropped;
//! * at most `max_in_flight` entries are unacknowledged on the wire at once (flow control);
//! * in a durable buffer ([`OutgoingBuffer::new_durable`]) an entry goes on the wire only once
//!   its write to the store is committed ([`OutgoingBuffer::mark_committed`]): the hub never
//!   has a publish that a crash could make the client forget.

use std::collections::VecDeque;

use tether_transport::protocol::Payload;
use tokio::time::Instant;

/// Default bound on queued (unacknowledged) messages per channel: 10,000.
pub const DEFAULT_MAX_QUEUED: usize = 10_000;
/// Default bound on queued bytes per channel: 16 MiB.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 16 * 1024 * 1024;
/// Default bound on messages on the wire awaiting their ack, per channel: 256.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// What a full buffer does with a new publish. Neither policy drops anything silently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// Refuse the new publish with `QueueFull` (default).
    #[default]
    RejectNew,
    /// Make room by evicting the oldest publishes not yet sent (the hub cannot have them);
    /// each evicted publisher gets `Evicted`. When the unsent ones cannot make enough room
    /// (everything queued is in flight), the new publish is refused as with `RejectNew`.
    EvictOldestUnsent,
}

/// The bounds of an [`OutgoingBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    /// Most messages queued. Default [`DEFAULT_MAX_QUEUED`].
    pub max_messages: usize,
    /// Most payload bytes queued. Default [`DEFAULT_MAX_QUEUED_BYTES`].
    pub max_bytes: usize,
    /// Most messages in flight. Default [`DEFAULT_MAX_IN_FLIGHT`].
    pub max_in_flight: usize,
    /// What happens to a publish that does not fit. Default [`OverflowPolicy::RejectNew`].
    pub overflow: OverflowPolicy,
}

impl Default for BufferLimits {
    fn default() -> Self {
        BufferLimits {
            max_messages: DEFAULT_MAX_QUEUED,
            max_bytes: DEFAULT_MAX_QUEUED_BYTES,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            overflow: OverflowPolicy::RejectNew,
        }
    }
}

/// One queued publish. `R` is whatever answers the publisher (a oneshot sender in the actor).
#[derive(Debug)]
pub struct Pending<R> {
    /// Its sequence number.
    pub seq: u64,
    /// The message.
    pub payload: Payload,
    /// Who to tell when it is acknowledged or refused.
    pub responder: R,
    /// When it was accepted (for publish-to-ack latency).
    pub accepted_at: Instant,
    /// How many times it has been sent (more than once = replayed).
    pub sends: u32,
}

/// A publish the buffer accepted.
#[derive(Debug)]
pub struct Pushed<R> {
    /// Its sequence number.
    pub seq: u64,
    /// Publishes evicted to make room (only with [`OverflowPolicy::EvictOldestUnsent`]); never
    /// sent, so the hub cannot have them.
    pub evicted: Vec<Pending<R>>,
}

/// The buffer refused a publish; the responder comes back so the caller can answer it.
#[derive(Debug)]
pub struct Refused<R> {
    /// The responder of the refused publish.
    pub responder: R,
    /// Messages queued at the time.
    pub messages: usize,
    /// Bytes queued at the time.
    pub bytes: usize,
}

/// A channel's outgoing buffer.
#[derive(Debug)]
pub struct OutgoingBuffer<R> {
    limits: BufferLimits,
    /// Entries wait for [`OutgoingBuffer::mark_committed`] before they may be sent.
    durable: bool,
    /// Every entry up to this sequence number is committed (in memory: all of them).
    committed_through: u64,
    next_seq: u64,
    queue: VecDeque<Pending<R>>,
    first_unsent: usize,
    bytes: usize,
}

impl<R> OutgoingBuffer<R> {
    /// An empty buffer; the first publish gets sequence 1.
    pub fn new(limits: BufferLimits) -> Self {
        OutgoingBuffer {
            limits,
            durable: false,
            committed_through: 0,
            next_seq: 1,
            queue: VecDeque::new(),
            first_unsent: 0,
            bytes: 0,
        }
    }

    /// An empty durable buffer continuing after sequence number `last_seq` (0 for a new
    /// channel): new entries are sent only once committed.
    pub fn new_durable(limits: BufferLimits, last_seq: u64) -> Self {
        OutgoingBuffer {
            durable: true,
            committed_through: last_seq,
            next_seq: last_seq.saturating_add(1),
            ..Self::new(limits)
        }
    }

    /// Puts back a committed entry an earlier run left in the store (in sequence order, before
    /// any new publish). It is unsent here but may be stored at the hub: it is never evicted.
    /// Restored entries are kept even beyond the limits — nothing accepted is dropped — and
    /// new publishes are refused until acks bring the buffer back under them.
    pub fn restore(&mut self, seq: u64, payload: Payload, responder: R, now: Instant) {
        debug_assert!(self.queue.back().is_none_or(|last| last.seq < seq));
        self.bytes += payload.len();
        self.next_seq = self.next_seq.max(seq.saturating_add(1));
        self.committed_through = self.committed_through.max(seq);
        self.queue.push_back(Pending {
            seq,
            payload,
            responder,
            accepted_at: now,
            // Sent by the earlier run as far as anyone knows.
            sends: 1,
        });
    }

    /// The store committed every entry up to `through`: they may go on the wire. Returns the
    /// sequence numbers of the queued entries this made committed, in order.
    pub fn mark_committed(&mut self, through: u64) -> Vec<u64> {
        let from = self.committed_through;
        self.committed_through = self.committed_through.max(through);
        self.queue
            .iter()
            .map(|e| e.seq)
            .filter(|seq| *seq > from && *seq <= through)
            .collect()
    }

    /// The store failed to commit `from..=through`: removes and returns those entries (never
    /// sent: they were not committed).
    pub fn remove_uncommitted(&mut self, from: u64, through: u64) -> Vec<Pending<R>> {
        let mut removed = Vec::new();
        let mut index = self.first_unsent;
        while index < self.queue.len() {
            let seq = self.queue[index].seq;
            if seq >= from && seq <= through && seq > self.committed_through {
                let entry = self.queue.remove(index).expect("index in range");
                self.bytes -= entry.payload.len();
                removed.push(entry);
            } else {
                index += 1;
            }
        }
        removed
    }

    /// Whether entry `seq` is committed (always, in memory).
    pub fn is_committed(&self, seq: u64) -> bool {
        !self.durable || seq <= self.committed_through
    }

    /// The responder of queued entry `seq`.
    pub fn responder_mut(&mut self, seq: u64) -> Option<&mut R> {
        let index = self.index_of(seq)?;
        Some(&mut self.queue[index].responder)
    }

    /// The payload of queued entry `seq` (to move its bytes: the same bytes, elsewhere).
    pub fn payload_mut(&mut self, seq: u64) -> Option<&mut Payload> {
        let index = self.index_of(seq)?;
        Some(&mut self.queue[index].payload)
    }

    /// Every queued payload, oldest first (to move their bytes: the same bytes, elsewhere).
    pub fn payloads_mut(&mut self) -> impl Iterator<Item = &mut Payload> {
        self.queue.iter_mut().map(|p| &mut p.payload)
    }

    /// The oldest sequence number queued.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.queue.front().map(|p| p.seq)
    }

    /// Where entry `seq` is. The queue is in seq order and usually without holes (entries
    /// leave from the front, as their acks come in order), so `seq`'s distance from the
    /// oldest is tried first, then a search.
    fn index_of(&self, seq: u64) -> Option<usize> {
        let oldest = self.queue.front()?.seq;
        let guess = usize::try_from(seq.checked_sub(oldest)?).ok()?;
        match self.queue.get(guess) {
            Some(entry) if entry.seq == seq => Some(guess),
            _ => self.queue.binary_search_by_key(&seq, |p| p.seq).ok(),
        }
    }

    /// Queues a publish and returns its sequence number with whatever the overflow policy
    /// evicted to make room, or refuses it.
    pub fn push(
        &mut self,
        payload: Payload,
        responder: R,
        now: Instant,
    ) -> Result<Pushed<R>, Refused<R>> {
        let size = payload.len();
        let excess_count = (self.queue.len() + 1).saturating_sub(self.limits.max_messages);
        let excess_bytes = (self.bytes + size).saturating_sub(self.limits.max_bytes);
        let mut evicted = Vec::new();
        if excess_count > 0 || excess_bytes > 0 {
            let room = match self.limits.overflow {
                OverflowPolicy::RejectNew => None,
                OverflowPolicy::EvictOldestUnsent => {
                    self.unsent_to_evict(excess_count, excess_bytes)
                }
            };
            let Some(n) = room.filter(|_| size <= self.limits.max_bytes) else {
                return Err(Refused {
                    responder,
                    messages: self.queue.len(),
                    bytes: self.bytes,
                });
            };
            let first_never_sent = self.first_never_sent();
            for _ in 0..n {
                if let Some(old) = self.queue.remove(first_never_sent) {
                    self.bytes -= old.payload.len();
                    evicted.push(old);
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if !self.durable {
            self.committed_through = seq;
        }
        self.bytes += size;
        self.queue.push_back(Pending {
            seq,
            payload,
            responder,
            accepted_at: now,
            sends: 0,
        });
        Ok(Pushed { seq, evicted })
    }

    /// Index of the first entry never put on the wire. Entries before it were sent at least
    /// once (sends go in queue order), so the hub may have them: they are never evicted, even
    /// after a reconnect made them unsent again.
    fn first_never_sent(&self) -> usize {
        self.queue
            .iter()
            .position(|e| e.sends == 0)
            .unwrap_or(self.queue.len())
    }

    /// How many of the oldest never-sent entries must go to free `count` slots and `bytes`, if
    /// they can.
    fn unsent_to_evict(&self, count: usize, bytes: usize) -> Option<usize> {
        let (mut n, mut freed) = (0usize, 0usize);
        for entry in self.queue.iter().skip(self.first_never_sent()) {
            if n >= count && freed >= bytes {
                break;
            }
            n += 1;
            freed += entry.payload.len();
        }
        (n >= count && freed >= bytes).then_some(n)
    }

    /// The next message to put on the wire, if the in-flight window allows one: always the
    /// oldest unsent. Marks it in flight.
    pub fn next_to_send(&mut self) -> Option<&Pending<R>> {
        if self.first_unsent >= self.queue.len()
            || self.first_unsent >= self.limits.max_in_flight
            || self.queue[self.first_unsent].seq > self.committed_through
        {
            return None;
        }
        let entry = &mut self.queue[self.first_unsent];
        entry.sends += 1;
        self.first_unsent += 1;
        Some(&self.queue[self.first_unsent - 1])
    }

    /// At most how many entries [`OutgoingBuffer::next_to_send`] would hand out now (the
    /// in-flight window's room among the unsent; a durable buffer may hand out fewer).
    pub fn sendable(&self) -> usize {
        self.queue
            .len()
            .min(self.limits.max_in_flight)
            .saturating_sub(self.first_unsent)
    }

    /// The hub acknowledged `seq`: removes and returns it (`None` for an unknown or repeated ack).
    pub fn ack(&mut self, seq: u64) -> Option<Pending<R>> {
        self.remove(seq)
    }

    /// The hub refused `seq` permanently: removes and returns it.
    pub fn reject(&mut self, seq: u64) -> Option<Pending<R>> {
        self.remove(seq)
    }

    /// The connection is gone: everything in flight becomes unsent again, in order.
    pub fn on_disconnect(&mut self) {
        self.first_unsent = 0;
    }

    /// Empties the buffer (the channel failed or closed) so every publisher can be answered;
    /// each entry's `sends` tells whether the hub may have it.
    pub fn drain(&mut self) -> Vec<Pending<R>> {
        self.first_unsent = 0;
        self.bytes = 0;
        self.queue.drain(..).collect()
    }

    /// Messages queued (in flight + unsent).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Payload bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Messages on the wire awaiting their ack.
    pub fn in_flight(&self) -> usize {
        self.first_unsent
    }

    fn remove(&mut self, seq: u64) -> Option<Pending<R>> {
        let index = self.index_of(seq)?;
        if index >= self.first_unsent {
            // Not on the wire on this connection: an ack from an earlier connection arriving
            // late is still a valid ack, so accept it.
        } else {
            self.first_unsent -= 1;
        }
        let entry = self.queue.remove(index)?;
        self.bytes -= entry.payload.len();
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(n: u64) -> Payload {
        Payload::from_json(&n.to_string()).unwrap()
    }

    fn buffer(max_messages: usize, max_in_flight: usize) -> OutgoingBuffer<u64> {
        OutgoingBuffer::new(BufferLimits {
            max_messages,
            max_bytes: usize::MAX,
            max_in_flight,
            overflow: OverflowPolicy::RejectNew,
        })
    }

    fn send_all(b: &mut OutgoingBuffer<u64>) -> Vec<u64> {
        std::iter::from_fn(|| b.next_to_send().map(|p| p.seq)).collect()
    }

    #[test]
    fn sequences_start_at_one_and_sends_go_in_order() {
        let mut b = buffer(10, 10);
        let now = Instant::now();
        for i in 1..=3 {
            assert_eq!(b.push(p(i), i, now).unwrap().seq, i);
        }
        assert_eq!(send_all(&mut b), [1, 2, 3]);
        assert_eq!(b.in_flight(), 3);
        assert_eq!(b.ack(1).unwrap().responder, 1);
        assert!(b.ack(1).is_none());
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn entries_are_found_by_seq_with_holes_in_the_queue() {
        let mut b = buffer(10, 10);
        let now = Instant::now();
        for i in 1..=6 {
            b.push(p(i), i, now).unwrap();
        }
        send_all(&mut b);
        // Out of order: holes at 3 and 1 (the oldest).
        assert_eq!(b.ack(3).unwrap().responder, 3);
        assert_eq!(b.ack(1).unwrap().responder, 1);
        assert!(b.responder_mut(1).is_none() && b.responder_mut(3).is_none());
        assert!(b.responder_mut(0).is_none() && b.responder_mut(7).is_none());
        for seq in [2, 4, 5, 6] {
            assert_eq!(b.responder_mut(seq).copied(), Some(seq));
        }
        assert_eq!(b.ack(6).unwrap().responder, 6);
        assert_eq!(b.ack(4).unwrap().responder, 4);
        assert_eq!(b.ack(2).unwrap().responder, 2);
        assert_eq!(b.ack(5).unwrap().responder, 5);
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn a_reconnect_replays_unacked_before_new_ones() {
        let mut b = buffer(10, 10);
        let now = Instant::now();
        for i in 1..=3 {
            b.push(p(i), i, now).unwrap();
        }
        send_all(&mut b);
        b.ack(1);
        b.on_disconnect();
        b.push(p(4), 4, now).unwrap();
        assert_eq!(send_all(&mut b), [2, 3, 4]);
        let replayed: Vec<_> = b.queue.iter().map(|p| p.sends).collect();
        assert_eq!(replayed, [2, 2, 1]);
    }

    #[test]
    fn the_in_flight_window_holds_back_the_rest() {
        let mut b = buffer(10, 2);
        let now = Instant::now();
        for i in 1..=5 {
            b.push(p(i), i, now).unwrap();
        }
        assert_eq!(send_all(&mut b), [1, 2]);
        b.ack(1);
        assert_eq!(send_all(&mut b), [3]);
    }

    #[test]
    fn bounded_by_count_and_bytes() {
        let now = Instant::now();
        let mut b = buffer(2, 10);
        b.push(p(1), 1, now).unwrap();
        b.push(p(2), 2, now).unwrap();
        let refused = b.push(p(3), 3, now).unwrap_err();
        assert_eq!((refused.responder, refused.messages), (3, 2));

        let mut b = OutgoingBuffer::new(BufferLimits {
            max_messages: 100,
            max_bytes: 3,
            max_in_flight: 10,
            overflow: OverflowPolicy::RejectNew,
        });
        b.push(p(10), 1, now).unwrap(); // "10": 2 bytes
        assert!(b.push(p(10), 2, now).is_err());
        assert_eq!(b.bytes(), 2);
        b.ack(1);
        assert_eq!(b.bytes(), 0);
        assert!(b.push(p(10), 2, now).is_ok());
    }

    #[test]
    fn evict_oldest_unsent_makes_room_without_touching_what_is_in_flight() {
        let now = Instant::now();
        let mut b = OutgoingBuffer::new(BufferLimits {
            max_messages: 3,
            max_bytes: usize::MAX,
            max_in_flight: 1,
            overflow: OverflowPolicy::EvictOldestUnsent,
        });
        for i in 1..=3 {
            b.push(p(i), i, now).unwrap();
        }
        assert_eq!(send_all(&mut b), [1]);
        let pushed = b.push(p(4), 4, now).unwrap();
        assert_eq!(pushed.seq, 4);
        assert_eq!(
            pushed.evicted.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [2]
        );
        assert_eq!(b.queue.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 3, 4]);

        // Everything in flight: nothing unsent to evict, so the new one is refused.
        let mut b = OutgoingBuffer::new(BufferLimits {
            max_messages: 2,
            max_bytes: usize::MAX,
            max_in_flight: 2,
            overflow: OverflowPolicy::EvictOldestUnsent,
        });
        b.push(p(1), 1, now).unwrap();
        b.push(p(2), 2, now).unwrap();
        send_all(&mut b);
        assert!(b.push(p(3), 3, now).is_err());
        assert_eq!(b.len(), 2);

        // After a reconnect everything is unsent again, but what was sent may be stored:
        // it is still not evictable.
        b.on_disconnect();
        assert!(b.push(p(3), 3, now).is_err());
        assert_eq!(b.queue.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn a_late_ack_from_an_old_connection_is_honoured() {
        let mut b = buffer(10, 10);
        let now = Instant::now();
        b.push(p(1), 1, now).unwrap();
        b.push(p(2), 2, now).unwrap();
        send_all(&mut b);
        b.on_disconnect();
        assert!(b.ack(2).is_some());
        assert_eq!(send_all(&mut b), [1]);
    }

    /// What the wire does to one frame.
    #[derive(Debug, Clone, Copy)]
    enum Fate {
        Delivered,
        LostBeforeHub,
        AckLost,
    }

    proptest! {
        /// Any interleaving of publishes, losses and reconnects ends with every message stored
        /// exactly once, in publish order, and every publisher answered.
        #[test]
        fn exactly_once_in_order_under_any_losses(
            publishes in 1usize..60,
            fates in proptest::collection::vec(
                prop_oneof![
                    6 => Just(Fate::Delivered),
                    1 => Just(Fate::LostBeforeHub),
                    1 => Just(Fate::AckLost),
                ],
                1..400,
            ),
            window in 1usize..8,
        ) {
            use crate::hub::history::{AppendOutcome, AppendRequest, DedupeLimits, MemoryHistory, Retention};
            use crate::hub::log::ProducerKey;

            let now = Instant::now();
            let hub = MemoryHistory::new(
                Retention { max_messages: 10_000, ..Retention::default() },
                DedupeLimits::default(),
            );
            let producer = ProducerKey {
                identity: tether_transport::hub::Identity::new("identity").unwrap(),
                client: tether_transport::protocol::ClientId("client".into()),
                instance: tether_transport::protocol::InstanceId("instance".into()),
                producer: "handle".into(),
            };
            let mut b = buffer(1000, window);
            let mut answered = Vec::new();
            for i in 1..=publishes as u64 {
                b.push(p(i), i, now).unwrap();
            }
            let mut fates = fates.into_iter().cycle().take(20_000);
            while !b.is_empty() {
                let mut wire = Vec::new();
                while let Some(entry) = b.next_to_send() {
                    wire.push((entry.seq, entry.payload.clone()));
                }
                let mut cut = false;
                for (seq, payload) in wire {
                    match fates.next().unwrap_or(Fate::Delivered) {
                        Fate::LostBeforeHub => { cut = true; break; }
                        fate => {
                            let request = AppendRequest { producer: producer.clone().into(), seq, payload };
                            let appended = hub.append_now("c", vec![request], now);
                            if let AppendOutcome::Stored(offset) = appended.outcomes[0] {
                                prop_assert_eq!(offset.0, seq, "stored out of order");
                            }
                            if matches!(fate, Fate::AckLost) { cut = true; break; }
                            if let Some(done) = b.ack(seq) {
                                answered.push(done.responder);
                            }
                        }
                    }
                }
                if cut {
                    b.on_disconnect();
                }
            }
            let head = hub.read_now("c", tether_transport::protocol::Offset(0), crate::hub::history::PageLimit::POSITION_ONLY, now).head;
            prop_assert_eq!(head.0, publishes as u64);
            let all: Vec<u64> = (1..=publishes as u64).collect();
            prop_assert_eq!(answered, all);
        }
    }
}
