//! The soak tool's full log of every message: who published it, whether the hub acknowledged
//! it, and every delivery to every subscriber. The report's loss, duplicate and ordering figures
//! are computed from it, not estimated.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

/// Per (subscriber, publisher) pair: what arrived, and the highest sequence so far.
#[derive(Debug, Default)]
struct Pair {
    highest: u64,
    seen: HashSet<u64>,
}

/// Every message and delivery of a soak run.
#[derive(Debug)]
pub struct Ledger {
    channel_of: Vec<usize>,
    subscribers_of: Vec<Vec<u32>>,
    published: u64,
    failed: u64,
    acked: Vec<HashSet<u64>>,
    pairs: HashMap<(u32, u32), Pair>,
    delivered: u64,
    duplicated: u64,
    reordered: u64,
    discontinuities: u64,
}

/// The ledger's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Publishes handed to the library.
    pub published: u64,
    /// Publishes the hub acknowledged.
    pub acked: u64,
    /// Publishes that failed with an error (counted, never expected to arrive).
    pub failed: u64,
    /// Deliveries to subscribers, duplicates included.
    pub delivered: u64,
    /// Deliveries owed: every acknowledged message to every subscriber of its channel.
    pub expected_deliveries: u64,
    /// Owed deliveries that never happened.
    pub lost: u64,
    /// Deliveries of something the subscriber already had.
    pub duplicated: u64,
    /// Deliveries that arrived after a later message of the same publisher.
    pub reordered: u64,
    /// Discontinuities reported to subscribers.
    pub discontinuities: u64,
}

impl Ledger {
    /// A ledger for clients `0..channel_of.len()`, client `i` publishing on and subscribed to
    /// channel `channel_of[i]`.
    pub fn new(channel_of: Vec<usize>) -> Self {
        let channels = channel_of.iter().copied().max().map_or(0, |m| m + 1);
        let mut subscribers_of = vec![Vec::new(); channels];
        for (client, channel) in channel_of.iter().enumerate() {
            subscribers_of[*channel].push(client as u32);
        }
        Ledger {
            acked: vec![HashSet::new(); channel_of.len()],
            channel_of,
            subscribers_of,
            published: 0,
            failed: 0,
            pairs: HashMap::new(),
            delivered: 0,
            duplicated: 0,
            reordered: 0,
            discontinuities: 0,
        }
    }

    /// One more publish was handed to the library.
    pub fn published(&mut self) {
        self.published += 1;
    }

    /// The hub acknowledged `publisher`'s message `seq`.
    pub fn acked(&mut self, publisher: u32, seq: u64) {
        self.acked[publisher as usize].insert(seq);
    }

    /// One publish failed with an error.
    pub fn failed(&mut self) {
        self.failed += 1;
    }

    /// `subscriber` received `publisher`'s message `seq`.
    pub fn delivered(&mut self, subscriber: u32, publisher: u32, seq: u64) {
        self.delivered += 1;
        let pair = self.pairs.entry((subscriber, publisher)).or_default();
        if !pair.seen.insert(seq) {
            self.duplicated += 1;
            return;
        }
        if seq < pair.highest {
            self.reordered += 1;
        }
        pair.highest = pair.highest.max(seq);
    }

    /// `subscriber` was told of a discontinuity.
    pub fn discontinuity(&mut self) {
        self.discontinuities += 1;
    }

    /// Deliveries still owed now (for deciding when a drain is complete).
    pub fn outstanding(&self) -> u64 {
        let t = self.totals();
        t.lost
    }

    /// The totals, with loss computed message by message.
    pub fn totals(&self) -> Totals {
        let mut expected = 0u64;
        let mut lost = 0u64;
        for (publisher, seqs) in self.acked.iter().enumerate() {
            let subscribers = &self.subscribers_of[self.channel_of[publisher]];
            expected += seqs.len() as u64 * subscribers.len() as u64;
            for subscriber in subscribers {
                let seen = self.pairs.get(&(*subscriber, publisher as u32));
                lost += seqs
                    .iter()
                    .filter(|s| !seen.is_some_and(|p| p.seen.contains(s)))
                    .count() as u64;
            }
        }
        Totals {
            published: self.published,
            acked: self.acked.iter().map(|s| s.len() as u64).sum(),
            failed: self.failed,
            delivered: self.delivered,
            expected_deliveries: expected,
            lost,
            duplicated: self.duplicated,
            reordered: self.reordered,
            discontinuities: self.discontinuities,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_loss_duplicates_and_reordering_exactly() {
        // Clients 0 and 1 on channel 0, client 2 on channel 1.
        let mut l = Ledger::new(vec![0, 0, 1]);
        for seq in 1..=3 {
            l.published();
            l.acked(0, seq);
        }
        l.published();
        l.acked(2, 1);
        // Client 0 gets its own 1, 2, 3; client 1 gets 1, 3, 2 (reordered) and 3 again.
        for seq in [1, 2, 3] {
            l.delivered(0, 0, seq);
        }
        for seq in [1, 3, 2, 3] {
            l.delivered(1, 0, seq);
        }
        // Client 2 never gets its own message: lost.
        let t = l.totals();
        assert_eq!(t.published, 4);
        assert_eq!(t.acked, 4);
        assert_eq!(t.expected_deliveries, 3 * 2 + 1);
        assert_eq!(t.delivered, 7);
        assert_eq!(t.duplicated, 1);
        assert_eq!(t.reordered, 1);
        assert_eq!(t.lost, 1);
        assert_eq!(l.outstanding(), 1);
        l.delivered(2, 2, 1);
        assert_eq!(l.totals().lost, 0);
    }
}
