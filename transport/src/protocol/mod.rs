//! The wire protocol: typed frames, in v1 (JSON text WebSocket frames) or v2 (binary records,
//! several to a WebSocket frame: [`v2`]).
//!
//! In v1 every frame is one JSON object with a `"type"` tag. The handshake (`hello`, `welcome`)
//! is v1 JSON in both versions; it settles which version the rest of the connection speaks.
//! `PROTOCOL.md` at the repository root is the normative description; this module is its
//! implementation. Decoding never panics: anything that is not a valid frame becomes a typed
//! [`TransportError`].

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCategory, TransportError};

pub mod v2;

/// The protocol version this build speaks by default: 2 (binary records).
pub const PROTOCOL_VERSION: u16 = 2;

/// Every protocol version this build can speak.
pub const SUPPORTED_VERSIONS: &[u16] = &[1, 2];

/// WebSocket close code of a connection whose session another connection resumed (the client
/// id is in use elsewhere): the client must not resume that session again.
pub const CLOSE_SESSION_TAKEN_OVER: u16 = 4001;

/// Longest client id, instance id, producer handle and session id accepted, in bytes: 128.
pub const MAX_ID_LEN: usize = 128;
/// Longest token accepted, in bytes: 4096.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Checks an identifier from the wire: `Err` when it is longer than `max` bytes, or empty
/// or holding control characters where `required` (client ids; instance ids and producers may
/// be empty).
pub fn check_identifier(
    field: &'static str,
    value: &str,
    max: usize,
    required: bool,
) -> Result<(), TransportError> {
    let reason = if value.len() > max {
        Some(format!(
            "{} bytes, more than the {max} allowed",
            value.len()
        ))
    } else if required && value.is_empty() {
        Some("empty".to_owned())
    } else if value.chars().any(char::is_control) {
        Some("contains control characters".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TransportError::InvalidIdentifier { field, reason }),
        None => Ok(()),
    }
}

/// Identifies one client across all of its physical connections (and process restarts, when the
/// application supplies a stable id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientId(pub String);

impl ClientId {
    /// A fresh random client id (UUID v4).
    pub fn random() -> Self {
        ClientId(uuid::Uuid::new_v4().to_string())
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A hub-assigned session: survives physical connections, so a reconnecting client presents it
/// in [`Hello::resume`] to be recognised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub String);

impl SessionId {
    /// A fresh random session id (UUID v4).
    pub fn random() -> Self {
        SessionId(uuid::Uuid::new_v4().to_string())
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client process instance: publish ids are `(client id, instance, channel, seq)`, so a client
/// that restarts with the same stable client id never collides with its previous sequences.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(pub String);

impl InstanceId {
    /// A fresh random instance id (UUID v4).
    pub fn random() -> Self {
        InstanceId(uuid::Uuid::new_v4().to_string())
    }
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message's number within a channel epoch: 1, 2, 3… with no gaps. Offset 0 means "before the
/// first message".
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Offset(pub u64);

impl Offset {
    /// The offset after this one.
    pub fn next(self) -> Offset {
        Offset(self.0.saturating_add(1))
    }
}

impl std::fmt::Display for Offset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifies one incarnation of a channel's log. A hub that loses its memory (restart with an
/// in-memory store) starts a new epoch, so offsets from the old one mean nothing there.
///
/// Shared, not copied: every message and ack of an epoch carries the same reference-counted
/// string, so cloning one costs a reference count, not an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub std::sync::Arc<str>);

impl Epoch {
    /// A fresh random epoch.
    pub fn random() -> Self {
        Epoch(format!("{:016x}", rand::random::<u64>()).into())
    }

    /// The epoch as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A point in a channel's history: an epoch and an offset within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The log incarnation.
    pub epoch: Epoch,
    /// The offset within it.
    pub offset: Offset,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.offset, self.epoch)
    }
}

/// An application payload: a JSON value, carried as its encoded bytes (reference-counted) so
/// that the hub forwards it without parsing it and fans it out without copying it.
///
/// Payloads built here ([`Payload::from_value`], [`Payload::from_json`]) and those of v1
/// frames are JSON text. Those of v2 records are taken as they came
/// ([`Payload::from_unchecked`]): a hub forwards them without looking, a v1 subscriber (whose
/// frames embed the payload as JSON) gets each checked once per message, and a v2 subscriber
/// gets the bytes, which [`Payload::decode`] refuses if they are not what it expects. See
/// `PROTOCOL.md`.
#[derive(Clone)]
pub struct Payload {
    bytes: bytes::Bytes,
    /// The bytes are known to be JSON text.
    checked: bool,
}

impl Payload {
    /// Serialises `value` into a payload.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Self, TransportError> {
        serde_json::to_vec(value)
            .map(|v| Payload {
                bytes: v.into(),
                checked: true,
            })
            .map_err(|e| TransportError::MalformedFrame {
                reason: format!("payload does not serialise: {e}"),
            })
    }

    /// A payload from JSON text, validated.
    pub fn from_json(text: &str) -> Result<Self, TransportError> {
        Self::from_json_bytes(bytes::Bytes::copy_from_slice(text.as_bytes()))
    }

    /// A payload from bytes that must hold JSON text, validated (without copying them).
    pub fn from_json_bytes(bytes: bytes::Bytes) -> Result<Self, TransportError> {
        match is_json(&bytes) {
            Ok(()) => Ok(Payload {
                bytes,
                checked: true,
            }),
            Err(e) => Err(TransportError::MalformedFrame {
                reason: format!("payload is not JSON: {e}"),
            }),
        }
    }

    /// Opaque bytes — protobuf, MessagePack, an image, anything — published as they are: no
    /// JSON check. On protocol v2 they travel as they are, both ways; in a v1 frame (a v1
    /// connection, or a v1 subscriber) they go base64-encoded in `payload_b64` instead of
    /// `payload` (4/3 of their size; bytes that happen to be JSON text go as `payload`), and
    /// come back out as the same bytes. [`Payload::decode`] reads them only if they are JSON;
    /// [`Payload::as_bytes`] always. See PROTOCOL.md §1.
    ///
    /// ```
    /// use tether_transport::protocol::Payload;
    ///
    /// // Counted against a channel's maximum message size as their base64 length (4/3):
    /// // the connection may carry them in a v1 frame.
    /// let p = Payload::from_bytes(vec![0xff, 0x00, 0x80]);
    /// assert_eq!(p.v1_len(), 4);
    /// assert_eq!(p.as_bytes(), &[0xff, 0x00, 0x80]);
    /// assert!(p.checked_json().is_none());
    /// ```
    pub fn from_bytes(bytes: impl Into<bytes::Bytes>) -> Self {
        Self::from_unchecked(bytes.into())
    }

    /// Bytes taken as they are: what a hub forwards from a v2 publisher, or reads back from
    /// its store (the same as [`Payload::from_bytes`]). They are checked (once) only where
    /// they must be JSON: in a v1 frame, which carries them as `payload` when they are JSON
    /// and in `payload_b64` otherwise.
    pub fn from_unchecked(bytes: bytes::Bytes) -> Self {
        Payload {
            bytes,
            checked: false,
        }
    }

    /// The payload as JSON text ready to embed in a v1 frame: `None` when it is unchecked and
    /// turns out not to be JSON.
    pub fn checked_json(&self) -> Option<&str> {
        if self.checked {
            // Checked JSON text is UTF-8.
            utf8(&self.bytes).ok()
        } else {
            json_text(&self.bytes)
        }
    }

    /// The raw JSON text (empty for bytes that are not UTF-8, which only an unchecked payload
    /// can hold: one a misbehaving v2 publisher sent; [`Payload::as_bytes`] has them).
    pub fn json(&self) -> &str {
        utf8(&self.bytes).unwrap_or_default()
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The encoded bytes, shared (a reference-count increment, no copy).
    pub fn bytes(&self) -> bytes::Bytes {
        self.bytes.clone()
    }

    /// Deserialises the payload into `T`.
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.bytes)
    }

    /// Size of the encoded payload in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The most bytes the payload can take in a v1 frame: its length when it is known to be
    /// JSON, the length of its base64 text otherwise (`payload_b64`; bytes that turn out to be
    /// JSON go as they are, shorter). What a client checks against its frame-size bound, since
    /// its connection may speak v1.
    pub fn v1_len(&self) -> usize {
        if self.checked {
            self.bytes.len()
        } else {
            self.bytes.len().div_ceil(3) * 4
        }
    }

    /// The same payload, its bytes copied to the end of `arena` and shared from there: a
    /// reference on the arena's chunk instead of an allocation of its own. What a buffer that
    /// keeps many small payloads a while (a channel's outbox, until they are acknowledged)
    /// uses so that it allocates per chunk rather than per payload, while the caller's buffer
    /// is freed at once. The chunk lives until the last payload in it is dropped.
    ///
    /// ```
    /// use tether_transport::protocol::Payload;
    ///
    /// let mut arena = bytes::BytesMut::with_capacity(4096);
    /// let a = Payload::from_json("[1]").unwrap().copied_into(&mut arena);
    /// let b = Payload::from_json("[2]").unwrap().copied_into(&mut arena);
    /// assert_eq!((a.json(), b.json()), ("[1]", "[2]"));
    /// // Side by side in one chunk.
    /// assert_eq!(b.as_bytes().as_ptr(), a.as_bytes().as_ptr().wrapping_add(3));
    /// ```
    pub fn copied_into(&self, arena: &mut bytes::BytesMut) -> Payload {
        arena.extend_from_slice(&self.bytes);
        Payload {
            bytes: arena.split().freeze(),
            checked: self.checked,
        }
    }

    /// Whether the payload is empty (never, for a valid JSON payload).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A member that is present, whatever its value (`null` included): serde reads a present
/// `null` into `None` otherwise, and `null` is a payload like any other.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de serde_json::value::RawValue>, D::Error> {
    <&serde_json::value::RawValue>::deserialize(deserializer).map(Some)
}

impl Payload {
    /// The payload of a v1 frame: exactly one of `payload` (JSON) and `payload_b64` (opaque
    /// bytes, base64).
    fn of_frame(
        raw: Option<&serde_json::value::RawValue>,
        b64: Option<&str>,
        frame: Option<&bytes::Bytes>,
    ) -> Result<Payload, TransportError> {
        use base64::Engine as _;
        match (raw, b64) {
            (Some(raw), None) => Ok(Payload::of_raw(raw, frame)),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(Payload::from_bytes)
                .map_err(|e| TransportError::MalformedFrame {
                    reason: format!("payload_b64 is not base64: {e}"),
                }),
            (Some(_), Some(_)) => Err(TransportError::MalformedFrame {
                reason: "a frame carries payload or payload_b64, not both".into(),
            }),
            (None, None) => Err(TransportError::MalformedFrame {
                reason: "missing field `payload`".into(),
            }),
        }
    }

    /// A payload decoded from a v1 frame: a slice of the frame's bytes when they are shared.
    fn of_raw(raw: &serde_json::value::RawValue, frame: Option<&bytes::Bytes>) -> Payload {
        let text = raw.get().as_bytes();
        Payload {
            bytes: match frame {
                Some(frame) => frame.slice_ref(text),
                None => bytes::Bytes::copy_from_slice(text),
            },
            checked: true,
        }
    }
}

/// Whether `bytes` are one JSON text, and if not why: serde_json's verdict, reached quickly for
/// the text that passes.
///
/// UTF-8 is checked first and on its own (with the CPU's SIMD): neither serde_json nor jiter
/// validates the contents of a string it skips. Then jiter's validating skip decides for the
/// text it accepts, which is the common case and twice as fast as serde_json's at 1 KiB
/// (`benches/benches/protocol.rs`). jiter is stricter in two places — it refuses nesting deeper
/// than 200 and an escaped lone surrogate (`"\ud800"`), both of which serde_json (and RFC
/// 8259's grammar) let through — and accepts nothing serde_json refuses (a property test below
/// holds it to that), so the text jiter refuses is left to serde_json, whose verdict and error
/// stand. The outcome is exactly serde_json's, as before jiter.
fn is_json(bytes: &[u8]) -> Result<(), String> {
    let text = utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    if skips_as_json(bytes) {
        return Ok(());
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `bytes` as JSON text when they are one JSON text ([`is_json`]'s check, without building an
/// error when they are not: what a v1 encoding of opaque bytes asks every time).
fn json_text(bytes: &[u8]) -> Option<&str> {
    let text = utf8(bytes).ok()?;
    (skips_as_json(bytes) || serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
        .then_some(text)
}

/// `bytes` as text if they are UTF-8: simdutf8's check, with std's error (its position) for
/// the bytes that fail it.
fn utf8(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    match simdutf8::basic::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(_) => std::str::from_utf8(bytes),
    }
}

/// Whether jiter skips `bytes` as one JSON value followed by nothing but whitespace: a `true`
/// means serde_json accepts them too (given UTF-8, which jiter does not check); a `false`
/// decides nothing (see [`is_json`]).
fn skips_as_json(bytes: &[u8]) -> bool {
    let mut jiter = jiter::Jiter::new(bytes);
    jiter.next_skip().is_ok() && jiter.finish().is_ok()
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.bytes) {
            Ok(text) => write!(f, "Payload({text})"),
            Err(_) => write!(f, "Payload({} bytes)", self.bytes.len()),
        }
    }
}

impl Serialize for Payload {
    /// Serialises as the JSON value itself. Not the hot path (frames with payloads are
    /// encoded by hand, see [`Frame::encode`]): this parses the payload once.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.checked_json() {
            Some(text) => serde_json::from_str::<&serde_json::value::RawValue>(text)
                .map_err(serde::ser::Error::custom)?
                .serialize(serializer),
            None => serializer.serialize_unit(),
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
        Ok(Payload {
            bytes: bytes::Bytes::from(String::from(Box::<str>::from(raw))),
            checked: true,
        })
    }
}

/// Machine-readable error codes carried in [`ErrorFrame`]s. Unknown codes from a newer peer
/// decode as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// A network-level failure (only used locally; never sent by a hub).
    Network,
    /// The frame was not valid JSON or not a valid frame.
    MalformedFrame,
    /// The hello asked for a protocol version the hub does not speak.
    UnsupportedVersion,
    /// The frame exceeded the maximum frame size.
    FrameTooLarge,
    /// A valid frame arrived where the protocol does not allow it.
    UnexpectedFrame,
    /// The hub requires a token and the hello carried none.
    AuthRequired,
    /// The token was rejected.
    AuthRejected,
    /// The peer is sending too fast.
    RateLimited,
    /// The hub is shutting down; reconnect (possibly to another node).
    ShuttingDown,
    /// The client may not attach to (or publish on) this channel.
    NotAuthorized,
    /// The channel name is not valid.
    InvalidChannel,
    /// A publish or detach for a channel this connection has not attached.
    NotAttached,
    /// The client did not read fast enough; the hub closed the connection (resume to catch up).
    SlowConsumer,
    /// The hub is over a limit (channels, publishers); try again later.
    Overloaded,
    /// An identifier (client id, instance, producer, token, session) is too long, empty where
    /// required, or holds control characters.
    InvalidIdentifier,
    /// The connection has attached its maximum number of channels; detach one first.
    TooManyChannels,
    /// The hub cannot reach its history store (for example Redis is down). Retryable: the hub
    /// stored nothing of the refused publishes; resend them after reconnecting.
    Unavailable,
    /// The hub failed internally.
    Internal,
    /// A code this build does not know.
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".to_owned());
        f.write_str(&text)
    }
}

/// Client → hub, first frame on every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the client speaks.
    pub v: u16,
    /// The client's stable identity.
    pub client_id: ClientId,
    /// Credential checked by the hub's authenticator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The session of the previous connection, to resume it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<SessionId>,
    /// This client process instance (part of every publish id). Required to publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceId>,
}

/// Hub → client, answer to a valid [`Hello`]: the connection is established.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version the hub will speak on this connection.
    pub v: u16,
    /// The session this connection belongs to (new, or the resumed one).
    pub session: SessionId,
    /// `true` when the session presented in `Hello::resume` was found and continued.
    pub resumed: bool,
    /// How often the hub pings, in milliseconds.
    pub heartbeat_ms: u64,
    /// After how many silent milliseconds the hub closes the connection.
    pub idle_timeout_ms: u64,
}

/// Either direction: something went wrong. When `permanent` is true the sender closes the
/// connection after it and a client must not retry automatically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Category of the error.
    pub category: ErrorCategory,
    /// Whether retrying can help.
    pub permanent: bool,
    /// Human-readable explanation.
    pub message: String,
    /// The channel the error concerns, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The publish sequence number the error concerns, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// With `shutting_down`: when to come back, `[min, max]` in milliseconds from now. A
    /// client draws its reconnect moment uniformly in the window, so the hub (not luck) shapes
    /// the connect rate a restart sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<RetryWindow>,
}

/// When to reconnect after a `shutting_down` error: a moment drawn uniformly between `min_ms`
/// and `max_ms` from now. On the wire: `[min_ms, max_ms]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "[u64; 2]", into = "[u64; 2]")]
pub struct RetryWindow {
    /// Earliest, in milliseconds from receipt.
    pub min_ms: u64,
    /// Latest, in milliseconds from receipt (never below `min_ms`).
    pub max_ms: u64,
}

impl From<[u64; 2]> for RetryWindow {
    fn from([a, b]: [u64; 2]) -> Self {
        RetryWindow {
            min_ms: a.min(b),
            max_ms: a.max(b),
        }
    }
}

impl From<RetryWindow> for [u64; 2] {
    fn from(w: RetryWindow) -> Self {
        [w.min_ms, w.max_ms]
    }
}

impl RetryWindow {
    /// A window from `min` to `max` (swapped if given the other way round).
    pub fn new(min: std::time::Duration, max: std::time::Duration) -> Self {
        RetryWindow::from([min.as_millis() as u64, max.as_millis() as u64])
    }

    /// A moment in the window for `unit` drawn uniformly in `[0, 1)`.
    pub fn pick(&self, unit: f64) -> std::time::Duration {
        let span = (self.max_ms - self.min_ms) as f64;
        std::time::Duration::from_millis(self.min_ms + (span * unit.clamp(0.0, 1.0)) as u64)
    }
}

impl ErrorFrame {
    /// The error frame that reports `err` to the peer.
    pub fn from_error(err: &TransportError) -> Self {
        ErrorFrame {
            code: err.code(),
            category: err.category(),
            permanent: err.is_permanent(),
            message: err.to_string(),
            channel: None,
            seq: None,
            retry_after_ms: None,
        }
    }

    /// The same error, about `channel` (and publish `seq`).
    pub fn about(mut self, channel: &str, seq: Option<u64>) -> Self {
        self.channel = Some(channel.to_owned());
        self.seq = seq;
        self
    }

    /// The local error this frame stands for, with auth rejections mapped to their own variant.
    pub fn into_error(self) -> TransportError {
        const AUTH_REJECTED_PREFIX: &str = "authentication rejected: ";
        match self.code {
            // A hub sends its error's text, which already says what it is: the local error
            // says it once.
            ErrorCode::AuthRejected | ErrorCode::AuthRequired => TransportError::AuthRejected {
                message: match self.message.strip_prefix(AUTH_REJECTED_PREFIX) {
                    Some(rest) => rest.to_owned(),
                    None => self.message,
                },
            },
            _ => TransportError::Remote {
                code: self.code,
                category: self.category,
                permanent: self.permanent,
                message: self.message,
            },
        }
    }
}

/// Client → hub: attach to a channel (subscribe and/or publish), resuming after `resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attach {
    /// Channel name.
    pub channel: String,
    /// Whether to receive the channel's messages (false: publish only).
    #[serde(default = "yes")]
    pub subscribe: bool,
    /// The last position the client delivered; the hub replays what follows. Absent: start at
    /// the live head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Position>,
    /// Identifies the publishing handle within the client instance (random per channel
    /// handle). Publish ids are `(client id, instance, producer, channel, seq)`, so a channel
    /// re-opened on the same transport never collides with its earlier sequence numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer: Option<String>,
}

fn yes() -> bool {
    true
}

/// A gap the hub cannot fill: positions `from..=to` may be missing for this subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// First position that may be missing.
    pub from: Position,
    /// Last position that may be missing (in the new epoch when the epoch changed; offset 0
    /// there means nothing of the new epoch is missing).
    pub to: Position,
}

/// Hub → client: the attach succeeded. For a subscriber, exactly `replay` `message` frames of
/// history follow (offsets `head - replay + 1 ..= head`), then live messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attached {
    /// Channel name.
    pub channel: String,
    /// The channel's current epoch.
    pub epoch: Epoch,
    /// The last offset numbered at attach time.
    pub head: Offset,
    /// Whether the requested resume position was honoured without a gap.
    pub resumed: bool,
    /// How many history messages follow.
    pub replay: u64,
    /// Present when history could not cover the gap since the resume position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<Gap>,
}

/// Client → hub: stop receiving (and publishing on) a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detach {
    /// Channel name.
    pub channel: String,
}

/// Hub → client: the detach is done; no more messages for the channel follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detached {
    /// Channel name.
    pub channel: String,
}

/// Client → hub: publish one message. `(client id, instance, channel, seq)` identifies it; a
/// replay with the same id is acknowledged again but stored and delivered once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publish {
    /// Channel name.
    pub channel: String,
    /// Per-channel, per-instance sequence number, starting at 1, increasing.
    pub seq: u64,
    /// The message.
    pub payload: Payload,
}

/// Hub → client: the publish with `seq` is stored (at `offset`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// Channel name.
    pub channel: String,
    /// The publish's sequence number.
    pub seq: u64,
    /// Where it was stored. Absent for a duplicate whose original offset the hub no longer
    /// remembers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<Offset>,
    /// The epoch `offset` belongs to (absent with `offset`, and from hubs before it was
    /// added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Epoch>,
    /// Whether this publish had already been stored (a replay).
    #[serde(default)]
    pub duplicate: bool,
}

/// Hub → client: one numbered message of a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Channel name.
    pub channel: String,
    /// The channel epoch.
    pub epoch: Epoch,
    /// The message's offset in that epoch.
    pub offset: Offset,
    /// The message.
    pub payload: Payload,
}

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
    /// See [`Attach`].
    Attach(Attach),
    /// See [`Attached`].
    Attached(Attached),
    /// See [`Detach`].
    Detach(Detach),
    /// See [`Detached`].
    Detached(Detached),
    /// See [`Publish`].
    Publish(Publish),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Message`].
    Message(Message),
}

impl Frame {
    /// The frame's `"type"` tag, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Welcome(_) => "welcome",
            Frame::Error(_) => "error",
            Frame::Attach(_) => "attach",
            Frame::Attached(_) => "attached",
            Frame::Detach(_) => "detach",
            Frame::Detached(_) => "detached",
            Frame::Publish(_) => "publish",
            Frame::Ack(_) => "ack",
            Frame::Message(_) => "message",
        }
    }

    /// The channel a channel frame is about (error frames included, when they name one).
    pub fn channel(&self) -> Option<&str> {
        match self {
            Frame::Hello(_) | Frame::Welcome(_) => None,
            Frame::Error(e) => e.channel.as_deref(),
            Frame::Attach(f) => Some(&f.channel),
            Frame::Attached(f) => Some(&f.channel),
            Frame::Detach(f) => Some(&f.channel),
            Frame::Detached(f) => Some(&f.channel),
            Frame::Publish(f) => Some(&f.channel),
            Frame::Ack(f) => Some(&f.channel),
            Frame::Message(f) => Some(&f.channel),
        }
    }

    /// Encodes the frame as the JSON text of one WebSocket text frame.
    ///
    /// Messages and publishes (the frames with payloads) are written by hand around the payload
    /// bytes, which go in as they are; the other frames through serde. A payload that is not
    /// JSON (opaque bytes, [`Payload::from_bytes`]) goes out base64-encoded in `payload_b64`.
    pub fn encode(&self) -> String {
        use std::fmt::Write as _;
        match self {
            Frame::Message(m) => {
                let mut out = String::with_capacity(64 + m.channel.len() + m.payload.len());
                out.push_str(r#"{"type":"message","channel":"#);
                push_json_string(&mut out, &m.channel);
                out.push_str(r#","epoch":"#);
                push_json_string(&mut out, &m.epoch.0);
                out.push_str(r#","offset":"#);
                let _ = write!(out, "{}", m.offset.0);
                push_payload(&mut out, &m.payload);
                out.push('}');
                out
            }
            Frame::Publish(p) => {
                let mut out = String::with_capacity(48 + p.channel.len() + p.payload.len());
                out.push_str(r#"{"type":"publish","channel":"#);
                push_json_string(&mut out, &p.channel);
                out.push_str(r#","seq":"#);
                let _ = write!(out, "{}", p.seq);
                push_payload(&mut out, &p.payload);
                out.push('}');
                out
            }
            // Serialising these types cannot fail: string keys only, no payloads.
            other => serde_json::to_string(other).expect("frames always serialise"),
        }
    }

    /// Decodes one WebSocket text frame, checking the size limit and the protocol version.
    ///
    /// Errors are typed: [`TransportError::FrameTooLarge`], [`TransportError::MalformedFrame`]
    /// (bad JSON, missing fields, unknown `type`) and [`TransportError::UnsupportedVersion`]
    /// (a hello or welcome with a version this build does not speak).
    ///
    /// The `type` tag is read first and the body is then decoded straight into its struct, so
    /// payloads stay raw JSON text (no intermediate tree).
    pub fn decode(text: &str, max_size: usize) -> Result<Frame, TransportError> {
        Self::decode_in(text, None, max_size)
    }

    /// [`Frame::decode`] of a received text frame's bytes: a payload is a slice of `frame`
    /// (no copy). Errors as there, plus [`TransportError::MalformedFrame`] for text that is not
    /// UTF-8.
    pub fn decode_shared(frame: &bytes::Bytes, max_size: usize) -> Result<Frame, TransportError> {
        if frame.len() > max_size {
            return Err(TransportError::FrameTooLarge {
                size: frame.len(),
                max: max_size,
            });
        }
        let text = std::str::from_utf8(frame).map_err(|e| TransportError::MalformedFrame {
            reason: format!("text frame is not UTF-8: {e}"),
        })?;
        Self::decode_in(text, Some(frame), max_size)
    }

    /// [`Frame::decode_shared`] for a caller that has already checked the frame is UTF-8:
    /// `text` must be `frame` as text (payloads are slices of `frame`).
    pub fn decode_checked(
        text: &str,
        frame: &bytes::Bytes,
        max_size: usize,
    ) -> Result<Frame, TransportError> {
        debug_assert_eq!(text.as_ptr(), frame.as_ptr());
        Self::decode_in(text, Some(frame), max_size)
    }

    fn decode_in(
        text: &str,
        shared: Option<&bytes::Bytes>,
        max_size: usize,
    ) -> Result<Frame, TransportError> {
        if text.len() > max_size {
            return Err(TransportError::FrameTooLarge {
                size: text.len(),
                max: max_size,
            });
        }
        #[derive(Deserialize)]
        struct Tag<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        // Frames written by Tether (and most encoders) start with the tag: read it without
        // scanning the whole frame twice. Anything else goes through a full parse of the tag.
        let fast = text
            .strip_prefix(r#"{"type":""#)
            .and_then(|rest| rest.split_once('"'))
            .map(|(kind, _)| kind)
            .filter(|kind| !kind.contains('\\'));
        let tag: Tag<'_> = match fast {
            Some(kind) => Tag {
                kind: std::borrow::Cow::Borrowed(kind),
            },
            None => serde_json::from_str(text).map_err(|e| diagnose(text, e))?,
        };
        fn body<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, TransportError> {
            serde_json::from_str(text).map_err(|e| diagnose(text, e))
        }
        let frame = match tag.kind.as_ref() {
            "hello" => Frame::Hello(body(text)?),
            "welcome" => Frame::Welcome(body(text)?),
            "error" => Frame::Error(body(text)?),
            "attach" => Frame::Attach(body(text)?),
            "attached" => Frame::Attached(body(text)?),
            "detach" => Frame::Detach(body(text)?),
            "detached" => Frame::Detached(body(text)?),
            "publish" => {
                #[derive(Deserialize)]
                struct In<'a> {
                    channel: String,
                    seq: u64,
                    #[serde(borrow, default, deserialize_with = "present")]
                    payload: Option<&'a serde_json::value::RawValue>,
                    #[serde(borrow, default)]
                    payload_b64: Option<std::borrow::Cow<'a, str>>,
                }
                let f: In<'_> = body(text)?;
                Frame::Publish(Publish {
                    channel: f.channel,
                    seq: f.seq,
                    payload: Payload::of_frame(f.payload, f.payload_b64.as_deref(), shared)?,
                })
            }
            "ack" => Frame::Ack(body(text)?),
            "message" => {
                #[derive(Deserialize)]
                struct In<'a> {
                    channel: String,
                    epoch: Epoch,
                    offset: Offset,
                    #[serde(borrow, default, deserialize_with = "present")]
                    payload: Option<&'a serde_json::value::RawValue>,
                    #[serde(borrow, default)]
                    payload_b64: Option<std::borrow::Cow<'a, str>>,
                }
                let f: In<'_> = body(text)?;
                Frame::Message(Message {
                    channel: f.channel,
                    epoch: f.epoch,
                    offset: f.offset,
                    payload: Payload::of_frame(f.payload, f.payload_b64.as_deref(), shared)?,
                })
            }
            other => {
                return Err(TransportError::MalformedFrame {
                    reason: format!("unknown frame type {other:?}"),
                })
            }
        };
        let version = match &frame {
            Frame::Hello(h) => Some(h.v),
            Frame::Welcome(w) => Some(w.v),
            _ => None,
        };
        match version {
            Some(v) if !SUPPORTED_VERSIONS.contains(&v) => {
                Err(TransportError::UnsupportedVersion {
                    got: v,
                    supported: SUPPORTED_VERSIONS.to_vec(),
                })
            }
            _ => Ok(frame),
        }
    }
}

/// Appends `s` as a JSON string.
fn push_json_string(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("strings always serialise"));
    }
}

/// Appends `,"payload":…` with the payload's JSON as it is, or `,"payload_b64":"…"` with
/// opaque bytes base64-encoded.
fn push_payload(out: &mut String, payload: &Payload) {
    match payload.checked_json() {
        Some(json) => {
            out.push_str(r#","payload":"#);
            out.push_str(json);
        }
        None => {
            use base64::Engine as _;
            out.push_str(r#","payload_b64":""#);
            base64::engine::general_purpose::STANDARD.encode_string(payload.as_bytes(), out);
            out.push('"');
        }
    }
}

/// Largest close-reason text a WebSocket close frame can carry (125-byte control frame payload
/// minus the 2-byte code).
pub const MAX_CLOSE_REASON: usize = 123;

/// Cuts `reason` to at most [`MAX_CLOSE_REASON`] bytes on a character boundary, so that a close
/// frame is always valid (peers reject longer ones as a protocol error).
pub fn close_reason_text(reason: &str) -> String {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason.to_owned();
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// Turns a serde failure into the most useful typed error. Only runs on the error path, so the
/// second parse costs nothing in the common case.
fn diagnose(text: &str, err: serde_json::Error) -> TransportError {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(rename = "type")]
        kind: Option<String>,
        v: Option<serde_json::Value>,
    }
    match serde_json::from_str::<Envelope>(text) {
        Ok(Envelope { kind: None, .. }) => TransportError::MalformedFrame {
            reason: "missing \"type\"".to_owned(),
        },
        // A hello from a future client may not even have our fields: report the version first,
        // since that is the actionable error.
        Ok(Envelope {
            kind: Some(kind),
            v: Some(v),
        }) if kind == "hello" || kind == "welcome" => match v.as_u64() {
            Some(v) if !SUPPORTED_VERSIONS.contains(&(v as u16)) || v > u16::MAX as u64 => {
                TransportError::UnsupportedVersion {
                    got: v.min(u16::MAX as u64) as u16,
                    supported: SUPPORTED_VERSIONS.to_vec(),
                }
            }
            _ => TransportError::MalformedFrame {
                reason: format!("invalid {kind} frame: {err}"),
            },
        },
        Ok(Envelope {
            kind: Some(kind), ..
        }) => TransportError::MalformedFrame {
            reason: format!("invalid or unknown frame type {kind:?}: {err}"),
        },
        Err(_) => TransportError::MalformedFrame {
            reason: format!("not a JSON object: {err}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    #[test]
    fn identifiers_are_bounded_and_typed() {
        assert!(check_identifier("client_id", "ada", MAX_ID_LEN, true).is_ok());
        assert!(check_identifier("instance", "", MAX_ID_LEN, false).is_ok());
        for (value, required) in [
            ("x".repeat(MAX_ID_LEN + 1), false),
            (String::new(), true),
            ("a\u{0}b".to_owned(), false),
        ] {
            let err = check_identifier("client_id", &value, MAX_ID_LEN, required).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidIdentifier);
            assert!(err.is_permanent());
        }
        assert!(check_identifier("x", &"x".repeat(MAX_ID_LEN), MAX_ID_LEN, true).is_ok());
    }

    fn hello() -> Frame {
        Frame::Hello(Hello {
            v: 1,
            client_id: ClientId("c-1".into()),
            token: Some("secret".into()),
            resume: Some(SessionId("s-1".into())),
            instance: None,
        })
    }

    fn payload(json: &str) -> Payload {
        Payload::from_json(json).unwrap()
    }

    fn position(offset: u64) -> Position {
        Position {
            epoch: Epoch("e1".into()),
            offset: Offset(offset),
        }
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            hello(),
            Frame::Welcome(Welcome {
                v: 1,
                session: SessionId("s-1".into()),
                resumed: true,
                heartbeat_ms: 10_000,
                idle_timeout_ms: 25_000,
            }),
            Frame::Error(ErrorFrame {
                code: ErrorCode::AuthRejected,
                category: ErrorCategory::Auth,
                permanent: true,
                message: "no".into(),
                channel: Some("room".into()),
                seq: Some(3),
                retry_after_ms: Some(RetryWindow {
                    min_ms: 500,
                    max_ms: 5000,
                }),
            }),
            Frame::Attach(Attach {
                channel: "room".into(),
                subscribe: false,
                resume: Some(position(7)),
                producer: Some("p-1".into()),
            }),
            Frame::Attached(Attached {
                channel: "room".into(),
                epoch: Epoch("e2".into()),
                head: Offset(40),
                resumed: false,
                replay: 10,
                gap: Some(Gap {
                    from: position(8),
                    to: Position {
                        epoch: Epoch("e2".into()),
                        offset: Offset(30),
                    },
                }),
            }),
            Frame::Detach(Detach {
                channel: "room".into(),
            }),
            Frame::Detached(Detached {
                channel: "room".into(),
            }),
            Frame::Publish(Publish {
                channel: "room".into(),
                seq: 9,
                payload: payload(r#"{"text":"hi","n":[1,2]}"#),
            }),
            Frame::Ack(Ack {
                channel: "room".into(),
                seq: 9,
                offset: Some(Offset(41)),
                epoch: Some(Epoch("e2".into())),
                duplicate: true,
            }),
            Frame::Message(Message {
                channel: "room".into(),
                epoch: Epoch("e2".into()),
                offset: Offset(41),
                payload: payload(r#""just a string""#),
            }),
        ];
        for frame in frames {
            let text = frame.encode();
            assert_eq!(Frame::decode(&text, MAX).unwrap(), frame, "{text}");
        }
    }

    #[test]
    fn payloads_pass_through_byte_for_byte() {
        let raw = r#"{ "spaced" : [1, 2.50, "x"] }"#;
        let frame = Frame::Publish(Publish {
            channel: "c".into(),
            seq: 1,
            payload: payload(raw),
        });
        let text = frame.encode();
        assert!(text.contains(raw), "{text}");
        match Frame::decode(&text, MAX).unwrap() {
            Frame::Publish(p) => assert_eq!(p.payload.json(), raw),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_tag_may_stand_anywhere_in_the_object() {
        let frame = Frame::decode(r#"{"v":1,"client_id":"c","type":"hello"}"#, MAX).unwrap();
        assert_eq!(frame.kind(), "hello");
        let frame = Frame::decode(r#" {"type" : "detach", "channel":"x"}"#, MAX).unwrap();
        assert_eq!(frame.kind(), "detach");
    }

    #[test]
    fn attach_defaults_to_subscribing_from_the_head() {
        match Frame::decode(r#"{"type":"attach","channel":"c"}"#, MAX).unwrap() {
            Frame::Attach(a) => {
                assert!(a.subscribe);
                assert_eq!(a.resume, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hello_wire_shape_is_stable() {
        assert_eq!(
            hello().encode(),
            r#"{"type":"hello","v":1,"client_id":"c-1","token":"secret","resume":"s-1"}"#
        );
    }

    #[test]
    fn unknown_version_is_a_typed_error() {
        let err = Frame::decode(r#"{"type":"hello","v":7,"client_id":"c"}"#, MAX).unwrap_err();
        assert_eq!(
            err,
            TransportError::UnsupportedVersion {
                got: 7,
                supported: vec![1, 2]
            }
        );
        // Even when the rest of the frame is not what v1 expects.
        let err = Frame::decode(r#"{"type":"hello","v":3,"who":"future"}"#, MAX).unwrap_err();
        assert!(matches!(
            err,
            TransportError::UnsupportedVersion { got: 3, .. }
        ));
    }

    #[test]
    fn v1_payloads_are_slices_of_the_received_frame() {
        let text = bytes::Bytes::from_static(
            br#"{"type":"message","channel":"room","epoch":"e1","offset":3,"payload":{"a":[1,2]}}"#,
        );
        let Frame::Message(m) = Frame::decode_shared(&text, MAX).unwrap() else {
            panic!("a message")
        };
        assert_eq!(m.payload.json(), r#"{"a":[1,2]}"#);
        assert!(text.as_ptr_range().contains(&m.payload.as_bytes().as_ptr()));
        // And it encodes back to the same text.
        assert_eq!(Frame::Message(m).encode().as_bytes(), &text[..]);
    }

    #[test]
    fn opaque_payloads_cross_v1_frames_as_base64_and_come_back_the_same_bytes() {
        let bytes: &[u8] = b"{not json\xff\x00\x80";
        for frame in [
            Frame::Message(Message {
                channel: "r\"q".into(),
                epoch: Epoch("e".into()),
                offset: Offset(1),
                payload: Payload::from_bytes(bytes.to_vec()),
            }),
            Frame::Publish(Publish {
                channel: "r\"q".into(),
                seq: 3,
                payload: Payload::from_bytes(bytes.to_vec()),
            }),
        ] {
            let text = frame.encode();
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(value.get("payload").is_none(), "{text}");
            assert_eq!(value["payload_b64"], "e25vdCBqc29u/wCA");
            assert_eq!(value["channel"], "r\"q");
            let back = Frame::decode(&text, 1 << 20).unwrap();
            let payload = match &back {
                Frame::Message(m) => &m.payload,
                Frame::Publish(p) => &p.payload,
                other => panic!("{other:?}"),
            };
            assert_eq!(payload.as_bytes(), bytes);
            assert!(payload.checked_json().is_none());
        }
        // Opaque bytes that happen to be JSON go as JSON.
        let ok = Payload::from_bytes(&b"[1]"[..]);
        assert_eq!(ok.checked_json(), Some("[1]"));
        let text = Frame::Publish(Publish {
            channel: "c".into(),
            seq: 1,
            payload: ok,
        })
        .encode();
        assert_eq!(
            text,
            r#"{"type":"publish","channel":"c","seq":1,"payload":[1]}"#
        );
    }

    #[test]
    fn invalid_utf8_inside_a_json_string_is_not_json() {
        // serde_json skips an ignored string's bytes unvalidated; the check must not.
        let bad: &[u8] = b"{\"p\":\"\xff\xfe\"}";
        let err = Payload::from_json_bytes(bytes::Bytes::from_static(bad)).unwrap_err();
        assert!(
            matches!(&err, TransportError::MalformedFrame { reason } if reason.contains("UTF-8")),
            "{err:?}"
        );
        // Such bytes from a v2 publisher reach a v1 subscriber base64-encoded, never as text.
        let unchecked = Payload::from_bytes(bad.to_vec());
        assert!(unchecked.checked_json().is_none());
        let text = Frame::Publish(Publish {
            channel: "c".into(),
            seq: 1,
            payload: unchecked,
        })
        .encode();
        assert!(text.contains(r#""payload_b64":"#), "{text}");
        // Valid multi-byte UTF-8 is JSON as before.
        let ok = Payload::from_json_bytes(bytes::Bytes::from("{\"p\":\"é✓\"}")).unwrap();
        assert_eq!(ok.json(), "{\"p\":\"é✓\"}");
    }

    /// serde_json's verdict on its own: what [`is_json`] must give.
    fn serde_json_verdict(bytes: &[u8]) -> bool {
        std::str::from_utf8(bytes)
            .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
    }

    #[test]
    fn what_only_serde_json_accepts_is_still_json() {
        // jiter refuses these (too deep; a lone surrogate); serde_json's verdict stands.
        let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        for text in [deep.as_str(), r#""\ud800""#, r#"{"p":"\udc00x"}"#] {
            assert!(!skips_as_json(text.as_bytes()), "{text}");
            assert!(Payload::from_json(text).is_ok(), "{text}");
            assert_eq!(
                Payload::from_bytes(text.to_owned()).checked_json(),
                Some(text)
            );
        }
        // The common case is jiter's to accept; a refusal is serde_json's, with its reason.
        assert!(skips_as_json(br#"{"t":1,"p":"xyz","q":[1.5e3,null,true]}"#));
        for (text, reason) in [
            ("[1,]", "expected value"),
            ("{\"a\":1}x", "trailing characters"),
            ("\"a\u{1}\"", "control character"),
            ("NaN", "expected value"),
        ] {
            let err = Payload::from_json(text).unwrap_err();
            assert!(
                matches!(&err, TransportError::MalformedFrame { reason: r } if r.contains(reason)),
                "{text}: {err:?}"
            );
        }
    }

    /// JSON texts and near misses: each seed edited a few times, and deep nesting.
    fn json_like() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        const SEEDS: &[&str] = &[
            r#"{"t":1700000000123456,"p":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
            r#"[1,2.5e10,-0,true,false,null,"a\"b\\c\u00e9\n\/"]"#,
            r#"{"a":{"b":[{},[],""]}}"#,
            r#""\ud83d\ude00""#,
            r#""\ud800""#,
            "-12.34E+5",
            "  [ ]  ",
            r#"{"k":"é✓"}"#,
            "123456789012345678901234567890",
            "1e400",
            "0.0000001",
            "NaN",
            "-Infinity",
            "01",
            "1.",
            "\u{feff}{}",
            "[\u{c}]",
        ];
        const ALPHABET: &[u8] =
            b"{}[]\",:\\ u0123456789abcdefABCDEF.eE+-ntrflsINy\x00\x01\x1f\x7f\n\t\r\x0c/";
        let byte = prop_oneof![proptest::sample::select(ALPHABET), any::<u8>()];
        let edit = (0usize..3, any::<proptest::sample::Index>(), byte);
        let edited = (
            proptest::sample::select(SEEDS),
            proptest::collection::vec(edit, 0..5),
        )
            .prop_map(|(seed, edits)| {
                let mut bytes = seed.as_bytes().to_vec();
                for (op, at, b) in edits {
                    let i = at.index(bytes.len() + 1);
                    match op {
                        0 if i < bytes.len() => {
                            bytes.remove(i);
                        }
                        1 if i < bytes.len() => bytes[i] = b,
                        _ => bytes.insert(i, b),
                    }
                }
                bytes
            });
        let nested = (150usize..260, 150usize..260)
            .prop_map(|(open, close)| format!("{}{}", "[".repeat(open), "]".repeat(close)).into());
        prop_oneof![9 => edited, 1 => nested]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]

        /// jiter's skip accepts nothing that serde_json refuses, so the check's verdict is
        /// serde_json's exactly.
        #[test]
        fn the_json_check_is_serde_jsons(bytes in json_like()) {
            let expected = serde_json_verdict(&bytes);
            if std::str::from_utf8(&bytes).is_ok() && skips_as_json(&bytes) {
                proptest::prop_assert!(expected, "jiter took what serde_json refuses: {:?}",
                    String::from_utf8_lossy(&bytes));
            }
            proptest::prop_assert_eq!(is_json(&bytes).is_ok(), expected);
            proptest::prop_assert_eq!(json_text(&bytes).is_some(), expected);
        }
    }

    #[test]
    fn a_v1_frame_needs_exactly_one_well_formed_payload() {
        let decode = |t: &str| Frame::decode(t, 1 << 20);
        // A null payload is a payload.
        match decode(r#"{"type":"publish","channel":"c","seq":1,"payload":null}"#) {
            Ok(Frame::Publish(p)) => assert_eq!(p.payload.json(), "null"),
            other => panic!("{other:?}"),
        }
        for bad in [
            r#"{"type":"publish","channel":"c","seq":1}"#,
            r#"{"type":"publish","channel":"c","seq":1,"payload":1,"payload_b64":"AA=="}"#,
            r#"{"type":"publish","channel":"c","seq":1,"payload_b64":"not base64!"}"#,
            r#"{"type":"message","channel":"c","epoch":"e","offset":1,"payload_b64":7}"#,
        ] {
            assert!(
                matches!(decode(bad), Err(TransportError::MalformedFrame { .. })),
                "{bad}: {:?}",
                decode(bad)
            );
        }
    }

    #[test]
    fn malformed_input_never_panics() {
        let inputs = [
            "",
            "null",
            "[]",
            "{",
            r#"{"v":1}"#,
            r#"{"type":"bogus"}"#,
            r#"{"type":"hello"}"#,
            r#"{"type":"hello","v":"one","client_id":"c"}"#,
            r#"{"type":"hello","v":99999999999,"client_id":"c"}"#,
            "\u{0}\u{1}garbage",
        ];
        for input in inputs {
            let err = Frame::decode(input, MAX).unwrap_err();
            assert!(
                matches!(
                    err,
                    TransportError::MalformedFrame { .. }
                        | TransportError::UnsupportedVersion { .. }
                ),
                "{input:?} gave {err:?}"
            );
            assert_eq!(err.category(), ErrorCategory::Protocol);
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_parsing() {
        let text = hello().encode();
        let err = Frame::decode(&text, 10).unwrap_err();
        assert_eq!(
            err,
            TransportError::FrameTooLarge {
                size: text.len(),
                max: 10
            }
        );
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        assert_eq!(close_reason_text("short"), "short");
        let long = "é".repeat(100);
        let cut = close_reason_text(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON);
        assert!(long.starts_with(&cut));
    }

    #[test]
    fn unknown_error_codes_from_newer_peers_still_decode() {
        let text = r#"{"type":"error","code":"brand_new","category":"service","permanent":false,"message":"x"}"#;
        match Frame::decode(text, MAX).unwrap() {
            Frame::Error(e) => assert_eq!(e.code, ErrorCode::Unknown),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn auth_error_frames_map_to_permanent_auth_errors() {
        let err = ErrorFrame::from_error(&TransportError::AuthRejected {
            message: "bad token".into(),
        })
        .into_error();
        assert!(matches!(err, TransportError::AuthRejected { .. }));
        assert!(err.is_permanent());
        assert_eq!(err.to_string(), "authentication rejected: bad token");
    }
}
