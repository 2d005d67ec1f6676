//! Where channel history lives: the asynchronous, shared [`HistoryStore`] seam and its in-memory
//! implementation, [`MemoryHistory`] (the Redis Streams one is
//! [`RedisStore`](super::redis_store::RedisStore)).
//!
//! A store owns, per channel: the epoch, the next offset, the retained messages (payloads and
//! their metadata — never encoded frames: each hub encodes at its edge, once per fan-out), and
//! the publish dedupe state. Numbering and the dedupe check happen in one atomic step
//! ([`HistoryStore::append`]), so any number of hub nodes sharing a store never give two
//! messages one offset and never store a replay twice. Reads are paged
//! ([`HistoryStore::read`] with a [`PageLimit`]): no replay or catch-up materialises a whole
//! history for one connection.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use tether_transport::protocol::{Epoch, Offset, Payload, Position};
use tokio::time::Instant;

use super::log::{DedupeTable, ProducerKey};
use crate::error::ChannelError;

/// Default history kept per channel: the last 1000 messages…
pub const DEFAULT_MAX_MESSAGES: usize = 1000;
/// …no older than 24 hours…
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// …and at most 64 MiB of payload bytes.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Default most messages in one page of a replay or catch-up read: 256.
pub const DEFAULT_PAGE_MESSAGES: usize = 256;
/// Default most payload bytes in one page (at least one message is always returned): 1 MiB.
pub const DEFAULT_PAGE_BYTES: usize = 1024 * 1024;

/// How much history a channel keeps: whichever limit is reached first wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most messages kept. Default [`DEFAULT_MAX_MESSAGES`].
    pub max_messages: usize,
    /// Oldest message kept. Default [`DEFAULT_MAX_AGE`].
    pub max_age: Duration,
    /// Most payload bytes kept. Default [`DEFAULT_MAX_BYTES`].
    pub max_bytes: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_messages: DEFAULT_MAX_MESSAGES,
            max_age: DEFAULT_MAX_AGE,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// One retained message: its offset and payload.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// Offset in the channel's epoch.
    pub offset: Offset,
    /// The payload, as published.
    pub payload: Payload,
}

/// One publish to append: who sent it, its sequence number, and the payload.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendRequest {
    /// The publishing handle (shared by all of its publishes).
    pub producer: Arc<ProducerKey>,
    /// Its sequence number (only grows per producer).
    pub seq: u64,
    /// The message.
    pub payload: Payload,
}

/// Orders the appends one writer has in flight on one channel: append `number` under `token`
/// applies only if append `number − 1` under the same token applied (number 1 always may).
/// A writer that pipelines appends (sends the next before the previous answered) thereby never
/// has a later batch stored when an earlier one was refused — which would make the refused
/// publishes look like replays of stored ones when they are resent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// Identifies the writer's sequence of appends (a new one after any failure).
    pub token: String,
    /// 1, 2, 3… within the token, never repeated.
    pub number: u64,
    /// The number of the append this one must follow (it applies only if that one did), or
    /// 0 when none is outstanding (it applies unconditionally).
    pub after: u64,
}

/// What became of one [`AppendRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// New: stored at this offset.
    Stored(Offset),
    /// A replay of something already stored (at this offset, while remembered).
    Duplicate(Option<Offset>),
}

/// The result of one [`HistoryStore::append`].
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    /// The channel's epoch after the append.
    pub epoch: Epoch,
    /// The channel's last offset after the append.
    pub head: Offset,
    /// One outcome per request, in request order.
    pub outcomes: Vec<AppendOutcome>,
}

/// Bounds of one page of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit {
    /// Most messages (0 reads only the channel's position).
    pub max_messages: usize,
    /// Most payload bytes; the first message is returned whatever its size.
    pub max_bytes: usize,
}

impl Default for PageLimit {
    fn default() -> Self {
        PageLimit {
            max_messages: DEFAULT_PAGE_MESSAGES,
            max_bytes: DEFAULT_PAGE_BYTES,
        }
    }
}

impl PageLimit {
    /// Reads the channel's epoch, head and first retained offset only.
    pub const POSITION_ONLY: PageLimit = PageLimit {
        max_messages: 0,
        max_bytes: 0,
    };
}

/// One page of a channel's history.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The channel's epoch.
    pub epoch: Epoch,
    /// The channel's last offset.
    pub head: Offset,
    /// The oldest offset retained (`head + 1` when nothing is).
    pub first: Offset,
    /// Messages after the requested offset, in order, within the page's limits.
    pub messages: Vec<StoredMessage>,
}

/// What a store tells the hub node about a channel it watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreNotice {
    /// Another node (or this one) appended: the channel's head in `epoch` is now at least
    /// `head`.
    Advanced {
        /// The epoch the head belongs to.
        epoch: Epoch,
        /// The new head.
        head: Offset,
    },
    /// Notices may have been missed (the store's notification link was re-established): read
    /// the channel's position again.
    Resync,
}

/// Receives a watched channel's notices. Called from the store's own tasks: keep it cheap
/// (forward to an actor).
pub type NoticeSink = Arc<dyn Fn(StoreNotice) + Send + Sync>;

/// A store's health, for the hub's `/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    /// `memory` or `redis`.
    pub kind: &'static str,
    /// Whether the store answers.
    pub healthy: bool,
    /// Why not, when unhealthy (the last error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where every channel's numbered messages and dedupe state live; one store is shared by all
/// channels of a hub (and, for a shared engine, by all hub nodes).
///
/// `seen` is the furthest position this node has seen of the channel: a store that finds its
/// head behind it in the same epoch has lost its tail, and must start a new epoch rather than
/// number new messages with offsets subscribers already saw (which would be a silent gap).
pub trait HistoryStore: Send + Sync + 'static {
    /// Numbers and stores the new requests of `batch`, in order, recognising replays — all in
    /// one atomic step, and only if the append before it under `fence` applied.
    fn append(
        &self,
        channel: &str,
        seen: Option<Position>,
        fence: Fence,
        batch: Vec<AppendRequest>,
    ) -> BoxFuture<'static, Result<Appended, ChannelError>>;

    /// The channel's position and the retained messages after `after`, within `limit`.
    fn read(
        &self,
        channel: &str,
        seen: Option<Position>,
        after: Offset,
        limit: PageLimit,
    ) -> BoxFuture<'static, Result<Page, ChannelError>>;

    /// Starts telling `sink` when `channel` advances (appends by other nodes). A store with a
    /// single writer may never call it.
    fn watch(&self, channel: &str, sink: NoticeSink);

    /// Stops the notices of `channel`.
    fn unwatch(&self, channel: &str);

    /// This hub node's actor for `channel` expired: no connection has it attached and nothing
    /// of it is in progress. A store that keeps the channel in this process may forget it
    /// ([`MemoryHistory`] drops its history, epoch and dedupe state: the next attach starts a
    /// new epoch); a shared store keeps it for the other nodes and lets it expire on its own
    /// ([`RedisStore`](super::redis_store::RedisStore): key TTLs). Called while the service
    /// holds its channel registry's lock, before a new actor for the name can exist: keep it
    /// cheap and never block. Default: nothing.
    fn release(&self, _channel: &str) {}

    /// Whether the store answers, and why not.
    fn health(&self) -> StoreHealth;

    /// Where the hub nodes sharing this store find each other, for the admin API (a store
    /// shared by several nodes should offer it). Default: `None` (one node).
    fn admin_peers(&self) -> Option<Arc<dyn tether_transport::hub::AdminPeers>> {
        None
    }
}

/// One channel in memory.
#[derive(Debug)]
struct MemoryChannel {
    epoch: Epoch,
    head: Offset,
    messages: VecDeque<(Instant, StoredMessage)>,
    bytes: usize,
    dedupe: DedupeTable,
}

impl MemoryChannel {
    fn expire(&mut self, retention: &Retention, now: Instant) {
        while let Some((at, front)) = self.messages.front() {
            let too_many = self.messages.len() > retention.max_messages;
            let too_big = self.bytes > retention.max_bytes;
            let too_old = now.saturating_duration_since(*at) > retention.max_age;
            if !(too_many || too_big || too_old) {
                break;
            }
            self.bytes -= front.payload.len();
            self.messages.pop_front();
        }
    }

    fn first(&self) -> Offset {
        self.messages
            .front()
            .map(|(_, m)| m.offset)
            .unwrap_or(self.head.next())
    }
}

/// Dedupe settings of the in-memory store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupeLimits {
    /// Recent `(seq, offset)` pairs remembered per producer.
    pub window: usize,
    /// Producers remembered per channel (least recently seen go first).
    pub max_producers: usize,
    /// How long a silent producer is remembered.
    pub ttl: Duration,
}

impl Default for DedupeLimits {
    fn default() -> Self {
        DedupeLimits {
            window: super::log::DEFAULT_DEDUPE_WINDOW,
            max_producers: super::log::DEFAULT_MAX_PRODUCERS,
            ttl: super::log::DEFAULT_PRODUCER_TTL,
        }
    }
}

/// Process memory: fast, and gone with the process (a restarted hub starts new epochs, which
/// clients see as a `Discontinuity`, never as silence). The embedded default.
#[derive(Debug)]
pub struct MemoryHistory {
    retention: Retention,
    dedupe: DedupeLimits,
    channels: Mutex<HashMap<String, Arc<Mutex<MemoryChannel>>>>,
}

impl MemoryHistory {
    /// An empty store.
    pub fn new(retention: Retention, dedupe: DedupeLimits) -> Self {
        MemoryHistory {
            retention,
            dedupe,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn channel(&self, name: &str) -> Arc<Mutex<MemoryChannel>> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(MemoryChannel {
                    epoch: Epoch::random(),
                    head: Offset(0),
                    messages: VecDeque::new(),
                    bytes: 0,
                    dedupe: DedupeTable::new(
                        self.dedupe.window,
                        self.dedupe.max_producers,
                        self.dedupe.ttl,
                    ),
                }))
            })
            .clone()
    }

    /// [`HistoryStore::append`], synchronously, at `now`.
    pub fn append_now(&self, channel: &str, batch: Vec<AppendRequest>, now: Instant) -> Appended {
        let channel = self.channel(channel);
        let mut c = channel.lock().unwrap_or_else(|p| p.into_inner());
        let mut outcomes = Vec::with_capacity(batch.len());
        let MemoryChannel {
            head,
            messages,
            bytes,
            dedupe,
            ..
        } = &mut *c;
        // One dedupe lookup per run of one producer's publishes (a publish run's are all one
        // producer's, and share its key).
        let mut requests = batch.into_iter().peekable();
        let mut run = Vec::new();
        while let Some(first) = requests.next() {
            let producer = first.producer.clone();
            run.push(first);
            while let Some(next) =
                requests.next_if(|r| Arc::ptr_eq(&r.producer, &producer) || r.producer == producer)
            {
                run.push(next);
            }
            let items = run.drain(..).map(|r| (r.seq, r.payload));
            dedupe.admit_run(&producer, items, now, |payload, duplicate| {
                if let Some(offset) = duplicate {
                    outcomes.push(AppendOutcome::Duplicate(offset));
                    return None;
                }
                let offset = head.next();
                *head = offset;
                *bytes += payload.len();
                messages.push_back((now, StoredMessage { offset, payload }));
                outcomes.push(AppendOutcome::Stored(offset));
                Some(offset)
            });
        }
        c.expire(&self.retention, now);
        Appended {
            epoch: c.epoch.clone(),
            head: c.head,
            outcomes,
        }
    }

    /// [`HistoryStore::read`], synchronously, at `now`.
    pub fn read_now(&self, channel: &str, after: Offset, limit: PageLimit, now: Instant) -> Page {
        let channel = self.channel(channel);
        let mut c = channel.lock().unwrap_or_else(|p| p.into_inner());
        c.expire(&self.retention, now);
        let first = c.first();
        // Offsets are contiguous, so the index is arithmetic.
        let skip = after.0.saturating_add(1).saturating_sub(first.0) as usize;
        let mut messages = Vec::new();
        let mut bytes = 0;
        for (_, m) in c.messages.iter().skip(skip).take(limit.max_messages) {
            if !messages.is_empty() && bytes + m.payload.len() > limit.max_bytes {
                break;
            }
            bytes += m.payload.len();
            messages.push(m.clone());
        }
        Page {
            epoch: c.epoch.clone(),
            head: c.head,
            first,
            messages,
        }
    }

    /// Messages retained on `channel`.
    pub fn retained(&self, channel: &str) -> usize {
        let channel = self.channel(channel);
        let c = channel.lock().unwrap_or_else(|p| p.into_inner());
        c.messages.len()
    }

    /// Channels this store holds (retained history or not).
    pub fn channel_count(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Default for MemoryHistory {
    fn default() -> Self {
        MemoryHistory::new(Retention::default(), DedupeLimits::default())
    }
}

impl HistoryStore for MemoryHistory {
    /// Appends run synchronously, in call order: the fence always holds.
    fn append(
        &self,
        channel: &str,
        _seen: Option<Position>,
        _fence: Fence,
        batch: Vec<AppendRequest>,
    ) -> BoxFuture<'static, Result<Appended, ChannelError>> {
        let appended = self.append_now(channel, batch, Instant::now());
        Box::pin(futures::future::ready(Ok(appended)))
    }

    fn read(
        &self,
        channel: &str,
        _seen: Option<Position>,
        after: Offset,
        limit: PageLimit,
    ) -> BoxFuture<'static, Result<Page, ChannelError>> {
        let page = self.read_now(channel, after, limit, Instant::now());
        Box::pin(futures::future::ready(Ok(page)))
    }

    /// This process is the only writer: nothing to watch.
    fn watch(&self, _channel: &str, _sink: NoticeSink) {}

    fn unwatch(&self, _channel: &str) {}

    /// Forgets the channel: its history, epoch and dedupe state go (a later attach starts a new
    /// epoch, which a resuming subscriber is told of as a gap).
    fn release(&self, channel: &str) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.remove(channel);
        // The table gives memory back as channels expire (amortised: only once it is mostly
        // empty).
        let len = channels.len();
        if channels.capacity() > 64 && len < channels.capacity() / 4 {
            channels.shrink_to(len * 2);
        }
    }

    fn health(&self) -> StoreHealth {
        StoreHealth {
            kind: "memory",
            healthy: true,
            reason: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_transport::protocol::{ClientId, InstanceId};

    fn producer(name: &str) -> ProducerKey {
        ProducerKey {
            identity: tether_transport::hub::Identity::new("alice").unwrap(),
            client: ClientId(name.into()),
            instance: InstanceId("i".into()),
            producer: String::new(),
        }
    }

    fn req(name: &str, seq: u64) -> AppendRequest {
        AppendRequest {
            producer: producer(name).into(),
            seq,
            payload: Payload::from_json(&format!("\"message {seq:02}\"")).unwrap(),
        }
    }

    fn store(retention: Retention) -> MemoryHistory {
        MemoryHistory::new(
            retention,
            DedupeLimits {
                window: 4,
                max_producers: 10,
                ..DedupeLimits::default()
            },
        )
    }

    fn offsets(page: &Page) -> Vec<u64> {
        page.messages.iter().map(|m| m.offset.0).collect()
    }

    #[test]
    fn keeps_the_last_n_messages() {
        let now = Instant::now();
        let h = store(Retention {
            max_messages: 3,
            ..Retention::default()
        });
        let batch: Vec<_> = (1..=5).map(|i| req("a", i)).collect();
        let appended = h.append_now("c", batch, now);
        assert_eq!(appended.head, Offset(5));
        let page = h.read_now("c", Offset(3), PageLimit::default(), now);
        assert_eq!(page.first, Offset(3));
        assert_eq!(offsets(&page), [4, 5]);
        let all = h.read_now("c", Offset(0), PageLimit::default(), now);
        assert_eq!(offsets(&all), [3, 4, 5]);
        assert!(h
            .read_now("c", Offset(5), PageLimit::default(), now)
            .messages
            .is_empty());
    }

    #[test]
    fn pages_are_bounded_by_count_and_bytes_but_never_empty() {
        let now = Instant::now();
        let h = store(Retention::default());
        let batch: Vec<_> = (1..=10).map(|i| req("a", i)).collect();
        h.append_now("c", batch, now);
        let by_count = PageLimit {
            max_messages: 4,
            max_bytes: usize::MAX,
        };
        assert_eq!(
            offsets(&h.read_now("c", Offset(2), by_count, now)),
            [3, 4, 5, 6]
        );
        // Each payload is 12 bytes: 30 bytes hold two.
        let by_bytes = PageLimit {
            max_messages: 100,
            max_bytes: 30,
        };
        assert_eq!(offsets(&h.read_now("c", Offset(0), by_bytes, now)), [1, 2]);
        let tiny = PageLimit {
            max_messages: 100,
            max_bytes: 1,
        };
        assert_eq!(offsets(&h.read_now("c", Offset(0), tiny, now)), [1]);
        let position = h.read_now("c", Offset(0), PageLimit::POSITION_ONLY, now);
        assert!(position.messages.is_empty());
        assert_eq!((position.first, position.head), (Offset(1), Offset(10)));
    }

    #[test]
    fn replays_are_recognised_in_the_same_step_as_the_append() {
        let now = Instant::now();
        let h = store(Retention::default());
        h.append_now("c", vec![req("a", 1), req("b", 1), req("a", 2)], now);
        let again = h.append_now("c", vec![req("a", 1), req("a", 2), req("a", 3)], now);
        assert_eq!(
            again.outcomes,
            [
                AppendOutcome::Duplicate(Some(Offset(1))),
                AppendOutcome::Duplicate(Some(Offset(3))),
                AppendOutcome::Stored(Offset(4)),
            ]
        );
        assert_eq!(again.head, Offset(4));
    }

    #[tokio::test(start_paused = true)]
    async fn expires_by_age() {
        let h = store(Retention {
            max_age: Duration::from_secs(60),
            ..Retention::default()
        });
        h.append_now("c", vec![req("a", 1)], Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        h.append_now("c", vec![req("a", 2)], Instant::now());
        tokio::time::advance(Duration::from_secs(31)).await;
        let page = h.read_now("c", Offset(0), PageLimit::default(), Instant::now());
        assert_eq!(page.first, Offset(2));
        tokio::time::advance(Duration::from_secs(30)).await;
        let page = h.read_now("c", Offset(0), PageLimit::default(), Instant::now());
        assert_eq!((page.first, page.head), (Offset(3), Offset(2)));
        assert_eq!(h.retained("c"), 0);
    }

    #[test]
    fn expires_by_bytes() {
        let now = Instant::now();
        let h = store(Retention {
            max_bytes: 30,
            ..Retention::default()
        });
        let batch: Vec<_> = (1..=4).map(|i| req("a", i)).collect();
        h.append_now("c", batch, now); // 12 bytes each
        assert_eq!(h.retained("c"), 2);
        let page = h.read_now("c", Offset(0), PageLimit::default(), now);
        assert_eq!(page.first, Offset(3));
    }

    #[test]
    fn a_released_channel_is_forgotten_and_starts_a_new_epoch() {
        let now = Instant::now();
        let h = store(Retention::default());
        let before = h.append_now("c", vec![req("a", 1)], now);
        h.append_now("other", vec![req("a", 1)], now);
        h.release("c");
        assert_eq!(h.channel_count(), 1, "only the other channel is left");
        let page = h.read_now("c", Offset(0), PageLimit::default(), now);
        assert_ne!(page.epoch, before.epoch);
        assert_eq!((page.head, page.first), (Offset(0), Offset(1)));
        // Its dedupe state went with it: the same publish is new in the new epoch.
        assert_eq!(
            h.append_now("c", vec![req("a", 1)], now).outcomes,
            [AppendOutcome::Stored(Offset(1))]
        );
        assert_eq!(h.retained("other"), 1);
    }

    #[test]
    fn every_channel_has_its_own_epoch_and_keeps_it() {
        let h = MemoryHistory::default();
        let now = Instant::now();
        let a = h
            .read_now("a", Offset(0), PageLimit::POSITION_ONLY, now)
            .epoch;
        let b = h
            .read_now("b", Offset(0), PageLimit::POSITION_ONLY, now)
            .epoch;
        assert_ne!(a, b);
        assert_eq!(h.append_now("a", vec![req("x", 1)], now).epoch, a);
    }
}
