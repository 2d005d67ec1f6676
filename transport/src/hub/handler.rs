//! The hub's extension point for frames beyond the handshake: the channels layer plugs in here.
//!
//! A [`SessionHandler`] is shared by the whole hub; for each connection that completes its
//! handshake it opens one [`ConnectionHandler`], which lives inside that connection's session
//! actor and sees every later frame in order. Frames go back through the connection's
//! [`SessionOutbox`], charged to the connection's [`OutboundBudget`] in bytes: a connection
//! that cannot keep up is closed (it resumes from history when it returns), never allowed to
//! grow the hub's memory; replays wait for room instead ([`SessionOutbox::reserve_replay`]).

use std::sync::Arc;

use actix::{Message, Recipient};
use bytestring::ByteString;

use super::auth::Identity;
use super::budget::{DrainWaker, OutboundBudget};

use crate::error::TransportError;
use crate::protocol::{ClientId, Frame, InstanceId, SessionId};

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

/// An encoded frame for a connection (encoded once, possibly shared by many connections).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Outbound {
    /// The frame's JSON text.
    pub text: ByteString,
    /// When this frame answers a publish (its ack, or an error about it): the payload bytes of
    /// that publish, for the connection's in-flight accounting.
    pub completes_publish: Option<usize>,
}

/// Several encoded frames for a connection, written in order, taking one mailbox slot (a page
/// of a replay, or one fan-out of several messages).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct OutboundBatch {
    /// The frames' JSON texts, in order.
    pub texts: Vec<ByteString>,
}

/// Closes a connection with a typed error (slow consumer, overload).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Kick(pub TransportError);

/// The sending side of one connection.
#[derive(Clone)]
pub struct SessionOutbox {
    conn_id: u64,
    frames: Recipient<Outbound>,
    batches: Recipient<OutboundBatch>,
    kick: Recipient<Kick>,
    budget: Arc<OutboundBudget>,
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
    /// An outbox over a session actor's recipients.
    pub fn new(
        conn_id: u64,
        frames: Recipient<Outbound>,
        batches: Recipient<OutboundBatch>,
        kick: Recipient<Kick>,
        budget: Arc<OutboundBudget>,
    ) -> Self {
        SessionOutbox {
            conn_id,
            frames,
            batches,
            kick,
            budget,
        }
    }

    /// The connection this outbox writes to.
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// Queues a frame. `Err(OutboxFull)` when it does not fit the connection's outbound budget
    /// (or its mailbox); the caller should [`SessionOutbox::kick`] it. A closed connection is
    /// not an error: there is nobody left to tell.
    pub fn send(&self, out: Outbound) -> Result<(), OutboxFull> {
        let bytes = out.text.len();
        if !self.budget.try_charge(bytes) {
            return Err(OutboxFull);
        }
        let sent = self.frames.try_send(out);
        self.settle(sent, bytes)
    }

    /// What a mailbox send of `bytes` already charged comes to: a frame the mailbox did not
    /// take gives its bytes back; a closed connection is not an error.
    fn settle<M>(
        &self,
        sent: Result<(), actix::dev::SendError<M>>,
        bytes: usize,
    ) -> Result<(), OutboxFull> {
        match sent {
            Ok(()) => Ok(()),
            Err(actix::dev::SendError::Closed(_)) => {
                self.budget.release(bytes);
                Ok(())
            }
            Err(actix::dev::SendError::Full(_)) => {
                self.budget.release(bytes);
                Err(OutboxFull)
            }
        }
    }

    /// Queues several frames as one batch (same budget, one mailbox slot).
    pub fn send_batch(&self, texts: Vec<ByteString>) -> Result<(), OutboxFull> {
        let bytes: usize = texts.iter().map(|t| t.len()).sum();
        if !self.budget.try_charge(bytes) {
            return Err(OutboxFull);
        }
        self.send_charged_batch(texts, bytes)
    }

    fn send_charged_batch(&self, texts: Vec<ByteString>, bytes: usize) -> Result<(), OutboxFull> {
        let sent = self.batches.try_send(OutboundBatch { texts });
        self.settle(sent, bytes)
    }

    /// Reserves about `bytes` of the connection's replay share (half its budget) before a
    /// replay or catch-up page is read. `None` when the share is taken: `waker` then runs once
    /// the connection's socket has drained enough (or the connection is gone), and the caller
    /// tries again. A page larger than the share goes alone on an otherwise idle connection.
    pub fn reserve_replay(&self, bytes: usize, waker: DrainWaker) -> Option<ReplayReservation> {
        let bytes = bytes.max(1);
        if self.budget.try_reserve_replay(bytes, waker) {
            Some(ReplayReservation {
                budget: self.budget.clone(),
                bytes,
            })
        } else {
            None
        }
    }

    /// The largest page worth reserving: the connection's replay share.
    pub fn replay_share(&self) -> usize {
        self.budget.replay_limit()
    }

    /// Queues a replay page paid for by `reservation` (what the page's frames add beyond it is
    /// charged; what they leave is given back).
    pub fn send_replay(
        &self,
        texts: Vec<ByteString>,
        reservation: ReplayReservation,
    ) -> Result<(), OutboxFull> {
        let bytes: usize = texts.iter().map(|t| t.len()).sum();
        reservation.settle(bytes);
        self.send_charged_batch(texts, bytes)
    }

    /// Bytes queued for this connection and not yet written to its socket.
    pub fn pending_bytes(&self) -> usize {
        self.budget.pending()
    }

    /// Closes the connection with `error` (sent as an error frame first).
    pub fn kick(&self, error: TransportError) {
        self.kick.do_send(Kick(error));
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.frames.connected() && !self.budget.is_closed()
    }
}

impl std::fmt::Debug for SessionOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionOutbox")
            .field("conn_id", &self.conn_id)
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
}

/// Serves one connection's frames, in order, on the connection's own actor.
pub trait ConnectionHandler: 'static {
    /// A frame other than the handshake arrived. An error is sent to the client as an error
    /// frame and, when permanent for the connection (`closes` true), the connection is closed.
    fn on_frame(&mut self, frame: Frame) -> Result<(), FrameRejection>;

    /// Whether the connection should go on reading its socket. `false` (for example: too many
    /// publish bytes awaiting their acks) stops reading — TCP backpressure on the client —
    /// until a frame written to it (an ack) makes this `true` again. Default: always.
    fn wants_input(&self) -> bool {
        true
    }

    /// A frame is about to be written to the client.
    fn on_outbound(&mut self, _out: &Outbound) {}

    /// The connection is gone.
    fn on_close(&mut self);
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
