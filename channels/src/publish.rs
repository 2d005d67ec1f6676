//! How a publish travels from [`Channel::publish`](crate::Channel::publish) to the channel's
//! actor and how its answer comes back, with one allocation per publish and no actor message
//! per publish.
//!
//! * [`Inbox`]: the publishes a channel's handles have made and its actor has not taken yet,
//!   in call order. A handle pushes under a short lock and wakes the actor only when the inbox
//!   was empty, so a burst of publishes costs the actor one mailbox message; the actor takes
//!   the whole inbox at once and feeds it to its core as one run.
//! * [`PublishSlot`]: one publish's answer, shared by the actor's [`Responder`] and the
//!   publisher's [`PublishFuture`](crate::PublishFuture): first the sequence number it was
//!   accepted under, then its outcome. A responder dropped without answering (the actor is
//!   gone) resolves it with [`ChannelError::TransportClosed`].

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tether_transport::protocol::Payload;

use crate::core::PublishAck;
use crate::error::ChannelError;

/// One publish's answer (see the [module docs](self)).
#[derive(Debug, Default)]
pub(crate) struct PublishSlot {
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    accepted: Option<u64>,
    outcome: Option<Result<PublishAck, ChannelError>>,
    /// Who waits (the publisher's task): woken by the outcome, and by the acceptance only
    /// when it waits for that ([`PublishSlot::poll_accepted`]).
    waker: Option<Waker>,
    waits_for_acceptance: bool,
}

impl PublishSlot {
    /// A slot for a publish already accepted under `seq` (a durable channel's recovered
    /// publish).
    pub(crate) fn accepted(seq: u64) -> Arc<Self> {
        let slot = Arc::new(PublishSlot::default());
        slot.lock().accepted = Some(seq);
        slot
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // Nothing runs under the lock that can panic halfway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the state and wakes the waiting task, if `f` says it waits for the change.
    fn update(&self, f: impl FnOnce(&mut SlotState) -> bool) {
        let waker = {
            let mut state = self.lock();
            if f(&mut state) {
                state.waker.take()
            } else {
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The outcome, once there is one; otherwise `cx` is woken when it (or the acceptance)
    /// comes.
    ///
    /// Takes part in tokio's cooperative budget as tokio's own channels do: a task collecting
    /// many answers that are all ready yields now and then, so the channel's actor and socket
    /// run in between (the publisher's next publishes then go out as the earlier ones are
    /// answered, instead of in one large batch after a long stall).
    pub(crate) fn poll_outcome(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<PublishAck, ChannelError>> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let mut state = self.lock();
        match state.outcome.take() {
            Some(outcome) => {
                coop.made_progress();
                Poll::Ready(outcome)
            }
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// The sequence number once accepted, or the outcome when it ended first (refused, or
    /// answered before the acceptance was told); otherwise `cx` is woken when either comes.
    pub(crate) fn poll_accepted(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<u64, Result<PublishAck, ChannelError>>> {
        let mut state = self.lock();
        if let Some(seq) = state.accepted {
            state.waits_for_acceptance = false;
            return Poll::Ready(Ok(seq));
        }
        match state.outcome.take() {
            Some(outcome) => {
                state.waits_for_acceptance = false;
                Poll::Ready(Err(outcome))
            }
            None => {
                state.waker = Some(cx.waker().clone());
                state.waits_for_acceptance = true;
                Poll::Pending
            }
        }
    }
}

/// The actor's side of one publish: answers its [`PublishSlot`].
#[derive(Debug)]
pub(crate) struct Responder {
    slot: Arc<PublishSlot>,
    answered: bool,
}

impl Responder {
    /// A responder answering `slot`.
    pub(crate) fn new(slot: Arc<PublishSlot>) -> Self {
        Responder {
            slot,
            answered: false,
        }
    }

    /// The publish was accepted under `seq`.
    pub(crate) fn accept(&self, seq: u64) {
        // A publisher that only awaits the ack is not woken for this (one wake per publish).
        self.slot.update(|state| {
            state.accepted = Some(seq);
            state.waits_for_acceptance
        });
    }

    /// The publish ended with `result`.
    pub(crate) fn answer(mut self, result: Result<PublishAck, ChannelError>) {
        self.answered = true;
        self.slot.update(|state| {
            state.outcome = Some(result);
            true
        });
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.answered {
            // The actor went away without answering: nobody waits forever.
            self.slot.update(|state| {
                state.outcome = Some(Err(ChannelError::TransportClosed));
                true
            });
        }
    }
}

/// Why [`Inbox::push`] refused a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushRefused {
    /// The inbox holds its limit already.
    Full,
    /// The channel's actor has stopped.
    Closed,
}

/// The publishes a channel's handles made and its actor has not taken yet (see the
/// [module docs](self)).
#[derive(Debug)]
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    limit: usize,
}

#[derive(Debug, Default)]
struct InboxState {
    publishes: Vec<(Payload, Responder)>,
    closed: bool,
}

impl Inbox {
    /// An inbox holding at most `limit` publishes (at least 1).
    pub(crate) fn new(limit: usize) -> Self {
        Inbox {
            state: Mutex::new(InboxState::default()),
            limit: limit.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a publish. `Ok(true)` when the inbox was empty: the caller then wakes the actor
    /// (it wakes once per non-empty inbox, and takes everything queued by then).
    pub(crate) fn push(&self, payload: Payload, responder: Responder) -> Result<bool, PushRefused> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushRefused::Closed);
        }
        if state.publishes.len() >= self.limit {
            return Err(PushRefused::Full);
        }
        let was_empty = state.publishes.is_empty();
        state.publishes.push((payload, responder));
        Ok(was_empty)
    }

    /// Moves every queued publish into `into` (empty; its capacity is reused), in call order.
    pub(crate) fn take_into(&self, into: &mut Vec<(Payload, Responder)>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut self.lock().publishes, into);
    }

    /// Refuses every later publish, and drops the queued ones (their publishers hear
    /// [`ChannelError::TransportClosed`]).
    pub(crate) fn close(&self) {
        let queued = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.publishes)
        };
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker;

    fn ack(seq: u64) -> PublishAck {
        PublishAck {
            seq,
            offset: None,
            epoch: None,
            duplicate: false,
        }
    }

    #[test]
    fn a_slot_tells_the_acceptance_then_the_outcome() {
        let slot = Arc::new(PublishSlot::default());
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let responder = Responder::new(slot.clone());
        assert!(slot.poll_accepted(&mut cx).is_pending());
        assert!(slot.poll_outcome(&mut cx).is_pending());
        responder.accept(7);
        assert_eq!(slot.poll_accepted(&mut cx), Poll::Ready(Ok(7)));
        assert!(slot.poll_outcome(&mut cx).is_pending());
        responder.answer(Ok(ack(7)));
        assert_eq!(slot.poll_outcome(&mut cx), Poll::Ready(Ok(ack(7))));
    }

    /// Counts its wakes.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn the_acceptance_wakes_only_a_task_waiting_for_it() {
        let count = Arc::new(CountingWaker(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let wakes = || count.0.load(std::sync::atomic::Ordering::SeqCst);
        let slot = Arc::new(PublishSlot::default());
        let responder = Responder::new(slot.clone());
        assert!(slot.poll_outcome(&mut cx).is_pending());
        responder.accept(1);
        assert_eq!(
            wakes(),
            0,
            "awaiting the ack only: not woken by the acceptance"
        );
        responder.answer(Ok(ack(1)));
        assert_eq!(wakes(), 1, "woken by the outcome");

        let slot = Arc::new(PublishSlot::default());
        let responder = Responder::new(slot.clone());
        assert!(slot.poll_accepted(&mut cx).is_pending());
        responder.accept(2);
        assert_eq!(wakes(), 2, "awaiting the acceptance: woken by it");
        assert_eq!(slot.poll_accepted(&mut cx), Poll::Ready(Ok(2)));
    }

    #[test]
    fn a_refused_publish_answers_the_acceptance_with_its_error() {
        let slot = Arc::new(PublishSlot::default());
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let detached = || ChannelError::Detached {
            channel: "c".into(),
        };
        Responder::new(slot.clone()).answer(Err(detached()));
        assert_eq!(
            slot.poll_accepted(&mut cx),
            Poll::Ready(Err(Err(detached())))
        );
    }

    #[test]
    fn a_dropped_responder_resolves_its_publish_as_closed() {
        let slot = Arc::new(PublishSlot::default());
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        drop(Responder::new(slot.clone()));
        assert_eq!(
            slot.poll_outcome(&mut cx),
            Poll::Ready(Err(ChannelError::TransportClosed))
        );
    }

    #[test]
    fn the_inbox_wakes_once_per_burst_keeps_order_and_bounds_itself() {
        let inbox = Inbox::new(3);
        let push = |n: u64| {
            inbox.push(
                Payload::from_value(&n).unwrap(),
                Responder::new(Arc::new(PublishSlot::default())),
            )
        };
        assert_eq!(push(1), Ok(true));
        assert_eq!(push(2), Ok(false));
        assert_eq!(push(3), Ok(false));
        assert_eq!(push(4), Err(PushRefused::Full));
        let mut taken = Vec::new();
        inbox.take_into(&mut taken);
        let order: Vec<String> = taken.iter().map(|(p, _)| p.json().to_owned()).collect();
        assert_eq!(order, ["1", "2", "3"]);
        assert_eq!(push(5), Ok(true), "an emptied inbox wakes the actor again");
        let slot = Arc::new(PublishSlot::default());
        inbox
            .push(
                Payload::from_value(&6).unwrap(),
                Responder::new(slot.clone()),
            )
            .unwrap();
        inbox.close();
        let waker = noop_waker();
        assert_eq!(
            slot.poll_outcome(&mut Context::from_waker(&waker)),
            Poll::Ready(Err(ChannelError::TransportClosed)),
            "a queued publish of a closed inbox is answered"
        );
        assert_eq!(push(7), Err(PushRefused::Closed));
    }
}
