//! A connection's outbound byte budget: every byte queued for one client — live fan-out,
//! acks, history replay and catch-up — is charged here from the moment it is handed to the
//! connection until the connection's writer takes it for the socket.
//!
//! * Live frames use [`OutboundBudget::try_charge`]: a connection that cannot take them is over
//!   budget, a slow consumer, and is closed (it resumes from history when it returns).
//! * Replays and catch-up pages use [`OutboundBudget::try_reserve_replay`] *before* they are read
//!   from the store: at most half the budget is ever held for them, so a replay can never crowd
//!   out the live traffic of the connection's other channels, and a connection that stops reading
//!   stops its replays instead of piling pages up. A refused reservation registers a waker that
//!   fires once the socket has drained enough.
//!
//! Lock-free on the hot path (one atomic add and compare); the waiter list is touched only when
//! somebody waits.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Called once the budget has room again (or the connection is gone).
pub type DrainWaker = Box<dyn FnOnce() + Send>;

/// Default outbound budget of one connection: 4 MiB.
pub const DEFAULT_OUTBOUND_BUDGET: usize = 4 * 1024 * 1024;

/// The byte budget shared by a connection's session actor, its outbox handles (on channel
/// threads) and its writer (on the HTTP worker).
pub struct OutboundBudget {
    limit: usize,
    pending: AtomicUsize,
    closed: AtomicBool,
    has_waiters: AtomicBool,
    waiters: Mutex<Vec<(usize, DrainWaker)>>,
}

impl OutboundBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        OutboundBudget {
            limit: limit.max(1),
            pending: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            has_waiters: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
        }
    }

    /// The budget, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Most bytes held for replays and catch-up at once: half the budget.
    pub fn replay_limit(&self) -> usize {
        (self.limit / 2).max(1)
    }

    /// Bytes queued and not yet taken by the socket writer.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Charges `bytes` of live traffic; `false` (and nothing charged) when that would exceed the
    /// budget.
    pub fn try_charge(&self, bytes: usize) -> bool {
        let before = self.pending.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.limit && before > 0 {
            self.release(bytes);
            return false;
        }
        true
    }

    /// Charges `bytes` unconditionally (the session's own frames: welcome, errors, pongs, close;
    /// and replay pages whose reservation is being turned into frames).
    pub fn charge(&self, bytes: usize) {
        self.pending.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Reserves `bytes` for a replay page, if the replay share has room for it (an empty
    /// connection always has room, so that a page larger than the share still goes, alone).
    /// Otherwise `waker` is kept and called once the pending bytes have fallen far enough for
    /// the reservation to succeed (or the connection is gone), and `false` is returned.
    pub fn try_reserve_replay(&self, bytes: usize, waker: DrainWaker) -> bool {
        let share = self.replay_limit();
        let threshold = share.saturating_sub(bytes);
        if self.reserve_below(bytes, share) {
            return true;
        }
        if self.closed.load(Ordering::Acquire) {
            waker();
            return false;
        }
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            waiters.push((threshold, waker));
            self.has_waiters.store(true, Ordering::Release);
        }
        // The socket may have drained between the failed reservation and the registration.
        if self.pending() <= threshold || self.closed.load(Ordering::Acquire) {
            self.wake(usize::MAX);
        }
        false
    }

    fn reserve_below(&self, bytes: usize, share: usize) -> bool {
        let mut current = self.pending.load(Ordering::Acquire);
        loop {
            if current != 0 && current + bytes > share {
                return false;
            }
            match self.pending.compare_exchange_weak(
                current,
                current + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => current = now,
            }
        }
    }

    /// Gives `bytes` back (taken by the socket writer, dropped, or an unused reservation), and
    /// wakes replays that now fit.
    pub fn release(&self, bytes: usize) {
        let before = self.pending.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "released more than was charged");
        if self.has_waiters.load(Ordering::Acquire) {
            self.wake(before.saturating_sub(bytes));
        }
    }

    /// The connection is gone: every waiter is woken (it will find the connection closed) and
    /// later reservations wake at once.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake(usize::MAX);
    }

    /// Whether [`OutboundBudget::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Wakes the waiters whose threshold `pending` meets (`usize::MAX`: re-read it; every waiter
    /// when closed).
    fn wake(&self, pending: usize) {
        let closed = self.closed.load(Ordering::Acquire);
        let pending = if pending == usize::MAX {
            self.pending()
        } else {
            pending
        };
        let ready: Vec<DrainWaker> = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            let mut ready = Vec::new();
            let mut i = 0;
            while i < waiters.len() {
                if closed || pending <= waiters[i].0 {
                    ready.push(waiters.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
            self.has_waiters
                .store(!waiters.is_empty(), Ordering::Release);
            ready
        };
        // Outside the lock: a waker may reserve again at once.
        for waker in ready {
            waker();
        }
    }
}

impl std::fmt::Debug for OutboundBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundBudget")
            .field("limit", &self.limit)
            .field("pending", &self.pending())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    fn counter() -> (Arc<AtomicU32>, impl Fn() -> DrainWaker) {
        let woken = Arc::new(AtomicU32::new(0));
        let w = woken.clone();
        (woken, move || {
            let w = w.clone();
            Box::new(move || {
                w.fetch_add(1, Ordering::SeqCst);
            })
        })
    }

    #[test]
    fn live_traffic_is_refused_past_the_budget_and_charges_nothing() {
        let budget = OutboundBudget::new(1000);
        assert!(budget.try_charge(600));
        assert!(budget.try_charge(400));
        assert!(!budget.try_charge(1));
        assert_eq!(budget.pending(), 1000);
        budget.release(500);
        assert!(budget.try_charge(500));
        assert_eq!(budget.pending(), 1000);
    }

    #[test]
    fn one_frame_larger_than_the_budget_goes_on_an_empty_connection() {
        let budget = OutboundBudget::new(100);
        assert!(budget.try_charge(5000));
        assert!(!budget.try_charge(1));
        budget.release(5000);
        assert_eq!(budget.pending(), 0);
    }

    #[test]
    fn replays_take_at_most_half_the_budget_and_wake_when_it_drains() {
        let budget = OutboundBudget::new(1000);
        let (woken, waker) = counter();
        assert!(budget.try_reserve_replay(400, waker()));
        assert!(
            !budget.try_reserve_replay(400, waker()),
            "over the 500-byte share"
        );
        assert_eq!(woken.load(Ordering::SeqCst), 0);
        assert_eq!(budget.pending(), 400);
        // Live traffic still has the other half.
        assert!(budget.try_charge(500));
        budget.release(500);
        assert_eq!(
            woken.load(Ordering::SeqCst),
            0,
            "400 pending: a 400-byte page does not fit"
        );
        budget.release(300);
        assert_eq!(woken.load(Ordering::SeqCst), 1, "100 pending: it fits now");
        assert!(budget.try_reserve_replay(400, waker()));
    }

    #[test]
    fn a_page_larger_than_the_share_goes_alone() {
        let budget = OutboundBudget::new(1000);
        let (woken, waker) = counter();
        assert!(budget.try_reserve_replay(2000, waker()));
        assert!(!budget.try_reserve_replay(2000, waker()));
        budget.release(2000);
        assert_eq!(woken.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn closing_wakes_every_waiter_and_later_ones_at_once() {
        let budget = OutboundBudget::new(1000);
        let (woken, waker) = counter();
        budget.charge(900);
        assert!(!budget.try_reserve_replay(100, waker()));
        assert!(!budget.try_reserve_replay(100, waker()));
        budget.close();
        assert_eq!(woken.load(Ordering::SeqCst), 2);
        assert!(!budget.try_reserve_replay(100, waker()));
        assert_eq!(woken.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn concurrent_charges_never_exceed_the_budget_by_more_than_one_frame() {
        let budget = Arc::new(OutboundBudget::new(10_000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    let mut charged = 0;
                    for _ in 0..10_000 {
                        if budget.try_charge(10) {
                            charged += 10;
                            assert!(budget.pending() <= 10_000 + 4 * 10);
                        }
                    }
                    charged
                })
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 10_000, "exactly the budget was granted");
        assert_eq!(budget.pending(), 10_000);
    }
}
