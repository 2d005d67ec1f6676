//! A bounded bridge from actix `Recipient`s to an async receiver, for applications and tests that
//! prefer `while let Some(ev) = events.recv().await` to writing an actor.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use actix::{Actor, Context, Handler, Message, Recipient};
use tokio::sync::mpsc;

use crate::telemetry;

/// Default capacity of an [`event_channel`]: 1024 events.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// Creates a bounded event channel: hand the `Recipient` to whatever publishes `M` (for example
/// [`Transport::subscribe`](crate::Transport::subscribe)) and read from the [`EventReceiver`].
///
/// When the receiver falls `capacity` events behind, further events are counted in
/// `tether_events_overflowed_total` and logged — the queue never grows without bound. Must be
/// called inside an actix system (it starts a tiny forwarding actor, which stops when the
/// receiver is dropped).
pub fn event_channel<M>(capacity: usize) -> (Recipient<M>, EventReceiver<M>)
where
    M: Message<Result = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let addr = Forwarder { tx }.start();
    (addr.recipient(), EventReceiver { rx })
}

struct Forwarder<M: Send + 'static> {
    tx: mpsc::Sender<M>,
}

impl<M: Send + 'static> Actor for Forwarder<M> {
    type Context = Context<Self>;
}

impl<M> Handler<M> for Forwarder<M>
where
    M: Message<Result = ()> + Send + 'static,
{
    type Result = ();

    fn handle(&mut self, msg: M, ctx: &mut Context<Self>) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!(telemetry::EVENTS_OVERFLOWED).increment(1);
                tracing::warn!("event receiver is full; event not queued");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                use actix::ActorContext as _;
                ctx.stop();
            }
        }
    }
}

/// The reading end of an [`event_channel`]. Also a `futures::Stream`.
#[derive(Debug)]
pub struct EventReceiver<M> {
    rx: mpsc::Receiver<M>,
}

impl<M> EventReceiver<M> {
    /// The next event, or `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<M> {
        self.rx.recv().await
    }

    /// The next event if one is queued now.
    pub fn try_recv(&mut self) -> Option<M> {
        self.rx.try_recv().ok()
    }
}

impl<M> futures::Stream for EventReceiver<M> {
    type Item = M;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<M>> {
        self.rx.poll_recv(cx)
    }
}
