//! The hub end of the transport: an actix-web server with the WebSocket route (one
//! [`HubSession`] actor per connection), `/health` and `/metrics`.
//!
//! Each connection is authenticated as an [`Identity`] by the configured [`Authenticator`]
//! ([`AllowAll`] by default: every client id its own anonymous identity, for development;
//! [`StaticTokens`] for a fixed set of tokens). Sessions and publish dedupe state belong to
//! that identity: one identity can never resume, evict or de-duplicate against another's.

pub mod admin;
pub mod auth;
pub mod budget;
pub mod handler;
pub mod session;
pub mod sessions;
pub mod wire;

use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::collections::HashMap;

use actix::Recipient;
use actix_codec::Framed;
use actix_http::TlsAcceptorConfig;
use actix_service::boxed;
use actix_web::{web, App, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde::Serialize;
use tokio::time::Instant;

use crate::error::TransportError;
use crate::heartbeat::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_IDLE_TIMEOUT};
use crate::telemetry;
use crate::tls::{ClientTrust, HubTls, Material};

pub use admin::{AdminPeers, AdminToken, PeerNode};
pub use auth::{
    AllowAll, AuthRejection, Authenticator, Identity, StaticTokens, ANONYMOUS_PREFIX,
    MAX_IDENTITY_LEN,
};
pub use budget::{OutboundBudget, DEFAULT_OUTBOUND_BUDGET};
pub use handler::{
    Completes, ConnInfo, ConnectionHandler, FrameRejection, HandlerHealth, Kick, NoChannels,
    Outbound, OutboxFull, ReplayReservation, SessionHandler, SessionOutbox, Wire,
};
pub use session::{AdminDisconnect, DisconnectMode, Evict, HubSession, Introspect, ShutDown};
pub use sessions::{SessionFacts, SessionKey, SessionTable, DEFAULT_SESSION_TTL};

/// Default address the hub listens on: 127.0.0.1:8080.
pub const DEFAULT_BIND: &str = "127.0.0.1:8080";
/// Default WebSocket path: `/ws`.
pub const DEFAULT_WS_PATH: &str = "/ws";
/// Default time a new connection has to send a valid hello: 10 s.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest frame accepted: 1 MiB.
pub const DEFAULT_HUB_MAX_FRAME_SIZE: usize = 1024 * 1024;

/// Default capacity of a connection's outbound mailbox: 16,384 frames.
pub const DEFAULT_OUTBOUND_QUEUE: usize = 16_384;
/// Default time frames may wait with the socket taking none before the connection is reset:
/// 10 s.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a close handshake may take before the connection is reset: 2 s.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time [`HubHandle::stop`] waits for clients to leave: 10 s.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default window in which clients of a stopping hub come back: 1 s to 10 s.
pub const DEFAULT_SHUTDOWN_RETRY: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(10));

/// Hub configuration. Build it with [`HubConfig::builder`].
#[derive(Clone)]
pub struct HubConfig {
    /// Listening address.
    pub bind: SocketAddr,
    /// Path of the WebSocket route.
    pub ws_path: String,
    /// Ping after this much silence from a client.
    pub heartbeat_interval: Duration,
    /// Close a connection silent for this long.
    pub idle_timeout: Duration,
    /// Time a new connection has to complete the hello.
    pub hello_timeout: Duration,
    /// Largest frame accepted; larger ones close the connection with a typed error.
    pub max_frame_size: usize,
    /// How long a detached session stays resumable.
    pub session_ttl: Duration,
    /// HTTP worker threads.
    pub workers: usize,
    /// Decides who may connect.
    pub authenticator: Arc<dyn Authenticator>,
    /// Serves frames after the handshake (the channels layer). Default [`NoChannels`].
    pub handler: Arc<dyn SessionHandler>,
    /// Capacity of each connection's outbound mailbox, in frames. A connection that falls this
    /// far behind is closed as a slow consumer (it resumes from history when it returns).
    pub outbound_queue: usize,
    /// Bytes that may be queued for one connection (live fan-out, acks, replay and catch-up
    /// together) before it is closed as a slow consumer; replays use at most half of it.
    pub outbound_budget: usize,
    /// Frames may wait this long with the socket taking none before the connection is reset.
    pub write_timeout: Duration,
    /// A close handshake may take this long before the connection is reset.
    pub close_timeout: Duration,
    /// [`HubHandle::stop`] waits this long for clients to leave before it drops the rest.
    pub drain_timeout: Duration,
    /// The window sent with `shutting_down`, in which clients come back.
    pub shutdown_retry: crate::protocol::RetryWindow,
    /// This node's name among several hub nodes (in `/health` and the logs).
    pub node_id: String,
    /// The listener's TLS identity; `None` (the default) serves plain `ws://`.
    pub tls: Option<HubTls>,
    /// The admin API's token; `None` (the default) turns the admin API off (403).
    pub admin_token: Option<AdminToken>,
    /// Where this node's admin API is reached by its peers; `None`: the bound address.
    pub advertise_url: Option<String>,
    /// What this node trusts when it asks its peers' admin APIs over `https://` (built with the
    /// admin token: the built-in roots plus [`HubConfigBuilder::admin_peer_ca`]).
    pub admin_peer_trust: Option<ClientTrust>,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("bind", &self.bind)
            .field("ws_path", &self.ws_path)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("idle_timeout", &self.idle_timeout)
            .field("hello_timeout", &self.hello_timeout)
            .field("max_frame_size", &self.max_frame_size)
            .field("session_ttl", &self.session_ttl)
            .field("workers", &self.workers)
            .field("outbound_queue", &self.outbound_queue)
            .field("outbound_budget", &self.outbound_budget)
            .field("write_timeout", &self.write_timeout)
            .field("close_timeout", &self.close_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("shutdown_retry", &self.shutdown_retry)
            .field("node_id", &self.node_id)
            .field("tls", &self.tls)
            .field("admin", &self.admin_token.is_some())
            .field("advertise_url", &self.advertise_url)
            .finish_non_exhaustive()
    }
}

impl HubConfig {
    /// A builder with the documented defaults.
    pub fn builder() -> HubConfigBuilder {
        HubConfigBuilder {
            config: HubConfig {
                bind: DEFAULT_BIND.parse().expect("valid default address"),
                ws_path: DEFAULT_WS_PATH.to_owned(),
                heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                hello_timeout: DEFAULT_HELLO_TIMEOUT,
                max_frame_size: DEFAULT_HUB_MAX_FRAME_SIZE,
                session_ttl: DEFAULT_SESSION_TTL,
                workers: std::thread::available_parallelism()
                    .map(usize::from)
                    .unwrap_or(1),
                authenticator: Arc::new(AllowAll),
                handler: Arc::new(NoChannels),
                outbound_queue: DEFAULT_OUTBOUND_QUEUE,
                outbound_budget: DEFAULT_OUTBOUND_BUDGET,
                write_timeout: DEFAULT_WRITE_TIMEOUT,
                close_timeout: DEFAULT_CLOSE_TIMEOUT,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                shutdown_retry: crate::protocol::RetryWindow::new(
                    DEFAULT_SHUTDOWN_RETRY.0,
                    DEFAULT_SHUTDOWN_RETRY.1,
                ),
                node_id: format!("hub-{}", std::process::id()),
                tls: None,
                admin_token: None,
                advertise_url: None,
                admin_peer_trust: None,
            },
            tls: None,
            admin_token: None,
            admin_peer_cas: Vec::new(),
        }
    }
}

/// Builder for [`HubConfig`].
#[derive(Clone)]
pub struct HubConfigBuilder {
    config: HubConfig,
    /// Certificate chain and key, loaded and checked at `build`.
    tls: Option<(Material, Material)>,
    /// The admin token as given (with where it came from), checked at `build`.
    admin_token: Option<(&'static str, String)>,
    /// Extra CA certificates for the admin API's calls to its peers, loaded at `build`.
    admin_peer_cas: Vec<Material>,
}

impl HubConfigBuilder {
    /// Listening address. Default 127.0.0.1:8080; port 0 picks a free one.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.config.bind = addr;
        self
    }

    /// Path of the WebSocket route. Default `/ws`.
    pub fn ws_path(mut self, path: impl Into<String>) -> Self {
        self.config.ws_path = path.into();
        self
    }

    /// Ping interval and idle timeout. Default 10 s and 25 s.
    pub fn heartbeat(mut self, interval: Duration, idle_timeout: Duration) -> Self {
        self.config.heartbeat_interval = interval;
        self.config.idle_timeout = idle_timeout;
        self
    }

    /// Time a new connection has to send a valid hello. Default 10 s.
    pub fn hello_timeout(mut self, timeout: Duration) -> Self {
        self.config.hello_timeout = timeout;
        self
    }

    /// Largest frame accepted. Default 1 MiB.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.config.max_frame_size = bytes;
        self
    }

    /// How long a detached session stays resumable. Default 5 minutes.
    pub fn session_ttl(mut self, ttl: Duration) -> Self {
        self.config.session_ttl = ttl;
        self
    }

    /// HTTP worker threads. Default: one per available core.
    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }

    /// The authenticator. Default [`AllowAll`].
    pub fn authenticator(mut self, auth: impl Authenticator) -> Self {
        self.config.authenticator = Arc::new(auth);
        self
    }

    /// The handler for frames after the handshake (the channels layer). Default
    /// [`NoChannels`].
    pub fn handler(mut self, handler: Arc<dyn SessionHandler>) -> Self {
        self.config.handler = handler;
        self
    }

    /// Capacity of each connection's outbound mailbox. Default 16,384 frames.
    pub fn outbound_queue(mut self, frames: usize) -> Self {
        self.config.outbound_queue = frames;
        self
    }

    /// Bytes that may be queued for one connection — live fan-out, acks, history replay and
    /// catch-up together — before it is closed as a `slow_consumer`. Replays and catch-up
    /// take at most half of it and are read from the store page by page as the socket
    /// drains. Default 4 MiB; at least 64 KiB.
    pub fn outbound_budget(mut self, bytes: usize) -> Self {
        self.config.outbound_budget = bytes;
        self
    }

    /// How long frames may wait with the socket taking none (the peer stopped reading) before
    /// the connection is reset at the TCP level. Default 10 s.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_timeout = timeout;
        self
    }

    /// How long a close handshake may take (the peer reading what is queued and answering the
    /// close frame) before the connection is reset. Default 2 s.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.config.close_timeout = timeout;
        self
    }

    /// How long [`HubHandle::stop`] waits for clients to leave after telling them
    /// `shutting_down`. Default 10 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// The window sent with `shutting_down`: each client reconnects at a moment drawn
    /// uniformly in it, so a restart sees a connect rate the hub chose. Default 1 s to 10 s.
    pub fn shutdown_retry(mut self, min: Duration, max: Duration) -> Self {
        self.config.shutdown_retry = crate::protocol::RetryWindow::new(min, max);
        self
    }

    /// This node's name among several hub nodes, shown in `/health` and the logs. Default
    /// `hub-{process id}`.
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.config.node_id = id.into();
        self
    }

    /// Serves `wss://` (TLS over the same port, `/health` and `/metrics` too) with this PEM
    /// certificate chain (leaf first, then intermediates) and PEM private key (PKCS#8, PKCS#1
    /// or SEC1). Checked at `build`: bad PEM or a key that does not belong to the leaf is
    /// [`TransportError::InvalidConfig`]. Default: no TLS (plain `ws://`).
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), tether_transport::TransportError> {
    /// use tether_transport::hub::HubConfig;
    ///
    /// let chain = std::fs::read("/etc/tether/hub.crt").unwrap();
    /// let key = std::fs::read("/etc/tether/hub.key").unwrap();
    /// let config = HubConfig::builder().tls(chain, key).build()?;
    /// assert!(config.tls.is_some());
    /// # Ok(()) }
    /// ```
    pub fn tls(mut self, cert_chain_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls = Some((
            Material::pem("tls_cert", cert_chain_pem),
            Material::pem("tls_key", key_pem),
        ));
        self
    }

    /// Turns the session admin API on (`/sessions`, `/channels`: see [`admin`]), behind this
    /// bearer token: 16 to 4,096 bytes of visible ASCII, checked at `build`. Every node of a
    /// cluster should have the same token (a node asks its peers with the caller's). Default:
    /// none — the admin routes answer 403 `admin_disabled`.
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(("admin_token", token.into()));
        self
    }

    /// Where this node's HTTP port is reached by the other nodes of its cluster, for the admin
    /// API (`http://10.0.0.7:8080`; `https://` for a TLS hub). Default: the bound address
    /// (right when nodes share a host; set it when binding `0.0.0.0`).
    pub fn advertise_url(mut self, url: impl Into<String>) -> Self {
        self.config.advertise_url = Some(url.into());
        self
    }

    /// Also trusts these PEM CA certificates when this node asks its peers' admin APIs over
    /// `https://` (a cluster whose hub certificates come from a private CA). Checked at
    /// `build`. Default: the built-in webpki roots only.
    pub fn admin_peer_ca(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.admin_peer_cas
            .push(Material::pem("admin_peer_ca", ca_pem));
        self
    }

    /// Like [`HubConfigBuilder::admin_peer_ca`], with the PEM read from this file at `build`.
    pub fn admin_peer_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.admin_peer_cas
            .push(Material::pem_file("admin_peer_ca", path));
        self
    }

    /// Like [`HubConfigBuilder::tls`], with the PEM read from these files at `build`.
    pub fn tls_files(mut self, cert_chain: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls = Some((
            Material::pem_file("tls_cert", cert_chain),
            Material::pem_file("tls_key", key),
        ));
        self
    }

    /// Overrides settings from `TETHER_HUB_*` variables looked up through `lookup`:
    /// `TETHER_HUB_ADMIN_TOKEN` ([`HubConfigBuilder::admin_token`]),
    /// `TETHER_HUB_ADVERTISE_URL` ([`HubConfigBuilder::advertise_url`]),
    /// `TETHER_HUB_ADMIN_PEER_CA_FILE` ([`HubConfigBuilder::admin_peer_ca_file`]),
    /// `TETHER_HUB_TLS_CERT` and `TETHER_HUB_TLS_KEY` (paths of the PEM certificate chain and
    /// key, as [`HubConfigBuilder::tls_files`]; both or neither). Only one of the two is an
    /// [`TransportError::InvalidConfig`] naming the missing one; files that cannot be read or
    /// parsed are one too, at `build`.
    pub fn apply_env(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, TransportError> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(token) = var("TETHER_HUB_ADMIN_TOKEN") {
            self.admin_token = Some(("TETHER_HUB_ADMIN_TOKEN", token.trim().to_owned()));
        }
        if let Some(url) = var("TETHER_HUB_ADVERTISE_URL") {
            self.config.advertise_url = Some(url.trim().to_owned());
        }
        if let Some(path) = var("TETHER_HUB_ADMIN_PEER_CA_FILE") {
            self.admin_peer_cas.push(Material::pem_file(
                "TETHER_HUB_ADMIN_PEER_CA_FILE",
                path.trim(),
            ));
        }
        match (var("TETHER_HUB_TLS_CERT"), var("TETHER_HUB_TLS_KEY")) {
            (Some(cert), Some(key)) => {
                self.tls = Some((
                    Material::pem_file("TETHER_HUB_TLS_CERT", cert.trim()),
                    Material::pem_file("TETHER_HUB_TLS_KEY", key.trim()),
                ));
            }
            (Some(_), None) => {
                return Err(TransportError::InvalidConfig {
                    field: "TETHER_HUB_TLS_KEY",
                    reason: "TETHER_HUB_TLS_CERT is set: the key must be given too".into(),
                })
            }
            (None, Some(_)) => {
                return Err(TransportError::InvalidConfig {
                    field: "TETHER_HUB_TLS_CERT",
                    reason: "TETHER_HUB_TLS_KEY is set: the certificate chain must be given too"
                        .into(),
                })
            }
            (None, None) => {}
        }
        Ok(self)
    }

    /// [`HubConfig::builder`] with [`HubConfigBuilder::apply_env`] applied to the process
    /// environment.
    pub fn from_env() -> Result<Self, TransportError> {
        HubConfig::builder().apply_env(|key| std::env::var(key).ok())
    }

    /// Validates and builds.
    pub fn build(mut self) -> Result<HubConfig, TransportError> {
        let c = &self.config;
        let invalid = |field: &'static str, reason: &str| {
            Err(TransportError::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if !c.ws_path.starts_with('/') {
            return invalid("ws_path", "must start with '/'");
        }
        if matches!(c.ws_path.as_str(), "/health" | "/metrics")
            || ["/sessions", "/channels"]
                .iter()
                .any(|r| c.ws_path == *r || c.ws_path.starts_with(&format!("{r}/")))
        {
            return invalid(
                "ws_path",
                "collides with /health, /metrics or the admin routes (/sessions, /channels)",
            );
        }
        if let Some(url) = &c.advertise_url {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.chars().any(|ch| ch.is_whitespace() || ch.is_control())
            {
                return invalid(
                    "advertise_url",
                    "must be an http:// or https:// URL without spaces",
                );
            }
        }
        if c.heartbeat_interval < Duration::from_millis(10) {
            return invalid("heartbeat_interval", "must be at least 10 ms");
        }
        if c.idle_timeout <= c.heartbeat_interval {
            return invalid("idle_timeout", "must exceed the heartbeat interval");
        }
        if c.hello_timeout.is_zero() {
            return invalid("hello_timeout", "must be greater than zero");
        }
        if c.max_frame_size < 1024 {
            return invalid("max_frame_size", "must be at least 1024 bytes");
        }
        if c.outbound_queue == 0 {
            return invalid("outbound_queue", "must be at least 1");
        }
        if c.outbound_budget < 64 * 1024 {
            return invalid("outbound_budget", "must be at least 64 KiB");
        }
        if c.write_timeout < Duration::from_millis(100) {
            return invalid("write_timeout", "must be at least 100 ms");
        }
        if c.close_timeout.is_zero() {
            return invalid("close_timeout", "must be greater than zero");
        }
        if c.workers == 0 {
            return invalid("workers", "must be at least 1");
        }
        if c.node_id.is_empty() || c.node_id.len() > 128 || c.node_id.chars().any(char::is_control)
        {
            return invalid(
                "node_id",
                "must be 1 to 128 bytes without control characters",
            );
        }
        if let Some((field, token)) = &self.admin_token {
            self.config.admin_token = Some(AdminToken::new(token).map_err(|e| match e {
                TransportError::InvalidConfig { reason, .. } => {
                    TransportError::InvalidConfig { field, reason }
                }
                other => other,
            })?);
            self.config.admin_peer_trust =
                Some(ClientTrust::build(true, &self.admin_peer_cas, true)?);
        }
        if let Some((cert_chain, key)) = &self.tls {
            self.config.tls = Some(HubTls::load(cert_chain, key)?);
        }
        Ok(self.config)
    }
}

/// State shared by every worker and session of one hub.
pub struct HubState {
    /// The configuration the hub runs with.
    pub config: HubConfig,
    started_at: Instant,
    connections: AtomicUsize,
    connections_watch: tokio::sync::watch::Sender<usize>,
    next_conn_id: std::sync::atomic::AtomicU64,
    shutting_down: AtomicBool,
    /// Sessions, with the connection that owns each.
    pub sessions: Mutex<SessionTable<actix::Addr<HubSession>>>,
    /// Every open connection's session actor, to tell them the hub is stopping.
    live: Mutex<HashMap<u64, Recipient<ShutDown>>>,
    /// Whether this node's admin announcement reached its peer directory (see
    /// [`HubHandle::watch_admin_announced`]).
    admin_announced: tokio::sync::watch::Sender<bool>,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl HubState {
    fn new(config: HubConfig) -> Self {
        HubState {
            sessions: Mutex::new(SessionTable::new(config.session_ttl)),
            live: Mutex::new(HashMap::new()),
            admin_announced: tokio::sync::watch::Sender::new(false),
            config,
            started_at: Instant::now(),
            connections: AtomicUsize::new(0),
            connections_watch: tokio::sync::watch::Sender::new(0),
            next_conn_id: std::sync::atomic::AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            prometheus: telemetry::prometheus(),
        }
    }

    /// Open WebSocket connections.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn connection_opened(&self) -> u64 {
        let now = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(telemetry::HUB_CONNECTIONS).set(now as f64);
        self.connections_watch.send_replace(now);
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn connection_closed(&self) {
        let now = self.connections.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(telemetry::HUB_CONNECTIONS).set(now as f64);
        self.connections_watch.send_replace(now);
    }

    pub(crate) fn live_sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, Recipient<ShutDown>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the session table, recovering from a poisoned lock (a panicking session must not
    /// take every other client down with it).
    pub fn sessions(&self) -> std::sync::MutexGuard<'_, SessionTable<actix::Addr<HubSession>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `/health` document.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// `ok`, `unhealthy` (the channels layer cannot serve: see `store`), or `shutting_down`.
    pub status: &'static str,
    /// This node's name.
    pub node_id: String,
    /// Open WebSocket connections.
    pub connections: usize,
    /// Sessions, attached or resumable.
    pub sessions: usize,
    /// Seconds since the hub started.
    pub uptime_s: f64,
    /// Protocol versions spoken.
    pub protocol_versions: &'static [u16],
    /// What the channels layer reports (its history store: kind, healthy, reason).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub store: serde_json::Value,
}

/// The hub server. See [`Hub::start`].
#[derive(Debug)]
pub struct Hub;

impl Hub {
    /// Binds and starts the hub on the current actix system (call it from `#[actix::main]`,
    /// `#[actix_rt::test]` or an actix `System`). Returns once the socket is bound.
    ///
    /// The server is actix-server with actix-http's HTTP/1 service: plain requests (`/health`,
    /// `/metrics`) go to an actix-web `App`; a WebSocket upgrade request is taken out of the
    /// HTTP dispatcher (its 8 KiB read and write buffers go with it) and its socket is served by
    /// the session and a [`wire::Writer`] with buffers that exist only while bytes move.
    pub fn start(config: HubConfig) -> Result<HubHandle, TransportError> {
        let state = Arc::new(HubState::new(config.clone()));
        let start_error = |e: std::io::Error| TransportError::HubStart {
            message: format!("bind {}: {e}", config.bind),
        };
        let listener = listen(config.bind).map_err(start_error)?;
        let addr = listener.local_addr().map_err(start_error)?;
        let builder = actix_server::Server::build()
            .workers(config.workers)
            .backlog(LISTEN_BACKLOG)
            .shutdown_timeout(1)
            .disable_signals();
        let builder = match &config.tls {
            Some(tls) => {
                let rustls = (**tls.rustls_config()).clone();
                let state = state.clone();
                builder.listen("tether-hub-tls", listener, move || {
                    http_service::<TlsStream>(state.clone())
                        .rustls_0_23_with_config(rustls.clone(), TlsAcceptorConfig::default())
                })
            }
            None => {
                let state = state.clone();
                builder.listen("tether-hub", listener, move || {
                    http_service::<TcpStream>(state.clone()).tcp()
                })
            }
        }
        .map_err(start_error)?;
        let server = builder.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        tracing::info!(%addr, path = %config.ws_path, node_id = %config.node_id, tls = config.tls.is_some(), admin = config.admin_token.is_some(), "hub listening");
        // The admin API answers for every node sharing the store: this one says where it is.
        let announcer = match (&config.admin_token, config.handler.admin_peers()) {
            (Some(_), Some(directory)) => {
                let scheme = if config.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                let url = config
                    .advertise_url
                    .clone()
                    .unwrap_or_else(|| format!("{scheme}://{addr}"));
                let proof = config
                    .admin_token
                    .as_ref()
                    .map(|t| t.sign(&config.node_id, &url))
                    .unwrap_or_default();
                let node = admin::PeerNode {
                    node_id: config.node_id.clone(),
                    url,
                    proof,
                };
                let announced = state.admin_announced.clone();
                Some((
                    admin::announce(directory.clone(), node, announced),
                    directory,
                ))
            }
            _ => None,
        };
        Ok(HubHandle {
            addr,
            handle,
            state,
            announcer,
        })
    }
}

/// Pending connections the listening socket queues: 1,024 (actix-web's default).
const LISTEN_BACKLOG: u32 = 1024;

type TcpStream = actix_rt::net::TcpStream;
type TlsStream = actix_tls::accept::rustls_0_23::TlsStream<TcpStream>;

/// A connection's stream (plain TCP or TLS over it), with its TCP socket.
trait HubIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static {
    fn tcp(&self) -> &TcpStream;
}

impl HubIo for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl HubIo for TlsStream {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// The listening socket, as actix-server makes it (address reuse, the backlog).
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG as i32)?;
    Ok(socket.into())
}

/// The HTTP service of [`http_service`].
type HubHttpService<T> = actix_http::HttpService<
    T,
    boxed::BoxServiceFactory<
        (),
        actix_http::Request,
        actix_web::dev::ServiceResponse,
        actix_http::Response<actix_web::body::BoxBody>,
        (),
    >,
    actix_web::body::BoxBody,
    actix_http::h1::ExpectHandler,
    boxed::BoxServiceFactory<
        (),
        (actix_http::Request, Framed<T, actix_http::h1::Codec>),
        (),
        actix_http::Error,
        (),
    >,
>;

/// One worker's HTTP/1 service over connections of type `T`: upgrades to the WebSocket path go
/// to [`upgrade`], everything else to the actix-web app.
fn http_service<T: HubIo>(state: Arc<HubState>) -> HubHttpService<T> {
    use actix_service::{IntoServiceFactory as _, ServiceFactoryExt as _};
    let data = web::Data::from(state.clone());
    let ws_path = state.config.ws_path.clone();
    let app = App::new()
        .app_data(data)
        .route(&ws_path, web::get().to(ws_route))
        .route("/health", web::get().to(health_route))
        .route("/metrics", web::get().to(metrics_route))
        .configure(admin::routes)
        .into_factory()
        .map_err(|e: actix_web::Error| e.error_response().into());
    let app = boxed::factory(actix_service::map_config(app, |()| {
        actix_web::dev::AppConfig::default()
    }));
    let upgrades = boxed::factory(actix_service::fn_service(
        move |(req, framed): (actix_http::Request, Framed<T, actix_http::h1::Codec>)| {
            upgrade(state.clone(), req, framed)
        },
    ));
    actix_http::HttpService::build()
        // Small frames (acks, messages) must not wait for Nagle and delayed ACKs.
        .tcp_nodelay(true)
        // A plain request's connection ends right after the response.
        .client_disconnect_timeout(Duration::ZERO)
        .upgrade(upgrades)
        .finish(app)
}

/// A WebSocket upgrade request, with its connection taken out of the HTTP dispatcher: answered
/// (101, or why not), then its socket is served by a new session and a [`wire::Writer`]. The
/// dispatcher's buffers are dropped; bytes the client sent behind its request are kept.
async fn upgrade<T: HubIo>(
    state: Arc<HubState>,
    req: actix_http::Request,
    mut framed: Framed<T, actix_http::h1::Codec>,
) -> Result<(), actix_http::Error> {
    use actix_http::body::BodySize;
    use actix_http::{h1, ConnectionType, Method, Response, StatusCode};
    use futures::SinkExt as _;

    let refused = if req.path() != state.config.ws_path {
        Some(Response::new(StatusCode::NOT_FOUND))
    } else if req.method() != Method::GET {
        Some(Response::new(StatusCode::METHOD_NOT_ALLOWED))
    } else if state.shutting_down.load(Ordering::Relaxed) {
        Some(Response::new(StatusCode::SERVICE_UNAVAILABLE))
    } else {
        actix_http::ws::verify_handshake(req.head())
            .err()
            .map(Response::from)
    };
    let upgraded = refused.is_none();
    let response = match refused {
        Some(mut refusal) => {
            refusal
                .head_mut()
                .set_connection_type(ConnectionType::Close);
            (refusal.drop_body(), BodySize::Sized(0))
        }
        None => (
            actix_http::ws::handshake_response(req.head())
                .finish()
                .drop_body(),
            BodySize::None,
        ),
    };
    // A client that does not read its answer does not hold the worker.
    let timeout = state.config.close_timeout;
    let sent = tokio::time::timeout(timeout, framed.send(h1::Message::Item(response))).await;
    if !matches!(sent, Ok(Ok(()))) || !upgraded {
        let _ = tokio::time::timeout(timeout, framed.close()).await;
        return Ok(());
    }
    let parts = framed.into_parts();
    let early = Bytes::copy_from_slice(&parts.read_buf);
    let io = parts.io;
    let fd = io.tcp().as_raw_fd();
    let (io, socket) = wire::Guarded::new(io, fd);
    let peer = req.peer_addr();
    let (read, write) = tokio::io::split(io);
    let body = session::start(
        state,
        peer,
        Some(socket),
        wire::SocketReader::new(read, early),
    );
    actix_rt::spawn(wire::Writer::new(body, write));
    Ok(())
}

/// A running hub.
pub struct HubHandle {
    addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    state: Arc<HubState>,
    /// Announces this node to its admin peers while it runs.
    announcer: Option<(actix_rt::task::JoinHandle<()>, Arc<dyn AdminPeers>)>,
}

impl HubHandle {
    /// The address the hub is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The WebSocket URL clients connect to: `wss://` when the hub serves TLS, `ws://`
    /// otherwise.
    pub fn ws_url(&self) -> String {
        let scheme = match self.state.config.tls {
            Some(_) => "wss",
            None => "ws",
        };
        format!("{scheme}://{}{}", self.addr, self.state.config.ws_path)
    }

    /// Open WebSocket connections.
    pub fn connection_count(&self) -> usize {
        self.state.connection_count()
    }

    /// Watches the number of open WebSocket connections (for dashboards and tests that wait for
    /// a count instead of polling).
    pub fn watch_connections(&self) -> tokio::sync::watch::Receiver<usize> {
        self.state.connections_watch.subscribe()
    }

    /// Watches whether this node's admin API has announced itself to the nodes sharing its
    /// store (`true` once the first announcement was stored; stays `false` without an admin
    /// token or a peer directory). For tests and readiness checks that wait for a cluster to
    /// see a node instead of polling.
    pub fn watch_admin_announced(&self) -> tokio::sync::watch::Receiver<bool> {
        self.state.admin_announced.subscribe()
    }

    /// The shared state (sessions, counters).
    pub fn state(&self) -> &Arc<HubState> {
        &self.state
    }

    /// Stops the hub gracefully: no new connection is accepted; every client is sent
    /// `shutting_down` with the configured retry window and a close frame (1001); the hub
    /// waits up to the drain timeout for them to leave, then drops whatever is left and stops
    /// its workers. Resolves once the workers have stopped.
    pub async fn stop(mut self) {
        self.state.shutting_down.store(true, Ordering::Relaxed);
        if let Some((announcer, directory)) = self.announcer.take() {
            announcer.abort();
            let withdrawn = tokio::time::timeout(
                admin::PEER_TIMEOUT,
                directory.withdraw(&self.state.config.node_id),
            )
            .await;
            if !matches!(withdrawn, Ok(Ok(()))) {
                tracing::warn!(node = %self.state.config.node_id, "could not withdraw from the admin peers; the entry expires by itself");
            }
        }
        let retry = self.state.config.shutdown_retry;
        let live: Vec<Recipient<ShutDown>> = self.state.live_sessions().values().cloned().collect();
        tracing::info!(addr = %self.addr, connections = live.len(), ?retry, "hub stopping: telling clients");
        for session in live {
            session.do_send(ShutDown { retry });
        }
        let mut connections = self.watch_connections();
        let drained = tokio::time::timeout(
            self.state.config.drain_timeout,
            connections.wait_for(|n| *n == 0),
        )
        .await;
        if drained.is_err() {
            tracing::warn!(addr = %self.addr, left = self.connection_count(), "drain timeout: dropping the remaining connections");
        }
        self.handle.stop(false).await;
        tracing::info!(addr = %self.addr, "hub stopped");
    }

    /// Stops the hub at once, without telling anybody: the listener closes and every
    /// connection is dropped, as a crash would (for tests of crash recovery).
    pub async fn kill(mut self) {
        self.state.shutting_down.store(true, Ordering::Relaxed);
        // A crashed node announces nothing more: its peers stop asking it once its entry
        // expires.
        if let Some((announcer, _)) = self.announcer.take() {
            announcer.abort();
        }
        self.handle.stop(false).await;
        tracing::info!(addr = %self.addr, "hub killed");
    }
}

/// The WebSocket path without an upgrade (upgrades never reach the app: see [`upgrade`]).
async fn ws_route(req: HttpRequest, state: web::Data<HubState>) -> HttpResponse {
    if state.shutting_down.load(Ordering::Relaxed) {
        return HttpResponse::ServiceUnavailable().finish();
    }
    match actix_http::ws::verify_handshake(req.head()) {
        Err(e) => actix_http::Response::from(e).into(),
        Ok(()) => HttpResponse::BadRequest().finish(),
    }
}

async fn health_route(state: web::Data<HubState>) -> HttpResponse {
    let shutting_down = state.shutting_down.load(Ordering::Relaxed);
    let handler = state.config.handler.health();
    let status = if shutting_down {
        "shutting_down"
    } else if !handler.healthy {
        "unhealthy"
    } else {
        "ok"
    };
    let health = Health {
        status,
        node_id: state.config.node_id.clone(),
        connections: state.connection_count(),
        sessions: state.sessions().len(),
        uptime_s: state.started_at.elapsed().as_secs_f64(),
        protocol_versions: crate::protocol::SUPPORTED_VERSIONS,
        store: handler.detail,
    };
    if status != "ok" {
        HttpResponse::ServiceUnavailable().json(health)
    } else {
        HttpResponse::Ok().json(health)
    }
}

async fn metrics_route(state: web::Data<HubState>) -> HttpResponse {
    match &state.prometheus {
        Some(handle) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(handle.render()),
        None => HttpResponse::NotFound()
            .body("another metrics recorder is installed in this process; it owns the metrics"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_config_validation() {
        assert!(HubConfig::builder().build().is_ok());
        assert!(HubConfig::builder().ws_path("ws").build().is_err());
        assert!(HubConfig::builder().ws_path("/health").build().is_err());
        assert!(HubConfig::builder().ws_path("/sessions").build().is_err());
        assert!(HubConfig::builder()
            .ws_path("/channels/ws")
            .build()
            .is_err());
        assert!(HubConfig::builder().ws_path("/channelsx").build().is_ok());
        assert!(HubConfig::builder()
            .heartbeat(Duration::from_secs(2), Duration::from_secs(1))
            .build()
            .is_err());
        assert!(HubConfig::builder().workers(0).build().is_err());
        assert!(HubConfig::builder().max_frame_size(5).build().is_err());
        assert!(HubConfig::builder().node_id("").build().is_err());
        assert!(HubConfig::builder().node_id("a\nb").build().is_err());
        assert!(HubConfig::builder().node_id("eu-1").build().is_ok());
    }

    #[test]
    fn the_admin_token_and_advertise_url_are_checked_at_build() {
        assert!(HubConfig::builder().build().unwrap().admin_token.is_none());
        let on = HubConfig::builder()
            .admin_token("0123456789abcdef")
            .build()
            .unwrap();
        assert!(on.admin_token.unwrap().matches("0123456789abcdef"));
        assert_eq!(
            field_of(HubConfig::builder().admin_token("too short").build()),
            "admin_token"
        );
        let env = |k: &str| match k {
            "TETHER_HUB_ADMIN_TOKEN" => Some(" short ".to_owned()),
            "TETHER_HUB_ADVERTISE_URL" => Some("http://10.0.0.7:8080".to_owned()),
            _ => None,
        };
        let from_env = HubConfig::builder().apply_env(env).unwrap();
        assert_eq!(field_of(from_env.build()), "TETHER_HUB_ADMIN_TOKEN");
        let env = |k: &str| match k {
            "TETHER_HUB_ADMIN_TOKEN" => Some("0123456789abcdef-from-env".to_owned()),
            "TETHER_HUB_ADVERTISE_URL" => Some("http://10.0.0.7:8080".to_owned()),
            _ => None,
        };
        let built = HubConfig::builder()
            .apply_env(env)
            .unwrap()
            .build()
            .unwrap();
        assert!(built
            .admin_token
            .unwrap()
            .matches("0123456789abcdef-from-env"));
        assert_eq!(built.advertise_url.as_deref(), Some("http://10.0.0.7:8080"));
        assert_eq!(
            field_of(HubConfig::builder().advertise_url("10.0.0.7:8080").build()),
            "advertise_url"
        );
    }

    fn field_of(result: Result<HubConfig, TransportError>) -> &'static str {
        match result {
            Err(TransportError::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn hub_tls_is_checked_at_build() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (chain, key) = (cert.cert.pem(), cert.signing_key.serialize_pem());
        assert!(HubConfig::builder().build().unwrap().tls.is_none());
        let config = HubConfig::builder()
            .tls(chain.clone(), key.clone())
            .build()
            .unwrap();
        assert_eq!(config.tls.as_ref().map(HubTls::chain_len), Some(1));
        assert_eq!(
            field_of(HubConfig::builder().tls("garbage", key.clone()).build()),
            "tls_cert"
        );
        assert_eq!(
            field_of(HubConfig::builder().tls(chain.clone(), "garbage").build()),
            "tls_key"
        );
        assert_eq!(
            field_of(
                HubConfig::builder()
                    .tls_files("/nonexistent/hub.crt", "/nonexistent/hub.key")
                    .build()
            ),
            "tls_cert"
        );
    }

    #[test]
    fn hub_tls_comes_from_the_environment() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let chain_path = dir.join(format!("tether-hub-test-{pid}.crt"));
        let key_path = dir.join(format!("tether-hub-test-{pid}.key"));
        std::fs::write(&chain_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        let env = |cert: Option<&std::path::Path>, key: Option<&std::path::Path>| {
            let (cert, key) = (
                cert.map(|p| p.display().to_string()),
                key.map(|p| p.display().to_string()),
            );
            move |k: &str| match k {
                "TETHER_HUB_TLS_CERT" => cert.clone(),
                "TETHER_HUB_TLS_KEY" => key.clone(),
                _ => None,
            }
        };
        let built = HubConfig::builder()
            .apply_env(env(Some(&chain_path), Some(&key_path)))
            .unwrap()
            .build();
        // A key file where the chain should be is named by its variable.
        let swapped = HubConfig::builder()
            .apply_env(env(Some(&key_path), Some(&key_path)))
            .unwrap()
            .build();
        std::fs::remove_file(&chain_path).unwrap();
        std::fs::remove_file(&key_path).unwrap();
        assert!(built.unwrap().tls.is_some());
        assert_eq!(field_of(swapped), "TETHER_HUB_TLS_CERT");

        let only_cert = HubConfig::builder().apply_env(env(Some(&chain_path), None));
        assert!(matches!(
            only_cert,
            Err(TransportError::InvalidConfig {
                field: "TETHER_HUB_TLS_KEY",
                ..
            })
        ));
        let only_key = HubConfig::builder().apply_env(env(None, Some(&key_path)));
        assert!(matches!(
            only_key,
            Err(TransportError::InvalidConfig {
                field: "TETHER_HUB_TLS_CERT",
                ..
            })
        ));
        let neither = HubConfig::builder().apply_env(env(None, None)).unwrap();
        assert!(neither.build().unwrap().tls.is_none());
    }
}
