//! The WebSocketActor: one physical connection, from TCP connect to close.
//!
//! It opens the socket (awc), sends the hello, validates the welcome, keeps the heartbeat, and
//! when it ends — for whatever reason — reports exactly one [`WsEvent::Ended`] with a typed
//! error to its supervisor, the [`TransportActor`](crate::TransportActor). It never reconnects
//! by itself: that decision belongs to the supervisor and its ReconnectManager.

use std::time::Duration;

use actix::io::{SinkWrite, WriteHandler};
use actix::prelude::*;
use awc::error::WsProtocolError;
use awc::ws;
use awc::BoxedSocket;
use bytes::Bytes;
use futures::stream::{SplitSink, StreamExt as _};
use tokio::time::Instant;

use crate::error::TransportError;
use crate::heartbeat::{Heartbeat, HeartbeatAction};
use crate::protocol::{v2, Frame, Hello, Welcome, SUPPORTED_VERSIONS};
use crate::tls::HandshakeFailure;
use crate::transport_actor::{ChannelLink, ChannelRoutes};

type WsSink = SplitSink<actix_codec::Framed<BoxedSocket, ws::Codec>, ws::Message>;

/// What a WebSocketActor tells its supervisor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum WsEvent {
    /// The welcome arrived and was valid: the connection is usable.
    Established {
        /// Which physical connection.
        conn_id: u64,
        /// The endpoint it went to.
        endpoint: String,
        /// The hub's welcome.
        welcome: Welcome,
        /// Where to send frames.
        addr: Addr<WebSocketActor>,
    },
    /// A frame other than the handshake arrived on the established connection.
    Inbound {
        /// Which physical connection.
        conn_id: u64,
        /// The decoded frame.
        frame: Frame,
    },
    /// The connection is over. Sent exactly once, when the actor stops.
    Ended {
        /// Which physical connection.
        conn_id: u64,
        /// Why it ended.
        error: TransportError,
        /// Whether the welcome had been received (lost connection) or not (failed attempt).
        established: bool,
    },
}

/// Sends one frame on the connection. Fails when the connection is not established.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), TransportError>")]
pub struct SendFrame(pub Frame);

/// Sends several frames on the connection, in order (one mailbox message). Fails when the
/// connection is not established.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), TransportError>")]
pub struct SendFrames(pub Vec<Frame>);

/// Writes the v2 records gathered since the last write (sent by the actor to itself, so that
/// every frame already in its mailbox joins the batch).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Flush;

/// Most bytes of v2 records gathered into one WebSocket frame: 64 KiB (a larger record goes
/// alone).
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Closes the connection normally; the supervisor gets `Ended` with [`TransportError::Closed`].
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CloseConnection;

/// Settings of one physical connection, taken from the transport configuration.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Ping after this much silence.
    pub heartbeat_interval: Duration,
    /// Give up after this much silence.
    pub idle_timeout: Duration,
    /// Budget for connect + upgrade + welcome.
    pub handshake_timeout: Duration,
    /// Largest frame accepted or sent.
    pub max_frame_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    AwaitingWelcome,
    Open,
    Closing,
}

/// One physical WebSocket connection to a hub. Created by the TransportActor, one per attempt.
pub struct WebSocketActor {
    conn_id: u64,
    endpoint: String,
    hello: Hello,
    settings: WsSettings,
    client: awc::Client,
    supervisor: Recipient<WsEvent>,
    routes: ChannelRoutes,
    sink: Option<SinkWrite<ws::Message, WsSink>>,
    phase: Phase,
    heartbeat: Heartbeat,
    heartbeat_timer: Option<SpawnHandle>,
    ending: Option<TransportError>,
    established: bool,
    /// The protocol version of the connection, from the welcome.
    version: u16,
    /// v2 records waiting for the next [`Flush`], and their encoded size.
    batch: Vec<v2::Record>,
    batch_bytes: usize,
    flush_scheduled: bool,
}

impl WebSocketActor {
    /// A connection attempt to `endpoint`, reporting to `supervisor`. Start it with
    /// `Actor::start`; it connects at once.
    pub fn new(
        conn_id: u64,
        endpoint: String,
        hello: Hello,
        settings: WsSettings,
        client: awc::Client,
        supervisor: Recipient<WsEvent>,
        routes: ChannelRoutes,
    ) -> Self {
        let heartbeat = Heartbeat::new(
            settings.heartbeat_interval,
            settings.idle_timeout,
            Instant::now(),
        );
        WebSocketActor {
            conn_id,
            endpoint,
            hello,
            settings,
            client,
            supervisor,
            routes,
            sink: None,
            phase: Phase::Connecting,
            heartbeat,
            heartbeat_timer: None,
            ending: None,
            established: false,
            version: 1,
            batch: Vec::new(),
            batch_bytes: 0,
            flush_scheduled: false,
        }
    }

    /// Ends the connection with `error` as the reason (the first reason wins).
    fn end(
        &mut self,
        ctx: &mut Context<Self>,
        error: TransportError,
        close: Option<ws::CloseCode>,
    ) {
        if self.ending.is_none() {
            tracing::debug!(conn_id = self.conn_id, %error, "connection ending");
            self.ending = Some(error);
        }
        if close == Some(ws::CloseCode::Normal) {
            // A normal close: what was gathered goes before the close frame.
            let _ = self.flush();
        }
        if let (Some(code), Some(sink)) = (close, self.sink.as_mut()) {
            // Best effort: the peer may already be gone.
            let _ = sink.write(ws::Message::Close(Some(code.into())));
        }
        self.phase = Phase::Closing;
        ctx.stop();
    }

    fn write_text(&mut self, text: bytestring::ByteString) -> Result<(), TransportError> {
        if text.len() > self.settings.max_frame_size {
            return Err(TransportError::FrameTooLarge {
                size: text.len(),
                max: self.settings.max_frame_size,
            });
        }
        match self.sink.as_mut() {
            Some(sink) => {
                sink.write(ws::Message::Text(text))
                    .map_err(|_| TransportError::ConnectionClosed {
                        code: None,
                        reason: "sink closed".into(),
                    })
            }
            None => Err(TransportError::ConnectionClosed {
                code: None,
                reason: "not connected".into(),
            }),
        }
    }

    fn schedule_heartbeat(&mut self, ctx: &mut Context<Self>, after: Duration) {
        if let Some(handle) = self.heartbeat_timer.take() {
            ctx.cancel_future(handle);
        }
        self.heartbeat_timer = Some(ctx.run_later(after, |act, ctx| act.check_heartbeat(ctx)));
    }

    fn check_heartbeat(&mut self, ctx: &mut Context<Self>) {
        self.heartbeat_timer = None;
        match self.heartbeat.poll(Instant::now()) {
            HeartbeatAction::Continue { ping, next_check } => {
                if ping {
                    if let Some(sink) = self.sink.as_mut() {
                        let _ = sink.write(ws::Message::Ping(Bytes::new()));
                    }
                }
                self.schedule_heartbeat(ctx, next_check);
            }
            HeartbeatAction::TimedOut { silent_for } => {
                self.end(
                    ctx,
                    TransportError::HeartbeatTimeout { silent_for },
                    Some(ws::CloseCode::Away),
                );
            }
        }
    }

    fn on_text(&mut self, ctx: &mut Context<Self>, bytes: &Bytes) {
        match Frame::decode_shared(bytes, self.settings.max_frame_size) {
            Ok(frame) => self.on_frame(ctx, frame),
            Err(error) => self.refuse(ctx, error),
        }
    }

    fn refuse(&mut self, ctx: &mut Context<Self>, error: TransportError) {
        let code = match error {
            TransportError::FrameTooLarge { .. } => ws::CloseCode::Size,
            _ => ws::CloseCode::Protocol,
        };
        self.end(ctx, error, Some(code));
    }

    /// v2 records, on a connection whose welcome said v2.
    fn on_binary(&mut self, ctx: &mut Context<Self>, bytes: &Bytes) {
        if self.version < 2 || self.phase != Phase::Open {
            let error = TransportError::UnexpectedFrame {
                expected: "a text frame",
                got: "binary frame".into(),
            };
            self.end(ctx, error, Some(ws::CloseCode::Unsupported));
            return;
        }
        // Payloads are delivered as they came: one that is not what its reader expects fails
        // that reader's decode, never the connection (a poison message would otherwise cut
        // every subscriber off at each replay of it).
        match v2::decode(bytes, self.settings.max_frame_size) {
            Ok(records) => {
                for record in records {
                    if self.phase != Phase::Open {
                        return;
                    }
                    // A run goes to its channel whole; the rest frame by frame.
                    let channel = match &record {
                        v2::Record::Message(r) => Some(r.channel.as_str()),
                        v2::Record::Ack(r) => Some(r.channel.as_str()),
                        _ => None,
                    };
                    let route = channel.and_then(|name| self.routes.borrow().get(name).cloned());
                    match route {
                        Some(link) => link.do_send(ChannelLink::InboundRun(record)),
                        None => {
                            for frame in record.into_frames() {
                                self.on_frame(ctx, frame);
                            }
                        }
                    }
                }
            }
            Err(error) => self.refuse(ctx, error),
        }
    }

    fn on_frame(&mut self, ctx: &mut Context<Self>, frame: Frame) {
        match (self.phase, frame) {
            (Phase::AwaitingWelcome, Frame::Welcome(welcome)) => {
                if !SUPPORTED_VERSIONS.contains(&welcome.v) || welcome.v > self.hello.v {
                    let error = TransportError::UnsupportedVersion {
                        got: welcome.v,
                        supported: SUPPORTED_VERSIONS
                            .iter()
                            .copied()
                            .filter(|v| *v <= self.hello.v)
                            .collect(),
                    };
                    self.end(ctx, error, Some(ws::CloseCode::Policy));
                    return;
                }
                self.version = welcome.v;
                self.phase = Phase::Open;
                self.established = true;
                tracing::debug!(conn_id = self.conn_id, session = %welcome.session, resumed = welcome.resumed, "welcome received");
                self.supervisor.do_send(WsEvent::Established {
                    conn_id: self.conn_id,
                    endpoint: self.endpoint.clone(),
                    welcome,
                    addr: ctx.address(),
                });
            }
            // Connection-level errors end the connection; errors about one channel (or one
            // publish) are that channel's business and travel on like any channel frame.
            (_, Frame::Error(err))
                if err.channel.is_none() && (err.permanent || self.phase != Phase::Open) =>
            {
                self.end(ctx, err.into_error(), Some(ws::CloseCode::Normal));
            }
            (Phase::Open, frame) => {
                // Channel frames go straight to their channel (one hop, in socket order); the
                // rest to the supervisor.
                let route = frame
                    .channel()
                    .and_then(|name| self.routes.borrow().get(name).cloned());
                match route {
                    Some(link) => link.do_send(ChannelLink::Inbound(frame)),
                    None => self.supervisor.do_send(WsEvent::Inbound {
                        conn_id: self.conn_id,
                        frame,
                    }),
                }
            }
            (_, frame) => {
                let error = TransportError::UnexpectedFrame {
                    expected: "welcome",
                    got: frame.kind().to_owned(),
                };
                self.end(ctx, error, Some(ws::CloseCode::Protocol));
            }
        }
    }
}

impl Actor for WebSocketActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let timeout = self.settings.handshake_timeout;
        ctx.run_later(timeout, move |act, ctx| {
            if matches!(act.phase, Phase::Connecting | Phase::AwaitingWelcome) {
                let error = TransportError::HandshakeTimeout {
                    endpoint: act.endpoint.clone(),
                    after: timeout,
                };
                act.end(ctx, error, Some(ws::CloseCode::Away));
            }
        });

        let request = self
            .client
            .ws(self.endpoint.as_str())
            .max_frame_size(self.settings.max_frame_size);
        ctx.spawn(request.connect().into_actor(self).map(|result, act, ctx| {
            if act.phase != Phase::Connecting {
                return;
            }
            match result {
                Ok((_response, framed)) => {
                    let (sink, stream) = framed.split();
                    ctx.add_stream(stream);
                    act.sink = Some(SinkWrite::new(sink, ctx));
                    act.phase = Phase::AwaitingWelcome;
                    act.heartbeat.on_activity(Instant::now());
                    let hello = Frame::Hello(act.hello.clone()).encode();
                    if let Err(error) = act.write_text(hello.into()) {
                        act.end(ctx, error, None);
                        return;
                    }
                    let first_check = act.settings.heartbeat_interval;
                    act.schedule_heartbeat(ctx, first_check);
                }
                Err(e) => {
                    let error = connect_error(&act.endpoint, &e);
                    if let TransportError::TlsCertificate { reason, .. } = &error {
                        tracing::warn!(conn_id = act.conn_id, endpoint = %act.endpoint, %reason, "hub certificate refused");
                    }
                    act.end(ctx, error, None);
                }
            }
        }));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        let error = self
            .ending
            .take()
            .unwrap_or(TransportError::ConnectionClosed {
                code: None,
                reason: "connection actor stopped".into(),
            });
        self.supervisor.do_send(WsEvent::Ended {
            conn_id: self.conn_id,
            established: self.established,
            error,
        });
    }
}

/// The typed error for a failed connect + upgrade: a TLS handshake failure (rustls' error inside
/// the connector's I/O error) is [`TransportError::TlsCertificate`] or
/// [`TransportError::TlsHandshake`]; anything else [`TransportError::Connect`].
fn connect_error(endpoint: &str, error: &awc::error::WsClientError) -> TransportError {
    use awc::error::{ConnectError, SendRequestError, WsClientError};
    if let WsClientError::SendRequest(SendRequestError::Connect(ConnectError::Io(io))) = error {
        if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            return HandshakeFailure::error(endpoint, tls);
        }
    }
    TransportError::Connect {
        endpoint: endpoint.to_owned(),
        message: error.to_string(),
    }
}

impl WriteHandler<WsProtocolError> for WebSocketActor {
    fn error(&mut self, err: WsProtocolError, ctx: &mut Self::Context) -> Running {
        let error = TransportError::ConnectionClosed {
            code: None,
            reason: format!("write failed: {err}"),
        };
        self.end(ctx, error, None);
        Running::Stop
    }
}

impl StreamHandler<Result<ws::Frame, WsProtocolError>> for WebSocketActor {
    fn handle(&mut self, item: Result<ws::Frame, WsProtocolError>, ctx: &mut Context<Self>) {
        self.heartbeat.on_activity(Instant::now());
        match item {
            Ok(ws::Frame::Text(bytes)) => self.on_text(ctx, &bytes),
            Ok(ws::Frame::Binary(bytes)) => self.on_binary(ctx, &bytes),
            Ok(ws::Frame::Ping(payload)) => {
                if let Some(sink) = self.sink.as_mut() {
                    let _ = sink.write(ws::Message::Pong(payload));
                }
            }
            Ok(ws::Frame::Pong(_)) => {}
            Ok(ws::Frame::Close(reason)) => {
                let error = TransportError::ConnectionClosed {
                    code: reason.as_ref().map(|r| u16::from(r.code)),
                    reason: reason
                        .and_then(|r| r.description)
                        .unwrap_or_else(|| "closed by peer".into()),
                };
                self.end(ctx, error, None);
            }
            Ok(ws::Frame::Continuation(_)) => {
                let error = TransportError::UnexpectedFrame {
                    expected: "an unfragmented frame",
                    got: "fragmented frame".into(),
                };
                self.end(ctx, error, Some(ws::CloseCode::Unsupported));
            }
            Err(WsProtocolError::Overflow) => {
                let error = TransportError::FrameTooLarge {
                    size: self.settings.max_frame_size + 1,
                    max: self.settings.max_frame_size,
                };
                self.end(ctx, error, Some(ws::CloseCode::Size));
            }
            Err(e) => {
                let error = TransportError::ConnectionClosed {
                    code: None,
                    reason: e.to_string(),
                };
                self.end(ctx, error, None);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        let error = TransportError::ConnectionClosed {
            code: None,
            reason: "connection reset or closed without a close frame".into(),
        };
        self.end(ctx, error, None);
    }
}

impl Handler<SendFrame> for WebSocketActor {
    type Result = Result<(), TransportError>;

    fn handle(&mut self, SendFrame(frame): SendFrame, ctx: &mut Context<Self>) -> Self::Result {
        if self.phase != Phase::Open {
            return Err(TransportError::ConnectionClosed {
                code: None,
                reason: "connection not established".into(),
            });
        }
        if self.version < 2 {
            return self.write_text(frame.encode().into());
        }
        self.gather(ctx, frame)
    }
}

impl Handler<SendFrames> for WebSocketActor {
    type Result = Result<(), TransportError>;

    fn handle(&mut self, SendFrames(frames): SendFrames, ctx: &mut Context<Self>) -> Self::Result {
        for frame in frames {
            <Self as Handler<SendFrame>>::handle(self, SendFrame(frame), ctx)?;
        }
        Ok(())
    }
}

impl WebSocketActor {
    /// Adds `frame` to the v2 batch: a publish following the last one of its channel joins
    /// its run. The batch goes out at the next [`Flush`] (after whatever else is already in
    /// the mailbox: no wait when idle), or at once when it reaches [`MAX_BATCH_BYTES`].
    fn gather(&mut self, ctx: &mut Context<Self>, frame: Frame) -> Result<(), TransportError> {
        let (record, added) = match frame {
            Frame::Publish(p) => {
                if let Some(v2::Record::Publish(run)) = self.batch.last_mut() {
                    if run.channel == p.channel
                        && run.first_seq + run.payloads.len() as u64 == p.seq
                    {
                        self.batch_bytes += 4 + p.payload.len();
                        run.payloads.push(p.payload);
                        return self.after_gather(ctx);
                    }
                }
                let record = v2::Record::Publish(v2::PublishRun {
                    channel: p.channel,
                    first_seq: p.seq,
                    payloads: vec![p.payload],
                });
                let len = record.encoded_len();
                (record, len)
            }
            other => {
                let record = v2::Record::Control(other);
                let len = record.encoded_len();
                (record, len)
            }
        };
        if added > self.settings.max_frame_size {
            return Err(TransportError::FrameTooLarge {
                size: added,
                max: self.settings.max_frame_size,
            });
        }
        if self.batch_bytes + added > MAX_BATCH_BYTES.min(self.settings.max_frame_size) {
            self.flush()?;
        }
        self.batch.push(record);
        self.batch_bytes += added;
        self.after_gather(ctx)
    }

    fn after_gather(&mut self, ctx: &mut Context<Self>) -> Result<(), TransportError> {
        if self.batch_bytes >= MAX_BATCH_BYTES.min(self.settings.max_frame_size) {
            return self.flush();
        }
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(Flush);
        }
        Ok(())
    }

    /// Writes the gathered records as one binary frame.
    fn flush(&mut self) -> Result<(), TransportError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut buf = bytes::BytesMut::with_capacity(self.batch_bytes);
        for record in self.batch.drain(..) {
            v2::encode(&record, &mut buf);
        }
        self.batch_bytes = 0;
        match self.sink.as_mut() {
            Some(sink) => sink.write(ws::Message::Binary(buf.freeze())).map_err(|_| {
                TransportError::ConnectionClosed {
                    code: None,
                    reason: "sink closed".into(),
                }
            }),
            None => Err(TransportError::ConnectionClosed {
                code: None,
                reason: "not connected".into(),
            }),
        }
    }
}

impl Handler<Flush> for WebSocketActor {
    type Result = ();

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        self.flush_scheduled = false;
        if let Err(error) = self.flush() {
            self.end(ctx, error, None);
        }
    }
}

impl Handler<CloseConnection> for WebSocketActor {
    type Result = ();

    fn handle(&mut self, _: CloseConnection, ctx: &mut Context<Self>) {
        self.end(ctx, TransportError::Closed, Some(ws::CloseCode::Normal));
    }
}
