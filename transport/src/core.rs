//! The connection lifecycle's decisions, without I/O: [`ConnectionCore`].
//!
//! Every rule of one logical connection lives here — when an attempt goes out and to which
//! endpoint, what a failed attempt or a lost connection leads to (through the
//! [`ReconnectManager`]: backoff, fast retry, failover, the hub's retry window, the circuit
//! breaker), the stability window, manual reconnects, the channels' resync after each
//! (re)connect, and closing. Every state change goes through the [`ConnectionFsm`] table. The
//! core owns that state and nothing else: [events](Event) come in (with the time, passed
//! explicitly), [actions](Action) come out. It has no sockets, no runtime, no timers: when it
//! wants to be woken it says so with [`ConnectionCore::deadline`], and the shell feeds
//! [`Event::Timeout`] once that moment has come. It records metrics and tracing events, which
//! are facades (no I/O of their own); a shell that wants them in a span enters it around
//! [`ConnectionCore::handle`].
//!
//! [`TransportActor`](crate::TransportActor) is the shell: it turns the socket actor's reports,
//! application commands and its two timers into events, and carries out the actions (start a
//! [`WebSocketActor`](crate::WebSocketActor), close it, tell the channels, publish each
//! [`ConnectionStateChanged`]). Wall-clock times (the status snapshot's Unix milliseconds) are
//! the shell's: the core only knows monotonic time.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use tether_transport::core::{Action, ConnectionCore, Event, Timer};
//! use tether_transport::{ConnectionState, TransportConfig, TransportError};
//!
//! let config = TransportConfig::builder("ws://127.0.0.1:1/ws").seed(7).build().unwrap();
//! let now = Instant::now();
//! let mut core = ConnectionCore::new(&config, now);
//!
//! // Started: the first attempt goes out at once.
//! core.handle(now, Event::Started);
//! let conn_id = match core.drain_actions().find(|a| matches!(a, Action::Connect { .. })) {
//!     Some(Action::Connect { conn_id, .. }) => conn_id,
//!     _ => unreachable!(),
//! };
//! assert_eq!(core.state(), ConnectionState::Connecting);
//!
//! // It is refused: the core waits out a backoff step (1 s ± 25 %) and says when.
//! let refused = TransportError::Connect { endpoint: "ws://127.0.0.1:1/ws".into(), message: "refused".into() };
//! core.handle(now, Event::Ended { conn_id, error: refused, established: false });
//! assert_eq!(core.state(), ConnectionState::Disconnected);
//! let retry = core.deadline(Timer::Retry).unwrap();
//! assert!(retry >= now + Duration::from_millis(750) && retry <= now + Duration::from_millis(1250));
//!
//! // When it is due, the next attempt goes out.
//! core.drain_actions().for_each(drop);
//! core.handle(retry, Event::Timeout(Timer::Retry));
//! assert_eq!(core.state(), ConnectionState::Connecting);
//! assert!(core.drain_actions().any(|a| matches!(a, Action::Connect { .. })));
//! ```

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::config::TransportConfig;
use crate::error::TransportError;
use crate::protocol::{
    ClientId, ErrorCode, ErrorFrame, Hello, InstanceId, RetryWindow, SessionId,
    CLOSE_SESSION_TAKEN_OVER,
};
use crate::reconnect::{NextStep, ReconnectManager, Stability};
use crate::state::{ConnectionFsm, ConnectionState, ConnectionStateChanged, TransitionReason};
use crate::status::{ErrorSummary, TransportStatus};
use crate::telemetry;

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

/// Which wait a deadline is (see [`ConnectionCore::deadline`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// The next attempt (after a backoff step, or the suspended connection's probe).
    Retry,
    /// The connection has been up for the stability window: the breaker and the sequence may
    /// be reset.
    Stability,
}

/// What happens to a connection: the inputs of [`ConnectionCore::handle`].
#[derive(Debug)]
pub enum Event {
    /// The shell started: the first attempt goes out.
    Started,
    /// Physical connection `conn_id` completed its handshake (the hub's welcome was valid).
    Established {
        /// Which physical connection ([`Action::Connect`]'s `conn_id`).
        conn_id: u64,
        /// The endpoint it went to.
        endpoint: String,
        /// The session the hub assigned or resumed.
        session: SessionId,
        /// Whether the hub resumed the previous session.
        resumed: bool,
    },
    /// The hub sent an `error` frame that concerns no channel on connection `conn_id`.
    HubError {
        /// Which physical connection.
        conn_id: u64,
        /// The frame.
        error: ErrorFrame,
    },
    /// Physical connection `conn_id` is over.
    Ended {
        /// Which physical connection.
        conn_id: u64,
        /// Why it ended.
        error: TransportError,
        /// Whether its handshake had completed.
        established: bool,
    },
    /// The deadline of this [`Timer`] has come (ignored before it, and when none is set).
    Timeout(Timer),
    /// The channel `name` was taken out of the registry (unregistered, or its actor is gone).
    ChannelUnregistered(String),
    /// The channel `name` finished re-attaching after the [`Link::Up`] of `generation`.
    ChannelSynced {
        /// Channel name.
        name: String,
        /// The generation it answers (stale answers are ignored).
        generation: u64,
    },
    /// The application closes the transport.
    Close,
    /// The shell stops, whatever the reason: nothing may be left open.
    Stopped,
}

/// What the core tells a channel (the shell turns it into a
/// [`ChannelLink`](crate::transport_actor::ChannelLink)).
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    /// The current connection is up: attach and replay, then answer with
    /// [`Event::ChannelSynced`] for `generation`.
    Up {
        /// The hub session.
        session: SessionId,
        /// Whether the hub resumed the previous session.
        resumed: bool,
        /// Identifies this resync.
        generation: u64,
    },
    /// The connection is gone; another will follow (or the transport fails).
    Down(TransportError),
    /// The transport failed permanently.
    Failed(TransportError),
    /// The transport left `Failed` (a manual reconnect).
    Retrying,
    /// The transport was closed: the channels are out of the registry, nothing more will come.
    Closed,
}

/// What the shell must do: the outputs of [`ConnectionCore::handle`], in order.
#[derive(Debug)]
pub enum Action {
    /// Open physical connection `conn_id` to `endpoint`, sending `hello` (it replaces the
    /// current one, which has already ended).
    Connect {
        /// Its id, echoed in [`Event::Established`], [`Event::HubError`] and [`Event::Ended`].
        conn_id: u64,
        /// Where to.
        endpoint: String,
        /// The handshake's first frame.
        hello: Hello,
        /// The attempt's number in this outage.
        attempt: u32,
    },
    /// Close the current physical connection (it will not be reported on any more).
    CloseConnection,
    /// Tell every registered channel (with [`Link::Closed`]: and empty the registry).
    LinkAll(Link),
    /// Tell one channel.
    LinkOne {
        /// Channel name.
        name: String,
        /// What to tell it.
        link: Link,
    },
    /// The connection changed state (already checked against the transition table): publish
    /// it to the state watchers and every subscriber.
    StateChanged(ConnectionStateChanged),
    /// The transport is closed: stop.
    Stop,
}

/// The physical connection the core is waiting on.
#[derive(Debug, Clone)]
struct Current {
    id: u64,
    endpoint: String,
}

/// All the state and rules of one logical connection (see the [module docs](self)).
#[derive(Debug)]
pub struct ConnectionCore {
    client_id: ClientId,
    protocol_version: u16,
    token: Option<String>,
    instance: InstanceId,
    endpoints: Vec<String>,
    fsm: ConnectionFsm,
    manager: ReconnectManager,
    conn: Option<Current>,
    next_conn_id: u64,
    endpoint_index: usize,
    /// Endpoints not yet tried in the current outage (each gets one attempt without a backoff
    /// step before the sequence applies).
    failover_left: usize,
    session: Option<SessionId>,
    /// The next attempt's deadline and the reason it will carry.
    retry: Option<(Instant, TransitionReason)>,
    stability: Option<Instant>,
    reconnect_count: u64,
    ever_connected: bool,
    last_error: Option<TransportError>,
    /// The hub said it is stopping, with when to come back.
    hub_stopping: Option<RetryWindow>,
    connected_at: Option<Instant>,
    lost_at: Option<Instant>,
    channels: BTreeSet<String>,
    syncing: HashSet<String>,
    sync_generation: u64,
    actions: VecDeque<Action>,
}

fn tokio_instant(now: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(now)
}

impl ConnectionCore {
    /// A core in `Initialized` for `config` (its endpoints, identity, token, protocol version,
    /// reconnect policy and seed), created at `now`. Feed [`Event::Started`] to connect.
    pub fn new(config: &TransportConfig, now: Instant) -> Self {
        metrics::gauge!(telemetry::CONNECTION_STATE, "state" => ConnectionState::Initialized.as_str())
            .increment(1.0);
        ConnectionCore {
            client_id: config.client_id.clone(),
            protocol_version: config.protocol_version,
            token: config.token.clone(),
            instance: config
                .instance_id
                .clone()
                .unwrap_or_else(InstanceId::random),
            endpoints: config.endpoints.clone(),
            fsm: ConnectionFsm::new(tokio_instant(now)),
            manager: ReconnectManager::new(config.reconnect.clone(), config.seed),
            conn: None,
            next_conn_id: 0,
            endpoint_index: 0,
            failover_left: config.endpoints.len().saturating_sub(1),
            session: None,
            retry: None,
            stability: None,
            reconnect_count: 0,
            ever_connected: false,
            last_error: None,
            hub_stopping: None,
            connected_at: None,
            lost_at: None,
            channels: BTreeSet::new(),
            syncing: HashSet::new(),
            sync_generation: 0,
            actions: VecDeque::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> ConnectionState {
        self.fsm.state()
    }

    /// The physical connection the core waits on (the id of the last [`Action::Connect`]),
    /// until it ends or is closed. Events about any other are stale and ignored.
    pub fn conn_id(&self) -> Option<u64> {
        self.conn.as_ref().map(|c| c.id)
    }

    /// The hub session of the current (or last) connection.
    pub fn session(&self) -> Option<&SessionId> {
        self.session.as_ref()
    }

    /// When the current connection completed its handshake, while it is up.
    pub fn connected_at(&self) -> Option<Instant> {
        self.connected_at
    }

    /// When the core wants [`Event::Timeout`] for `timer`, if it does.
    pub fn deadline(&self, timer: Timer) -> Option<Instant> {
        match timer {
            Timer::Retry => self.retry.as_ref().map(|(at, _)| *at),
            Timer::Stability => self.stability,
        }
    }

    /// The channels registered, by name.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(String::as_str)
    }

    /// The generation of the latest resync ([`Link::Up`]).
    pub fn sync_generation(&self) -> u64 {
        self.sync_generation
    }

    /// The next action, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Every action not taken yet, oldest first.
    pub fn drain_actions(&mut self) -> std::collections::vec_deque::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// Feeds one event at time `now`; the actions it leads to wait in
    /// [`ConnectionCore::poll_action`] / [`ConnectionCore::drain_actions`].
    pub fn handle(&mut self, now: Instant, event: Event) {
        let current = self.conn_id();
        match event {
            Event::Started => self.start_attempt(now, TransitionReason::Started),
            Event::Established {
                conn_id,
                endpoint,
                session,
                resumed,
            } if Some(conn_id) == current => self.on_established(now, endpoint, session, resumed),
            Event::HubError { conn_id, error } if Some(conn_id) == current => {
                tracing::warn!(conn_id, code = %error.code, message = %error.message, "hub reported an error");
                if error.code == ErrorCode::ShuttingDown {
                    self.hub_stopping = error.retry_after_ms;
                }
                self.last_error = Some(error.into_error());
            }
            Event::Ended {
                conn_id,
                error,
                established,
            } if Some(conn_id) == current => self.on_ended(now, error, established),
            Event::Established { .. } | Event::HubError { .. } | Event::Ended { .. } => {
                // From a connection that was already replaced or closed.
                tracing::trace!(?event, "stale connection event");
            }
            Event::Timeout(Timer::Retry) => self.on_retry_due(now),
            Event::Timeout(Timer::Stability) => self.on_stability_due(now),
            Event::ChannelUnregistered(name) => {
                self.channels.remove(&name);
                self.channel_synced(now, &name);
            }
            Event::ChannelSynced { name, generation } => {
                if generation == self.sync_generation {
                    self.channel_synced(now, &name);
                }
            }
            Event::Close => self.on_close(now),
            Event::Stopped => {
                // Stopped without `Close` (system shutdown): still leave nothing behind.
                if self.conn.take().is_some() {
                    self.actions.push_back(Action::CloseConnection);
                }
                metrics::gauge!(telemetry::CONNECTION_STATE, "state" => self.fsm.state().as_str())
                    .decrement(1.0);
            }
        }
    }

    /// Registers channel `name` at `now`. `held` says whether a channel that is still running
    /// already holds that name (the shell knows which are). A channel registered while the
    /// transport is failed is told so at once ([`Link::Failed`]); one registered while the
    /// connection is up attaches at once ([`Link::Up`], not part of a resync).
    pub fn register_channel(&mut self, name: &str, held: bool) -> Result<(), TransportError> {
        if self.fsm.state() == ConnectionState::Closed {
            return Err(TransportError::Closed);
        }
        if held {
            return Err(TransportError::ChannelInUse {
                channel: name.to_owned(),
            });
        }
        // Failed already: the new channel must not queue publishes nobody will send.
        if self.fsm.state() == ConnectionState::Failed {
            let error = self.last_error.clone().unwrap_or(TransportError::Closed);
            self.link_one(name, Link::Failed(error));
        }
        if self.fsm.state().is_up() && self.conn.is_some() {
            if let Some(session) = self.session.clone() {
                let generation = self.sync_generation;
                self.link_one(
                    name,
                    Link::Up {
                        session,
                        resumed: false,
                        generation,
                    },
                );
            }
        }
        self.channels.insert(name.to_owned());
        Ok(())
    }

    /// The application asks to connect now, at `now`, skipping any scheduled wait. Allowed from
    /// `Disconnected`, `Suspended` and `Failed`, at most once per the policy's
    /// `manual_reconnect_interval` ([`TransportError::RateLimited`] otherwise).
    pub fn reconnect_now(&mut self, now: Instant) -> Result<ReconnectOutcome, TransportError> {
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
                    .on_manual_reconnect(tokio_instant(now))
                    .map_err(|retry_after| TransportError::RateLimited { retry_after })?;
                if state == ConnectionState::Failed {
                    self.manager.reset();
                }
                self.start_attempt(now, TransitionReason::ManualReconnect);
                Ok(ReconnectOutcome::Started)
            }
        }
    }

    /// A status snapshot at `now`, without what only the shell knows: the channels and the
    /// wall-clock fields (`next_retry_at_unix_ms`, `connected_since_unix_ms`) are empty.
    pub fn status(&self, now: Instant) -> TransportStatus {
        TransportStatus {
            client_id: self.client_id.clone(),
            state: self.fsm.state(),
            attempt: self.manager.attempt(),
            next_retry_in_ms: self
                .retry
                .as_ref()
                .map(|(at, _)| at.saturating_duration_since(now).as_millis() as u64),
            next_retry_at_unix_ms: None,
            reconnect_count: self.reconnect_count,
            last_error: self.last_error.as_ref().map(ErrorSummary::from),
            connected_since_unix_ms: None,
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

    fn link_one(&mut self, name: &str, link: Link) {
        self.actions.push_back(Action::LinkOne {
            name: name.to_owned(),
            link,
        });
    }

    /// Applies a transition through the table and publishes it. Refused transitions are logged
    /// and change nothing.
    fn transition(
        &mut self,
        now: Instant,
        to: ConnectionState,
        reason: TransitionReason,
        attempt: u32,
        retry_in: Option<Duration>,
    ) -> bool {
        match self
            .fsm
            .transition(to, reason, attempt, retry_in, tokio_instant(now))
        {
            Ok(event) => {
                tracing::info!(from = %event.from, to = %event.to, attempt, retry_in_ms = retry_in.map(|d| d.as_millis() as u64), reason = %event.reason, "connection state changed");
                metrics::gauge!(telemetry::CONNECTION_STATE, "state" => event.from.as_str())
                    .decrement(1.0);
                metrics::gauge!(telemetry::CONNECTION_STATE, "state" => event.to.as_str())
                    .increment(1.0);
                metrics::counter!(telemetry::STATE_TRANSITIONS, "from" => event.from.as_str(), "to" => event.to.as_str())
                    .increment(1);
                if event.from == ConnectionState::Failed {
                    self.actions.push_back(Action::LinkAll(Link::Retrying));
                }
                if event.to == ConnectionState::Failed {
                    let error = event
                        .reason
                        .error()
                        .cloned()
                        .or_else(|| self.last_error.clone())
                        .unwrap_or(TransportError::Closed);
                    self.actions.push_back(Action::LinkAll(Link::Failed(error)));
                }
                self.actions.push_back(Action::StateChanged(event));
                true
            }
            Err(invalid) => {
                tracing::error!(%invalid, "refused invalid state transition");
                false
            }
        }
    }

    fn current_endpoint(&self) -> String {
        self.endpoints[self.endpoint_index % self.endpoints.len()].clone()
    }

    /// Moves to `Connecting` for `reason` and opens a new physical connection.
    fn start_attempt(&mut self, now: Instant, reason: TransitionReason) {
        self.retry = None;
        let attempt = self.manager.begin_attempt(tokio_instant(now));
        if !self.transition(now, ConnectionState::Connecting, reason, attempt, None) {
            return;
        }
        metrics::counter!(telemetry::RECONNECT_ATTEMPTS).increment(1);
        self.next_conn_id += 1;
        let endpoint = self.current_endpoint();
        let hello = Hello {
            v: self.protocol_version,
            client_id: self.client_id.clone(),
            token: self.token.clone(),
            resume: self.session.clone(),
            instance: Some(self.instance.clone()),
        };
        let conn_id = self.next_conn_id;
        self.conn = Some(Current {
            id: conn_id,
            endpoint: endpoint.clone(),
        });
        self.actions.push_back(Action::Connect {
            conn_id,
            endpoint,
            hello,
            attempt,
        });
    }

    /// Carries out the ReconnectManager's decision after a failure or loss.
    fn apply_step(&mut self, now: Instant, step: NextStep, reason: TransitionReason) {
        match step {
            NextStep::Retry { delay, attempt } => {
                if self.transition(
                    now,
                    ConnectionState::Disconnected,
                    reason,
                    attempt,
                    Some(delay),
                ) {
                    self.retry = Some((now + delay, TransitionReason::RetryDue));
                }
            }
            NextStep::Suspend { probe_in, failures } => {
                let attempt = self.manager.attempt();
                tracing::warn!(failures, "circuit breaker open; suspending");
                let reason = TransitionReason::BreakerOpened {
                    failures,
                    last_error: reason.error().cloned(),
                };
                if self.transition(
                    now,
                    ConnectionState::Suspended,
                    reason,
                    attempt,
                    Some(probe_in),
                ) {
                    self.retry = Some((now + probe_in, TransitionReason::ProbeDue));
                }
            }
            NextStep::WaitForManual => {
                let attempt = self.manager.attempt();
                self.transition(now, ConnectionState::Disconnected, reason, attempt, None);
            }
            NextStep::GiveUp { attempts } => {
                self.transition(
                    now,
                    ConnectionState::Failed,
                    TransitionReason::GaveUp { attempts },
                    attempts,
                    None,
                );
            }
        }
    }

    fn on_retry_due(&mut self, now: Instant) {
        let Some((at, _)) = &self.retry else {
            return;
        };
        if now < *at {
            return;
        }
        let Some((_, reason)) = self.retry.take() else {
            return;
        };
        // A timer that fires after its wait was cut short (a manual reconnect in the same turn
        // of the event loop) must not start a second attempt.
        if matches!(
            self.fsm.state(),
            ConnectionState::Disconnected | ConnectionState::Suspended
        ) {
            self.start_attempt(now, reason);
        }
    }

    fn on_stability_due(&mut self, now: Instant) {
        match self.stability {
            Some(at) if now >= at => {}
            _ => return,
        }
        self.stability = None;
        if let Stability::CheckAgainIn(after) = self.manager.on_stable(tokio_instant(now)) {
            self.stability = Some(now + after);
        }
    }

    fn on_established(
        &mut self,
        now: Instant,
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
        if !self.transition(now, ConnectionState::Connected, reason, attempt, None) {
            return;
        }
        if self.ever_connected {
            self.reconnect_count += 1;
            metrics::counter!(telemetry::RECONNECTS).increment(1);
        }
        self.ever_connected = true;
        self.connected_at = Some(now);
        let window = self.manager.on_connected(tokio_instant(now));
        self.stability = Some(now + window);
        self.resync_channels(now, attempt, resumed);
    }

    /// After a (re)connect: every registered channel re-attaches and replays; the connection is
    /// `Syncing` until all of them report back.
    fn resync_channels(&mut self, now: Instant, attempt: u32, resumed: bool) {
        let Some(session) = self.session.clone() else {
            return;
        };
        if self.channels.is_empty() {
            self.finish_recovery(now);
            return;
        }
        self.sync_generation += 1;
        self.syncing = self.channels.iter().cloned().collect();
        let reason = TransitionReason::Resyncing {
            channels: self.syncing.len(),
        };
        if !self.transition(now, ConnectionState::Syncing, reason, attempt, None) {
            return;
        }
        self.actions.push_back(Action::LinkAll(Link::Up {
            session,
            resumed,
            generation: self.sync_generation,
        }));
    }

    fn channel_synced(&mut self, now: Instant, name: &str) {
        if !self.syncing.remove(name) || !self.syncing.is_empty() {
            return;
        }
        if self.fsm.state() == ConnectionState::Syncing {
            let attempt = self.manager.attempt();
            if self.transition(
                now,
                ConnectionState::Connected,
                TransitionReason::Resynced,
                attempt,
                None,
            ) {
                self.finish_recovery(now);
            }
        }
    }

    fn finish_recovery(&mut self, now: Instant) {
        if let Some(lost) = self.lost_at.take() {
            metrics::histogram!(telemetry::RECOVERY_SECONDS)
                .record(now.saturating_duration_since(lost).as_secs_f64());
        }
    }

    fn on_ended(&mut self, now: Instant, error: TransportError, established: bool) {
        self.conn = None;
        // The hub's stop window was for this connection only, whatever ended it.
        let stopping = self.hub_stopping.take();
        if matches!(
            error,
            TransportError::ConnectionClosed {
                code: Some(CLOSE_SESSION_TAKEN_OVER),
                ..
            }
        ) {
            // Another connection resumed this session (another process with this client id):
            // resuming it again would take it back, and the two would take turns forever.
            tracing::warn!(
                "session taken over by another connection; the next connection starts a new one"
            );
            self.session = None;
        }
        self.syncing.clear();
        if established {
            self.actions
                .push_back(Action::LinkAll(Link::Down(error.clone())));
        }
        self.stability = None;
        self.connected_at = None;
        if self.fsm.state() == ConnectionState::Closed {
            return;
        }
        metrics::counter!(telemetry::CONNECTION_FAILURES, "category" => error.category().as_str())
            .increment(1);
        self.last_error = Some(error.clone());
        if established && self.lost_at.is_none() {
            self.lost_at = Some(now);
        }
        if error.is_permanent() {
            let attempt = self.manager.attempt();
            self.transition(
                now,
                ConnectionState::Failed,
                TransitionReason::PermanentError(error),
                attempt,
                None,
            );
            return;
        }
        let at = tokio_instant(now);
        let (step, reason) = if let (true, Some(window)) = (established, stopping) {
            // A graceful stop: come back when the hub said, not all at once.
            self.failover_left = self.endpoints.len().saturating_sub(1);
            tracing::info!(?window, "hub stopping; reconnecting within its window");
            (
                self.manager.on_hub_shutdown(at, window),
                TransitionReason::ConnectionLost(error),
            )
        } else if established {
            self.failover_left = self.endpoints.len().saturating_sub(1);
            (
                self.manager.on_connection_lost(at),
                TransitionReason::ConnectionLost(error),
            )
        } else {
            // A failed attempt moves on to the next endpoint — at once while some endpoint has
            // not been tried in this outage (failover), after a backoff step otherwise.
            self.endpoint_index = self.endpoint_index.wrapping_add(1);
            let step = if self.failover_left > 0 {
                self.failover_left -= 1;
                self.manager.on_attempt_failed_with_alternative(at)
            } else {
                self.manager.on_attempt_failed(at)
            };
            (step, TransitionReason::AttemptFailed(error))
        };
        self.apply_step(now, step, reason);
    }

    fn on_close(&mut self, now: Instant) {
        if self.state() == ConnectionState::Closed {
            // Closing twice is closing once: nothing more to tell anybody.
            return;
        }
        self.retry = None;
        self.stability = None;
        self.connected_at = None;
        if self.conn.take().is_some() {
            self.actions.push_back(Action::CloseConnection);
        }
        self.channels.clear();
        self.syncing.clear();
        self.actions.push_back(Action::LinkAll(Link::Closed));
        let attempt = self.manager.attempt();
        self.transition(
            now,
            ConnectionState::Closed,
            TransitionReason::ClosedByApplication,
            attempt,
            None,
        );
        self.actions.push_back(Action::Stop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerState;
    use crate::reconnect::OnExhausted;
    use crate::TransportConfigBuilder;

    const A: &str = "ws://a.test/ws";
    const B: &str = "ws://b.test/ws";
    const C: &str = "ws://c.test/ws";

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn config(
        build: impl FnOnce(TransportConfigBuilder) -> TransportConfigBuilder,
    ) -> TransportConfig {
        build(TransportConfig::builder(A).client_id("c1").seed(42))
            .build()
            .unwrap()
    }

    fn refused() -> TransportError {
        TransportError::Connect {
            endpoint: A.into(),
            message: "refused".into(),
        }
    }

    fn lost() -> TransportError {
        TransportError::ConnectionClosed {
            code: Some(1006),
            reason: "reset".into(),
        }
    }

    /// A core under test, with its clock.
    struct Harness {
        core: ConnectionCore,
        now: Instant,
    }

    impl Harness {
        fn new(config: &TransportConfig) -> Self {
            let now = Instant::now();
            Harness {
                core: ConnectionCore::new(config, now),
                now,
            }
        }

        fn feed(&mut self, event: Event) -> Vec<Action> {
            self.core.handle(self.now, event);
            self.core.drain_actions().collect()
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
        }

        /// Moves the clock to `timer`'s deadline and fires it.
        fn fire(&mut self, timer: Timer) -> Vec<Action> {
            let at = self
                .core
                .deadline(timer)
                .unwrap_or_else(|| panic!("{timer:?} is scheduled"));
            self.now = self.now.max(at);
            self.feed(Event::Timeout(timer))
        }

        /// Moves the clock to the retry deadline and fires it.
        fn fire_retry(&mut self) -> Vec<Action> {
            self.fire(Timer::Retry)
        }

        fn fire_stability(&mut self) -> Vec<Action> {
            self.fire(Timer::Stability)
        }

        fn fail(&mut self) -> Vec<Action> {
            let conn_id = self.core.conn_id().expect("an attempt is out");
            self.feed(Event::Ended {
                conn_id,
                error: refused(),
                established: false,
            })
        }

        fn establish(&mut self, session: &str) -> Vec<Action> {
            let conn_id = self.core.conn_id().expect("an attempt is out");
            let endpoint = self.core.status(self.now).endpoint.unwrap();
            self.feed(Event::Established {
                conn_id,
                endpoint,
                session: SessionId(session.into()),
                resumed: false,
            })
        }

        fn lose(&mut self, error: TransportError) -> Vec<Action> {
            let conn_id = self.core.conn_id().expect("a connection is up");
            self.feed(Event::Ended {
                conn_id,
                error,
                established: true,
            })
        }
    }

    fn transitions(actions: &[Action]) -> Vec<&ConnectionStateChanged> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::StateChanged(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn last_transition(actions: &[Action]) -> &ConnectionStateChanged {
        transitions(actions).pop().expect("a transition")
    }

    fn connects(actions: &[Action]) -> Vec<(u64, &str, &Hello, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Connect {
                    conn_id,
                    endpoint,
                    hello,
                    attempt,
                } => Some((*conn_id, endpoint.as_str(), hello, *attempt)),
                _ => None,
            })
            .collect()
    }

    fn retry_in(actions: &[Action]) -> Duration {
        last_transition(actions)
            .retry_in
            .expect("a retry is announced")
    }

    #[test]
    fn started_connects_and_a_welcome_makes_it_connected() {
        let mut h = Harness::new(&config(|b| b));
        let actions = h.feed(Event::Started);
        let c = connects(&actions);
        assert_eq!(c.len(), 1);
        let (conn_id, endpoint, hello, attempt) = c[0];
        assert_eq!((endpoint, attempt, hello.resume.as_ref()), (A, 1, None));
        assert_eq!(hello.client_id, ClientId("c1".into()));
        assert!(hello.instance.is_some());
        let t = last_transition(&actions);
        assert_eq!(
            (t.from, t.to, &t.reason),
            (
                ConnectionState::Initialized,
                ConnectionState::Connecting,
                &TransitionReason::Started
            )
        );
        assert_eq!(h.core.conn_id(), Some(conn_id));

        let actions = h.establish("s1");
        let t = last_transition(&actions);
        assert_eq!(t.to, ConnectionState::Connected);
        assert!(
            matches!(&t.reason, TransitionReason::HandshakeCompleted { endpoint, session, resumed: false } if endpoint == A && session.0 == "s1")
        );
        // No channels: nothing to resync.
        assert_eq!(transitions(&actions).len(), 1);
        assert_eq!(h.core.state(), ConnectionState::Connected);
        assert_eq!(h.core.connected_at(), Some(h.now));
        assert_eq!(
            h.core.deadline(Timer::Stability),
            Some(h.now + crate::reconnect::DEFAULT_STABILITY_WINDOW)
        );
        assert_eq!(h.core.deadline(Timer::Retry), None);
        let status = h.core.status(h.now);
        assert_eq!(status.session, Some(SessionId("s1".into())));
        assert_eq!(status.reconnect_count, 0);
    }

    #[test]
    fn events_of_a_replaced_connection_are_ignored() {
        let mut h = Harness::new(&config(|b| b.max_attempts(None)));
        h.feed(Event::Started);
        let old = h.core.conn_id().unwrap();
        h.fail();
        h.fire_retry();
        assert_ne!(h.core.conn_id(), Some(old));
        for event in [
            Event::Established {
                conn_id: old,
                endpoint: A.into(),
                session: SessionId("x".into()),
                resumed: false,
            },
            Event::Ended {
                conn_id: old,
                error: refused(),
                established: false,
            },
        ] {
            assert!(h.feed(event).is_empty());
        }
        assert_eq!(h.core.state(), ConnectionState::Connecting);
    }

    #[test]
    fn failed_attempts_back_off_exponentially_within_the_jitter_bounds() {
        let mut h = Harness::new(&config(|b| b.max_attempts(None)));
        h.feed(Event::Started);
        let mut base = Duration::from_secs(1);
        for attempt in 1..=10u32 {
            let actions = h.fail();
            let t = last_transition(&actions);
            assert_eq!(t.to, ConnectionState::Disconnected);
            assert!(matches!(t.reason, TransitionReason::AttemptFailed(_)));
            assert_eq!(
                t.attempt,
                attempt + 1,
                "the number the next attempt will have"
            );
            let delay = retry_in(&actions);
            assert!(
                delay >= base.mul_f64(0.75) && delay <= base.mul_f64(1.25),
                "attempt {attempt}: {delay:?} outside ±25 % of {base:?}"
            );
            assert_eq!(h.core.deadline(Timer::Retry), Some(h.now + delay));
            assert_eq!(
                h.core.status(h.now).next_retry_in_ms,
                Some(delay.as_millis() as u64)
            );
            // Not a moment early.
            h.advance(delay - ms(1));
            assert!(h.feed(Event::Timeout(Timer::Retry)).is_empty());
            let actions = h.fire_retry();
            let t = last_transition(&actions);
            assert_eq!(
                (t.to, &t.reason, t.attempt),
                (
                    ConnectionState::Connecting,
                    &TransitionReason::RetryDue,
                    attempt + 1
                )
            );
            assert_eq!(connects(&actions).len(), 1);
            base = (base * 2).min(Duration::from_secs(60));
        }
    }

    #[test]
    fn a_stable_connection_that_drops_is_retried_at_once_and_a_young_one_backs_off() {
        let mut h = Harness::new(&config(|b| b.max_attempts(None)));
        h.feed(Event::Started);
        h.establish("s1");
        h.advance(Duration::from_secs(5));
        h.fire_stability();
        let actions = h.lose(lost());
        assert!(actions
            .iter()
            .any(|a| matches!(a, Action::LinkAll(Link::Down(_)))));
        let t = last_transition(&actions);
        assert_eq!(
            (t.from, t.to, t.attempt),
            (ConnectionState::Connected, ConnectionState::Disconnected, 1)
        );
        assert!(matches!(t.reason, TransitionReason::ConnectionLost(_)));
        assert!(retry_in(&actions) <= crate::reconnect::DEFAULT_FAST_RETRY_SPREAD);
        assert_eq!(h.core.deadline(Timer::Stability), None);
        assert_eq!(h.core.connected_at(), None);

        // The next connection dies young (flapping): a backoff step.
        let actions = h.fire_retry();
        let (_, _, hello, _) = connects(&actions)[0];
        assert_eq!(
            hello.resume,
            Some(SessionId("s1".into())),
            "the session is resumed"
        );
        h.establish("s1");
        assert_eq!(h.core.status(h.now).reconnect_count, 1);
        h.advance(ms(500));
        let actions = h.lose(lost());
        let delay = retry_in(&actions);
        assert!(delay >= ms(750) && delay <= ms(1250), "{delay:?}");
    }

    #[test]
    fn the_stability_window_resets_the_sequence() {
        let mut h = Harness::new(&config(|b| b.max_attempts(None)));
        h.feed(Event::Started);
        for _ in 0..3 {
            h.fail();
            h.fire_retry();
        }
        assert_eq!(h.core.status(h.now).attempt, 4);
        h.establish("s1");
        // Still the outage's count until the window has passed.
        assert_eq!(h.core.status(h.now).attempt, 4);
        assert!(h.fire_stability().is_empty());
        assert_eq!(h.core.status(h.now).attempt, 0);
        assert_eq!(h.core.deadline(Timer::Stability), None);
        // A failure now starts the sequence again from its first step.
        let actions = h.lose(lost());
        assert!(retry_in(&actions) <= crate::reconnect::DEFAULT_FAST_RETRY_SPREAD);
        h.fire_retry();
        let delay = retry_in(&h.fail());
        assert!(delay >= ms(750) && delay <= ms(1250), "{delay:?}");
    }

    #[test]
    fn the_breaker_suspends_probes_slowly_and_closes_after_stable_windows() {
        let mut h = Harness::new(&config(|b| {
            b.max_attempts(Some(3))
                .suspend_interval(Duration::from_secs(30))
        }));
        h.feed(Event::Started);
        h.fail();
        h.fire_retry();
        h.fail();
        h.fire_retry();
        let actions = h.fail();
        let t = last_transition(&actions);
        assert_eq!(t.to, ConnectionState::Suspended);
        assert!(matches!(
            &t.reason,
            TransitionReason::BreakerOpened {
                failures: 3,
                last_error: Some(TransportError::Connect { .. })
            }
        ));
        let probe = retry_in(&actions);
        assert!(
            probe >= Duration::from_secs(22) && probe <= Duration::from_millis(37_500),
            "{probe:?}"
        );
        assert_eq!(h.core.status(h.now).breaker, BreakerState::Open);

        let actions = h.fire_retry();
        let t = last_transition(&actions);
        assert_eq!(
            (t.from, t.to, &t.reason),
            (
                ConnectionState::Suspended,
                ConnectionState::Connecting,
                &TransitionReason::ProbeDue
            )
        );
        assert_eq!(h.core.status(h.now).breaker, BreakerState::HalfOpen);

        // A failed probe suspends again.
        let actions = h.fail();
        assert_eq!(last_transition(&actions).to, ConnectionState::Suspended);
        h.fire_retry();
        h.establish("s1");
        // Half-open: one stable window is not enough, the core checks again.
        h.fire_stability();
        assert_eq!(h.core.status(h.now).breaker, BreakerState::HalfOpen);
        assert!(h.core.deadline(Timer::Stability).is_some());
        h.fire_stability();
        assert_eq!(h.core.status(h.now).breaker, BreakerState::Closed);
        assert_eq!(h.core.deadline(Timer::Stability), None);
    }

    #[test]
    fn exhausted_attempts_fail_when_the_policy_says_so() {
        let mut h = Harness::new(&config(|b| {
            b.max_attempts(Some(2)).on_exhausted(OnExhausted::Fail)
        }));
        h.feed(Event::Started);
        h.fail();
        h.fire_retry();
        let actions = h.fail();
        let t = last_transition(&actions);
        assert_eq!(
            (t.to, &t.reason),
            (
                ConnectionState::Failed,
                &TransitionReason::GaveUp { attempts: 2 }
            )
        );
        // The channels hear of it, with the last error.
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::LinkAll(Link::Failed(TransportError::Connect { .. }))
        )));
        assert_eq!(h.core.deadline(Timer::Retry), None);
    }

    #[test]
    fn a_permanent_error_fails_and_a_manual_reconnect_starts_over() {
        let mut h = Harness::new(&config(|b| b));
        h.feed(Event::Started);
        let conn_id = h.core.conn_id().unwrap();
        let rejected = TransportError::AuthRejected {
            message: "no".into(),
        };
        let actions = h.feed(Event::Ended {
            conn_id,
            error: rejected.clone(),
            established: false,
        });
        let t = last_transition(&actions);
        assert_eq!(
            (t.to, &t.reason),
            (
                ConnectionState::Failed,
                &TransitionReason::PermanentError(rejected.clone())
            )
        );
        assert!(actions
            .iter()
            .any(|a| matches!(a, Action::LinkAll(Link::Failed(e)) if *e == rejected)));
        // A channel registered now is told at once.
        h.core.register_channel("late", false).unwrap();
        let actions: Vec<_> = h.core.drain_actions().collect();
        assert!(
            matches!(&actions[..], [Action::LinkOne { name, link: Link::Failed(e) }] if name == "late" && *e == rejected)
        );

        assert_eq!(h.core.reconnect_now(h.now), Ok(ReconnectOutcome::Started));
        let actions: Vec<_> = h.core.drain_actions().collect();
        assert!(matches!(actions[0], Action::LinkAll(Link::Retrying)));
        let t = last_transition(&actions);
        assert_eq!(
            (t.from, t.to, &t.reason, t.attempt),
            (
                ConnectionState::Failed,
                ConnectionState::Connecting,
                &TransitionReason::ManualReconnect,
                1
            )
        );
        assert_eq!(connects(&actions).len(), 1);
    }

    #[test]
    fn reconnect_now_skips_the_wait_once_per_interval() {
        let mut h = Harness::new(&config(|b| b.max_attempts(None)));
        assert_eq!(
            h.core.reconnect_now(h.now),
            Ok(ReconnectOutcome::AlreadyConnecting)
        );
        h.feed(Event::Started);
        assert_eq!(
            h.core.reconnect_now(h.now),
            Ok(ReconnectOutcome::AlreadyConnecting)
        );
        h.fail();
        let scheduled = h.core.deadline(Timer::Retry).unwrap();
        assert_eq!(h.core.reconnect_now(h.now), Ok(ReconnectOutcome::Started));
        let actions: Vec<_> = h.core.drain_actions().collect();
        assert_eq!(connects(&actions).len(), 1);
        assert_eq!(
            last_transition(&actions).reason,
            TransitionReason::ManualReconnect
        );
        assert_eq!(
            h.core.deadline(Timer::Retry),
            None,
            "the scheduled attempt is cancelled"
        );

        h.fail();
        h.advance(ms(400));
        assert_eq!(
            h.core.reconnect_now(h.now),
            Err(TransportError::RateLimited {
                retry_after: ms(600)
            })
        );
        assert!(h.core.drain_actions().next().is_none());
        assert_eq!(h.core.state(), ConnectionState::Disconnected);
        h.advance(ms(600));
        assert_eq!(h.core.reconnect_now(h.now), Ok(ReconnectOutcome::Started));
        h.core.drain_actions().for_each(drop);
        // The first wait's timer, firing anyway, changes nothing.
        h.now = h.now.max(scheduled);
        assert!(h.feed(Event::Timeout(Timer::Retry)).is_empty());
        assert_eq!(h.core.state(), ConnectionState::Connecting);
        h.establish("s1");
        assert_eq!(
            h.core.reconnect_now(h.now),
            Ok(ReconnectOutcome::AlreadyConnected)
        );
    }

    #[test]
    fn close_while_connecting_closes_everything_and_refuses_what_follows() {
        let mut h = Harness::new(&config(|b| b));
        h.feed(Event::Started);
        let conn_id = h.core.conn_id().unwrap();
        h.core.register_channel("room", false).unwrap();
        let actions = h.feed(Event::Close);
        assert!(matches!(
            &actions[..],
            [Action::CloseConnection, Action::LinkAll(Link::Closed), Action::StateChanged(e), Action::Stop]
                if e.from == ConnectionState::Connecting && e.to == ConnectionState::Closed
                    && e.reason == TransitionReason::ClosedByApplication
        ));
        assert_eq!(h.core.deadline(Timer::Retry), None);
        assert_eq!(h.core.deadline(Timer::Stability), None);
        assert_eq!(h.core.channels().count(), 0);
        // The socket's end is stale now.
        assert!(h
            .feed(Event::Ended {
                conn_id,
                error: lost(),
                established: false
            })
            .is_empty());
        assert_eq!(
            h.core.register_channel("x", false),
            Err(TransportError::Closed)
        );
        assert_eq!(h.core.reconnect_now(h.now), Err(TransportError::Closed));
        // Closed is terminal: a second close changes nothing.
        let actions = h.feed(Event::Close);
        assert!(transitions(&actions).is_empty());
        assert_eq!(h.core.state(), ConnectionState::Closed);
    }

    #[test]
    fn close_while_connected_leaves_no_connected_since() {
        let mut h = Harness::new(&config(|b| b));
        h.feed(Event::Started);
        h.establish("s1");
        assert_eq!(h.core.connected_at(), Some(h.now));
        h.feed(Event::Close);
        assert_eq!(h.core.state(), ConnectionState::Closed);
        assert_eq!(h.core.connected_at(), None, "not up any more");
    }

    #[test]
    fn a_second_close_changes_nothing_and_says_nothing() {
        let mut h = Harness::new(&config(|b| b));
        h.feed(Event::Started);
        h.establish("s1");
        assert!(!h.feed(Event::Close).is_empty());
        assert!(h.feed(Event::Close).is_empty(), "no second transition");
        assert_eq!(h.core.state(), ConnectionState::Closed);
    }

    #[test]
    fn close_while_waiting_cancels_the_retry() {
        let mut h = Harness::new(&config(|b| b));
        h.feed(Event::Started);
        h.fail();
        assert!(h.core.deadline(Timer::Retry).is_some());
        let actions = h.feed(Event::Close);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::CloseConnection)),
            "no connection to close"
        );
        assert_eq!(h.core.deadline(Timer::Retry), None);
        assert!(h.feed(Event::Timeout(Timer::Retry)).is_empty());
    }

    #[test]
    fn failed_attempts_rotate_endpoints_failing_over_at_once_before_backing_off() {
        let mut h = Harness::new(&config(|b| b.endpoint(B).endpoint(C).max_attempts(None)));
        let actions = h.feed(Event::Started);
        assert_eq!(connects(&actions)[0].1, A);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let delay = retry_in(&h.fail());
            let actions = h.fire_retry();
            seen.push((connects(&actions)[0].1.to_owned(), delay));
        }
        let endpoints: Vec<_> = seen.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(endpoints, [B, C, A, B]);
        // One quick attempt per other endpoint, then the sequence.
        assert!(seen[0].1 <= crate::reconnect::DEFAULT_FAST_RETRY_SPREAD);
        assert!(seen[1].1 <= crate::reconnect::DEFAULT_FAST_RETRY_SPREAD);
        assert!(seen[2].1 >= ms(750), "{:?}", seen[2].1);
        assert_eq!(h.core.status(h.now).endpoint.as_deref(), Some(B));

        // A lost connection gives every other endpoint its quick attempt again.
        h.establish("s1");
        h.fire_stability();
        h.lose(lost());
        h.fire_retry();
        assert!(retry_in(&h.fail()) <= crate::reconnect::DEFAULT_FAST_RETRY_SPREAD);
        let actions = h.fire_retry();
        assert_eq!(connects(&actions)[0].1, C);
    }

    #[test]
    fn a_stopping_hub_is_reconnected_to_within_its_window() {
        let mut h = Harness::new(&config(|b| b));
        h.feed(Event::Started);
        h.establish("s1");
        h.fire_stability();
        let conn_id = h.core.conn_id().unwrap();
        let mut frame = ErrorFrame::from_error(&TransportError::ConnectionClosed {
            code: None,
            reason: "stopping".into(),
        });
        frame.code = ErrorCode::ShuttingDown;
        frame.retry_after_ms = Some(RetryWindow::new(
            Duration::from_secs(5),
            Duration::from_secs(10),
        ));
        assert!(h
            .feed(Event::HubError {
                conn_id,
                error: frame
            })
            .is_empty());
        let delay = retry_in(&h.lose(lost()));
        assert!(
            delay >= Duration::from_secs(5) && delay <= Duration::from_secs(10),
            "{delay:?}"
        );
        // The window was for that stop only.
        h.fire_retry();
        h.establish("s2");
        h.fire_stability();
        assert!(retry_in(&h.lose(lost())) <= crate::reconnect::DEFAULT_FAST_RETRY_SPREAD);
    }

    #[test]
    fn a_stop_window_does_not_outlive_a_connection_that_ends_permanently() {
        let mut h = Harness::new(&config(|b| b));
        h.feed(Event::Started);
        h.establish("s1");
        let conn_id = h.core.conn_id().unwrap();
        let mut frame = ErrorFrame::from_error(&TransportError::ConnectionClosed {
            code: None,
            reason: "stopping".into(),
        });
        frame.code = ErrorCode::ShuttingDown;
        frame.retry_after_ms = Some(RetryWindow::new(
            Duration::from_secs(5),
            Duration::from_secs(10),
        ));
        h.feed(Event::HubError {
            conn_id,
            error: frame,
        });
        h.lose(TransportError::AuthRejected {
            message: "revoked".into(),
        });
        assert_eq!(h.core.state(), ConnectionState::Failed);
        assert_eq!(h.core.reconnect_now(h.now), Ok(ReconnectOutcome::Started));
        h.establish("s2");
        h.fire_stability();
        // The next connection's loss is an ordinary one: the fast retry, not the old window.
        assert!(retry_in(&h.lose(lost())) <= crate::reconnect::DEFAULT_FAST_RETRY_SPREAD);
    }

    #[test]
    fn a_session_taken_over_is_not_resumed() {
        let mut h = Harness::new(&config(|b| b));
        h.feed(Event::Started);
        h.establish("s1");
        h.lose(TransportError::ConnectionClosed {
            code: Some(CLOSE_SESSION_TAKEN_OVER),
            reason: "taken over".into(),
        });
        let actions = h.fire_retry();
        assert_eq!(connects(&actions)[0].2.resume, None);
    }

    #[test]
    fn channels_resync_after_each_connect_and_late_ones_attach_at_once() {
        let mut h = Harness::new(&config(|b| b));
        h.core.register_channel("a", false).unwrap();
        h.core.register_channel("b", false).unwrap();
        assert_eq!(
            h.core.register_channel("a", true),
            Err(TransportError::ChannelInUse {
                channel: "a".into()
            })
        );
        assert!(
            h.core.drain_actions().next().is_none(),
            "nothing to tell while down"
        );
        h.feed(Event::Started);
        let actions = h.establish("s1");
        let states: Vec<_> = transitions(&actions).iter().map(|e| e.to).collect();
        assert_eq!(
            states,
            [ConnectionState::Connected, ConnectionState::Syncing]
        );
        assert_eq!(
            last_transition(&actions).reason,
            TransitionReason::Resyncing { channels: 2 }
        );
        assert!(matches!(
            actions.last(),
            Some(Action::LinkAll(Link::Up {
                generation: 1,
                resumed: false,
                ..
            }))
        ));

        // A late channel attaches at once, not part of the resync.
        h.core.register_channel("c", false).unwrap();
        let late: Vec<_> = h.core.drain_actions().collect();
        assert!(
            matches!(&late[..], [Action::LinkOne { name, link: Link::Up { generation: 1, .. } }] if name == "c")
        );

        // Stale answers are ignored; an unregistered channel counts as done.
        assert!(h
            .feed(Event::ChannelSynced {
                name: "a".into(),
                generation: 0
            })
            .is_empty());
        assert!(h
            .feed(Event::ChannelSynced {
                name: "a".into(),
                generation: 1
            })
            .is_empty());
        let actions = h.feed(Event::ChannelUnregistered("b".into()));
        let t = last_transition(&actions);
        assert_eq!(
            (t.from, t.to, &t.reason),
            (
                ConnectionState::Syncing,
                ConnectionState::Connected,
                &TransitionReason::Resynced
            )
        );

        // The next connection resyncs the channels still registered, with a new generation.
        h.fire_stability();
        h.lose(lost());
        h.fire_retry();
        let actions = h.establish("s1");
        assert_eq!(
            last_transition(&actions).reason,
            TransitionReason::Resyncing { channels: 2 }
        );
        assert_eq!(h.core.sync_generation(), 2);
        // Lost while syncing: nothing is owed any more.
        h.lose(lost());
        assert!(h
            .feed(Event::ChannelSynced {
                name: "a".into(),
                generation: 2
            })
            .is_empty());
        assert_eq!(h.core.state(), ConnectionState::Disconnected);
    }

    #[test]
    fn stopping_closes_the_connection_left_open() {
        let mut h = Harness::new(&config(|b| b));
        h.feed(Event::Started);
        h.establish("s1");
        assert!(matches!(
            &h.feed(Event::Stopped)[..],
            [Action::CloseConnection]
        ));
        assert!(h.feed(Event::Stopped).is_empty());
    }

    #[test]
    fn manual_strategy_waits_for_reconnect_now() {
        let mut h = Harness::new(&config(|b| b.strategy(crate::ReconnectStrategy::Manual)));
        h.feed(Event::Started);
        let actions = h.fail();
        let t = last_transition(&actions);
        assert_eq!((t.to, t.retry_in), (ConnectionState::Disconnected, None));
        assert_eq!(h.core.deadline(Timer::Retry), None);
        assert_eq!(h.core.reconnect_now(h.now), Ok(ReconnectOutcome::Started));
    }
}
