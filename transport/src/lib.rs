//! # tether-transport
//!
//! One logical WebSocket connection that survives many physical ones — and the hub end that it
//! talks to.
//!
//! * Client: [`Transport`] (a [`TransportActor`] supervising one [`WebSocketActor`] per physical
//!   connection) reconnects through the [`ReconnectManager`] — exponential backoff with ±25 %
//!   jitter, an immediate jittered retry after a stable connection drops, a circuit breaker that
//!   suspends to slow probes — and publishes every state change as a typed
//!   [`ConnectionStateChanged`] message.
//! * Hub: [`hub::Hub`] serves the WebSocket endpoint (handshake, authentication as an
//!   [`hub::Identity`], heartbeats, resumable sessions that belong to their identity),
//!   `/health` and `/metrics`.
//!
//! The rules live in plain structs tested without sockets: [`state`] (the transition table),
//! [`reconnect`], [`breaker`], [`heartbeat`], [`protocol`]. The actors only translate messages
//! and timers into calls on them.
//!
//! ```no_run
//! use tether_transport::{hub::{Hub, HubConfig}, Transport, TransportConfig};
//!
//! #[actix::main]
//! async fn main() -> Result<(), tether_transport::TransportError> {
//!     let hub = Hub::start(HubConfig::builder().bind("127.0.0.1:0".parse().unwrap()).build()?)?;
//!     let config = TransportConfig::builder(hub.ws_url()).build()?;
//!     let (transport, mut events) = Transport::start_with_events(config);
//!     while let Some(change) = events.recv().await {
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
pub mod config;
pub mod error;
pub mod events;
pub mod heartbeat;
pub mod hub;
pub mod protocol;
pub mod reconnect;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod transport_actor;
pub mod ws_actor;

pub use config::{TransportConfig, TransportConfigBuilder};
pub use error::{ErrorCategory, TransportError};
pub use events::{event_channel, EventReceiver};
pub use reconnect::{ReconnectManager, ReconnectPolicy, ReconnectStrategy};
pub use state::{ConnectionState, ConnectionStateChanged, TransitionReason};
pub use status::TransportStatus;
pub use transport_actor::{ReconnectOutcome, Transport, TransportActor};
pub use ws_actor::WebSocketActor;
