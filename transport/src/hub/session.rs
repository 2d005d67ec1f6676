//! The hub's per-connection session actor.
//!
//! The actor runs on its own mailbox and timers, over the I/O pieces of [`super::wire`]: it is
//! never frozen by a peer that stops reading (as actix-web-actors' context was, whose actor is
//! polled by the response body), so its slow-consumer kick, write-stall timer and idle timer
//! always run, and a connection that cannot be written to is reset at the TCP level within a
//! bounded time.
//!
//! Life of a connection: the client must send a valid hello within the hello timeout; the
//! authenticator decides; the session table opens or resumes a session and the hub answers with
//! a welcome. From then on the heartbeat keeps it honest. Anything malformed, oversized or out of
//! order gets a typed error frame and a close — never a panic, and never another client's
//! problem.

use std::sync::Arc;

use actix::prelude::*;
use actix_http::ws::{CloseCode, CloseReason, Frame as WsFrame, Message as WsMessage};
use bytes::Bytes;
use std::time::Duration;

use tokio::time::Instant;

use super::admin::ConnectionFacts;
use super::auth::{AuthRejection, Identity};
use super::budget::OutboundBudget;
use super::handler::{ConnInfo, ConnectionHandler, FrameRejection, Kick, SessionOutbox, Wire};
use super::wire::{
    ConnSocket, Inbound, InboundError, InboundGate, InboundSource, OutboundPipe, PipeBody,
};
use super::HubState;
use crate::error::TransportError;
use crate::heartbeat::{Heartbeat, HeartbeatAction};
use crate::protocol::{
    check_identifier, close_reason_text, v2, ClientId, ErrorCode, ErrorFrame, Frame, Hello,
    RetryWindow, SessionId, Welcome, CLOSE_SESSION_TAKEN_OVER, MAX_ID_LEN, MAX_TOKEN_LEN,
};
use crate::telemetry;

/// Tells a session actor that its session was resumed on another connection.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Evict;

/// Tells a session actor that the hub is stopping: it sends `shutting_down` with the window
/// in which the client should come back, then closes with 1001.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ShutDown {
    /// When the client should reconnect (it picks a moment in the window at random).
    pub retry: RetryWindow,
}

/// How `POST /sessions/{client_id}/disconnect` drops a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectMode {
    /// A close handshake (code 1012, "service restart"): the client reconnects and resumes.
    Close,
    /// A TCP reset, as a network failure would: the client finds out by itself.
    Reset,
}

impl DisconnectMode {
    /// `close` or `reset`.
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectMode::Close => "close",
            DisconnectMode::Reset => "reset",
        }
    }
}

/// Drops the connection for the admin API.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct AdminDisconnect {
    /// How.
    pub mode: DisconnectMode,
}

/// Asks a connection to describe itself for the admin API (`None` before its welcome).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Option<ConnectionFacts>")]
pub struct Introspect;

/// The connection's writer is gone (the connection is closed).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
struct Gone;

/// A frame was queued while no write-stall watch was armed: arm one.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
struct WatchStall;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    Authenticating,
    Open,
    Closing,
}

/// One client connection on the hub.
pub struct HubSession {
    conn_id: u64,
    state: Arc<HubState>,
    phase: Phase,
    /// The protocol version of the connection (1 until a hello asks for another).
    version: u16,
    client_id: Option<ClientId>,
    session: Option<SessionId>,
    heartbeat: Heartbeat,
    heartbeat_timer: Option<SpawnHandle>,
    /// Armed until the welcome (an idle connection keeps no timer it no longer needs).
    hello_timer: Option<SpawnHandle>,
    handler: Option<Box<dyn ConnectionHandler>>,
    /// Bounds what this peer can make the hub log.
    peer_log: LogLimiter,
    /// Frames pipelined behind the hello, served after the welcome.
    early: Vec<Frame>,
    early_bytes: usize,
    /// Where frames for the client go.
    pipe: OutboundPipe,
    budget: Arc<OutboundBudget>,
    /// The connection's TCP socket, to reset a peer that does not read.
    socket: Option<ConnSocket>,
    /// Armed while frames wait for the writer.
    stall_timer: Option<SpawnHandle>,
    /// The peer sent its close frame.
    peer_closed: bool,
    /// Stops reading the socket while the handler wants no more input.
    gate: InboundGate,
    /// The peer's address (for the admin API).
    peer: Option<std::net::SocketAddr>,
    span: tracing::Span,
}

/// Most frames a client may pipeline behind its hello before the welcome: 64…
pub const MAX_EARLY_FRAMES: usize = 64;
/// …holding at most 256 KiB of text.
pub const MAX_EARLY_BYTES: usize = 256 * 1024;

/// Longest excerpt of peer-supplied text that goes into a log line, in bytes.
pub const LOG_EXCERPT_BYTES: usize = 200;
/// Peer-triggered log lines allowed per connection per [`LOG_WINDOW`].
pub const LOG_LINES_PER_WINDOW: u32 = 5;
/// The window of [`LOG_LINES_PER_WINDOW`]: one minute.
pub const LOG_WINDOW: Duration = Duration::from_secs(60);

/// At most `limit` log lines per `window`; counts what it suppressed.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    limit: u32,
    window: Duration,
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// `limit` lines per `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        LogLimiter {
            limit,
            window,
            window_start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be logged at `now` (`n` lines were suppressed since the last
    /// one); `None` when it must be dropped.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= self.window {
            self.window_start = Some(now);
            self.logged = 0;
        }
        if self.logged < self.limit {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// At most [`LOG_EXCERPT_BYTES`] of `text` (cut at a character boundary), saying how long it
/// was when cut.
pub fn excerpt(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= LOG_EXCERPT_BYTES {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = LOG_EXCERPT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

/// Serves an upgraded WebSocket connection with a new [`HubSession`]: `incoming` is what the
/// socket reads (frames are decoded from it by an [`Inbound`]); the returned [`PipeBody`] is
/// what the connection's [`super::wire::Writer`] sends.
pub(crate) fn start<S>(
    state: Arc<HubState>,
    peer: Option<std::net::SocketAddr>,
    socket: Option<ConnSocket>,
    incoming: S,
) -> PipeBody
where
    S: InboundSource + 'static,
{
    let max = state.config.max_frame_size;
    let budget = Arc::new(OutboundBudget::new(state.config.outbound_budget));
    let (pipe, body) = OutboundPipe::new(budget.clone());
    let conn_id = state.connection_opened();
    let span =
        tracing::info_span!("hub_session", conn_id, peer = ?peer, session = tracing::field::Empty);
    let inbound = Inbound::new(incoming, max);
    let session = HubSession {
        peer_log: LogLimiter::new(LOG_LINES_PER_WINDOW, LOG_WINDOW),
        early: Vec::new(),
        early_bytes: 0,
        conn_id,
        heartbeat: Heartbeat::new(
            state.config.heartbeat_interval,
            state.config.idle_timeout,
            Instant::now(),
        ),
        state,
        phase: Phase::AwaitingHello,
        version: 1,
        client_id: None,
        session: None,
        heartbeat_timer: None,
        hello_timer: None,
        handler: None,
        pipe,
        budget,
        socket,
        stall_timer: None,
        peer_closed: false,
        gate: inbound.gate(),
        peer,
        span,
    };
    HubSession::create(move |ctx| {
        ctx.add_stream(inbound);
        session
    });
    body
}

impl HubSession {
    /// Sends `error` as a frame, then closes with `code` and stops.
    fn fail(&mut self, ctx: &mut Context<Self>, error: TransportError, code: CloseCode) {
        tracing::debug!(parent: &self.span, %error, "closing connection");
        self.send_error(&error, None);
        self.close(ctx, code, Some(error.to_string()));
    }

    fn send_error(&mut self, error: &TransportError, about: Option<(String, Option<u64>)>) {
        metrics::counter!(telemetry::HUB_FRAMES_REJECTED, "code" => error.code().to_string())
            .increment(1);
        let mut frame = ErrorFrame::from_error(error);
        if let Some((channel, seq)) = about {
            frame = frame.about(&channel, seq);
        }
        self.send_frame(&Frame::Error(frame));
    }

    /// Queues a frame of the session's own (welcome, error) in the connection's protocol
    /// version, charged to the budget.
    fn send_frame(&mut self, frame: &Frame) {
        // The handshake is JSON text in every version.
        let wire = if matches!(frame, Frame::Welcome(_)) {
            Wire::encode(frame, 1)
        } else {
            Wire::encode(frame, self.version)
        };
        let charged = wire.len();
        self.budget.charge(charged);
        self.pipe.push_item(wire.into_outgoing(), charged);
    }

    /// Hands a control frame to the writer (the pipe arms the stall watch).
    fn push(&mut self, _ctx: &mut Context<Self>, message: WsMessage, charged: usize) {
        self.pipe.push(message, charged);
    }

    /// Resets a connection whose writer made no progress for the write timeout: its peer does
    /// not read, and no close frame could reach it.
    fn arm_stall_timer(&mut self, ctx: &mut Context<Self>, after: Duration) {
        self.stall_timer = Some(ctx.run_later(after, |act, ctx| {
            act.stall_timer = None;
            let limit = act.state.config.write_timeout;
            let stalled = act.pipe.stalled_for(Instant::now());
            if stalled.is_zero() {
                if act.pipe.disarm_if_idle() {
                    return; // nothing waits: the next frame arms the watch again
                }
                act.arm_stall_timer(ctx, limit);
                return;
            }
            if stalled < limit {
                act.arm_stall_timer(ctx, limit - stalled);
                return;
            }
            metrics::counter!(telemetry::HUB_WRITE_STALLS).increment(1);
            tracing::warn!(parent: &act.span, ?stalled, pending = act.budget.pending(), "client stopped reading; resetting the connection");
            act.abort(ctx);
        }));
    }

    /// Ends the connection at the TCP level at once (nothing more can be said to the peer).
    fn abort(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Closing;
        self.pipe.clear();
        self.pipe.finish();
        if let Some(socket) = &self.socket {
            socket.abort();
        }
        ctx.stop();
    }

    /// Starts the close handshake: a close frame, then the connection ends once the peer
    /// answers (or at once if it already closed), and is reset if it has not within the close
    /// timeout.
    fn close(&mut self, ctx: &mut Context<Self>, code: CloseCode, description: Option<String>) {
        if self.phase == Phase::Closing {
            return;
        }
        self.phase = Phase::Closing;
        let description = description.map(|d| close_reason_text(&d));
        self.push(
            ctx,
            WsMessage::Close(Some(CloseReason { code, description })),
            0,
        );
        let timeout = self.state.config.close_timeout;
        ctx.run_later(timeout, |act, ctx| {
            tracing::debug!(parent: &act.span, "the close did not complete in time; resetting the connection");
            act.abort(ctx);
        });
        if self.peer_closed {
            self.finish(ctx);
        }
    }

    /// The close handshake is done: the writer sends what is queued and shuts the connection
    /// down; the actor stops when the connection is gone.
    fn finish(&mut self, ctx: &mut Context<Self>) {
        self.pipe.finish();
        if self.pipe.is_gone() {
            ctx.stop();
        }
    }

    fn schedule_heartbeat(&mut self, ctx: &mut Context<Self>, after: std::time::Duration) {
        if let Some(h) = self.heartbeat_timer.take() {
            ctx.cancel_future(h);
        }
        self.heartbeat_timer = Some(ctx.run_later(after, |act, ctx| {
            act.heartbeat_timer = None;
            if act.gate.is_paused() {
                // We are not reading it (backpressure): its silence is ours.
                act.heartbeat.on_activity(Instant::now());
            }
            match act.heartbeat.poll(Instant::now()) {
                HeartbeatAction::Continue { ping, next_check } => {
                    if ping {
                        act.push(ctx, WsMessage::Ping(Bytes::new()), 0);
                    }
                    act.schedule_heartbeat(ctx, next_check);
                }
                HeartbeatAction::TimedOut { silent_for } => {
                    metrics::counter!(telemetry::HUB_IDLE_TIMEOUTS).increment(1);
                    tracing::info!(parent: &act.span, ?silent_for, "client silent; closing");
                    act.close(ctx, CloseCode::Away, Some("idle timeout".into()));
                }
            }
        }));
    }

    fn on_text(&mut self, ctx: &mut Context<Self>, bytes: &Bytes) {
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let error = TransportError::MalformedFrame {
                    reason: format!("text frame is not UTF-8: {e}"),
                };
                self.fail(ctx, error, CloseCode::Invalid);
                return;
            }
        };
        let frame = match Frame::decode_checked(text, bytes, self.state.config.max_frame_size) {
            Ok(frame) => frame,
            Err(error) => {
                let code = match error {
                    TransportError::FrameTooLarge { .. } => CloseCode::Size,
                    TransportError::UnsupportedVersion { .. } => CloseCode::Policy,
                    _ => CloseCode::Protocol,
                };
                if matches!(error, TransportError::UnsupportedVersion { .. }) {
                    metrics::counter!(telemetry::HUB_HANDSHAKES, "result" => "rejected")
                        .increment(1);
                }
                self.fail(ctx, error, code);
                return;
            }
        };
        self.on_frame(ctx, frame, bytes.len());
    }

    /// A binary frame: v2 records, on a connection whose hello asked for v2.
    fn on_binary(&mut self, ctx: &mut Context<Self>, bytes: &Bytes) {
        if self.version < 2 || self.phase == Phase::AwaitingHello {
            let error = TransportError::UnexpectedFrame {
                expected:
                    "a text frame (protocol v1 is JSON text; v2 starts after a hello asking for it)",
                got: "binary frame".into(),
            };
            self.fail(ctx, error, CloseCode::Unsupported);
            return;
        }
        let records = match v2::decode(bytes, self.state.config.max_frame_size) {
            Ok(records) => records,
            Err(error) => {
                let code = match error {
                    TransportError::FrameTooLarge { .. } => CloseCode::Size,
                    _ => CloseCode::Protocol,
                };
                self.fail(ctx, error, code);
                return;
            }
        };
        let size = bytes.len();
        for record in records {
            if self.phase == Phase::Closing {
                return;
            }
            match record {
                v2::Record::Publish(run) if self.phase == Phase::Open => {
                    let Some(handler) = self.handler.as_mut() else {
                        return;
                    };
                    let result = handler.on_publish_run(run);
                    self.after_handler(ctx, result);
                }
                record => {
                    for frame in record.into_frames() {
                        self.on_frame(ctx, frame, size);
                    }
                }
            }
        }
    }

    /// A decoded frame, in whatever phase the connection is; `size` is what it took on the
    /// wire (for the bound on frames pipelined before the welcome).
    fn on_frame(&mut self, ctx: &mut Context<Self>, frame: Frame, size: usize) {
        if self.phase == Phase::Closing {
            return;
        }
        match (self.phase, frame) {
            (Phase::AwaitingHello, Frame::Hello(hello)) => self.on_hello(ctx, hello),
            (Phase::Authenticating, frame)
                if !matches!(frame, Frame::Hello(_) | Frame::Welcome(_)) =>
            {
                // Pipelined behind the hello (an attach right away saves a round trip on every
                // reconnect): held, within bounds, and served once the welcome is out.
                self.early_bytes += size;
                if self.early.len() >= MAX_EARLY_FRAMES || self.early_bytes > MAX_EARLY_BYTES {
                    let error = TransportError::UnexpectedFrame {
                        expected: "at most 64 frames (256 KiB) before the welcome",
                        got: frame.kind().to_owned(),
                    };
                    self.fail(ctx, error, CloseCode::Policy);
                    return;
                }
                self.early.push(frame);
            }
            (Phase::Open, frame) => self.on_open_frame(ctx, frame),
            (phase, frame) => {
                let expected = match phase {
                    Phase::AwaitingHello => "hello",
                    Phase::Authenticating => "no second hello",
                    Phase::Open | Phase::Closing => "a channel frame",
                };
                let error = TransportError::UnexpectedFrame {
                    expected,
                    got: frame.kind().to_owned(),
                };
                self.fail(ctx, error, CloseCode::Protocol);
            }
        }
    }

    /// A frame after the welcome.
    fn on_open_frame(&mut self, ctx: &mut Context<Self>, frame: Frame) {
        match frame {
            Frame::Error(err) => {
                metrics::counter!(telemetry::HUB_CLIENT_ERRORS).increment(1);
                // A peer decides what goes in its error frames: log a bounded excerpt, and only
                // a few per minute per connection.
                if let Some(suppressed) = self.peer_log.allow(Instant::now()) {
                    tracing::warn!(parent: &self.span, code = %err.code, message = %excerpt(&err.message), suppressed, "client reported an error");
                }
            }
            Frame::Hello(_) | Frame::Welcome(_) => {
                let error = TransportError::UnexpectedFrame {
                    expected: "a channel frame",
                    got: frame.kind().to_owned(),
                };
                self.fail(ctx, error, CloseCode::Protocol);
            }
            frame => {
                let Some(handler) = self.handler.as_mut() else {
                    return;
                };
                let result = handler.on_frame(frame);
                self.after_handler(ctx, result);
            }
        }
    }

    /// Applies backpressure and answers a rejection after the handler took a frame.
    fn after_handler(&mut self, ctx: &mut Context<Self>, result: Result<(), FrameRejection>) {
        if let Some(handler) = self.handler.as_ref() {
            if !handler.wants_input() && !self.gate.is_paused() {
                // Backpressure: read nothing more until acks bring it back under. Acks that
                // landed between the check and the pause would not see the pause: look again.
                metrics::counter!(telemetry::HUB_READS_PAUSED).increment(1);
                self.gate.pause();
                if handler.wants_input() {
                    self.gate.resume();
                }
            }
        }
        if let Err(FrameRejection {
            error,
            about,
            closes,
        }) = result
        {
            self.send_error(&error, about);
            if closes {
                let code = match error.category() {
                    crate::error::ErrorCategory::Service => CloseCode::Again,
                    crate::error::ErrorCategory::Protocol => CloseCode::Protocol,
                    _ => CloseCode::Policy,
                };
                self.close(ctx, code, Some(error.to_string()));
            }
        }
    }

    fn on_hello(&mut self, ctx: &mut Context<Self>, hello: Hello) {
        // Identifiers are bounded before anything keeps them (the session table holds the
        // client id for the session lifetime).
        let checked = check_identifier("client_id", &hello.client_id.0, MAX_ID_LEN, true)
            .and_then(|()| match &hello.instance {
                Some(i) => check_identifier("instance", &i.0, MAX_ID_LEN, false),
                None => Ok(()),
            })
            .and_then(|()| match &hello.resume {
                Some(r) => check_identifier("resume", &r.0, MAX_ID_LEN, false),
                None => Ok(()),
            })
            .and_then(|()| match &hello.token {
                Some(t) => check_identifier("token", t, MAX_TOKEN_LEN, false),
                None => Ok(()),
            });
        if let Err(error) = checked {
            metrics::counter!(telemetry::HUB_HANDSHAKES, "result" => "invalid").increment(1);
            self.fail(ctx, error, CloseCode::Policy);
            return;
        }
        self.phase = Phase::Authenticating;
        let auth = self
            .state
            .config
            .authenticator
            .authenticate(&hello.client_id, hello.token.as_deref());
        ctx.spawn(auth.into_actor(self).map(move |result, act, ctx| {
            if act.phase != Phase::Authenticating {
                return;
            }
            match result {
                Ok(identity) => act.welcome(ctx, hello, identity),
                Err(rejection) => {
                    metrics::counter!(telemetry::HUB_HANDSHAKES, "result" => "rejected")
                        .increment(1);
                    let error = match rejection {
                        AuthRejection::Missing => TransportError::Remote {
                            code: ErrorCode::AuthRequired,
                            category: crate::error::ErrorCategory::Auth,
                            permanent: true,
                            message: "a token is required".into(),
                        },
                        AuthRejection::Invalid(message) => TransportError::AuthRejected { message },
                    };
                    act.fail(ctx, error, CloseCode::Policy);
                }
            }
        }));
    }

    fn welcome(&mut self, ctx: &mut Context<Self>, hello: Hello, identity: Identity) {
        let opened = self.state.sessions().open(
            &identity,
            &hello.client_id,
            hello.resume.as_ref(),
            self.conn_id,
            ctx.address(),
            Instant::now(),
        );
        if let Some((old_conn, old)) = opened.evicted {
            tracing::debug!(parent: &self.span, old_conn, "session resumed on a new connection; evicting the old one");
            old.do_send(Evict);
        }
        self.span
            .record("session", tracing::field::display(&opened.session));
        let result = if opened.resumed {
            "resumed"
        } else {
            "welcomed"
        };
        metrics::counter!(telemetry::HUB_HANDSHAKES, "result" => result).increment(1);
        tracing::info!(parent: &self.span, %identity, client_id = %hello.client_id, resumed = opened.resumed, "session open");
        let welcome = Frame::Welcome(Welcome {
            v: hello.v,
            session: opened.session.clone(),
            resumed: opened.resumed,
            heartbeat_ms: self.state.config.heartbeat_interval.as_millis() as u64,
            idle_timeout_ms: self.state.config.idle_timeout.as_millis() as u64,
        });
        self.send_frame(&welcome);
        self.version = hello.v;
        let info = ConnInfo {
            conn_id: self.conn_id,
            identity,
            client_id: hello.client_id.clone(),
            instance: hello.instance.clone(),
            session: opened.session.clone(),
        };
        let outbox = SessionOutbox::new(
            self.conn_id,
            self.version,
            self.pipe.clone(),
            ctx.address().recipient(),
            self.budget.clone(),
            self.gate.clone(),
        )
        .owned_by(hello.client_id.clone(), opened.session.clone());
        self.handler = Some(self.state.config.handler.open(info, outbox));
        self.client_id = Some(hello.client_id);
        self.session = Some(opened.session);
        self.phase = Phase::Open;
        if let Some(timer) = self.hello_timer.take() {
            ctx.cancel_future(timer);
        }
        // Frames the client pipelined behind its hello, in order.
        self.early_bytes = 0;
        for frame in std::mem::take(&mut self.early) {
            if self.phase != Phase::Open {
                break;
            }
            self.on_open_frame(ctx, frame);
        }
    }
}

impl Actor for HubSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.state.config.outbound_queue);
        let addr = ctx.address();
        self.pipe.on_gone(move || addr.do_send(Gone));
        let addr = ctx.address();
        self.pipe
            .on_stall_arm(Arc::new(move || addr.do_send(WatchStall)));
        self.state
            .live_sessions()
            .insert(self.conn_id, ctx.address().recipient());
        let timeout = self.state.config.hello_timeout;
        self.hello_timer = Some(ctx.run_later(timeout, move |act, ctx| {
            act.hello_timer = None;
            if matches!(act.phase, Phase::AwaitingHello | Phase::Authenticating) {
                metrics::counter!(telemetry::HUB_HANDSHAKES, "result" => "timeout").increment(1);
                let error = TransportError::UnexpectedFrame {
                    expected: "hello",
                    got: format!("nothing within {timeout:?}"),
                };
                act.fail(ctx, error, CloseCode::Policy);
            }
        }));
        let first = self.state.config.heartbeat_interval;
        self.schedule_heartbeat(ctx, first);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.state.live_sessions().remove(&self.conn_id);
        self.pipe.finish();
        self.budget.close();
        if let (Some(socket), false) = (self.socket.take(), self.pipe.is_gone()) {
            // The writer still has the connection: if it cannot finish within the close
            // timeout (a peer that does not read), reset it.
            let pipe = self.pipe.clone();
            let timeout = self.state.config.close_timeout;
            actix_rt::spawn(async move {
                if tokio::time::timeout(timeout, pipe.gone()).await.is_err() {
                    socket.abort();
                }
            });
        }
        if let Some(mut handler) = self.handler.take() {
            handler.on_close();
        }
        if let (Some(client_id), Some(session)) = (&self.client_id, &self.session) {
            self.state
                .sessions()
                .detach(client_id, session, self.conn_id, Instant::now());
        }
        self.state.connection_closed();
        tracing::debug!(parent: &self.span, "connection closed");
    }
}

impl StreamHandler<Result<WsFrame, InboundError>> for HubSession {
    fn handle(&mut self, item: Result<WsFrame, InboundError>, ctx: &mut Self::Context) {
        self.heartbeat.on_activity(Instant::now());
        match item {
            Ok(WsFrame::Text(bytes)) => {
                if self.phase != Phase::Closing {
                    self.on_text(ctx, &bytes)
                }
            }
            Ok(WsFrame::Binary(bytes)) => {
                if self.phase != Phase::Closing {
                    self.on_binary(ctx, &bytes)
                }
            }
            Ok(WsFrame::Ping(payload)) => {
                if self.phase != Phase::Closing {
                    self.push(ctx, WsMessage::Pong(payload), 0);
                }
            }
            Ok(WsFrame::Pong(_)) => {}
            Ok(WsFrame::Close(reason)) => {
                tracing::debug!(parent: &self.span, ?reason, "client closed");
                self.peer_closed = true;
                if self.phase == Phase::Closing {
                    // It answered ours: the handshake is complete.
                    self.finish(ctx);
                } else {
                    let code = reason.map(|r| r.code).unwrap_or(CloseCode::Normal);
                    self.close(ctx, code, None);
                }
            }
            Ok(WsFrame::Continuation(_)) => {
                let error = TransportError::UnexpectedFrame {
                    expected: "an unfragmented frame",
                    got: "fragmented frame".into(),
                };
                self.fail(ctx, error, CloseCode::Unsupported);
            }
            Err(InboundError::TooLarge { declared, max }) => {
                metrics::counter!(telemetry::HUB_OVERSIZED_FRAMES).increment(1);
                let size = usize::try_from(declared).unwrap_or(usize::MAX);
                let error = TransportError::FrameTooLarge { size, max };
                // Nothing more is read from this peer: the close answer cannot come.
                self.peer_closed = true;
                self.fail(ctx, error, CloseCode::Size);
            }
            Err(InboundError::Protocol(e)) => {
                let error = TransportError::MalformedFrame {
                    reason: e.to_string(),
                };
                self.peer_closed = true;
                self.fail(ctx, error, CloseCode::Protocol);
            }
            Err(InboundError::Io(e)) => {
                tracing::debug!(parent: &self.span, error = %e, "connection failed");
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // The peer sent nothing more (it went away, or its close answer was the last frame).
        self.peer_closed = true;
        if self.phase == Phase::Closing {
            self.finish(ctx);
        } else {
            ctx.stop();
        }
    }
}

impl Handler<Gone> for HubSession {
    type Result = ();

    fn handle(&mut self, _: Gone, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<ShutDown> for HubSession {
    type Result = ();

    fn handle(&mut self, msg: ShutDown, ctx: &mut Self::Context) {
        if self.phase == Phase::Closing {
            return;
        }
        let mut frame = ErrorFrame::from_error(&TransportError::Remote {
            code: ErrorCode::ShuttingDown,
            category: crate::error::ErrorCategory::Service,
            permanent: false,
            message: "the hub is stopping; reconnect within the retry window".into(),
        });
        frame.retry_after_ms = Some(msg.retry);
        self.send_frame(&Frame::Error(frame));
        self.close(ctx, CloseCode::Away, Some("hub shutting down".into()));
    }
}

impl Handler<AdminDisconnect> for HubSession {
    type Result = ();

    fn handle(&mut self, msg: AdminDisconnect, ctx: &mut Self::Context) {
        tracing::info!(parent: &self.span, mode = msg.mode.as_str(), "disconnected by the admin API");
        match msg.mode {
            DisconnectMode::Close => self.close(
                ctx,
                CloseCode::Restart,
                Some("disconnected by an administrator".into()),
            ),
            DisconnectMode::Reset => self.abort(ctx),
        }
    }
}

impl Handler<Introspect> for HubSession {
    type Result = ResponseFuture<Option<ConnectionFacts>>;

    fn handle(&mut self, _: Introspect, _: &mut Self::Context) -> Self::Result {
        let Some(handler) = self.handler.as_ref().filter(|_| self.phase == Phase::Open) else {
            return Box::pin(async { None });
        };
        let mut facts = ConnectionFacts {
            peer_addr: self.peer.map(|p| p.to_string()),
            protocol_version: self.version,
            last_heartbeat_unix_ms: super::admin::unix_ms(self.heartbeat.last_seen()),
            queued_bytes: self.budget.pending(),
            publishes_in_flight: handler.publishes_in_flight(),
            channels: Vec::new(),
        };
        let channels = handler.admin_channels();
        Box::pin(async move {
            facts.channels = channels.await;
            Some(facts)
        })
    }
}

impl Handler<Evict> for HubSession {
    type Result = ();

    fn handle(&mut self, _: Evict, ctx: &mut Self::Context) {
        // The session now belongs to the new connection: do not detach it on stop.
        self.session = None;
        self.close(
            ctx,
            CloseCode::Other(CLOSE_SESSION_TAKEN_OVER),
            Some("session resumed on another connection".into()),
        );
    }
}

impl Handler<WatchStall> for HubSession {
    type Result = ();

    fn handle(&mut self, _: WatchStall, ctx: &mut Self::Context) {
        if self.stall_timer.is_none() {
            let after = self.state.config.write_timeout;
            self.arm_stall_timer(ctx, after);
        }
    }
}

impl Handler<Kick> for HubSession {
    type Result = ();

    fn handle(&mut self, Kick(error): Kick, ctx: &mut Self::Context) {
        if self.phase == Phase::Closing {
            return;
        }
        tracing::info!(parent: &self.span, %error, "closing connection");
        if error.code() == ErrorCode::SlowConsumer {
            // Its backlog is of no use: it resumes from history. The error and the close go
            // out next, not after megabytes it cannot read.
            self.pipe.clear();
        }
        self.fail(ctx, error, CloseCode::Again);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_peer_can_make_a_few_lines_a_minute_and_no_more() {
        let mut limiter = LogLimiter::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(limiter.allow(t0), Some(0));
        assert_eq!(limiter.allow(t0), Some(0));
        for _ in 0..40 {
            assert_eq!(limiter.allow(t0 + Duration::from_secs(1)), None);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        // The next window's first line says how many were dropped.
        assert_eq!(limiter.allow(Instant::now()), Some(40));
        assert_eq!(limiter.allow(Instant::now()), Some(0));
        assert_eq!(limiter.allow(Instant::now()), None);
    }

    #[test]
    fn excerpts_are_bounded_and_cut_on_character_boundaries() {
        assert_eq!(excerpt("short"), "short");
        let long = "é".repeat(1024 * 1024);
        let cut = excerpt(&long);
        assert!(cut.len() < LOG_EXCERPT_BYTES + 40, "{}", cut.len());
        assert!(cut.ends_with(&format!("({} bytes)", long.len())));
    }
}
