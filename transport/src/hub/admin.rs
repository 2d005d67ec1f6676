//! The hub's session admin API: JSON over HTTP on the hub's own port, behind an admin token.
//!
//! | route | what it answers |
//! |---|---|
//! | `GET /sessions?cursor=&limit=` | sessions, by client id then session id, a page at a time |
//! | `GET /sessions/{client_id}` | that client's sessions: state, connected / disconnected since, reconnects, last heartbeat, queued bytes, channels with offsets |
//! | `POST /sessions/{client_id}/disconnect?mode=close\|reset` | drops its connections (a close handshake, or a TCP reset); the client reconnects and resumes |
//! | `GET /channels?cursor=&limit=` | channels with a live actor on some node, by name |
//! | `GET /channels/{name}` | one channel: epoch, head offset, retained range, subscribers on every node |
//!
//! Every route wants `Authorization: Bearer {admin token}`. A hub without a token configured
//! ([`super::HubConfigBuilder::admin_token`]) answers 403 `admin_disabled`; a missing or wrong
//! token is 401 `unauthorized`. Tokens are compared as SHA-256 digests in constant time.
//!
//! On several nodes sharing a store that knows its peers ([`AdminPeers`]: the Redis store),
//! every node answers for the whole cluster: it asks each live peer for its part (with the
//! same token, marked [`ADMIN_SCOPE_HEADER`]` = node` so the peer answers only for itself) and
//! merges. A peer that does not answer within [`PEER_TIMEOUT`] is named in `unreachable`: an
//! answer always says which nodes it covers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::Addr;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::session::{AdminDisconnect, DisconnectMode, HubSession, Introspect};
use super::sessions::{SessionFacts, SessionKey};
use super::HubState;
use crate::error::TransportError;
use crate::protocol::{ClientId, SessionId};
use crate::telemetry;

/// Shortest admin token accepted: 16 bytes.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;
/// Longest admin token accepted: 4,096 bytes.
pub const MAX_ADMIN_TOKEN_LEN: usize = 4096;
/// Items in a page when the request names no `limit`: 100.
pub const DEFAULT_PAGE_LIMIT: usize = 100;
/// Most items in a page: 1,000.
pub const MAX_PAGE_LIMIT: usize = 1000;
/// The header a node sets when it asks a peer for its part of an answer; value `node`.
pub const ADMIN_SCOPE_HEADER: &str = "x-tether-admin-scope";
/// How long a node waits for a peer's part of an answer: 3 s.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a session's connection has to describe itself: 2 s.
pub const INTROSPECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a node announces itself to its peers: every 5 s.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(5);
/// A node not announced for this long is taken for gone: 15 s.
pub const PEER_TTL: Duration = Duration::from_secs(15);

/// The admin token, kept as its SHA-256 digest.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// Checks and keeps `token`: [`MIN_ADMIN_TOKEN_LEN`] to [`MAX_ADMIN_TOKEN_LEN`] bytes of
    /// visible ASCII (what fits an `Authorization` header).
    pub fn new(token: &str) -> Result<Self, TransportError> {
        let invalid = |reason: &str| TransportError::InvalidConfig {
            field: "admin_token",
            reason: reason.to_owned(),
        };
        if token.len() < MIN_ADMIN_TOKEN_LEN || token.len() > MAX_ADMIN_TOKEN_LEN {
            return Err(invalid("must be 16 to 4096 bytes"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("must be visible ASCII, without spaces"));
        }
        Ok(AdminToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// The proof of a peer announcement of `node_id` at `url` (see [`PeerNode::proof`]).
    pub fn sign(&self, node_id: &str, url: &str) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.digest);
        let tag = ring::hmac::sign(&key, Self::announcement(node_id, url).as_bytes());
        hex(tag.as_ref())
    }

    /// Whether `node`'s proof was made with this token.
    pub fn verifies(&self, node: &PeerNode) -> bool {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.digest);
        match unhex(&node.proof) {
            Some(tag) => ring::hmac::verify(
                &key,
                Self::announcement(&node.node_id, &node.url).as_bytes(),
                &tag,
            )
            .is_ok(),
            None => false,
        }
    }

    fn announcement(node_id: &str, url: &str) -> String {
        format!("tether-admin-peer\n{node_id}\n{url}")
    }

    /// Whether `presented` is the token (constant time in its content).
    pub fn matches(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(self.digest.ct_eq(&digest))
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// A hub node as its peers reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    /// The node's id ([`super::HubConfigBuilder::node_id`]).
    pub node_id: String,
    /// Where its admin API answers (`http://host:port` or `https://…`, no path).
    pub url: String,
    /// HMAC-SHA256 (hex) of the node id and URL under the cluster's admin token
    /// ([`AdminToken::sign`]): a node sends its caller's token only to peers whose
    /// announcement verifies, so whoever can write to the store cannot collect tokens by
    /// announcing a node of their own.
    #[serde(default)]
    pub proof: String,
}

/// Where the hub nodes that share a store find each other (implemented by the Redis store).
pub trait AdminPeers: Send + Sync + 'static {
    /// Announces `node` for `ttl` (renewed every [`ANNOUNCE_INTERVAL`]).
    fn announce(&self, node: PeerNode, ttl: Duration) -> BoxFuture<'static, Result<(), String>>;
    /// The nodes announced within their TTL (this one included).
    fn nodes(&self) -> BoxFuture<'static, Result<Vec<PeerNode>, String>>;
    /// Takes `node_id` out (a node stopping gracefully).
    fn withdraw(&self, node_id: &str) -> BoxFuture<'static, Result<(), String>>;
}

/// A session in a `GET /sessions` page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// The client id it belongs to.
    pub client_id: String,
    /// The session id.
    pub session: String,
    /// Who it belongs to (the authenticator's identity).
    pub identity: String,
    /// The node holding it.
    pub node: String,
    /// `connected` or `disconnected` (resumable until the session TTL).
    pub state: String,
    /// Since when it is in that state (Unix time, ms).
    pub since_unix_ms: u64,
    /// How many times a new connection resumed it.
    pub reconnects: u64,
}

/// One channel a connected session has attached, as its channel sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionChannel {
    /// The channel.
    pub channel: String,
    /// Whether the connection receives its messages (false: publish only).
    pub subscribed: bool,
    /// Whether it is caught up (receives live fan-out) rather than replaying history.
    pub live: bool,
    /// The channel's epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// The last offset sent to the connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Messages of the channel not yet sent to it (head − offset): its queue depth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behind: Option<u64>,
}

/// What a connected session's connection says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionFacts {
    /// The client's address, as the hub's socket sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
    /// Protocol version it speaks.
    pub protocol_version: u16,
    /// When the client was last heard from: any frame, ping or pong (Unix time, ms).
    pub last_heartbeat_unix_ms: u64,
    /// Bytes queued for it, not yet written to its socket.
    pub queued_bytes: usize,
    /// Its publishes awaiting their acks.
    pub publishes_in_flight: usize,
    /// The channels it has attached.
    pub channels: Vec<SessionChannel>,
}

/// `GET /sessions/{client_id}`: one session in full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionDetail {
    /// The session's summary (state, since, reconnects…).
    #[serde(flatten)]
    pub summary: SessionSummary,
    /// When the session was created (Unix time, ms).
    pub opened_unix_ms: u64,
    /// When its connection took it (while connected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_since_unix_ms: Option<u64>,
    /// When its last connection ended (while disconnected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnected_since_unix_ms: Option<u64>,
    /// Its connection, while connected (`None` when the connection did not answer in time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionFacts>,
}

/// A channel in a `GET /channels` page, as one node (or, merged, the cluster) sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelSummary {
    /// The channel.
    pub name: String,
    /// Its epoch (`None` while its position is being read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// Its head offset (the highest any node fanned out).
    pub head: u64,
    /// Connections receiving it.
    pub subscribers: usize,
    /// The nodes with a live actor for it.
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// A connection receiving a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelSubscriber {
    /// Its client id.
    pub client_id: String,
    /// Its session.
    pub session: String,
    /// The node it is connected to.
    #[serde(default)]
    pub node: String,
    /// Whether it is caught up (live fan-out) rather than replaying history.
    pub live: bool,
    /// The last offset sent to it.
    pub offset: u64,
    /// Messages not yet sent to it (head − offset).
    pub behind: u64,
    /// Bytes queued for its connection (all its channels).
    pub queued_bytes: usize,
}

/// One node's view of a channel (the channels layer fills it in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelDetail {
    /// The channel.
    pub name: String,
    /// Its epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// Its head offset (the store's, when the store answered; else what this node fanned out).
    pub head: u64,
    /// The oldest offset retained (`head + 1` when nothing is); `None` when the store did not
    /// answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_retained: Option<u64>,
    /// Why the store did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// Publishes queued or in flight to the store on this node.
    pub pending_publishes: usize,
    /// Connections that have it attached on this node (subscribing or publish only).
    pub members: usize,
    /// The connections receiving it.
    pub subscribers: Vec<ChannelSubscriber>,
}

/// A page of channels, from the channels layer of one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelPage {
    /// The channels, by name.
    pub channels: Vec<ChannelSummary>,
    /// Whether more follow the last one.
    pub more: bool,
}

/// A node that did not answer for its part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unreachable {
    /// The node.
    pub node: String,
    /// Why.
    pub error: String,
}

/// `GET /sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionPage {
    /// The sessions, by client id then session id.
    pub sessions: Vec<SessionSummary>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
    /// The nodes whose sessions this covers.
    pub nodes: Vec<String>,
    /// Nodes that did not answer.
    pub unreachable: Vec<Unreachable>,
}

/// `GET /sessions/{client_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientSessions {
    /// The client id.
    pub client_id: String,
    /// Its sessions (one per identity that used the id: usually one).
    pub sessions: Vec<SessionDetail>,
    /// The nodes this covers.
    pub nodes: Vec<String>,
    /// Nodes that did not answer.
    pub unreachable: Vec<Unreachable>,
}

/// A connection `POST /sessions/{client_id}/disconnect` dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dropped {
    /// Its session.
    pub session: String,
    /// The node it was on.
    pub node: String,
}

/// `POST /sessions/{client_id}/disconnect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disconnected {
    /// The client id.
    pub client_id: String,
    /// `close` or `reset`.
    pub mode: String,
    /// The connections dropped.
    pub disconnected: Vec<Dropped>,
    /// The nodes this covers.
    pub nodes: Vec<String>,
    /// Nodes that did not answer.
    pub unreachable: Vec<Unreachable>,
}

/// `GET /channels`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelList {
    /// The channels, by name.
    pub channels: Vec<ChannelSummary>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
    /// The nodes this covers.
    pub nodes: Vec<String>,
    /// Nodes that did not answer.
    pub unreachable: Vec<Unreachable>,
}

/// `GET /channels/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelReport {
    /// The channel.
    pub name: String,
    /// Its epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// Its head offset.
    pub head: u64,
    /// The oldest offset retained (`head + 1` when nothing is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_retained: Option<u64>,
    /// Subscribers on every node.
    pub subscribers: Vec<ChannelSubscriber>,
    /// Each node's own view.
    pub by_node: BTreeMap<String, ChannelDetail>,
    /// The nodes this covers.
    pub nodes: Vec<String>,
    /// Nodes that did not answer.
    pub unreachable: Vec<Unreachable>,
}

/// The admin routes, added to the hub's app.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/sessions", web::get().to(sessions_route))
        .route(
            "/sessions/{client_id}/disconnect",
            web::post().to(disconnect_route),
        )
        .route("/sessions/{client_id}", web::get().to(session_route))
        .route("/channels", web::get().to(channels_route))
        .route("/channels/{name:.*}", web::get().to(channel_route));
}

/// Why an admin request is refused: its status and a JSON `{error, message}` body.
#[derive(Debug)]
pub(crate) struct Refusal {
    status: actix_web::http::StatusCode,
    code: &'static str,
    message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl actix_web::ResponseError for Refusal {
    fn status_code(&self) -> actix_web::http::StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if self.status == actix_web::http::StatusCode::UNAUTHORIZED {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"tether-admin\""));
        }
        response.json(serde_json::json!({ "error": self.code, "message": self.message }))
    }
}

fn bad_request(message: String) -> Refusal {
    Refusal {
        status: actix_web::http::StatusCode::BAD_REQUEST,
        code: "bad_request",
        message,
    }
}

fn not_found(code: &'static str, message: String) -> Refusal {
    Refusal {
        status: actix_web::http::StatusCode::NOT_FOUND,
        code,
        message,
    }
}

/// The caller, once its token checked out: what its peers are asked with.
struct Caller {
    token: String,
    /// Asked by a peer for this node's part only.
    node_only: bool,
}

/// Checks the admin token; `Err` is the response to give.
fn authorize(req: &HttpRequest, state: &HubState) -> Result<Caller, Refusal> {
    let route = req.match_pattern().unwrap_or_else(|| req.path().to_owned());
    let Some(expected) = &state.config.admin_token else {
        metrics::counter!(telemetry::HUB_ADMIN_REQUESTS, "result" => "disabled").increment(1);
        return Err(Refusal {
            status: actix_web::http::StatusCode::FORBIDDEN,
            code: "admin_disabled",
            message: "this hub has no admin token configured (HubConfigBuilder::admin_token, TETHER_HUB_ADMIN_TOKEN)".into(),
        });
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if expected.matches(token) => {
            metrics::counter!(telemetry::HUB_ADMIN_REQUESTS, "result" => "ok").increment(1);
            tracing::debug!(%route, "admin request");
            Ok(Caller {
                token: token.to_owned(),
                node_only: req
                    .headers()
                    .get(ADMIN_SCOPE_HEADER)
                    .is_some_and(|v| v.as_bytes() == b"node"),
            })
        }
        other => {
            metrics::counter!(telemetry::HUB_ADMIN_REQUESTS, "result" => "unauthorized")
                .increment(1);
            tracing::info!(%route, presented = other.is_some(), "admin request refused");
            Err(Refusal {
                status: actix_web::http::StatusCode::UNAUTHORIZED,
                code: "unauthorized",
                message: "an admin token is required: Authorization: Bearer {token}".into(),
            })
        }
    }
}

/// `?cursor=&limit=` of the paged routes.
#[derive(Debug, Deserialize)]
struct PageQuery {
    cursor: Option<String>,
    limit: Option<usize>,
}

impl PageQuery {
    fn limit(&self) -> Result<usize, Refusal> {
        match self.limit {
            None => Ok(DEFAULT_PAGE_LIMIT),
            Some(n) if (1..=MAX_PAGE_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(bad_request(format!(
                "limit {n} is outside 1 ..= {MAX_PAGE_LIMIT}"
            ))),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The opaque cursor of a session key.
fn session_cursor(client_id: &str, session: &str) -> String {
    format!("{}.{}", hex(client_id.as_bytes()), hex(session.as_bytes()))
}

fn parse_session_cursor(cursor: &str) -> Option<SessionKey> {
    let (client, session) = cursor.split_once('.')?;
    let client = String::from_utf8(unhex(client)?).ok()?;
    let session = String::from_utf8(unhex(session)?).ok()?;
    Some((ClientId(client), SessionId(session)))
}

fn channel_cursor(name: &str) -> String {
    hex(name.as_bytes())
}

fn parse_channel_cursor(cursor: &str) -> Option<String> {
    String::from_utf8(unhex(cursor)?).ok()
}

/// `at` as Unix time in milliseconds.
pub(crate) fn unix_ms(at: Instant) -> u64 {
    let ago = Instant::now().saturating_duration_since(at);
    SystemTime::now()
        .checked_sub(ago)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

fn summary(facts: &SessionFacts<Addr<HubSession>>, node: &str) -> SessionSummary {
    let (state, since) = match facts.detached_at {
        Some(at) => ("disconnected", at),
        None => ("connected", facts.attached_at),
    };
    SessionSummary {
        client_id: facts.client_id.0.clone(),
        session: facts.session.0.clone(),
        identity: facts.identity.as_str().to_owned(),
        node: node.to_owned(),
        state: state.to_owned(),
        since_unix_ms: unix_ms(since),
        reconnects: facts.resumes,
    }
}

/// The live peers other than this node (none without a peer directory), or why not.
async fn peers(state: &HubState) -> Result<Vec<PeerNode>, Unreachable> {
    let Some(directory) = state.config.handler.admin_peers() else {
        return Ok(Vec::new());
    };
    let own = &state.config.node_id;
    match tokio::time::timeout(PEER_TIMEOUT, directory.nodes()).await {
        Ok(Ok(nodes)) => Ok(nodes.into_iter().filter(|n| n.node_id != *own).collect()),
        Ok(Err(e)) => Err(Unreachable {
            node: "*".into(),
            error: format!("the peer directory did not answer: {e}"),
        }),
        Err(_) => Err(Unreachable {
            node: "*".into(),
            error: "the peer directory did not answer in time".into(),
        }),
    }
}

/// Asks every peer for its part at `path` (`POST` when `post`), this node's part answered by
/// `local`; returns the parts that came, the nodes they cover, and the peers that did not.
async fn gather<T: DeserializeOwned>(
    state: &HubState,
    caller: &Caller,
    path: String,
    post: bool,
    local: T,
) -> (Vec<T>, Vec<String>, Vec<Unreachable>) {
    let mut parts = vec![local];
    let mut nodes = vec![state.config.node_id.clone()];
    let mut unreachable = Vec::new();
    if caller.node_only {
        return (parts, nodes, unreachable);
    }
    let peers = match peers(state).await {
        Ok(peers) => peers,
        Err(u) => {
            unreachable.push(u);
            Vec::new()
        }
    };
    // Only peers whose announcement carries this cluster's proof are sent the token.
    let (peers, forged): (Vec<PeerNode>, Vec<PeerNode>) = match &state.config.admin_token {
        Some(token) => peers.into_iter().partition(|p| token.verifies(p)),
        None => (Vec::new(), peers),
    };
    for node in forged {
        metrics::counter!(telemetry::HUB_ADMIN_PEER_ERRORS).increment(1);
        tracing::warn!(peer = %node.node_id, url = %node.url, "admin peer announcement not signed with this cluster's admin token; not asked");
        unreachable.push(Unreachable {
            node: node.node_id,
            error: "its announcement is not signed with this node's admin token (a different token, or not a node of this cluster): not asked".into(),
        });
    }
    if peers.is_empty() {
        return (parts, nodes, unreachable);
    }
    let mut connector = awc::Connector::new();
    if let Some(tls) = state
        .config
        .admin_peer_trust
        .as_ref()
        .and_then(|t| t.rustls_config())
    {
        connector = connector.rustls_0_23(tls.clone());
    }
    let client = awc::Client::builder()
        .connector(connector)
        .timeout(PEER_TIMEOUT)
        .finish();
    let asks = peers.iter().map(|peer| {
        let url = format!("{}{}", peer.url.trim_end_matches('/'), path);
        let request = if post {
            client.post(url)
        } else {
            client.get(url)
        }
        .insert_header((header::AUTHORIZATION, format!("Bearer {}", caller.token)))
        .insert_header((ADMIN_SCOPE_HEADER, "node"));
        async move {
            let mut response = request.send().await.map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("answered {}", response.status()));
            }
            response
                .json::<T>()
                .limit(64 * 1024 * 1024)
                .await
                .map_err(|e| e.to_string())
        }
    });
    let answers = futures::future::join_all(asks).await;
    for (peer, answer) in peers.into_iter().zip(answers) {
        match answer {
            Ok(part) => {
                parts.push(part);
                nodes.push(peer.node_id);
            }
            Err(error) => {
                metrics::counter!(telemetry::HUB_ADMIN_PEER_ERRORS).increment(1);
                tracing::warn!(peer = %peer.node_id, url = %peer.url, %error, "admin peer did not answer");
                unreachable.push(Unreachable {
                    node: peer.node_id,
                    error,
                });
            }
        }
    }
    nodes.sort();
    (parts, nodes, unreachable)
}

fn query_string(cursor: Option<&str>, limit: usize) -> String {
    match cursor {
        Some(c) => format!("?cursor={c}&limit={limit}"),
        None => format!("?limit={limit}"),
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn sessions_route(
    req: HttpRequest,
    state: web::Data<HubState>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, Refusal> {
    let caller = authorize(&req, &state)?;
    let limit = query.limit()?;
    let after = match query.cursor.as_deref() {
        None => None,
        Some(c) => match parse_session_cursor(c) {
            Some(key) => Some(key),
            None => return Err(bad_request("the cursor is not one this API gave".into())),
        },
    };
    let node = state.config.node_id.clone();
    let (facts, more) = state.sessions().page(after.as_ref(), limit, Instant::now());
    let local = SessionPage {
        sessions: facts.iter().map(|f| summary(f, &node)).collect(),
        next_cursor: more
            .then(|| {
                facts
                    .last()
                    .map(|f| session_cursor(&f.client_id.0, &f.session.0))
            })
            .flatten(),
        nodes: vec![node],
        unreachable: Vec::new(),
    };
    let path = format!("/sessions{}", query_string(query.cursor.as_deref(), limit));
    let (parts, nodes, mut unreachable) = gather(&state, &caller, path, false, local).await;
    // Each part is its node's first `limit` after the cursor: the first `limit` of their union
    // are the cluster's.
    let mut more = parts.iter().any(|p| p.next_cursor.is_some());
    let mut sessions: Vec<SessionSummary> = Vec::new();
    for part in parts {
        unreachable.extend(part.unreachable);
        sessions.extend(part.sessions);
    }
    sessions.sort_by(|a, b| (&a.client_id, &a.session).cmp(&(&b.client_id, &b.session)));
    if sessions.len() > limit {
        sessions.truncate(limit);
        more = true;
    }
    let next_cursor = more
        .then(|| {
            sessions
                .last()
                .map(|s| session_cursor(&s.client_id, &s.session))
        })
        .flatten();
    Ok(HttpResponse::Ok().json(SessionPage {
        sessions,
        next_cursor,
        nodes,
        unreachable,
    }))
}

/// This node's sessions of `client_id`, in full.
async fn local_sessions(state: &HubState, client_id: &ClientId) -> Vec<SessionDetail> {
    let node = state.config.node_id.clone();
    let facts = state.sessions().of_client(client_id, Instant::now());
    let mut details = Vec::with_capacity(facts.len());
    for f in facts {
        let connection = match &f.owner {
            Some((_, addr)) => {
                match tokio::time::timeout(INTROSPECT_TIMEOUT, addr.send(Introspect)).await {
                    Ok(Ok(facts)) => facts,
                    _ => None,
                }
            }
            None => None,
        };
        details.push(SessionDetail {
            summary: summary(&f, &node),
            opened_unix_ms: unix_ms(f.opened_at),
            connected_since_unix_ms: f.detached_at.is_none().then(|| unix_ms(f.attached_at)),
            disconnected_since_unix_ms: f.detached_at.map(unix_ms),
            connection,
        });
    }
    details
}

async fn session_route(
    req: HttpRequest,
    state: web::Data<HubState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Refusal> {
    let caller = authorize(&req, &state)?;
    let client_id = ClientId(path.into_inner());
    let local = ClientSessions {
        client_id: client_id.0.clone(),
        sessions: local_sessions(&state, &client_id).await,
        nodes: vec![state.config.node_id.clone()],
        unreachable: Vec::new(),
    };
    let path = format!("/sessions/{}", percent_encode(&client_id.0));
    let (parts, nodes, mut unreachable) = gather(&state, &caller, path, false, local).await;
    let mut sessions = Vec::new();
    for part in parts {
        unreachable.extend(part.unreachable);
        sessions.extend(part.sessions);
    }
    sessions.sort_by(|a, b| a.summary.session.cmp(&b.summary.session));
    if sessions.is_empty() && caller.node_only {
        // A peer's empty part is an answer, not an error.
        return Ok(HttpResponse::Ok().json(ClientSessions {
            client_id: client_id.0,
            sessions,
            nodes,
            unreachable,
        }));
    }
    if sessions.is_empty() && unreachable.is_empty() {
        return Err(not_found(
            "unknown_client",
            format!("no session of client id {:?} on any node", client_id.0),
        ));
    }
    Ok(HttpResponse::Ok().json(ClientSessions {
        client_id: client_id.0,
        sessions,
        nodes,
        unreachable,
    }))
}

#[derive(Debug, Deserialize)]
struct DisconnectQuery {
    mode: Option<String>,
}

async fn disconnect_route(
    req: HttpRequest,
    state: web::Data<HubState>,
    path: web::Path<String>,
    query: web::Query<DisconnectQuery>,
) -> Result<HttpResponse, Refusal> {
    let caller = authorize(&req, &state)?;
    let mode = match query.mode.as_deref() {
        None | Some("close") => DisconnectMode::Close,
        Some("reset") => DisconnectMode::Reset,
        Some(other) => {
            return Err(bad_request(format!(
                "mode {other:?} is neither \"close\" nor \"reset\""
            )))
        }
    };
    let client_id = ClientId(path.into_inner());
    let node = state.config.node_id.clone();
    let facts = state.sessions().of_client(&client_id, Instant::now());
    let mut dropped = Vec::new();
    for f in facts {
        if let Some((_, addr)) = f.owner {
            addr.do_send(AdminDisconnect { mode });
            metrics::counter!(telemetry::HUB_ADMIN_DISCONNECTS, "mode" => mode.as_str())
                .increment(1);
            tracing::info!(client_id = %client_id.0, session = %f.session, mode = mode.as_str(), "admin: disconnecting");
            dropped.push(Dropped {
                session: f.session.0,
                node: node.clone(),
            });
        }
    }
    let local = Disconnected {
        client_id: client_id.0.clone(),
        mode: mode.as_str().to_owned(),
        disconnected: dropped,
        nodes: vec![node],
        unreachable: Vec::new(),
    };
    let path = format!(
        "/sessions/{}/disconnect?mode={}",
        percent_encode(&client_id.0),
        mode.as_str()
    );
    let (parts, nodes, mut unreachable) = gather(&state, &caller, path, true, local).await;
    let mut disconnected = Vec::new();
    for part in parts {
        unreachable.extend(part.unreachable);
        disconnected.extend(part.disconnected);
    }
    let answer = Disconnected {
        client_id: client_id.0.clone(),
        mode: mode.as_str().to_owned(),
        disconnected,
        nodes,
        unreachable,
    };
    if answer.disconnected.is_empty() && answer.unreachable.is_empty() && !caller.node_only {
        return Err(not_found(
            "not_connected",
            format!("client id {:?} has no connection on any node", client_id.0),
        ));
    }
    Ok(HttpResponse::Ok().json(answer))
}

async fn channels_route(
    req: HttpRequest,
    state: web::Data<HubState>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, Refusal> {
    let caller = authorize(&req, &state)?;
    let limit = query.limit()?;
    let after = match query.cursor.as_deref() {
        None => None,
        Some(c) => match parse_channel_cursor(c) {
            Some(name) => Some(name),
            None => return Err(bad_request("the cursor is not one this API gave".into())),
        },
    };
    let node = state.config.node_id.clone();
    let mut page = state.config.handler.admin_channels(after, limit).await;
    for c in &mut page.channels {
        c.nodes = vec![node.clone()];
    }
    let local = ChannelList {
        next_cursor: page
            .more
            .then(|| page.channels.last().map(|c| channel_cursor(&c.name)))
            .flatten(),
        channels: page.channels,
        nodes: vec![node],
        unreachable: Vec::new(),
    };
    let path = format!("/channels{}", query_string(query.cursor.as_deref(), limit));
    let (parts, nodes, mut unreachable) = gather(&state, &caller, path, false, local).await;
    let mut more = parts.iter().any(|p| p.next_cursor.is_some());
    let mut merged: BTreeMap<String, ChannelSummary> = BTreeMap::new();
    for part in parts {
        unreachable.extend(part.unreachable);
        for c in part.channels {
            match merged.get_mut(&c.name) {
                Some(m) => {
                    if c.head > m.head || m.epoch.is_none() {
                        m.epoch = c.epoch.clone().or(m.epoch.take());
                    }
                    m.head = m.head.max(c.head);
                    m.subscribers += c.subscribers;
                    m.nodes.extend(c.nodes);
                    m.nodes.sort();
                }
                None => {
                    merged.insert(c.name.clone(), c);
                }
            }
        }
    }
    let mut channels: Vec<ChannelSummary> = merged.into_values().collect();
    if channels.len() > limit {
        channels.truncate(limit);
        more = true;
    }
    let next_cursor = more
        .then(|| channels.last().map(|c| channel_cursor(&c.name)))
        .flatten();
    Ok(HttpResponse::Ok().json(ChannelList {
        channels,
        next_cursor,
        nodes,
        unreachable,
    }))
}

/// One node's part of `GET /channels/{name}` (`detail: None`: no actor for it here).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChannelPart {
    node: String,
    detail: Option<ChannelDetail>,
    unreachable: Vec<Unreachable>,
}

async fn channel_route(
    req: HttpRequest,
    state: web::Data<HubState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Refusal> {
    let caller = authorize(&req, &state)?;
    let name = path.into_inner();
    let node = state.config.node_id.clone();
    let mut detail = state.config.handler.admin_channel(name.clone()).await;
    if let Some(d) = &mut detail {
        for s in &mut d.subscribers {
            s.node = node.clone();
        }
    }
    let local = ChannelPart {
        node: node.clone(),
        detail,
        unreachable: Vec::new(),
    };
    if caller.node_only {
        return Ok(HttpResponse::Ok().json(local));
    }
    let path = format!("/channels/{}", percent_encode(&name));
    let (parts, nodes, mut unreachable) = gather(&state, &caller, path, false, local).await;
    let mut by_node = BTreeMap::new();
    for part in parts {
        unreachable.extend(part.unreachable);
        if let Some(d) = part.detail {
            by_node.insert(part.node, d);
        }
    }
    if by_node.is_empty() && unreachable.is_empty() {
        return Err(not_found(
            "unknown_channel",
            format!("channel {name:?} has no live actor on any node"),
        ));
    }
    // The store's word where a node had it; the furthest head otherwise.
    let best = by_node
        .values()
        .filter(|d| d.first_retained.is_some())
        .max_by_key(|d| d.head)
        .or_else(|| by_node.values().max_by_key(|d| d.head));
    let (epoch, head, first_retained) = best
        .map(|d| (d.epoch.clone(), d.head, d.first_retained))
        .unwrap_or((None, 0, None));
    let subscribers = by_node
        .values()
        .flat_map(|d| d.subscribers.iter().cloned())
        .collect();
    Ok(HttpResponse::Ok().json(ChannelReport {
        name,
        epoch,
        head,
        first_retained,
        subscribers,
        by_node,
        nodes,
        unreachable,
    }))
}

/// Announces this node to its peers every [`ANNOUNCE_INTERVAL`] until dropped.
/// `announced` turns `true` once an announcement was stored.
pub(crate) fn announce(
    directory: Arc<dyn AdminPeers>,
    node: PeerNode,
    announced: tokio::sync::watch::Sender<bool>,
) -> actix_rt::task::JoinHandle<()> {
    actix_rt::spawn(async move {
        let mut failing = false;
        loop {
            match directory.announce(node.clone(), PEER_TTL).await {
                Ok(()) => {
                    announced.send_replace(true);
                    if std::mem::take(&mut failing) {
                        tracing::info!(node = %node.node_id, "announcing to the admin peers again");
                    }
                }
                Err(error) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(node = %node.node_id, %error, "cannot announce to the admin peers");
                    }
                }
            }
            tokio::time::sleep(ANNOUNCE_INTERVAL).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bounded_and_compared_whole() {
        assert!(AdminToken::new("short").is_err());
        assert!(AdminToken::new(&"x".repeat(MAX_ADMIN_TOKEN_LEN + 1)).is_err());
        assert!(AdminToken::new("with a space in it, long").is_err());
        let token = AdminToken::new("0123456789abcdef").unwrap();
        assert!(token.matches("0123456789abcdef"));
        assert!(!token.matches("0123456789abcdeF"));
        assert!(!token.matches("0123456789abcde"));
        assert!(!token.matches(""));
        assert_eq!(format!("{token:?}"), "AdminToken(..)");
    }

    #[test]
    fn peer_announcements_verify_only_under_the_same_token() {
        let token = AdminToken::new("0123456789abcdef").unwrap();
        let other = AdminToken::new("0123456789abcdeF").unwrap();
        let node = |url: &str, proof: String| PeerNode {
            node_id: "a".into(),
            url: url.into(),
            proof,
        };
        let signed = node(
            "http://10.0.0.1:8080",
            token.sign("a", "http://10.0.0.1:8080"),
        );
        assert!(token.verifies(&signed));
        assert!(!other.verifies(&signed));
        // The same proof for another URL (an attacker's) does not verify.
        assert!(!token.verifies(&node("http://evil.test", signed.proof.clone())));
        assert!(!token.verifies(&node("http://10.0.0.1:8080", String::new())));
        assert!(!token.verifies(&node("http://10.0.0.1:8080", "zz".into())));
    }

    #[test]
    fn cursors_round_trip_any_id_and_refuse_garbage() {
        let c = session_cursor("client/with.dots and ✓", "s-1");
        assert_eq!(
            parse_session_cursor(&c),
            Some((
                ClientId("client/with.dots and ✓".into()),
                SessionId("s-1".into())
            ))
        );
        assert_eq!(
            parse_channel_cursor(&channel_cursor("room/1")),
            Some("room/1".into())
        );
        assert_eq!(parse_session_cursor("zz.00"), None);
        assert_eq!(parse_session_cursor("abc"), None);
        assert_eq!(parse_channel_cursor("0"), None);
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(percent_encode("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(percent_encode("plain-id_1.x~"), "plain-id_1.x~");
    }
}
