//! Channel history behind a trait, with the in-memory store.
//!
//! The store keeps the *encoded* `message` frames, so a replay writes the same bytes the live
//! fan-out wrote: nothing is encoded twice.

use std::collections::VecDeque;
use std::time::Duration;

use bytestring::ByteString;
use tether_transport::protocol::{Epoch, Offset};
use tokio::time::Instant;

/// Default history kept per channel: the last 1000 messages…
pub const DEFAULT_MAX_MESSAGES: usize = 1000;
/// …no older than 24 hours…
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// …and at most 64 MiB of encoded frames.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// How much history a channel keeps: whichever limit is reached first wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most messages kept. Default [`DEFAULT_MAX_MESSAGES`].
    pub max_messages: usize,
    /// Oldest message kept. Default [`DEFAULT_MAX_AGE`].
    pub max_age: Duration,
    /// Most bytes of encoded frames kept. Default [`DEFAULT_MAX_BYTES`].
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

/// One stored message: its offset, when it was stored, and its encoded `message` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// Offset in the channel's epoch.
    pub offset: Offset,
    /// When it was stored.
    pub at: Instant,
    /// The encoded `message` frame.
    pub frame: ByteString,
}

/// Where a channel's numbered messages live. One store per channel.
pub trait HistoryStore: Send + 'static {
    /// The store's epoch: a new one whenever the store starts without its previous contents.
    fn epoch(&self) -> &Epoch;
    /// The last offset assigned (0 before the first message).
    fn head(&self) -> Offset;
    /// Appends the message at `head + 1`.
    fn append(&mut self, message: StoredMessage);
    /// The oldest offset still retained at `now` (`head + 1` when nothing is).
    fn first_retained(&mut self, now: Instant) -> Offset;
    /// Every retained message after `after`, in order.
    fn read_after(&mut self, after: Offset, now: Instant) -> Vec<StoredMessage>;
    /// Number of retained messages.
    fn len(&self) -> usize;
    /// Whether nothing is retained.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Creates the store of each new channel.
pub trait HistoryFactory: Send + Sync + 'static {
    /// A store for `channel`.
    fn create(&self, channel: &str) -> Box<dyn HistoryStore>;
}

/// Process memory: fast, and gone with the process (a restarted hub starts new epochs, which
/// clients see as a `Discontinuity`, never as silence).
#[derive(Debug)]
pub struct MemoryHistory {
    epoch: Epoch,
    head: Offset,
    retention: Retention,
    messages: VecDeque<StoredMessage>,
    bytes: usize,
}

impl MemoryHistory {
    /// An empty store with a fresh epoch.
    pub fn new(retention: Retention) -> Self {
        MemoryHistory {
            epoch: Epoch::random(),
            head: Offset(0),
            retention,
            messages: VecDeque::new(),
            bytes: 0,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(front) = self.messages.front() {
            let too_many = self.messages.len() > self.retention.max_messages;
            let too_big = self.bytes > self.retention.max_bytes;
            let too_old = now.saturating_duration_since(front.at) > self.retention.max_age;
            if !(too_many || too_big || too_old) {
                break;
            }
            self.bytes -= front.frame.len();
            self.messages.pop_front();
        }
    }
}

impl HistoryStore for MemoryHistory {
    fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    fn head(&self) -> Offset {
        self.head
    }

    fn append(&mut self, message: StoredMessage) {
        debug_assert_eq!(message.offset, self.head.next());
        self.head = message.offset;
        self.bytes += message.frame.len();
        let now = message.at;
        self.messages.push_back(message);
        self.expire(now);
    }

    fn first_retained(&mut self, now: Instant) -> Offset {
        self.expire(now);
        self.messages
            .front()
            .map(|m| m.offset)
            .unwrap_or(self.head.next())
    }

    fn read_after(&mut self, after: Offset, now: Instant) -> Vec<StoredMessage> {
        self.expire(now);
        let Some(first) = self.messages.front().map(|m| m.offset) else {
            return Vec::new();
        };
        // Offsets are contiguous, so the index is arithmetic.
        let skip = after.0.saturating_add(1).saturating_sub(first.0) as usize;
        self.messages.iter().skip(skip).cloned().collect()
    }

    fn len(&self) -> usize {
        self.messages.len()
    }
}

/// Creates a [`MemoryHistory`] per channel with one retention policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryHistoryFactory {
    /// Retention of every store it creates.
    pub retention: Retention,
}

impl HistoryFactory for MemoryHistoryFactory {
    fn create(&self, _channel: &str) -> Box<dyn HistoryStore> {
        Box::new(MemoryHistory::new(self.retention))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(offset: u64, at: Instant) -> StoredMessage {
        StoredMessage {
            offset: Offset(offset),
            at,
            frame: format!("frame {offset}").into(),
        }
    }

    #[test]
    fn keeps_the_last_n_messages() {
        let now = Instant::now();
        let mut h = MemoryHistory::new(Retention {
            max_messages: 3,
            ..Retention::default()
        });
        for i in 1..=5 {
            h.append(msg(i, now));
        }
        assert_eq!(h.head(), Offset(5));
        assert_eq!(h.first_retained(now), Offset(3));
        let offsets: Vec<_> = h
            .read_after(Offset(3), now)
            .iter()
            .map(|m| m.offset.0)
            .collect();
        assert_eq!(offsets, [4, 5]);
        let all: Vec<_> = h
            .read_after(Offset(0), now)
            .iter()
            .map(|m| m.offset.0)
            .collect();
        assert_eq!(all, [3, 4, 5]);
        assert!(h.read_after(Offset(5), now).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn expires_by_age() {
        let mut h = MemoryHistory::new(Retention {
            max_age: Duration::from_secs(60),
            ..Retention::default()
        });
        h.append(msg(1, Instant::now()));
        tokio::time::advance(Duration::from_secs(30)).await;
        h.append(msg(2, Instant::now()));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(h.first_retained(Instant::now()), Offset(2));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(h.first_retained(Instant::now()), Offset(3));
        assert!(h.is_empty());
        assert_eq!(h.head(), Offset(2));
    }

    #[test]
    fn expires_by_bytes() {
        let now = Instant::now();
        let mut h = MemoryHistory::new(Retention {
            max_bytes: 20,
            ..Retention::default()
        });
        for i in 1..=4 {
            h.append(msg(i, now)); // 7 bytes each
        }
        assert_eq!(h.len(), 2);
        assert_eq!(h.first_retained(now), Offset(3));
    }

    #[test]
    fn every_store_has_its_own_epoch() {
        let f = MemoryHistoryFactory::default();
        assert_ne!(f.create("a").epoch(), f.create("a").epoch());
    }
}
