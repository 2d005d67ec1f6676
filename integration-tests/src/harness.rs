//! Helpers shared by the integration tests, examples and the soak tool: a real hub on loopback
//! with test-speed timings, client configurations that retry in milliseconds, and a typed event
//! log that waits for transitions with a timeout (never a fixed sleep).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use tether_channels::hub::{ChannelService, RedisStore, Retention};
use tether_channels::{
    Channel, ChannelEvent, ChannelEvents, ChannelOptions, ChannelState, ChannelStateChanged,
};
use tether_transport::hub::{Hub, HubConfig, HubConfigBuilder, HubHandle};
use tether_transport::{
    event_channel, ConnectionState, ConnectionStateChanged, EventReceiver, StateEvent,
    StateTransition, Transport, TransportConfig, TransportConfigBuilder,
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

/// Hub settings for tests: one worker, heartbeat 250 ms, idle timeout 1 s, hello timeout 2 s;
/// a stop tells clients to come back within 50–200 ms and waits at most 2 s for them to go.
pub fn test_hub_config(bind: SocketAddr) -> HubConfigBuilder {
    HubConfig::builder()
        .bind(bind)
        .workers(1)
        .heartbeat(Duration::from_millis(250), Duration::from_secs(1))
        .hello_timeout(Duration::from_secs(2))
        .shutdown_retry(Duration::from_millis(50), Duration::from_millis(200))
        .drain_timeout(Duration::from_secs(2))
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

/// Starts a transport with `config` and waits up to `timeout` until it is connected; the
/// transport and its transitions so far.
pub async fn connected_with(config: TransportConfig, timeout: Duration) -> (Transport, EventLog) {
    let (transport, rx) = Transport::start_with_events(config);
    let mut events = EventLog::new(rx);
    events
        .until_state(ConnectionState::Connected, timeout)
        .await
        .expect("connected");
    (transport, events)
}

/// Every event a transport (or channel) published, and a way to wait for the next ones.
///
/// Tests check complete paths, so a lag notice (the receiver fell behind its capacity) is an
/// error here rather than a skipped stretch.
pub struct EventLog<M: StateTransition = ConnectionStateChanged> {
    rx: EventReceiver<M>,
    seen: Vec<M>,
}

impl<M: StateTransition + std::fmt::Debug> EventLog<M> {
    /// Wraps the receiver from `Transport::start_with_events` or `event_channel`.
    pub fn new(rx: EventReceiver<M>) -> Self {
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
        pred: impl Fn(&M) -> bool,
    ) -> Result<M, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(StateEvent::Transition(ev))) => {
                    self.seen.push(ev.clone());
                    if pred(&ev) {
                        return Ok(ev);
                    }
                }
                Ok(Some(StateEvent::Lagged { missed, latest })) => {
                    return Err(format!(
                        "event log lagged: {missed} transitions missed before {latest:?}; seen {}",
                        self.describe()
                    ))
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

    /// Asserts that no transition arrives for `window` (for "nothing more happens" checks).
    pub async fn expect_quiet(&mut self, window: Duration) -> Result<(), String> {
        match tokio::time::timeout(window, self.rx.recv()).await {
            Err(_) => Ok(()),
            Ok(None) => Ok(()),
            Ok(Some(ev)) => {
                let msg = format!("unexpected event {ev:?}");
                self.seen.push(ev.into_transition());
                Err(msg)
            }
        }
    }

    /// Every event recorded so far.
    pub fn seen(&self) -> &[M] {
        &self.seen
    }

    /// Forgets what was recorded.
    pub fn clear(&mut self) {
        self.seen.clear();
    }

    fn describe(&self) -> String {
        format!("{:?}", self.seen)
    }
}

impl EventLog<ConnectionStateChanged> {
    /// Waits up to `timeout` for a transition into `to`.
    pub async fn until_state(
        &mut self,
        to: ConnectionState,
        timeout: Duration,
    ) -> Result<ConnectionStateChanged, String> {
        self.until(timeout, |ev| ev.to == to).await
    }

    /// The recorded transitions as `(from, to)` pairs.
    pub fn path(&self) -> Vec<(ConnectionState, ConnectionState)> {
        self.seen.iter().map(|e| (e.from, e.to)).collect()
    }
}

impl EventLog<ChannelStateChanged> {
    /// Waits up to `timeout` for a channel transition into `to`.
    pub async fn until_channel_state(
        &mut self,
        to: ChannelState,
        timeout: Duration,
    ) -> Result<ChannelStateChanged, String> {
        self.until(timeout, |ev| ev.to == to).await
    }
}

/// Reads `rx` until its stream ends (every publisher gone), for up to `timeout`.
pub async fn read_to_end<M: StateTransition>(
    rx: &mut EventReceiver<M>,
    timeout: Duration,
) -> Result<Vec<StateEvent<M>>, String> {
    let mut read = Vec::new();
    tokio::time::timeout(timeout, async {
        while let Some(ev) = rx.recv().await {
            read.push(ev);
        }
    })
    .await
    .map_err(|_| format!("stream did not end within {timeout:?}; read {}", read.len()))?;
    Ok(read)
}

/// Checks what a (possibly slow) receiver read against the complete record of the same
/// transitions: each one delivered at its place, or counted in a lag notice whose `latest` is
/// the transition at the place the count leads to — and nothing left over. Returns how many lag
/// notices there were.
pub fn account_for<M: StateTransition + PartialEq + std::fmt::Debug>(
    record: &[M],
    read: &[StateEvent<M>],
) -> Result<usize, String> {
    let mut place = 0usize;
    let mut lags = 0;
    for (i, ev) in read.iter().enumerate() {
        let skipped = usize::try_from(ev.missed()).map_err(|e| e.to_string())?;
        if matches!(ev, StateEvent::Lagged { .. }) {
            lags += 1;
            if skipped == 0 {
                return Err(format!("event {i}: a lag notice that skipped nothing"));
            }
        }
        place += skipped;
        match record.get(place) {
            Some(expected) if expected == ev.transition() => place += 1,
            other => {
                return Err(format!(
                    "event {i} ({ev:?}) should be transition {place} of the record: {other:?}"
                ))
            }
        }
    }
    match place == record.len() {
        true => Ok(lags),
        false => Err(format!(
            "{} of {} recorded transitions neither delivered nor counted as missed",
            record.len() - place,
            record.len()
        )),
    }
}

/// Starts a test hub serving channels on `bind`, with `retention` for its in-memory history.
/// Must run inside an actix system.
pub fn start_channel_hub(bind: SocketAddr, retention: Retention) -> HubHandle {
    let service = ChannelService::builder()
        .retention(retention)
        .build()
        .expect("valid channel service");
    start_hub_with(bind, service)
}

/// Starts a test hub on `bind` with the given channel service.
pub fn start_hub_with(bind: SocketAddr, service: ChannelService) -> HubHandle {
    let config = test_hub_config(bind)
        .handler(std::sync::Arc::new(service))
        .build()
        .expect("valid hub config");
    Hub::start(config).expect("hub starts")
}

/// Opens a channel on `transport` and waits until it is attached; returns the handle, its
/// events and a log of its state transitions.
pub async fn open_attached(
    transport: &Transport,
    name: &str,
    options: ChannelOptions,
    timeout: Duration,
) -> Result<(Channel, ChannelEvents, EventLog<ChannelStateChanged>), String> {
    let (recipient, rx) = event_channel(1024);
    let (channel, events) = Channel::open_with_state(transport, name, options, vec![recipient])
        .await
        .map_err(|e| e.to_string())?;
    let mut states = EventLog::new(rx);
    states
        .until_channel_state(ChannelState::Attached, timeout)
        .await?;
    Ok((channel, events, states))
}

/// Reads channel events until `n` messages arrived (discontinuities are collected too).
pub async fn collect_messages(
    events: &mut ChannelEvents,
    n: usize,
    timeout: Duration,
) -> Result<Vec<ChannelEvent>, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut messages = 0;
    while messages < n {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(ev)) => {
                messages += usize::from(matches!(ev, ChannelEvent::Message(_)));
                out.push(ev);
            }
            Ok(None) => return Err(format!("channel closed after {messages} messages")),
            Err(_) => {
                return Err(format!(
                    "only {messages} of {n} messages within {timeout:?}"
                ))
            }
        }
    }
    Ok(out)
}

/// A channel service on the Redis at `url` with test-speed timings (probe every 100 ms, a
/// command times out after 1 s), as one hub node of several. Must run inside an actix system.
pub fn redis_channel_service(url: &str, retention: Retention) -> ChannelService {
    let store = RedisStore::builder(url)
        .retention(retention)
        .probe_interval(Duration::from_millis(100))
        .response_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .expect("valid redis store");
    ChannelService::builder()
        .store(store)
        .build()
        .expect("valid channel service")
}
