//! The crate's one error type, [`TransportError`], and the categories it sorts into.
//!
//! Every variant answers two questions so that callers (and the
//! [`ReconnectManager`](crate::reconnect::ReconnectManager)) decide from the type, never from a
//! string: [`TransportError::category`] and [`TransportError::is_permanent`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::ErrorCode;

/// What part of the system an error comes from. Carried on the wire in error frames too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCategory {
    /// The network: refused connects, resets, timeouts, silent connections.
    Network,
    /// The wire protocol: malformed frames, unknown versions, unexpected frames.
    Protocol,
    /// Authentication: missing or rejected tokens; a hub certificate the client does not trust
    /// (the hub failed to prove who it is).
    Auth,
    /// Channel subscriptions: not authorized, unknown channel, bad resume point.
    Subscription,
    /// The service itself: overload, shutdown, internal errors, local configuration or lifecycle.
    Service,
}

impl ErrorCategory {
    /// The lower-case name used on the wire and as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCategory::Network => "network",
            ErrorCategory::Protocol => "protocol",
            ErrorCategory::Auth => "auth",
            ErrorCategory::Subscription => "subscription",
            ErrorCategory::Service => "service",
        }
    }
}

impl std::fmt::Display for ErrorCategory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong in `tether-transport`, on either end.
///
/// `Clone` so that the same error can travel in a
/// [`ConnectionStateChanged`](crate::state::ConnectionStateChanged) to every subscriber.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The TCP connect or the WebSocket upgrade failed. Retryable.
    #[error("could not connect to {endpoint}: {message}")]
    Connect {
        /// The endpoint URL that was tried.
        endpoint: String,
        /// What the network stack or the HTTP upgrade said.
        message: String,
    },
    /// The connect, upgrade and welcome did not complete within the handshake timeout. Retryable.
    #[error("handshake with {endpoint} did not complete within {after:?}")]
    HandshakeTimeout {
        /// The endpoint URL that was tried.
        endpoint: String,
        /// The configured handshake timeout.
        after: Duration,
    },
    /// Nothing arrived on an established connection for longer than the idle timeout
    /// (half-open connection, dead peer). Retryable.
    #[error("connection silent for {silent_for:?} (idle timeout)")]
    HeartbeatTimeout {
        /// How long the connection had been silent when it was given up.
        silent_for: Duration,
    },
    /// The client refused the hub's TLS certificate: not issued by a trusted root, not valid for
    /// the endpoint's host name, expired or not yet valid, revoked, malformed, or none presented.
    /// Permanent (the connection goes `Failed`): the same certificate is refused on every
    /// attempt until the hub's certificate changes (then a manual reconnect tries again) or the
    /// client is configured to trust it (`tls_ca_file`, `TETHER_TLS_CA_FILE`, … in a new
    /// configuration).
    #[error("TLS certificate of {endpoint} refused: {reason}")]
    TlsCertificate {
        /// The endpoint URL that was tried.
        endpoint: String,
        /// What the certificate verifier said.
        reason: String,
    },
    /// The TLS handshake failed for another reason than the certificate: the peer does not
    /// speak TLS on that port, sent an alert, or has no protocol version or cipher suite in
    /// common. Retryable (the circuit breaker stops a loop).
    #[error("TLS handshake with {endpoint} failed: {reason}")]
    TlsHandshake {
        /// The endpoint URL that was tried.
        endpoint: String,
        /// What rustls said.
        reason: String,
    },
    /// The peer closed the connection or the socket failed. Retryable.
    #[error("connection closed: {reason} (code {code:?})")]
    ConnectionClosed {
        /// The WebSocket close code, when the peer sent one.
        code: Option<u16>,
        /// The close reason or the socket error.
        reason: String,
    },
    /// The hub rejected the client's credentials. Permanent: retrying cannot help.
    #[error("authentication rejected: {message}")]
    AuthRejected {
        /// The hub's explanation.
        message: String,
    },
    /// The peer speaks a protocol version this build does not. Permanent.
    #[error("unsupported protocol version {got} (supported: {supported:?})")]
    UnsupportedVersion {
        /// The version the peer asked for.
        got: u16,
        /// The versions this build speaks.
        supported: Vec<u16>,
    },
    /// A frame could not be decoded. The connection is closed; retryable on the client (a fresh
    /// connection may fare better, and the circuit breaker stops a loop).
    #[error("malformed frame: {reason}")]
    MalformedFrame {
        /// What was wrong with it.
        reason: String,
    },
    /// A frame exceeded the configured maximum size. The connection is closed.
    #[error("frame of {size} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Size of the offending frame (or a lower bound, when the codec stopped reading).
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// An identifier in a frame (client id, instance, producer, token, session) breaks the
    /// protocol's limits. Permanent: the same identifier is refused again.
    #[error("invalid {field}: {reason}")]
    InvalidIdentifier {
        /// Which identifier.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A well-formed frame arrived where the protocol does not allow it (e.g. a publish before
    /// the handshake).
    #[error("unexpected frame: expected {expected}, got {got}")]
    UnexpectedFrame {
        /// What the protocol allowed at this point.
        expected: &'static str,
        /// The frame type that arrived.
        got: String,
    },
    /// The peer sent an error frame. Category and permanence come from the frame.
    #[error("{category} error from peer ({code}): {message}")]
    Remote {
        /// The machine-readable code.
        code: ErrorCode,
        /// The category the peer gave.
        category: ErrorCategory,
        /// Whether the peer says retrying cannot help.
        permanent: bool,
        /// The peer's explanation.
        message: String,
    },
    /// A configuration value is invalid. Permanent.
    #[error("invalid configuration: {field}: {reason}")]
    InvalidConfig {
        /// The setting (builder method or environment variable) at fault.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A manual reconnect was asked for too soon after the previous one. Retryable after
    /// `retry_after`.
    #[error("manual reconnect rate-limited; allowed again in {retry_after:?}")]
    RateLimited {
        /// How long until a manual reconnect is accepted again.
        retry_after: Duration,
    },
    /// The transport was closed by the application; nothing more can be sent through it.
    #[error("transport closed")]
    Closed,
    /// A channel of this name is already registered on the transport.
    #[error("channel {channel:?} is already open on this transport")]
    ChannelInUse {
        /// The channel name.
        channel: String,
    },
    /// The hub could not start (bind failed, metrics recorder could not be installed…).
    #[error("hub could not start: {message}")]
    HubStart {
        /// What failed.
        message: String,
    },
}

impl TransportError {
    /// The category this error belongs to.
    pub fn category(&self) -> ErrorCategory {
        match self {
            TransportError::Connect { .. }
            | TransportError::HandshakeTimeout { .. }
            | TransportError::HeartbeatTimeout { .. }
            | TransportError::TlsHandshake { .. }
            | TransportError::ConnectionClosed { .. } => ErrorCategory::Network,
            TransportError::AuthRejected { .. } | TransportError::TlsCertificate { .. } => {
                ErrorCategory::Auth
            }
            TransportError::UnsupportedVersion { .. }
            | TransportError::MalformedFrame { .. }
            | TransportError::FrameTooLarge { .. }
            | TransportError::InvalidIdentifier { .. }
            | TransportError::UnexpectedFrame { .. } => ErrorCategory::Protocol,
            TransportError::Remote { category, .. } => *category,
            TransportError::InvalidConfig { .. }
            | TransportError::RateLimited { .. }
            | TransportError::Closed
            | TransportError::HubStart { .. } => ErrorCategory::Service,
            TransportError::ChannelInUse { .. } => ErrorCategory::Subscription,
        }
    }

    /// `true` when retrying the same operation cannot succeed: the reconnect loop stops and the
    /// connection goes `Failed`.
    pub fn is_permanent(&self) -> bool {
        match self {
            TransportError::Connect { .. }
            | TransportError::HandshakeTimeout { .. }
            | TransportError::HeartbeatTimeout { .. }
            | TransportError::TlsHandshake { .. }
            | TransportError::ConnectionClosed { .. }
            | TransportError::MalformedFrame { .. }
            | TransportError::FrameTooLarge { .. }
            | TransportError::UnexpectedFrame { .. }
            | TransportError::RateLimited { .. } => false,
            TransportError::AuthRejected { .. }
            | TransportError::TlsCertificate { .. }
            | TransportError::UnsupportedVersion { .. }
            | TransportError::InvalidIdentifier { .. }
            | TransportError::InvalidConfig { .. }
            | TransportError::Closed
            | TransportError::ChannelInUse { .. }
            | TransportError::HubStart { .. } => true,
            TransportError::Remote { permanent, .. } => *permanent,
        }
    }

    /// The wire code to send in an error frame for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            TransportError::Connect { .. }
            | TransportError::HandshakeTimeout { .. }
            | TransportError::HeartbeatTimeout { .. }
            | TransportError::TlsCertificate { .. }
            | TransportError::TlsHandshake { .. }
            | TransportError::ConnectionClosed { .. } => ErrorCode::Network,
            TransportError::AuthRejected { .. } => ErrorCode::AuthRejected,
            TransportError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            TransportError::MalformedFrame { .. } => ErrorCode::MalformedFrame,
            TransportError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            TransportError::UnexpectedFrame { .. } => ErrorCode::UnexpectedFrame,
            TransportError::InvalidIdentifier { .. } => ErrorCode::InvalidIdentifier,
            TransportError::Remote { code, .. } => *code,
            TransportError::RateLimited { .. } => ErrorCode::RateLimited,
            TransportError::InvalidConfig { .. }
            | TransportError::Closed
            | TransportError::ChannelInUse { .. }
            | TransportError::HubStart { .. } => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_and_version_errors_are_permanent_network_errors_are_not() {
        let auth = TransportError::AuthRejected {
            message: "bad token".into(),
        };
        assert!(auth.is_permanent());
        assert_eq!(auth.category(), ErrorCategory::Auth);

        let version = TransportError::UnsupportedVersion {
            got: 9,
            supported: vec![1],
        };
        assert!(version.is_permanent());
        assert_eq!(version.category(), ErrorCategory::Protocol);

        let reset = TransportError::ConnectionClosed {
            code: None,
            reason: "reset".into(),
        };
        assert!(!reset.is_permanent());
        assert_eq!(reset.category(), ErrorCategory::Network);
    }

    #[test]
    fn remote_errors_take_category_and_permanence_from_the_frame() {
        let err = TransportError::Remote {
            code: ErrorCode::ShuttingDown,
            category: ErrorCategory::Service,
            permanent: false,
            message: "bye".into(),
        };
        assert_eq!(err.category(), ErrorCategory::Service);
        assert!(!err.is_permanent());
        assert_eq!(err.code(), ErrorCode::ShuttingDown);
    }
}
