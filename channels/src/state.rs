//! The client channel state machine: states, the one transition table, and the typed
//! [`ChannelStateChanged`] message.

use actix::Message;
use serde::Serialize;
use tether_transport::TransportError;

/// Where a channel is in its life on the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelState {
    /// Not attached (before the first attach, and after a detach).
    Detached,
    /// An attach is on its way to the hub.
    Attaching,
    /// Attached: messages flow, publishes are sent.
    Attached,
    /// The connection is down (or the attach failed and will be retried): publishes are kept,
    /// re-attach is pending.
    Suspended,
    /// Permanently refused (for example, not authorized). The connection and other channels go
    /// on.
    Failed,
    /// A detach is on its way to the hub.
    Detaching,
}

impl ChannelState {
    /// Every state, in declaration order.
    pub const ALL: [ChannelState; 6] = [
        ChannelState::Detached,
        ChannelState::Attaching,
        ChannelState::Attached,
        ChannelState::Suspended,
        ChannelState::Failed,
        ChannelState::Detaching,
    ];

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelState::Detached => "detached",
            ChannelState::Attaching => "attaching",
            ChannelState::Attached => "attached",
            ChannelState::Suspended => "suspended",
            ChannelState::Failed => "failed",
            ChannelState::Detaching => "detaching",
        }
    }
}

impl std::fmt::Display for ChannelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one channel transition table.
pub fn is_valid_transition(from: ChannelState, to: ChannelState) -> bool {
    use ChannelState::*;
    matches!(
        (from, to),
        (Detached, Attaching)
            | (Attaching, Attached)
            | (Attaching, Suspended)
            | (Attaching, Failed)
            | (Attaching, Detaching)
            | (Attaching, Detached)
            | (Attached, Attaching)
            | (Attached, Suspended)
            | (Attached, Failed)
            | (Attached, Detaching)
            | (Attached, Detached)
            | (Suspended, Attaching)
            | (Suspended, Failed)
            | (Suspended, Detached)
            | (Failed, Attaching)
            | (Failed, Detached)
            | (Detaching, Detached)
    )
}

/// Why a channel changed state.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ChannelReason {
    /// The connection is up and the channel should be attached.
    AttachRequested,
    /// The hub confirmed the attach.
    AttachConfirmed,
    /// The subscriber fell behind; the channel re-attaches to catch up from history.
    CatchingUp,
    /// The connection was lost.
    ConnectionLost(TransportError),
    /// The attach failed with a retryable error; it is retried on the channel's own backoff.
    AttachFailed(TransportError),
    /// The attach (or the attached channel) was refused permanently.
    Refused(TransportError),
    /// The channel's retry timer fired.
    RetryDue,
    /// The application asked to detach.
    DetachRequested,
    /// The hub confirmed the detach (or the connection was down, so there was nothing to undo).
    DetachConfirmed,
    /// The hub did not confirm the detach in time; the channel is detached locally.
    DetachTimedOut,
    /// The transport was closed.
    TransportClosed,
}

impl std::fmt::Display for ChannelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelReason::AttachRequested => f.write_str("attach requested"),
            ChannelReason::AttachConfirmed => f.write_str("attach confirmed"),
            ChannelReason::CatchingUp => f.write_str("catching up from history"),
            ChannelReason::ConnectionLost(e) => write!(f, "connection lost: {e}"),
            ChannelReason::AttachFailed(e) => write!(f, "attach failed: {e}"),
            ChannelReason::Refused(e) => write!(f, "refused: {e}"),
            ChannelReason::RetryDue => f.write_str("retry due"),
            ChannelReason::DetachRequested => f.write_str("detach requested"),
            ChannelReason::DetachConfirmed => f.write_str("detach confirmed"),
            ChannelReason::DetachTimedOut => f.write_str("detach not confirmed in time"),
            ChannelReason::TransportClosed => f.write_str("transport closed"),
        }
    }
}

/// Published on every channel transition.
#[derive(Debug, Clone, PartialEq, Message)]
#[rtype(result = "()")]
pub struct ChannelStateChanged {
    /// The channel.
    pub channel: String,
    /// State before.
    pub from: ChannelState,
    /// State after.
    pub to: ChannelState,
    /// Why.
    pub reason: ChannelReason,
    /// On `Attached`: whether the subscription resumed exactly where it left off (no
    /// discontinuity). False on a first attach and after a gap.
    pub resumed: bool,
}

impl tether_transport::StateTransition for ChannelStateChanged {
    type State = ChannelState;

    fn target(&self) -> ChannelState {
        self.to
    }
}

/// A transition the table refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid channel state transition {from} → {to}")]
pub struct InvalidChannelTransition {
    /// State before.
    pub from: ChannelState,
    /// State asked for.
    pub to: ChannelState,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChannelState::*;

    const EXPECTED: &[(ChannelState, &[ChannelState])] = &[
        (Detached, &[Attaching]),
        (
            Attaching,
            &[Attached, Suspended, Failed, Detaching, Detached],
        ),
        (
            Attached,
            &[Attaching, Suspended, Failed, Detaching, Detached],
        ),
        (Suspended, &[Attaching, Failed, Detached]),
        (Failed, &[Attaching, Detached]),
        (Detaching, &[Detached]),
    ];

    #[test]
    fn table_matches_specification_for_all_36_pairs() {
        for from in ChannelState::ALL {
            let allowed = EXPECTED.iter().find(|(s, _)| *s == from).unwrap().1;
            for to in ChannelState::ALL {
                assert_eq!(
                    is_valid_transition(from, to),
                    allowed.contains(&to),
                    "{from} → {to}"
                );
            }
        }
    }
}
