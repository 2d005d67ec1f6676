//! # tether-transport
//!
//! One logical WebSocket connection that survives many physical ones — and the hub end that it
//! talks to.
//!
//! * Client: [`Transport`] (a [`TransportActor`] supervising one [`WebSocketActor`] per physical
//!   connection) reconnects through the [`ReconnectManager`] — exponential backoff with ±25 %
//!   jitter, an immediate jittered retry after a stable connection drops, a circuit breaker that
//!   suspends to slow probes — and publishes every state change as a typed
//!   [`ConnectionStateChanged`] message. [`Transport::state`] reads the current state without
//!   waiting.
//! * Events: actors report transitions to actix `Recipient`s; [`event_channel`] bridges them to
//!   an async [`EventReceiver`] that holds a bounded number and never skips silently — a reader
//!   that falls behind gets a [`StateEvent::Lagged`] with how many it missed and the latest
//!   transition, then the ones after it.
//! * Hub: [`hub::Hub`] serves the WebSocket endpoint (handshake, authentication as an
//!   [`hub::Identity`], heartbeats, resumable sessions that belong to their identity),
//!   `/health` and `/metrics`, and, behind an admin token, the session admin API
//!   ([`hub::admin`]: sessions and channels as JSON, and a disconnect for tests), answering for
//!   every node that shares the hub's Redis store.
//! * TLS on both ends ([`tls`], rustls with the `ring` provider): a client trusts the built-in
//!   webpki roots plus the CAs given to its builder (`tls_ca_file`, `TETHER_TLS_CA_FILE`, …) for
//!   `wss://` endpoints; a hub serves `wss://` with `HubConfig::builder().tls(…)` or
//!   `TETHER_HUB_TLS_CERT` / `TETHER_HUB_TLS_KEY`. A hub certificate the client refuses is
//!   [`TransportError::TlsCertificate`], permanent.
//!
//! The rules live in plain structs tested without sockets: [`state`] (the transition table),
//! [`reconnect`], [`breaker`], [`heartbeat`], [`protocol`]; the connection lifecycle that
//! composes them is [`core::ConnectionCore`] (events in, actions out, no I/O). The actors only
//! translate messages and timers into calls on them.
//!
//! ```no_run
//! use tether_transport::{hub::{Hub, HubConfig}, Transport, TransportConfig};
//!
//! #[actix::main]
//! async fn main() -> Result<(), tether_transport::TransportError> {
//!     let hub = Hub::start(HubConfig::builder().bind("127.0.0.1:0".parse().unwrap()).build()?)?;
//!     let config = TransportConfig::builder(hub.ws_url()).build()?;
//!     let (transport, mut events) = Transport::start_with_events(config);
//!     while let Some(event) = events.recv().await {
//!         if event.missed() > 0 {
//!             println!("({} transitions missed)", event.missed());
//!         }
//!         let change = event.transition();
//!         println!("{} → {} ({})", change.from, change.to, change.reason);
//!         if change.to.is_up() {
//!             break;
//!         }
//!     }
//!     println!("{}", serde_json::to_string(&transport.status().await?).unwrap());
//!     transport.close().await;
//!     hub.stop().await;
//!     Ok(())
//! }
//! ```

#![warn(missing_docs)]

pub mod breaker;
mod client_codec;
pub mod config;
pub mod core;
pub mod error;
pub mod events;
pub mod heartbeat;
pub mod hub;
pub mod protocol;
pub mod reconnect;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod transport_actor;
pub mod ws_actor;

pub use config::{TransportConfig, TransportConfigBuilder};
pub use error::{ErrorCategory, TransportError};
pub use events::{event_channel, EventReceiver, StateEvent, StateTransition};
pub use reconnect::{ReconnectManager, ReconnectPolicy, ReconnectStrategy};
pub use state::{ConnectionState, ConnectionStateChanged, TransitionReason};
pub use status::TransportStatus;
pub use transport_actor::{ReconnectOutcome, Transport, TransportActor};
pub use ws_actor::WebSocketActor;
