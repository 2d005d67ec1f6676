//! The ChannelActor: one channel of one transport, on the client — the shell around a
//! [`ChannelCore`].
//!
//! The core makes every decision: it keeps each published message in its
//! [`OutgoingBuffer`](crate::outbox::OutgoingBuffer) until the hub acknowledges it, re-attaches
//! after every reconnect (resuming from its [`ResumeCursor`](crate::cursor::ResumeCursor)),
//! replays unacked publishes in their original order before anything new, and hands subscribers
//! every message exactly once, in order — or an explicit [`Discontinuity`] when history could
//! not cover a gap. The actor only translates: transport links, frames, commands and its one
//! timer become [`Event`]s; the [`Action`]s that come back become frames, subscriber events,
//! answers and state notifications.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;
use tether_transport::protocol::{v2, Frame, Payload};
use tether_transport::status::ChannelSummary;
use tether_transport::transport_actor::{ChannelLink, QueryChannel};
use tether_transport::ws_actor::{
    Outgoing, SendFrame, SendOutgoing, SendPublishes, WebSocketActor,
};
use tether_transport::{ReconnectPolicy, Transport};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::core::{Action, ChannelCore, Event, SubscriberRoom, DELIVERY_ROOM};
pub use crate::core::{ChannelEvent, ChannelMessage, Discontinuity, PublishAck};
use crate::durable::{DurableChannel, DurableStore, Recovery};
use crate::error::DurableFailure;
use crate::error::{validate_name, ChannelError};
use crate::outbox::BufferLimits;
use crate::publish::{Inbox, PublishSlot, PushRefused, Responder};
use crate::state::{ChannelState, ChannelStateChanged};

/// Default capacity of a subscriber's event stream: 65,536 events. A subscriber that falls this
/// far behind is caught up from history (or told of the gap) — never dropped silently.
pub const DEFAULT_EVENT_CAPACITY: usize = 65_536;
/// Default time the hub has to confirm an attach: 10 s.
pub const DEFAULT_ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest payload: 512 KiB (the frame around it must fit the transport's frame limit).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 512 * 1024;

/// Bytes a `publish` frame adds around its payload and channel name (type, seq, quotes).
const PUBLISH_ENVELOPE: usize = 128;

/// Options of one channel.
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// Receive the channel's messages (false: publish only). Default true.
    pub subscribe: bool,
    /// Bounds of the publish buffer. Default [`BufferLimits::default`].
    pub limits: BufferLimits,
    /// Capacity of the subscriber's event stream. Default [`DEFAULT_EVENT_CAPACITY`].
    pub event_capacity: usize,
    /// Time the hub has to confirm an attach. Default [`DEFAULT_ATTACH_TIMEOUT`].
    pub attach_timeout: Duration,
    /// Largest payload accepted by `publish`, in bytes (opaque payloads,
    /// [`Payload::from_bytes`], count as their base64 length: 4/3). Default
    /// [`DEFAULT_MAX_MESSAGE_SIZE`].
    pub max_message_size: usize,
    /// Backoff for re-attaching after a retryable attach failure (the connection itself has
    /// its own). Default: 1 s ×2 up to 30 s, ±25 %, never giving up.
    pub retry: ReconnectPolicy,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            subscribe: true,
            limits: BufferLimits::default(),
            event_capacity: DEFAULT_EVENT_CAPACITY,
            attach_timeout: DEFAULT_ATTACH_TIMEOUT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            retry: ReconnectPolicy {
                max_delay: Duration::from_secs(30),
                max_attempts: None,
                ..ReconnectPolicy::default()
            },
        }
    }
}

impl ChannelOptions {
    /// Options for a channel that only publishes.
    pub fn publish_only() -> Self {
        ChannelOptions {
            subscribe: false,
            ..ChannelOptions::default()
        }
    }
}

impl Message for ChannelEvent {
    type Result = ();
}

/// A durable channel's writes waiting for the store, and whether a commit is under way: while
/// one is, new writes gather for the next (group commit).
struct DurableWrites {
    channel: Arc<DurableChannel>,
    appends: Vec<(u64, Payload)>,
    removes: Vec<u64>,
    committing: bool,
}

/// The channel's [`Inbox`] has publishes (sent by a handle that found it empty).
#[derive(Message)]
#[rtype(result = "()")]
struct DrainPublishes;

/// Detaches the channel.
#[derive(Message)]
#[rtype(result = "()")]
struct DetachCommand(oneshot::Sender<()>);

/// Subscribes to the channel's state transitions.
#[derive(Message)]
#[rtype(result = "()")]
struct SubscribeState(Recipient<ChannelStateChanged>);

/// The actor behind a [`Channel`]: a [`ChannelCore`] and the I/O it asks for.
pub struct ChannelActor {
    core: ChannelCore<Responder>,
    /// Publishes the handles made, not yet taken.
    inbox: Arc<Inbox>,
    /// The Vec the inbox is taken into (its capacity kept from one drain to the next).
    taken: Vec<(Payload, Responder)>,
    transport: Transport,
    /// The core's state, for readers that must not wait ([`Channel::state`]).
    state_tx: watch::Sender<ChannelState>,
    conn: Option<Addr<WebSocketActor>>,
    events: Option<mpsc::Sender<ChannelEvent>>,
    state_subscribers: Vec<Recipient<ChannelStateChanged>>,
    /// The transport's resync this connection belongs to (echoed in `channel_synced`).
    generation: u64,
    /// The core's deadline, as scheduled.
    timer: Option<(std::time::Instant, SpawnHandle)>,
    detach_waiters: Vec<oneshot::Sender<()>>,
    /// A durable channel's store.
    durable: Option<DurableWrites>,
    /// An [`Event::Flush`] is on its way (after the publishes already in the mailbox).
    flush_scheduled: bool,
    span: tracing::Span,
}

/// Sends the publishes gathered from the mailbox (sent by the actor to itself, so that every
/// publish already waiting joins the run).
#[derive(Message)]
#[rtype(result = "()")]
struct FlushPublishes;

impl ChannelActor {
    /// How much the subscriber's stream can take now.
    fn room(&self) -> SubscriberRoom {
        match &self.events {
            Some(events) if !events.is_closed() => SubscriberRoom::Free(events.capacity()),
            _ => SubscriberRoom::Gone,
        }
    }

    /// Feeds `event` to the core, carries out what it decides, and keeps the one timer on the
    /// core's deadline.
    fn run(&mut self, ctx: &mut Context<Self>, event: Event<Responder>) {
        let now = Instant::now().into_std();
        self.feed(ctx, now, event);
        self.sync_timer(ctx, now);
    }

    fn feed(&mut self, ctx: &mut Context<Self>, now: std::time::Instant, event: Event<Responder>) {
        self.feed_all(ctx, now, std::iter::once(event));
    }

    /// Feeds `events` to the core in order, then carries out everything they decided (what
    /// they send goes to the socket actor together).
    fn feed_all(
        &mut self,
        ctx: &mut Context<Self>,
        now: std::time::Instant,
        events: impl Iterator<Item = Event<Responder>>,
    ) {
        self.core.set_subscriber_room(self.room());
        self.span.in_scope(|| {
            for event in events {
                self.core.handle(now, event);
            }
        });
        // What an event sends goes to the socket actor together (one mailbox message; a Vec
        // only when there is more than one item).
        let mut first: Option<Outgoing> = None;
        let mut rest: Vec<Outgoing> = Vec::new();
        while let Some(action) = self.core.poll_action() {
            let item = match action {
                Action::Send(frame) => Outgoing::Frame(frame),
                Action::SendPublishes(run) => Outgoing::Publishes(run),
                other => {
                    self.perform(ctx, other);
                    continue;
                }
            };
            if first.is_none() && rest.is_empty() {
                first = Some(item);
            } else {
                rest.extend(first.take());
                rest.push(item);
            }
        }
        if let Some(conn) = &self.conn {
            match first {
                Some(Outgoing::Frame(frame)) => conn.do_send(SendFrame(frame)),
                Some(Outgoing::Publishes(run)) => conn.do_send(SendPublishes(run)),
                None if !rest.is_empty() => conn.do_send(SendOutgoing(rest)),
                None => {}
            }
        }
        if self.core.has_unflushed() && !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(FlushPublishes);
        }
        self.commit_durable(ctx);
    }

    /// Starts a commit of the writes gathered so far, unless one is under way (its end starts
    /// the next). The commit runs on tokio's blocking pool, so the actor keeps taking
    /// publishes meanwhile: they all go into the next commit.
    fn commit_durable(&mut self, ctx: &mut Context<Self>) {
        let Some(writes) = &mut self.durable else {
            return;
        };
        if writes.committing || (writes.appends.is_empty() && writes.removes.is_empty()) {
            return;
        }
        writes.committing = true;
        let appends = std::mem::take(&mut writes.appends);
        let removes = std::mem::take(&mut writes.removes);
        let range = appends
            .first()
            .map(|(first, _)| *first)
            .zip(appends.last().map(|(last, _)| *last));
        let channel = writes.channel.clone();
        let batch = appends.len();
        ctx.spawn(
            async move {
                let started = std::time::Instant::now();
                let store = channel.clone();
                let result =
                    tokio::task::spawn_blocking(move || store.commit(&appends, &removes)).await;
                let result = result.unwrap_or_else(|e| {
                    Err(channel.io_error(format!("the commit's thread failed: {e}")))
                });
                metrics::histogram!(crate::telemetry::DURABLE_COMMIT_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                result
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                if let Some(writes) = &mut act.durable {
                    writes.committing = false;
                }
                if batch > 0 {
                    metrics::histogram!(crate::telemetry::DURABLE_COMMIT_BATCH)
                        .record(batch as f64);
                }
                if let Err(error) = &result {
                    metrics::counter!(crate::telemetry::DURABLE_COMMIT_ERRORS).increment(1);
                    // Failed removals are not retried: one left behind is re-sent after a
                    // restart and acknowledged as a duplicate.
                    tracing::warn!(parent: &act.span, %error, batch, "durable outbox commit failed");
                }
                match (range, result) {
                    (Some((_, through)), Ok(())) => act.run(ctx, Event::Persisted { through }),
                    (Some((from, through)), Err(error)) => act.run(
                        ctx,
                        Event::PersistFailed {
                            from,
                            through,
                            error,
                        },
                    ),
                    (None, _) => act.commit_durable(ctx),
                }
            }),
        );
    }

    fn perform(&mut self, ctx: &mut Context<Self>, action: Action<Responder>) {
        match action {
            Action::Send(frame) => {
                if let Some(conn) = &self.conn {
                    conn.do_send(SendFrame(frame));
                }
            }
            Action::SendPublishes(run) => {
                if let Some(conn) = &self.conn {
                    conn.do_send(SendPublishes(run));
                }
            }
            Action::Deliver(event) => {
                if let Some(events) = &self.events {
                    // The core delivers no more than the room it was told of, and this actor is
                    // the stream's only sender: only a closed stream refuses.
                    if let Err(mpsc::error::TrySendError::Full(_)) = events.try_send(event) {
                        tracing::error!(parent: &self.span, "subscriber stream full: event lost");
                    }
                }
            }
            Action::Answer { responder, result } => responder.answer(result),
            Action::Accepted { seq } => {
                if let Some(responder) = self.core.responder_mut(seq) {
                    responder.accept(seq);
                }
            }
            Action::Persist { seq, payload } => {
                if let Some(writes) = &mut self.durable {
                    writes.appends.push((seq, payload));
                }
            }
            Action::Forget { seq } => {
                if let Some(writes) = &mut self.durable {
                    writes.removes.push(seq);
                }
            }
            Action::StateChanged(event) => {
                self.state_tx.send_replace(event.to);
                self.state_subscribers.retain(|s| s.connected());
                for s in &self.state_subscribers {
                    s.do_send(event.clone());
                }
            }
            Action::Synced => self
                .transport
                .channel_synced(self.core.name().to_owned(), self.generation),
            Action::WaitForRoom => self.wait_for_room(ctx),
            Action::Unregister => self
                .transport
                .unregister_channel(self.core.name().to_owned()),
            Action::Stop => {
                self.events = None;
                for waiter in self.detach_waiters.drain(..) {
                    let _ = waiter.send(());
                }
                ctx.stop();
            }
        }
    }

    /// Waits (without blocking the actor) until the subscriber's stream has room, then tells
    /// the core.
    fn wait_for_room(&mut self, ctx: &mut Context<Self>) {
        let Some(events) = self.events.clone() else {
            return;
        };
        ctx.spawn(
            async move {
                // Permits prove there is room; dropping them gives the slots back. A closed
                // stream answers at once (and the core then sees it gone).
                let _ = events.reserve_many(DELIVERY_ROOM).await;
            }
            .into_actor(self)
            .map(|_, act, ctx| act.run(ctx, Event::RoomAvailable)),
        );
    }

    /// Keeps the one timer on the core's deadline.
    fn sync_timer(&mut self, ctx: &mut Context<Self>, now: std::time::Instant) {
        let wanted = self.core.deadline().map(|d| d.at);
        if wanted == self.timer.as_ref().map(|(at, _)| *at) {
            return;
        }
        if let Some((_, handle)) = self.timer.take() {
            ctx.cancel_future(handle);
        }
        if let Some(at) = wanted {
            let handle = ctx.run_later(at.saturating_duration_since(now), |act, ctx| {
                act.timer = None;
                act.run(ctx, Event::Timeout);
            });
            self.timer = Some((at, handle));
        }
    }

    fn summary(&self) -> ChannelSummary {
        ChannelSummary {
            name: self.core.name().to_owned(),
            state: self.core.state().as_str().to_owned(),
            queue_depth: self.core.queued(),
            queue_bytes: self.core.queued_bytes(),
            position: self.core.position().map(|p| p.to_string()),
        }
    }
}

impl Actor for ChannelActor {
    type Context = Context<Self>;

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        // Whatever stopped us, nobody waits forever: publishes not taken yet are answered as
        // the inbox closes, the others by the core.
        self.inbox.close();
        self.feed(ctx, Instant::now().into_std(), Event::Stopped);
    }
}

impl Handler<ChannelLink> for ChannelActor {
    type Result = ();

    fn handle(&mut self, link: ChannelLink, ctx: &mut Context<Self>) {
        let event = match link {
            ChannelLink::Up {
                conn, generation, ..
            } => {
                self.conn = Some(conn);
                self.generation = generation;
                Event::ConnectionUp
            }
            ChannelLink::Down(error) => {
                self.conn = None;
                Event::ConnectionDown(error)
            }
            ChannelLink::Inbound(frame) => match frame {
                Frame::Attached(a) => Event::Attached(a),
                Frame::Message(m) => Event::Message(m),
                Frame::Ack(a) => Event::Ack(a.into()),
                Frame::Error(e) => Event::Error(e),
                Frame::Detached(_) => Event::Detached,
                other => {
                    tracing::debug!(parent: &self.span, kind = other.kind(), "ignored frame");
                    return;
                }
            },
            ChannelLink::InboundRun(record) => {
                match record {
                    v2::Record::Message(run) => self.run(
                        ctx,
                        Event::Messages {
                            epoch: run.epoch,
                            first_offset: run.first_offset,
                            payloads: run.payloads,
                        },
                    ),
                    v2::Record::Ack(run) => {
                        let (epoch, first_offset) =
                            run.stored.map_or((None, None), |(e, o)| (Some(e), Some(o)));
                        self.run(
                            ctx,
                            Event::AckRange {
                                first_seq: run.first_seq,
                                count: u64::from(run.count),
                                first_offset,
                                epoch,
                                duplicate: run.duplicate,
                            },
                        );
                    }
                    other => {
                        for frame in other.into_frames() {
                            self.handle(ChannelLink::Inbound(frame), ctx);
                        }
                    }
                }
                return;
            }
            ChannelLink::Failed(error) => Event::TransportFailed(error),
            ChannelLink::Retrying => Event::TransportRetrying,
            ChannelLink::Closed => {
                self.conn = None;
                Event::TransportClosed
            }
        };
        self.run(ctx, event);
    }
}

impl Handler<QueryChannel> for ChannelActor {
    type Result = MessageResult<QueryChannel>;

    fn handle(&mut self, _: QueryChannel, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.summary())
    }
}

impl Handler<FlushPublishes> for ChannelActor {
    type Result = ();

    fn handle(&mut self, _: FlushPublishes, ctx: &mut Context<Self>) {
        self.flush_scheduled = false;
        self.run(ctx, Event::Flush);
    }
}

impl Handler<DrainPublishes> for ChannelActor {
    type Result = ();

    fn handle(&mut self, _: DrainPublishes, ctx: &mut Context<Self>) {
        let mut taken = std::mem::take(&mut self.taken);
        self.inbox.take_into(&mut taken);
        if !taken.is_empty() {
            let now = Instant::now().into_std();
            self.feed_all(
                ctx,
                now,
                taken
                    .drain(..)
                    .map(|(payload, responder)| Event::Publish { payload, responder }),
            );
            self.sync_timer(ctx, now);
        }
        self.taken = taken;
    }
}

impl Handler<DetachCommand> for ChannelActor {
    type Result = ();

    fn handle(&mut self, DetachCommand(waiter): DetachCommand, ctx: &mut Context<Self>) {
        self.detach_waiters.push(waiter);
        self.run(ctx, Event::Detach);
    }
}

impl Handler<SubscribeState> for ChannelActor {
    type Result = ();

    fn handle(&mut self, msg: SubscribeState, _ctx: &mut Context<Self>) {
        self.state_subscribers.push(msg.0);
    }
}

/// The application's handle on one channel. Cheap to clone.
#[derive(Clone)]
pub struct Channel {
    name: String,
    addr: Addr<ChannelActor>,
    inbox: Arc<Inbox>,
    state: watch::Receiver<ChannelState>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// Opens channel `name` on `transport`: it attaches whenever the connection is up and
    /// re-attaches after every reconnect. Returns the handle and the subscriber's event stream
    /// (which stays empty for a publish-only channel).
    pub async fn open(
        transport: &Transport,
        name: impl Into<String>,
        options: ChannelOptions,
    ) -> Result<(Channel, ChannelEvents), ChannelError> {
        Self::open_with_state(transport, name, options, Vec::new()).await
    }

    /// Like [`Channel::open`], with state subscribers that see every transition from the
    /// first one (an actor gets each in its mailbox; a Recipient from
    /// [`tether_transport::event_channel`] holds a bounded number and tells a reader that fell
    /// behind how many it missed, with the latest transition).
    pub async fn open_with_state(
        transport: &Transport,
        name: impl Into<String>,
        options: ChannelOptions,
        state_subscribers: Vec<Recipient<ChannelStateChanged>>,
    ) -> Result<(Channel, ChannelEvents), ChannelError> {
        let name = name.into();
        validate_name(&name)?;
        let (channel, events, _) =
            Self::start(transport, name, options, state_subscribers, None).await?;
        Ok((channel, events))
    }

    /// Opens channel `name` with a durable outbox in `store` (see [`crate::durable`]): a
    /// publish is accepted ([`PublishFuture::accepted`]) once committed to the store, and then
    /// survives the process — a later run that opens the same channel on the same store sends
    /// what was not acknowledged, with its original sequence numbers, before anything new, and
    /// the hub stores each exactly once. `transport` must carry the store's identity
    /// ([`DurableStore::transport_config`]); one handle per channel and store at a time.
    ///
    /// Returns, besides the handle and the events, what an earlier run left ([`Recovered`]).
    pub async fn open_durable(
        transport: &Transport,
        name: impl Into<String>,
        options: ChannelOptions,
        store: &DurableStore,
    ) -> Result<(Channel, ChannelEvents, Recovered), ChannelError> {
        let name = name.into();
        validate_name(&name)?;
        if transport.client_id() != store.client_id()
            || transport.instance_id() != store.instance_id()
        {
            return Err(ChannelError::Durable {
                path: store.path().display().to_string(),
                kind: DurableFailure::InvalidOptions,
                message: format!(
                    "the transport's identity ({}/{}) is not the store's ({}/{}): build its \
                     configuration with DurableStore::transport_config",
                    transport.client_id(),
                    transport.instance_id(),
                    store.client_id(),
                    store.instance_id()
                ),
            });
        }
        let store_channel = store.open_channel(&name)?;
        Self::start(transport, name, options, Vec::new(), Some(store_channel)).await
    }

    async fn start(
        transport: &Transport,
        name: String,
        options: ChannelOptions,
        state_subscribers: Vec<Recipient<ChannelStateChanged>>,
        durable: Option<(DurableChannel, Recovery)>,
    ) -> Result<(Channel, ChannelEvents, Recovered), ChannelError> {
        let mut options = options;
        // A publish frame is the payload plus a small envelope; it must fit the transport.
        let fits = transport
            .max_frame_size()
            .saturating_sub(PUBLISH_ENVELOPE + name.len());
        options.max_message_size = options.max_message_size.min(fits);
        // Delivery needs room for a pending gap, a new gap and the message.
        let (tx, rx) = mpsc::channel(options.event_capacity.max(DELIVERY_ROOM));
        let mailbox = options.limits.max_messages.max(16);
        let span = tracing::info_span!("channel", channel = %name, client_id = %transport.client_id(), durable = durable.is_some());
        let (state_tx, state) = watch::channel(ChannelState::Detached);
        let mut recovered = Recovered {
            last_seq: 0,
            pending: Vec::new(),
        };
        let (core, durable) = match durable {
            None => (
                ChannelCore::new(
                    name.clone(),
                    tether_transport::protocol::InstanceId::random().0,
                    &options,
                ),
                None,
            ),
            Some((store_channel, recovery)) => {
                recovered.last_seq = recovery.last_seq;
                let mut restored = Vec::with_capacity(recovery.entries.len());
                for (seq, payload) in recovery.entries {
                    let slot = PublishSlot::accepted(seq);
                    restored.push((seq, payload, Responder::new(slot.clone())));
                    recovered.pending.push(PublishFuture {
                        slot: Some(slot),
                        seq: Some(seq),
                        outcome: None,
                    });
                }
                span.in_scope(|| {
                    tracing::info!(
                        last_seq = recovery.last_seq,
                        pending = restored.len(),
                        "durable outbox recovered"
                    )
                });
                let core = ChannelCore::new_durable(
                    name.clone(),
                    recovery.producer,
                    &options,
                    recovery.last_seq,
                    restored,
                    Instant::now().into_std(),
                );
                let writes = DurableWrites {
                    channel: Arc::new(store_channel),
                    appends: Vec::new(),
                    removes: Vec::new(),
                    committing: false,
                };
                (core, Some(writes))
            }
        };
        let inbox = Arc::new(Inbox::new(mailbox));
        let mut actor = ChannelActor {
            core,
            inbox: inbox.clone(),
            taken: Vec::new(),
            transport: transport.clone(),
            state_tx,
            conn: None,
            events: options.subscribe.then_some(tx),
            state_subscribers,
            generation: 0,
            timer: None,
            detach_waiters: Vec::new(),
            durable,
            flush_scheduled: false,
            span,
        };
        actor.core.defer_publishes(true);
        let addr = ChannelActor::create(move |ctx| {
            ctx.set_mailbox_capacity(mailbox);
            actor
        });
        if let Err(e) = transport
            .register_channel(
                name.clone(),
                addr.clone().recipient(),
                addr.clone().recipient(),
            )
            .await
        {
            addr.do_send(ChannelLink::Closed);
            return Err(e.into());
        }
        Ok((
            Channel {
                name,
                addr,
                inbox,
                state,
            },
            ChannelEvents { rx },
            recovered,
        ))
    }

    /// The channel name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Publishes `value` (serialised as JSON). The message is queued at once, in call order;
    /// the returned future resolves when the hub acknowledged it — across any number of
    /// reconnects — or with a typed error ([`ChannelError::QueueFull`] right away when the
    /// buffer is full).
    pub fn publish<T: Serialize + ?Sized>(&self, value: &T) -> PublishFuture {
        match Payload::from_value(value) {
            Ok(payload) => self.publish_payload(payload),
            Err(e) => PublishFuture::failed(e.into()),
        }
    }

    /// Publishes an already-encoded payload.
    pub fn publish_payload(&self, payload: Payload) -> PublishFuture {
        let slot = Arc::new(PublishSlot::default());
        match self.inbox.push(payload, Responder::new(slot.clone())) {
            Ok(was_empty) => {
                if was_empty {
                    // One wake per non-empty inbox (never refused for a full mailbox: only
                    // one is ever on its way); the actor takes everything queued by then.
                    self.addr.do_send(DrainPublishes);
                }
                PublishFuture {
                    slot: Some(slot),
                    seq: None,
                    outcome: None,
                }
            }
            Err(PushRefused::Full) => PublishFuture::failed(ChannelError::QueueFull {
                channel: self.name.clone(),
                messages: 0,
                bytes: 0,
            }),
            Err(PushRefused::Closed) => PublishFuture::failed(ChannelError::TransportClosed),
        }
    }

    /// Subscribes `recipient` to every state transition from now on (see
    /// [`Channel::open_with_state`] for what a slow one gets). The state it starts from is
    /// [`Channel::state`].
    pub fn subscribe_state(&self, recipient: Recipient<ChannelStateChanged>) {
        self.addr.do_send(SubscribeState(recipient));
    }

    /// The channel's current state, without waiting. Updated before each transition is
    /// published, so it may be ahead of events a subscriber has not read yet.
    pub fn state(&self) -> ChannelState {
        *self.state.borrow()
    }

    /// A `watch` receiver of the channel's state: read it at any time, or wait for a change
    /// (`wait_for(|s| *s == ChannelState::Attached)`). Intermediate states between two reads
    /// are not kept — the transition events are the complete record.
    pub fn watch_state(&self) -> watch::Receiver<ChannelState> {
        self.state.clone()
    }

    /// The channel's status.
    pub async fn status(&self) -> Result<ChannelSummary, ChannelError> {
        self.addr
            .send(QueryChannel)
            .await
            .map_err(|_| ChannelError::TransportClosed)
    }

    /// Detaches: the hub stops sending, unacknowledged publishes fail with
    /// [`ChannelError::Detached`], and the channel's actor stops.
    pub async fn detach(&self) {
        let (tx, rx) = oneshot::channel();
        if self.addr.send(DetachCommand(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The future of one publish: the hub's ack, or a typed error. [`PublishFuture::accepted`]
/// tells the earlier moment the channel took it on (on a durable channel: committed to disk).
#[derive(Debug)]
pub struct PublishFuture {
    /// Where the channel answers (none for a publish refused at once).
    slot: Option<Arc<PublishSlot>>,
    /// Its sequence number, once known.
    seq: Option<u64>,
    /// The outcome, when it is known before the future is polled.
    outcome: Option<Result<PublishAck, ChannelError>>,
}

impl PublishFuture {
    fn failed(error: ChannelError) -> Self {
        PublishFuture {
            slot: None,
            seq: None,
            outcome: Some(Err(error)),
        }
    }

    /// Waits until the channel has accepted the publish and returns its sequence number. On a
    /// durable channel that is once the publish is committed to the store: from then on it
    /// survives the process being killed. Otherwise it is once the publish is queued in memory.
    /// A refused publish returns the error the future itself then resolves to. Awaiting the
    /// future afterwards gives the hub's ack as usual.
    pub async fn accepted(&mut self) -> Result<u64, ChannelError> {
        if let Some(seq) = self.seq {
            return Ok(seq);
        }
        if let (None, Some(slot)) = (&self.outcome, &self.slot) {
            match std::future::poll_fn(|cx| slot.poll_accepted(cx)).await {
                Ok(seq) => {
                    self.seq = Some(seq);
                    return Ok(seq);
                }
                Err(outcome) => self.outcome = Some(outcome),
            }
        }
        // Never accepted (or answered before the acceptance was told): the outcome says why.
        let outcome = match self.outcome.take() {
            Some(outcome) => outcome,
            None => (&mut *self).await,
        };
        self.outcome = Some(outcome.clone());
        let ack = outcome?;
        self.seq = Some(ack.seq);
        Ok(ack.seq)
    }
}

impl Future for PublishFuture {
    type Output = Result<PublishAck, ChannelError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        if let Some(outcome) = self.outcome.take() {
            return Poll::Ready(outcome);
        }
        match &self.slot {
            Some(slot) => slot.poll_outcome(cx),
            None => Poll::Ready(Err(ChannelError::TransportClosed)),
        }
    }
}

/// What a durable channel found in its store when it opened ([`Channel::open_durable`]).
#[derive(Debug)]
pub struct Recovered {
    /// The last sequence number the channel gave out before (0 for a new channel): new
    /// publishes continue after it. An application that numbers its messages one per
    /// publish resumes its numbering from here.
    pub last_seq: u64,
    /// The publishes an earlier run accepted and the hub had not acknowledged, in order: they
    /// are being sent before anything new, and each resolves with the hub's ack (a
    /// `duplicate` one when the hub had stored it already).
    pub pending: Vec<PublishFuture>,
}

/// A subscriber's events, in order. A `futures::Stream` too.
#[derive(Debug)]
pub struct ChannelEvents {
    rx: mpsc::Receiver<ChannelEvent>,
}

impl ChannelEvents {
    /// The next event; `None` once the channel is gone.
    pub async fn recv(&mut self) -> Option<ChannelEvent> {
        self.rx.recv().await
    }

    /// Forwards every event to an actor, waiting for each delivery (so a slow actor slows the
    /// stream — and the channel catches up from history — instead of growing a queue).
    pub fn forward_to(mut self, recipient: Recipient<ChannelEvent>) {
        actix_rt::spawn(async move {
            while let Some(event) = self.rx.recv().await {
                if recipient.send(event).await.is_err() {
                    break;
                }
            }
        });
    }
}

impl futures::Stream for ChannelEvents {
    type Item = ChannelEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}
