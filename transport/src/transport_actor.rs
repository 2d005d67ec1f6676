//! The TransportActor: one logical connection that survives many physical ones.
//!
//! It supervises one [`WebSocketActor`] at a time. When that actor ends, the typed reason goes to
//! the [`ReconnectManager`], whose [`NextStep`] decides the next state and timer. Every state
//! change goes through the [`ConnectionFsm`] table and is published as a
//! [`ConnectionStateChanged`] to every subscriber. Every timer's `SpawnHandle` is kept and
//! cancelled on state change and on stop, so a closed transport has nothing left that can fire.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::config::TransportConfig;
use crate::error::TransportError;
use crate::events::{event_channel, EventReceiver, DEFAULT_EVENT_CAPACITY};
use crate::protocol::{ErrorCode, Frame, Hello, InstanceId, SessionId, CLOSE_SESSION_TAKEN_OVER};
use crate::reconnect::{NextStep, ReconnectManager, Stability};
use crate::state::{ConnectionFsm, ConnectionState, ConnectionStateChanged, TransitionReason};
use crate::status::{unix_ms, ChannelSummary, ErrorSummary, TransportStatus};
use crate::telemetry;
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

/// What `reconnect_now()` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconnectOutcome {
    /// An attempt started now.
    Started,
    /// An attempt was already under way; nothing changed.
    AlreadyConnecting,
    /// The connection is up; nothing changed.
    AlreadyConnected,
}

struct Connection {
    id: u64,
    endpoint: String,
    addr: Option<Addr<WebSocketActor>>,
}

/// The actor behind a [`Transport`]. Use the handle; the messages are public for applications
/// that prefer to talk to the actor directly.
pub struct TransportActor {
    config: TransportConfig,
    fsm: ConnectionFsm,
    manager: ReconnectManager,
    subscribers: Vec<Recipient<ConnectionStateChanged>>,
    /// The current state, for readers that must not wait ([`Transport::state`]).
    state_tx: watch::Sender<ConnectionState>,
    client: Option<awc::Client>,
    conn: Option<Connection>,
    next_conn_id: u64,
    endpoint_index: usize,
    /// Endpoints not yet tried in the current outage (each gets one attempt without a backoff
    /// step before the sequence applies).
    failover_left: usize,
    session: Option<SessionId>,
    retry_timer: Option<SpawnHandle>,
    retry_at: Option<(Instant, SystemTime)>,
    stability_timer: Option<SpawnHandle>,
    reconnect_count: u64,
    ever_connected: bool,
    last_error: Option<TransportError>,
    /// The hub said it is stopping, with when to come back.
    hub_stopping: Option<crate::protocol::RetryWindow>,
    connected_since: Option<SystemTime>,
    lost_at: Option<Instant>,
    instance: InstanceId,
    channels: ChannelRoutes,
    channel_status: HashMap<String, Recipient<QueryChannel>>,
    syncing: HashSet<String>,
    sync_generation: u64,
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
        let manager = ReconnectManager::new(config.reconnect.clone(), config.seed);
        metrics::gauge!(telemetry::CONNECTION_STATE, "state" => ConnectionState::Initialized.as_str())
            .increment(1.0);
        TransportActor {
            fsm: ConnectionFsm::new(Instant::now()),
            manager,
            subscribers,
            state_tx: watch::Sender::new(ConnectionState::Initialized),
            client: None,
            conn: None,
            next_conn_id: 0,
            endpoint_index: 0,
            failover_left: config.endpoints.len().saturating_sub(1),
            session: None,
            retry_timer: None,
            retry_at: None,
            stability_timer: None,
            reconnect_count: 0,
            ever_connected: false,
            last_error: None,
            hub_stopping: None,
            connected_since: None,
            lost_at: None,
            instance: config
                .instance_id
                .clone()
                .unwrap_or_else(InstanceId::random),
            channels: ChannelRoutes::default(),
            channel_status: HashMap::new(),
            syncing: HashSet::new(),
            sync_generation: 0,
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

    /// Applies a transition through the table and publishes it. Refused transitions are logged
    /// and change nothing.
    fn transition(
        &mut self,
        to: ConnectionState,
        reason: TransitionReason,
        attempt: u32,
        retry_in: Option<Duration>,
    ) -> bool {
        let _enter = self.span.enter();
        match self
            .fsm
            .transition(to, reason, attempt, retry_in, Instant::now())
        {
            Ok(event) => {
                tracing::info!(from = %event.from, to = %event.to, attempt, retry_in_ms = retry_in.map(|d| d.as_millis() as u64), reason = %event.reason, "connection state changed");
                metrics::gauge!(telemetry::CONNECTION_STATE, "state" => event.from.as_str())
                    .decrement(1.0);
                metrics::gauge!(telemetry::CONNECTION_STATE, "state" => event.to.as_str())
                    .increment(1.0);
                metrics::counter!(telemetry::STATE_TRANSITIONS, "from" => event.from.as_str(), "to" => event.to.as_str())
                    .increment(1);
                self.state_tx.send_replace(event.to);
                self.subscribers.retain(|s| s.connected());
                if event.from == ConnectionState::Failed {
                    for link in self.channels.borrow().values() {
                        link.do_send(ChannelLink::Retrying);
                    }
                }
                if event.to == ConnectionState::Failed {
                    let error = event
                        .reason
                        .error()
                        .cloned()
                        .or_else(|| self.last_error.clone())
                        .unwrap_or(TransportError::Closed);
                    for link in self.channels.borrow().values() {
                        link.do_send(ChannelLink::Failed(error.clone()));
                    }
                }
                for s in &self.subscribers {
                    s.do_send(event.clone());
                }
                true
            }
            Err(invalid) => {
                tracing::error!(%invalid, "refused invalid state transition");
                false
            }
        }
    }

    fn cancel_retry(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.retry_timer.take() {
            ctx.cancel_future(handle);
        }
        self.retry_at = None;
    }

    fn cancel_stability(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.stability_timer.take() {
            ctx.cancel_future(handle);
        }
    }

    fn current_endpoint(&self) -> String {
        self.config.endpoints[self.endpoint_index % self.config.endpoints.len()].clone()
    }

    /// Moves to `Connecting` for `reason` and opens a new physical connection.
    fn start_attempt(&mut self, ctx: &mut Context<Self>, reason: TransitionReason) {
        self.cancel_retry(ctx);
        let attempt = self.manager.begin_attempt(Instant::now());
        if !self.transition(ConnectionState::Connecting, reason, attempt, None) {
            return;
        }
        metrics::counter!(telemetry::RECONNECT_ATTEMPTS).increment(1);
        self.next_conn_id += 1;
        let endpoint = self.current_endpoint();
        let hello = Hello {
            v: self.config.protocol_version,
            client_id: self.config.client_id.clone(),
            token: self.config.token.clone(),
            resume: self.session.clone(),
            instance: Some(self.instance.clone()),
        };
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
        let id = self.next_conn_id;
        tracing::debug!(parent: &self.span, conn_id = id, attempt, %endpoint, "opening connection");
        let ws = WebSocketActor::new(
            id,
            endpoint.clone(),
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
        self.conn = Some(Connection {
            id,
            endpoint,
            addr: Some(addr),
        });
    }

    /// Carries out the ReconnectManager's decision after a failure or loss.
    fn apply_step(&mut self, ctx: &mut Context<Self>, step: NextStep, reason: TransitionReason) {
        match step {
            NextStep::Retry { delay, attempt } => {
                if self.transition(ConnectionState::Disconnected, reason, attempt, Some(delay)) {
                    self.schedule(ctx, delay, TransitionReason::RetryDue);
                }
            }
            NextStep::Suspend { probe_in, failures } => {
                let attempt = self.manager.attempt();
                tracing::warn!(parent: &self.span, failures, "circuit breaker open; suspending");
                let reason = TransitionReason::BreakerOpened {
                    failures,
                    last_error: reason.error().cloned(),
                };
                if self.transition(ConnectionState::Suspended, reason, attempt, Some(probe_in)) {
                    self.schedule(ctx, probe_in, TransitionReason::ProbeDue);
                }
            }
            NextStep::WaitForManual => {
                let attempt = self.manager.attempt();
                self.transition(ConnectionState::Disconnected, reason, attempt, None);
            }
            NextStep::GiveUp { attempts } => {
                self.transition(
                    ConnectionState::Failed,
                    TransitionReason::GaveUp { attempts },
                    attempts,
                    None,
                );
            }
        }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>, delay: Duration, reason: TransitionReason) {
        self.cancel_retry(ctx);
        self.retry_at = Some((Instant::now() + delay, SystemTime::now() + delay));
        self.retry_timer = Some(ctx.run_later(delay, move |act, ctx| {
            act.retry_timer = None;
            act.retry_at = None;
            // A timer that fires after its wait was cut short (a manual reconnect in the same
            // turn of the event loop) must not start a second attempt.
            if matches!(
                act.fsm.state(),
                ConnectionState::Disconnected | ConnectionState::Suspended
            ) {
                act.start_attempt(ctx, reason);
            }
        }));
    }

    fn on_established(
        &mut self,
        ctx: &mut Context<Self>,
        endpoint: String,
        session: SessionId,
        resumed: bool,
    ) {
        let attempt = self.manager.attempt();
        self.session = Some(session.clone());
        let reason = TransitionReason::HandshakeCompleted {
            endpoint,
            session,
            resumed,
        };
        if !self.transition(ConnectionState::Connected, reason, attempt, None) {
            return;
        }
        if self.ever_connected {
            self.reconnect_count += 1;
            metrics::counter!(telemetry::RECONNECTS).increment(1);
        }
        self.ever_connected = true;
        self.connected_since = Some(SystemTime::now());
        let window = self.manager.on_connected(Instant::now());
        self.arm_stability(ctx, window);
        self.resync_channels(attempt, resumed);
    }

    /// After a (re)connect: every registered channel re-attaches and replays; the connection is
    /// `Syncing` until all of them report back.
    fn resync_channels(&mut self, attempt: u32, resumed: bool) {
        let conn = self.conn.as_ref().and_then(|c| c.addr.clone());
        let (Some(conn), Some(session)) = (conn, self.session.clone()) else {
            return;
        };
        // A channel whose actor is gone cannot answer: forget it rather than wait forever.
        self.channels
            .borrow_mut()
            .retain(|_, link| link.connected());
        self.channel_status
            .retain(|name, _| self.channels.borrow().contains_key(name));
        if self.channels.borrow().is_empty() {
            self.finish_recovery();
            return;
        }
        self.sync_generation += 1;
        self.syncing = self.channels.borrow().keys().cloned().collect();
        let reason = TransitionReason::Resyncing {
            channels: self.syncing.len(),
        };
        if !self.transition(ConnectionState::Syncing, reason, attempt, None) {
            return;
        }
        for link in self.channels.borrow().values() {
            link.do_send(ChannelLink::Up {
                conn: conn.clone(),
                session: session.clone(),
                resumed,
                generation: self.sync_generation,
            });
        }
    }

    fn finish_recovery(&mut self) {
        if let Some(lost) = self.lost_at.take() {
            metrics::histogram!(telemetry::RECOVERY_SECONDS).record(lost.elapsed().as_secs_f64());
        }
    }

    fn arm_stability(&mut self, ctx: &mut Context<Self>, after: Duration) {
        self.cancel_stability(ctx);
        self.stability_timer = Some(ctx.run_later(after, |act, ctx| {
            act.stability_timer = None;
            if let Stability::CheckAgainIn(after) = act.manager.on_stable(Instant::now()) {
                act.arm_stability(ctx, after);
            }
        }));
    }

    fn on_ended(&mut self, ctx: &mut Context<Self>, error: TransportError, established: bool) {
        self.conn = None;
        if matches!(
            error,
            TransportError::ConnectionClosed {
                code: Some(CLOSE_SESSION_TAKEN_OVER),
                ..
            }
        ) {
            // Another connection resumed this session (another process with this client id):
            // resuming it again would take it back, and the two would take turns forever.
            tracing::warn!(parent: &self.span, "session taken over by another connection; the next connection starts a new one");
            self.session = None;
        }
        self.syncing.clear();
        if established {
            for link in self.channels.borrow().values() {
                link.do_send(ChannelLink::Down(error.clone()));
            }
        }
        self.cancel_stability(ctx);
        self.connected_since = None;
        let state = self.fsm.state();
        if state == ConnectionState::Closed {
            return;
        }
        metrics::counter!(telemetry::CONNECTION_FAILURES, "category" => error.category().as_str())
            .increment(1);
        self.last_error = Some(error.clone());
        let now = Instant::now();
        if established && self.lost_at.is_none() {
            self.lost_at = Some(now);
        }
        if error.is_permanent() {
            let attempt = self.manager.attempt();
            self.transition(
                ConnectionState::Failed,
                TransitionReason::PermanentError(error),
                attempt,
                None,
            );
            return;
        }
        let stopping = self.hub_stopping.take();
        let (step, reason) = if let (true, Some(window)) = (established, stopping) {
            // A graceful stop: come back when the hub said, not all at once.
            self.failover_left = self.config.endpoints.len().saturating_sub(1);
            tracing::info!(parent: &self.span, ?window, "hub stopping; reconnecting within its window");
            (
                self.manager.on_hub_shutdown(now, window),
                TransitionReason::ConnectionLost(error),
            )
        } else if established {
            self.failover_left = self.config.endpoints.len().saturating_sub(1);
            (
                self.manager.on_connection_lost(now),
                TransitionReason::ConnectionLost(error),
            )
        } else {
            // A failed attempt moves on to the next endpoint — at once while some endpoint
            // has not been tried in this outage (failover), after a backoff step otherwise.
            self.endpoint_index = self.endpoint_index.wrapping_add(1);
            let step = if self.failover_left > 0 {
                self.failover_left -= 1;
                self.manager.on_attempt_failed_with_alternative(now)
            } else {
                self.manager.on_attempt_failed(now)
            };
            (step, TransitionReason::AttemptFailed(error))
        };
        self.apply_step(ctx, step, reason);
    }

    fn status(&self) -> TransportStatus {
        let now = Instant::now();
        TransportStatus {
            client_id: self.config.client_id.clone(),
            state: self.fsm.state(),
            attempt: self.manager.attempt(),
            next_retry_in_ms: self
                .retry_at
                .map(|(at, _)| at.saturating_duration_since(now).as_millis() as u64),
            next_retry_at_unix_ms: self.retry_at.map(|(_, wall)| unix_ms(wall)),
            reconnect_count: self.reconnect_count,
            last_error: self.last_error.as_ref().map(ErrorSummary::from),
            connected_since_unix_ms: self.connected_since.map(unix_ms),
            endpoint: Some(
                self.conn
                    .as_ref()
                    .map(|c| c.endpoint.clone())
                    .unwrap_or_else(|| self.current_endpoint()),
            ),
            session: self.session.clone(),
            breaker: self.manager.breaker_state(),
            channels: Vec::new(),
        }
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
        self.start_attempt(ctx, TransitionReason::Started);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Stopped without `close()` (system shutdown): still leave nothing behind.
        if let Some(addr) = self.conn.take().and_then(|c| c.addr) {
            addr.do_send(CloseConnection);
        }
        metrics::gauge!(telemetry::CONNECTION_STATE, "state" => self.fsm.state().as_str())
            .decrement(1.0);
    }
}

impl Handler<WsEvent> for TransportActor {
    type Result = ();

    fn handle(&mut self, event: WsEvent, ctx: &mut Context<Self>) {
        let current = self.conn.as_ref().map(|c| c.id);
        match event {
            WsEvent::Established {
                conn_id,
                endpoint,
                welcome,
                addr,
            } if Some(conn_id) == current => {
                if let Some(conn) = self.conn.as_mut() {
                    conn.addr = Some(addr);
                }
                self.on_established(ctx, endpoint, welcome.session, welcome.resumed);
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
                Frame::Error(err) => {
                    tracing::warn!(parent: &self.span, conn_id, code = %err.code, message = %err.message, "hub reported an error");
                    if err.code == ErrorCode::ShuttingDown {
                        self.hub_stopping = err.retry_after_ms;
                    }
                    self.last_error = Some(err.into_error());
                }
                other => {
                    tracing::debug!(parent: &self.span, conn_id, kind = other.kind(), "frame with no handler");
                }
            },
            WsEvent::Ended {
                conn_id,
                error,
                established,
            } if Some(conn_id) == current => self.on_ended(ctx, error, established),
            // Events from a connection that was already replaced or closed.
            stale => tracing::trace!(parent: &self.span, ?stale, "stale connection event"),
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
        match self.fsm.state() {
            ConnectionState::Closed => Err(TransportError::Closed),
            ConnectionState::Connected | ConnectionState::Syncing => {
                Ok(ReconnectOutcome::AlreadyConnected)
            }
            ConnectionState::Connecting | ConnectionState::Initialized => {
                Ok(ReconnectOutcome::AlreadyConnecting)
            }
            state @ (ConnectionState::Disconnected
            | ConnectionState::Suspended
            | ConnectionState::Failed) => {
                self.manager
                    .on_manual_reconnect(Instant::now())
                    .map_err(|retry_after| TransportError::RateLimited { retry_after })?;
                if state == ConnectionState::Failed {
                    self.manager.reset();
                }
                self.start_attempt(ctx, TransitionReason::ManualReconnect);
                Ok(ReconnectOutcome::Started)
            }
        }
    }
}

impl Handler<Close> for TransportActor {
    type Result = ();

    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) {
        self.cancel_retry(ctx);
        self.cancel_stability(ctx);
        if let Some(addr) = self.conn.take().and_then(|c| c.addr) {
            addr.do_send(CloseConnection);
        }
        for (_, link) in self.channels.borrow_mut().drain() {
            link.do_send(ChannelLink::Closed);
        }
        let attempt = self.manager.attempt();
        self.transition(
            ConnectionState::Closed,
            TransitionReason::ClosedByApplication,
            attempt,
            None,
        );
        ctx.stop();
    }
}

impl Handler<RegisterChannel> for TransportActor {
    type Result = Result<(), TransportError>;

    fn handle(&mut self, msg: RegisterChannel, _ctx: &mut Context<Self>) -> Self::Result {
        if self.fsm.state() == ConnectionState::Closed {
            return Err(TransportError::Closed);
        }
        if self
            .channels
            .borrow()
            .get(&msg.name)
            .is_some_and(|l| l.connected())
        {
            return Err(TransportError::ChannelInUse { channel: msg.name });
        }
        // Failed already: the new channel must not queue publishes nobody will send.
        if self.fsm.state() == ConnectionState::Failed {
            let error = self.last_error.clone().unwrap_or(TransportError::Closed);
            msg.link.do_send(ChannelLink::Failed(error));
        }
        // Already connected: the new channel attaches at once (it is not part of a resync).
        if self.fsm.state().is_up() {
            if let (Some(conn), Some(session)) = (
                self.conn.as_ref().and_then(|c| c.addr.clone()),
                self.session.clone(),
            ) {
                msg.link.do_send(ChannelLink::Up {
                    conn,
                    session,
                    resumed: false,
                    generation: self.sync_generation,
                });
            }
        }
        self.channel_status.insert(msg.name.clone(), msg.status);
        self.channels.borrow_mut().insert(msg.name, msg.link);
        Ok(())
    }
}

impl Handler<UnregisterChannel> for TransportActor {
    type Result = ();

    fn handle(&mut self, msg: UnregisterChannel, _ctx: &mut Context<Self>) {
        self.channels.borrow_mut().remove(&msg.name);
        self.channel_status.remove(&msg.name);
        self.channel_synced(&msg.name);
    }
}

impl Handler<ChannelSynced> for TransportActor {
    type Result = ();

    fn handle(&mut self, msg: ChannelSynced, _ctx: &mut Context<Self>) {
        if msg.generation == self.sync_generation {
            self.channel_synced(&msg.name);
        }
    }
}

impl TransportActor {
    fn channel_synced(&mut self, name: &str) {
        if !self.syncing.remove(name) || !self.syncing.is_empty() {
            return;
        }
        if self.fsm.state() == ConnectionState::Syncing {
            let attempt = self.manager.attempt();
            if self.transition(
                ConnectionState::Connected,
                TransitionReason::Resynced,
                attempt,
                None,
            ) {
                self.finish_recovery();
            }
        }
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
