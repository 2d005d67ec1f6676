//! The hub's per-connection session actor.
//!
//! This module is the only user of `actix-web-actors` (deprecated upstream; its successor is
//! `actix-ws`): replacing it touches this file alone.
//!
//! Life of a connection: the client must send a valid hello within the hello timeout; the
//! authenticator decides; the session table opens or resumes a session and the hub answers with
//! a welcome. From then on the heartbeat keeps it honest. Anything malformed, oversized or out of
//! order gets a typed error frame and a close — never a panic, and never another client's
//! problem.

use std::sync::Arc;

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use std::time::Duration;

use tokio::time::Instant;

use super::auth::{AuthRejection, Identity};
use super::handler::{
    ConnInfo, ConnectionHandler, FrameRejection, Kick, Outbound, OutboundBatch, SessionOutbox,
};
use super::HubState;
use crate::error::TransportError;
use crate::heartbeat::{Heartbeat, HeartbeatAction};
use crate::protocol::{
    check_identifier, close_reason_text, ClientId, ErrorCode, ErrorFrame, Frame, Hello, SessionId,
    Welcome, CLOSE_SESSION_TAKEN_OVER, MAX_ID_LEN, MAX_TOKEN_LEN,
};
use crate::telemetry;

/// Tells a session actor that its session was resumed on another connection.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Evict;

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
    client_id: Option<ClientId>,
    session: Option<SessionId>,
    heartbeat: Heartbeat,
    heartbeat_timer: Option<SpawnHandle>,
    handler: Option<Box<dyn ConnectionHandler>>,
    /// Bounds what this peer can make the hub log.
    peer_log: LogLimiter,
    /// Frames pipelined behind the hello, served after the welcome.
    early: Vec<Frame>,
    early_bytes: usize,
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

/// Upgrades `req` to a WebSocket served by a new [`HubSession`].
pub(crate) fn start(
    state: Arc<HubState>,
    req: &HttpRequest,
    stream: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let max = state.config.max_frame_size;
    let conn_id = state.connection_opened();
    let peer = req.peer_addr();
    let span =
        tracing::info_span!("hub_session", conn_id, peer = ?peer, session = tracing::field::Empty);
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
        state: state.clone(),
        phase: Phase::AwaitingHello,
        client_id: None,
        session: None,
        heartbeat_timer: None,
        handler: None,
        span,
    };
    let result = ws::WsResponseBuilder::new(session, req, stream)
        .frame_size(max)
        .start();
    if result.is_err() {
        // The actor never started, so its `stopped` will not run.
        state.connection_closed();
    }
    result
}

impl HubSession {
    /// Sends `error` as a frame, then closes with `code` and stops.
    fn fail(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        error: TransportError,
        code: ws::CloseCode,
    ) {
        tracing::debug!(parent: &self.span, %error, "closing connection");
        self.send_error(ctx, &error, None);
        self.close(ctx, code, Some(error.to_string()));
    }

    fn send_error(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        error: &TransportError,
        about: Option<(String, Option<u64>)>,
    ) {
        metrics::counter!(telemetry::HUB_FRAMES_REJECTED, "code" => error.code().to_string())
            .increment(1);
        let mut frame = ErrorFrame::from_error(error);
        if let Some((channel, seq)) = about {
            frame = frame.about(&channel, seq);
        }
        ctx.text(Frame::Error(frame).encode());
    }

    fn close(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        code: ws::CloseCode,
        description: Option<String>,
    ) {
        self.phase = Phase::Closing;
        let description = description.map(|d| close_reason_text(&d));
        ctx.close(Some(ws::CloseReason { code, description }));
        ctx.stop();
    }

    fn schedule_heartbeat(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        after: std::time::Duration,
    ) {
        if let Some(h) = self.heartbeat_timer.take() {
            ctx.cancel_future(h);
        }
        self.heartbeat_timer = Some(ctx.run_later(after, |act, ctx| {
            act.heartbeat_timer = None;
            match act.heartbeat.poll(Instant::now()) {
                HeartbeatAction::Continue { ping, next_check } => {
                    if ping {
                        ctx.ping(b"");
                    }
                    act.schedule_heartbeat(ctx, next_check);
                }
                HeartbeatAction::TimedOut { silent_for } => {
                    metrics::counter!(telemetry::HUB_IDLE_TIMEOUTS).increment(1);
                    tracing::info!(parent: &act.span, ?silent_for, "client silent; closing");
                    act.close(ctx, ws::CloseCode::Away, Some("idle timeout".into()));
                }
            }
        }));
    }

    fn on_text(&mut self, ctx: &mut ws::WebsocketContext<Self>, text: &str) {
        let frame = match Frame::decode(text, self.state.config.max_frame_size) {
            Ok(frame) => frame,
            Err(error) => {
                let code = match error {
                    TransportError::FrameTooLarge { .. } => ws::CloseCode::Size,
                    TransportError::UnsupportedVersion { .. } => ws::CloseCode::Policy,
                    _ => ws::CloseCode::Protocol,
                };
                if matches!(error, TransportError::UnsupportedVersion { .. }) {
                    metrics::counter!(telemetry::HUB_HANDSHAKES, "result" => "rejected")
                        .increment(1);
                }
                self.fail(ctx, error, code);
                return;
            }
        };
        match (self.phase, frame) {
            (Phase::AwaitingHello, Frame::Hello(hello)) => self.on_hello(ctx, hello),
            (Phase::Authenticating, frame)
                if !matches!(frame, Frame::Hello(_) | Frame::Welcome(_)) =>
            {
                // Pipelined behind the hello (an attach right away saves a round trip on every
                // reconnect): held, within bounds, and served once the welcome is out.
                self.early_bytes += text.len();
                if self.early.len() >= MAX_EARLY_FRAMES || self.early_bytes > MAX_EARLY_BYTES {
                    let error = TransportError::UnexpectedFrame {
                        expected: "at most 64 frames (256 KiB) before the welcome",
                        got: frame.kind().to_owned(),
                    };
                    self.fail(ctx, error, ws::CloseCode::Policy);
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
                self.fail(ctx, error, ws::CloseCode::Protocol);
            }
        }
    }

    /// A frame after the welcome.
    fn on_open_frame(&mut self, ctx: &mut ws::WebsocketContext<Self>, frame: Frame) {
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
                self.fail(ctx, error, ws::CloseCode::Protocol);
            }
            frame => {
                let Some(handler) = self.handler.as_mut() else {
                    return;
                };
                if let Err(FrameRejection {
                    error,
                    about,
                    closes,
                }) = handler.on_frame(frame)
                {
                    if closes {
                        let code = match error.category() {
                            crate::error::ErrorCategory::Service => ws::CloseCode::Again,
                            crate::error::ErrorCategory::Protocol => ws::CloseCode::Protocol,
                            _ => ws::CloseCode::Policy,
                        };
                        self.send_error(ctx, &error, about);
                        self.close(ctx, code, Some(error.to_string()));
                    } else {
                        self.send_error(ctx, &error, about);
                    }
                }
            }
        }
    }

    fn on_hello(&mut self, ctx: &mut ws::WebsocketContext<Self>, hello: Hello) {
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
            self.fail(ctx, error, ws::CloseCode::Policy);
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
                    act.fail(ctx, error, ws::CloseCode::Policy);
                }
            }
        }));
    }

    fn welcome(&mut self, ctx: &mut ws::WebsocketContext<Self>, hello: Hello, identity: Identity) {
        let opened = self.state.sessions().open(
            &identity,
            &hello.client_id,
            hello.resume.as_ref(),
            self.conn_id,
            ctx.address().recipient(),
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
        ctx.text(welcome.encode());
        let info = ConnInfo {
            conn_id: self.conn_id,
            identity,
            client_id: hello.client_id.clone(),
            instance: hello.instance.clone(),
            session: opened.session.clone(),
        };
        let outbox = SessionOutbox::new(
            self.conn_id,
            ctx.address().recipient(),
            ctx.address().recipient(),
            ctx.address().recipient(),
        );
        self.handler = Some(self.state.config.handler.open(info, outbox));
        self.client_id = Some(hello.client_id);
        self.session = Some(opened.session);
        self.phase = Phase::Open;
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
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.state.config.outbound_queue);
        let timeout = self.state.config.hello_timeout;
        ctx.run_later(timeout, move |act, ctx| {
            if matches!(act.phase, Phase::AwaitingHello | Phase::Authenticating) {
                metrics::counter!(telemetry::HUB_HANDSHAKES, "result" => "timeout").increment(1);
                let error = TransportError::UnexpectedFrame {
                    expected: "hello",
                    got: format!("nothing within {timeout:?}"),
                };
                act.fail(ctx, error, ws::CloseCode::Policy);
            }
        });
        let first = self.state.config.heartbeat_interval;
        self.schedule_heartbeat(ctx, first);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(mut handler) = self.handler.take() {
            handler.on_close();
        }
        if let Some(session) = &self.session {
            self.state
                .sessions()
                .detach(session, self.conn_id, Instant::now());
        }
        self.state.connection_closed();
        tracing::debug!(parent: &self.span, "connection closed");
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for HubSession {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.heartbeat.on_activity(Instant::now());
        match item {
            Ok(ws::Message::Text(text)) => self.on_text(ctx, &text),
            Ok(ws::Message::Ping(payload)) => ctx.pong(&payload),
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => {}
            Ok(ws::Message::Close(reason)) => {
                tracing::debug!(parent: &self.span, ?reason, "client closed");
                self.phase = Phase::Closing;
                ctx.close(reason);
                ctx.stop();
            }
            Ok(ws::Message::Binary(_)) | Ok(ws::Message::Continuation(_)) => {
                let error = TransportError::UnexpectedFrame {
                    expected: "a text frame (protocol v1 is JSON text)",
                    got: "binary or fragmented frame".into(),
                };
                self.fail(ctx, error, ws::CloseCode::Unsupported);
            }
            Err(ws::ProtocolError::Overflow) => {
                let max = self.state.config.max_frame_size;
                let error = TransportError::FrameTooLarge { size: max + 1, max };
                self.fail(ctx, error, ws::CloseCode::Size);
            }
            Err(e) => {
                let error = TransportError::MalformedFrame {
                    reason: e.to_string(),
                };
                self.fail(ctx, error, ws::CloseCode::Protocol);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Evict> for HubSession {
    type Result = ();

    fn handle(&mut self, _: Evict, ctx: &mut Self::Context) {
        // The session now belongs to the new connection: do not detach it on stop.
        self.session = None;
        self.close(
            ctx,
            ws::CloseCode::Other(CLOSE_SESSION_TAKEN_OVER),
            Some("session resumed on another connection".into()),
        );
    }
}

impl Handler<Outbound> for HubSession {
    type Result = ();

    fn handle(&mut self, out: Outbound, ctx: &mut Self::Context) {
        if self.phase != Phase::Open {
            return;
        }
        if let Some(handler) = self.handler.as_mut() {
            handler.on_outbound(&out);
        }
        ctx.text(out.text);
    }
}

impl Handler<OutboundBatch> for HubSession {
    type Result = ();

    fn handle(&mut self, batch: OutboundBatch, ctx: &mut Self::Context) {
        if self.phase != Phase::Open {
            return;
        }
        for text in batch.texts {
            ctx.text(text);
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
        self.fail(ctx, error, ws::CloseCode::Again);
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
