//! The hub end of channels: a registry of [`HubChannel`](hub_channel::HubChannel) actors behind
//! the [`ChannelService`], each numbering, storing and fanning out one channel through the
//! shared [`HistoryStore`]: in this process's memory ([`MemoryHistory`], the default) or in
//! Redis Streams ([`RedisStore`], shared by any number of hub nodes). Channels that nobody has
//! attached for their idle TTL expire ([`idle`]), and the channel actors share the service's
//! threads in bounded turns, so one flooded channel cannot stall the others.

pub mod history;
pub mod hub_channel;
pub mod idle;
pub mod log;
pub mod redis_store;
pub mod service;

pub use history::{
    AppendOutcome, AppendRequest, Appended, DedupeLimits, Fence, HistoryStore, MemoryHistory,
    NoticeSink, Page, PageLimit, Retention, StoreHealth, StoreNotice, StoredMessage,
};
pub use idle::{BatchSizer, IdleClock, TurnBudget, DEFAULT_IDLE_TTL};
pub use log::ProducerKey;
pub use redis_store::{RedisStore, RedisStoreBuilder};
pub use service::{AllowAllChannels, ChannelAuthorizer, ChannelService, ChannelServiceBuilder};
