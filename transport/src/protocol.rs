//! Wire protocol v1: typed frames, encoded as JSON text WebSocket frames.
//!
//! Every frame is one JSON object with a `"type"` tag. `PROTOCOL.md` at the repository root is
//! the normative description; this module is its implementation. Decoding never panics: anything
//! that is not a valid frame becomes a typed [`TransportError`].

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCategory, TransportError};

/// The protocol version this build speaks by default.
pub const PROTOCOL_VERSION: u16 = 1;

/// Every protocol version this build can speak.
pub const SUPPORTED_VERSIONS: &[u16] = &[1];

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
}

impl ErrorFrame {
    /// The error frame that reports `err` to the peer.
    pub fn from_error(err: &TransportError) -> Self {
        ErrorFrame {
            code: err.code(),
            category: err.category(),
            permanent: err.is_permanent(),
            message: err.to_string(),
        }
    }

    /// The local error this frame stands for, with auth rejections mapped to their own variant.
    pub fn into_error(self) -> TransportError {
        match self.code {
            ErrorCode::AuthRejected | ErrorCode::AuthRequired => TransportError::AuthRejected {
                message: self.message,
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

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
}

impl Frame {
    /// The frame's `"type"` tag, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Welcome(_) => "welcome",
            Frame::Error(_) => "error",
        }
    }

    /// Encodes the frame as the JSON text of one WebSocket text frame.
    pub fn encode(&self) -> String {
        // Serialising these types cannot fail: no maps with non-string keys, no foreign
        // `Serialize` impls that can error.
        serde_json::to_string(self).expect("frames always serialise")
    }

    /// Decodes one WebSocket text frame, checking the size limit and the protocol version.
    ///
    /// Errors are typed: [`TransportError::FrameTooLarge`], [`TransportError::MalformedFrame`]
    /// (bad JSON, missing fields, unknown `type`) and [`TransportError::UnsupportedVersion`]
    /// (a hello or welcome with a version this build does not speak).
    pub fn decode(text: &str, max_size: usize) -> Result<Frame, TransportError> {
        if text.len() > max_size {
            return Err(TransportError::FrameTooLarge {
                size: text.len(),
                max: max_size,
            });
        }
        let frame: Frame = serde_json::from_str(text).map_err(|e| diagnose(text, e))?;
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

    fn hello() -> Frame {
        Frame::Hello(Hello {
            v: 1,
            client_id: ClientId("c-1".into()),
            token: Some("secret".into()),
            resume: Some(SessionId("s-1".into())),
        })
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
            }),
        ];
        for frame in frames {
            let text = frame.encode();
            assert_eq!(Frame::decode(&text, MAX).unwrap(), frame, "{text}");
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
                supported: vec![1]
            }
        );
        // Even when the rest of the frame is not what v1 expects.
        let err = Frame::decode(r#"{"type":"hello","v":2,"who":"future"}"#, MAX).unwrap_err();
        assert!(matches!(
            err,
            TransportError::UnsupportedVersion { got: 2, .. }
        ));
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
    }
}
