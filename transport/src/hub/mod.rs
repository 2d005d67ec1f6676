//! The hub end of the transport: an actix-web server with the WebSocket route (one
//! [`HubSession`] actor per connection), `/health` and `/metrics`.
//!
//! Each connection is authenticated as an [`Identity`] by the configured [`Authenticator`]
//! ([`AllowAll`] by default: every client id its own anonymous identity, for development;
//! [`StaticTokens`] for a fixed set of tokens). Sessions and publish dedupe state belong to
//! that identity: one identity can never resume, evict or de-duplicate against another's.

pub mod auth;
pub mod handler;
pub mod session;
pub mod sessions;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Recipient;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde::Serialize;
use tokio::time::Instant;

use crate::error::TransportError;
use crate::heartbeat::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_IDLE_TIMEOUT};
use crate::telemetry;

pub use auth::{
    AllowAll, AuthRejection, Authenticator, Identity, StaticTokens, ANONYMOUS_PREFIX,
    MAX_IDENTITY_LEN,
};
pub use handler::{
    ConnInfo, ConnectionHandler, FrameRejection, HandlerHealth, Kick, NoChannels, Outbound,
    OutboundBatch, OutboxFull, SessionHandler, SessionOutbox,
};
pub use session::{Evict, HubSession};
pub use sessions::{SessionTable, DEFAULT_SESSION_TTL};

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
    /// This node's name among several hub nodes (in `/health` and the logs).
    pub node_id: String,
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
            .field("node_id", &self.node_id)
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
                node_id: format!("hub-{}", std::process::id()),
            },
        }
    }
}

/// Builder for [`HubConfig`].
#[derive(Clone)]
pub struct HubConfigBuilder {
    config: HubConfig,
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

    /// This node's name among several hub nodes, shown in `/health` and the logs. Default
    /// `hub-{process id}`.
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.config.node_id = id.into();
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<HubConfig, TransportError> {
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
        if matches!(c.ws_path.as_str(), "/health" | "/metrics") {
            return invalid("ws_path", "collides with /health or /metrics");
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
    pub sessions: Mutex<SessionTable<Recipient<Evict>>>,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl HubState {
    fn new(config: HubConfig) -> Self {
        HubState {
            sessions: Mutex::new(SessionTable::new(config.session_ttl)),
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

    /// Locks the session table, recovering from a poisoned lock (a panicking session must not
    /// take every other client down with it).
    pub fn sessions(&self) -> std::sync::MutexGuard<'_, SessionTable<Recipient<Evict>>> {
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
    pub fn start(config: HubConfig) -> Result<HubHandle, TransportError> {
        let state = Arc::new(HubState::new(config.clone()));
        let data = web::Data::from(state.clone());
        let ws_path = config.ws_path.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route(&ws_path, web::get().to(ws_route))
                .route("/health", web::get().to(health_route))
                .route("/metrics", web::get().to(metrics_route))
        })
        .workers(config.workers)
        // Small frames (acks, messages) must not wait for Nagle and delayed ACKs.
        .tcp_nodelay(true)
        .shutdown_timeout(1)
        .disable_signals()
        .bind(config.bind)
        .map_err(|e| TransportError::HubStart {
            message: format!("bind {}: {e}", config.bind),
        })?;
        let addr = server
            .addrs()
            .first()
            .copied()
            .ok_or_else(|| TransportError::HubStart {
                message: "no address bound".into(),
            })?;
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        tracing::info!(%addr, path = %config.ws_path, node_id = %config.node_id, "hub listening");
        Ok(HubHandle {
            addr,
            handle,
            state,
        })
    }
}

/// A running hub.
pub struct HubHandle {
    addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    state: Arc<HubState>,
}

impl HubHandle {
    /// The address the hub is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The WebSocket URL clients connect to.
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.addr, self.state.config.ws_path)
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

    /// The shared state (sessions, counters).
    pub fn state(&self) -> &Arc<HubState> {
        &self.state
    }

    /// Stops the hub at once: the listener closes and every connection is dropped (clients see
    /// their connection end and reconnect). Resolves once the workers have stopped.
    pub async fn stop(self) {
        self.state.shutting_down.store(true, Ordering::Relaxed);
        self.handle.stop(false).await;
        tracing::info!(addr = %self.addr, "hub stopped");
    }
}

async fn ws_route(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<HubState>,
) -> Result<HttpResponse, actix_web::Error> {
    if state.shutting_down.load(Ordering::Relaxed) {
        return Ok(HttpResponse::ServiceUnavailable().finish());
    }
    session::start(state.into_inner(), &req, stream)
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
}
