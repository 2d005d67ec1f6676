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
use bytes::{Bytes, BytesMut};
use futures::stream::{SplitSink, StreamExt as _};
use tokio::time::Instant;

use crate::client_codec::{ClientCodec, Outbound, Spare, FRAME_HEADROOM};
use crate::error::TransportError;
use crate::heartbeat::{Heartbeat, HeartbeatAction};
use crate::protocol::{v2, Frame, Hello, Welcome, SUPPORTED_VERSIONS};
use crate::tls::HandshakeFailure;
use crate::transport_actor::{ChannelLink, ChannelRoutes};

type WsSink = SplitSink<actix_codec::Framed<BoxedSocket, ClientCodec>, Outbound>;

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

/// Sends a run of consecutive publishes of one channel (one mailbox message, the channel named
/// once): on v2 it becomes (or joins) a publish-run record; on v1 one JSON `publish` frame per
/// payload, in order. Fails when the connection is not established.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), TransportError>")]
pub struct SendPublishes(pub v2::PublishRun);

/// One thing to put on the connection: a frame, or a run of publishes.
#[derive(Debug)]
pub enum Outgoing {
    /// A frame.
    Frame(Frame),
    /// Consecutive publishes of one channel (see [`SendPublishes`]).
    Publishes(v2::PublishRun),
}

/// Sends several [`Outgoing`]s on the connection, in order (one mailbox message). Fails when
/// the connection is not established.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), TransportError>")]
pub struct SendOutgoing(pub Vec<Outgoing>);

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
    sink: Option<SinkWrite<Outbound, WsSink>>,
    phase: Phase,
    heartbeat: Heartbeat,
    heartbeat_timer: Option<SpawnHandle>,
    ending: Option<TransportError>,
    established: bool,
    /// The protocol version of the connection, from the welcome.
    version: u16,
    /// v2 records waiting for the next [`Flush`].
    batch: v2::Batch,
    /// Frames the batch completed, waiting to be written (kept to reuse its allocation).
    ready: Vec<BytesMut>,
    /// The write buffer the last batch frame replaced, for the next one ([`Spare`]).
    spare: Spare,
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
        let batch =
            v2::Batch::new(MAX_BATCH_BYTES, settings.max_frame_size).with_headroom(FRAME_HEADROOM);
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
            batch,
            ready: Vec::new(),
            spare: Spare::default(),
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
            let _ = sink.write(Outbound::Message(ws::Message::Close(Some(code.into()))));
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
            Some(sink) => sink
                .write(Outbound::Message(ws::Message::Text(text)))
                .map_err(|_| TransportError::ConnectionClosed {
                    code: None,
                    reason: "sink closed".into(),
                }),
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
                        let _ = sink.write(Outbound::Message(ws::Message::Ping(Bytes::new())));
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
                    let (sink, stream) = framed
                        .into_map_codec(|codec| ClientCodec::new(codec, act.spare.clone()))
                        .split();
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
                    let _ = sink.write(Outbound::Message(ws::Message::Pong(payload)));
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
            return Err(Self::not_open());
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

impl Handler<SendPublishes> for WebSocketActor {
    type Result = Result<(), TransportError>;

    fn handle(
        &mut self,
        SendPublishes(run): SendPublishes,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        self.send_publishes(ctx, run)
    }
}

impl Handler<SendOutgoing> for WebSocketActor {
    type Result = Result<(), TransportError>;

    fn handle(
        &mut self,
        SendOutgoing(items): SendOutgoing,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        for item in items {
            match item {
                Outgoing::Frame(frame) => {
                    <Self as Handler<SendFrame>>::handle(self, SendFrame(frame), ctx)?
                }
                Outgoing::Publishes(run) => self.send_publishes(ctx, run)?,
            }
        }
        Ok(())
    }
}

impl WebSocketActor {
    fn not_open() -> TransportError {
        TransportError::ConnectionClosed {
            code: None,
            reason: "connection not established".into(),
        }
    }

    /// A run of publishes: one record on v2, a JSON frame per payload on v1.
    fn send_publishes(
        &mut self,
        ctx: &mut Context<Self>,
        run: v2::PublishRun,
    ) -> Result<(), TransportError> {
        if self.phase != Phase::Open {
            return Err(Self::not_open());
        }
        if self.version >= 2 {
            self.recycle_spare();
            let result = self.batch.push_publishes(run, &mut self.ready);
            return self.after_gather(ctx, result);
        }
        // v1: one frame per publish; the channel name is lent to each frame in turn.
        let mut publish = crate::protocol::Publish {
            channel: run.channel,
            seq: run.first_seq,
            payload: crate::protocol::Payload::from_unchecked(Bytes::new()),
        };
        for (seq, payload) in (run.first_seq..).zip(run.payloads) {
            publish.seq = seq;
            publish.payload = payload;
            let frame = Frame::Publish(publish);
            let text = frame.encode();
            let Frame::Publish(back) = frame else {
                unreachable!("built as a publish")
            };
            publish = back;
            self.write_text(text.into())?;
        }
        Ok(())
    }

    /// Adds `frame` to the v2 batch: a publish following the last one of its channel joins
    /// its run. The batch goes out at the next [`Flush`] (after whatever else is already in
    /// the mailbox: no wait when idle), or at once when it reaches [`MAX_BATCH_BYTES`].
    fn gather(&mut self, ctx: &mut Context<Self>, frame: Frame) -> Result<(), TransportError> {
        self.recycle_spare();
        let result = self.batch.push_frame(frame, &mut self.ready);
        self.after_gather(ctx, result)
    }

    /// Writes the frames the batch completed, and schedules the [`Flush`] of the rest.
    fn after_gather(
        &mut self,
        ctx: &mut Context<Self>,
        result: Result<(), TransportError>,
    ) -> Result<(), TransportError> {
        let written = self.write_ready();
        result?;
        written?;
        if !self.batch.is_empty() && !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(Flush);
        }
        Ok(())
    }

    /// Writes the frames the batch completed, in order.
    fn write_ready(&mut self) -> Result<(), TransportError> {
        let mut result = Ok(());
        for frame in self.ready.drain(..) {
            if result.is_err() {
                continue;
            }
            result = match self.sink.as_mut() {
                Some(sink) => sink.write(Outbound::Batch(frame)).map_err(|_| {
                    TransportError::ConnectionClosed {
                        code: None,
                        reason: "sink closed".into(),
                    }
                }),
                None => Err(TransportError::ConnectionClosed {
                    code: None,
                    reason: "not connected".into(),
                }),
            };
        }
        result
    }

    /// Gives the batch the write buffer the last batch frame replaced, if there is one: before
    /// anything is gathered, since gathering may finish a frame.
    fn recycle_spare(&mut self) {
        if let Some(buf) = self.spare.take() {
            self.batch.recycle(buf);
        }
    }

    /// Writes the gathered records as one binary frame.
    fn flush(&mut self) -> Result<(), TransportError> {
        if let Some(frame) = self.batch.finish() {
            self.ready.push(frame);
        }
        self.write_ready()
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
