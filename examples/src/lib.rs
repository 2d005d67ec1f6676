//! Runnable Tether programs live in `examples/`:
//!
//! * `hub` — a standalone hub server: `cargo run --example hub -- --bind 127.0.0.1:8080`.
//! * `chat` — a terminal chat client: `cargo run --example chat -- --room lobby`.
//! * `demo` — an embedded hub that is stopped and restarted while a client reconnects, printing
//!   every typed state transition with its timing: `cargo run --example demo`.
//!
//! This library only holds what the examples share.

#![warn(missing_docs)]

use std::time::Instant;

use tether_transport::{ConnectionStateChanged, StateEvent};

/// Installs a `tracing` subscriber: filter from `RUST_LOG`, default `warn` (the examples print
/// their own output).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .try_init();
}

/// One line per transition: time since `start`, from → to, attempt, retry delay, reason.
pub fn describe_transition(start: Instant, ev: &ConnectionStateChanged) -> String {
    let retry = ev
        .retry_in
        .map(|d| format!(", retry in {} ms", d.as_millis()))
        .unwrap_or_default();
    format!(
        "{:>8.3}s  {:>12} → {:<12}  attempt {}{} (after {} ms)  {}",
        start.elapsed().as_secs_f64(),
        ev.from.as_str(),
        ev.to.as_str(),
        ev.attempt,
        retry,
        ev.time_in_previous.as_millis(),
        ev.reason
    )
}

/// [`describe_transition`] for what an event receiver yields: after a lag, a line saying how
/// many transitions were missed, then the latest one.
pub fn describe_event(start: Instant, ev: &StateEvent<ConnectionStateChanged>) -> String {
    match ev {
        StateEvent::Transition(t) => describe_transition(start, t),
        StateEvent::Lagged { missed, latest } => format!(
            "{:>8.3}s  ({missed} transitions missed: this reader fell behind)\n{}",
            start.elapsed().as_secs_f64(),
            describe_transition(start, latest)
        ),
    }
}

pub mod soak;
