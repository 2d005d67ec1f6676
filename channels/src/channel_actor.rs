//! The ChannelActor: one channel of one transport, on the client.
//!
//! It keeps every published message in its [`OutgoingBuffer`] until the hub acknowledges it,
//! re-attaches after every reconnect (resuming from its [`ResumeCursor`]), replays unacked
//! publishes in their original order before anything new, and hands subscribers every message
//! exactly once, in order — or an explicit [`Discontinuity`] when history could not cover a gap.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;
use tether_transport::protocol::{
    Attach, Detach, Epoch, Frame, Gap, Offset, Payload, Position, Publish,
};
use tether_transport::status::ChannelSummary;
use tether_transport::transport_actor::{ChannelLink, QueryChannel};
use tether_transport::ws_actor::{SendFrame, WebSocketActor};
use tether_transport::{ReconnectManager, ReconnectPolicy, Transport, TransportError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::cursor::{ResumeCursor, Verdict};
use crate::error::{validate_name, ChannelError};
use crate::outbox::{BufferLimits, OutgoingBuffer};
use crate::state::{is_valid_transition, ChannelReason, ChannelState, ChannelStateChanged};
use crate::telemetry;

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
    /// Largest payload accepted by `publish`. Default [`DEFAULT_MAX_MESSAGE_SIZE`].
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

/// One message delivered to a subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMessage {
    /// The channel.
    pub channel: String,
    /// The channel epoch it belongs to.
    pub epoch: Epoch,
    /// Its offset in that epoch.
    pub offset: Offset,
    /// The message.
    pub payload: Payload,
}

/// Messages in `from..=to` may never arrive: history did not cover them (retention exceeded, or
/// the hub lost its memory and started a new epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discontinuity {
    /// The channel.
    pub channel: String,
    /// First position that may be missing.
    pub from: Position,
    /// Last position that may be missing.
    pub to: Position,
}

/// What a subscriber receives, in order.
#[derive(Debug, Clone, PartialEq, Message)]
#[rtype(result = "()")]
pub enum ChannelEvent {
    /// The next message.
    Message(ChannelMessage),
    /// A gap that cannot be filled, reported where it occurred in the sequence.
    Discontinuity(Discontinuity),
}

/// The hub's acknowledgement of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAck {
    /// The publish's sequence number on this channel.
    pub seq: u64,
    /// Where the hub stored it (absent only for a duplicate the hub no longer places).
    pub offset: Option<Offset>,
    /// The epoch of `offset` (absent with it, or from a hub that does not say).
    pub epoch: Option<Epoch>,
    /// Whether the hub had already stored it (the ack of a replay).
    pub duplicate: bool,
}

type Responder = oneshot::Sender<Result<PublishAck, ChannelError>>;

/// Publishes one message (see [`Channel::publish`]).
#[derive(Message)]
#[rtype(result = "()")]
struct PublishCommand {
    payload: Payload,
    responder: Responder,
}

/// Detaches the channel.
#[derive(Message)]
#[rtype(result = "()")]
struct DetachCommand(oneshot::Sender<()>);

/// Subscribes to the channel's state transitions.
#[derive(Message)]
#[rtype(result = "()")]
struct SubscribeState(Recipient<ChannelStateChanged>);

/// The actor behind a [`Channel`].
pub struct ChannelActor {
    name: String,
    transport: Transport,
    options: ChannelOptions,
    state: ChannelState,
    /// `state`, for readers that must not wait ([`Channel::state`]).
    state_tx: watch::Sender<ChannelState>,
    outbox: OutgoingBuffer<Responder>,
    cursor: ResumeCursor,
    conn: Option<Addr<WebSocketActor>>,
    events: Option<mpsc::Sender<ChannelEvent>>,
    state_subscribers: Vec<Recipient<ChannelStateChanged>>,
    want_attached: bool,
    owes_sync: bool,
    replay_remaining: u64,
    /// Where the replay announced by the last `attached` ends: a message at or past it (or of
    /// another epoch) ends the replay even if history lost some of it meanwhile.
    replay_end: Option<Position>,
    lagging: bool,
    producer: String,
    generation: u64,
    transport_failure: Option<TransportError>,
    detach_timer: Option<SpawnHandle>,
    pending_gap: Option<Gap>,
    waiting_for_room: bool,
    failure: Option<TransportError>,
    attach_timer: Option<SpawnHandle>,
    retry_timer: Option<SpawnHandle>,
    retry: ReconnectManager,
    detach_waiters: Vec<oneshot::Sender<()>>,
    span: tracing::Span,
}

impl ChannelActor {
    fn transition(&mut self, to: ChannelState, reason: ChannelReason, resumed: bool) -> bool {
        let from = self.state;
        if !is_valid_transition(from, to) {
            tracing::error!(parent: &self.span, %from, %to, %reason, "refused invalid channel transition");
            return false;
        }
        self.state = to;
        self.state_tx.send_replace(to);
        tracing::info!(parent: &self.span, %from, %to, %reason, resumed, "channel state changed");
        let event = ChannelStateChanged {
            channel: self.name.clone(),
            from,
            to,
            reason,
            resumed,
        };
        self.state_subscribers.retain(|s| s.connected());
        for s in &self.state_subscribers {
            s.do_send(event.clone());
        }
        true
    }

    fn send_frame(&self, frame: Frame) {
        if let Some(conn) = &self.conn {
            conn.do_send(SendFrame(frame));
        }
    }

    fn cancel_timers(&mut self, ctx: &mut Context<Self>) {
        for handle in [
            self.attach_timer.take(),
            self.retry_timer.take(),
            self.detach_timer.take(),
        ]
        .into_iter()
        .flatten()
        {
            ctx.cancel_future(handle);
        }
    }

    /// Tells the transport this channel is done re-attaching on this connection.
    fn synced(&mut self) {
        if std::mem::take(&mut self.owes_sync) {
            self.transport
                .channel_synced(self.name.clone(), self.generation);
        }
    }

    fn attach(&mut self, ctx: &mut Context<Self>, reason: ChannelReason) {
        if self.conn.is_none() || !self.want_attached {
            return;
        }
        self.cancel_timers(ctx);
        self.retry.begin_attempt(Instant::now());
        let resume = if self.options.subscribe {
            self.cursor.resume_from()
        } else {
            None
        };
        self.lagging = false;
        self.replay_remaining = 0;
        self.send_frame(Frame::Attach(Attach {
            channel: self.name.clone(),
            subscribe: self.options.subscribe,
            resume,
            producer: Some(self.producer.clone()),
        }));
        self.transition(ChannelState::Attaching, reason, false);
        let timeout = self.options.attach_timeout;
        self.attach_timer = Some(ctx.run_later(timeout, move |act, ctx| {
            act.attach_timer = None;
            if act.state == ChannelState::Attaching {
                let error = TransportError::Remote {
                    code: tether_transport::protocol::ErrorCode::Unknown,
                    category: tether_transport::ErrorCategory::Subscription,
                    permanent: false,
                    message: format!("no answer to attach within {timeout:?}"),
                };
                act.attach_failed(ctx, error);
            }
        }));
    }

    /// A retryable attach failure: suspend and retry on the channel's own backoff.
    fn attach_failed(&mut self, ctx: &mut Context<Self>, error: TransportError) {
        if let Some(handle) = self.attach_timer.take() {
            ctx.cancel_future(handle);
        }
        let delay = match self.retry.on_attempt_failed(Instant::now()) {
            tether_transport::reconnect::NextStep::Retry { delay, .. } => delay,
            tether_transport::reconnect::NextStep::Suspend { probe_in, .. } => probe_in,
            tether_transport::reconnect::NextStep::WaitForManual
            | tether_transport::reconnect::NextStep::GiveUp { .. } => {
                self.fail(error);
                return;
            }
        };
        self.transition(
            ChannelState::Suspended,
            ChannelReason::AttachFailed(error),
            false,
        );
        self.synced();
        self.retry_timer = Some(ctx.run_later(delay, |act, ctx| {
            act.retry_timer = None;
            if act.state == ChannelState::Suspended {
                act.attach(ctx, ChannelReason::RetryDue);
            }
        }));
    }

    /// A permanent refusal: the channel fails, its publishers are answered, the rest goes on.
    fn fail(&mut self, error: TransportError) {
        self.transition(
            ChannelState::Failed,
            ChannelReason::Refused(error.clone()),
            false,
        );
        self.failure = Some(error.clone());
        let cause = ChannelError::Failed {
            channel: self.name.clone(),
            cause: error,
        };
        self.answer_all(|| cause.clone());
        self.synced();
    }

    /// Answers every queued publish with `error` — or, for one already on the wire (the hub
    /// may have stored it), with [`ChannelError::Unconfirmed`] around it.
    fn answer_all(&mut self, error: impl Fn() -> ChannelError) {
        let pending = self.outbox.drain();
        metrics::gauge!(telemetry::PUBLISH_QUEUE_DEPTH).decrement(pending.len() as f64);
        for p in pending {
            let answer = if p.sends > 0 {
                ChannelError::Unconfirmed {
                    channel: self.name.clone(),
                    seq: p.seq,
                    cause: Box::new(error()),
                }
            } else {
                error()
            };
            let _ = p.responder.send(Err(answer));
        }
    }

    /// Puts as many buffered publishes on the wire as the in-flight window allows, oldest
    /// first — after a reconnect that is the replay, before anything new.
    fn flush(&mut self) {
        if self.state != ChannelState::Attached {
            return;
        }
        let Some(conn) = self.conn.clone() else {
            return;
        };
        while let Some(entry) = self.outbox.next_to_send() {
            if entry.sends > 1 {
                metrics::counter!(telemetry::PUBLISH_REPLAYED).increment(1);
            }
            conn.do_send(SendFrame(Frame::Publish(Publish {
                channel: self.name.clone(),
                seq: entry.seq,
                payload: entry.payload.clone(),
            })));
        }
    }

    fn on_attached(
        &mut self,
        ctx: &mut Context<Self>,
        attached: tether_transport::protocol::Attached,
    ) {
        if self.state != ChannelState::Attaching {
            return;
        }
        let mut resumed = attached.resumed;
        if self.options.subscribe {
            if let Some(gap) = self.cursor.on_attached(&attached) {
                resumed = false;
                self.report_gap(ctx, gap);
            }
            self.replay_remaining = attached.replay;
            self.replay_end = Some(Position {
                epoch: attached.epoch.clone(),
                offset: attached.head,
            });
        }
        self.retry.reset();
        self.transition(
            ChannelState::Attached,
            ChannelReason::AttachConfirmed,
            resumed,
        );
        self.flush();
        if self.replay_remaining == 0 {
            self.synced();
        }
    }

    /// Records a gap for the subscriber. It is delivered before the next message; a full
    /// stream only delays it (merged with any later gap), never drops it.
    fn report_gap(&mut self, ctx: &mut Context<Self>, gap: Gap) {
        metrics::counter!(telemetry::DISCONTINUITIES).increment(1);
        tracing::warn!(parent: &self.span, from = %gap.from, to = %gap.to, "discontinuity");
        self.pending_gap = Some(match self.pending_gap.take() {
            Some(earlier) => Gap {
                from: earlier.from,
                to: gap.to,
            },
            None => gap,
        });
        if !self.flush_gap() {
            self.wait_for_room(ctx);
        }
    }

    /// Delivers the pending gap if there is room; `true` when nothing is pending any more.
    fn flush_gap(&mut self) -> bool {
        let (Some(events), Some(gap)) = (&self.events, &self.pending_gap) else {
            return true;
        };
        let event = ChannelEvent::Discontinuity(Discontinuity {
            channel: self.name.clone(),
            from: gap.from.clone(),
            to: gap.to.clone(),
        });
        match events.try_send(event) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {
                self.pending_gap = None;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => false,
        }
    }

    /// Waits (without blocking the actor) until the subscriber's stream has room, then
    /// delivers a pending gap and, if the subscriber had fallen behind, catches up.
    fn wait_for_room(&mut self, ctx: &mut Context<Self>) {
        let Some(events) = self.events.clone() else {
            return;
        };
        if std::mem::replace(&mut self.waiting_for_room, true) {
            return;
        }
        ctx.spawn(
            async move {
                // Permits prove there is room for a delivery (gap, gap, message); dropping them
                // gives the slots back.
                let _ = events.reserve_many(3).await;
            }
            .into_actor(self)
            .map(|_, act, ctx| {
                act.waiting_for_room = false;
                if !act.flush_gap() {
                    act.wait_for_room(ctx);
                    return;
                }
                act.catch_up(ctx);
            }),
        );
    }

    fn on_message(
        &mut self,
        ctx: &mut Context<Self>,
        message: tether_transport::protocol::Message,
    ) {
        if self.state != ChannelState::Attached || !self.options.subscribe {
            return;
        }
        let during_replay = self.replay_remaining > 0;
        self.replay_remaining = self.replay_remaining.saturating_sub(1);
        let past_the_end = self
            .replay_end
            .as_ref()
            .is_some_and(|end| message.epoch != end.epoch || message.offset >= end.offset);
        if during_replay && past_the_end {
            // Fewer replay frames came than announced (history was trimmed while they were
            // read; the jump is reported as a gap): the replay is over all the same.
            self.replay_remaining = 0;
        }
        if self.lagging {
            metrics::counter!(telemetry::LAG_SKIPPED).increment(1);
        } else {
            self.deliver(ctx, message);
        }
        if during_replay && self.replay_remaining == 0 {
            self.synced();
        }
    }

    fn deliver(&mut self, ctx: &mut Context<Self>, message: tether_transport::protocol::Message) {
        let Some(events) = self.events.clone() else {
            return;
        };
        if events.is_closed() {
            // Nobody listens any more; keep the cursor moving so a resume does not replay
            // what nobody wanted.
            self.cursor.accept(&message.epoch, message.offset);
            return;
        }
        // Room for a discontinuity and the message, or the subscriber is lagging: stop
        // delivering (the cursor stays put) and catch up from history once there is room.
        // Room for a pending gap, a new gap and the message, or the subscriber is lagging.
        if events.capacity() < 3 {
            self.lagging = true;
            metrics::counter!(telemetry::LAG_SKIPPED).increment(1);
            tracing::warn!(parent: &self.span, "subscriber is behind; will catch up from history");
            self.wait_for_room(ctx);
            return;
        }
        // A pending gap goes out first.
        self.flush_gap();
        match self.cursor.accept(&message.epoch, message.offset) {
            Verdict::Duplicate => {
                metrics::counter!(telemetry::DUPLICATES_DROPPED, "side" => "client").increment(1);
                return;
            }
            Verdict::GapThenDeliver(gap) => self.report_gap(ctx, gap),
            Verdict::Deliver => {}
        }
        metrics::counter!(telemetry::MESSAGES_DELIVERED).increment(1);
        let _ = events.try_send(ChannelEvent::Message(ChannelMessage {
            channel: message.channel,
            epoch: message.epoch,
            offset: message.offset,
            payload: message.payload,
        }));
    }

    fn catch_up(&mut self, ctx: &mut Context<Self>) {
        if !self.lagging {
            return;
        }
        self.lagging = false;
        if self.state == ChannelState::Attached {
            self.attach(ctx, ChannelReason::CatchingUp);
        }
    }

    fn on_ack(&mut self, ack: tether_transport::protocol::Ack) {
        if let Some(done) = self.outbox.ack(ack.seq) {
            metrics::gauge!(telemetry::PUBLISH_QUEUE_DEPTH).decrement(1.0);
            metrics::histogram!(telemetry::PUBLISH_ACK_SECONDS)
                .record(done.accepted_at.elapsed().as_secs_f64());
            let _ = done.responder.send(Ok(PublishAck {
                seq: ack.seq,
                offset: ack.offset,
                epoch: ack.epoch,
                duplicate: ack.duplicate,
            }));
        }
        self.flush();
    }

    fn on_error(&mut self, ctx: &mut Context<Self>, frame: tether_transport::protocol::ErrorFrame) {
        let permanent = frame.permanent;
        let seq = frame.seq;
        let error = frame.into_error();
        match seq {
            Some(seq) if permanent => {
                if let Some(done) = self.outbox.reject(seq) {
                    metrics::gauge!(telemetry::PUBLISH_QUEUE_DEPTH).decrement(1.0);
                    let _ = done.responder.send(Err(ChannelError::Rejected {
                        channel: self.name.clone(),
                        seq,
                        cause: error,
                    }));
                }
                self.flush();
            }
            // A retryable refusal of a publish comes with the connection's close; the message
            // stays buffered and is replayed on the next connection.
            Some(_) => tracing::debug!(parent: &self.span, %error, "publish refused for now"),
            None if matches!(self.state, ChannelState::Attaching | ChannelState::Attached) => {
                if permanent {
                    if let Some(handle) = self.attach_timer.take() {
                        ctx.cancel_future(handle);
                    }
                    self.fail(error);
                } else {
                    self.attach_failed(ctx, error);
                }
            }
            None => {
                tracing::debug!(parent: &self.span, %error, "channel error in state {}", self.state)
            }
        }
    }

    fn finish_detach(&mut self, ctx: &mut Context<Self>) {
        let channel = self.name.clone();
        self.answer_all(|| ChannelError::Detached {
            channel: channel.clone(),
        });
        self.transport.unregister_channel(self.name.clone());
        for waiter in self.detach_waiters.drain(..) {
            let _ = waiter.send(());
        }
        ctx.stop();
    }

    fn summary(&self) -> ChannelSummary {
        ChannelSummary {
            name: self.name.clone(),
            state: self.state.as_str().to_owned(),
            queue_depth: self.outbox.len(),
            queue_bytes: self.outbox.bytes(),
            position: self.cursor.resume_from().map(|p| p.to_string()),
        }
    }
}

impl Actor for ChannelActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Whatever stopped us, nobody waits forever.
        self.answer_all(|| ChannelError::TransportClosed);
    }
}

impl Handler<ChannelLink> for ChannelActor {
    type Result = ();

    fn handle(&mut self, link: ChannelLink, ctx: &mut Context<Self>) {
        match link {
            ChannelLink::Up {
                conn, generation, ..
            } => {
                self.conn = Some(conn);
                self.generation = generation;
                self.owes_sync = true;
                self.transport_failure = None;
                if self.want_attached && self.state != ChannelState::Failed {
                    self.attach(ctx, ChannelReason::AttachRequested);
                } else {
                    self.synced();
                }
            }
            ChannelLink::Down(error) => {
                self.conn = None;
                self.owes_sync = false;
                self.lagging = false;
                self.cancel_timers(ctx);
                self.outbox.on_disconnect();
                match self.state {
                    ChannelState::Attaching | ChannelState::Attached => {
                        self.transition(
                            ChannelState::Suspended,
                            ChannelReason::ConnectionLost(error),
                            false,
                        );
                    }
                    ChannelState::Detaching => {
                        self.transition(
                            ChannelState::Detached,
                            ChannelReason::DetachConfirmed,
                            false,
                        );
                        self.finish_detach(ctx);
                    }
                    _ => {}
                }
            }
            ChannelLink::Inbound(frame) => match frame {
                Frame::Attached(a) => self.on_attached(ctx, a),
                Frame::Message(m) => self.on_message(ctx, m),
                Frame::Ack(a) => self.on_ack(a),
                Frame::Error(e) => self.on_error(ctx, e),
                Frame::Detached(_) if self.state == ChannelState::Detaching => {
                    self.transition(
                        ChannelState::Detached,
                        ChannelReason::DetachConfirmed,
                        false,
                    );
                    self.finish_detach(ctx);
                }
                other => tracing::debug!(parent: &self.span, kind = other.kind(), "ignored frame"),
            },
            ChannelLink::Failed(error) => {
                // Nothing will be sent until a manual reconnect: nobody waits on that.
                let channel = self.name.clone();
                let cause = error.clone();
                self.answer_all(|| ChannelError::Failed {
                    channel: channel.clone(),
                    cause: cause.clone(),
                });
                self.transport_failure = Some(error);
            }
            ChannelLink::Retrying => self.transport_failure = None,
            ChannelLink::Closed => {
                self.cancel_timers(ctx);
                self.conn = None;
                if self.state != ChannelState::Detached {
                    self.transition(
                        ChannelState::Detached,
                        ChannelReason::TransportClosed,
                        false,
                    );
                }
                self.answer_all(|| ChannelError::TransportClosed);
                self.events = None;
                for waiter in self.detach_waiters.drain(..) {
                    let _ = waiter.send(());
                }
                ctx.stop();
            }
        }
    }
}

impl Handler<QueryChannel> for ChannelActor {
    type Result = MessageResult<QueryChannel>;

    fn handle(&mut self, _: QueryChannel, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.summary())
    }
}

impl Handler<PublishCommand> for ChannelActor {
    type Result = ();

    fn handle(&mut self, cmd: PublishCommand, _ctx: &mut Context<Self>) {
        if let Some(cause) = self.failure.as_ref().or(self.transport_failure.as_ref()) {
            let _ = cmd.responder.send(Err(ChannelError::Failed {
                channel: self.name.clone(),
                cause: cause.clone(),
            }));
            return;
        }
        if !self.want_attached {
            let _ = cmd.responder.send(Err(ChannelError::Detached {
                channel: self.name.clone(),
            }));
            return;
        }
        if cmd.payload.len() > self.options.max_message_size {
            let _ = cmd.responder.send(Err(ChannelError::PayloadTooLarge {
                channel: self.name.clone(),
                size: cmd.payload.len(),
                max: self.options.max_message_size,
            }));
            return;
        }
        match self.outbox.push(cmd.payload, cmd.responder, Instant::now()) {
            Ok(pushed) => {
                metrics::gauge!(telemetry::PUBLISH_QUEUE_DEPTH)
                    .increment(1.0 - pushed.evicted.len() as f64);
                for old in pushed.evicted {
                    let _ = old.responder.send(Err(ChannelError::Evicted {
                        channel: self.name.clone(),
                        seq: old.seq,
                    }));
                }
                self.flush();
            }
            Err(refused) => {
                let _ = refused.responder.send(Err(ChannelError::QueueFull {
                    channel: self.name.clone(),
                    messages: refused.messages,
                    bytes: refused.bytes,
                }));
            }
        }
    }
}

impl Handler<DetachCommand> for ChannelActor {
    type Result = ();

    fn handle(&mut self, DetachCommand(waiter): DetachCommand, ctx: &mut Context<Self>) {
        self.detach_waiters.push(waiter);
        if !self.want_attached {
            return;
        }
        self.want_attached = false;
        self.cancel_timers(ctx);
        match self.state {
            ChannelState::Attaching | ChannelState::Attached if self.conn.is_some() => {
                self.send_frame(Frame::Detach(Detach {
                    channel: self.name.clone(),
                }));
                self.transition(
                    ChannelState::Detaching,
                    ChannelReason::DetachRequested,
                    false,
                );
                // The hub's confirmation is a courtesy: do not wait for it forever.
                let timeout = self.options.attach_timeout;
                self.detach_timer = Some(ctx.run_later(timeout, |act, ctx| {
                    act.detach_timer = None;
                    if act.state == ChannelState::Detaching {
                        act.transition(
                            ChannelState::Detached,
                            ChannelReason::DetachTimedOut,
                            false,
                        );
                        act.finish_detach(ctx);
                    }
                }));
            }
            ChannelState::Detached => self.finish_detach(ctx),
            _ => {
                self.transition(
                    ChannelState::Detached,
                    ChannelReason::DetachConfirmed,
                    false,
                );
                self.finish_detach(ctx);
            }
        }
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
        let mut options = options;
        // A publish frame is the payload plus a small envelope; it must fit the transport.
        let fits = transport
            .max_frame_size()
            .saturating_sub(PUBLISH_ENVELOPE + name.len());
        options.max_message_size = options.max_message_size.min(fits);
        // Delivery needs room for a pending gap, a new gap and the message.
        let (tx, rx) = mpsc::channel(options.event_capacity.max(3));
        let mailbox = options.limits.max_messages.max(16);
        let span =
            tracing::info_span!("channel", channel = %name, client_id = %transport.client_id());
        let (state_tx, state) = watch::channel(ChannelState::Detached);
        let actor = ChannelActor {
            name: name.clone(),
            transport: transport.clone(),
            outbox: OutgoingBuffer::new(options.limits),
            retry: ReconnectManager::new(options.retry.clone(), None),
            events: options.subscribe.then_some(tx),
            options,
            state: ChannelState::Detached,
            state_tx,
            cursor: ResumeCursor::new(),
            conn: None,
            state_subscribers,
            want_attached: true,
            owes_sync: false,
            replay_remaining: 0,
            replay_end: None,
            lagging: false,
            producer: tether_transport::protocol::InstanceId::random().0,
            generation: 0,
            transport_failure: None,
            detach_timer: None,
            pending_gap: None,
            waiting_for_room: false,
            failure: None,
            attach_timer: None,
            retry_timer: None,
            detach_waiters: Vec::new(),
            span,
        };
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
        Ok((Channel { name, addr, state }, ChannelEvents { rx }))
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
        let (tx, rx) = oneshot::channel();
        match self.addr.try_send(PublishCommand {
            payload,
            responder: tx,
        }) {
            Ok(()) => PublishFuture { inner: Ok(rx) },
            Err(SendError::Full(_)) => PublishFuture::failed(ChannelError::QueueFull {
                channel: self.name.clone(),
                messages: 0,
                bytes: 0,
            }),
            Err(SendError::Closed(_)) => PublishFuture::failed(ChannelError::TransportClosed),
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

/// The future of one publish: the hub's ack, or a typed error.
pub struct PublishFuture {
    inner: Result<oneshot::Receiver<Result<PublishAck, ChannelError>>, Option<ChannelError>>,
}

impl PublishFuture {
    fn failed(error: ChannelError) -> Self {
        PublishFuture {
            inner: Err(Some(error)),
        }
    }
}

impl Future for PublishFuture {
    type Output = Result<PublishAck, ChannelError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            Ok(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(ChannelError::TransportClosed))),
            Err(e) => Poll::Ready(Err(e.take().unwrap_or(ChannelError::TransportClosed))),
        }
    }
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
