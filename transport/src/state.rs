//! The client connection state machine: the states, the one transition table, and the typed
//! [`ConnectionStateChanged`] message every transition publishes.
//!
//! ```text
//! Initialized → Connecting → Connected ⇄ Syncing
//!                  ↑  ↓          ↓
//!                  │  Disconnected (knows when it retries) → Suspended (breaker open, slow probes)
//!                  └───────┘
//! any → Failed (permanent) · any → Closed (by the application)
//! ```

use std::time::Duration;

use actix::Message;
use serde::Serialize;

use crate::error::TransportError;
use crate::protocol::SessionId;

/// Where a client connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    /// Built, not started.
    Initialized,
    /// A physical connection is being opened (TCP, WebSocket upgrade, hello/welcome).
    Connecting,
    /// The handshake was validated; frames flow.
    Connected,
    /// Connected, and channels are being re-attached and their buffers replayed.
    Syncing,
    /// No connection; the next attempt is scheduled (or waits for a manual reconnect).
    Disconnected,
    /// The circuit breaker is open: probing at a slow fixed interval, forever.
    Suspended,
    /// Permanent failure (auth rejected, protocol mismatch, configured give-up). No automatic
    /// attempt is made; only a manual reconnect or close leaves it.
    Failed,
    /// Closed by the application. Terminal.
    Closed,
}

impl ConnectionState {
    /// Every state, in declaration order (for exhaustive tests and metrics).
    pub const ALL: [ConnectionState; 8] = [
        ConnectionState::Initialized,
        ConnectionState::Connecting,
        ConnectionState::Connected,
        ConnectionState::Syncing,
        ConnectionState::Disconnected,
        ConnectionState::Suspended,
        ConnectionState::Failed,
        ConnectionState::Closed,
    ];

    /// The lower-case name, as serialised and used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Initialized => "initialized",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Syncing => "syncing",
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Suspended => "suspended",
            ConnectionState::Failed => "failed",
            ConnectionState::Closed => "closed",
        }
    }

    /// Numeric code for the `tether_connection_state` gauge (declaration order, 0-based).
    pub fn gauge_value(self) -> f64 {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0) as f64
    }

    /// `true` while a physical connection carries frames (Connected or Syncing).
    pub fn is_up(self) -> bool {
        matches!(self, ConnectionState::Connected | ConnectionState::Syncing)
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one transition table. Every state change in the crate goes through here.
pub fn is_valid_transition(from: ConnectionState, to: ConnectionState) -> bool {
    use ConnectionState::*;
    matches!(
        (from, to),
        (Initialized, Connecting)
            | (Initialized, Closed)
            | (Connecting, Connected)
            | (Connecting, Disconnected)
            | (Connecting, Suspended)
            | (Connecting, Failed)
            | (Connecting, Closed)
            | (Connected, Syncing)
            | (Connected, Disconnected)
            | (Connected, Suspended)
            | (Connected, Failed)
            | (Connected, Closed)
            | (Syncing, Connected)
            | (Syncing, Disconnected)
            | (Syncing, Suspended)
            | (Syncing, Failed)
            | (Syncing, Closed)
            | (Disconnected, Connecting)
            | (Disconnected, Suspended)
            | (Disconnected, Failed)
            | (Disconnected, Closed)
            | (Suspended, Connecting)
            | (Suspended, Closed)
            | (Failed, Connecting)
            | (Failed, Closed)
    )
}

/// A transition the table refuses. Logged and refused; it means a bug in the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid connection state transition {from} → {to}")]
pub struct InvalidTransition {
    /// State the machine was in.
    pub from: ConnectionState,
    /// State that was asked for.
    pub to: ConnectionState,
}

/// Why a transition happened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TransitionReason {
    /// The transport was started.
    Started,
    /// The retry timer fired.
    RetryDue,
    /// The suspended connection's slow probe timer fired.
    ProbeDue,
    /// The application asked for `reconnect_now()`.
    ManualReconnect,
    /// The hub's welcome was received and validated.
    HandshakeCompleted {
        /// The endpoint the connection went to.
        endpoint: String,
        /// The session the hub assigned or resumed.
        session: SessionId,
        /// Whether the previous session was resumed.
        resumed: bool,
    },
    /// Channels are being re-attached after a (re)connect.
    Resyncing {
        /// How many channels are being re-attached.
        channels: usize,
    },
    /// Every channel is re-attached and replayed.
    Resynced,
    /// An established connection was lost.
    ConnectionLost(TransportError),
    /// A connection attempt failed.
    AttemptFailed(TransportError),
    /// The circuit breaker opened after this many consecutive failures.
    BreakerOpened {
        /// Consecutive failures that opened it.
        failures: u32,
        /// The failure that opened it.
        last_error: Option<TransportError>,
    },
    /// A permanent error: no automatic retry.
    PermanentError(TransportError),
    /// The configured maximum number of attempts was used up and the policy says give up.
    GaveUp {
        /// Attempts made.
        attempts: u32,
    },
    /// The application closed the transport.
    ClosedByApplication,
}

impl TransitionReason {
    /// The error behind this transition, if any.
    pub fn error(&self) -> Option<&TransportError> {
        match self {
            TransitionReason::ConnectionLost(e)
            | TransitionReason::AttemptFailed(e)
            | TransitionReason::PermanentError(e) => Some(e),
            TransitionReason::BreakerOpened { last_error, .. } => last_error.as_ref(),
            _ => None,
        }
    }
}

impl std::fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransitionReason::Started => f.write_str("started"),
            TransitionReason::RetryDue => f.write_str("retry due"),
            TransitionReason::ProbeDue => f.write_str("probe due"),
            TransitionReason::ManualReconnect => f.write_str("manual reconnect"),
            TransitionReason::HandshakeCompleted {
                endpoint,
                session,
                resumed,
            } => write!(
                f,
                "handshake completed with {endpoint} (session {session}, resumed: {resumed})"
            ),
            TransitionReason::Resyncing { channels } => {
                write!(f, "re-attaching {channels} channel(s)")
            }
            TransitionReason::Resynced => f.write_str("channels re-attached"),
            TransitionReason::ConnectionLost(e) => write!(f, "connection lost: {e}"),
            TransitionReason::AttemptFailed(e) => write!(f, "attempt failed: {e}"),
            TransitionReason::BreakerOpened {
                failures,
                last_error,
            } => {
                write!(f, "circuit breaker opened after {failures} failures")?;
                match last_error {
                    Some(e) => write!(f, " (last: {e})"),
                    None => Ok(()),
                }
            }
            TransitionReason::PermanentError(e) => write!(f, "permanent error: {e}"),
            TransitionReason::GaveUp { attempts } => write!(f, "gave up after {attempts} attempts"),
            TransitionReason::ClosedByApplication => f.write_str("closed by application"),
        }
    }
}

/// Published to every subscribed `Recipient` on every transition of a client connection.
#[derive(Debug, Clone, PartialEq, Message)]
#[rtype(result = "()")]
pub struct ConnectionStateChanged {
    /// State before.
    pub from: ConnectionState,
    /// State after.
    pub to: ConnectionState,
    /// Why.
    pub reason: TransitionReason,
    /// The attempt number of the current outage (1 for the first attempt); 0 once connected.
    pub attempt: u32,
    /// When entering `Disconnected`/`Suspended`: how long until the next attempt. `None` when no
    /// automatic attempt is scheduled.
    pub retry_in: Option<Duration>,
    /// How long the connection spent in `from`.
    pub time_in_previous: Duration,
}

impl crate::events::StateTransition for ConnectionStateChanged {
    type State = ConnectionState;

    fn target(&self) -> ConnectionState {
        self.to
    }
}

/// The pure state holder: current state, since when, and the table check. The actor owns one
/// and asks it for every change.
#[derive(Debug, Clone)]
pub struct ConnectionFsm {
    state: ConnectionState,
    entered_at: tokio::time::Instant,
}

impl ConnectionFsm {
    /// A machine in `Initialized`.
    pub fn new(now: tokio::time::Instant) -> Self {
        ConnectionFsm {
            state: ConnectionState::Initialized,
            entered_at: now,
        }
    }

    /// The current state.
    pub fn state(&self) -> ConnectionState {
        self.state
    }

    /// When the current state was entered.
    pub fn entered_at(&self) -> tokio::time::Instant {
        self.entered_at
    }

    /// Moves to `to` if the table allows it, returning the event to publish.
    pub fn transition(
        &mut self,
        to: ConnectionState,
        reason: TransitionReason,
        attempt: u32,
        retry_in: Option<Duration>,
        now: tokio::time::Instant,
    ) -> Result<ConnectionStateChanged, InvalidTransition> {
        let from = self.state;
        if !is_valid_transition(from, to) {
            return Err(InvalidTransition { from, to });
        }
        let time_in_previous = now.saturating_duration_since(self.entered_at);
        self.state = to;
        self.entered_at = now;
        Ok(ConnectionStateChanged {
            from,
            to,
            reason,
            attempt,
            retry_in,
            time_in_previous,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConnectionState::*;

    /// The table, written out a second time as the specification the code must match.
    const EXPECTED: &[(ConnectionState, &[ConnectionState])] = &[
        (Initialized, &[Connecting, Closed]),
        (
            Connecting,
            &[Connected, Disconnected, Suspended, Failed, Closed],
        ),
        (
            Connected,
            &[Syncing, Disconnected, Suspended, Failed, Closed],
        ),
        (
            Syncing,
            &[Connected, Disconnected, Suspended, Failed, Closed],
        ),
        (Disconnected, &[Connecting, Suspended, Failed, Closed]),
        (Suspended, &[Connecting, Closed]),
        (Failed, &[Connecting, Closed]),
        (Closed, &[]),
    ];

    #[test]
    fn table_matches_specification_for_all_64_pairs() {
        let mut valid = 0;
        for from in ConnectionState::ALL {
            let allowed = EXPECTED
                .iter()
                .find(|(s, _)| *s == from)
                .map(|(_, to)| *to)
                .unwrap();
            for to in ConnectionState::ALL {
                assert_eq!(
                    is_valid_transition(from, to),
                    allowed.contains(&to),
                    "{from} → {to}"
                );
                valid += usize::from(is_valid_transition(from, to));
            }
        }
        assert_eq!(valid, 25);
    }

    #[test]
    fn no_self_transitions_and_closed_is_terminal() {
        for s in ConnectionState::ALL {
            assert!(!is_valid_transition(s, s), "{s} → {s}");
            assert!(!is_valid_transition(Closed, s));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fsm_refuses_invalid_transitions_and_keeps_state() {
        let t0 = tokio::time::Instant::now();
        let mut fsm = ConnectionFsm::new(t0);
        let err = fsm
            .transition(Connected, TransitionReason::Resynced, 0, None, t0)
            .unwrap_err();
        assert_eq!(
            err,
            InvalidTransition {
                from: Initialized,
                to: Connected
            }
        );
        assert_eq!(fsm.state(), Initialized);

        let ev = fsm
            .transition(Connecting, TransitionReason::Started, 1, None, t0)
            .unwrap();
        assert_eq!((ev.from, ev.to, ev.attempt), (Initialized, Connecting, 1));

        tokio::time::advance(Duration::from_millis(1500)).await;
        let ev = fsm
            .transition(
                Disconnected,
                TransitionReason::AttemptFailed(TransportError::Closed),
                1,
                Some(Duration::from_secs(1)),
                tokio::time::Instant::now(),
            )
            .unwrap();
        assert_eq!(ev.time_in_previous, Duration::from_millis(1500));
        assert_eq!(ev.retry_in, Some(Duration::from_secs(1)));
    }

    #[test]
    fn walks_a_full_life_through_the_table() {
        let t0 = tokio::time::Instant::now();
        let mut fsm = ConnectionFsm::new(t0);
        let path = [
            Connecting,
            Connected,
            Syncing,
            Connected,
            Disconnected,
            Connecting,
            Disconnected,
            Suspended,
            Connecting,
            Failed,
            Connecting,
            Connected,
            Closed,
        ];
        for to in path {
            fsm.transition(to, TransitionReason::Started, 0, None, t0)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(fsm.state(), Closed);
    }

    #[test]
    fn gauge_values_are_distinct() {
        let mut values: Vec<_> = ConnectionState::ALL
            .iter()
            .map(|s| s.gauge_value() as u32)
            .collect();
        values.dedup();
        assert_eq!(values, (0..8).collect::<Vec<_>>());
    }
}
