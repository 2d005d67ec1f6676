//! # tether-channels
//!
//! Pub/sub channels over a [`tether_transport::Transport`] that lose nothing and duplicate
//! nothing across reconnects.
//!
//! * Client: [`Channel`] (a [`ChannelActor`]) keeps every publish in a bounded buffer until the
//!   hub acknowledges it, re-attaches after every reconnect, replays unacknowledged publishes in
//!   their original order before new ones, and delivers subscribers every message exactly
//!   once, in order — or a typed [`Discontinuity`] when history could not cover a gap.
//! * Hub: [`hub::ChannelService`] plugs into a `tether_transport::hub::Hub`: one actor per
//!   channel numbering messages (per-channel offsets and an epoch), storing history behind
//!   [`hub::HistoryStore`], recognising replayed publishes (per publisher, scoped by the identity
//!   the hub's authenticator gave it: one identity's publishes are never taken for replays of
//!   another's), and fanning out each message encoded once. Channels nobody has attached expire
//!   after an idle TTL (default 5 minutes, with their in-memory history; Redis keys expire on
//!   their own TTL), and channels share the service's threads in short turns so that one
//!   flooded channel cannot stall the others ([`hub::idle`]).
//!
//! The rules live in plain structs: [`core`] (every decision of a client channel,
//! sans I/O: events in, actions out — the [`ChannelActor`] is its shell), which drives
//! [`outbox`] (publish buffer) and [`cursor`] (resume and dedupe); [`state`] (the transition
//! table), [`hub::log`] (numbering, idempotence, resume plans), [`hub::history`], [`hub::idle`]
//! (expiry and turns).
//!
//! ```no_run
//! use std::sync::Arc;
//! use tether_channels::{hub::ChannelService, Channel, ChannelEvent, ChannelOptions};
//! use tether_transport::{hub::{Hub, HubConfig}, Transport, TransportConfig};
//!
//! #[actix::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let channels = ChannelService::builder().build()?;
//!     let hub = Hub::start(
//!         HubConfig::builder()
//!             .bind("127.0.0.1:0".parse()?)
//!             .handler(Arc::new(channels))
//!             .build()?,
//!     )?;
//!     let transport = Transport::start(TransportConfig::builder(hub.ws_url()).build()?);
//!     let (room, mut events) = Channel::open(&transport, "room", ChannelOptions::default()).await?;
//!     let ack = room.publish(&serde_json::json!({"text": "hello"})).await?;
//!     println!("stored at offset {:?}", ack.offset);
//!     if let Some(ChannelEvent::Message(m)) = events.recv().await {
//!         println!("{}: {}", m.offset, m.payload.json());
//!     }
//!     transport.close().await;
//!     hub.stop().await;
//!     Ok(())
//! }
//! ```

#![warn(missing_docs)]

pub mod channel_actor;
pub mod core;
pub mod cursor;
pub mod durable;
pub mod error;
pub mod hub;
pub mod outbox;
mod publish;
pub mod state;
pub mod telemetry;

pub use channel_actor::{
    Channel, ChannelActor, ChannelEvent, ChannelEvents, ChannelMessage, ChannelOptions,
    Discontinuity, PublishAck, PublishFuture, Recovered,
};
pub use error::{ChannelError, DurableFailure};
pub use outbox::{BufferLimits, OverflowPolicy};
pub use state::{ChannelReason, ChannelState, ChannelStateChanged};
