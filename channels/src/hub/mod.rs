//! The hub end of channels: a registry of [`HubChannel`](hub_channel::HubChannel) actors behind
//! the [`ChannelService`], each owning a [`ChannelLog`](log::ChannelLog) over a
//! [`HistoryStore`].

pub mod history;
pub mod hub_channel;
pub mod log;
pub mod service;

pub use history::{HistoryFactory, HistoryStore, MemoryHistory, MemoryHistoryFactory, Retention};
pub use service::{AllowAllChannels, ChannelAuthorizer, ChannelService, ChannelServiceBuilder};
