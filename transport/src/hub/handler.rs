//! The hub's extension point for frames beyond the handshake: the channels layer plugs in here.
//!
//! A [`SessionHandler`] is shared by the whole hub; for each connection that completes its
//! handshake it opens one [`ConnectionHandler`], which lives inside that connection's session
//! actor and sees every later frame in order. Frames go back through the connection's
//! [`SessionOutbox`], charged to the connection's [`OutboundBudget`] in bytes: a connection
//! that cannot keep up is closed (it resumes from history when it returns), never allowed to
//! grow the hub's memory; replays wait for room instead ([`SessionOutbox::reserve_replay`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::{Message, Recipient};
use bytes::{Bytes, BytesMut};

use futures::future::LocalBoxFuture;

use super::admin::{AdminPeers, ChannelDetail, ChannelPage, SessionChannel};
use super::auth::Identity;
use super::budget::{DrainWaker, OutboundBudget};
use super::wire::{InboundGate, OutboundPipe, Outgoing};

use crate::error::TransportError;
use crate::protocol::{v2, ClientId, Frame, InstanceId, SessionId};

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Hub-unique id of this physical connection.
    pub conn_id: u64,
    /// Who the client is, as the hub's authenticator established it: what authorization
    /// decisions should rest on (the client id, instance and session are the client's say).
    /// The connection's session and publishes belong to it.
    pub identity: Identity,
    /// The client's id from its hello (not verified: any client may present any id).
    pub client_id: ClientId,
    /// The client's instance id from its hello (required for publishing).
    pub instance: Option<InstanceId>,
    /// The session this connection owns.
    pub session: SessionId,
}

/// A frame encoded for one protocol version: encoded once, shared by every connection that
/// speaks that version (see [`SessionOutbox::version`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Wire {
    /// The JSON text of one v1 frame.
    Text(Bytes),
    /// One or more v2 records (written together with the records queued beside them, in one
    /// binary WebSocket frame).
    Records(Bytes),
    /// A v2 message run as its parts, shared by every subscriber it goes to: its payloads are
    /// copied once, into each socket's write buffer (it rides in a binary frame as
    /// [`Wire::Records`] do).
    Run(v2::SharedMessageRun),
}

impl Wire {
    /// `frame` in protocol `version`: v1 JSON text, or a v2 record.
    pub fn encode(frame: &Frame, version: u16) -> Wire {
        if version >= 2 {
            let record = match frame {
                Frame::Ack(a) => v2::Record::Ack(v2::AckRun {
                    channel: a.channel.clone(),
                    first_seq: a.seq,
                    count: 1,
                    duplicate: a.duplicate,
                    stored: a.offset.zip(a.epoch.clone()).map(|(o, e)| (e, o)),
                }),
                Frame::Message(m) => {
                    let mut buf = BytesMut::new();
                    v2::encode_messages(
                        &mut buf,
                        &m.channel,
                        &m.epoch,
                        m.offset,
                        std::iter::once(&m.payload),
                    );
                    return Wire::Records(buf.freeze());
                }
                other => v2::Record::Control(other.clone()),
            };
            let mut buf = BytesMut::new();
            v2::encode(&record, &mut buf);
            Wire::Records(buf.freeze())
        } else {
            Wire::Text(Bytes::from(frame.encode()))
        }
    }

    /// Encoded size in bytes (what it is charged to a connection's budget).
    pub fn len(&self) -> usize {
        match self {
            Wire::Text(b) | Wire::Records(b) => b.len(),
            Wire::Run(run) => run.len(),
        }
    }

    /// Whether it is empty (never, for an encoded frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn into_outgoing(self) -> Outgoing {
        match self {
            Wire::Text(b) => Outgoing::Text(b),
            Wire::Records(b) => Outgoing::Records(b),
            Wire::Run(run) => Outgoing::Run(run),
        }
    }
}

/// An encoded frame for a connection.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The frame, in the connection's protocol version.
    pub wire: Wire,
    /// When this frame answers publishes (their acks, or an error about one): how many, and
    /// their payload bytes, for the connection's in-flight accounting.
    pub completes: Option<Completes>,
}

/// Publishes a frame answers (see [`Outbound::completes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completes {
    /// How many publishes.
    pub publishes: usize,
    /// Their payload bytes.
    pub bytes: usize,
}

/// Closes a connection with a typed error (slow consumer, overload).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Kick(pub TransportError);

/// A connection's publishes awaiting their acks, shared by its session (which stops reading
/// the socket past the limit) and its outbox handles (whose acks bring it back under).
#[derive(Debug)]
struct InFlight {
    publishes: AtomicUsize,
    bytes: AtomicUsize,
    max_bytes: AtomicUsize,
    gate: InboundGate,
}

/// The sending side of one connection. Frames go straight into the connection's outbound
/// queue (no hop through the session actor): from a channel thread, a frame crosses one
/// thread boundary to reach the socket.
///
/// Cloning one is a reference count: a channel keeps one per publish awaiting its ack.
#[derive(Clone)]
pub struct SessionOutbox {
    shared: Arc<OutboxShared>,
    /// Whose connection it is (client id and session), for the admin API.
    owner: Option<Arc<(ClientId, SessionId)>>,
}

/// What every clone of a [`SessionOutbox`] shares.
struct OutboxShared {
    conn_id: u64,
    version: u16,
    pipe: OutboundPipe,
    kick: Recipient<Kick>,
    budget: Arc<OutboundBudget>,
    in_flight: InFlight,
}

/// The connection's outbound budget (or mailbox) is full: it is not reading fast enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxFull;

/// Bytes of a connection's budget held for one replay page, taken before the page is read
/// ([`SessionOutbox::reserve_replay`]); given back when dropped unused.
pub struct ReplayReservation {
    budget: Arc<OutboundBudget>,
    bytes: usize,
}

impl ReplayReservation {
    /// The bytes reserved (read at most about this much).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Turns the reservation into the charge of `actual` bytes of frames.
    fn settle(self, actual: usize) {
        if actual > self.bytes {
            self.budget.charge(actual - self.bytes);
        } else {
            self.budget.release(self.bytes - actual);
        }
        std::mem::forget(self);
    }
}

impl Drop for ReplayReservation {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl std::fmt::Debug for ReplayReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayReservation")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl SessionOutbox {
    /// An outbox writing into a connection's `pipe`, speaking protocol `version`, kicking
    /// through `kick`, pausing its reading through `gate`.
    pub fn new(
        conn_id: u64,
        version: u16,
        pipe: OutboundPipe,
        kick: Recipient<Kick>,
        budget: Arc<OutboundBudget>,
        gate: InboundGate,
    ) -> Self {
        SessionOutbox {
            shared: Arc::new(OutboxShared {
                conn_id,
                version,
                pipe,
                kick,
                budget,
                in_flight: InFlight {
                    publishes: AtomicUsize::new(0),
                    bytes: AtomicUsize::new(0),
                    max_bytes: AtomicUsize::new(usize::MAX),
                    gate,
                },
            }),
            owner: None,
        }
    }

    /// The same outbox, labelled as the connection of `client_id` owning `session` (what the
    /// admin API shows of a channel's subscribers).
    pub fn owned_by(mut self, client_id: ClientId, session: SessionId) -> Self {
        self.owner = Some(Arc::new((client_id, session)));
        self
    }

    /// The client id and session of the connection, when labelled
    /// ([`SessionOutbox::owned_by`]).
    pub fn owner(&self) -> Option<(&ClientId, &SessionId)> {
        self.owner.as_deref().map(|(c, s)| (c, s))
    }

    /// The connection this outbox writes to.
    pub fn conn_id(&self) -> u64 {
        self.shared.conn_id
    }

    /// The protocol version the connection speaks (1: JSON text, 2: binary records).
    pub fn version(&self) -> u16 {
        self.shared.version
    }

    /// `frame` encoded for this connection.
    pub fn encode(&self, frame: &Frame) -> Wire {
        Wire::encode(frame, self.shared.version)
    }

    /// Queues a frame. `Err(OutboxFull)` when it does not fit the connection's outbound budget;
    /// the caller should [`SessionOutbox::kick`] it. A closed connection is not an error: there
    /// is nobody left to tell.
    pub fn send(&self, out: Outbound) -> Result<(), OutboxFull> {
        if let Some(done) = out.completes {
            // Answered, whether or not the answer fits: the publishes are no longer in flight.
            self.publishes_done(done);
        }
        let bytes = out.wire.len();
        if !self.shared.budget.try_charge(bytes) {
            return Err(OutboxFull);
        }
        self.shared.pipe.push_item(out.wire.into_outgoing(), bytes);
        Ok(())
    }

    /// Queues several frames (one budget charge).
    pub fn send_batch(&self, frames: Vec<Wire>) -> Result<(), OutboxFull> {
        let bytes: usize = frames.iter().map(Wire::len).sum();
        if !self.shared.budget.try_charge(bytes) {
            return Err(OutboxFull);
        }
        self.push_charged(frames);
        Ok(())
    }

    fn push_charged(&self, frames: Vec<Wire>) {
        for wire in frames {
            let bytes = wire.len();
            self.shared.pipe.push_item(wire.into_outgoing(), bytes);
        }
    }

    /// Reserves about `bytes` of the connection's replay share (half its budget) before a
    /// replay or catch-up page is read. `None` when the share is taken: `waker` then runs once
    /// the connection's socket has drained enough (or the connection is gone), and the caller
    /// tries again. A page larger than the share goes alone on an otherwise idle connection.
    pub fn reserve_replay(&self, bytes: usize, waker: DrainWaker) -> Option<ReplayReservation> {
        let bytes = bytes.max(1);
        if self.shared.budget.try_reserve_replay(bytes, waker) {
            Some(ReplayReservation {
                budget: self.shared.budget.clone(),
                bytes,
            })
        } else {
            None
        }
    }

    /// The largest page worth reserving: the connection's replay share.
    pub fn replay_share(&self) -> usize {
        self.shared.budget.replay_limit()
    }

    /// Queues a replay page paid for by `reservation` (what the page's frames add beyond it is
    /// charged; what they leave is given back).
    pub fn send_replay(
        &self,
        frames: Vec<Wire>,
        reservation: ReplayReservation,
    ) -> Result<(), OutboxFull> {
        let bytes: usize = frames.iter().map(Wire::len).sum();
        reservation.settle(bytes);
        self.push_charged(frames);
        Ok(())
    }

    /// Bytes queued for this connection and not yet written to its socket.
    pub fn pending_bytes(&self) -> usize {
        self.shared.budget.pending()
    }

    /// Closes the connection with `error` (sent as an error frame first).
    pub fn kick(&self, error: TransportError) {
        self.shared.kick.do_send(Kick(error));
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.shared.kick.connected() && !self.shared.budget.is_closed()
    }

    /// The most payload bytes of publishes awaiting acks before the connection's socket stops
    /// being read (TCP backpressure on the client). Default: no limit.
    pub fn limit_in_flight(&self, max_bytes: usize) {
        self.shared
            .in_flight
            .max_bytes
            .store(max_bytes, Ordering::SeqCst);
    }

    /// Publishes of `bytes` payload bytes went to a channel and await their acks.
    pub fn publishes_started(&self, publishes: usize, bytes: usize) {
        self.shared
            .in_flight
            .publishes
            .fetch_add(publishes, Ordering::SeqCst);
        self.shared
            .in_flight
            .bytes
            .fetch_add(bytes, Ordering::SeqCst);
    }

    fn publishes_done(&self, done: Completes) {
        let sub = |counter: &AtomicUsize, n: usize| {
            let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(n))
            });
        };
        sub(&self.shared.in_flight.publishes, done.publishes);
        sub(&self.shared.in_flight.bytes, done.bytes);
        if self.in_flight_bytes() < self.shared.in_flight.max_bytes.load(Ordering::SeqCst)
            && self.shared.in_flight.gate.is_paused()
        {
            self.shared.in_flight.gate.resume();
        }
    }

    /// Publishes awaiting their acks.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.publishes.load(Ordering::SeqCst)
    }

    /// Payload bytes of the publishes awaiting their acks.
    pub fn in_flight_bytes(&self) -> usize {
        self.shared.in_flight.bytes.load(Ordering::SeqCst)
    }

    /// Whether the connection's in-flight publish bytes are under the limit.
    pub fn wants_input(&self) -> bool {
        self.in_flight_bytes() < self.shared.in_flight.max_bytes.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for SessionOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionOutbox")
            .field("conn_id", &self.shared.conn_id)
            .finish_non_exhaustive()
    }
}

/// Whether a handler can serve (for the hub's `/health`).
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerHealth {
    /// `false` turns the hub's `/health` into `unhealthy` (HTTP 503).
    pub healthy: bool,
    /// What the handler reports about itself (its store, and why it is unhealthy).
    pub detail: serde_json::Value,
}

impl Default for HandlerHealth {
    fn default() -> Self {
        HandlerHealth {
            healthy: true,
            detail: serde_json::Value::Null,
        }
    }
}

/// Serves the frames of every connection of a hub. Implemented by the channels layer.
pub trait SessionHandler: Send + Sync + 'static {
    /// Whether the handler can serve. Default: healthy, no detail.
    fn health(&self) -> HandlerHealth {
        HandlerHealth::default()
    }

    /// A connection completed its handshake: returns the handler for its frames.
    fn open(&self, conn: ConnInfo, outbox: SessionOutbox) -> Box<dyn ConnectionHandler>;

    /// For the admin API's `GET /channels`: up to `limit` of this node's channels named after
    /// `after` (from the first when `None`), by name. Default: none.
    fn admin_channels(
        &self,
        _after: Option<String>,
        _limit: usize,
    ) -> LocalBoxFuture<'static, ChannelPage> {
        Box::pin(async { ChannelPage::default() })
    }

    /// For the admin API's `GET /channels/{name}`: the channel as this node sees it, `None`
    /// when it has no actor for it here. Default: `None`.
    fn admin_channel(&self, _name: String) -> LocalBoxFuture<'static, Option<ChannelDetail>> {
        Box::pin(async { None })
    }

    /// Where the hub nodes sharing this handler's store find each other, so that each node's
    /// admin API answers for all of them. Default: `None` (a single node).
    fn admin_peers(&self) -> Option<Arc<dyn AdminPeers>> {
        None
    }
}

/// Serves one connection's frames, in order, on the connection's own actor.
pub trait ConnectionHandler: 'static {
    /// A frame other than the handshake arrived. An error is sent to the client as an error
    /// frame and, when permanent for the connection (`closes` true), the connection is closed.
    fn on_frame(&mut self, frame: Frame) -> Result<(), FrameRejection>;

    /// A v2 run of publishes on one channel. Default: each publish through
    /// [`ConnectionHandler::on_frame`], in order, stopping at the first refused.
    fn on_publish_run(&mut self, run: v2::PublishRun) -> Result<(), FrameRejection> {
        for frame in v2::Record::Publish(run).into_frames() {
            self.on_frame(frame)?;
        }
        Ok(())
    }

    /// Whether the connection should go on reading its socket. `false` (for example: too many
    /// publish bytes awaiting their acks) stops reading — TCP backpressure on the client —
    /// until a frame written to it (an ack) makes this `true` again. Default: always.
    fn wants_input(&self) -> bool {
        true
    }

    /// The connection is gone.
    fn on_close(&mut self);

    /// For the admin API: the channels this connection has attached, with their offsets.
    /// Default: none.
    fn admin_channels(&self) -> LocalBoxFuture<'static, Vec<SessionChannel>> {
        Box::pin(async { Vec::new() })
    }

    /// For the admin API: this connection's publishes awaiting their acks. Default: 0.
    fn publishes_in_flight(&self) -> usize {
        0
    }
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameRejection {
    /// The error, sent as an error frame.
    pub error: TransportError,
    /// The channel and publish sequence it concerns, echoed in the error frame.
    pub about: Option<(String, Option<u64>)>,
    /// Whether the connection must be closed after it.
    pub closes: bool,
}

/// The handler of a hub that serves no channels: every channel frame is refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoChannels;

impl SessionHandler for NoChannels {
    fn open(&self, _conn: ConnInfo, _outbox: SessionOutbox) -> Box<dyn ConnectionHandler> {
        Box::new(NoChannels)
    }
}

impl ConnectionHandler for NoChannels {
    fn on_frame(&mut self, frame: Frame) -> Result<(), FrameRejection> {
        Err(FrameRejection {
            error: TransportError::UnexpectedFrame {
                expected: "no channel frames (this hub serves no channels)",
                got: frame.kind().to_owned(),
            },
            about: None,
            closes: true,
        })
    }

    fn on_close(&mut self) {}
}
