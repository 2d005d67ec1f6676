//! The soak tool's full log of every message: who published it, whether the hub acknowledged
//! it, and every delivery to every subscriber. The report's loss, duplicate and ordering figures
//! are computed from it, not estimated.

use std::collections::HashMap;

use serde::Serialize;

/// A position in a channel: its epoch and offset.
pub type Position = (String, u64);

/// A gap a subscriber was told of: positions `from..=to` may be missing (across an epoch
/// change when the epochs differ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedGap {
    /// First position that may be missing.
    pub from: Position,
    /// Last position that may be missing.
    pub to: Position,
}

impl ReportedGap {
    /// Whether the gap covers `(epoch, offset)`, given the channel's epochs in the order they
    /// appeared: within one epoch, the offset range; across epochs, the rest of the first, the
    /// start of the last, and every epoch in between (a subscriber that was away through
    /// several hub lifetimes is told of one gap spanning them all).
    fn covers(&self, (epoch, offset): &Position, order: &[String]) -> bool {
        if self.from.0 == self.to.0 {
            return *epoch == self.from.0 && (self.from.1..=self.to.1).contains(offset);
        }
        if (*epoch == self.from.0 && *offset >= self.from.1)
            || (*epoch == self.to.0 && *offset <= self.to.1)
        {
            return true;
        }
        let index = |e: &str| order.iter().position(|o| o == e);
        match (index(&self.from.0), index(epoch), index(&self.to.0)) {
            (Some(from), Some(at), Some(to)) => from < at && at < to,
            (Some(from), Some(at), None) => from < at,
            _ => false,
        }
    }
}

/// Per (subscriber, publisher) pair: what arrived (and in which epoch first), and the highest
/// sequence so far.
#[derive(Debug, Default)]
struct Pair {
    highest: u64,
    seen: HashMap<u64, String>,
}

/// One owed delivery that did not happen.
struct Undelivered<'a> {
    subscriber: u32,
    publisher: u32,
    seq: u64,
    at: Option<&'a Position>,
    /// Whether a gap the subscriber was told of covers it.
    covered: bool,
}

/// Every message and delivery of a soak run.
#[derive(Debug)]
pub struct Ledger {
    channel_of: Vec<usize>,
    subscribers_of: Vec<Vec<u32>>,
    published: u64,
    failed: u64,
    /// Per publisher: acknowledged seqs, with where the hub placed each (when it said).
    acked: Vec<HashMap<u64, Option<Position>>>,
    pairs: HashMap<(u32, u32), Pair>,
    gaps: HashMap<u32, Vec<ReportedGap>>,
    /// Per channel: its epochs in the order this run first heard of them.
    epochs: Vec<Vec<String>>,
    delivered: u64,
    duplicated: u64,
    duplicated_across_epochs: u64,
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
    /// Owed deliveries that never happened and that no reported discontinuity covers: silent
    /// loss, the one figure that must always be 0.
    pub lost: u64,
    /// Owed deliveries that never happened inside a discontinuity the subscriber was told of
    /// (a hub that lost its memory): reported loss.
    pub lost_in_gaps: u64,
    /// Deliveries of something the subscriber already had, in the same epoch.
    pub duplicated: u64,
    /// A message delivered again in a later epoch after a reported discontinuity (a hub that
    /// lost its dedupe state with its memory stored a replay again).
    pub duplicated_across_epochs: u64,
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
            acked: vec![HashMap::new(); channel_of.len()],
            channel_of,
            subscribers_of,
            published: 0,
            failed: 0,
            pairs: HashMap::new(),
            gaps: HashMap::new(),
            epochs: vec![Vec::new(); channels],
            delivered: 0,
            duplicated: 0,
            duplicated_across_epochs: 0,
            reordered: 0,
            discontinuities: 0,
        }
    }

    /// One more publish was handed to the library.
    pub fn published(&mut self) {
        self.published += 1;
    }

    /// The hub acknowledged `publisher`'s message `seq`, placing it at `at` (when it said).
    pub fn acked(&mut self, publisher: u32, seq: u64, at: Option<Position>) {
        if let Some((epoch, _)) = &at {
            self.heard_of(publisher, epoch);
        }
        self.acked[publisher as usize].insert(seq, at);
    }

    /// Records that the channel of `client` has an epoch `epoch` (in order of appearance).
    fn heard_of(&mut self, client: u32, epoch: &str) {
        let order = &mut self.epochs[self.channel_of[client as usize]];
        if !order.iter().any(|e| e == epoch) {
            order.push(epoch.to_owned());
        }
    }

    /// One publish failed with an error.
    pub fn failed(&mut self) {
        self.failed += 1;
    }

    /// `subscriber` received `publisher`'s message `seq` in `epoch`.
    pub fn delivered(&mut self, subscriber: u32, publisher: u32, seq: u64, epoch: &str) {
        self.delivered += 1;
        self.heard_of(subscriber, epoch);
        let pair = self.pairs.entry((subscriber, publisher)).or_default();
        if let Some(first) = pair.seen.get(&seq).cloned() {
            // Excused only when the subscriber was told of a gap that leads from the epoch of
            // the first delivery into the epoch of this one.
            let order = &self.epochs[self.channel_of[subscriber as usize]];
            let index = |e: &str| order.iter().position(|o| o == e);
            let spanned = first != epoch
                && self.gaps.get(&subscriber).is_some_and(|gaps| {
                    gaps.iter().any(|g| {
                        match (
                            index(&first),
                            index(&g.from.0),
                            index(&g.to.0),
                            index(epoch),
                        ) {
                            (Some(a), Some(from), Some(to), Some(b)) => {
                                a <= from && from < to && to <= b
                            }
                            _ => false,
                        }
                    })
                });
            if spanned {
                self.duplicated_across_epochs += 1;
            } else {
                self.duplicated += 1;
            }
            return;
        }
        pair.seen.insert(seq, epoch.to_owned());
        if seq < pair.highest {
            self.reordered += 1;
        }
        pair.highest = pair.highest.max(seq);
    }

    /// `subscriber` was told of a discontinuity.
    pub fn discontinuity(&mut self, subscriber: u32, gap: ReportedGap) {
        self.discontinuities += 1;
        self.heard_of(subscriber, &gap.from.0);
        self.heard_of(subscriber, &gap.to.0);
        self.gaps.entry(subscriber).or_default().push(gap);
    }

    /// Deliveries still owed now (for deciding when a drain is complete).
    pub fn outstanding(&self) -> u64 {
        let t = self.totals();
        t.lost
    }

    /// Up to `n` silently lost deliveries, described (subscriber, publisher, seq, where the
    /// hub placed it, and the gaps the subscriber was told of), for whoever investigates.
    pub fn silent_losses(&self, n: usize) -> Vec<String> {
        let mut lost: Vec<Undelivered<'_>> = self.undelivered().filter(|u| !u.covered).collect();
        lost.sort_by_key(|u| (u.publisher, u.subscriber, u.seq));
        lost.into_iter()
            .take(n)
            .map(|u| {
                let gaps = self.gaps.get(&u.subscriber).map(Vec::as_slice).unwrap_or(&[]);
                format!(
                    "subscriber {} never got publisher {}'s seq {} (acked at {:?}); gaps told: {gaps:?}",
                    u.subscriber, u.publisher, u.seq, u.at
                )
            })
            .collect()
    }

    /// Every owed delivery that did not happen, with whether a reported gap covers it.
    fn undelivered(&self) -> impl Iterator<Item = Undelivered<'_>> + '_ {
        self.acked
            .iter()
            .enumerate()
            .flat_map(move |(publisher, seqs)| {
                let channel = self.channel_of[publisher];
                let order = &self.epochs[channel];
                self.subscribers_of[channel]
                    .iter()
                    .flat_map(move |&subscriber| {
                        let seen = self.pairs.get(&(subscriber, publisher as u32));
                        let gaps = self.gaps.get(&subscriber).map(Vec::as_slice).unwrap_or(&[]);
                        seqs.iter()
                            .filter(move |(seq, _)| !seen.is_some_and(|p| p.seen.contains_key(seq)))
                            .map(move |(seq, at)| Undelivered {
                                subscriber,
                                publisher: publisher as u32,
                                seq: *seq,
                                at: at.as_ref(),
                                covered: at
                                    .as_ref()
                                    .is_some_and(|at| gaps.iter().any(|g| g.covers(at, order))),
                            })
                    })
            })
    }

    /// The totals, with loss computed message by message.
    pub fn totals(&self) -> Totals {
        let expected = self
            .acked
            .iter()
            .enumerate()
            .map(|(publisher, seqs)| {
                seqs.len() as u64 * self.subscribers_of[self.channel_of[publisher]].len() as u64
            })
            .sum();
        let (mut lost, mut lost_in_gaps) = (0u64, 0u64);
        for u in self.undelivered() {
            if u.covered {
                lost_in_gaps += 1;
            } else {
                lost += 1;
            }
        }
        Totals {
            published: self.published,
            acked: self.acked.iter().map(|s| s.len() as u64).sum(),
            failed: self.failed,
            delivered: self.delivered,
            expected_deliveries: expected,
            lost,
            lost_in_gaps,
            duplicated: self.duplicated,
            duplicated_across_epochs: self.duplicated_across_epochs,
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
            l.acked(0, seq, Some(("e".into(), seq)));
        }
        l.published();
        l.acked(2, 1, Some(("e".into(), 1)));
        // Client 0 gets its own 1, 2, 3; client 1 gets 1, 3, 2 (reordered) and 3 again.
        for seq in [1, 2, 3] {
            l.delivered(0, 0, seq, "e");
        }
        for seq in [1, 3, 2, 3] {
            l.delivered(1, 0, seq, "e");
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
        l.delivered(2, 2, 1, "e");
        assert_eq!(l.totals().lost, 0);
    }

    #[test]
    fn loss_inside_a_reported_gap_is_counted_apart_from_silent_loss() {
        // Clients 0 and 1 on one channel; a hub lost its memory after offset 2 of epoch "a".
        let mut l = Ledger::new(vec![0, 0]);
        for seq in 1..=4 {
            l.published();
            l.acked(0, seq, Some(("a".into(), seq)));
        }
        l.published();
        l.acked(0, 5, Some(("b".into(), 1)));
        for sub in [0, 1] {
            for seq in [1, 2] {
                l.delivered(sub, 0, seq, "a");
            }
        }
        // Client 0 is told of the gap (a:3 ..= b:0) and gets 5 and, replayed, 2 again.
        l.discontinuity(
            0,
            ReportedGap {
                from: ("a".into(), 3),
                to: ("b".into(), 0),
            },
        );
        l.delivered(0, 0, 5, "b");
        l.delivered(0, 0, 2, "b");
        // Client 1 is told nothing and gets only 5: its loss of 3 and 4 is silent.
        l.delivered(1, 0, 5, "b");
        let t = l.totals();
        assert_eq!(t.lost_in_gaps, 2);
        assert_eq!(t.lost, 2);
        assert_eq!(t.duplicated_across_epochs, 1);
        assert_eq!(t.duplicated, 0);
        assert_eq!(t.discontinuities, 1);
    }

    #[test]
    fn a_repeat_in_a_new_epoch_is_excused_only_by_a_gap_into_it() {
        let mut l = Ledger::new(vec![0, 0]);
        l.published();
        l.acked(0, 1, Some(("a".into(), 1)));
        l.delivered(0, 0, 1, "a");
        l.delivered(1, 0, 1, "a");
        // Client 0 was told of a gap from "a" into "b"; client 1 only of one inside "a".
        l.discontinuity(
            0,
            ReportedGap {
                from: ("a".into(), 2),
                to: ("b".into(), 0),
            },
        );
        l.discontinuity(
            1,
            ReportedGap {
                from: ("a".into(), 5),
                to: ("a".into(), 6),
            },
        );
        l.delivered(0, 0, 1, "b");
        l.delivered(1, 0, 1, "b");
        let t = l.totals();
        assert_eq!(t.duplicated_across_epochs, 1);
        assert_eq!(t.duplicated, 1, "no gap led client 1 into the new epoch");
    }

    #[test]
    fn a_gap_within_one_epoch_covers_its_range_only() {
        let gap = ReportedGap {
            from: ("a".into(), 5),
            to: ("a".into(), 7),
        };
        let order = ["a".to_owned(), "b".to_owned()];
        assert!(gap.covers(&("a".into(), 5), &order) && gap.covers(&("a".into(), 7), &order));
        assert!(!gap.covers(&("a".into(), 8), &order) && !gap.covers(&("b".into(), 6), &order));
    }

    #[test]
    fn a_gap_across_epochs_covers_the_epochs_in_between() {
        let gap = ReportedGap {
            from: ("a".into(), 5),
            to: ("c".into(), 0),
        };
        let order = [
            "a".to_owned(),
            "b".to_owned(),
            "c".to_owned(),
            "d".to_owned(),
        ];
        assert!(gap.covers(&("a".into(), 9), &order));
        assert!(
            gap.covers(&("b".into(), 1), &order),
            "the lifetime it slept through"
        );
        assert!(!gap.covers(&("c".into(), 1), &order), "owed: after the gap");
        assert!(!gap.covers(&("d".into(), 1), &order), "owed: a later epoch");
        assert!(
            !gap.covers(&("a".into(), 4), &order),
            "owed: before the gap"
        );
    }
}
