//! Client configuration: [`TransportConfig`], built and validated by [`TransportConfigBuilder`],
//! also readable from `TETHER_*` environment variables.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::error::TransportError;
use crate::heartbeat::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_IDLE_TIMEOUT};
use crate::protocol::{check_identifier, ClientId, InstanceId, MAX_ID_LEN, MAX_TOKEN_LEN};
use crate::reconnect::{OnExhausted, ReconnectPolicy, ReconnectStrategy};
use crate::tls::{ClientTrust, Material};

/// Default time allowed for TCP connect + WebSocket upgrade + hello/welcome: 10 s.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default maximum size of one frame, either direction: 1 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 1024 * 1024;

/// A validated client configuration. Build it with [`TransportConfig::builder`].
#[derive(Debug, Clone, Serialize)]
pub struct TransportConfig {
    /// Hub WebSocket URLs (`ws://` or `wss://`); attempts rotate through them on failure.
    pub endpoints: Vec<String>,
    /// This client's identity.
    pub client_id: ClientId,
    /// This client process instance, sent in every hello: the hub tells publishers apart by
    /// client id, instance and channel handle. Default: a fresh random id per
    /// [`Transport`](crate::Transport) (a durable outbox sets a stored one, so a restarted
    /// process continues the same publishers).
    pub instance_id: Option<InstanceId>,
    /// Credential sent in the hello. Never serialised.
    #[serde(skip)]
    pub token: Option<String>,
    /// Reconnection behaviour.
    pub reconnect: ReconnectPolicy,
    /// Ping after this much silence. Default 10 s.
    pub heartbeat_interval: Duration,
    /// Declare the connection dead after this much silence. Default 25 s.
    pub idle_timeout: Duration,
    /// Budget for connect + upgrade + welcome. Default 10 s.
    pub handshake_timeout: Duration,
    /// Largest frame accepted or sent. Default 1 MiB.
    pub max_frame_size: usize,
    /// Protocol version asked for in the hello: 2 (binary records, batched) by default, 1 for
    /// JSON text (a hub that speaks only v1).
    pub protocol_version: u16,
    /// Seed for the jitter generator (reproducible runs); `None` seeds from the OS.
    pub seed: Option<u64>,
    /// What `wss://` endpoints are checked against. Default: the built-in webpki roots.
    pub tls: ClientTrust,
    /// The local (source) address outgoing connections are bound to; `None` (the default):
    /// the kernel picks one.
    pub local_address: Option<std::net::IpAddr>,
}

impl TransportConfig {
    /// A builder for a client of the hub at `endpoint` (more can be added).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tether_transport::TransportConfig;
    ///
    /// let config = TransportConfig::builder("ws://127.0.0.1:8080/ws")
    ///     .endpoint("ws://127.0.0.1:8081/ws")
    ///     .token("secret")
    ///     .max_attempts(Some(5))
    ///     .heartbeat(Duration::from_secs(5), Duration::from_secs(12))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(config.endpoints.len(), 2);
    /// ```
    pub fn builder(endpoint: impl Into<String>) -> TransportConfigBuilder {
        TransportConfigBuilder::new(vec![endpoint.into()])
    }
}

/// Builder for [`TransportConfig`]; every method documents its default.
#[derive(Debug, Clone)]
pub struct TransportConfigBuilder {
    endpoints: Vec<String>,
    client_id: Option<ClientId>,
    instance_id: Option<InstanceId>,
    token: Option<String>,
    reconnect: ReconnectPolicy,
    heartbeat_interval: Duration,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    max_frame_size: usize,
    protocol_version: u16,
    seed: Option<u64>,
    tls_builtin_roots: bool,
    tls_roots: Vec<Material>,
    local_address: Option<std::net::IpAddr>,
}

impl TransportConfigBuilder {
    fn new(endpoints: Vec<String>) -> Self {
        TransportConfigBuilder {
            endpoints,
            client_id: None,
            instance_id: None,
            token: None,
            reconnect: ReconnectPolicy::default(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            protocol_version: crate::protocol::PROTOCOL_VERSION,
            seed: None,
            tls_builtin_roots: true,
            tls_roots: Vec::new(),
            local_address: None,
        }
    }

    /// A builder with no endpoint yet, filled from the process environment (see
    /// [`TransportConfigBuilder::apply_env`]). `TETHER_ENDPOINTS` must then be set, or an endpoint
    /// added, before `build`.
    pub fn from_env() -> Result<Self, TransportError> {
        Self::new(Vec::new()).apply_env(|key| std::env::var(key).ok())
    }

    /// Binds outgoing connections to this local address (a load generator spreading its
    /// connections over several source addresses, so that the kernel's ephemeral ports of one
    /// address are not what limits it; a multi-homed host choosing its interface). Also
    /// `TETHER_LOCAL_ADDRESS`. Default: none, the kernel picks.
    pub fn local_address(mut self, ip: std::net::IpAddr) -> Self {
        self.local_address = Some(ip);
        self
    }

    /// Adds another endpoint. Attempts rotate through all of them.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoints.push(url.into());
        self
    }

    /// Sets the client id. Default: a random UUID per transport. Give a stable one to keep the
    /// same identity (and publish ids) across process restarts.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(ClientId(id.into()));
        self
    }

    /// Sets the instance id sent in the hello. Default: a fresh random one per transport.
    /// Reuse one only for a process that continues the publishers of an earlier one (a durable
    /// outbox does); two live transports must never share one.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(InstanceId(id.into()));
        self
    }

    /// Sets the token sent in the hello. Default: none.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Replaces the whole reconnection policy. Default: [`ReconnectPolicy::default`].
    pub fn reconnect_policy(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// Reconnection strategy. Default: exponential.
    pub fn strategy(mut self, strategy: ReconnectStrategy) -> Self {
        self.reconnect.strategy = strategy;
        self
    }

    /// First delay, cap, and growth factor of the backoff. Default: 1 s, 60 s, ×2.
    pub fn backoff(mut self, initial: Duration, max: Duration, multiplier: f64) -> Self {
        self.reconnect.initial_delay = initial;
        self.reconnect.max_delay = max;
        self.reconnect.multiplier = multiplier;
        self
    }

    /// Relative jitter in `[0, 1)`. Default: 0.25 (±25 %).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.reconnect.jitter = jitter;
        self
    }

    /// Consecutive failures before the circuit breaker opens; `None` never opens it. Default:
    /// `Some(10)`.
    pub fn max_attempts(mut self, max: Option<u32>) -> Self {
        self.reconnect.max_attempts = max;
        self
    }

    /// What happens when attempts are exhausted. Default: suspend and probe forever.
    pub fn on_exhausted(mut self, action: OnExhausted) -> Self {
        self.reconnect.on_exhausted = action;
        self
    }

    /// Probe interval while suspended. Default: 60 s.
    pub fn suspend_interval(mut self, interval: Duration) -> Self {
        self.reconnect.suspend_interval = interval;
        self
    }

    /// How long a connection must stay up to count as stable. Default: 2 s.
    pub fn stability_window(mut self, window: Duration) -> Self {
        self.reconnect.stability_window = window;
        self
    }

    /// Spread of the immediate retry after a stable connection drops. Default: 250 ms.
    pub fn fast_retry_spread(mut self, spread: Duration) -> Self {
        self.reconnect.fast_retry_spread = spread;
        self
    }

    /// Minimum interval between manual reconnects. Default: 1 s.
    pub fn manual_reconnect_interval(mut self, interval: Duration) -> Self {
        self.reconnect.manual_reconnect_interval = interval;
        self
    }

    /// Ping interval and idle timeout. Default: 10 s and 25 s. The timeout must exceed the
    /// interval; both may go down to ~1 s for tests.
    pub fn heartbeat(mut self, interval: Duration, idle_timeout: Duration) -> Self {
        self.heartbeat_interval = interval;
        self.idle_timeout = idle_timeout;
        self
    }

    /// Budget for connect + upgrade + welcome. Default: 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Largest frame accepted or sent. Default: 1 MiB.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// Protocol version to ask the hub for: 1 (JSON text frames) or 2 (binary records, several
    /// to a WebSocket frame). Default: 2. Also `TETHER_PROTOCOL_VERSION`.
    pub fn protocol_version(mut self, v: u16) -> Self {
        self.protocol_version = v;
        self
    }

    /// Seed for the jitter generator. Default: seeded from the OS.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Also trusts the CA certificates in `pem` (one or more `CERTIFICATE` sections) for
    /// `wss://` endpoints — a private CA, or a hub's self-signed certificate. Checked at
    /// `build`. Default: none (the built-in roots only).
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), tether_transport::TransportError> {
    /// use tether_transport::TransportConfig;
    ///
    /// let ca = std::fs::read("/etc/tether/ca.pem").unwrap();
    /// let config = TransportConfig::builder("wss://hub.example.com/ws")
    ///     .tls_root_certificates(ca)
    ///     .tls_builtin_roots(false) // trust the private CA only
    ///     .build()?;
    /// # let _ = config; Ok(()) }
    /// ```
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_roots
            .push(Material::pem("tls_root_certificates", pem));
        self
    }

    /// Also trusts one CA certificate given as DER. Checked at `build`. Default: none.
    pub fn tls_root_certificate_der(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.tls_roots
            .push(Material::der("tls_root_certificate_der", der));
        self
    }

    /// Also trusts the CA certificates in the PEM file at `path`, read at `build`. Default:
    /// none.
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_roots.push(Material::pem_file("tls_ca_file", path));
        self
    }

    /// Whether the built-in webpki (Mozilla) roots are trusted besides the added CA
    /// certificates. Default: `true`. With `false`, only the added ones are (a private PKI);
    /// `build` then refuses a `wss://` endpoint with nothing to trust.
    pub fn tls_builtin_roots(mut self, trust: bool) -> Self {
        self.tls_builtin_roots = trust;
        self
    }

    /// Overrides settings from `TETHER_*` variables looked up through `lookup`:
    /// `TETHER_ENDPOINTS` (comma-separated, replaces the list), `TETHER_CLIENT_ID`,
    /// `TETHER_TOKEN`, `TETHER_RECONNECT_STRATEGY`, `TETHER_MAX_RECONNECT_ATTEMPTS` (0 = never
    /// suspend), `TETHER_RECONNECT_BASE_DELAY_MS`, `TETHER_RECONNECT_MAX_DELAY_MS`,
    /// `TETHER_RECONNECT_MULTIPLIER`, `TETHER_RECONNECT_JITTER`, `TETHER_SUSPEND_INTERVAL_MS`,
    /// `TETHER_STABILITY_WINDOW_MS`, `TETHER_HEARTBEAT_INTERVAL_MS`, `TETHER_IDLE_TIMEOUT_MS`,
    /// `TETHER_HANDSHAKE_TIMEOUT_MS`, `TETHER_MAX_FRAME_BYTES`, `TETHER_PROTOCOL_VERSION`, `TETHER_TLS_CA_FILE` (a PEM
    /// file of CA certificates, trusted in addition to those set on the builder),
    /// `TETHER_TLS_BUILTIN_ROOTS` (`true`/`false`). An unparsable value is an
    /// [`TransportError::InvalidConfig`] naming the variable (a CA file that cannot be read or
    /// parsed too, at `build`).
    pub fn apply_env(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, TransportError> {
        fn parse<T: std::str::FromStr>(
            field: &'static str,
            raw: Option<String>,
        ) -> Result<Option<T>, TransportError>
        where
            T::Err: std::fmt::Display,
        {
            raw.map(|v| {
                v.trim()
                    .parse::<T>()
                    .map_err(|e| TransportError::InvalidConfig {
                        field,
                        reason: format!("{v:?}: {e}"),
                    })
            })
            .transpose()
        }
        let ms = |field: &'static str| -> Result<Option<Duration>, TransportError> {
            Ok(parse::<u64>(field, lookup(field))?.map(Duration::from_millis))
        };

        if let Some(list) = lookup("TETHER_ENDPOINTS") {
            self.endpoints = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(v) = parse::<u16>("TETHER_PROTOCOL_VERSION", lookup("TETHER_PROTOCOL_VERSION"))?
        {
            self.protocol_version = v;
        }
        if let Some(id) = lookup("TETHER_CLIENT_ID") {
            self.client_id = Some(ClientId(id));
        }
        if let Some(token) = lookup("TETHER_TOKEN") {
            self.token = Some(token);
        }
        if let Some(s) = parse::<ReconnectStrategy>(
            "TETHER_RECONNECT_STRATEGY",
            lookup("TETHER_RECONNECT_STRATEGY"),
        )? {
            self.reconnect.strategy = s;
        }
        if let Some(n) = parse::<u32>(
            "TETHER_MAX_RECONNECT_ATTEMPTS",
            lookup("TETHER_MAX_RECONNECT_ATTEMPTS"),
        )? {
            self.reconnect.max_attempts = (n > 0).then_some(n);
        }
        if let Some(d) = ms("TETHER_RECONNECT_BASE_DELAY_MS")? {
            self.reconnect.initial_delay = d;
        }
        if let Some(d) = ms("TETHER_RECONNECT_MAX_DELAY_MS")? {
            self.reconnect.max_delay = d;
        }
        if let Some(m) = parse::<f64>(
            "TETHER_RECONNECT_MULTIPLIER",
            lookup("TETHER_RECONNECT_MULTIPLIER"),
        )? {
            self.reconnect.multiplier = m;
        }
        if let Some(j) = parse::<f64>("TETHER_RECONNECT_JITTER", lookup("TETHER_RECONNECT_JITTER"))?
        {
            self.reconnect.jitter = j;
        }
        if let Some(d) = ms("TETHER_SUSPEND_INTERVAL_MS")? {
            self.reconnect.suspend_interval = d;
        }
        if let Some(d) = ms("TETHER_STABILITY_WINDOW_MS")? {
            self.reconnect.stability_window = d;
        }
        if let Some(d) = ms("TETHER_HEARTBEAT_INTERVAL_MS")? {
            self.heartbeat_interval = d;
        }
        if let Some(d) = ms("TETHER_IDLE_TIMEOUT_MS")? {
            self.idle_timeout = d;
        }
        if let Some(d) = ms("TETHER_HANDSHAKE_TIMEOUT_MS")? {
            self.handshake_timeout = d;
        }
        if let Some(n) = parse::<usize>("TETHER_MAX_FRAME_BYTES", lookup("TETHER_MAX_FRAME_BYTES"))?
        {
            self.max_frame_size = n;
        }
        if let Some(ip) = lookup("TETHER_LOCAL_ADDRESS").filter(|v| !v.trim().is_empty()) {
            self.local_address =
                Some(
                    ip.trim()
                        .parse()
                        .map_err(|e| TransportError::InvalidConfig {
                            field: "TETHER_LOCAL_ADDRESS",
                            reason: format!("{ip:?} is not an IP address: {e}"),
                        })?,
                );
        }
        if let Some(path) = lookup("TETHER_TLS_CA_FILE").filter(|p| !p.trim().is_empty()) {
            self.tls_roots
                .push(Material::pem_file("TETHER_TLS_CA_FILE", path.trim()));
        }
        if let Some(trust) = parse::<bool>(
            "TETHER_TLS_BUILTIN_ROOTS",
            lookup("TETHER_TLS_BUILTIN_ROOTS"),
        )? {
            self.tls_builtin_roots = trust;
        }
        Ok(self)
    }

    /// Validates and builds.
    pub fn build(self) -> Result<TransportConfig, TransportError> {
        let invalid = |field: &'static str, reason: String| {
            Err(TransportError::InvalidConfig { field, reason })
        };
        if self.endpoints.is_empty() {
            return invalid("endpoints", "at least one endpoint is required".into());
        }
        for url in &self.endpoints {
            if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                return invalid("endpoints", format!("{url:?} is not a ws:// or wss:// URL"));
            }
        }
        if let Some(id) = &self.client_id {
            if let Err(e) = check_identifier("client_id", &id.0, MAX_ID_LEN, true) {
                return invalid("client_id", e.to_string());
            }
        }
        if let Some(id) = &self.instance_id {
            if let Err(e) = check_identifier("instance_id", &id.0, MAX_ID_LEN, false) {
                return invalid("instance_id", e.to_string());
            }
        }
        if let Some(token) = &self.token {
            if let Err(e) = check_identifier("token", token, MAX_TOKEN_LEN, false) {
                return invalid("token", e.to_string());
            }
        }
        let r = &self.reconnect;
        if r.strategy != ReconnectStrategy::Immediate && r.initial_delay.is_zero() {
            return invalid("initial_delay", "must be greater than zero".into());
        }
        if r.max_delay < r.initial_delay {
            return invalid(
                "max_delay",
                format!(
                    "{:?} is below the initial delay {:?}",
                    r.max_delay, r.initial_delay
                ),
            );
        }
        if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
            return invalid("multiplier", format!("{} must be ≥ 1", r.multiplier));
        }
        if !(0.0..1.0).contains(&r.jitter) {
            return invalid("jitter", format!("{} must be in [0, 1)", r.jitter));
        }
        if r.max_attempts == Some(0) {
            return invalid(
                "max_attempts",
                "must be at least 1 (use None for never)".into(),
            );
        }
        if r.suspend_interval.is_zero() {
            return invalid("suspend_interval", "must be greater than zero".into());
        }
        if r.breaker_success_threshold == 0 {
            return invalid("breaker_success_threshold", "must be at least 1".into());
        }
        if self.heartbeat_interval < Duration::from_millis(10) {
            return invalid("heartbeat_interval", "must be at least 10 ms".into());
        }
        if self.idle_timeout <= self.heartbeat_interval {
            return invalid(
                "idle_timeout",
                format!(
                    "{:?} must exceed the heartbeat interval {:?}",
                    self.idle_timeout, self.heartbeat_interval
                ),
            );
        }
        if self.handshake_timeout.is_zero() {
            return invalid("handshake_timeout", "must be greater than zero".into());
        }
        if self.max_frame_size < 1024 {
            return invalid("max_frame_size", "must be at least 1024 bytes".into());
        }
        if !crate::protocol::SUPPORTED_VERSIONS.contains(&self.protocol_version) {
            return invalid(
                "protocol_version",
                format!(
                    "{} is not one of {:?}",
                    self.protocol_version,
                    crate::protocol::SUPPORTED_VERSIONS
                ),
            );
        }
        // A TLS client is built only when some endpoint needs one: ws:// costs nothing.
        let needs_tls = self.endpoints.iter().any(|url| url.starts_with("wss://"));
        let tls = ClientTrust::build(self.tls_builtin_roots, &self.tls_roots, needs_tls)?;
        Ok(TransportConfig {
            endpoints: self.endpoints,
            client_id: self.client_id.unwrap_or_else(ClientId::random),
            instance_id: self.instance_id,
            token: self.token,
            reconnect: self.reconnect,
            heartbeat_interval: self.heartbeat_interval,
            idle_timeout: self.idle_timeout,
            handshake_timeout: self.handshake_timeout,
            max_frame_size: self.max_frame_size,
            protocol_version: self.protocol_version,
            seed: self.seed,
            tls,
            local_address: self.local_address,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const URL: &str = "ws://127.0.0.1:1/ws";

    fn field_of(result: Result<TransportConfig, TransportError>) -> &'static str {
        match result {
            Err(TransportError::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn the_local_address_comes_from_the_builder_or_the_environment() {
        let none = TransportConfig::builder("ws://h/ws").build().unwrap();
        assert_eq!(none.local_address, None);
        let ip: std::net::IpAddr = [127, 0, 0, 9].into();
        let set = TransportConfig::builder("ws://h/ws")
            .local_address(ip)
            .build()
            .unwrap();
        assert_eq!(set.local_address, Some(ip));
        let env =
            |v: &'static str| move |k: &str| (k == "TETHER_LOCAL_ADDRESS").then(|| v.to_owned());
        let from_env = TransportConfig::builder("ws://h/ws")
            .apply_env(env(" 127.0.0.9 "))
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(from_env.local_address, Some(ip));
        assert_eq!(
            field_of(
                TransportConfig::builder("ws://h/ws")
                    .apply_env(env("nowhere"))
                    .and_then(TransportConfigBuilder::build)
            ),
            "TETHER_LOCAL_ADDRESS"
        );
    }

    #[test]
    fn identifiers_are_validated_at_build_time() {
        assert!(TransportConfig::builder("ws://h/ws")
            .client_id("x".repeat(129))
            .build()
            .is_err());
        assert!(TransportConfig::builder("ws://h/ws")
            .client_id("")
            .build()
            .is_err());
        assert!(TransportConfig::builder("ws://h/ws")
            .client_id("ada")
            .build()
            .is_ok());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = TransportConfig::builder(URL).build().unwrap();
        assert_eq!(c.reconnect.initial_delay, Duration::from_secs(1));
        assert_eq!(c.reconnect.max_delay, Duration::from_secs(60));
        assert_eq!(c.reconnect.multiplier, 2.0);
        assert_eq!(c.reconnect.jitter, 0.25);
        assert_eq!(c.reconnect.max_attempts, Some(10));
        assert_eq!(c.reconnect.suspend_interval, Duration::from_secs(60));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(25));
        assert!(c.idle_timeout + c.heartbeat_interval / 2 <= Duration::from_secs(30));
    }

    #[test]
    fn invalid_values_are_refused_at_build_time() {
        let b = || TransportConfig::builder(URL);
        assert_eq!(
            field_of(TransportConfigBuilder::new(vec![]).build()),
            "endpoints"
        );
        assert_eq!(
            field_of(TransportConfig::builder("http://x").build()),
            "endpoints"
        );
        assert_eq!(
            field_of(
                b().backoff(Duration::from_secs(5), Duration::from_secs(1), 2.0)
                    .build()
            ),
            "max_delay"
        );
        assert_eq!(field_of(b().jitter(1.0).build()), "jitter");
        assert_eq!(field_of(b().jitter(-0.1).build()), "jitter");
        assert_eq!(
            field_of(
                b().backoff(Duration::from_secs(1), Duration::from_secs(2), 0.5)
                    .build()
            ),
            "multiplier"
        );
        assert_eq!(field_of(b().max_attempts(Some(0)).build()), "max_attempts");
        assert_eq!(
            field_of(
                b().heartbeat(Duration::from_secs(5), Duration::from_secs(5))
                    .build()
            ),
            "idle_timeout"
        );
        assert_eq!(field_of(b().max_frame_size(10).build()), "max_frame_size");
    }

    #[test]
    fn environment_overrides_builder_values() {
        let env: HashMap<&str, &str> = [
            ("TETHER_ENDPOINTS", "ws://a:1/ws, ws://b:2/ws"),
            ("TETHER_MAX_RECONNECT_ATTEMPTS", "0"),
            ("TETHER_RECONNECT_BASE_DELAY_MS", "250"),
            ("TETHER_RECONNECT_MAX_DELAY_MS", "30000"),
            ("TETHER_RECONNECT_MULTIPLIER", "1.5"),
            ("TETHER_RECONNECT_JITTER", "0.1"),
            ("TETHER_RECONNECT_STRATEGY", "linear"),
            ("TETHER_HEARTBEAT_INTERVAL_MS", "1000"),
            ("TETHER_IDLE_TIMEOUT_MS", "3000"),
        ]
        .into_iter()
        .collect();
        let c = TransportConfig::builder(URL)
            .apply_env(|k| env.get(k).map(|v| v.to_string()))
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(c.endpoints, ["ws://a:1/ws", "ws://b:2/ws"]);
        assert_eq!(c.reconnect.max_attempts, None);
        assert_eq!(c.reconnect.initial_delay, Duration::from_millis(250));
        assert_eq!(c.reconnect.max_delay, Duration::from_secs(30));
        assert_eq!(c.reconnect.multiplier, 1.5);
        assert_eq!(c.reconnect.jitter, 0.1);
        assert_eq!(c.reconnect.strategy, ReconnectStrategy::Linear);
        assert_eq!(c.idle_timeout, Duration::from_secs(3));
    }

    #[test]
    fn a_ws_only_configuration_builds_no_tls_client() {
        let c = TransportConfig::builder(URL).build().unwrap();
        assert!(c.tls.rustls_config().is_none());
        assert!(c.tls.builtin_roots());
        // Nothing to trust is fine while no endpoint is wss://.
        let c = TransportConfig::builder(URL)
            .tls_builtin_roots(false)
            .build()
            .unwrap();
        assert!(c.tls.rustls_config().is_none());
    }

    #[test]
    fn a_wss_endpoint_gets_the_builtin_roots_and_the_added_cas() {
        let c = TransportConfig::builder("wss://hub.example.com/ws")
            .build()
            .unwrap();
        assert!(c.tls.rustls_config().is_some());
        assert!(c.tls.extra_roots().is_empty());

        let ca = rcgen::generate_simple_self_signed(vec!["hub.example.com".to_owned()]).unwrap();
        let c = TransportConfig::builder("wss://hub.example.com/ws")
            .tls_root_certificates(ca.cert.pem())
            .tls_root_certificate_der(ca.cert.der().to_vec())
            .tls_builtin_roots(false)
            .build()
            .unwrap();
        assert_eq!(c.tls.extra_roots().len(), 2);
        assert!(c.tls.rustls_config().is_some());
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["tls"]["extra_roots"], 2);
        assert_eq!(json["tls"]["builtin_roots"], false);
    }

    #[test]
    fn tls_settings_are_validated_at_build_time() {
        let wss = || TransportConfig::builder("wss://127.0.0.1:1/ws");
        assert_eq!(
            field_of(wss().tls_builtin_roots(false).build()),
            "tls_builtin_roots"
        );
        assert_eq!(
            field_of(wss().tls_root_certificates("no pem here").build()),
            "tls_root_certificates"
        );
        assert_eq!(
            field_of(wss().tls_ca_file("/nonexistent/tether-ca.pem").build()),
            "tls_ca_file"
        );
    }

    #[test]
    fn tls_trust_comes_from_the_environment_too() {
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let path =
            std::env::temp_dir().join(format!("tether-config-test-ca-{}.pem", std::process::id()));
        std::fs::write(&path, ca.cert.pem()).unwrap();
        let env: HashMap<&str, String> = [
            ("TETHER_TLS_CA_FILE", path.display().to_string()),
            ("TETHER_TLS_BUILTIN_ROOTS", "false".to_owned()),
        ]
        .into_iter()
        .collect();
        let c = TransportConfig::builder("wss://localhost:1/ws")
            .apply_env(|k| env.get(k).cloned())
            .unwrap()
            .build()
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(c.tls.extra_roots().len(), 1);
        assert!(!c.tls.builtin_roots());

        let missing = TransportConfig::builder("wss://localhost:1/ws")
            .apply_env(|k| (k == "TETHER_TLS_CA_FILE").then(|| "/nonexistent/ca.pem".to_owned()))
            .unwrap()
            .build();
        assert_eq!(field_of(missing), "TETHER_TLS_CA_FILE");
        let err = TransportConfig::builder(URL)
            .apply_env(|k| (k == "TETHER_TLS_BUILTIN_ROOTS").then(|| "maybe".to_owned()))
            .unwrap_err();
        assert!(matches!(
            err,
            TransportError::InvalidConfig {
                field: "TETHER_TLS_BUILTIN_ROOTS",
                ..
            }
        ));
    }

    #[test]
    fn unparsable_environment_values_name_the_variable() {
        let err = TransportConfig::builder(URL)
            .apply_env(|k| (k == "TETHER_RECONNECT_JITTER").then(|| "lots".to_string()))
            .unwrap_err();
        assert!(matches!(
            err,
            TransportError::InvalidConfig {
                field: "TETHER_RECONNECT_JITTER",
                ..
            }
        ));
    }
}
