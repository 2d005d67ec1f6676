//! The TransportActor: one logical connection that survives many physical ones — the shell
//! around a [`ConnectionCore`].
//!
//! The core makes every lifecycle decision: when an attempt goes out and where, what a failed
//! attempt or a lost connection leads to (through the
//! [`ReconnectManager`](crate::ReconnectManager)), the stability window, manual reconnects, the
//! channels' resync, closing; every state change goes through the
//! [`ConnectionFsm`](crate::state::ConnectionFsm) table. The actor only translates: the
//! [`WebSocketActor`]'s reports, application messages and its two timers become [`Event`]s; the
//! [`Action`]s that come back start or close a [`WebSocketActor`], tell the channels, and
//! publish each [`ConnectionStateChanged`] to every subscriber. Each timer's `SpawnHandle` is
//! kept on the core's deadline and cancelled when it changes, so a closed transport has nothing
//! left that can fire.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::SystemTime;

use actix::prelude::*;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::config::TransportConfig;
pub use crate::core::ReconnectOutcome;
use crate::core::{Action, ConnectionCore, Event, Link, Timer};
use crate::error::TransportError;
use crate::events::{event_channel, EventReceiver, DEFAULT_EVENT_CAPACITY};
use crate::protocol::{Frame, Hello, InstanceId, SessionId};
use crate::state::{ConnectionState, ConnectionStateChanged};
use crate::status::{unix_ms, ChannelSummary, TransportStatus};
use crate::ws_actor::{CloseConnection, WebSocketActor, WsEvent, WsSettings};

/// Subscribes a recipient to every [`ConnectionStateChanged`] from now on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubscribeState(pub Recipient<ConnectionStateChanged>);

/// Asks for a [`TransportStatus`] snapshot (without the per-channel part, which
/// [`Transport::status`] gathers from the channels themselves).
#[derive(Message)]
#[rtype(result = "(TransportStatus, Vec<Recipient<QueryChannel>>)")]
pub struct GetStatus;

/// Connect now, skipping any scheduled wait (rate-limited).
#[derive(Message)]
#[rtype(result = "Result<ReconnectOutcome, TransportError>")]
pub struct ReconnectNow;

/// Closes the transport: the connection, every timer, and the actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close;

/// What a transport tells each channel registered on it.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum ChannelLink {
    /// A connection is up (welcome validated): attach and replay now, then answer with
    /// [`ChannelSynced`].
    Up {
        /// Where to send frames.
        conn: Addr<WebSocketActor>,
        /// The hub session.
        session: SessionId,
        /// Whether the hub resumed the previous session.
        resumed: bool,
        /// Identifies this resync; echo it in [`ChannelSynced`].
        generation: u64,
    },
    /// The connection is gone; another will follow (or the transport fails).
    Down(TransportError),
    /// The transport failed permanently (auth rejected, version mismatch, gave up): answer
    /// every pending publish with this error. A manual reconnect may bring `Up` again.
    Failed(TransportError),
    /// A frame for this channel arrived.
    Inbound(Frame),
    /// A v2 run of messages or acks for this channel arrived, whole (one mailbox message for
    /// the run).
    InboundRun(crate::protocol::v2::Record),
    /// The transport left `Failed` (a manual reconnect): publishes are accepted again.
    Retrying,
    /// The transport was closed; nothing more will come.
    Closed,
}

/// Asks a channel for its [`ChannelSummary`] (for [`Transport::status`]).
#[derive(Debug, Message)]
#[rtype(result = "ChannelSummary")]
pub struct QueryChannel;

/// The channels registered on a transport, shared with its connection actors (same thread) so
/// that channel frames go straight from the socket to their channel.
pub type ChannelRoutes = Rc<RefCell<HashMap<String, Recipient<ChannelLink>>>>;

/// Registers a channel under `name`: it receives its frames and the connection's ups and downs.
#[derive(Message)]
#[rtype(result = "Result<(), TransportError>")]
pub struct RegisterChannel {
    /// Channel name (unique per transport).
    pub name: String,
    /// Where the channel's frames and link events go.
    pub link: Recipient<ChannelLink>,
    /// Where to ask for the channel's status.
    pub status: Recipient<QueryChannel>,
}

/// Removes a channel registration.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UnregisterChannel {
    /// Channel name.
    pub name: String,
}

/// A channel finished re-attaching after [`ChannelLink::Up`] (attached and replayed, or given
/// up on this connection). When every channel has, the transport leaves `Syncing`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ChannelSynced {
    /// Channel name.
    pub name: String,
    /// The generation of the [`ChannelLink::Up`] this answers (stale answers are ignored).
    pub generation: u64,
}

/// The actor behind a [`Transport`]: a [`ConnectionCore`] and the I/O it asks for. Use the
/// handle; the messages are public for applications that prefer to talk to the actor directly.
pub struct TransportActor {
    core: ConnectionCore,
    config: TransportConfig,
    subscribers: Vec<Recipient<ConnectionStateChanged>>,
    /// The current state, for readers that must not wait ([`Transport::state`]).
    state_tx: watch::Sender<ConnectionState>,
    client: Option<awc::Client>,
    /// The socket actor of the core's current connection, by connection id.
    conn: Option<(u64, Addr<WebSocketActor>)>,
    channels: ChannelRoutes,
    channel_status: HashMap<String, Recipient<QueryChannel>>,
    /// The core's retry deadline as scheduled, with its wall-clock time (for the status).
    retry_timer: Option<(std::time::Instant, SystemTime, SpawnHandle)>,
    /// The core's stability deadline as scheduled.
    stability_timer: Option<(std::time::Instant, SpawnHandle)>,
    /// The core's `connected_at` and its wall-clock time (for the status).
    connected_since: Option<(std::time::Instant, SystemTime)>,
    span: tracing::Span,
}

impl TransportActor {
    /// A transport actor for `config` that will publish to `subscribers` from its very first
    /// transition.
    pub fn new(
        config: TransportConfig,
        subscribers: Vec<Recipient<ConnectionStateChanged>>,
    ) -> Self {
        let span = tracing::info_span!("transport", client_id = %config.client_id);
        TransportActor {
            core: ConnectionCore::new(&config, Instant::now().into_std()),
            subscribers,
            state_tx: watch::Sender::new(ConnectionState::Initialized),
            client: None,
            conn: None,
            channels: ChannelRoutes::default(),
            channel_status: HashMap::new(),
            retry_timer: None,
            stability_timer: None,
            connected_since: None,
            span,
            config,
        }
    }

    /// A receiver of the current state, updated before each transition is published (so it
    /// may be ahead of events still queued for a subscriber). Still readable after the actor
    /// stopped: it then holds the last state, `Closed`.
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.state_tx.subscribe()
    }

    /// Feeds `event` to the core, carries out what it decides, and keeps the timers on the
    /// core's deadlines.
    fn run(&mut self, ctx: &mut Context<Self>, event: Event) {
        let now = Instant::now().into_std();
        self.span.in_scope(|| self.core.handle(now, event));
        self.perform_all(ctx, now);
    }

    /// Carries out every action the core has decided, then brings the timers and the
    /// wall-clock stamps in step with it.
    fn perform_all(&mut self, ctx: &mut Context<Self>, now: std::time::Instant) {
        while let Some(action) = self.core.poll_action() {
            self.perform(ctx, action);
        }
        if self.conn.as_ref().map(|(id, _)| *id) != self.core.conn_id() {
            self.conn = None;
        }
        self.sync_timers(ctx, now);
        let connected_at = self.core.connected_at();
        if connected_at != self.connected_since.map(|(at, _)| at) {
            self.connected_since = connected_at.map(|at| (at, SystemTime::now()));
        }
    }

    fn perform(&mut self, ctx: &mut Context<Self>, action: Action) {
        match action {
            Action::Connect {
                conn_id,
                endpoint,
                hello,
                attempt,
            } => self.connect(ctx, conn_id, endpoint, hello, attempt),
            Action::CloseConnection => {
                if let Some((_, addr)) = self.conn.take() {
                    addr.do_send(CloseConnection);
                }
            }
            Action::LinkAll(Link::Closed) => {
                for (_, link) in self.channels.borrow_mut().drain() {
                    link.do_send(ChannelLink::Closed);
                }
            }
            Action::LinkAll(link) => {
                if let Some(link) = self.channel_link(link) {
                    for to in self.channels.borrow().values() {
                        to.do_send(link.clone());
                    }
                }
            }
            Action::LinkOne { name, link } => {
                let to = self.channels.borrow().get(&name).cloned();
                if let (Some(to), Some(link)) = (to, self.channel_link(link)) {
                    to.do_send(link);
                }
            }
            Action::StateChanged(event) => {
                self.state_tx.send_replace(event.to);
                self.subscribers.retain(|s| s.connected());
                for s in &self.subscribers {
                    s.do_send(event.clone());
                }
            }
            Action::Stop => ctx.stop(),
        }
    }

    /// The link message for `link` (`Up` only while there is a connection to hand out).
    fn channel_link(&self, link: Link) -> Option<ChannelLink> {
        Some(match link {
            Link::Up {
                session,
                resumed,
                generation,
            } => ChannelLink::Up {
                conn: self.conn.as_ref()?.1.clone(),
                session,
                resumed,
                generation,
            },
            Link::Down(error) => ChannelLink::Down(error),
            Link::Failed(error) => ChannelLink::Failed(error),
            Link::Retrying => ChannelLink::Retrying,
            Link::Closed => ChannelLink::Closed,
        })
    }

    /// Opens physical connection `id`: a new [`WebSocketActor`] on this arbiter.
    fn connect(
        &mut self,
        ctx: &mut Context<Self>,
        id: u64,
        endpoint: String,
        hello: Hello,
        attempt: u32,
    ) {
        let settings = WsSettings {
            heartbeat_interval: self.config.heartbeat_interval,
            idle_timeout: self.config.idle_timeout,
            handshake_timeout: self.config.handshake_timeout,
            max_frame_size: self.config.max_frame_size,
        };
        let tls = self.config.tls.rustls_config().cloned();
        let local = self.config.local_address;
        let client = self
            .client
            .get_or_insert_with(|| websocket_client(tls, local))
            .clone();
        tracing::debug!(parent: &self.span, conn_id = id, attempt, %endpoint, "opening connection");
        let ws = WebSocketActor::new(
            id,
            endpoint,
            hello,
            settings,
            client,
            ctx.address().recipient(),
            self.channels.clone(),
        );
        // Started on this actor's arbiter: the client (awc) is single-threaded.
        let span = tracing::info_span!(parent: &self.span, "connection", conn_id = id, attempt);
        let addr = {
            let _enter = span.enter();
            ws.start()
        };
        self.conn = Some((id, addr));
    }

    /// Keeps one timer on each of the core's deadlines.
    fn sync_timers(&mut self, ctx: &mut Context<Self>, now: std::time::Instant) {
        let wanted = self.core.deadline(Timer::Retry);
        if wanted != self.retry_timer.as_ref().map(|(at, _, _)| *at) {
            if let Some((_, _, handle)) = self.retry_timer.take() {
                ctx.cancel_future(handle);
            }
            if let Some(at) = wanted {
                let delay = at.saturating_duration_since(now);
                let handle = ctx.run_later(delay, |act, ctx| {
                    act.retry_timer = None;
                    act.run(ctx, Event::Timeout(Timer::Retry));
                });
                self.retry_timer = Some((at, SystemTime::now() + delay, handle));
            }
        }
        let wanted = self.core.deadline(Timer::Stability);
        if wanted != self.stability_timer.as_ref().map(|(at, _)| *at) {
            if let Some((_, handle)) = self.stability_timer.take() {
                ctx.cancel_future(handle);
            }
            if let Some(at) = wanted {
                let handle = ctx.run_later(at.saturating_duration_since(now), |act, ctx| {
                    act.stability_timer = None;
                    act.run(ctx, Event::Timeout(Timer::Stability));
                });
                self.stability_timer = Some((at, handle));
            }
        }
    }

    /// Takes channels whose actor is gone out of the registry: they cannot answer a resync.
    fn prune_channels(&mut self) {
        let gone: Vec<String> = self
            .channels
            .borrow()
            .iter()
            .filter(|(_, link)| !link.connected())
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.channels.borrow_mut().remove(&name);
            self.channel_status.remove(&name);
            self.span.in_scope(|| {
                self.core
                    .handle(Instant::now().into_std(), Event::ChannelUnregistered(name))
            });
        }
    }

    fn status(&self) -> TransportStatus {
        let mut status = self.core.status(Instant::now().into_std());
        status.next_retry_at_unix_ms = self.retry_timer.as_ref().map(|(_, wall, _)| unix_ms(*wall));
        status.connected_since_unix_ms = self.connected_since.map(|(_, wall)| unix_ms(wall));
        status
    }
}

/// The HTTP client for WebSocket upgrades: HTTP/1.1, and TCP_NODELAY on every socket so that
/// small frames (publishes, acks) are not held back by Nagle's algorithm. `tls` serves the
/// `wss://` endpoints; without it (every endpoint `ws://`) the client has no TLS at all.
fn websocket_client(
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    local: Option<std::net::IpAddr>,
) -> awc::Client {
    use actix_service::{Service as _, ServiceExt as _};
    type Tcp = actix_tls::connect::Connection<awc::http::Uri, actix_rt::net::TcpStream>;
    type Info = actix_tls::connect::ConnectInfo<awc::http::Uri>;
    let connector: actix_tls::connect::ConnectorService =
        actix_tls::connect::Connector::default().service();
    let tcp = actix_service::apply_fn::<_, _, _, _, Info, Info, _, _>(
        connector,
        move |info: Info, service: &actix_tls::connect::ConnectorService| {
            let info = match local {
                Some(ip) => info.set_local_addr(ip),
                None => info,
            };
            service.call(info)
        },
    )
    .map(|conn: Tcp| {
        if let Err(e) = conn.io_ref().set_nodelay(true) {
            tracing::debug!(%e, "could not set TCP_NODELAY");
        }
        conn
    });
    // HTTP/1.1 only: the TLS configuration offers just `http/1.1` by ALPN, and a plain
    // connection never upgrades to h2 (awc's `max_http_version` would replace the TLS
    // configuration with its own default, so it is not used).
    let mut connector = awc::Connector::new().connector(tcp);
    if let Some(tls) = tls {
        connector = connector.rustls_0_23(tls);
    }
    awc::Client::builder().connector(connector).finish()
}

impl Actor for TransportActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.run(ctx, Event::Started);
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        // Whatever stopped us, nothing is left open (no timers to keep in step any more).
        let now = Instant::now().into_std();
        self.span.in_scope(|| self.core.handle(now, Event::Stopped));
        while let Some(action) = self.core.poll_action() {
            self.perform(ctx, action);
        }
    }
}

impl Handler<WsEvent> for TransportActor {
    type Result = ();

    fn handle(&mut self, event: WsEvent, ctx: &mut Context<Self>) {
        let current = self.core.conn_id();
        match event {
            WsEvent::Established {
                conn_id,
                endpoint,
                welcome,
                addr,
            } => {
                if Some(conn_id) == current {
                    self.conn = Some((conn_id, addr));
                    self.prune_channels();
                }
                let event = Event::Established {
                    conn_id,
                    endpoint,
                    session: welcome.session,
                    resumed: welcome.resumed,
                };
                self.run(ctx, event);
            }
            WsEvent::Inbound { conn_id, frame } if Some(conn_id) == current => match frame {
                frame if frame.channel().is_some() => {
                    let name = frame.channel().unwrap_or_default();
                    match self.channels.borrow().get(name) {
                        Some(link) => link.do_send(ChannelLink::Inbound(frame)),
                        None => {
                            tracing::debug!(parent: &self.span, channel = name, kind = frame.kind(), "frame for a channel that is not open")
                        }
                    }
                }
                Frame::Error(error) => self.run(ctx, Event::HubError { conn_id, error }),
                other => {
                    tracing::debug!(parent: &self.span, conn_id, kind = other.kind(), "frame with no handler");
                }
            },
            WsEvent::Inbound { .. } => {
                tracing::trace!(parent: &self.span, ?event, "stale connection event")
            }
            WsEvent::Ended {
                conn_id,
                error,
                established,
            } => self.run(
                ctx,
                Event::Ended {
                    conn_id,
                    error,
                    established,
                },
            ),
        }
    }
}

impl Handler<SubscribeState> for TransportActor {
    type Result = ();

    fn handle(&mut self, msg: SubscribeState, _ctx: &mut Context<Self>) {
        self.subscribers.push(msg.0);
    }
}

impl Handler<GetStatus> for TransportActor {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _: GetStatus, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult((
            self.status(),
            self.channel_status.values().cloned().collect(),
        ))
    }
}

impl Handler<ReconnectNow> for TransportActor {
    type Result = Result<ReconnectOutcome, TransportError>;

    fn handle(&mut self, _: ReconnectNow, ctx: &mut Context<Self>) -> Self::Result {
        let now = Instant::now().into_std();
        let outcome = self.span.in_scope(|| self.core.reconnect_now(now));
        self.perform_all(ctx, now);
        outcome
    }
}

impl Handler<Close> for TransportActor {
    type Result = ();

    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) {
        self.run(ctx, Event::Close);
    }
}

impl Handler<RegisterChannel> for TransportActor {
    type Result = Result<(), TransportError>;

    fn handle(&mut self, msg: RegisterChannel, ctx: &mut Context<Self>) -> Self::Result {
        let held = self
            .channels
            .borrow()
            .get(&msg.name)
            .is_some_and(|l| l.connected());
        let result = self
            .span
            .in_scope(|| self.core.register_channel(&msg.name, held));
        result?;
        // The route goes in first: what the core says to the new channel goes there.
        self.channel_status.insert(msg.name.clone(), msg.status);
        self.channels.borrow_mut().insert(msg.name, msg.link);
        self.perform_all(ctx, Instant::now().into_std());
        Ok(())
    }
}

impl Handler<UnregisterChannel> for TransportActor {
    type Result = ();

    fn handle(&mut self, msg: UnregisterChannel, ctx: &mut Context<Self>) {
        self.channels.borrow_mut().remove(&msg.name);
        self.channel_status.remove(&msg.name);
        self.run(ctx, Event::ChannelUnregistered(msg.name));
    }
}

impl Handler<ChannelSynced> for TransportActor {
    type Result = ();

    fn handle(&mut self, msg: ChannelSynced, ctx: &mut Context<Self>) {
        self.run(
            ctx,
            Event::ChannelSynced {
                name: msg.name,
                generation: msg.generation,
            },
        );
    }
}

/// The application's handle on one logical connection. Cheap to clone.
///
/// Must be created inside an actix system (`#[actix::main]`, `actix_rt::System`, or an
/// actix-web server), because the transport is an actor on the current arbiter.
#[derive(Clone)]
pub struct Transport {
    addr: Addr<TransportActor>,
    client_id: crate::protocol::ClientId,
    instance_id: InstanceId,
    max_frame_size: usize,
    state: watch::Receiver<ConnectionState>,
}

impl Transport {
    /// Starts the transport: it connects at once and keeps reconnecting per its policy.
    pub fn start(config: TransportConfig) -> Transport {
        Self::start_with_subscribers(config, Vec::new())
    }

    /// Starts the transport with subscribers that see every transition, the very first one
    /// (`Initialized → Connecting`) included.
    pub fn start_with_subscribers(
        config: TransportConfig,
        subscribers: Vec<Recipient<ConnectionStateChanged>>,
    ) -> Transport {
        let mut config = config;
        let instance_id = config
            .instance_id
            .get_or_insert_with(InstanceId::random)
            .clone();
        let client_id = config.client_id.clone();
        let max_frame_size = config.max_frame_size;
        let actor = TransportActor::new(config, subscribers);
        let state = actor.watch_state();
        Transport {
            addr: actor.start(),
            client_id,
            instance_id,
            max_frame_size,
            state,
        }
    }

    /// Starts the transport and returns a receiver of its state transitions from the first one
    /// on, bounded at [`DEFAULT_EVENT_CAPACITY`]: every transition in order, or — if the
    /// receiver falls that far behind — a [`StateEvent::Lagged`](crate::StateEvent::Lagged)
    /// with the count missed and the latest transition, then the ones after it.
    pub fn start_with_events(
        config: TransportConfig,
    ) -> (Transport, EventReceiver<ConnectionStateChanged>) {
        let (recipient, events) = event_channel(DEFAULT_EVENT_CAPACITY);
        (
            Self::start_with_subscribers(config, vec![recipient]),
            events,
        )
    }

    /// This transport's client id.
    pub fn client_id(&self) -> &crate::protocol::ClientId {
        &self.client_id
    }

    /// This transport's instance id (sent in every hello; see
    /// [`TransportConfig::instance_id`](crate::TransportConfig::instance_id)).
    pub fn instance_id(&self) -> &InstanceId {
        &self.instance_id
    }

    /// Registers a channel on this transport (used by the channels layer).
    pub async fn register_channel(
        &self,
        name: String,
        link: Recipient<ChannelLink>,
        status: Recipient<QueryChannel>,
    ) -> Result<(), TransportError> {
        self.addr
            .send(RegisterChannel { name, link, status })
            .await
            .map_err(|_| TransportError::Closed)?
    }

    /// Removes a channel registration.
    pub fn unregister_channel(&self, name: String) {
        self.addr.do_send(UnregisterChannel { name });
    }

    /// Tells the transport that a channel finished re-attaching after the `Up` of
    /// `generation`.
    pub fn channel_synced(&self, name: String, generation: u64) {
        self.addr.do_send(ChannelSynced { name, generation });
    }

    /// The largest frame this transport sends or accepts.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    /// Subscribes `recipient` to every transition from now on (an actor gets each one in its
    /// mailbox; a Recipient from [`event_channel`] bounds what it holds, see there). The state
    /// it starts from is [`Transport::state`].
    pub fn subscribe(&self, recipient: Recipient<ConnectionStateChanged>) {
        self.addr.do_send(SubscribeState(recipient));
    }

    /// The current connection state, without waiting. Updated before each transition is
    /// published, so it may be ahead of events a subscriber has not read yet.
    pub fn state(&self) -> ConnectionState {
        *self.state.borrow()
    }

    /// A `watch` receiver of the connection state: read it at any time, or wait for a change
    /// (`wait_for(|s| s.is_up())`). Intermediate states between two reads are not kept — the
    /// transition events are the complete record.
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// A status snapshot. Fails only when the transport has been closed.
    pub async fn status(&self) -> Result<TransportStatus, TransportError> {
        let (mut status, channels) = self
            .addr
            .send(GetStatus)
            .await
            .map_err(|_| TransportError::Closed)?;
        let summaries =
            futures::future::join_all(channels.iter().map(|c| c.send(QueryChannel))).await;
        status.channels = summaries.into_iter().filter_map(Result::ok).collect();
        status.channels.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(status)
    }

    /// Connects now instead of waiting for the scheduled attempt. Allowed from `Disconnected`,
    /// `Suspended` and `Failed`; at most once per `manual_reconnect_interval`
    /// ([`TransportError::RateLimited`] otherwise).
    pub async fn reconnect_now(&self) -> Result<ReconnectOutcome, TransportError> {
        self.addr
            .send(ReconnectNow)
            .await
            .map_err(|_| TransportError::Closed)?
    }

    /// Closes the connection, cancels every timer and stops the transport. Idempotent.
    pub async fn close(&self) {
        let span = tracing::info_span!("close", client_id = %self.client_id);
        // A mailbox error means the actor is already gone: closed is closed.
        let _ = self.addr.send(Close).instrument(span).await;
    }

    /// Whether the transport actor is still running (false once closed).
    pub fn is_running(&self) -> bool {
        self.addr.connected()
    }

    /// The underlying actor address, for applications that talk to it directly.
    pub fn addr(&self) -> &Addr<TransportActor> {
        &self.addr
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}
