//! The client's `status()` snapshot: everything an embedding service needs for its own health
//! check, serialisable as JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::breaker::BreakerState;
use crate::error::{ErrorCategory, TransportError};
use crate::protocol::{ClientId, SessionId};
use crate::state::ConnectionState;

/// A point-in-time view of one transport.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransportStatus {
    /// This client's id.
    pub client_id: ClientId,
    /// Current connection state.
    pub state: ConnectionState,
    /// Number of the current (or last) attempt of this outage; 0 when stable.
    pub attempt: u32,
    /// Milliseconds until the next scheduled attempt, if one is scheduled.
    pub next_retry_in_ms: Option<u64>,
    /// Wall-clock time of the next scheduled attempt (Unix milliseconds), if one is scheduled.
    pub next_retry_at_unix_ms: Option<u64>,
    /// Successful reconnects since the transport started (the first connect is not counted).
    pub reconnect_count: u64,
    /// The most recent error, if any.
    pub last_error: Option<ErrorSummary>,
    /// Since when the current connection is up (Unix milliseconds), while connected.
    pub connected_since_unix_ms: Option<u64>,
    /// The endpoint of the current connection, or of the next attempt.
    pub endpoint: Option<String>,
    /// The hub session of the current (or last) connection.
    pub session: Option<SessionId>,
    /// The circuit breaker's position.
    pub breaker: BreakerState,
    /// Every channel open on the transport, by name.
    pub channels: Vec<ChannelSummary>,
}

/// One channel in a status snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChannelSummary {
    /// Channel name.
    pub name: String,
    /// The channel's state (`detached`, `attaching`, `attached`, `suspended`, `failed`,
    /// `detaching`).
    pub state: String,
    /// Published messages not yet acknowledged by the hub.
    pub queue_depth: usize,
    /// Bytes of those messages.
    pub queue_bytes: usize,
    /// The last delivered position, as `offset@epoch`, if any.
    pub position: Option<String>,
}

impl TransportStatus {
    /// `true` when the transport can carry frames now.
    pub fn is_healthy(&self) -> bool {
        self.state.is_up()
    }
}

/// An error as shown in a status snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorSummary {
    /// Category of the error.
    pub category: ErrorCategory,
    /// Whether retrying can help.
    pub permanent: bool,
    /// The error's message.
    pub message: String,
}

impl From<&TransportError> for ErrorSummary {
    fn from(e: &TransportError) -> Self {
        ErrorSummary {
            category: e.category(),
            permanent: e.is_permanent(),
            message: e.to_string(),
        }
    }
}

/// Milliseconds since the Unix epoch (0 for clocks set before 1970).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}
