//! The client channel's decisions, without I/O: [`ChannelCore`].
//!
//! Every rule of a client channel lives here — the publish buffer and its sequence numbers,
//! acks and rejections, the replay of unacknowledged publishes after a reconnect, the resume
//! cursor and its dedupe, gaps and lag, catching up from history, attach retries and detach.
//! The core owns all of that state and nothing else: [events](Event) come in (with the time,
//! passed explicitly), [actions](Action) come out. It has no sockets, no runtime, no timers:
//! when it wants to be woken it says so with a [`Deadline`], and the shell feeds
//! [`Event::Timeout`] once that moment has come. It records metrics and tracing events, which
//! are facades (no I/O of their own); a shell that wants them in a span enters it around
//! [`ChannelCore::handle`].
//!
//! [`ChannelActor`](crate::ChannelActor) is the shell: it turns transport links, frames,
//! application commands and its single timer into events, and carries out the actions (frames
//! to the connection, events to the subscriber, answers to publishers, state to the watchers).
//! The responder type `R` is whatever answers one publisher: a oneshot sender in the actor, a
//! plain number in tests.
//!
//! ```
//! use std::time::Instant;
//! use tether_channels::core::{Action, ChannelCore, Event};
//! use tether_channels::{ChannelOptions, ChannelState, PublishAck};
//! use tether_transport::protocol::{Attached, Epoch, Frame, Offset, Payload};
//!
//! let now = Instant::now();
//! let mut core: ChannelCore<&str> = ChannelCore::new("room", "producer-1", &ChannelOptions::default());
//!
//! // The connection is up: the core attaches.
//! core.handle(now, Event::ConnectionUp);
//! let actions: Vec<_> = core.drain_actions().collect();
//! assert!(matches!(&actions[0], Action::Send(Frame::Attach(a)) if a.channel == "room"));
//! assert!(core.deadline().is_some()); // the attach has a time limit
//!
//! // A publish before the hub answered waits in the buffer.
//! core.handle(now, Event::Publish { payload: Payload::from_json("1").unwrap(), responder: "first" });
//! assert_eq!(core.queued(), 1);
//! assert!(core.drain_actions().all(|a| matches!(a, Action::Accepted { seq: 1 })));
//!
//! // The hub confirms: the channel is attached and the publish goes out with seq 1.
//! core.handle(now, Event::Attached(Attached {
//!     channel: "room".into(),
//!     epoch: Epoch("e".into()),
//!     head: Offset(0),
//!     resumed: false,
//!     replay: 0,
//!     gap: None,
//! }));
//! assert_eq!(core.state(), ChannelState::Attached);
//! assert!(core.drain_actions().any(|a| matches!(a, Action::SendPublishes(r) if r.first_seq == 1)));
//!
//! // Its ack answers the publisher, once.
//! let ack = PublishAck { seq: 1, offset: Some(Offset(1)), epoch: Some(Epoch("e".into())), duplicate: false };
//! core.handle(now, Event::Ack(ack.clone()));
//! core.handle(now, Event::Ack(ack.clone()));
//! let answers: Vec<_> = core
//!     .drain_actions()
//!     .filter_map(|a| match a {
//!         Action::Answer { responder, result } => Some((responder, result)),
//!         _ => None,
//!     })
//!     .collect();
//! assert_eq!(answers, [("first", Ok(ack))]);
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_transport::protocol::v2::{self, PublishRun};
use tether_transport::protocol::{
    Ack, Attach, Attached, Detach, Epoch, ErrorCode, ErrorFrame, Frame, Gap, Message, Offset,
    Payload, Position,
};
use tether_transport::reconnect::NextStep;
use tether_transport::{ErrorCategory, ReconnectManager, TransportError};

use crate::channel_actor::ChannelOptions;
use crate::cursor::{ResumeCursor, Verdict};
use crate::error::ChannelError;
use crate::outbox::OutgoingBuffer;
use crate::state::{is_valid_transition, ChannelReason, ChannelState, ChannelStateChanged};
use crate::telemetry;

/// Room a delivery needs in the subscriber's stream: a pending gap, a new gap and the message.
/// With less, the subscriber counts as behind (see [`Action::WaitForRoom`]).
pub const DELIVERY_ROOM: usize = 3;

/// Most encoded bytes of one [`Action::SendPublishes`] run: 64 KiB, the socket's batch size (a
/// single larger payload goes in a run of its own).
pub const MAX_RUN_BYTES: usize = tether_transport::ws_actor::MAX_BATCH_BYTES;
/// Most publishes in one [`Action::SendPublishes`] run: 4,096 (the in-flight window usually
/// ends a run first).
pub const MAX_RUN_LEN: usize = 4096;

/// One message delivered to a subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMessage {
    /// The channel (shared by all of its messages).
    pub channel: Arc<str>,
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
#[derive(Debug, Clone, PartialEq)]
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

impl From<Ack> for PublishAck {
    fn from(ack: Ack) -> Self {
        PublishAck {
            seq: ack.seq,
            offset: ack.offset,
            epoch: ack.epoch,
            duplicate: ack.duplicate,
        }
    }
}

/// How much the subscriber's event stream can take right now. The shell tells the core before
/// each event ([`ChannelCore::set_subscriber_room`]); the core counts down as it delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriberRoom {
    /// Room for this many events.
    Free(usize),
    /// Nobody listens (publish-only channel, or the subscriber dropped its stream): messages
    /// are passed over, the cursor still moves.
    Gone,
}

/// Which wait a [`Deadline`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// The hub has until then to confirm the attach.
    AttachTimeout,
    /// A retryable attach failure is retried then.
    RetryAttach,
    /// The hub has until then to confirm the detach.
    DetachTimeout,
}

/// When the core wants [`Event::Timeout`], and why. At most one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// The wait.
    pub timer: Timer,
    /// When it is over.
    pub at: Instant,
}

/// What happens to a channel: the inputs of [`ChannelCore::handle`].
#[derive(Debug)]
pub enum Event<R> {
    /// The application publishes `payload`; `responder` gets the ack or the error.
    Publish {
        /// The message.
        payload: Payload,
        /// Who to answer.
        responder: R,
    },
    /// The application detaches the channel.
    Detach,
    /// A connection is up (handshake done): attach now.
    ConnectionUp,
    /// The connection is gone; another may follow.
    ConnectionDown(TransportError),
    /// The transport failed permanently (until a manual reconnect).
    TransportFailed(TransportError),
    /// The transport left its failure (a manual reconnect): publishes are accepted again.
    TransportRetrying,
    /// The transport was closed: nothing more will come.
    TransportClosed,
    /// The hub's `attached` frame.
    Attached(Attached),
    /// A `message` frame.
    Message(Message),
    /// A run of consecutive messages (a v2 message run), taken as one event: each is handled
    /// as its own `message` frame would be, in offset order.
    Messages {
        /// Their epoch.
        epoch: Epoch,
        /// The first one's offset; the others follow it by one.
        first_offset: Offset,
        /// The payloads, in offset order.
        payloads: Vec<Payload>,
    },
    /// The hub acknowledged one publish.
    Ack(PublishAck),
    /// The hub acknowledged `count` consecutive publishes from `first_seq`, stored at
    /// consecutive offsets from `first_offset` (absent: no offsets).
    AckRange {
        /// The first acknowledged sequence number.
        first_seq: u64,
        /// How many sequence numbers the ack covers.
        count: u64,
        /// Where the first one was stored.
        first_offset: Option<Offset>,
        /// The epoch of the offsets.
        epoch: Option<Epoch>,
        /// Whether they were replays the hub already had.
        duplicate: bool,
    },
    /// An `error` frame about this channel (or one of its publishes).
    Error(ErrorFrame),
    /// The hub's `detached` frame.
    Detached,
    /// The subscriber's stream has room again, after [`Action::WaitForRoom`] (or is gone).
    RoomAvailable,
    /// The [`Deadline`] has come (ignored before it).
    Timeout,
    /// Put the publishes accepted since the last send on the wire now (see
    /// [`ChannelCore::defer_publishes`]). Any other event does it first, too, except those
    /// that report the connection gone (they stay unsent until the next attach).
    Flush,
    /// The shell stops, whatever the reason: nobody may be left waiting.
    Stopped,
    /// Durable channels: the store committed every [`Action::Persist`] up to `through`.
    Persisted {
        /// The last sequence number of the commit.
        through: u64,
    },
    /// Durable channels: the store failed to commit the publishes `from..=through`; nothing of
    /// them was stored.
    PersistFailed {
        /// The first sequence number of the failed commit.
        from: u64,
        /// The last one.
        through: u64,
        /// What the store said.
        error: ChannelError,
    },
}

/// What the shell must do: the outputs of [`ChannelCore::handle`], in order.
#[derive(Debug)]
pub enum Action<R> {
    /// Put this frame on the current connection.
    Send(Frame),
    /// Put these consecutive publishes (seqs `first_seq ..`, in order) on the current
    /// connection: one v2 publish run, or one v1 `publish` frame each. At most
    /// [`MAX_RUN_LEN`] publishes and [`MAX_RUN_BYTES`] encoded bytes (or one payload).
    SendPublishes(PublishRun),
    /// Hand this event to the subscriber. The core never delivers more than the room it was
    /// told of.
    Deliver(ChannelEvent),
    /// Answer one publisher. Each accepted publish is answered exactly once.
    Answer {
        /// Who.
        responder: R,
        /// The ack, or why there is none.
        result: Result<PublishAck, ChannelError>,
    },
    /// The channel changed state (already checked against the transition table).
    StateChanged(ChannelStateChanged),
    /// Tell the transport this channel is done re-attaching on this connection (at most once
    /// per connection).
    Synced,
    /// Wake the core with [`Event::RoomAvailable`] once the subscriber's stream has room for
    /// [`DELIVERY_ROOM`] events (or is gone). Asked for again only after that event.
    WaitForRoom,
    /// Take the channel out of the transport's registry.
    Unregister,
    /// The channel is over: release whoever waits for the detach, and stop.
    Stop,
    /// The publish `seq` is accepted: queued in memory, or (durable) committed to the store.
    /// Its responder is still queued ([`ChannelCore::responder_mut`]). Comes in sequence order.
    Accepted {
        /// Its sequence number.
        seq: u64,
    },
    /// Durable channels: write this publish to the store, then feed [`Event::Persisted`] (or
    /// [`Event::PersistFailed`]). Writes come in sequence order; the shell may commit several
    /// in one transaction, in that order.
    Persist {
        /// Its sequence number.
        seq: u64,
        /// The message.
        payload: Payload,
    },
    /// Durable channels: remove publish `seq` from the store (acknowledged or refused by the
    /// hub, or evicted). Removals may be batched and need not be flushed at once: one lost in
    /// a crash is re-sent and acknowledged as a duplicate.
    Forget {
        /// Its sequence number.
        seq: u64,
    },
}

/// Whether a publish `seq` of `add` encoded bytes may join `run`, now `bytes` long: it must be
/// the next seq, and the run must stay within [`MAX_RUN_LEN`] and [`MAX_RUN_BYTES`].
fn fits_run(run: &PublishRun, bytes: usize, add: usize, seq: u64) -> bool {
    run.first_seq + run.payloads.len() as u64 == seq
        && run.payloads.len() < MAX_RUN_LEN
        && bytes + add <= MAX_RUN_BYTES
}

/// The replay announced by the last `attached`: how many history frames are still to come and
/// where it ends (a message at or past `end`, or of another epoch, ends it even if history lost
/// some of it meanwhile).
#[derive(Debug, Clone)]
struct Replay {
    remaining: u64,
    end: Position,
}

/// The connection as the channel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    /// Up; `owes_sync` until the channel told the transport it is done re-attaching.
    Up {
        owes_sync: bool,
    },
}

/// All the state and rules of one client channel (see the [module docs](self)).
#[derive(Debug)]
pub struct ChannelCore<R> {
    /// The channel's name (shared by every delivered message).
    name: Arc<str>,
    producer: String,
    /// Publishes go through a store first ([`Action::Persist`]).
    durable: bool,
    subscribe: bool,
    max_message_size: usize,
    attach_timeout: Duration,
    state: ChannelState,
    link: Link,
    /// The application has not detached.
    want_attached: bool,
    outbox: OutgoingBuffer<R>,
    cursor: ResumeCursor,
    retry: ReconnectManager,
    replay: Option<Replay>,
    /// The subscriber fell behind: live messages are passed over until there is room, then the
    /// channel re-attaches to catch up from history.
    lagging: bool,
    waiting_for_room: bool,
    /// A gap not yet delivered (merged with later ones): it goes out before the next message.
    pending_gap: Option<Gap>,
    room: SubscriberRoom,
    /// The hub refused the channel permanently.
    failure: Option<TransportError>,
    /// The transport failed permanently.
    transport_failure: Option<TransportError>,
    deadline: Option<Deadline>,
    actions: VecDeque<Action<R>>,
    meters: telemetry::ChannelMeters,
    /// A publish leaves its sends for [`Event::Flush`] (or the next other event).
    defer: bool,
    /// Publishes were accepted since the last flush.
    unflushed: bool,
    /// Where accepted payloads of up to [`ARENA_MAX_PAYLOAD`] bytes are copied
    /// ([`Payload::copied_into`]): the outbox keeps them until their ack, and a chunk (up to
    /// [`ARENA_CHUNK`]) holds many — one allocation per chunk, where each publish used to keep
    /// the caller's buffer (and the shared header its first clone allocates) alive until its
    /// ack and free it then, in bursts as acks come. Acks come in order, so the chunks held
    /// are those of the unacknowledged publishes and the one being filled; none once the
    /// outbox is empty. See [`Self::move_into_chunk`] for the bound when acks come out of order.
    arena: bytes::BytesMut,
    /// The chunks that may still hold a queued payload, oldest first: the last seq put in
    /// each, and its size.
    chunks: VecDeque<(u64, usize)>,
}

/// The largest chunk the outbox's payload copies are carved from: 64 KiB (a chunk is twice the
/// payload bytes waiting for their ack, within [`ARENA_MIN_CHUNK`] and this).
pub const ARENA_CHUNK: usize = 64 * 1024;

/// The smallest chunk the outbox's payload copies are carved from: 4 KiB.
pub const ARENA_MIN_CHUNK: usize = 4 * 1024;

/// The largest payload copied into the outbox's chunks (4 KiB); a larger one keeps the buffer
/// it came in, whose allocation is worth its size.
pub const ARENA_MAX_PAYLOAD: usize = 4 * 1024;

impl<R> ChannelCore<R> {
    /// A detached channel `name` that will attach on the next [`Event::ConnectionUp`], with
    /// `producer` identifying its publishes to the hub (random per handle, so a channel
    /// re-opened on the same transport never collides with its earlier sequence numbers).
    pub fn new(
        name: impl Into<String>,
        producer: impl Into<String>,
        options: &ChannelOptions,
    ) -> Self {
        let name: String = name.into();
        ChannelCore {
            name: name.into(),
            producer: producer.into(),
            durable: false,
            subscribe: options.subscribe,
            max_message_size: options.max_message_size,
            attach_timeout: options.attach_timeout,
            state: ChannelState::Detached,
            link: Link::Down,
            want_attached: true,
            outbox: OutgoingBuffer::new(options.limits),
            cursor: ResumeCursor::new(),
            retry: ReconnectManager::new(options.retry.clone(), None),
            replay: None,
            lagging: false,
            waiting_for_room: false,
            pending_gap: None,
            room: if options.subscribe {
                SubscriberRoom::Free(options.event_capacity.max(DELIVERY_ROOM))
            } else {
                SubscriberRoom::Gone
            },
            failure: None,
            transport_failure: None,
            deadline: None,
            actions: VecDeque::new(),
            meters: telemetry::ChannelMeters::new(),
            defer: false,
            unflushed: false,
            arena: bytes::BytesMut::new(),
            chunks: VecDeque::new(),
        }
    }

    /// A durable channel (see [`crate::durable`]): every publish is written to a store
    /// ([`Action::Persist`]) and sent only once committed; numbering continues after
    /// `last_seq`, and `restored` — what an earlier run left unacknowledged, in sequence order —
    /// goes out first, with its original sequence numbers. `producer` must be the one the
    /// earlier run used.
    pub fn new_durable(
        name: impl Into<String>,
        producer: impl Into<String>,
        options: &ChannelOptions,
        last_seq: u64,
        restored: Vec<(u64, Payload, R)>,
        now: Instant,
    ) -> Self {
        let mut core = Self::new(name, producer, options);
        core.durable = true;
        core.outbox = OutgoingBuffer::new_durable(options.limits, last_seq);
        for (seq, payload, responder) in restored {
            core.outbox
                .restore(seq, payload, responder, tokio_instant(now));
        }
        core
    }

    /// The responder of queued publish `seq` (to tell it of [`Action::Accepted`]).
    pub fn responder_mut(&mut self, seq: u64) -> Option<&mut R> {
        self.outbox.responder_mut(seq)
    }

    /// The channel name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The channel's state.
    pub fn state(&self) -> ChannelState {
        self.state
    }

    /// Publishes accepted and not answered yet (in flight + unsent).
    pub fn queued(&self) -> usize {
        self.outbox.len()
    }

    /// Payload bytes of [`ChannelCore::queued`].
    pub fn queued_bytes(&self) -> usize {
        self.outbox.bytes()
    }

    /// Publishes on the wire awaiting their ack.
    pub fn in_flight(&self) -> usize {
        self.outbox.in_flight()
    }

    /// Where the next attach resumes from: the last position delivered (or skipped past).
    pub fn position(&self) -> Option<Position> {
        self.cursor.resume_from()
    }

    /// When the core wants [`Event::Timeout`], if it does.
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    /// Whether the subscriber fell behind and the channel waits for room to catch up.
    pub fn is_lagging(&self) -> bool {
        self.lagging
    }

    /// How much the subscriber's stream can take now. Call before each [`ChannelCore::handle`].
    pub fn set_subscriber_room(&mut self, room: SubscriberRoom) {
        self.room = room;
    }

    /// With `defer`, an [`Event::Publish`] only queues its publish: the sends wait for
    /// [`Event::Flush`] — or any other event, which flushes before it is handled, so frames
    /// keep the order of the events — and consecutive publishes leave as one run. The shell
    /// feeds `Flush` once it has taken every publish already waiting (its mailbox drained).
    /// Off by default: each publish is sent (as a run of one) as soon as it may be.
    pub fn defer_publishes(&mut self, defer: bool) {
        self.defer = defer;
        if !defer && std::mem::take(&mut self.unflushed) {
            self.flush();
        }
    }

    /// Whether publishes wait for [`Event::Flush`] (see [`ChannelCore::defer_publishes`]).
    pub fn has_unflushed(&self) -> bool {
        self.unflushed
    }

    /// The next action, oldest first.
    pub fn poll_action(&mut self) -> Option<Action<R>> {
        let action = self.actions.pop_front();
        if action.is_none() {
            // The run of work is done: its metrics go out together.
            self.meters.report(self.outbox.len());
        }
        action
    }

    /// Every action not taken yet, oldest first.
    pub fn drain_actions(&mut self) -> std::collections::vec_deque::Drain<'_, Action<R>> {
        self.meters.report(self.outbox.len());
        self.actions.drain(..)
    }

    /// Feeds one event at time `now`; the actions it leads to wait in
    /// [`ChannelCore::poll_action`] / [`ChannelCore::drain_actions`].
    pub fn handle(&mut self, now: Instant, event: Event<R>) {
        if !matches!(event, Event::Publish { .. }) && std::mem::take(&mut self.unflushed) {
            // What the publishes before this event send goes before what it sends — unless
            // the event says the connection is gone already: then they stay unsent (never
            // counted as on the wire) and go out after the next attach, in order.
            let gone = matches!(
                event,
                Event::ConnectionDown(_)
                    | Event::TransportFailed(_)
                    | Event::TransportClosed
                    | Event::Stopped
            );
            if !gone {
                self.flush();
            }
        }
        match event {
            Event::Flush => {}
            Event::Publish { payload, responder } => self.on_publish(now, payload, responder),
            Event::Detach => self.on_detach(now),
            Event::ConnectionUp => self.on_up(now),
            Event::ConnectionDown(error) => self.on_down(error),
            Event::TransportFailed(error) => {
                // Nothing will be sent until a manual reconnect: nobody waits on that.
                let channel = self.name.clone();
                let cause = error.clone();
                self.answer_all(|| ChannelError::Failed {
                    channel: channel.to_string(),
                    cause: cause.clone(),
                });
                self.transport_failure = Some(error);
            }
            Event::TransportRetrying => self.transport_failure = None,
            Event::TransportClosed => self.on_closed(),
            Event::Attached(attached) => self.on_attached(attached),
            Event::Message(message) => {
                self.on_message(&message.epoch, message.offset, message.payload)
            }
            Event::Messages {
                epoch,
                first_offset,
                payloads,
            } => {
                for (offset, payload) in (first_offset.0..).zip(payloads) {
                    self.on_message(&epoch, Offset(offset), payload);
                }
            }
            Event::Ack(ack) => {
                self.ack(now, ack);
                self.flush();
            }
            Event::AckRange {
                first_seq,
                count,
                first_offset,
                epoch,
                duplicate,
            } => {
                for i in 0..count {
                    self.ack(
                        now,
                        PublishAck {
                            seq: first_seq.saturating_add(i),
                            offset: first_offset.map(|o| Offset(o.0.saturating_add(i))),
                            epoch: epoch.clone(),
                            duplicate,
                        },
                    );
                }
                self.flush();
            }
            Event::Error(frame) => self.on_error(now, frame),
            Event::Detached => {
                if self.state == ChannelState::Detaching {
                    self.deadline = None;
                    self.transition(
                        ChannelState::Detached,
                        ChannelReason::DetachConfirmed,
                        false,
                    );
                    self.finish_detach();
                }
            }
            Event::RoomAvailable => self.on_room(now),
            Event::Timeout => self.on_timeout(now),
            Event::Stopped => self.answer_all(|| ChannelError::TransportClosed),
            Event::Persisted { through } => {
                for seq in self.outbox.mark_committed(through) {
                    self.push(Action::Accepted { seq });
                }
                self.flush();
            }
            Event::PersistFailed {
                from,
                through,
                error,
            } => {
                let failed = self.outbox.remove_uncommitted(from, through);
                for p in failed {
                    self.push(Action::Answer {
                        responder: p.responder,
                        result: Err(error.clone()),
                    });
                }
            }
        }
        self.trim_chunks();
    }

    fn push(&mut self, action: Action<R>) {
        self.actions.push_back(action);
    }

    fn transition(&mut self, to: ChannelState, reason: ChannelReason, resumed: bool) -> bool {
        let from = self.state;
        if !is_valid_transition(from, to) {
            tracing::error!(%from, %to, %reason, "refused invalid channel transition");
            return false;
        }
        self.state = to;
        tracing::info!(%from, %to, %reason, resumed, "channel state changed");
        self.push(Action::StateChanged(ChannelStateChanged {
            channel: self.name.to_string(),
            from,
            to,
            reason,
            resumed,
        }));
        true
    }

    /// Tells the transport this channel is done re-attaching on this connection.
    fn synced(&mut self) {
        if let Link::Up { owes_sync } = &mut self.link {
            if std::mem::take(owes_sync) {
                self.push(Action::Synced);
            }
        }
    }

    fn on_publish(&mut self, now: Instant, payload: Payload, responder: R) {
        // (The name is cloned only for an answer that needs it, never per accepted publish.)
        if let Some(cause) = self.failure.as_ref().or(self.transport_failure.as_ref()) {
            let cause = cause.clone();
            self.push(Action::Answer {
                responder,
                result: Err(ChannelError::Failed {
                    channel: self.name.to_string(),
                    cause,
                }),
            });
            return;
        }
        if !self.want_attached {
            self.push(Action::Answer {
                responder,
                result: Err(ChannelError::Detached {
                    channel: self.name.to_string(),
                }),
            });
            return;
        }
        // Opaque bytes count as their base64 length: a v1 connection carries them so, and a
        // frame over the transport's bound would be refused on every reconnect.
        if payload.v1_len() > self.max_message_size {
            let (size, max) = (payload.v1_len(), self.max_message_size);
            self.push(Action::Answer {
                responder,
                result: Err(ChannelError::PayloadTooLarge {
                    channel: self.name.to_string(),
                    size,
                    max,
                }),
            });
            return;
        }
        // The store's copy shares the payload's bytes.
        let to_store = self.durable.then(|| payload.clone());
        match self.outbox.push(payload, responder, tokio_instant(now)) {
            Ok(pushed) => {
                self.move_into_chunk(pushed.seq);
                // `to_store` is there exactly when the channel is durable.
                self.push(match to_store {
                    Some(payload) => Action::Persist {
                        seq: pushed.seq,
                        payload,
                    },
                    None => Action::Accepted { seq: pushed.seq },
                });
                for old in pushed.evicted {
                    if self.durable {
                        self.push(Action::Forget { seq: old.seq });
                    }
                    self.push(Action::Answer {
                        responder: old.responder,
                        result: Err(ChannelError::Evicted {
                            channel: self.name.to_string(),
                            seq: old.seq,
                        }),
                    });
                }
                if self.defer {
                    self.unflushed = true;
                } else {
                    self.flush();
                }
            }
            Err(refused) => self.push(Action::Answer {
                responder: refused.responder,
                result: Err(ChannelError::QueueFull {
                    channel: self.name.to_string(),
                    messages: refused.messages,
                    bytes: refused.bytes,
                }),
            }),
        }
    }

    /// Puts as many buffered publishes on the wire as the in-flight window allows, oldest
    /// first — after a reconnect that is the replay, before anything new — as runs of
    /// consecutive seqs ([`Action::SendPublishes`]) bounded by [`MAX_RUN_LEN`] and
    /// [`MAX_RUN_BYTES`].
    fn flush(&mut self) {
        if self.state != ChannelState::Attached || self.link == Link::Down {
            return;
        }
        let header = v2::publish_header_len(&self.name);
        let mut run: Option<(PublishRun, usize)> = None;
        let mut replayed = 0;
        while let Some(entry) = self.outbox.next_to_send() {
            replayed += u64::from(entry.sends > 1);
            let (seq, payload) = (entry.seq, entry.payload.clone());
            let add = v2::payload_len(&payload);
            if let Some((open, bytes)) = &mut run {
                if fits_run(open, *bytes, add, seq) {
                    open.payloads.push(payload);
                    *bytes += add;
                    continue;
                }
            }
            if let Some((done, _)) = run.take() {
                self.actions.push_back(Action::SendPublishes(done));
            }
            let mut payloads = Vec::with_capacity(self.outbox.sendable().min(MAX_RUN_LEN) + 1);
            payloads.push(payload);
            run = Some((
                PublishRun {
                    channel: self.name.to_string(),
                    first_seq: seq,
                    payloads,
                },
                header + add,
            ));
        }
        if let Some((done, _)) = run {
            self.actions.push_back(Action::SendPublishes(done));
        }
        if replayed > 0 {
            self.meters.replayed.increment(replayed);
        }
    }

    /// Moves the payload of queued publish `seq` into the current chunk of [`Self::arena`]
    /// (a new chunk when it is full), if it is small enough and the chunks that may still
    /// hold a queued payload stay within twice the outbox's bytes (past that a payload keeps
    /// its own buffer; [`Self::trim_chunks`] bounds what acks out of order leave held).
    fn move_into_chunk(&mut self, seq: u64) {
        self.forget_released_chunks();
        let (queued, held) = (self.outbox.bytes(), self.chunks_held());
        let Some(payload) = self.outbox.payload_mut(seq) else {
            return;
        };
        let len = payload.len();
        if len > ARENA_MAX_PAYLOAD {
            return;
        }
        if self.arena.capacity() < len {
            if held > 2 * queued {
                return;
            }
            // Chunks grow with what is waiting: a channel that publishes now and then takes
            // small ones.
            let chunk = (2 * queued).clamp(ARENA_MIN_CHUNK, ARENA_CHUNK).max(len);
            self.arena = bytes::BytesMut::with_capacity(chunk);
            self.chunks.push_back((seq, chunk));
        }
        *payload = payload.copied_into(&mut self.arena);
        if let Some(current) = self.chunks.back_mut() {
            current.0 = seq;
        }
    }

    /// Lets go of the chunks when nothing waits for an ack (an idle channel holds none), or
    /// when they hold more than twice the queued bytes and two chunks besides — what acks out
    /// of order leave, a few payloads keeping each chunk: then the queued payloads each move
    /// to a buffer of their own (a copy of fewer bytes than the chunks they free) and the next
    /// publish starts a new chunk.
    fn trim_chunks(&mut self) {
        self.forget_released_chunks();
        if self.outbox.is_empty() {
            // Every chunk is forgotten; the one being filled goes too.
            if self.arena.capacity() > 0 {
                self.arena = bytes::BytesMut::new();
            }
            return;
        }
        if self.chunks_held() <= 2 * self.outbox.bytes() + 2 * ARENA_CHUNK {
            return;
        }
        for payload in self.outbox.payloads_mut() {
            if payload.len() <= ARENA_MAX_PAYLOAD {
                *payload = payload.copied_into(&mut bytes::BytesMut::with_capacity(payload.len()));
            }
        }
        self.arena = bytes::BytesMut::new();
        self.chunks.clear();
    }

    /// Drops the chunks whose payloads are all acknowledged (their last seq is older than the
    /// oldest queued): as acks come in order, what is left is what still holds a payload.
    fn forget_released_chunks(&mut self) {
        let oldest = self.outbox.oldest_seq().unwrap_or(u64::MAX);
        while self.chunks.front().is_some_and(|&(last, _)| last < oldest) {
            self.chunks.pop_front();
        }
    }

    /// The bytes of the chunks that may still hold a queued payload.
    fn chunks_held(&self) -> usize {
        self.chunks.iter().map(|&(_, size)| size).sum()
    }

    fn ack(&mut self, now: Instant, ack: PublishAck) {
        if let Some(done) = self.outbox.ack(ack.seq) {
            if self.durable {
                self.push(Action::Forget { seq: done.seq });
            }
            self.meters.ack_seconds.record(
                tokio_instant(now)
                    .saturating_duration_since(done.accepted_at)
                    .as_secs_f64(),
            );
            self.push(Action::Answer {
                responder: done.responder,
                result: Ok(ack),
            });
        }
    }

    /// Answers every queued publish with `error` — or, for one already on the wire (the hub
    /// may have stored it), with [`ChannelError::Unconfirmed`] around it. On a durable
    /// channel a committed publish stays in the store (it goes out when the channel opens
    /// again): its publisher hears [`ChannelError::Persisted`]; one whose commit is under way
    /// may yet be stored, so it is `Unconfirmed`.
    fn answer_all(&mut self, error: impl Fn() -> ChannelError) {
        let pending = self.outbox.drain();
        for p in pending {
            let answer = if self.durable && self.outbox.is_committed(p.seq) {
                ChannelError::Persisted {
                    channel: self.name.to_string(),
                    seq: p.seq,
                }
            } else if p.sends > 0 || self.durable {
                ChannelError::Unconfirmed {
                    channel: self.name.to_string(),
                    seq: p.seq,
                    cause: Box::new(error()),
                }
            } else {
                error()
            };
            self.push(Action::Answer {
                responder: p.responder,
                result: Err(answer),
            });
        }
    }

    fn on_up(&mut self, now: Instant) {
        self.link = Link::Up { owes_sync: true };
        self.transport_failure = None;
        if self.want_attached && self.state != ChannelState::Failed {
            self.attach(now, ChannelReason::AttachRequested);
        } else {
            self.synced();
        }
    }

    fn on_down(&mut self, error: TransportError) {
        self.link = Link::Down;
        self.lagging = false;
        self.deadline = None;
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
                self.finish_detach();
            }
            _ => {}
        }
    }

    fn on_closed(&mut self) {
        self.deadline = None;
        self.link = Link::Down;
        if self.state != ChannelState::Detached {
            self.transition(
                ChannelState::Detached,
                ChannelReason::TransportClosed,
                false,
            );
        }
        self.answer_all(|| ChannelError::TransportClosed);
        self.push(Action::Stop);
    }

    fn attach(&mut self, now: Instant, reason: ChannelReason) {
        if self.link == Link::Down || !self.want_attached {
            return;
        }
        self.deadline = None;
        self.retry.begin_attempt(tokio_instant(now));
        let resume = if self.subscribe {
            self.cursor.resume_from()
        } else {
            None
        };
        self.lagging = false;
        self.replay = None;
        self.push(Action::Send(Frame::Attach(Attach {
            channel: self.name.to_string(),
            subscribe: self.subscribe,
            resume,
            producer: Some(self.producer.clone()),
        })));
        self.transition(ChannelState::Attaching, reason, false);
        self.deadline = Some(Deadline {
            timer: Timer::AttachTimeout,
            at: now + self.attach_timeout,
        });
    }

    /// A retryable attach failure: suspend and retry on the channel's own backoff.
    fn attach_failed(&mut self, now: Instant, error: TransportError) {
        self.deadline = None;
        let delay = match self.retry.on_attempt_failed(tokio_instant(now)) {
            NextStep::Retry { delay, .. } => delay,
            NextStep::Suspend { probe_in, .. } => probe_in,
            NextStep::WaitForManual | NextStep::GiveUp { .. } => {
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
        self.deadline = Some(Deadline {
            timer: Timer::RetryAttach,
            at: now + delay,
        });
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
            channel: self.name.to_string(),
            cause: error,
        };
        self.answer_all(|| cause.clone());
        self.synced();
    }

    fn on_attached(&mut self, attached: Attached) {
        if self.state != ChannelState::Attaching {
            return;
        }
        self.deadline = None;
        let mut resumed = attached.resumed;
        if self.subscribe {
            if let Some(gap) = self.cursor.on_attached(&attached) {
                resumed = false;
                self.report_gap(gap);
            }
            self.replay = (attached.replay > 0).then(|| Replay {
                remaining: attached.replay,
                end: Position {
                    epoch: attached.epoch.clone(),
                    offset: attached.head,
                },
            });
        }
        self.retry.reset();
        self.transition(
            ChannelState::Attached,
            ChannelReason::AttachConfirmed,
            resumed,
        );
        self.flush();
        if self.replay.is_none() {
            self.synced();
        }
    }

    fn on_message(&mut self, epoch: &Epoch, offset: Offset, payload: Payload) {
        if self.state != ChannelState::Attached || !self.subscribe {
            return;
        }
        let during_replay = self.replay.is_some();
        if let Some(replay) = &mut self.replay {
            replay.remaining -= 1;
            // Fewer replay frames may come than announced (history was trimmed while they were
            // read; the jump is reported as a gap): a message past the end ends the replay.
            let past_the_end = *epoch != replay.end.epoch || offset >= replay.end.offset;
            if replay.remaining == 0 || past_the_end {
                self.replay = None;
            }
        }
        if self.lagging {
            metrics::counter!(telemetry::LAG_SKIPPED).increment(1);
        } else {
            self.deliver(epoch, offset, payload);
        }
        if during_replay && self.replay.is_none() {
            self.synced();
        }
    }

    fn deliver(&mut self, epoch: &Epoch, offset: Offset, payload: Payload) {
        match self.room {
            SubscriberRoom::Gone => {
                // Nobody listens any more; keep the cursor moving so a resume does not replay
                // what nobody wanted.
                self.cursor.accept(epoch, offset);
                return;
            }
            // The subscriber is behind: stop delivering (the cursor stays put) and catch up
            // from history once there is room.
            SubscriberRoom::Free(n) if n < DELIVERY_ROOM => {
                self.lagging = true;
                metrics::counter!(telemetry::LAG_SKIPPED).increment(1);
                tracing::warn!("subscriber is behind; will catch up from history");
                self.wait_for_room();
                return;
            }
            SubscriberRoom::Free(_) => {}
        }
        // A pending gap goes out first.
        self.flush_gap();
        match self.cursor.accept(epoch, offset) {
            Verdict::Duplicate => {
                metrics::counter!(telemetry::DUPLICATES_DROPPED, "side" => "client").increment(1);
                return;
            }
            Verdict::GapThenDeliver(gap) => self.report_gap(gap),
            Verdict::Deliver => {}
        }
        self.meters.delivered_one();
        self.emit(ChannelEvent::Message(ChannelMessage {
            channel: self.name.clone(),
            epoch: epoch.clone(),
            offset,
            payload,
        }));
    }

    /// Delivers `event`, counting down the room (callers made sure there is some).
    fn emit(&mut self, event: ChannelEvent) {
        if let SubscriberRoom::Free(n) = &mut self.room {
            debug_assert!(*n > 0, "delivery beyond the subscriber's room");
            *n = n.saturating_sub(1);
            self.actions.push_back(Action::Deliver(event));
        }
    }

    /// Records a gap for the subscriber. It is delivered before the next message; a full
    /// stream only delays it (merged with any later gap), never drops it.
    fn report_gap(&mut self, gap: Gap) {
        metrics::counter!(telemetry::DISCONTINUITIES).increment(1);
        tracing::warn!(from = %gap.from, to = %gap.to, "discontinuity");
        self.pending_gap = Some(match self.pending_gap.take() {
            Some(earlier) => Gap {
                from: earlier.from,
                to: gap.to,
            },
            None => gap,
        });
        if !self.flush_gap() {
            self.wait_for_room();
        }
    }

    /// Delivers the pending gap if there is room; `true` when nothing is pending any more.
    fn flush_gap(&mut self) -> bool {
        let Some(gap) = &self.pending_gap else {
            return true;
        };
        match self.room {
            SubscriberRoom::Gone => {
                self.pending_gap = None;
                true
            }
            SubscriberRoom::Free(0) => false,
            SubscriberRoom::Free(_) => {
                let event = ChannelEvent::Discontinuity(Discontinuity {
                    channel: self.name.to_string(),
                    from: gap.from.clone(),
                    to: gap.to.clone(),
                });
                self.pending_gap = None;
                self.emit(event);
                true
            }
        }
    }

    /// Asks the shell to say when the subscriber's stream has room (once at a time).
    fn wait_for_room(&mut self) {
        if !std::mem::replace(&mut self.waiting_for_room, true) {
            self.push(Action::WaitForRoom);
        }
    }

    /// The stream has room: deliver a pending gap and, if the subscriber had fallen behind,
    /// catch up from history.
    fn on_room(&mut self, now: Instant) {
        self.waiting_for_room = false;
        if !self.flush_gap() {
            self.wait_for_room();
            return;
        }
        if std::mem::take(&mut self.lagging) && self.state == ChannelState::Attached {
            self.attach(now, ChannelReason::CatchingUp);
        }
    }

    fn on_error(&mut self, now: Instant, frame: ErrorFrame) {
        let permanent = frame.permanent;
        let seq = frame.seq;
        let error = frame.into_error();
        match seq {
            Some(seq) if permanent => {
                if let Some(done) = self.outbox.reject(seq) {
                    if self.durable {
                        self.push(Action::Forget { seq });
                    }
                    self.push(Action::Answer {
                        responder: done.responder,
                        result: Err(ChannelError::Rejected {
                            channel: self.name.to_string(),
                            seq,
                            cause: error,
                        }),
                    });
                }
                self.flush();
            }
            // A retryable refusal of a publish comes with the connection's close; the message
            // stays buffered and is replayed on the next connection.
            Some(_) => tracing::debug!(%error, "publish refused for now"),
            None if matches!(self.state, ChannelState::Attaching | ChannelState::Attached) => {
                if permanent {
                    self.deadline = None;
                    self.fail(error);
                } else {
                    self.attach_failed(now, error);
                }
            }
            None => tracing::debug!(%error, "channel error in state {}", self.state),
        }
    }

    fn on_detach(&mut self, now: Instant) {
        if !self.want_attached {
            return;
        }
        self.want_attached = false;
        self.deadline = None;
        match self.state {
            ChannelState::Attaching | ChannelState::Attached if self.link != Link::Down => {
                self.push(Action::Send(Frame::Detach(Detach {
                    channel: self.name.to_string(),
                })));
                self.transition(
                    ChannelState::Detaching,
                    ChannelReason::DetachRequested,
                    false,
                );
                // The hub's confirmation is a courtesy: do not wait for it forever.
                self.deadline = Some(Deadline {
                    timer: Timer::DetachTimeout,
                    at: now + self.attach_timeout,
                });
            }
            ChannelState::Detached => self.finish_detach(),
            _ => {
                self.transition(
                    ChannelState::Detached,
                    ChannelReason::DetachConfirmed,
                    false,
                );
                self.finish_detach();
            }
        }
    }

    fn finish_detach(&mut self) {
        let channel = self.name.clone();
        self.answer_all(|| ChannelError::Detached {
            channel: channel.to_string(),
        });
        self.push(Action::Unregister);
        self.push(Action::Stop);
    }

    fn on_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.deadline.filter(|d| now >= d.at) else {
            return;
        };
        self.deadline = None;
        match (deadline.timer, self.state) {
            (Timer::AttachTimeout, ChannelState::Attaching) => {
                let error = TransportError::Remote {
                    code: ErrorCode::Unknown,
                    category: ErrorCategory::Subscription,
                    permanent: false,
                    message: format!("no answer to attach within {:?}", self.attach_timeout),
                };
                self.attach_failed(now, error);
            }
            (Timer::RetryAttach, ChannelState::Suspended) => {
                self.attach(now, ChannelReason::RetryDue)
            }
            (Timer::DetachTimeout, ChannelState::Detaching) => {
                self.transition(ChannelState::Detached, ChannelReason::DetachTimedOut, false);
                self.finish_detach();
            }
            _ => {}
        }
    }
}

/// The plain structs the core drives (the outbox, the ReconnectManager) count time in tokio's
/// `Instant`, a newtype around std's: converting involves no runtime.
fn tokio_instant(now: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel_actor::DEFAULT_ATTACH_TIMEOUT;
    use crate::outbox::{BufferLimits, OverflowPolicy};
    use tether_transport::ReconnectPolicy;

    fn e(s: &str) -> Epoch {
        Epoch(s.into())
    }

    fn p(n: u64) -> Payload {
        Payload::from_json(&n.to_string()).unwrap()
    }

    fn at(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: e(epoch),
            offset: Offset(offset),
        }
    }

    fn attached(epoch: &str, head: u64, replay: u64, gap: Option<Gap>) -> Attached {
        Attached {
            channel: "c".into(),
            epoch: e(epoch),
            head: Offset(head),
            resumed: gap.is_none(),
            replay,
            gap,
        }
    }

    fn message(epoch: &str, offset: u64) -> Message {
        Message {
            channel: "c".into(),
            epoch: e(epoch),
            offset: Offset(offset),
            payload: p(offset),
        }
    }

    fn ack(seq: u64, offset: u64) -> PublishAck {
        PublishAck {
            seq,
            offset: Some(Offset(offset)),
            epoch: Some(e("a")),
            duplicate: false,
        }
    }

    fn error(permanent: bool, seq: Option<u64>) -> ErrorFrame {
        ErrorFrame {
            code: ErrorCode::Unknown,
            category: ErrorCategory::Subscription,
            permanent,
            message: "no".into(),
            channel: Some("c".into()),
            seq,
            retry_after_ms: None,
        }
    }

    fn lost() -> TransportError {
        TransportError::ConnectionClosed {
            code: None,
            reason: "cut".into(),
        }
    }

    /// A core and a clock; each step returns the actions it led to.
    struct Harness {
        core: ChannelCore<u64>,
        now: Instant,
        next_responder: u64,
    }

    impl Harness {
        fn new(options: ChannelOptions) -> Self {
            Harness {
                core: ChannelCore::new("c", "me", &options),
                now: Instant::now(),
                next_responder: 1,
            }
        }

        fn subscriber() -> Self {
            Harness::new(ChannelOptions {
                retry: ReconnectPolicy {
                    initial_delay: Duration::from_secs(1),
                    max_delay: Duration::from_secs(30),
                    jitter: 0.0,
                    max_attempts: None,
                    ..ReconnectPolicy::default()
                },
                ..ChannelOptions::default()
            })
        }

        fn step(&mut self, event: Event<u64>) -> Vec<Action<u64>> {
            self.core.handle(self.now, event);
            self.core.drain_actions().collect()
        }

        /// Publishes the next payload; its responder is its number.
        fn publish(&mut self) -> Vec<Action<u64>> {
            let n = self.next_responder;
            self.next_responder += 1;
            self.step(Event::Publish {
                payload: p(n),
                responder: n,
            })
        }

        /// Up and attached at `head` of epoch `a`, nothing to replay.
        fn attached(&mut self, head: u64) -> Vec<Action<u64>> {
            self.step(Event::ConnectionUp);
            self.step(Event::Attached(attached("a", head, 0, None)))
        }
    }

    fn published(actions: &[Action<u64>]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendPublishes(r) => {
                    Some(r.first_seq..r.first_seq + r.payloads.len() as u64)
                }
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn attach_frame(actions: &[Action<u64>]) -> Option<&Attach> {
        actions.iter().find_map(|a| match a {
            Action::Send(Frame::Attach(a)) => Some(a),
            _ => None,
        })
    }

    fn answers(actions: Vec<Action<u64>>) -> Vec<(u64, Result<PublishAck, ChannelError>)> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Answer { responder, result } => Some((responder, result)),
                _ => None,
            })
            .collect()
    }

    fn delivered(actions: &[Action<u64>]) -> Vec<ChannelEvent> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver(event) => Some(event.clone()),
                _ => None,
            })
            .collect()
    }

    fn offsets(actions: &[Action<u64>]) -> Vec<u64> {
        delivered(actions)
            .into_iter()
            .map(|event| match event {
                ChannelEvent::Message(m) => m.offset.0,
                ChannelEvent::Discontinuity(d) => panic!("unexpected {d:?}"),
            })
            .collect()
    }

    fn transitions(actions: &[Action<u64>]) -> Vec<(ChannelState, ChannelReason)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::StateChanged(c) => Some((c.to, c.reason.clone())),
                _ => None,
            })
            .collect()
    }

    fn durable(limits: BufferLimits, last_seq: u64, restored: Vec<(u64, Payload, u64)>) -> Harness {
        let options = ChannelOptions {
            subscribe: false,
            limits,
            ..ChannelOptions::default()
        };
        let now = Instant::now();
        Harness {
            core: ChannelCore::new_durable(
                "c",
                "stored-producer",
                &options,
                last_seq,
                restored,
                now,
            ),
            now,
            next_responder: 100,
        }
    }

    fn persisted(actions: &[Action<u64>]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Persist { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    fn forgotten(actions: &[Action<u64>]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Forget { seq } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    fn accepted(actions: &[Action<u64>]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Accepted { seq } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_durable_publish_is_sent_only_once_committed_and_forgotten_once_acked() {
        let mut h = durable(BufferLimits::default(), 0, Vec::new());
        h.attached(0);
        let actions = h.publish();
        assert_eq!(persisted(&actions), [1]);
        assert!(published(&actions).is_empty(), "sent before the commit");
        assert!(accepted(&actions).is_empty(), "accepted before the commit");
        let actions = h.publish();
        assert_eq!(persisted(&actions), [2]);
        // One commit covers both (group commit): both accepted, both sent, in order.
        let actions = h.step(Event::Persisted { through: 2 });
        assert_eq!(accepted(&actions), [1, 2]);
        assert_eq!(published(&actions), [1, 2]);
        let actions = h.step(Event::Ack(ack(1, 1)));
        assert_eq!(forgotten(&actions), [1]);
        assert_eq!(answers(actions).len(), 1);
    }

    #[test]
    fn a_durable_channel_continues_its_numbering_and_resends_what_was_left_first() {
        let restored = vec![(7, p(7), 7), (9, p(9), 9)];
        let mut h = durable(BufferLimits::default(), 9, restored);
        assert_eq!(h.core.queued(), 2);
        let actions = h.publish();
        assert_eq!(persisted(&actions), [10]);
        // The attach names the stored producer; the restored ones go out first.
        let actions = h.step(Event::ConnectionUp);
        assert_eq!(
            attach_frame(&actions).unwrap().producer.as_deref(),
            Some("stored-producer")
        );
        let actions = h.step(Event::Attached(attached("a", 0, 0, None)));
        assert_eq!(published(&actions), [7, 9]);
        let actions = h.step(Event::Persisted { through: 10 });
        assert_eq!(published(&actions), [10]);
        // A duplicate ack of a replay is an ack like any other: answered and forgotten.
        let actions = h.step(Event::Ack(PublishAck {
            duplicate: true,
            ..ack(7, 3)
        }));
        assert_eq!(forgotten(&actions), [7]);
    }

    #[test]
    fn a_failed_commit_refuses_its_publishes_and_later_ones_go_on() {
        let mut h = durable(BufferLimits::default(), 0, Vec::new());
        h.attached(0);
        h.publish();
        h.publish();
        h.publish();
        let store_error = ChannelError::Durable {
            path: "x".into(),
            kind: crate::error::DurableFailure::Io,
            message: "disk full".into(),
        };
        let actions = h.step(Event::PersistFailed {
            from: 1,
            through: 2,
            error: store_error.clone(),
        });
        let refused = answers(actions);
        assert_eq!(
            refused,
            [(100, Err(store_error.clone())), (101, Err(store_error))]
        );
        assert_eq!(h.core.queued(), 1);
        let actions = h.step(Event::Persisted { through: 3 });
        assert_eq!(accepted(&actions), [3]);
        assert_eq!(published(&actions), [3]);
    }

    #[test]
    fn a_durable_outbox_is_bounded_like_the_memory_one_and_keeps_what_it_stored_at_close() {
        let limits = BufferLimits {
            max_messages: 2,
            ..BufferLimits::default()
        };
        let mut h = durable(limits, 0, Vec::new());
        h.publish();
        h.publish();
        // Past the bound: refused before anything is written.
        let actions = h.publish();
        assert!(persisted(&actions).is_empty());
        assert!(matches!(
            answers(actions).as_slice(),
            [(102, Err(ChannelError::QueueFull { messages: 2, .. }))]
        ));
        h.step(Event::Persisted { through: 1 });
        // Closing: the committed one stays in the store for the next run (no Forget), the one
        // whose commit is under way may or may not be stored.
        let actions = h.step(Event::TransportClosed);
        assert!(forgotten(&actions).is_empty());
        let answers = answers(actions);
        assert!(matches!(
            answers[0],
            (100, Err(ChannelError::Persisted { seq: 1, .. }))
        ));
        assert!(matches!(
            answers[1],
            (101, Err(ChannelError::Unconfirmed { seq: 2, .. }))
        ));
    }

    #[test]
    fn nothing_is_sent_before_the_connection_and_the_attach_asks_for_a_deadline() {
        let mut h = Harness::subscriber();
        assert!(published(&h.publish()).is_empty());
        let actions = h.step(Event::ConnectionUp);
        let attach = attach_frame(&actions).unwrap();
        assert_eq!(
            (attach.resume.clone(), attach.producer.as_deref()),
            (None, Some("me"))
        );
        assert!(
            published(&actions).is_empty(),
            "publishes wait for attached"
        );
        assert_eq!(
            h.core.deadline().map(|d| (d.timer, d.at)),
            Some((Timer::AttachTimeout, h.now + DEFAULT_ATTACH_TIMEOUT))
        );
        let actions = h.step(Event::Attached(attached("a", 0, 0, None)));
        assert_eq!(published(&actions), [1]);
        assert!(matches!(actions.last(), Some(Action::Synced)));
        assert_eq!(h.core.deadline(), None);
    }

    #[test]
    fn after_a_reconnect_unacked_publishes_go_again_in_order_before_new_ones() {
        let mut h = Harness::subscriber();
        h.attached(0);
        let sent: Vec<u64> = (0..3).flat_map(|_| published(&h.publish())).collect();
        assert_eq!(sent, [1, 2, 3]);
        assert_eq!(answers(h.step(Event::Ack(ack(1, 1)))).len(), 1);
        h.step(Event::ConnectionDown(lost()));
        assert_eq!(h.core.state(), ChannelState::Suspended);
        assert!(published(&h.publish()).is_empty());
        assert!(published(&h.step(Event::ConnectionUp)).is_empty());
        let actions = h.step(Event::Attached(attached("a", 1, 0, None)));
        assert_eq!(published(&actions), [2, 3, 4]);
    }

    #[test]
    fn each_publish_is_answered_once_however_often_its_ack_comes() {
        let mut h = Harness::subscriber();
        h.attached(0);
        h.publish();
        h.publish();
        assert_eq!(answers(h.step(Event::Ack(ack(2, 2)))).len(), 1);
        assert!(answers(h.step(Event::Ack(ack(2, 2)))).is_empty());
        // A late ack from an earlier connection still counts.
        h.step(Event::ConnectionDown(lost()));
        let got = answers(h.step(Event::Ack(ack(1, 1))));
        assert_eq!(got, [(1, Ok(ack(1, 1)))]);
        assert_eq!(h.core.queued(), 0);
    }

    #[test]
    fn a_range_ack_answers_each_seq_with_its_offset() {
        let mut h = Harness::subscriber();
        h.attached(0);
        for _ in 0..3 {
            h.publish();
        }
        let got = answers(h.step(Event::AckRange {
            first_seq: 1,
            count: 3,
            first_offset: Some(Offset(7)),
            epoch: Some(e("a")),
            duplicate: false,
        }));
        assert_eq!(
            got,
            [(1, Ok(ack(1, 7))), (2, Ok(ack(2, 8))), (3, Ok(ack(3, 9)))]
        );
    }

    #[test]
    fn the_in_flight_window_releases_one_publish_per_ack() {
        let mut h = Harness::new(ChannelOptions {
            limits: BufferLimits {
                max_in_flight: 2,
                ..BufferLimits::default()
            },
            ..ChannelOptions::default()
        });
        h.attached(0);
        let sent: Vec<u64> = (0..4).flat_map(|_| published(&h.publish())).collect();
        assert_eq!(sent, [1, 2]);
        assert_eq!(published(&h.step(Event::Ack(ack(1, 1)))), [3]);
    }

    #[test]
    fn a_resume_skips_the_overlap_of_a_replay_and_syncs_after_it() {
        let mut h = Harness::subscriber();
        h.attached(0);
        let actions: Vec<_> = (1..=3)
            .flat_map(|o| h.step(Event::Message(message("a", o))))
            .collect();
        assert_eq!(offsets(&actions), [1, 2, 3]);
        h.step(Event::ConnectionDown(lost()));
        let actions = h.step(Event::ConnectionUp);
        assert_eq!(attach_frame(&actions).unwrap().resume, Some(at("a", 3)));
        // The hub replays 2..=5: 2 and 3 were delivered already.
        let actions = h.step(Event::Attached(attached("a", 5, 4, None)));
        assert!(!actions.iter().any(|a| matches!(a, Action::Synced)));
        let mut replayed = Vec::new();
        for o in 2..=5 {
            replayed.extend(h.step(Event::Message(message("a", o))));
        }
        assert_eq!(offsets(&replayed), [4, 5]);
        assert!(matches!(replayed.last(), Some(Action::Synced)));
    }

    #[test]
    fn the_hubs_gap_is_delivered_before_the_next_message() {
        let mut h = Harness::subscriber();
        h.attached(0);
        h.step(Event::Message(message("a", 1)));
        h.step(Event::ConnectionDown(lost()));
        h.step(Event::ConnectionUp);
        let gap = Gap {
            from: at("a", 2),
            to: at("a", 5),
        };
        let actions = h.step(Event::Attached(attached("a", 7, 2, Some(gap))));
        assert_eq!(
            delivered(&actions),
            [ChannelEvent::Discontinuity(Discontinuity {
                channel: "c".into(),
                from: at("a", 2),
                to: at("a", 5),
            })]
        );
        let resumed = actions.iter().find_map(|a| match a {
            Action::StateChanged(c) => Some(c.resumed),
            _ => None,
        });
        assert_eq!(resumed, Some(false));
        assert_eq!(offsets(&h.step(Event::Message(message("a", 6)))), [6]);
    }

    #[test]
    fn a_jump_in_offsets_is_a_gap_never_a_silent_skip() {
        let mut h = Harness::subscriber();
        h.attached(0);
        h.step(Event::Message(message("a", 1)));
        let events = delivered(&h.step(Event::Message(message("a", 4))));
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[0], ChannelEvent::Discontinuity(d)
            if d.from == at("a", 2) && d.to == at("a", 3)));
        assert!(matches!(&events[1], ChannelEvent::Message(m) if m.offset == Offset(4)));
    }

    #[test]
    fn a_gap_without_room_waits_and_goes_out_first() {
        let mut h = Harness::subscriber();
        h.attached(0);
        h.step(Event::Message(message("a", 1)));
        h.step(Event::ConnectionDown(lost()));
        h.step(Event::ConnectionUp);
        h.core.set_subscriber_room(SubscriberRoom::Free(0));
        let actions = h.step(Event::Attached(attached("b", 4, 0, None)));
        assert!(delivered(&actions).is_empty());
        assert_eq!(
            actions
                .iter()
                .filter(|a| matches!(a, Action::WaitForRoom))
                .count(),
            1
        );
        h.core.set_subscriber_room(SubscriberRoom::Free(3));
        let events = delivered(&h.step(Event::RoomAvailable));
        assert!(matches!(&events[..], [ChannelEvent::Discontinuity(d)]
            if d.from == at("a", 2) && d.to == at("b", 4)));
        h.core.set_subscriber_room(SubscriberRoom::Free(3));
        assert_eq!(offsets(&h.step(Event::Message(message("b", 5)))), [5]);
    }

    #[test]
    fn a_subscriber_without_room_is_caught_up_from_history() {
        let mut h = Harness::subscriber();
        h.attached(0);
        h.step(Event::Message(message("a", 1)));
        h.core.set_subscriber_room(SubscriberRoom::Free(2));
        let actions = h.step(Event::Message(message("a", 2)));
        assert!(delivered(&actions).is_empty());
        assert!(matches!(&actions[..], [Action::WaitForRoom]));
        assert!(h.core.is_lagging());
        // Later live messages are passed over; nothing is asked twice.
        assert!(h.step(Event::Message(message("a", 3))).is_empty());
        h.core.set_subscriber_room(SubscriberRoom::Free(10));
        let actions = h.step(Event::RoomAvailable);
        assert_eq!(attach_frame(&actions).unwrap().resume, Some(at("a", 1)));
        assert_eq!(
            transitions(&actions),
            [(ChannelState::Attaching, ChannelReason::CatchingUp)]
        );
        h.step(Event::Attached(attached("a", 3, 2, None)));
        let mut replayed = h.step(Event::Message(message("a", 2)));
        replayed.extend(h.step(Event::Message(message("a", 3))));
        assert_eq!(offsets(&replayed), [2, 3]);
    }

    #[test]
    fn a_gone_subscriber_still_moves_the_cursor() {
        let mut h = Harness::subscriber();
        h.attached(0);
        h.core.set_subscriber_room(SubscriberRoom::Gone);
        assert!(delivered(&h.step(Event::Message(message("a", 1)))).is_empty());
        assert_eq!(h.core.position(), Some(at("a", 1)));
    }

    #[test]
    fn an_unanswered_attach_is_retried_on_the_channels_backoff() {
        let mut h = Harness::subscriber();
        h.step(Event::ConnectionUp);
        // Early: nothing happens.
        assert!(h.step(Event::Timeout).is_empty());
        h.now += DEFAULT_ATTACH_TIMEOUT;
        let actions = h.step(Event::Timeout);
        assert!(matches!(
            &transitions(&actions)[..],
            [(ChannelState::Suspended, ChannelReason::AttachFailed(_))]
        ));
        assert!(matches!(actions.last(), Some(Action::Synced)));
        let retry = h.core.deadline().unwrap();
        assert_eq!(retry.timer, Timer::RetryAttach);
        h.now = retry.at;
        let actions = h.step(Event::Timeout);
        assert!(attach_frame(&actions).is_some());
        assert_eq!(
            transitions(&actions),
            [(ChannelState::Attaching, ChannelReason::RetryDue)]
        );
        // A connection loss cancels the wait.
        h.step(Event::ConnectionDown(lost()));
        assert_eq!(h.core.deadline(), None);
    }

    #[test]
    fn a_retryable_attach_error_suspends_and_a_permanent_one_fails_the_channel() {
        let mut h = Harness::subscriber();
        h.step(Event::ConnectionUp);
        h.step(Event::Error(error(false, None)));
        assert_eq!(h.core.state(), ChannelState::Suspended);
        h.now = h.core.deadline().unwrap().at;
        h.step(Event::Timeout);
        h.step(Event::Attached(attached("a", 0, 0, None)));
        h.publish(); // on the wire
        h.step(Event::ConnectionDown(lost()));
        h.publish(); // never sent
        h.step(Event::ConnectionUp);
        let got = answers(h.step(Event::Error(error(true, None))));
        assert_eq!(h.core.state(), ChannelState::Failed);
        assert!(matches!(
            &got[..],
            [
                (1, Err(ChannelError::Unconfirmed { seq: 1, .. })),
                (2, Err(ChannelError::Failed { .. })),
            ]
        ));
        assert!(matches!(
            &answers(h.publish())[..],
            [(3, Err(ChannelError::Failed { .. }))]
        ));
    }

    #[test]
    fn a_permanent_publish_error_rejects_that_publish_alone() {
        let mut h = Harness::subscriber();
        h.attached(0);
        h.publish();
        h.publish();
        let got = answers(h.step(Event::Error(error(true, Some(1)))));
        assert!(matches!(
            &got[..],
            [(1, Err(ChannelError::Rejected { seq: 1, .. }))]
        ));
        // A retryable one keeps it for the next connection.
        assert!(answers(h.step(Event::Error(error(false, Some(2))))).is_empty());
        assert_eq!(h.core.queued(), 1);
    }

    #[test]
    fn refusals_are_answered_at_once() {
        let mut h = Harness::new(ChannelOptions {
            max_message_size: 1,
            limits: BufferLimits {
                max_messages: 1,
                ..BufferLimits::default()
            },
            ..ChannelOptions::default()
        });
        h.publish();
        assert!(matches!(
            &answers(h.publish())[..],
            [(2, Err(ChannelError::QueueFull { messages: 1, .. }))]
        ));
        h.next_responder = 10;
        assert!(matches!(
            &answers(h.publish())[..],
            [(
                10,
                Err(ChannelError::PayloadTooLarge {
                    size: 2,
                    max: 1,
                    ..
                })
            )]
        ));
    }

    #[test]
    fn opaque_payloads_count_their_base64_length_against_the_size_limit() {
        let mut h = Harness::new(ChannelOptions {
            max_message_size: 8,
            ..ChannelOptions::default()
        });
        // 7 bytes of JSON fit; 7 opaque bytes take 12 in a v1 frame, and are refused at once.
        let json = h.step(Event::Publish {
            payload: Payload::from_json("1234567").unwrap(),
            responder: 1,
        });
        assert!(answers(json).is_empty(), "accepted, waiting for its ack");
        let opaque = h.step(Event::Publish {
            payload: Payload::from_bytes(vec![0u8; 7]),
            responder: 2,
        });
        assert!(matches!(
            &answers(opaque)[..],
            [(
                2,
                Err(ChannelError::PayloadTooLarge {
                    size: 12,
                    max: 8,
                    ..
                })
            )]
        ));
        let small = h.step(Event::Publish {
            payload: Payload::from_bytes(vec![0u8; 6]),
            responder: 3,
        });
        assert!(
            answers(small).is_empty(),
            "6 bytes are 8 in base64: accepted"
        );
    }

    #[test]
    fn the_evicting_policy_answers_what_it_evicts() {
        let mut h = Harness::new(ChannelOptions {
            limits: BufferLimits {
                max_messages: 2,
                overflow: OverflowPolicy::EvictOldestUnsent,
                ..BufferLimits::default()
            },
            ..ChannelOptions::default()
        });
        h.publish();
        h.publish();
        assert!(matches!(
            &answers(h.publish())[..],
            [(1, Err(ChannelError::Evicted { seq: 1, .. }))]
        ));
        assert_eq!(h.core.queued(), 2);
    }

    #[test]
    fn a_failed_transport_answers_everything_until_it_retries() {
        let mut h = Harness::subscriber();
        h.publish();
        let got = answers(h.step(Event::TransportFailed(lost())));
        assert!(matches!(&got[..], [(1, Err(ChannelError::Failed { .. }))]));
        assert!(matches!(
            &answers(h.publish())[..],
            [(2, Err(ChannelError::Failed { .. }))]
        ));
        h.step(Event::TransportRetrying);
        assert!(answers(h.publish()).is_empty());
    }

    #[test]
    fn a_detach_waits_for_the_hub_but_not_forever() {
        let mut h = Harness::subscriber();
        h.attached(0);
        h.publish();
        let actions = h.step(Event::Detach);
        assert!(matches!(&actions[0], Action::Send(Frame::Detach(_))));
        assert_eq!(h.core.state(), ChannelState::Detaching);
        assert!(matches!(
            &answers(h.publish())[..],
            [(2, Err(ChannelError::Detached { .. }))]
        ));
        h.now = h.core.deadline().unwrap().at;
        let actions = h.step(Event::Timeout);
        assert_eq!(
            transitions(&actions),
            [(ChannelState::Detached, ChannelReason::DetachTimedOut)]
        );
        assert!(matches!(
            &actions[1..],
            [
                Action::Answer {
                    responder: 1,
                    result: Err(ChannelError::Unconfirmed { .. })
                },
                Action::Unregister,
                Action::Stop,
            ]
        ));

        let mut h = Harness::subscriber();
        h.attached(0);
        h.step(Event::Detach);
        let actions = h.step(Event::Detached);
        assert!(matches!(&actions[1..], [Action::Unregister, Action::Stop]));
    }

    #[test]
    fn a_closed_transport_answers_everyone_and_stops() {
        let mut h = Harness::subscriber();
        h.attached(0);
        h.publish();
        let actions = h.step(Event::TransportClosed);
        assert_eq!(
            transitions(&actions),
            [(ChannelState::Detached, ChannelReason::TransportClosed)]
        );
        assert!(matches!(actions.last(), Some(Action::Stop)));
        assert_eq!(answers(actions).len(), 1);
    }

    #[test]
    fn a_failed_channel_stays_failed_across_reconnects_and_still_syncs() {
        let mut h = Harness::subscriber();
        h.step(Event::ConnectionUp);
        h.step(Event::Error(error(true, None)));
        h.step(Event::ConnectionDown(lost()));
        let actions = h.step(Event::ConnectionUp);
        assert!(attach_frame(&actions).is_none());
        assert!(matches!(&actions[..], [Action::Synced]));
    }

    /// The runs sent by `actions`, as (first seq, count).
    fn runs(actions: &[Action<u64>]) -> Vec<(u64, usize)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendPublishes(r) => Some((r.first_seq, r.payloads.len())),
                _ => None,
            })
            .collect()
    }

    /// Attached, publishes deferred to the next flush, at most `max_in_flight` on the wire.
    fn deferred_attached(max_in_flight: usize) -> Harness {
        let mut h = with_limits(BufferLimits {
            max_in_flight,
            ..BufferLimits::default()
        });
        h.core.defer_publishes(true);
        h.attached(0);
        h
    }

    fn with_limits(limits: BufferLimits) -> Harness {
        Harness::new(ChannelOptions {
            limits,
            ..ChannelOptions::default()
        })
    }

    #[test]
    fn deferred_publishes_leave_as_one_run_on_flush() {
        let mut h = Harness::subscriber();
        h.core.defer_publishes(true);
        h.attached(0);
        for _ in 0..5 {
            let actions = h.publish();
            assert!(runs(&actions).is_empty(), "a deferred publish waits");
            assert!(h.core.has_unflushed());
        }
        let actions = h.step(Event::Flush);
        assert_eq!(runs(&actions), [(1, 5)]);
        let Some(Action::SendPublishes(run)) = actions.first() else {
            panic!("{actions:?}")
        };
        assert_eq!(run.channel, "c");
        assert_eq!(run.payloads, (1..=5).map(p).collect::<Vec<_>>());
        assert!(!h.core.has_unflushed());
        assert!(runs(&h.step(Event::Flush)).is_empty(), "nothing twice");
    }

    #[test]
    fn any_other_event_sends_the_deferred_publishes_before_its_own_frames() {
        let mut h = Harness::subscriber();
        h.core.defer_publishes(true);
        h.attached(0);
        h.publish();
        h.publish();
        let actions = h.step(Event::Detach);
        let sent: Vec<&str> = actions
            .iter()
            .filter_map(|a| match a {
                Action::SendPublishes(_) => Some("publishes"),
                Action::Send(f) => Some(f.kind()),
                _ => None,
            })
            .collect();
        assert_eq!(sent, ["publishes", "detach"]);
        assert_eq!(runs(&actions), [(1, 2)]);
    }

    #[test]
    fn turning_deferral_off_sends_what_waits() {
        let mut h = Harness::subscriber();
        h.core.defer_publishes(true);
        h.attached(0);
        h.publish();
        h.core.defer_publishes(false);
        assert_eq!(runs(&h.core.drain_actions().collect::<Vec<_>>()), [(1, 1)]);
        // Undeferred, each publish is a run of one at once.
        assert_eq!(runs(&h.publish()), [(2, 1)]);
    }

    #[test]
    fn runs_end_at_the_in_flight_window_and_the_next_goes_after_acks() {
        let mut h = deferred_attached(4);
        for _ in 0..10 {
            h.publish();
        }
        assert_eq!(runs(&h.step(Event::Flush)), [(1, 4)]);
        let actions = h.step(Event::AckRange {
            first_seq: 1,
            count: 3,
            first_offset: Some(Offset(1)),
            epoch: Some(e("a")),
            duplicate: false,
        });
        assert_eq!(runs(&actions), [(5, 3)]);
        assert_eq!(answers(actions).len(), 3);
    }

    #[test]
    fn runs_are_cut_at_the_byte_limit_and_the_length_limit() {
        let mut h = with_limits(BufferLimits {
            max_messages: 2 * MAX_RUN_LEN + 10,
            max_in_flight: 2 * MAX_RUN_LEN + 10,
            ..BufferLimits::default()
        });
        h.core.defer_publishes(true);
        h.attached(0);
        for _ in 0..2 * MAX_RUN_LEN + 10 {
            h.publish();
        }
        let actions = h.step(Event::Flush);
        let cut = runs(&actions);
        assert_eq!(
            cut,
            [
                (1, MAX_RUN_LEN),
                (MAX_RUN_LEN as u64 + 1, MAX_RUN_LEN),
                (2 * MAX_RUN_LEN as u64 + 1, 10)
            ]
        );

        // Payloads of 20 KiB: three fit in 64 KiB with the header, the fourth starts a run.
        let mut h = Harness::subscriber();
        h.core.defer_publishes(true);
        h.attached(0);
        let big = Payload::from_json(&format!("\"{}\"", "x".repeat(20 * 1024 - 2))).unwrap();
        for n in 0..7 {
            h.step(Event::Publish {
                payload: big.clone(),
                responder: n,
            });
        }
        let actions = h.step(Event::Flush);
        assert_eq!(runs(&actions), [(1, 3), (4, 3), (7, 1)]);
        for action in &actions {
            if let Action::SendPublishes(r) = action {
                let len = v2::Record::Publish(r.clone()).encoded_len();
                assert!(len <= MAX_RUN_BYTES, "a run of {len} bytes");
            }
        }
    }

    #[test]
    fn a_replay_after_a_reconnect_goes_as_runs_before_anything_new() {
        let mut h = Harness::subscriber();
        h.core.defer_publishes(true);
        h.attached(0);
        h.publish();
        h.publish();
        assert_eq!(runs(&h.step(Event::Flush)), [(1, 2)]);
        h.step(Event::ConnectionDown(lost()));
        h.publish();
        assert!(runs(&h.step(Event::Flush)).is_empty(), "nothing while down");
        h.step(Event::ConnectionUp);
        let actions = h.step(Event::Attached(attached("a", 0, 0, None)));
        assert_eq!(runs(&actions), [(1, 3)]);
    }

    #[test]
    fn small_payloads_share_chunks_that_go_when_nothing_waits() {
        let mut h = Harness::subscriber();
        h.core.defer_publishes(true);
        h.attached(0);
        let big = Payload::from_bytes(vec![7u8; ARENA_MAX_PAYLOAD + 1]);
        let big_at = big.as_bytes().as_ptr();
        for n in 1..=3u64 {
            h.step(Event::Publish {
                payload: p(n),
                responder: n,
            });
        }
        h.step(Event::Publish {
            payload: big.clone(),
            responder: 4,
        });
        let actions = h.step(Event::Flush);
        let Some(Action::SendPublishes(run)) = actions.first() else {
            panic!("{actions:?}");
        };
        // The same bytes, the small ones side by side in one chunk; the large one its own.
        assert_eq!(run.payloads[..3], [p(1), p(2), p(3)]);
        for pair in run.payloads[..3].windows(2) {
            let end = pair[0].as_bytes().as_ptr().wrapping_add(pair[0].len());
            assert_eq!(pair[1].as_bytes().as_ptr(), end);
        }
        assert_eq!(run.payloads[3].as_bytes().as_ptr(), big_at);
        assert_eq!(run.payloads[3], big);
        assert!(h.core.arena.capacity() > 0);
        // A chunk is twice what waits, within its bounds.
        assert!(h.core.arena.capacity() < ARENA_CHUNK);
        // Acked but for one: the chunk stays; all acked: the channel holds none.
        h.step(Event::AckRange {
            first_seq: 1,
            count: 3,
            first_offset: Some(Offset(1)),
            epoch: Some(e("a")),
            duplicate: false,
        });
        assert!(h.core.arena.capacity() > 0);
        h.step(Event::Ack(ack(4, 4)));
        assert_eq!(h.core.arena.capacity(), 0);
    }

    #[test]
    fn acks_in_order_release_chunks_and_move_no_payload() {
        let mut h = deferred_attached(4096);
        for n in 1..=1000u64 {
            h.step(Event::Publish {
                payload: Payload::from_bytes(vec![b'x'; 1000]),
                responder: n,
            });
        }
        h.step(Event::Flush);
        for start in (1..=1000u64).step_by(100) {
            h.step(Event::AckRange {
                first_seq: start,
                count: 100,
                first_offset: None,
                epoch: None,
                duplicate: false,
            });
            if h.core.outbox.is_empty() {
                break;
            }
            // The chunks left are those still holding a queued payload (the trim, which moves
            // payloads to buffers of their own, never fires for acks in order).
            let held: usize = h.core.chunks.iter().map(|&(_, size)| size).sum();
            assert!(!h.core.chunks.is_empty(), "after {start}");
            assert!(
                held <= h.core.outbox.bytes() + 2 * ARENA_CHUNK,
                "after {start}: {held}"
            );
        }
        assert!(h.core.chunks.is_empty());
    }

    #[test]
    fn acks_out_of_order_cannot_make_the_chunks_outgrow_twice_the_queue() {
        let mut h = deferred_attached(4096);
        let held = |h: &Harness| h.core.chunks.iter().map(|&(_, size)| size).sum::<usize>();
        let payload = || Payload::from_bytes(vec![b'x'; 1000]);
        let mut next = 1u64;
        for round in 0..4 {
            for _ in 0..512 {
                h.step(Event::Publish {
                    payload: payload(),
                    responder: next,
                });
                next += 1;
                assert!(
                    held(&h) <= 2 * h.core.outbox.bytes() + 2 * ARENA_CHUNK,
                    "round {round}: {} held for {} queued",
                    held(&h),
                    h.core.outbox.bytes()
                );
            }
            h.step(Event::Flush);
            // The hub acks all but one publish in every 64: each of those holds a chunk.
            let first = next - 512;
            for start in (first..next).step_by(64) {
                h.step(Event::AckRange {
                    first_seq: start + 1,
                    count: 63,
                    first_offset: None,
                    epoch: None,
                    duplicate: false,
                });
            }
            assert!(
                held(&h) <= 2 * h.core.outbox.bytes() + 2 * ARENA_CHUNK,
                "round {round}: {} held for {} queued",
                held(&h),
                h.core.outbox.bytes()
            );
            // What is left went to buffers of its own, and publishing takes chunks again.
            assert!(h.core.chunks.is_empty(), "round {round}");
        }
        // Every payload is still there, in order, whichever buffer holds it.
        let actions = h.step(Event::ConnectionDown(lost()));
        drop(actions);
        h.step(Event::ConnectionUp);
        let replay = h.step(Event::Attached(attached("a", 0, 0, None)));
        let replayed: Vec<u64> = replay
            .iter()
            .filter_map(|a| match a {
                Action::SendPublishes(r) => Some(r),
                _ => None,
            })
            .flat_map(|r| {
                assert!(r.payloads.iter().all(|p| *p == payload()));
                (r.first_seq..).take(r.payloads.len())
            })
            .collect();
        let kept: Vec<u64> = (1..next).step_by(64).collect();
        assert_eq!(replayed, kept);
    }

    #[test]
    fn what_goes_out_again_is_counted_as_replayed_once_per_send() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let mut h = metrics::with_local_recorder(&recorder, Harness::subscriber);
        let replayed = || {
            let text = handle.render();
            text.lines()
                .find(|l| l.starts_with(crate::telemetry::PUBLISH_REPLAYED))
                .map(str::to_owned)
        };
        h.core.defer_publishes(true);
        h.attached(0);
        h.publish();
        h.publish();
        assert_eq!(runs(&h.step(Event::Flush)), [(1, 2)]);
        assert_eq!(
            replayed().as_deref(),
            Some("tether_publish_replayed_total 0")
        );
        for round in 1..=2 {
            h.step(Event::ConnectionDown(lost()));
            h.step(Event::ConnectionUp);
            let actions = h.step(Event::Attached(attached("a", 0, 0, None)));
            assert_eq!(runs(&actions), [(1, 2)]);
            let expected = format!("tether_publish_replayed_total {}", 2 * round);
            assert_eq!(replayed(), Some(expected));
        }
    }
}
