//! The crate's one error type, [`ChannelError`].

use tether_transport::{ErrorCategory, TransportError};

/// Everything that can go wrong with a channel. Each variant says whether retrying can help
/// ([`ChannelError::is_permanent`]) and what it is about ([`ChannelError::category`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The bounded publish buffer is full (count or bytes). Retryable once acks drain it.
    #[error("channel {channel:?}: publish queue full ({messages} messages, {bytes} bytes queued)")]
    QueueFull {
        /// The channel.
        channel: String,
        /// Messages queued.
        messages: usize,
        /// Bytes queued.
        bytes: usize,
    },
    /// The publish was evicted, unsent, to make room for newer ones
    /// (`OverflowPolicy::EvictOldestUnsent`). The hub never saw it; retryable.
    #[error("channel {channel:?}: publish {seq} evicted unsent to make room")]
    Evicted {
        /// The channel.
        channel: String,
        /// The evicted publish's sequence number.
        seq: u64,
    },
    /// One payload exceeds the channel's maximum message size. Permanent for that message.
    #[error("channel {channel:?}: payload of {size} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// The channel.
        channel: String,
        /// The payload's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The channel failed permanently (for example, not authorized). Its pending publishes are
    /// failed with this error too.
    #[error("channel {channel:?} failed: {cause}")]
    Failed {
        /// The channel.
        channel: String,
        /// What the hub (or the transport) said.
        cause: TransportError,
    },
    /// The hub refused this one publish permanently.
    #[error("channel {channel:?}: publish {seq} rejected: {cause}")]
    Rejected {
        /// The channel.
        channel: String,
        /// The publish's sequence number.
        seq: u64,
        /// What the hub said.
        cause: TransportError,
    },
    /// The channel was detached by the application before the publish was acknowledged.
    #[error("channel {channel:?} was detached")]
    Detached {
        /// The channel.
        channel: String,
    },
    /// The transport was closed.
    #[error("transport closed")]
    TransportClosed,
    /// The channel name is invalid.
    #[error("invalid channel name {channel:?}: {reason}")]
    InvalidName {
        /// The name given.
        channel: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The publish had already been sent when `cause` ended it: the hub may or may not have
    /// stored it, and publishing it again could duplicate it. Permanent; the application
    /// decides (for example by checking the channel's history).
    #[error("channel {channel:?}: publish {seq} may or may not have been stored: {cause}")]
    Unconfirmed {
        /// The channel.
        channel: String,
        /// The publish's sequence number.
        seq: u64,
        /// What ended it.
        cause: Box<ChannelError>,
    },
    /// The hub's history store did not answer or failed (for example Redis is down).
    /// Retryable: nothing of the failed operation was stored.
    #[error("{store} history store unavailable: {message}")]
    Store {
        /// Which store (`redis`).
        store: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The channel's durable outbox (see [`crate::durable`]) could not be opened, read or
    /// written. [`DurableFailure::is_permanent`] says whether trying again can help; nothing of
    /// a failed write was stored.
    #[error("durable outbox {path}: {kind}: {message}")]
    Durable {
        /// The store's file.
        path: String,
        /// What kind of failure.
        kind: DurableFailure,
        /// What the store said.
        message: String,
    },
    /// The channel stopped (closed, detached, or its transport closed) before the hub
    /// acknowledged this publish, but the publish is kept in the channel's durable outbox: it
    /// is sent, with the same sequence number, when the channel is opened again on the same
    /// store. Permanent — publishing it again would duplicate it.
    #[error("channel {channel:?}: publish {seq} kept in the durable outbox until the channel opens again")]
    Persisted {
        /// The channel.
        channel: String,
        /// The publish's sequence number.
        seq: u64,
    },
    /// A transport-level error (registration, payload encoding).
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Why a durable outbox failed ([`ChannelError::Durable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurableFailure {
    /// Another process (or another handle in this one) has the store open: a store belongs
    /// to one running client at a time. Retryable once that one closed it.
    #[error("locked by another process")]
    Locked,
    /// The file is not a readable store (corrupt, not a redb file, or written by an
    /// incompatible version). Permanent.
    #[error("corrupt or unreadable")]
    Corrupt,
    /// Reading or writing the file failed (for example the disk is full). Retryable — but
    /// after a failed commit the store refuses further writes until it is reopened.
    #[error("I/O error")]
    Io,
    /// The store belongs to another client: its stored client id differs from the one asked
    /// for. Permanent.
    #[error("identity mismatch")]
    IdentityMismatch,
    /// The channel is already open on this store (one handle per channel and store: two
    /// would share sequence numbers). Retryable once the other handle is gone.
    #[error("channel already open")]
    ChannelInUse,
    /// The options cannot be combined with a durable outbox (for example
    /// `OverflowPolicy::EvictOldestUnsent`, or a transport whose identity is not the
    /// store's). Permanent.
    #[error("invalid options")]
    InvalidOptions,
}

impl DurableFailure {
    /// `true` when trying again cannot succeed.
    pub fn is_permanent(self) -> bool {
        match self {
            DurableFailure::Locked | DurableFailure::Io | DurableFailure::ChannelInUse => false,
            DurableFailure::Corrupt
            | DurableFailure::IdentityMismatch
            | DurableFailure::InvalidOptions => true,
        }
    }
}

impl ChannelError {
    /// `true` when retrying the same operation cannot succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            ChannelError::QueueFull { .. }
            | ChannelError::Evicted { .. }
            | ChannelError::Store { .. } => false,
            ChannelError::PayloadTooLarge { .. }
            | ChannelError::Failed { .. }
            | ChannelError::Rejected { .. }
            | ChannelError::Detached { .. }
            | ChannelError::TransportClosed
            | ChannelError::Unconfirmed { .. }
            | ChannelError::InvalidName { .. }
            | ChannelError::Persisted { .. } => true,
            ChannelError::Durable { kind, .. } => kind.is_permanent(),
            ChannelError::Transport(e) => e.is_permanent(),
        }
    }

    /// The category this error belongs to.
    pub fn category(&self) -> ErrorCategory {
        match self {
            ChannelError::QueueFull { .. }
            | ChannelError::Evicted { .. }
            | ChannelError::TransportClosed
            | ChannelError::Store { .. }
            | ChannelError::Durable { .. }
            | ChannelError::Persisted { .. } => ErrorCategory::Service,
            ChannelError::PayloadTooLarge { .. } => ErrorCategory::Protocol,
            ChannelError::Failed { cause, .. } | ChannelError::Rejected { cause, .. } => {
                cause.category()
            }
            ChannelError::Detached { .. } | ChannelError::InvalidName { .. } => {
                ErrorCategory::Subscription
            }
            ChannelError::Unconfirmed { cause, .. } => cause.category(),
            ChannelError::Transport(e) => e.category(),
        }
    }
}

/// Checks a channel name: 1–256 bytes, no control characters.
pub fn validate_name(name: &str) -> Result<(), ChannelError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_CHANNEL_NAME {
        Some("longer than 256 bytes")
    } else if name.chars().any(char::is_control) {
        Some("contains control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ChannelError::InvalidName {
            channel: name.chars().take(64).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_NAME: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("room-1/α").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a\nb").is_err());
        assert!(validate_name(&"x".repeat(257)).is_err());
    }

    #[test]
    fn queue_full_is_retryable_failed_is_not() {
        let full = ChannelError::QueueFull {
            channel: "c".into(),
            messages: 1,
            bytes: 1,
        };
        assert!(!full.is_permanent());
        let failed = ChannelError::Failed {
            channel: "c".into(),
            cause: TransportError::AuthRejected {
                message: "no".into(),
            },
        };
        assert!(failed.is_permanent());
        assert_eq!(failed.category(), ErrorCategory::Auth);
    }
}
