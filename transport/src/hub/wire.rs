//! The hub's WebSocket I/O under each session actor, on actix-http's WebSocket codec, once the
//! connection has left actix-http's HTTP dispatcher (see `Hub::start`).
//!
//! The session actor is driven by its own mailbox and timers, never by the socket: what
//! actix-web-actors could not do (its context is polled by the response body, so a peer that
//! stops reading froze the actor, its kick and its idle timer). The pieces:
//!
//! * [`FrameGuard`] reads every WebSocket frame *header* as the bytes arrive and refuses a frame
//!   whose declared length exceeds the limit before its payload is buffered (actix-http's codec
//!   checks only once the whole frame is in memory). A connection sending one costs at most the
//!   frame limit plus one read.
//! * [`SocketReader`] reads the socket into a buffer on the stack between frames, and straight
//!   into the frame's buffer while one is under way; [`Inbound`] turns those bytes into frames
//!   through the guard and the codec. Neither keeps a buffer while the connection is idle.
//! * [`OutboundPipe`] is a queue of frames charged to the connection's [`OutboundBudget`] until
//!   the [`Writer`] takes them (framing them then, into a buffer that exists only while there is
//!   something to write), with a record of when the writer last made progress.
//!
//! Memory of an idle connection is thus a few small structures (session, pipe, budget, the
//! actor's mailbox and timers); no I/O buffer.
//!
//! [`ConnSocket`] is a handle on the connection's TCP socket (through the [`Guarded`] stream
//! that owns it, without a descriptor of its own), taken when it is upgraded: it lets the session end a connection whose peer never reads again (a reset, at
//! the TCP level, which a writer blocked in a write cannot do) and shut one down right
//! after the close handshake.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::protocol::v2::SharedMessageRun;
use actix_codec::{Decoder, Encoder};
use actix_http::ws::{Codec, Frame, Message, ProtocolError};
use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::budget::OutboundBudget;

/// Why the inbound stream ended with an error.
#[derive(Debug)]
pub enum InboundError {
    /// A frame header declared more than the limit (the payload was not read).
    TooLarge {
        /// The declared payload length (for a fragmented message: the total so far).
        declared: u64,
        /// The limit.
        max: usize,
    },
    /// Not a valid WebSocket frame (bad opcode, unmasked, bad control frame…).
    Protocol(ProtocolError),
    /// The connection failed under the stream.
    Io(String),
}

/// A header declared more than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversize {
    /// The declared payload length (for a fragmented message: the total so far).
    pub declared: u64,
    /// Bytes of the fed chunk before the offending header.
    pub before: usize,
}

/// Reads WebSocket frame headers as the bytes go by (RFC 6455 §5.2), without keeping payloads:
/// pure, incremental, and checked before a single payload byte is buffered.
#[derive(Debug, Clone)]
pub struct FrameGuard {
    max: usize,
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
    /// Declared bytes of the fragmented message under way (`None`: none is).
    fragmented: Option<u64>,
}

impl FrameGuard {
    /// A guard refusing frames (and fragmented messages) over `max` payload bytes.
    pub fn new(max: usize) -> Self {
        FrameGuard {
            max,
            header: [0; 14],
            have: 0,
            skip: 0,
            fragmented: None,
        }
    }

    /// Feeds the next bytes of the stream. `Err` as soon as a header declares a frame (or a
    /// fragmented message) over the limit; it says how many leading bytes of `bytes` belong to
    /// frames before that header (they may still be served).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), Oversize> {
        let mut pos = 0;
        let mut header_start = 0;
        while pos < bytes.len() {
            if self.skip > 0 {
                let n = ((bytes.len() - pos) as u64).min(self.skip);
                self.skip -= n;
                pos += n as usize;
                continue;
            }
            if self.have == 0 {
                header_start = pos;
            }
            // Collect the header: 2 bytes, then as many as the length and mask need.
            let need = self.header_len();
            let take = (need - self.have).min(bytes.len() - pos);
            self.header[self.have..self.have + take].copy_from_slice(&bytes[pos..pos + take]);
            self.have += take;
            pos += take;
            if self.have < self.header_len() {
                continue; // the length byte may have asked for more
            }
            if let Err(declared) = self.on_header() {
                return Err(Oversize {
                    declared,
                    before: header_start,
                });
            }
        }
        Ok(())
    }

    /// Payload bytes of the current frame not seen yet (0 between frames).
    pub fn pending(&self) -> u64 {
        self.skip
    }

    fn header_len(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let masked = self.header[1] & 0x80 != 0;
        let ext = match self.header[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if masked { 4 } else { 0 }
    }

    fn on_header(&mut self) -> Result<(), u64> {
        let first = self.header[0];
        let len = match self.header[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        };
        self.have = 0;
        let fin = first & 0x80 != 0;
        let opcode = first & 0x0F;
        let control = opcode & 0x08 != 0;
        if !control {
            // Data frames: a continuation adds to the message under way; a text or binary
            // frame starts one.
            let total = match (opcode, self.fragmented) {
                (0, Some(so_far)) => so_far.saturating_add(len),
                _ => len,
            };
            if total > self.max as u64 {
                return Err(total);
            }
            self.fragmented = if fin { None } else { Some(total) };
        } else if len > self.max as u64 {
            return Err(len);
        }
        self.skip = len;
        Ok(())
    }
}

/// Stops and restarts an [`Inbound`]'s reading (backpressure: a connection whose publishes
/// wait for the store is not read until they are acknowledged, so its client's TCP writes wait
/// instead of the hub buffering them).
#[derive(Debug, Clone, Default)]
pub struct InboundGate(Arc<Mutex<GateState>>);

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    waker: Option<Waker>,
}

impl InboundGate {
    /// Stops reading after the frame being handled.
    pub fn pause(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).paused = true;
    }

    /// Reads again.
    pub fn resume(&self) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        state.paused = false;
        if let Some(w) = state.waker.take() {
            w.wake();
        }
    }

    /// Whether reading is stopped.
    pub fn is_paused(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).paused
    }

    fn blocks(&self, cx: &Context<'_>) -> bool {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if state.paused {
            state.waker = Some(cx.waker().clone());
        }
        state.paused
    }
}

/// Where an [`Inbound`] reads a connection's bytes.
pub trait InboundSource: Unpin {
    /// What a failed read says.
    type Error: std::fmt::Display;

    /// Appends the next bytes to `buf`: `Ok(n)` for `n` bytes appended, `Ok(0)` at the end of
    /// the stream.
    fn poll_append(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<Result<usize, Self::Error>>;
}

/// A stream of byte chunks as an [`InboundSource`] (each chunk copied in): for sources that
/// hand out buffers of their own, tests and fuzzing.
pub struct Chunks<S>(pub S);

impl<S, E> InboundSource for Chunks<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    type Error = E;

    fn poll_append(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<Result<usize, E>> {
        loop {
            return match Pin::new(&mut self.0).poll_next(cx) {
                // An empty chunk is not the end.
                Poll::Ready(Some(Ok(chunk))) if chunk.is_empty() => continue,
                Poll::Ready(Some(Ok(chunk))) => {
                    buf.extend_from_slice(&chunk);
                    Poll::Ready(Ok(chunk.len()))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Err(e)),
                Poll::Ready(None) => Poll::Ready(Ok(0)),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// The connection's frames, in order: the request payload through a [`FrameGuard`] and
/// actix-http's codec. Buffers at most one frame (within the limit) plus one read.
pub struct Inbound<S> {
    gate: InboundGate,
    payload: S,
    guard: FrameGuard,
    codec: Codec,
    buf: BytesMut,
    done: bool,
    /// Reported once the frames before it are served.
    oversize: Option<u64>,
}

impl<S> Inbound<S> {
    /// Frames of `payload`, none over `max` bytes.
    pub fn new(payload: S, max: usize) -> Self {
        Inbound {
            gate: InboundGate::default(),
            payload,
            guard: FrameGuard::new(max),
            codec: Codec::new().max_size(max),
            buf: BytesMut::new(),
            done: false,
            oversize: None,
        }
    }

    /// The gate that stops and restarts this reader.
    pub fn gate(&self) -> InboundGate {
        self.gate.clone()
    }
}

impl<S: InboundSource> Stream for Inbound<S> {
    type Item = Result<Frame, InboundError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.gate.blocks(cx) {
            return Poll::Pending;
        }
        loop {
            match this.codec.decode(&mut this.buf) {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    this.buf.clear();
                    return Poll::Ready(Some(Err(InboundError::Protocol(e))));
                }
            }
            if let Some(declared) = this.oversize.take() {
                this.buf.clear();
                return Poll::Ready(Some(Err(InboundError::TooLarge {
                    declared,
                    max: this.guard.max,
                })));
            }
            if this.done {
                // A partial frame at the end of the stream: the peer went away mid-frame.
                this.buf.clear();
                return Poll::Ready(None);
            }
            if this.buf.is_empty() && this.buf.capacity() > 0 {
                // Everything read was served: an idle connection keeps no read buffer (the
                // frames handed out hold their own bytes).
                this.buf = BytesMut::new();
            }
            match this.payload.poll_append(cx, &mut this.buf) {
                Poll::Ready(Ok(0)) => this.done = true,
                Poll::Ready(Ok(n)) => {
                    let start = this.buf.len() - n;
                    if let Err(over) = this.guard.feed(&this.buf[start..]) {
                        // Frames complete before the header are served; then the error.
                        this.done = true;
                        this.oversize = Some(over.declared);
                        this.buf.truncate(start + over.before);
                        continue;
                    }
                    // The rest of a large frame is coming: make room for it ahead, by at most
                    // twice what has arrived and never beyond the frame. (The codec makes room
                    // when a header arrives, but measured on what is left of a buffer an
                    // earlier frame was split from, which is often too little: the buffer then
                    // grew read by read, each growth a copy of everything so far — a seventh of
                    // the hub's CPU at 1 KiB end to end.)
                    let rest = usize::try_from(this.guard.pending()).unwrap_or(usize::MAX);
                    if rest > 0 && this.buf.len() >= READ_CHUNK {
                        this.buf.reserve(rest.min(2 * this.buf.len()));
                    }
                }
                Poll::Ready(Err(e)) => {
                    this.done = true;
                    this.buf.clear();
                    return Poll::Ready(Some(Err(InboundError::Io(e.to_string()))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// What waits in a connection's outbound queue.
#[derive(Debug)]
pub enum Outgoing {
    /// A WebSocket message of its own: a ping, pong or close (or a text frame built by hand).
    Message(Message),
    /// The JSON text of one v1 frame, already encoded (it goes out as one text frame).
    Text(Bytes),
    /// One or more v2 records. Records queued next to each other go out in one binary frame
    /// (up to [`MAX_BATCH`] bytes): whatever is ready when the writer can take it.
    Records(Bytes),
    /// A v2 message run as its parts (see [`SharedMessageRun`]); it shares a binary frame with
    /// the records beside it as [`Outgoing::Records`] do.
    Run(SharedMessageRun),
}

impl Outgoing {
    fn is_close(&self) -> bool {
        matches!(self, Outgoing::Message(Message::Close(_)))
    }

    /// The encoded size of a record item (`None` for a text frame or a WebSocket message).
    fn record_len(&self) -> Option<usize> {
        match self {
            Outgoing::Records(r) => Some(r.len()),
            Outgoing::Run(run) => Some(run.len()),
            Outgoing::Message(_) | Outgoing::Text(_) => None,
        }
    }

    /// Appends a record item's bytes.
    fn write_record(&self, buf: &mut BytesMut) {
        match self {
            Outgoing::Records(r) => buf.extend_from_slice(r),
            Outgoing::Run(run) => run.write_to(buf),
            Outgoing::Message(_) | Outgoing::Text(_) => {}
        }
    }
}

/// Called (once per arming) when a frame is queued while no write-stall watch is armed.
pub type StallArm = Arc<dyn Fn() + Send + Sync>;

/// Largest v2 binary frame the writer builds from queued records: 64 KiB (a larger record
/// goes alone).
pub const MAX_BATCH: usize = 64 * 1024;

struct PipeState {
    /// Frames not yet taken by the writer, with what each was charged; framed when taken.
    frames: VecDeque<(Outgoing, usize)>,
    /// A close frame is queued: nothing may follow it on the wire.
    closing: bool,
    /// Whether somebody watches for a stalled writer (see [`OutboundPipe::disarm_if_idle`]).
    stall_armed: bool,
    on_stall_arm: Option<StallArm>,
    /// The writer holds framed bytes the socket has not taken yet.
    writing: bool,
    /// No more frames: the writer ends once the queue is empty.
    finished: bool,
    /// The writer is gone: the connection is closed.
    gone: bool,
    waker: Option<Waker>,
    /// When the writer last made progress (took frames, or the socket took bytes), or the queue
    /// last became non-empty.
    last_progress: Instant,
    /// Called once when the writer is gone.
    on_gone: Option<Box<dyn FnOnce() + Send>>,
}

/// The sending half of a connection: frames go in here, the [`PipeBody`] hands them, framed,
/// to the connection's writer as the socket takes them.
#[derive(Clone)]
pub struct OutboundPipe {
    state: Arc<Mutex<PipeState>>,
    budget: Arc<OutboundBudget>,
    gone: Arc<tokio::sync::Notify>,
}

impl OutboundPipe {
    /// A pipe charging `budget`, with its receiving half (driven by [`Writer`]).
    pub fn new(budget: Arc<OutboundBudget>) -> (OutboundPipe, PipeBody) {
        let state = Arc::new(Mutex::new(PipeState {
            frames: VecDeque::new(),
            closing: false,
            stall_armed: false,
            on_stall_arm: None,
            writing: false,
            finished: false,
            gone: false,
            waker: None,
            last_progress: Instant::now(),
            on_gone: None,
        }));
        let gone = Arc::new(tokio::sync::Notify::new());
        (
            OutboundPipe {
                state: state.clone(),
                budget: budget.clone(),
                gone: gone.clone(),
            },
            PipeBody {
                state,
                budget,
                gone,
                codec: Codec::new(),
            },
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `f` runs once the writer is gone (the connection is closed).
    pub fn on_gone(&self, f: impl FnOnce() + Send + 'static) {
        let mut state = self.lock();
        if state.gone {
            drop(state);
            f();
        } else {
            state.on_gone = Some(Box::new(f));
        }
    }

    /// `arm` runs when a frame is queued and no stall watch is armed (it arms one); the watch
    /// ends with [`OutboundPipe::disarm_if_idle`].
    pub fn on_stall_arm(&self, arm: StallArm) {
        self.lock().on_stall_arm = Some(arm);
    }

    /// Ends the stall watch if nothing waits: `true` when disarmed (the next frame arms it
    /// again), `false` when frames still wait (keep watching).
    pub fn disarm_if_idle(&self) -> bool {
        let mut state = self.lock();
        if state.frames.is_empty() && !state.writing {
            state.stall_armed = false;
            true
        } else {
            false
        }
    }

    /// Queues `message`, already charged `charged` bytes to the budget; it is framed when the
    /// writer takes it.
    pub fn push(&self, message: Message, charged: usize) {
        self.push_item(Outgoing::Message(message), charged);
    }

    /// Queues `item`, already charged `charged` bytes to the budget; it is framed when the
    /// writer takes it. Dropped (and released) when the pipe is finished, closing (a close
    /// frame went in before it) or the connection gone.
    pub fn push_item(&self, item: Outgoing, charged: usize) {
        let mut state = self.lock();
        if state.finished || state.gone || state.closing {
            drop(state);
            self.budget.release(charged);
            return;
        }
        if state.frames.is_empty() && !state.writing {
            state.last_progress = Instant::now();
        }
        if item.is_close() {
            state.closing = true;
        }
        state.frames.push_back((item, charged));
        if let Some(w) = state.waker.take() {
            w.wake();
        }
        let arm = if state.stall_armed {
            None
        } else {
            state.stall_armed = true;
            state.on_stall_arm.clone()
        };
        drop(state);
        if let Some(arm) = arm {
            arm();
        }
    }

    /// Drops every queued frame (a slow consumer's backlog: it resumes from history).
    pub fn clear(&self) {
        let dropped: usize = {
            let mut state = self.lock();
            state.last_progress = Instant::now();
            let dropped = state.frames.drain(..).map(|(_, charged)| charged).sum();
            state.frames = VecDeque::new();
            dropped
        };
        self.budget.release(dropped);
    }

    /// No more frames: the writer ends once what is queued has been written.
    pub fn finish(&self) {
        let mut state = self.lock();
        state.finished = true;
        if let Some(w) = state.waker.take() {
            w.wake();
        }
    }

    /// Whether the writer is gone.
    pub fn is_gone(&self) -> bool {
        self.lock().gone
    }

    /// Resolves once the writer is gone.
    pub async fn gone(&self) {
        let notified = self.gone.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_gone() {
            return;
        }
        notified.await;
    }

    /// How long frames (queued, or framed and not yet taken by the socket) have waited with no
    /// progress by the writer (zero when none wait).
    pub fn stalled_for(&self, now: Instant) -> std::time::Duration {
        let state = self.lock();
        if state.frames.is_empty() && !state.writing {
            std::time::Duration::ZERO
        } else {
            now.saturating_duration_since(state.last_progress)
        }
    }
}

/// What [`PipeBody::poll_take`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Frames were framed into the buffer.
    Frames,
    /// Nothing is queued and nothing more will be: the pipe is finished.
    Finished,
}

/// The receiving half of an [`OutboundPipe`]: frames leave the queue here, framed (the budget
/// is released as they are taken). Dropping it marks the connection gone.
pub struct PipeBody {
    state: Arc<Mutex<PipeState>>,
    budget: Arc<OutboundBudget>,
    gone: Arc<tokio::sync::Notify>,
    codec: Codec,
}

impl PipeBody {
    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes queued frames, framing them into `buf`, until it holds at least `want` bytes or the
    /// queue is empty. `Pending` (the waker kept) when nothing is queued and the pipe is not
    /// finished.
    pub fn poll_take(&mut self, cx: &Context<'_>, buf: &mut BytesMut, want: usize) -> Poll<Taken> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken = false;
        let mut released = 0;
        while buf.len() < want {
            let Some((item, charged)) = state.frames.pop_front() else {
                break;
            };
            released += charged;
            taken = true;
            match item {
                // A message the codec refuses (a close reason over the control frame limit) is
                // dropped; nothing else can fail.
                Outgoing::Message(message) => {
                    let _ = self.codec.encode(message, buf);
                }
                Outgoing::Text(text) => {
                    buf.reserve(10 + text.len());
                    put_header(buf, OP_TEXT, text.len());
                    buf.extend_from_slice(&text);
                }
                first @ (Outgoing::Records(_) | Outgoing::Run(_)) => {
                    // Records queued next to each other share one binary frame.
                    let mut len = first.record_len().unwrap_or(0);
                    let mut count = 1;
                    for (next, _) in state.frames.iter() {
                        match next.record_len() {
                            Some(n) if len + n <= MAX_BATCH => {
                                len += n;
                                count += 1;
                            }
                            _ => break,
                        }
                    }
                    buf.reserve(10 + len);
                    put_header(buf, OP_BINARY, len);
                    first.write_record(buf);
                    for _ in 1..count {
                        if let Some((next, charged)) = state.frames.pop_front() {
                            released += charged;
                            next.write_record(buf);
                        }
                    }
                }
            }
        }
        if taken {
            state.last_progress = Instant::now();
            state.writing = !buf.is_empty();
            if state.frames.is_empty() {
                // Release a burst's queue: an idle connection holds no capacity.
                state.frames = VecDeque::new();
            }
            drop(state);
            self.budget.release(released);
            return Poll::Ready(Taken::Frames);
        }
        if state.finished {
            return Poll::Ready(Taken::Finished);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The socket took bytes (`done`: all of them the writer held).
    pub fn wrote(&mut self, done: bool) {
        let mut state = self.lock();
        state.last_progress = Instant::now();
        state.writing = !done;
    }
}

impl Drop for PipeBody {
    fn drop(&mut self) {
        let (dropped, on_gone) = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.gone = true;
            state.writing = false;
            let dropped: usize = state.frames.drain(..).map(|(_, charged)| charged).sum();
            state.frames = VecDeque::new();
            (dropped, state.on_gone.take())
        };
        self.budget.release(dropped);
        self.budget.close();
        self.gone.notify_waiters();
        if let Some(f) = on_gone {
            f();
        }
    }
}

/// Appends the header of an unmasked, final server frame (RFC 6455 §5.2).
fn put_header(buf: &mut BytesMut, opcode: u8, len: usize) {
    use bytes::BufMut;
    buf.put_u8(0x80 | opcode);
    match len {
        0..=125 => buf.put_u8(len as u8),
        126..=0xffff => {
            buf.put_u8(126);
            buf.put_u16(len as u16);
        }
        _ => {
            buf.put_u8(127);
            buf.put_u64(len as u64);
        }
    }
}

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;

/// Bytes the writer frames ahead of the socket: 32 KiB (one frame more when one is larger).
pub const WRITE_CHUNK: usize = 32 * 1024;

/// Bytes read from the socket at a time, into a buffer on the stack: 8 KiB. What is read is
/// copied out at its size; nothing is allocated while the connection is idle.
pub const READ_CHUNK: usize = 8 * 1024;

/// The task writing one connection: takes frames from its [`PipeBody`], frames them into a
/// buffer that exists only while there is something to write, and writes them to the socket.
/// Once the pipe is finished and everything is written it shuts the stream down (a TLS
/// close_notify, then the TCP FIN) and ends; the connection is gone when it ends, whichever
/// way (a write error, the peer reset, or the task dropped with its worker).
pub struct Writer<W> {
    body: PipeBody,
    io: W,
    buf: BytesMut,
    /// Written since the last flush.
    unflushed: bool,
    /// The pipe is finished: shut down once written.
    ending: bool,
}

impl<W> Writer<W> {
    /// The writer of `body` to `io`.
    pub fn new(body: PipeBody, io: W) -> Self {
        Writer {
            body,
            io,
            buf: BytesMut::new(),
            unflushed: false,
            ending: false,
        }
    }
}

impl<W: AsyncWrite + Unpin> std::future::Future for Writer<W> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            let mut waiting = false;
            if !this.ending && this.buf.len() < WRITE_CHUNK {
                match this.body.poll_take(cx, &mut this.buf, WRITE_CHUNK) {
                    Poll::Ready(Taken::Frames) => {}
                    Poll::Ready(Taken::Finished) => this.ending = true,
                    Poll::Pending => waiting = true,
                }
            }
            if !this.buf.is_empty() {
                match Pin::new(&mut this.io).poll_write(cx, &this.buf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(n)) => {
                        this.unflushed = true;
                        this.buf.advance(n);
                        // Emptied, the buffer is kept while more is queued (its memory is
                        // reused for the next frames instead of allocated afresh) and goes
                        // once the connection is idle.
                        this.body.wrote(this.buf.is_empty());
                        continue;
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if this.buf.is_empty() && this.buf.capacity() > 0 && (waiting || this.ending) {
                // Everything written and nothing queued: an idle connection holds no buffer.
                this.buf = BytesMut::new();
            }
            if this.unflushed {
                match Pin::new(&mut this.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => this.unflushed = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if this.ending {
                return Pin::new(&mut this.io).poll_shutdown(cx).map(|_| ());
            }
            if waiting {
                return Poll::Pending;
            }
        }
    }
}

/// The bytes of a connection's socket, for an [`Inbound`]: between frames read [`READ_CHUNK`]
/// at a time into a buffer on the stack and copied out at their size (an idle connection holds
/// no read buffer); while a frame is under way read straight into that frame's buffer. Bytes
/// that arrived with the HTTP upgrade request come first.
pub struct SocketReader<R> {
    io: R,
    early: Option<Bytes>,
}

impl<R> SocketReader<R> {
    /// The bytes of `io`, after `early`.
    pub fn new(io: R, early: Bytes) -> Self {
        SocketReader {
            io,
            early: (!early.is_empty()).then_some(early),
        }
    }
}

impl<R: AsyncRead + Unpin> InboundSource for SocketReader<R> {
    type Error = std::io::Error;

    fn poll_append(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<std::io::Result<usize>> {
        if let Some(early) = self.early.take() {
            let n = early.len();
            if buf.is_empty() {
                *buf = BytesMut::from(early);
            } else {
                buf.extend_from_slice(&early);
            }
            return Poll::Ready(Ok(n));
        }
        if !buf.is_empty() {
            // A frame is under way: read straight into its buffer (one copy fewer).
            buf.reserve(READ_CHUNK);
            return tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, buf);
        }
        // Between frames: read on the stack, so that an idle connection holds no buffer, and
        // copy what came at its size.
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut self.io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A handle on a connection's TCP socket, for the session to reset a peer that never reads
/// (or shut the connection down). It holds no descriptor of its own (a duplicate would double
/// the hub's open files): it reaches the socket through the [`Guarded`] stream that owns it,
/// and does nothing once that stream is dropped, so it can never reach a later connection that
/// was given the same descriptor number.
#[derive(Debug, Clone)]
pub struct ConnSocket(Arc<Mutex<Option<std::os::fd::RawFd>>>);

impl ConnSocket {
    fn with_socket(&self, f: impl FnOnce(socket2::SockRef<'_>)) {
        let fd = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = *fd {
            // SAFETY: the descriptor is open while the lock is held: the stream owning it
            // clears it under this lock before it is closed (`Guarded::drop`).
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            f(socket2::SockRef::from(&borrowed));
        }
    }

    /// Shuts the connection down in both directions (after the close handshake: nothing more
    /// is to be said; what was written still goes out first).
    pub fn shutdown(&self) {
        self.with_socket(|socket| {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        });
    }

    /// Resets the connection at once, discarding what the peer never read: for a peer that
    /// stopped reading, whose writes no close frame can get past.
    pub fn abort(&self) {
        self.with_socket(|socket| {
            let _ = socket.set_linger(Some(std::time::Duration::ZERO));
            let _ = socket.shutdown(std::net::Shutdown::Both);
        });
    }
}

/// A connection's stream (plain TCP, or TLS over it) that lends its socket to a
/// [`ConnSocket`]; reads and writes go straight through.
pub struct Guarded<T> {
    io: Option<T>,
    fd: Arc<Mutex<Option<std::os::fd::RawFd>>>,
}

impl<T> Guarded<T> {
    /// `io`, whose TCP socket is `socket` (a descriptor `io` owns), with the handle on that
    /// socket.
    pub fn new(io: T, socket: std::os::fd::RawFd) -> (Self, ConnSocket) {
        let fd = Arc::new(Mutex::new(Some(socket)));
        (
            Guarded {
                io: Some(io),
                fd: fd.clone(),
            },
            ConnSocket(fd),
        )
    }

    fn io(&mut self) -> Pin<&mut T>
    where
        T: Unpin,
    {
        Pin::new(self.io.as_mut().expect("a stream until dropped"))
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        let mut fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        *fd = None;
        // Closed under the lock: no handle uses the descriptor number after this.
        drop(self.io.take());
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut().io().poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().io().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(fin: bool, opcode: u8, len: u64, masked: bool) -> Vec<u8> {
        let mut h = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        if len < 126 {
            h.push(mask_bit | len as u8);
        } else if len <= u64::from(u16::MAX) {
            h.push(mask_bit | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(mask_bit | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
        if masked {
            // A zero mask leaves the payload as written.
            h.extend_from_slice(&[0, 0, 0, 0]);
        }
        h
    }

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = header(fin, opcode, payload.len() as u64, true);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_within_the_limit_pass_in_any_split() {
        let mut stream = Vec::new();
        for len in [0usize, 5, 125, 126, 1000, 65_535, 65_536, 100_000] {
            stream.extend(frame(true, 1, &vec![b'x'; len]));
        }
        stream.extend(frame(true, 9, b"ping"));
        for chunk in [1, 2, 3, 7, 13, 4096, stream.len()] {
            let mut guard = FrameGuard::new(100_000);
            for piece in stream.chunks(chunk) {
                guard.feed(piece).expect("within the limit");
            }
            assert_eq!(guard.have, 0);
            assert_eq!(guard.skip, 0);
        }
    }

    #[test]
    fn an_oversized_header_is_refused_before_its_payload() {
        for declared in [64 * 1024 * 1024u64, 1 << 40, u64::MAX >> 1, 100_001] {
            let mut guard = FrameGuard::new(100_000);
            // Only the header: no payload byte has arrived.
            let over = guard.feed(&header(true, 1, declared, true)).unwrap_err();
            assert_eq!(over.declared, declared);
        }
        // Byte by byte too.
        let mut guard = FrameGuard::new(1000);
        let h = header(true, 2, 1 << 40, true);
        let (last, rest) = h.split_last().unwrap();
        for b in rest {
            guard.feed(&[*b]).unwrap();
        }
        assert_eq!(guard.feed(&[*last]).unwrap_err().declared, 1 << 40);
    }

    #[test]
    fn a_fragmented_message_counts_as_a_whole() {
        let mut guard = FrameGuard::new(1000);
        guard.feed(&frame(false, 1, &[b'a'; 600])).unwrap();
        // A ping between fragments is allowed and does not count.
        guard.feed(&frame(true, 9, b"")).unwrap();
        assert_eq!(
            guard
                .feed(&header(true, 0, 401, true))
                .unwrap_err()
                .declared,
            1001
        );
        // A finished message starts the count again.
        let mut guard = FrameGuard::new(1000);
        guard.feed(&frame(false, 1, &[b'a'; 600])).unwrap();
        guard.feed(&frame(true, 0, &[b'a'; 400])).unwrap();
        guard.feed(&frame(true, 1, &[b'a'; 1000])).unwrap();
    }

    #[test]
    fn an_oversized_control_frame_is_refused() {
        let mut guard = FrameGuard::new(1000);
        let mut stream = frame(true, 1, b"ok");
        stream.extend(header(true, 9, 5000, true));
        let over = guard.feed(&stream).unwrap_err();
        assert_eq!(over.declared, 5000);
        assert_eq!(over.before, 2 + 4 + 2, "the frame before it is whole");
    }

    #[tokio::test]
    async fn inbound_decodes_frames_and_stops_at_an_oversized_header() {
        use futures::StreamExt;
        let mut bytes = frame(true, 1, b"hello");
        bytes.extend(header(true, 1, 1 << 40, true));
        bytes.extend(vec![0u8; 10_000]);
        let chunks: Vec<Result<Bytes, std::io::Error>> = bytes
            .chunks(3000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut inbound = Inbound::new(Chunks(futures::stream::iter(chunks)), 4096);
        match inbound.next().await {
            Some(Ok(Frame::Text(t))) => assert_eq!(&t[..], b"hello"),
            other => panic!("{other:?}"),
        }
        match inbound.next().await {
            Some(Err(InboundError::TooLarge { declared, max })) => {
                assert_eq!(declared, 1 << 40);
                assert_eq!(max, 4096);
            }
            other => panic!("{other:?}"),
        }
        assert!(inbound.next().await.is_none());
    }

    #[tokio::test]
    async fn inbound_makes_room_for_a_frame_ahead_but_never_beyond_it() {
        use futures::StreamExt;
        // A 60,000-byte frame of which `sent` bytes arrive, and nothing more for now.
        let held = |sent: usize| {
            let mut start = header(true, 2, 60_000, true);
            start.extend(vec![7u8; sent]);
            let arrived = start.len();
            let chunks = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(start))])
                .chain(futures::stream::pending());
            let mut inbound = Inbound::new(Chunks(chunks), 100_000);
            let waker = futures::task::noop_waker();
            assert!(Pin::new(&mut inbound)
                .poll_next(&mut Context::from_waker(&waker))
                .is_pending());
            assert!(inbound.buf.len() == arrived);
            inbound.buf.capacity()
        };
        // (actix-http's codec itself makes room for the whole declared frame once its header
        // is in: a connection costs at most the frame limit plus one read, as documented.)
        for sent in [100, READ_CHUNK, 3 * READ_CHUNK] {
            let capacity = held(sent);
            assert!(
                capacity <= 60_000 + 14,
                "room ahead never beyond the frame: {capacity} after {sent} bytes"
            );
        }
        // A whole large frame, in socket-sized reads, still decodes to its bytes.
        let payload: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
        let bytes = frame(true, 2, &payload);
        let chunks: Vec<Result<Bytes, std::io::Error>> = bytes
            .chunks(READ_CHUNK)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut inbound = Inbound::new(Chunks(futures::stream::iter(chunks)), 100_000);
        match inbound.next().await {
            Some(Ok(Frame::Binary(b))) => assert_eq!(&b[..], &payload[..]),
            other => panic!("{other:?}"),
        }
        assert!(inbound.next().await.is_none());
    }

    fn take(body: &mut PipeBody, want: usize) -> (Poll<Taken>, BytesMut) {
        let mut buf = BytesMut::new();
        let waker = futures::task::noop_waker();
        let poll = body.poll_take(&Context::from_waker(&waker), &mut buf, want);
        (poll, buf)
    }

    #[test]
    fn the_pipe_frames_at_take_time_and_releases_the_budget_then() {
        let budget = Arc::new(OutboundBudget::new(1000));
        let (pipe, mut body) = OutboundPipe::new(budget.clone());
        assert_eq!(take(&mut body, 1).0, Poll::Pending);
        assert!(budget.try_charge(5));
        pipe.push(Message::Text("hello".into()), 5);
        assert!(budget.try_charge(5));
        pipe.push(Message::Text("world".into()), 5);
        assert_eq!(budget.pending(), 10);
        let (poll, first) = take(&mut body, 1);
        assert_eq!(poll, Poll::Ready(Taken::Frames));
        assert_eq!(&first[..], b"\x81\x05hello");
        assert_eq!(budget.pending(), 5);
        // Framed bytes the socket has not taken count as waiting.
        let t0 = Instant::now();
        assert!(
            pipe.stalled_for(t0 + std::time::Duration::from_secs(1)) > std::time::Duration::ZERO
        );
        body.wrote(true);
        pipe.clear();
        assert_eq!(budget.pending(), 0);
        assert_eq!(pipe.stalled_for(Instant::now()), std::time::Duration::ZERO);
        // Several frames go into one buffer, up to what the writer wants.
        for text in ["a", "b", "c"] {
            budget.charge(1);
            pipe.push(Message::Text(text.into()), 1);
        }
        let (_, two) = take(&mut body, 5);
        assert_eq!(&two[..], b"\x81\x01a\x81\x01b");
        assert_eq!(budget.pending(), 1);
        let (_, last) = take(&mut body, 5);
        assert_eq!(&last[..], b"\x81\x01c");
        assert_eq!(budget.pending(), 0);
        pipe.finish();
        assert_eq!(take(&mut body, 1).0, Poll::Ready(Taken::Finished));
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let g = gone.clone();
        pipe.on_gone(move || g.store(true, std::sync::atomic::Ordering::SeqCst));
        drop(body);
        assert!(gone.load(std::sync::atomic::Ordering::SeqCst));
        assert!(budget.is_closed());
    }

    #[test]
    fn queued_records_share_one_binary_frame_up_to_the_batch_size() {
        let budget = Arc::new(OutboundBudget::new(1 << 20));
        let (pipe, mut body) = OutboundPipe::new(budget);
        for r in [&b"aaaa"[..], b"bbbb"] {
            pipe.push_item(Outgoing::Records(Bytes::copy_from_slice(r)), 0);
        }
        pipe.push_item(Outgoing::Text(Bytes::from_static(b"t")), 0);
        pipe.push_item(Outgoing::Records(Bytes::from_static(b"cc")), 0);
        let (_, buf) = take(&mut body, 1 << 20);
        assert_eq!(&buf[..], b"\x82\x08aaaabbbb\x81\x01t\x82\x02cc");
        // Records beyond the batch size start a frame of their own.
        let big = vec![b'x'; MAX_BATCH - 10];
        pipe.push_item(Outgoing::Records(Bytes::from(big)), 0);
        pipe.push_item(Outgoing::Records(Bytes::from(vec![b'y'; 20])), 0);
        let (_, buf) = take(&mut body, 1 << 20);
        assert_eq!(buf.len(), 4 + (MAX_BATCH - 10) + 2 + 20);
        assert_eq!(&buf[..4], &[0x82, 0x7e, 0xff, 0xf6]);
        assert_eq!(&buf[4 + MAX_BATCH - 10..][..2], &[0x82, 20]);
    }

    #[test]
    fn nothing_follows_a_close_frame() {
        let budget = Arc::new(OutboundBudget::new(1000));
        let (pipe, mut body) = OutboundPipe::new(budget.clone());
        pipe.push(Message::Close(None), 0);
        assert!(budget.try_charge(4));
        pipe.push_item(Outgoing::Records(Bytes::from_static(b"late")), 4);
        assert_eq!(budget.pending(), 0, "refused and released");
        let (_, buf) = take(&mut body, 1 << 20);
        assert_eq!(&buf[..], b"\x88\x00");
    }

    #[test]
    fn the_stall_watch_is_armed_once_until_the_queue_empties() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let budget = Arc::new(OutboundBudget::new(1000));
        let (pipe, mut body) = OutboundPipe::new(budget);
        let arms = Arc::new(AtomicUsize::new(0));
        let a = arms.clone();
        pipe.on_stall_arm(Arc::new(move || {
            a.fetch_add(1, Ordering::SeqCst);
        }));
        pipe.push_item(Outgoing::Text(Bytes::from_static(b"1")), 0);
        pipe.push_item(Outgoing::Text(Bytes::from_static(b"2")), 0);
        assert_eq!(arms.load(Ordering::SeqCst), 1);
        assert!(!pipe.disarm_if_idle(), "frames wait: keep watching");
        let _ = take(&mut body, 1 << 20);
        assert!(!pipe.disarm_if_idle(), "framed, not yet written");
        body.wrote(true);
        assert!(pipe.disarm_if_idle());
        pipe.push_item(Outgoing::Text(Bytes::from_static(b"3")), 0);
        assert_eq!(arms.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_writer_writes_what_is_queued_then_shuts_down_and_is_gone() {
        use tokio::io::AsyncReadExt;
        let budget = Arc::new(OutboundBudget::new(1 << 20));
        let (pipe, body) = OutboundPipe::new(budget.clone());
        let (near, mut far) = tokio::io::duplex(64);
        let writer = tokio::spawn(Writer::new(body, near));
        let big = "x".repeat(100_000);
        budget.charge(big.len());
        pipe.push(Message::Text(big.clone().into()), big.len());
        pipe.push(Message::Ping(Bytes::new()), 0);
        pipe.finish();
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), 2 + 8 + big.len() + 2);
        assert_eq!(&got[got.len() - 2..], b"\x89\x00");
        assert!(pipe.is_gone());
        assert_eq!(budget.pending(), 0);
    }

    #[tokio::test]
    async fn the_reader_serves_early_bytes_first_and_ends_at_eof() {
        use tokio::io::AsyncWriteExt;
        let (near, mut far) = tokio::io::duplex(64);
        let mut reader = SocketReader::new(near, Bytes::from_static(b"early"));
        far.write_all(b"later").await.unwrap();
        drop(far);
        let mut buf = BytesMut::new();
        let mut append = |buf: &mut BytesMut| {
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            match reader.poll_append(&mut cx, buf) {
                Poll::Ready(r) => r.unwrap(),
                Poll::Pending => panic!("the duplex has the bytes"),
            }
        };
        assert_eq!(append(&mut buf), 5);
        assert_eq!(&buf[..], b"early");
        // A frame under way: the next bytes are read into the same buffer.
        assert_eq!(append(&mut buf), 5);
        assert_eq!(&buf[..], b"earlylater");
        assert_eq!(append(&mut buf), 0, "the end");
        // Between frames (an empty buffer), too.
        buf.clear();
        assert_eq!(append(&mut buf), 0);
        assert!(buf.is_empty());
    }
}
