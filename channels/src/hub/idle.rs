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
//!   another channel on the same thread by about one turn, not by its whole backlog.

use std::time::Duration;

use tokio::time::Instant;

/// Default time a channel with no attached connection and nothing in progress is kept before it
/// expires: 5 minutes (the hub's default session TTL).
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(5 * 60);

/// Default longest a channel works on its thread before it yields to the other channels there:
/// 1 ms.
pub const DEFAULT_TURN_BUDGET: Duration = Duration::from_millis(1);

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
}
