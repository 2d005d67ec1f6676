//! The hub's WebSocket I/O under each session actor, on actix-http's WebSocket codec.
//!
//! The session actor is driven by its own mailbox and timers, never by the socket: what
//! actix-web-actors could not do (its context is polled by the response body, so a peer that
//! stops reading froze the actor, its kick and its idle timer). Three pieces:
//!
//! * [`FrameGuard`] reads every WebSocket frame *header* as the bytes arrive and refuses a frame
//!   whose declared length exceeds the limit before its payload is buffered (actix-http's codec
//!   checks only once the whole frame is in memory). A connection sending one costs at most the
//!   frame limit plus one read.
//! * [`Inbound`] turns the request payload into frames through the guard and the codec.
//! * [`OutboundPipe`] is the response body: a queue of encoded frames charged to the
//!   connection's [`OutboundBudget`] until the HTTP dispatcher takes them for the socket, with
//!   a record of when the writer last made progress.
//!
//! [`ConnSocket`] is a second handle on the connection's TCP socket, taken when it is
//! accepted: it lets the session end a connection whose peer never reads again (a reset, at
//! the TCP level, which the dispatcher blocked in a write cannot do) and shut one down right
//! after the close handshake.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{Codec, Frame, Message, ProtocolError};
use bytes::{Bytes, BytesMut};
use futures::Stream;
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

impl<S, E> Stream for Inbound<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
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
            match Pin::new(&mut this.payload).poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    if let Err(over) = this.guard.feed(&bytes) {
                        // Frames complete before the header are served; then the error.
                        this.done = true;
                        this.oversize = Some(over.declared);
                        this.buf.extend_from_slice(&bytes[..over.before]);
                        continue;
                    }
                    if this.buf.is_empty() {
                        this.buf = BytesMut::from(bytes);
                    } else {
                        this.buf.extend_from_slice(&bytes);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.buf.clear();
                    return Poll::Ready(Some(Err(InboundError::Io(e.to_string()))));
                }
                Poll::Ready(None) => this.done = true,
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
    /// (up to the pipe's batch size): whatever is ready when the writer can take it.
    Records(Bytes),
}

impl Outgoing {
    fn is_close(&self) -> bool {
        matches!(self, Outgoing::Message(Message::Close(_)))
    }
}

/// Called (once per arming) when a frame is queued while no write-stall watch is armed.
pub type StallArm = Arc<dyn Fn() + Send + Sync>;

/// Default largest v2 binary frame the pipe builds from queued records, and the most it hands
/// the writer at once: 64 KiB.
pub const DEFAULT_MAX_BATCH: usize = 64 * 1024;

struct PipeState {
    /// Frames with what each was charged.
    frames: VecDeque<(Outgoing, usize)>,
    /// No more frames: the body ends once the queue is empty.
    finished: bool,
    /// A close frame is queued: nothing may follow it on the wire.
    closing: bool,
    /// The dispatcher dropped the body: the connection is gone.
    gone: bool,
    waker: Option<Waker>,
    /// When the writer last took a frame (or the queue was last empty).
    last_progress: Instant,
    /// Called once when the body is dropped.
    on_gone: Option<Box<dyn FnOnce() + Send>>,
    /// Whether somebody watches for a stalled writer (see [`OutboundPipe::disarm_if_idle`]).
    stall_armed: bool,
    on_stall_arm: Option<StallArm>,
}

/// The sending half of a connection: frames go in here (from the session, or straight from
/// channel threads through the connection's outbox), the [`PipeBody`] hands them to the HTTP
/// dispatcher as it can write them, framed and batched when taken.
#[derive(Clone)]
pub struct OutboundPipe {
    state: Arc<Mutex<PipeState>>,
    budget: Arc<OutboundBudget>,
    gone: Arc<tokio::sync::Notify>,
}

impl OutboundPipe {
    /// A pipe charging `budget`, with its body (the WebSocket response's body), batching v2
    /// records into frames of up to [`DEFAULT_MAX_BATCH`] bytes.
    pub fn new(budget: Arc<OutboundBudget>) -> (OutboundPipe, PipeBody) {
        Self::with_batch(budget, DEFAULT_MAX_BATCH)
    }

    /// [`OutboundPipe::new`] with v2 frames of up to `max_batch` bytes.
    pub fn with_batch(budget: Arc<OutboundBudget>, max_batch: usize) -> (OutboundPipe, PipeBody) {
        let state = Arc::new(Mutex::new(PipeState {
            frames: VecDeque::new(),
            finished: false,
            closing: false,
            gone: false,
            waker: None,
            last_progress: Instant::now(),
            on_gone: None,
            stall_armed: false,
            on_stall_arm: None,
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
                max_batch: max_batch.max(1),
            },
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `f` runs once the dispatcher has dropped the body (the connection is gone).
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
        if state.frames.is_empty() {
            state.stall_armed = false;
            true
        } else {
            false
        }
    }

    /// Queues a WebSocket message, already charged `charged` bytes to the budget.
    pub fn push(&self, message: Message, charged: usize) {
        self.push_item(Outgoing::Message(message), charged);
    }

    /// Queues `item`, already charged `charged` bytes to the budget. Dropped (and released)
    /// when the pipe is finished, closing (a close frame went in before it) or gone.
    pub fn push_item(&self, item: Outgoing, charged: usize) {
        let mut state = self.lock();
        if state.finished || state.gone || state.closing {
            drop(state);
            self.budget.release(charged);
            return;
        }
        if state.frames.is_empty() {
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
            state.frames.drain(..).map(|(_, charged)| charged).sum()
        };
        self.budget.release(dropped);
    }

    /// No more frames: the body ends once what is queued has been taken.
    pub fn finish(&self) {
        let mut state = self.lock();
        state.finished = true;
        if let Some(w) = state.waker.take() {
            w.wake();
        }
    }

    /// Whether the dispatcher dropped the body.
    pub fn is_gone(&self) -> bool {
        self.lock().gone
    }

    /// Resolves once the dispatcher has dropped the body.
    pub async fn gone(&self) {
        let notified = self.gone.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_gone() {
            return;
        }
        notified.await;
    }

    /// How long frames have waited with no progress by the writer (zero when none wait).
    pub fn stalled_for(&self, now: Instant) -> std::time::Duration {
        let state = self.lock();
        if state.frames.is_empty() {
            std::time::Duration::ZERO
        } else {
            now.saturating_duration_since(state.last_progress)
        }
    }
}

/// The WebSocket response body over an [`OutboundPipe`].
pub struct PipeBody {
    state: Arc<Mutex<PipeState>>,
    budget: Arc<OutboundBudget>,
    gone: Arc<tokio::sync::Notify>,
    max_batch: usize,
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

impl PipeBody {
    /// Frames what is queued into one chunk for the writer: each text frame and message as
    /// it is, runs of v2 records as one binary frame of up to `max_batch` bytes; stops once the
    /// chunk holds `max_batch` bytes.
    fn take_chunk(&self, state: &mut PipeState) -> (BytesMut, usize) {
        let mut chunk = BytesMut::new();
        let mut released = 0;
        let mut codec = Codec::new();
        while chunk.len() < self.max_batch {
            let Some((item, charged)) = state.frames.pop_front() else {
                break;
            };
            released += charged;
            match item {
                Outgoing::Message(message) => {
                    // Control frames and hand-built messages: the codec cannot fail on them.
                    let _ = codec.encode(message, &mut chunk);
                }
                Outgoing::Text(text) => {
                    chunk.reserve(10 + text.len());
                    put_header(&mut chunk, OP_TEXT, text.len());
                    chunk.extend_from_slice(&text);
                }
                Outgoing::Records(first) => {
                    let mut len = first.len();
                    let mut count = 1;
                    for (next, _) in state.frames.iter() {
                        match next {
                            Outgoing::Records(r) if len + r.len() <= self.max_batch => {
                                len += r.len();
                                count += 1;
                            }
                            _ => break,
                        }
                    }
                    chunk.reserve(10 + len);
                    put_header(&mut chunk, OP_BINARY, len);
                    chunk.extend_from_slice(&first);
                    for _ in 1..count {
                        if let Some((Outgoing::Records(r), charged)) = state.frames.pop_front() {
                            released += charged;
                            chunk.extend_from_slice(&r);
                        }
                    }
                }
            }
        }
        (chunk, released)
    }
}

impl Stream for PipeBody {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.frames.is_empty() {
            let (chunk, released) = self.take_chunk(&mut state);
            state.last_progress = Instant::now();
            drop(state);
            self.budget.release(released);
            return Poll::Ready(Some(Ok(chunk.freeze())));
        }
        if state.finished {
            Poll::Ready(None)
        } else {
            state.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Drop for PipeBody {
    fn drop(&mut self) {
        let (dropped, on_gone) = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.gone = true;
            let dropped: usize = state.frames.drain(..).map(|(_, charged)| charged).sum();
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

/// A second handle on a connection's TCP socket (a duplicated descriptor, so it can never
/// reach another connection's socket), taken when the connection is accepted.
#[derive(Debug, Clone)]
pub struct ConnSocket(Arc<socket2::Socket>);

impl ConnSocket {
    /// A handle on the socket of `stream`.
    pub fn new(stream: &impl std::os::fd::AsFd) -> std::io::Result<Self> {
        let dup = stream.as_fd().try_clone_to_owned()?;
        Ok(ConnSocket(Arc::new(socket2::Socket::from(dup))))
    }

    /// Shuts the connection down in both directions (after the close handshake: nothing more
    /// is to be said; what was written still goes out first).
    pub fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }

    /// Resets the connection at once, discarding what the peer never read: for a peer that
    /// stopped reading, whose writes no close frame can get past.
    pub fn abort(&self) {
        let _ = self.0.set_linger(Some(std::time::Duration::ZERO));
        let _ = self.0.shutdown(std::net::Shutdown::Both);
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
        let mut inbound = Inbound::new(futures::stream::iter(chunks), 4096);
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
    async fn the_pipe_releases_the_budget_as_the_writer_takes_frames() {
        use futures::StreamExt;
        let budget = Arc::new(OutboundBudget::new(1000));
        let (pipe, mut body) = OutboundPipe::new(budget.clone());
        assert!(budget.try_charge(5));
        pipe.push_item(Outgoing::Text(Bytes::from_static(b"hello")), 5);
        assert!(budget.try_charge(5));
        pipe.push_item(Outgoing::Text(Bytes::from_static(b"world")), 5);
        assert_eq!(budget.pending(), 10);
        // Whatever is queued goes to the writer as one chunk: two text frames.
        let chunk = body.next().await.unwrap().unwrap();
        assert_eq!(&chunk[..], b"\x81\x05hello\x81\x05world");
        assert_eq!(budget.pending(), 0);
        assert!(budget.try_charge(3));
        pipe.push_item(Outgoing::Text(Bytes::from_static(b"abc")), 3);
        pipe.clear();
        assert_eq!(budget.pending(), 0);
        pipe.finish();
        assert!(body.next().await.is_none());
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let g = gone.clone();
        pipe.on_gone(move || g.store(true, std::sync::atomic::Ordering::SeqCst));
        drop(body);
        assert!(gone.load(std::sync::atomic::Ordering::SeqCst));
        assert!(budget.is_closed());
    }

    #[tokio::test]
    async fn queued_records_share_one_binary_frame_up_to_the_batch_size() {
        use futures::StreamExt;
        let budget = Arc::new(OutboundBudget::new(1 << 20));
        let (pipe, mut body) = OutboundPipe::with_batch(budget.clone(), 10);
        for r in [&b"aaaa"[..], b"bbbb", b"cccc"] {
            pipe.push_item(Outgoing::Records(Bytes::copy_from_slice(r)), 0);
        }
        pipe.push_item(Outgoing::Text(Bytes::from_static(b"t")), 0);
        // Two records fit the 10-byte batch, and fill the chunk; the third starts the next
        // chunk's frame, and the text frame follows it there.
        let chunk = body.next().await.unwrap().unwrap();
        assert_eq!(&chunk[..], b"\x82\x08aaaabbbb");
        let chunk = body.next().await.unwrap().unwrap();
        assert_eq!(&chunk[..], b"\x82\x04cccc\x81\x01t");
        // A record larger than the batch goes alone.
        pipe.push_item(Outgoing::Records(Bytes::from(vec![b'x'; 200])), 0);
        let chunk = body.next().await.unwrap().unwrap();
        assert_eq!(&chunk[..4], b"\x82\x7e\x00\xc8");
        assert_eq!(chunk.len(), 204);
    }

    #[tokio::test]
    async fn nothing_follows_a_close_frame() {
        use futures::StreamExt;
        let budget = Arc::new(OutboundBudget::new(1000));
        let (pipe, mut body) = OutboundPipe::new(budget.clone());
        pipe.push(Message::Close(None), 0);
        assert!(budget.try_charge(4));
        pipe.push_item(Outgoing::Records(Bytes::from_static(b"late")), 4);
        assert_eq!(budget.pending(), 0, "refused and released");
        let chunk = body.next().await.unwrap().unwrap();
        assert_eq!(&chunk[..], b"\x88\x00");
    }

    #[tokio::test]
    async fn the_stall_watch_is_armed_once_until_the_queue_empties() {
        use futures::StreamExt;
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
        body.next().await.unwrap().unwrap();
        assert!(pipe.disarm_if_idle());
        pipe.push_item(Outgoing::Text(Bytes::from_static(b"3")), 0);
        assert_eq!(arms.load(Ordering::SeqCst), 2);
    }
}
