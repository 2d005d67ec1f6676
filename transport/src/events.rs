//! A bounded bridge from actix `Recipient`s to an async receiver of state transitions, for
//! applications and tests that prefer `while let Some(ev) = events.recv().await` to writing an
//! actor.
//!
//! Actors report every transition as a typed message to their `Recipient`s (an actor subscriber
//! gets each one in its mailbox). [`event_channel`] turns such a `Recipient` into an
//! [`EventReceiver`] that never silently misses a transition and never queues without bound: a
//! subscriber that keeps up gets every transition in order; one that falls more than `capacity`
//! transitions behind gets **one** [`StateEvent::Lagged`] instead of the transitions it missed —
//! how many it missed, and the latest transition (whose target is the state now) — and then
//! every transition after that one, in order.
//!
//! Built on tokio's `broadcast` (the bounded queue, which reports `Lagged`) and `watch` (the
//! latest transition, readable at any time without waiting: [`EventReceiver::latest`]).
//!
//! Only state transitions travel this way ([`StateTransition`]): a channel's data messages have
//! their own lossless stream (`tether_channels::ChannelEvents`), caught up from history rather
//! than summarised.

use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use actix::{Actor, ActorContext as _, Context, Handler, Message, Recipient};
use futures::stream::{BoxStream, StreamExt as _};
use futures::FutureExt as _;
use tokio::sync::{broadcast, watch};

use crate::telemetry;

/// Default capacity of an [`event_channel`]: 1024 transitions.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// A state-transition message: what an [`event_channel`] carries. Implemented by
/// [`ConnectionStateChanged`](crate::ConnectionStateChanged) and by `tether_channels`'
/// `ChannelStateChanged`.
pub trait StateTransition: Message<Result = ()> + Clone + Send + Sync + 'static {
    /// The states of the machine this transition belongs to.
    type State: Copy + fmt::Debug + PartialEq + Send + Sync + 'static;

    /// The state this transition leads to.
    fn target(&self) -> Self::State;
}

/// What an [`EventReceiver`] yields, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum StateEvent<M> {
    /// The next transition: nothing was skipped before it.
    Transition(M),
    /// The receiver fell more than its capacity behind. The `missed` transitions between the
    /// last one it received and `latest` were not delivered; `latest` is the most recent
    /// transition when the notice was made (its target is the state then). The next event is
    /// the transition after `latest`.
    Lagged {
        /// How many transitions were skipped (at least 1).
        missed: u64,
        /// The most recent transition: where the state machine stands.
        latest: M,
    },
}

impl<M: StateTransition> StateEvent<M> {
    /// The transition this event brings the subscriber up to: the transition itself, or after
    /// a lag the latest one.
    pub fn transition(&self) -> &M {
        match self {
            StateEvent::Transition(m) | StateEvent::Lagged { latest: m, .. } => m,
        }
    }

    /// Like [`StateEvent::transition`], by value.
    pub fn into_transition(self) -> M {
        match self {
            StateEvent::Transition(m) | StateEvent::Lagged { latest: m, .. } => m,
        }
    }

    /// The state the subscriber knows the machine to be in after this event.
    pub fn state(&self) -> M::State {
        self.transition().target()
    }

    /// How many transitions were skipped before this event (0 unless it is a lag notice).
    pub fn missed(&self) -> u64 {
        match self {
            StateEvent::Transition(_) => 0,
            StateEvent::Lagged { missed, .. } => *missed,
        }
    }
}

/// A transition and its place in the sequence the forwarder received (1 for the first).
#[derive(Debug, Clone)]
struct Stamped<M> {
    seq: u64,
    event: M,
}

/// Creates a bounded event channel: hand the `Recipient` to whatever publishes `M` (for example
/// [`Transport::subscribe`](crate::Transport::subscribe)) and read from the [`EventReceiver`].
///
/// At most `capacity` unread transitions are held (at least 1; tokio's broadcast rounds it up
/// to a power of two). A receiver further behind than that gets a [`StateEvent::Lagged`] with
/// the count it missed and the latest transition, then continues with the transitions after
/// it; each lag notice is counted in `tether_events_lagged_total`. Must be called inside an
/// actix system (it starts a tiny forwarding actor, which stops at the first transition after
/// the receiver is dropped, or when every `Recipient` is gone).
pub fn event_channel<M: StateTransition>(capacity: usize) -> (Recipient<M>, EventReceiver<M>) {
    let (tx, rx) = broadcast::channel(capacity.max(1));
    let (latest_tx, latest) = watch::channel(None);
    let addr = Forwarder {
        tx,
        latest: latest_tx,
        seq: 0,
    }
    .start();
    let reader = Reader {
        rx,
        latest: latest.clone(),
        delivered: 0,
    };
    let stream = futures::stream::unfold(reader, |mut reader| async move {
        let event = reader.next_event().await?;
        Some((event, reader))
    })
    .boxed();
    (addr.recipient(), EventReceiver { stream, latest })
}

struct Forwarder<M: StateTransition> {
    tx: broadcast::Sender<Stamped<M>>,
    latest: watch::Sender<Option<Stamped<M>>>,
    seq: u64,
}

impl<M: StateTransition> Actor for Forwarder<M> {
    type Context = Context<Self>;
}

impl<M: StateTransition> Handler<M> for Forwarder<M> {
    type Result = ();

    fn handle(&mut self, msg: M, ctx: &mut Context<Self>) {
        self.seq += 1;
        let stamped = Stamped {
            seq: self.seq,
            event: msg,
        };
        // The latest value first: a reader told it lagged by this send finds it already there.
        self.latest.send_replace(Some(stamped.clone()));
        if self.tx.send(stamped).is_err() {
            // The receiver is gone.
            ctx.stop();
        }
    }
}

/// The reading side's state: the queue, the latest transition, and how far it has delivered.
struct Reader<M: StateTransition> {
    rx: broadcast::Receiver<Stamped<M>>,
    latest: watch::Receiver<Option<Stamped<M>>>,
    /// Sequence number of the last transition delivered (alone or as a lag notice's `latest`).
    delivered: u64,
}

impl<M: StateTransition> Reader<M> {
    async fn next_event(&mut self) -> Option<StateEvent<M>> {
        loop {
            match self.rx.recv().await {
                Ok(stamped) if stamped.seq > self.delivered => {
                    self.delivered = stamped.seq;
                    return Some(StateEvent::Transition(stamped.event));
                }
                // Already covered by a lag notice's `latest`.
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Resubscribing first means every transition published after the snapshot
                    // below is still in the new queue; older ones are skipped by number.
                    self.rx = self.rx.resubscribe();
                    let latest = self.latest.borrow().clone();
                    // The forwarder stores the latest before queueing it, so a lag always finds one.
                    if let Some(latest) = latest {
                        let missed = latest.seq.saturating_sub(self.delivered + 1);
                        self.delivered = latest.seq;
                        metrics::counter!(telemetry::EVENTS_LAGGED).increment(1);
                        tracing::warn!(
                            missed,
                            "event subscriber lagged; delivering the latest transition instead"
                        );
                        return Some(StateEvent::Lagged {
                            missed,
                            latest: latest.event,
                        });
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// The reading end of an [`event_channel`]. Also a `futures::Stream`.
///
/// Yields every transition in order, or — after falling more than the channel's capacity
/// behind — one [`StateEvent::Lagged`] with the number missed and the latest transition, then
/// the transitions after it.
pub struct EventReceiver<M: StateTransition> {
    stream: BoxStream<'static, StateEvent<M>>,
    latest: watch::Receiver<Option<Stamped<M>>>,
}

impl<M: StateTransition> EventReceiver<M> {
    /// The next event, or `None` once every sender is gone and everything was read.
    ///
    /// Cancel-safe: dropping the future (for example on a timeout) loses nothing.
    pub async fn recv(&mut self) -> Option<StateEvent<M>> {
        self.stream.next().await
    }

    /// The next event if one is ready now.
    pub fn try_recv(&mut self) -> Option<StateEvent<M>> {
        self.stream.next().now_or_never().flatten()
    }

    /// The most recent transition sent to this receiver, read or not (`None` before the
    /// first). Never waits.
    pub fn latest(&self) -> Option<M> {
        self.latest.borrow().as_ref().map(|s| s.event.clone())
    }

    /// The state the most recent transition led to (`None` before the first). Never waits.
    pub fn state(&self) -> Option<M::State> {
        self.latest.borrow().as_ref().map(|s| s.event.target())
    }
}

impl<M: StateTransition + fmt::Debug> fmt::Debug for EventReceiver<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventReceiver")
            .field("latest", &self.latest())
            .finish_non_exhaustive()
    }
}

impl<M: StateTransition> futures::Stream for EventReceiver<M> {
    type Item = StateEvent<M>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.stream.poll_next_unpin(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::{ConnectionFsm, ConnectionState, ConnectionStateChanged, TransitionReason};
    use crate::TransportError;

    /// `n` valid transitions: `Initialized → Connecting`, then `Connecting ⇄ Disconnected`,
    /// each with its own attempt number (its 1-based place in the sequence).
    fn transitions(n: u32) -> Vec<ConnectionStateChanged> {
        let now = tokio::time::Instant::now();
        let mut fsm = ConnectionFsm::new(now);
        (1..=n)
            .map(|attempt| {
                let (to, reason) = match fsm.state() {
                    ConnectionState::Connecting => (
                        ConnectionState::Disconnected,
                        TransitionReason::AttemptFailed(TransportError::Closed),
                    ),
                    _ => (ConnectionState::Connecting, TransitionReason::RetryDue),
                };
                fsm.transition(to, reason, attempt, None, now).unwrap()
            })
            .collect()
    }

    /// Sends and waits until the forwarder handled it (so the test knows what is queued).
    async fn publish(to: &Recipient<ConnectionStateChanged>, events: &[ConnectionStateChanged]) {
        for ev in events {
            to.send(ev.clone()).await.unwrap();
        }
    }

    #[actix_rt::test]
    async fn a_subscriber_that_keeps_up_gets_every_transition_in_order() {
        let (recipient, mut rx) = event_channel(2);
        let all = transitions(50);
        for ev in &all {
            publish(&recipient, std::slice::from_ref(ev)).await;
            assert_eq!(rx.recv().await, Some(StateEvent::Transition(ev.clone())));
        }
        assert_eq!(rx.try_recv(), None);
    }

    #[actix_rt::test]
    async fn a_subscriber_within_capacity_gets_every_transition_after_a_pause() {
        let (recipient, mut rx) = event_channel(8);
        let all = transitions(8);
        publish(&recipient, &all).await;
        for ev in &all {
            assert_eq!(rx.recv().await, Some(StateEvent::Transition(ev.clone())));
        }
        assert_eq!(rx.try_recv(), None);
    }

    #[actix_rt::test]
    async fn a_lagging_subscriber_is_told_how_many_it_missed_and_where_things_stand() {
        let (recipient, mut rx) = event_channel(2);
        let all = transitions(12);
        publish(&recipient, &all[..10]).await;
        // Readable without waiting, before anything was read.
        assert_eq!(rx.latest(), Some(all[9].clone()));
        assert_eq!(rx.state(), Some(all[9].to));

        let notice = rx.recv().await.unwrap();
        // Nothing delivered yet; the tenth is the latest: the first nine were skipped.
        assert_eq!(
            notice,
            StateEvent::Lagged {
                missed: 9,
                latest: all[9].clone()
            }
        );
        assert_eq!(notice.state(), ConnectionState::Disconnected);
        assert_eq!(notice.missed(), 9);
        // What was still queued is older than the notice: not repeated.
        assert_eq!(rx.try_recv(), None);

        publish(&recipient, &all[10..]).await;
        assert_eq!(
            rx.recv().await,
            Some(StateEvent::Transition(all[10].clone()))
        );
        assert_eq!(
            rx.recv().await,
            Some(StateEvent::Transition(all[11].clone()))
        );
        assert_eq!(rx.try_recv(), None);
    }

    #[actix_rt::test]
    async fn a_second_lag_counts_from_what_was_delivered() {
        let (recipient, mut rx) = event_channel(1);
        let all = transitions(10);
        publish(&recipient, &all[..3]).await;
        assert_eq!(rx.recv().await.unwrap().missed(), 2);
        publish(&recipient, &all[3..4]).await;
        assert_eq!(
            rx.recv().await,
            Some(StateEvent::Transition(all[3].clone()))
        );
        publish(&recipient, &all[4..10]).await;
        assert_eq!(
            rx.recv().await,
            Some(StateEvent::Lagged {
                missed: 5,
                latest: all[9].clone()
            })
        );
    }

    #[actix_rt::test]
    async fn the_stream_ends_after_the_last_transition_once_the_publisher_is_gone() {
        let (recipient, mut rx) = event_channel(4);
        let all = transitions(2);
        publish(&recipient, &all).await;
        drop(recipient);
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut read = Vec::new();
            while let Some(ev) = rx.recv().await {
                read.push(ev);
            }
            read
        })
        .await
        .expect("the stream ends once the forwarder stopped");
        assert_eq!(
            read,
            all.into_iter()
                .map(StateEvent::Transition)
                .collect::<Vec<_>>()
        );
    }

    #[actix_rt::test]
    async fn a_lag_notice_then_the_end_when_the_publisher_is_gone() {
        let (recipient, mut rx) = event_channel(1);
        let all = transitions(4);
        publish(&recipient, &all).await;
        drop(recipient);
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut read = Vec::new();
            while let Some(ev) = rx.recv().await {
                read.push(ev);
            }
            read
        })
        .await
        .expect("the stream ends once the forwarder stopped");
        assert_eq!(
            read,
            [StateEvent::Lagged {
                missed: 3,
                latest: all[3].clone()
            }]
        );
    }

    #[actix_rt::test]
    async fn the_forwarder_stops_once_the_receiver_is_dropped() {
        let (recipient, rx) = event_channel::<ConnectionStateChanged>(4);
        drop(rx);
        let all = transitions(1);
        // The first transition after the drop finds no receiver and stops the forwarder.
        publish(&recipient, &all).await;
        let stopped = tokio::time::timeout(Duration::from_secs(5), async {
            while recipient.connected() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(stopped.is_ok(), "forwarder still running");
    }
}
