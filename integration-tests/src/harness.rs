//! Helpers shared by the integration tests, examples and the soak tool: a real hub on loopback
//! with test-speed timings, client configurations that retry in milliseconds, and a typed event
//! log that waits for transitions with a timeout (never a fixed sleep).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use tether_transport::hub::{Hub, HubConfig, HubConfigBuilder, HubHandle};
use tether_transport::{
    ConnectionState, ConnectionStateChanged, EventReceiver, TransportConfig, TransportConfigBuilder,
};

/// Installs a `tracing` subscriber once (filter from `RUST_LOG`, default `warn`), writing
/// through the test harness' capture.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// A loopback address with a port that was free a moment ago (for hubs that must come back on
/// the same port, or for endpoints where nothing listens).
pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address")
}

/// Hub settings for tests: one worker, heartbeat 250 ms, idle timeout 1 s, hello timeout 2 s.
pub fn test_hub_config(bind: SocketAddr) -> HubConfigBuilder {
    HubConfig::builder()
        .bind(bind)
        .workers(1)
        .heartbeat(Duration::from_millis(250), Duration::from_secs(1))
        .hello_timeout(Duration::from_secs(2))
}

/// Starts a test hub on `bind` (port 0 for any). Must run inside an actix system.
pub fn start_hub(bind: SocketAddr) -> HubHandle {
    Hub::start(test_hub_config(bind).build().expect("valid hub config")).expect("hub starts")
}

/// Waits up to `timeout` until the hub has exactly `n` open connections.
pub async fn wait_for_connections(
    hub: &HubHandle,
    n: usize,
    timeout: Duration,
) -> Result<(), String> {
    let mut rx = hub.watch_connections();
    let reached = tokio::time::timeout(timeout, async { rx.wait_for(|c| *c == n).await.is_ok() })
        .await
        .unwrap_or(false);
    match reached {
        true => Ok(()),
        false => Err(format!(
            "hub has {} connections, expected {n} within {timeout:?}",
            hub.connection_count()
        )),
    }
}

/// The WebSocket URL of a hub (or proxy) at `addr`.
pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/ws")
}

/// Client settings for tests: backoff 50 ms → 400 ms, heartbeat 250 ms / 1 s idle timeout,
/// handshake 1 s, stability window 300 ms, fixed seed.
pub fn fast_client(url: impl Into<String>) -> TransportConfigBuilder {
    TransportConfig::builder(url)
        .backoff(Duration::from_millis(50), Duration::from_millis(400), 2.0)
        .heartbeat(Duration::from_millis(250), Duration::from_secs(1))
        .handshake_timeout(Duration::from_secs(1))
        .stability_window(Duration::from_millis(300))
        .suspend_interval(Duration::from_millis(500))
        .manual_reconnect_interval(Duration::from_millis(100))
        .seed(42)
}

/// Every transition a transport published, and a way to wait for the next ones.
pub struct EventLog {
    rx: EventReceiver<ConnectionStateChanged>,
    seen: Vec<ConnectionStateChanged>,
}

impl EventLog {
    /// Wraps the receiver from `Transport::start_with_events`.
    pub fn new(rx: EventReceiver<ConnectionStateChanged>) -> Self {
        EventLog {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits up to `timeout` for a transition matching `pred`; returns it. Every transition on
    /// the way is recorded.
    pub async fn until(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&ConnectionStateChanged) -> bool,
    ) -> Result<ConnectionStateChanged, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => {
                    self.seen.push(ev.clone());
                    if pred(&ev) {
                        return Ok(ev);
                    }
                }
                Ok(None) => return Err(format!("event stream ended; seen {}", self.describe())),
                Err(_) => {
                    return Err(format!(
                        "timed out after {timeout:?}; seen {}",
                        self.describe()
                    ))
                }
            }
        }
    }

    /// Waits up to `timeout` for a transition into `to`.
    pub async fn until_state(
        &mut self,
        to: ConnectionState,
        timeout: Duration,
    ) -> Result<ConnectionStateChanged, String> {
        self.until(timeout, |ev| ev.to == to).await
    }

    /// Asserts that no transition arrives for `window` (for "nothing more happens" checks).
    pub async fn expect_quiet(&mut self, window: Duration) -> Result<(), String> {
        match tokio::time::timeout(window, self.rx.recv()).await {
            Err(_) => Ok(()),
            Ok(None) => Ok(()),
            Ok(Some(ev)) => {
                let msg = format!(
                    "unexpected transition {} → {} ({})",
                    ev.from, ev.to, ev.reason
                );
                self.seen.push(ev);
                Err(msg)
            }
        }
    }

    /// Every transition recorded so far.
    pub fn seen(&self) -> &[ConnectionStateChanged] {
        &self.seen
    }

    /// The recorded transitions as `(from, to)` pairs.
    pub fn path(&self) -> Vec<(ConnectionState, ConnectionState)> {
        self.seen.iter().map(|e| (e.from, e.to)).collect()
    }

    /// Forgets what was recorded.
    pub fn clear(&mut self) {
        self.seen.clear();
    }

    fn describe(&self) -> String {
        self.seen
            .iter()
            .map(|e| format!("{}→{} [{}]", e.from, e.to, e.reason))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
