//! When a hub channel nobody uses expires, and how long one channel may hold its thread: two
//! plain clocks the [`HubChannel`](super::hub_channel::HubChannel) actor asks, with time passed
//! in.
//!
//! * [`IdleClock`]: a channel with no attached connection and no work in progress expires
//!   after its idle TTL (default [`DEFAULT_IDLE_TTL`]). The registry then forgets it; with the
//!   in-memory store its history goes with it, so a later attach finds a new epoch.
//! * [`TurnBudget`]: channel actors share a few threads, and an actor handles every message in
//!   its mailbox in one go unless it yields. A channel that has worked for
//!   [`DEFAULT_TURN_BUDGET`] without a pause yields its thread, so a flooded channel delays
//!   another channel on the same thread by a few dozen turns, not by its whole backlog. (A few
//!   dozen: the thread's tokio `LocalSet` runs tasks woken on the thread itself — a channel that
//!   yielded — before tasks woken from other threads — a channel a connection just sent a
//!   publish — except on every 31st task, so a channel woken from a worker may wait about 30
//!   turns. Hence short turns: 30 of them stay far below 100 ms.)
//! * [`BatchSizer`]: handling one append batch (the store call, then its acks and fan-out)
//!   cannot yield halfway, so batches are sized by what a message has been costing, to keep
//!   that work near [`DEFAULT_BATCH_WORK`].

use std::time::Duration;

use tokio::time::Instant;

/// Default time a channel with no attached connection and nothing in progress is kept before it
/// expires: 5 minutes (the hub's default session TTL).
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(5 * 60);

/// Default longest a channel works on its thread before it yields to the other channels there:
/// 0.5 ms.
pub const DEFAULT_TURN_BUDGET: Duration = Duration::from_micros(500);

/// Default time the work of one append batch on the channel's thread should take (it cannot
/// yield halfway): 1 ms.
pub const DEFAULT_BATCH_WORK: Duration = Duration::from_millis(1);

/// How long a channel has been unused, and whether that is long enough to expire it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleClock {
    ttl: Duration,
    since: Option<Instant>,
}

impl IdleClock {
    /// A clock for channels that expire after `ttl` unused. It starts in use.
    pub fn new(ttl: Duration) -> Self {
        IdleClock { ttl, since: None }
    }

    /// The idle TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A connection attached, or work started: the channel is in use.
    pub fn in_use(&mut self) {
        self.since = None;
    }

    /// The channel has been unused since `now` (an earlier start of the same idle period is
    /// kept).
    pub fn unused(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// Whether the channel is unused.
    pub fn is_unused(&self) -> bool {
        self.since.is_some()
    }

    /// `None` while in use; otherwise the time left before it expires (zero once due).
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.since.map(|since| {
            self.ttl
                .saturating_sub(now.saturating_duration_since(since))
        })
    }

    /// Whether the channel has been unused for its whole TTL at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.remaining(now) == Some(Duration::ZERO)
    }
}

/// How long the current turn of a channel actor on its thread has lasted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnBudget {
    budget: Duration,
    started: Option<Instant>,
}

impl TurnBudget {
    /// Turns of at most about `budget`.
    pub fn new(budget: Duration) -> Self {
        TurnBudget {
            budget,
            started: None,
        }
    }

    /// Work was done at `now`. `true` when the turn has lasted its budget: the caller yields
    /// its thread, and the next work starts a new turn. (The first work after a quiet spell may
    /// find a turn started long ago and yield once more than needed: a yield costs
    /// microseconds, a missed one a stall.)
    pub fn spend(&mut self, now: Instant) -> bool {
        match self.started {
            None => {
                self.started = Some(now);
                false
            }
            Some(started) if now.saturating_duration_since(started) >= self.budget => {
                self.started = None;
                true
            }
            Some(_) => false,
        }
    }
}

/// Sizes a channel's append batches from what its messages have been costing, so that the work
/// of one batch stays near a target: large batches where messages are cheap (one store round
/// trip for many), smaller ones where each costs more (a slow build, a wide fan-out).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSizer {
    target: Duration,
    min: usize,
    max: usize,
    /// Moving average of one message's cost, in nanoseconds.
    per_message: Option<f64>,
}

impl BatchSizer {
    /// Batches of `min ..= max` messages whose work should take about `target`. Until a batch
    /// has been measured, `max`.
    pub fn new(target: Duration, min: usize, max: usize) -> Self {
        let min = min.max(1);
        BatchSizer {
            target,
            min,
            max: max.max(min),
            per_message: None,
        }
    }

    /// The most messages the next batch should take.
    pub fn limit(&self) -> usize {
        match self.per_message {
            None => self.max,
            Some(cost) => {
                let fits = self.target.as_nanos() as f64 / cost.max(1.0);
                (fits as usize).clamp(self.min, self.max)
            }
        }
    }

    /// A batch of `messages` cost `took` on the channel's thread.
    pub fn observe(&mut self, messages: usize, took: Duration) {
        if messages == 0 {
            return;
        }
        let sample = took.as_nanos() as f64 / messages as f64;
        self.per_message = Some(match self.per_message {
            None => sample,
            Some(average) => (3.0 * average + sample) / 4.0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_unused_channel_expires_after_its_ttl_and_use_resets_it() {
        let ttl = Duration::from_secs(300);
        let mut clock = IdleClock::new(ttl);
        assert_eq!(clock.remaining(Instant::now()), None, "starts in use");
        clock.unused(Instant::now());
        tokio::time::advance(Duration::from_secs(200)).await;
        // Still unused: the idle period keeps its start.
        clock.unused(Instant::now());
        assert_eq!(
            clock.remaining(Instant::now()),
            Some(Duration::from_secs(100))
        );
        assert!(!clock.expired(Instant::now()));
        // A connection attaches: the channel is in use, and a new idle period starts over.
        clock.in_use();
        assert!(!clock.is_unused());
        clock.unused(Instant::now());
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(!clock.expired(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(clock.expired(Instant::now()));
        assert_eq!(clock.remaining(Instant::now()), Some(Duration::ZERO));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(clock.expired(Instant::now()), "stays due");
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_yields_once_it_has_lasted_its_budget() {
        let mut turn = TurnBudget::new(Duration::from_millis(1));
        assert!(!turn.spend(Instant::now()), "the first work starts a turn");
        tokio::time::advance(Duration::from_micros(600)).await;
        assert!(!turn.spend(Instant::now()));
        tokio::time::advance(Duration::from_micros(400)).await;
        assert!(turn.spend(Instant::now()), "1 ms of work: yield");
        // After the yield a new turn starts with the next work.
        assert!(!turn.spend(Instant::now()));
        tokio::time::advance(Duration::from_micros(999)).await;
        assert!(!turn.spend(Instant::now()));
        tokio::time::advance(Duration::from_micros(1)).await;
        assert!(turn.spend(Instant::now()));
    }

    #[test]
    fn batches_shrink_when_messages_cost_more_and_grow_back_when_they_cost_less() {
        let mut sizer = BatchSizer::new(Duration::from_millis(2), 8, 512);
        assert_eq!(sizer.limit(), 512, "unmeasured: the largest");
        // 512 messages took 20 ms: 39 µs each, 2 ms holds 51.
        sizer.observe(512, Duration::from_millis(20));
        assert_eq!(sizer.limit(), 51);
        // Dearer still (a wide fan-out): never below the minimum.
        for _ in 0..20 {
            sizer.observe(8, Duration::from_millis(10));
        }
        assert_eq!(sizer.limit(), 8);
        // Cheap again: back to the largest within a few batches.
        for _ in 0..30 {
            sizer.observe(8, Duration::from_micros(8));
        }
        assert_eq!(sizer.limit(), 512);
        // Nothing measured from an empty batch.
        sizer.observe(0, Duration::from_secs(1));
        assert_eq!(sizer.limit(), 512);
    }
}
