//! The hub's channel service: the [`SessionHandler`] that plugs channels into a hub, the
//! registry of [`HubChannel`] actors, and per-channel authorization.
//!
//! **Threads.** By default a channel's actor runs on the hub worker of the connection that
//! first attached it: a message then crosses at most one thread boundary in the hub — from the
//! publisher's worker to the channel's, or from the channel's to the subscriber's — and none
//! when all three share a worker (a one-worker hub runs everything on one thread). With
//! [`ChannelServiceBuilder::threads`] the service runs channels on dedicated threads of its own
//! instead, each channel on the thread its name hashes to (with a per-process random key, so
//! names cannot be picked to land beside a given channel): two crossings per message, but a
//! channel's history outlives the hub's workers. Either way a channel yields its thread after
//! half a millisecond of work ([`TurnBudget`](super::idle::TurnBudget)) and sizes its append
//! batches to about a millisecond of work ([`BatchSizer`](super::idle::BatchSizer)), so a
//! flooded channel delays the connections and channels beside it by tens of milliseconds at
//! most, not by its backlog.
//!
//! **Expiry.** A channel that no connection has attached and that has nothing in progress
//! expires after its idle TTL (default 5 minutes, [`ChannelServiceBuilder::idle_ttl`]): the
//! registry forgets it, and the store is told ([`HistoryStore::release`]; the in-memory store
//! drops its history, so a later attach finds a new epoch). The hand-over is airtight: an
//! attach takes the channel's address and queues its `Subscribe` under the registry's lock,
//! and a channel retires only under that lock, when no attach handed its address is still on
//! its way and no connection has it attached. An attach racing with expiry thus reaches either
//! the live channel or a new one, never a stopping one, and no publish can be sent to a
//! stopping channel (publishing needs an attach).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use actix::prelude::*;
use tether_transport::hub::{
    ConnInfo, ConnectionHandler, FrameRejection, HandlerHealth, Outbound, SessionHandler,
    SessionOutbox,
};
use tether_transport::protocol::{check_identifier, v2, Detached, ErrorCode, Frame, MAX_ID_LEN};
use tether_transport::{ErrorCategory, TransportError};

use super::history::{DedupeLimits, HistoryStore, MemoryHistory, PageLimit, Retention};
use super::hub_channel::{
    Describe, DescribeMember, HubChannel, PublishCommand, PublishRunCommand, Subscribe, Summarize,
    Unsubscribe,
};
use super::idle::DEFAULT_IDLE_TTL;
use super::log::{ProducerKey, DEFAULT_DEDUPE_WINDOW, DEFAULT_MAX_PRODUCERS, DEFAULT_PRODUCER_TTL};
use crate::error::validate_name;
use crate::telemetry;
use futures::future::LocalBoxFuture;
use tether_transport::hub::admin::{
    AdminPeers, ChannelDetail, ChannelPage, SessionChannel, INTROSPECT_TIMEOUT,
};

/// Default most channels one hub holds: 100,000.
pub const DEFAULT_MAX_CHANNELS: usize = 100_000;
/// Default most channels one connection may have attached at once: 1,000 (so no single
/// connection can take the hub-wide limit).
pub const DEFAULT_MAX_CHANNELS_PER_CONNECTION: usize = 1_000;
/// Default most publishes one connection may have awaiting their ack: 65,536.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION: usize = 65_536;
/// Default most payload bytes of one connection's publishes awaiting their acks before the
/// hub stops reading that connection: 8 MiB.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES_PER_CONNECTION: usize = 8 * 1024 * 1024;
/// Default largest payload a publish may carry: 512 KiB. Larger ones are refused (permanently,
/// for that publish) so that no stored message can exceed a client's frame limit.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 512 * 1024;
/// Largest publish sequence number accepted: 2^53 − 1 (exact in every JSON implementation and
/// in the Redis store's Lua scripts).
pub const MAX_SEQ: u64 = (1 << 53) - 1;
/// Default capacity of a channel actor's mailbox: 65,536 commands.
pub const DEFAULT_CHANNEL_MAILBOX: usize = 65_536;

/// Decides whether a connection may attach to a channel (`subscribe` false: publish only).
/// Runs on the connection's worker for every attach: keep it fast.
///
/// Decide from [`ConnInfo::identity`] — who the hub's authenticator says the connection is;
/// the client id, instance and session are whatever the client sent:
///
/// ```
/// use tether_channels::hub::ChannelService;
/// use tether_transport::hub::ConnInfo;
///
/// // Each identity may use the channels under its own name, and "lobby".
/// let builder = ChannelService::builder().authorizer(
///     |conn: &ConnInfo, channel: &str, _subscribe: bool| {
///         let own = channel
///             .strip_prefix(conn.identity.as_str())
///             .is_some_and(|rest| rest.starts_with('/'));
///         if own || channel == "lobby" {
///             Ok(())
///         } else {
///             Err("not yours".to_owned())
///         }
///     },
/// );
/// // builder.build() inside an actix system, then hand it to the hub.
/// # drop(builder);
/// ```
pub trait ChannelAuthorizer: Send + Sync + 'static {
    /// `Err(reason)` refuses with a permanent `not_authorized` error for that channel only.
    fn authorize(&self, conn: &ConnInfo, channel: &str, subscribe: bool) -> Result<(), String>;
}

impl<F> ChannelAuthorizer for F
where
    F: Fn(&ConnInfo, &str, bool) -> Result<(), String> + Send + Sync + 'static,
{
    fn authorize(&self, conn: &ConnInfo, channel: &str, subscribe: bool) -> Result<(), String> {
        self(conn, channel, subscribe)
    }
}

/// Lets every connection attach to every channel. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAllChannels;

impl ChannelAuthorizer for AllowAllChannels {
    fn authorize(&self, _: &ConnInfo, _: &str, _: bool) -> Result<(), String> {
        Ok(())
    }
}

/// Builder for a [`ChannelService`].
pub struct ChannelServiceBuilder {
    retention: Retention,
    store: Option<Arc<dyn HistoryStore>>,
    page: PageLimit,
    authorizer: Arc<dyn ChannelAuthorizer>,
    max_channels: usize,
    max_channels_per_connection: usize,
    max_in_flight_per_connection: usize,
    max_in_flight_bytes_per_connection: usize,
    channel_mailbox: usize,
    dedupe_window: usize,
    max_producers: usize,
    producer_ttl: Duration,
    threads: usize,
    max_message_size: usize,
    idle_ttl: Duration,
}

impl ChannelServiceBuilder {
    /// History retention of the default in-memory store. Default: 1000 messages, 24 h, 64 MiB.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// A different history store (for example a
    /// [`RedisStore`](super::redis_store::RedisStore), shared by several hub nodes). Default:
    /// in this process's memory ([`MemoryHistory`]) with [`Self::retention`] and the dedupe
    /// settings of this builder.
    pub fn store(mut self, store: Arc<dyn HistoryStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Most messages and payload bytes read from the store at a time for one replay, catch-up
    /// or fan-out. Default 256 messages / 1 MiB.
    pub fn page(mut self, page: PageLimit) -> Self {
        self.page = page;
        self
    }

    /// Per-channel authorization. Default [`AllowAllChannels`].
    pub fn authorizer(mut self, authorizer: impl ChannelAuthorizer) -> Self {
        self.authorizer = Arc::new(authorizer);
        self
    }

    /// Most channels. Default 100,000.
    pub fn max_channels(mut self, n: usize) -> Self {
        self.max_channels = n;
        self
    }

    /// Most channels one connection may have attached at once; more are refused with
    /// `too_many_channels` (that attach only). Default 1,000; at most [`Self::max_channels`].
    pub fn max_channels_per_connection(mut self, n: usize) -> Self {
        self.max_channels_per_connection = n;
        self
    }

    /// Most unacknowledged publishes per connection before it is closed. Default 65,536.
    pub fn max_in_flight_per_connection(mut self, n: usize) -> Self {
        self.max_in_flight_per_connection = n;
        self
    }

    /// Most payload bytes of one connection's publishes awaiting their acks. Past it the hub
    /// stops reading that connection's socket (TCP backpressure: the client's writes wait)
    /// until acks bring it back under; nothing is refused. Default 8 MiB.
    pub fn max_in_flight_bytes_per_connection(mut self, bytes: usize) -> Self {
        self.max_in_flight_bytes_per_connection = bytes;
        self
    }

    /// Recent `(seq, offset)` pairs remembered per producer by the in-memory store, to re-ack
    /// replays with their original offset. Default 1024.
    pub fn dedupe_window(mut self, n: usize) -> Self {
        self.dedupe_window = n;
        self
    }

    /// Largest payload a publish may carry. Default 512 KiB; keep it well below the clients'
    /// frame limit (1 MiB by default), since the hub adds the message envelope.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Dedicated threads that run channel actors, each channel on the one its name hashes to.
    /// Default 0: each channel runs on the hub worker of the connection that first attached it
    /// (at most one thread crossing per message in the hub, see the module docs).
    ///
    /// With 0, a channel actor ends with its worker: when the hub stops, the next attach of the
    /// channel (on a hub started again with the same service) starts a new actor, which
    /// continues from the store — the same epoch and offsets, for the in-memory store too.
    /// Dedicated threads cost a second thread crossing per message and keep channels apart
    /// from the hub's connections.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// How long a channel that no connection has attached, and that has nothing in progress,
    /// is kept before it expires. Default 5 minutes; at least 1 ms.
    ///
    /// An expired channel costs nothing until it is attached again. With the in-memory store
    /// its history, epoch and dedupe state go with it: a subscriber that resumes later gets a
    /// gap into a new epoch (a `Discontinuity`), and a publish replayed later is stored again
    /// in the new epoch. Keep it longer than any absence of all of a channel's clients that
    /// they should resume across without one. With a shared store (Redis) only this node's
    /// actor goes; the channel's data stays for its key TTL
    /// ([`RedisStoreBuilder::key_ttl`](super::redis_store::RedisStoreBuilder::key_ttl)).
    pub fn idle_ttl(mut self, ttl: Duration) -> Self {
        self.idle_ttl = ttl;
        self
    }

    /// Capacity of each channel's command mailbox, and the most publishes a channel queues for
    /// its store; past it a publisher's connection is closed with `overloaded` (retryable).
    /// Default 65,536.
    pub fn channel_mailbox(mut self, n: usize) -> Self {
        self.channel_mailbox = n;
        self
    }

    /// Validates and starts the service's threads. Call inside an actix system.
    pub fn build(self) -> Result<ChannelService, TransportError> {
        let invalid = |field: &'static str| {
            Err(TransportError::InvalidConfig {
                field,
                reason: "must be at least 1".into(),
            })
        };
        if self.max_channels == 0 {
            return invalid("max_channels");
        }
        if self.max_in_flight_per_connection == 0 {
            return invalid("max_in_flight_per_connection");
        }
        if self.max_in_flight_bytes_per_connection == 0 {
            return invalid("max_in_flight_bytes_per_connection");
        }
        if self.channel_mailbox == 0 {
            return invalid("channel_mailbox");
        }
        if self.max_channels_per_connection == 0 {
            return invalid("max_channels_per_connection");
        }
        if self.max_channels_per_connection > self.max_channels {
            return Err(TransportError::InvalidConfig {
                field: "max_channels_per_connection",
                reason: "must not exceed max_channels".into(),
            });
        }
        if self.retention.max_messages == 0 {
            return invalid("retention.max_messages");
        }
        if self.page.max_messages == 0 {
            return invalid("page.max_messages");
        }
        if self.idle_ttl < Duration::from_millis(1) {
            return Err(TransportError::InvalidConfig {
                field: "idle_ttl",
                reason: "must be at least 1 ms".into(),
            });
        }
        let store = self.store.unwrap_or_else(|| {
            Arc::new(MemoryHistory::new(
                self.retention,
                DedupeLimits {
                    window: self.dedupe_window,
                    max_producers: self.max_producers,
                    ttl: self.producer_ttl,
                },
            ))
        });
        let arbiters = (0..self.threads).map(|_| Arbiter::new()).collect();
        Ok(ChannelService {
            inner: Arc::new(Inner {
                registry: Arc::new(Registry {
                    channels: Mutex::new(HashMap::new()),
                    count: tokio::sync::watch::Sender::new(0),
                    next_id: AtomicU64::new(1),
                    store: store.clone(),
                }),
                arbiters,
                placement: RandomState::new(),
                idle_ttl: self.idle_ttl,
                store,
                page: self.page,
                authorizer: self.authorizer,
                max_channels: self.max_channels,
                max_channels_per_connection: self.max_channels_per_connection,
                max_in_flight: self.max_in_flight_per_connection,
                max_in_flight_bytes: self.max_in_flight_bytes_per_connection,
                channel_mailbox: self.channel_mailbox,
                max_message_size: self.max_message_size,
            }),
        })
    }
}

/// One registered channel: its actor, and the attaches on their way to it.
struct Entry {
    addr: Addr<HubChannel>,
    /// Tells this actor from later ones of the same name.
    id: u64,
    /// `Subscribe`s queued to the actor and not yet handled by it (incremented under the
    /// registry's lock, decremented by the actor).
    attaching: Arc<AtomicUsize>,
}

/// The channels of one service, by name.
struct Registry {
    channels: Mutex<HashMap<String, Entry>>,
    /// The number of channels, for whoever waits for it.
    count: tokio::sync::watch::Sender<usize>,
    next_id: AtomicU64,
    store: Arc<dyn HistoryStore>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes actor `id` of `name` if nothing can reach it any more. Called by the actor.
    fn retire(&self, name: &str, id: u64) -> Retirement {
        let mut channels = self.lock();
        match channels.get(name) {
            Some(entry) if entry.id == id => {
                if entry.attaching.load(Ordering::Acquire) > 0 {
                    return Retirement::AttachOnItsWay;
                }
            }
            // Replaced (the registry found it dead) or gone: nobody new can reach it.
            _ => return Retirement::NotRegistered,
        }
        channels.remove(name);
        // Before any new actor of the name can exist (its first store call comes after this
        // lock is released).
        self.store.release(name);
        let len = channels.len();
        if channels.capacity() > 64 && len < channels.capacity() / 4 {
            channels.shrink_to(len * 2);
        }
        self.count.send_replace(channels.len());
        metrics::gauge!(telemetry::HUB_CHANNELS).decrement(1.0);
        metrics::counter!(telemetry::HUB_CHANNELS_EXPIRED).increment(1);
        Retirement::Retired
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let n = self.lock().len();
        metrics::gauge!(telemetry::HUB_CHANNELS).decrement(n as f64);
    }
}

/// What [`ChannelLease::retire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retirement {
    /// Removed from the registry: stop.
    Retired,
    /// An attach was handed this actor's address and is still on its way: stay.
    AttachOnItsWay,
    /// The registry holds another actor under the name (or none): stop.
    NotRegistered,
}

/// A channel actor's tie to its registry entry: how it hears of attaches on their way, and how
/// it retires.
pub(crate) struct ChannelLease {
    registry: Weak<Registry>,
    name: String,
    id: u64,
    attaching: Arc<AtomicUsize>,
    idle_ttl: Duration,
}

impl ChannelLease {
    /// A `Subscribe` handed out by the registry has arrived.
    pub(crate) fn attach_arrived(&self) {
        // Saturating: a `Subscribe` sent to a bare actor was never counted.
        let _ = self
            .attaching
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Leaves the registry, if no attach is on its way.
    pub(crate) fn retire(&self) -> Retirement {
        match self.registry.upgrade() {
            Some(registry) => registry.retire(&self.name, self.id),
            None => Retirement::NotRegistered,
        }
    }

    /// How long the channel is kept unused.
    pub(crate) fn idle_ttl(&self) -> Duration {
        self.idle_ttl
    }
}

/// Why an attach could not be handed to a channel.
enum AttachRefused {
    /// A hub limit: refuse that attach.
    Limit(TransportError),
    /// The channel's mailbox is full: close the connection (overloaded).
    Full,
}

struct Inner {
    registry: Arc<Registry>,
    arbiters: Vec<Arbiter>,
    /// Keys the channel → thread hash.
    placement: RandomState,
    idle_ttl: Duration,
    store: Arc<dyn HistoryStore>,
    page: PageLimit,
    authorizer: Arc<dyn ChannelAuthorizer>,
    max_channels: usize,
    max_channels_per_connection: usize,
    max_in_flight: usize,
    max_in_flight_bytes: usize,
    channel_mailbox: usize,
    max_message_size: usize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

impl Inner {
    /// Hands `subscribe` to the channel `name` — the live actor, or a new one — and returns
    /// its address. Under the registry's lock, so that the channel cannot retire between
    /// being found and receiving the attach.
    fn attach(&self, name: &str, subscribe: Subscribe) -> Result<Addr<HubChannel>, AttachRefused> {
        let mut channels = self.registry.lock();
        let live = channels.get(name).filter(|e| e.addr.connected()).is_some();
        if !live {
            if channels.len() >= self.max_channels && !channels.contains_key(name) {
                return Err(AttachRefused::Limit(refusal(
                    ErrorCode::Overloaded,
                    ErrorCategory::Service,
                    false,
                    format!(
                        "the hub holds its maximum of {} channels",
                        self.max_channels
                    ),
                )));
            }
            let entry = self.start_channel(name);
            if channels.insert(name.to_owned(), entry).is_none() {
                metrics::gauge!(telemetry::HUB_CHANNELS).increment(1.0);
                self.registry.count.send_replace(channels.len());
            }
        }
        let Some(entry) = channels.get(name) else {
            return Err(AttachRefused::Full); // just inserted: never
        };
        entry.attaching.fetch_add(1, Ordering::AcqRel);
        if entry.addr.try_send(subscribe).is_err() {
            entry.attaching.fetch_sub(1, Ordering::AcqRel);
            return Err(AttachRefused::Full);
        }
        Ok(entry.addr.clone())
    }

    /// Starts the actor of channel `name` on its thread.
    fn start_channel(&self, name: &str) -> Entry {
        // With no dedicated threads, a channel lives on the worker of the connection that
        // created it: for a single-worker hub every hop stays on one thread.
        let arbiter = if self.arbiters.is_empty() {
            Arbiter::current()
        } else {
            let slot = self.placement.hash_one(name) as usize % self.arbiters.len();
            self.arbiters[slot].handle()
        };
        // The mailbox exists, with its full capacity, before the actor runs: commands sent to
        // a channel that is still starting (an attach and a burst of publishes in one write)
        // queue instead of finding the default 16-slot mailbox full.
        let (tx, rx) = actix::dev::channel::channel::<HubChannel>(self.channel_mailbox);
        let addr = Addr::new(tx);
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        let attaching = Arc::new(AtomicUsize::new(0));
        let lease = ChannelLease {
            registry: Arc::downgrade(&self.registry),
            name: name.to_owned(),
            id,
            attaching: attaching.clone(),
            idle_ttl: self.idle_ttl,
        };
        let (store, page, owned) = (self.store.clone(), self.page, name.to_owned());
        let max_pending = self.channel_mailbox;
        arbiter.spawn_fn(move || {
            let channel = HubChannel::new(owned, store, page, max_pending).with_lease(lease);
            Context::with_receiver(rx).run(channel);
        });
        Entry {
            addr,
            id,
            attaching,
        }
    }
}

/// Serves channels on a hub: install it with
/// `HubConfig::builder().handler(Arc::new(service))`.
#[derive(Clone)]
pub struct ChannelService {
    inner: Arc<Inner>,
}

impl ChannelService {
    /// A builder with the documented defaults.
    pub fn builder() -> ChannelServiceBuilder {
        ChannelServiceBuilder {
            retention: Retention::default(),
            store: None,
            page: PageLimit::default(),
            authorizer: Arc::new(AllowAllChannels),
            max_channels: DEFAULT_MAX_CHANNELS,
            max_channels_per_connection: DEFAULT_MAX_CHANNELS_PER_CONNECTION,
            max_in_flight_per_connection: DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION,
            max_in_flight_bytes_per_connection: DEFAULT_MAX_IN_FLIGHT_BYTES_PER_CONNECTION,
            channel_mailbox: DEFAULT_CHANNEL_MAILBOX,
            dedupe_window: DEFAULT_DEDUPE_WINDOW,
            max_producers: DEFAULT_MAX_PRODUCERS,
            producer_ttl: DEFAULT_PRODUCER_TTL,
            threads: 0,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            idle_ttl: DEFAULT_IDLE_TTL,
        }
    }

    /// Number of channels that exist on the hub (expired ones are gone).
    pub fn channel_count(&self) -> usize {
        self.inner.registry.lock().len()
    }

    /// Watches the number of channels (for dashboards, and tests that wait for channels to
    /// expire instead of polling).
    pub fn watch_channels(&self) -> tokio::sync::watch::Receiver<usize> {
        self.inner.registry.count.subscribe()
    }
}

impl std::fmt::Debug for ChannelService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelService")
            .field("channels", &self.channel_count())
            .finish_non_exhaustive()
    }
}

impl SessionHandler for ChannelService {
    fn health(&self) -> HandlerHealth {
        let store = self.inner.store.health();
        HandlerHealth {
            healthy: store.healthy,
            detail: serde_json::to_value(&store).unwrap_or_default(),
        }
    }

    fn admin_channels(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> LocalBoxFuture<'static, ChannelPage> {
        // The names after the cursor, the first `limit` of them in order (one more tells
        // whether the page is the last).
        let mut names: Vec<(String, Addr<HubChannel>)> = {
            let channels = self.inner.registry.lock();
            channels
                .iter()
                .filter(|(name, _)| after.as_ref().is_none_or(|a| name.as_str() > a.as_str()))
                .map(|(name, entry)| (name.clone(), entry.addr.clone()))
                .collect()
        };
        if names.len() > limit + 1 {
            names.select_nth_unstable_by(limit, |a, b| a.0.cmp(&b.0));
            names.truncate(limit + 1);
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let more = names.len() > limit;
        names.truncate(limit);
        Box::pin(async move {
            let asks = names.into_iter().map(|(name, addr)| async move {
                match tokio::time::timeout(INTROSPECT_TIMEOUT, addr.send(Summarize)).await {
                    Ok(Ok(summary)) => Some(summary),
                    // Expired meanwhile (or too busy to answer): left out of this page.
                    _ => {
                        tracing::debug!(channel = %name, "admin: channel did not answer");
                        None
                    }
                }
            });
            let channels = futures::future::join_all(asks)
                .await
                .into_iter()
                .flatten()
                .collect();
            ChannelPage { channels, more }
        })
    }

    fn admin_channel(&self, name: String) -> LocalBoxFuture<'static, Option<ChannelDetail>> {
        let addr = self
            .inner
            .registry
            .lock()
            .get(&name)
            .map(|e| e.addr.clone());
        Box::pin(async move {
            let addr = addr?;
            tokio::time::timeout(INTROSPECT_TIMEOUT, addr.send(Describe))
                .await
                .ok()?
                .ok()
        })
    }

    fn admin_peers(&self) -> Option<Arc<dyn AdminPeers>> {
        self.inner.store.admin_peers()
    }

    fn open(&self, conn: ConnInfo, outbox: SessionOutbox) -> Box<dyn ConnectionHandler> {
        outbox.limit_in_flight(self.inner.max_in_flight_bytes);
        Box::new(ConnHandler {
            conn,
            outbox,
            inner: self.inner.clone(),
            attached: HashMap::new(),
        })
    }
}

fn refusal(
    code: ErrorCode,
    category: ErrorCategory,
    permanent: bool,
    message: String,
) -> TransportError {
    TransportError::Remote {
        code,
        category,
        permanent,
        message,
    }
}

/// The channel side of one hub connection.
struct ConnHandler {
    conn: ConnInfo,
    outbox: SessionOutbox,
    inner: Arc<Inner>,
    /// Attached channels, with the producer identity publishes on them carry (none when the
    /// hello had no instance id: such a connection may subscribe but not publish).
    attached: HashMap<String, (Addr<HubChannel>, Option<Arc<ProducerKey>>)>,
}

impl ConnHandler {
    fn reject(
        error: TransportError,
        channel: &str,
        seq: Option<u64>,
        closes: bool,
    ) -> FrameRejection {
        FrameRejection {
            error,
            about: Some((channel.to_owned(), seq)),
            closes,
        }
    }

    fn overloaded(channel: &str, seq: Option<u64>) -> FrameRejection {
        Self::reject(
            refusal(
                ErrorCode::Overloaded,
                ErrorCategory::Service,
                false,
                "channel is overloaded; reconnect and retry".into(),
            ),
            channel,
            seq,
            true,
        )
    }
}

impl ConnHandler {
    /// Checks `count` publishes on `name` from `seq` on (payload `i` of `len(i)` bytes): the
    /// channel they go to and the producer they belong to, or why the first refused one is.
    fn check_publish(
        &self,
        name: &str,
        seq: u64,
        count: usize,
        len: impl Fn(usize) -> usize,
    ) -> Result<(Addr<HubChannel>, Arc<ProducerKey>), FrameRejection> {
        let Some((channel, producer)) = self.attached.get(name) else {
            let error = refusal(
                ErrorCode::NotAttached,
                ErrorCategory::Subscription,
                true,
                "attach before publishing".into(),
            );
            return Err(Self::reject(error, name, Some(seq), false));
        };
        let Some(producer) = producer.clone() else {
            let error = refusal(
                ErrorCode::UnexpectedFrame,
                ErrorCategory::Protocol,
                true,
                "publishing requires an instance id in the hello".into(),
            );
            return Err(Self::reject(error, name, Some(seq), false));
        };
        let last = seq.saturating_add(count.saturating_sub(1) as u64);
        if seq == 0 || last > MAX_SEQ {
            // Permanent for this publish: sequence numbers are 1 … 2^53 − 1 (exact in every
            // JSON implementation and in the Redis store's scripts).
            let bad = if seq == 0 { 0 } else { seq.max(MAX_SEQ + 1) };
            let error = refusal(
                ErrorCode::MalformedFrame,
                ErrorCategory::Protocol,
                true,
                format!("publish seq {bad} is outside 1 ..= {MAX_SEQ}"),
            );
            return Err(Self::reject(error, name, Some(bad), false));
        }
        if let Some(i) = (0..count).find(|&i| len(i) > self.inner.max_message_size) {
            // Permanent for this publish: resending the same bytes cannot succeed.
            let error = refusal(
                ErrorCode::FrameTooLarge,
                ErrorCategory::Protocol,
                true,
                format!(
                    "payload of {} bytes exceeds the hub's maximum of {}",
                    len(i),
                    self.inner.max_message_size
                ),
            );
            return Err(Self::reject(error, name, Some(seq + i as u64), false));
        }
        if self.outbox.in_flight() + count > self.inner.max_in_flight {
            let error = refusal(
                ErrorCode::RateLimited,
                ErrorCategory::Service,
                false,
                format!(
                    "more than {} publishes awaiting acks",
                    self.inner.max_in_flight
                ),
            );
            return Err(Self::reject(error, name, Some(seq), true));
        }
        Ok((channel.clone(), producer))
    }
}

impl ConnectionHandler for ConnHandler {
    fn on_frame(&mut self, frame: Frame) -> Result<(), FrameRejection> {
        match frame {
            Frame::Attach(attach) => {
                let name = attach.channel;
                if let Err(e) = validate_name(&name) {
                    let error = refusal(
                        ErrorCode::InvalidChannel,
                        ErrorCategory::Subscription,
                        true,
                        e.to_string(),
                    );
                    return Err(Self::reject(error, &name, None, false));
                }
                if !self.attached.contains_key(&name)
                    && self.attached.len() >= self.inner.max_channels_per_connection
                {
                    let error = refusal(
                        ErrorCode::TooManyChannels,
                        ErrorCategory::Subscription,
                        true,
                        format!(
                            "this connection has {} channels attached, the most allowed; detach one first",
                            self.attached.len()
                        ),
                    );
                    return Err(Self::reject(error, &name, None, false));
                }
                if let Some(producer) = &attach.producer {
                    if let Err(error) = check_identifier("producer", producer, MAX_ID_LEN, false) {
                        return Err(Self::reject(error, &name, None, false));
                    }
                }
                if let Err(reason) =
                    self.inner
                        .authorizer
                        .authorize(&self.conn, &name, attach.subscribe)
                {
                    let error = refusal(
                        ErrorCode::NotAuthorized,
                        ErrorCategory::Subscription,
                        true,
                        reason,
                    );
                    return Err(Self::reject(error, &name, None, false));
                }
                let subscribe = Subscribe {
                    conn_id: self.conn.conn_id,
                    outbox: self.outbox.clone(),
                    resume: attach.resume,
                    subscribe: attach.subscribe,
                };
                let channel =
                    self.inner
                        .attach(&name, subscribe)
                        .map_err(|refused| match refused {
                            AttachRefused::Limit(e) => Self::reject(e, &name, None, false),
                            AttachRefused::Full => Self::overloaded(&name, None),
                        })?;
                // Scoped by the identity: another identity presenting the same ids is another
                // producer (its publishes are never taken for replays of these).
                let producer = self.conn.instance.clone().map(|instance| {
                    Arc::new(ProducerKey {
                        identity: self.conn.identity.clone(),
                        client: self.conn.client_id.clone(),
                        instance,
                        producer: attach.producer.unwrap_or_default(),
                    })
                });
                self.attached.insert(name, (channel, producer));
                Ok(())
            }
            Frame::Detach(detach) => {
                match self.attached.remove(&detach.channel) {
                    Some((channel, _)) => channel.do_send(Unsubscribe {
                        conn_id: self.conn.conn_id,
                        reply: Some(self.outbox.clone()),
                    }),
                    None => {
                        // Detaching what is not attached is already done.
                        let wire = self.outbox.encode(&Frame::Detached(Detached {
                            channel: detach.channel,
                        }));
                        let _ = self.outbox.send(Outbound {
                            wire,
                            completes: None,
                        });
                    }
                }
                Ok(())
            }
            Frame::Publish(publish) => {
                let (channel, producer) =
                    self.check_publish(&publish.channel, publish.seq, 1, |_| {
                        publish.payload.len()
                    })?;
                let bytes = publish.payload.len();
                let command = PublishCommand {
                    producer,
                    seq: publish.seq,
                    payload: publish.payload,
                    reply: self.outbox.clone(),
                };
                channel
                    .try_send(command)
                    .map_err(|_| Self::overloaded(&publish.channel, Some(publish.seq)))?;
                self.outbox.publishes_started(1, bytes);
                Ok(())
            }
            other => Err(FrameRejection {
                error: TransportError::UnexpectedFrame {
                    expected: "attach, detach or publish",
                    got: other.kind().to_owned(),
                },
                about: None,
                closes: true,
            }),
        }
    }

    fn on_publish_run(&mut self, run: v2::PublishRun) -> Result<(), FrameRejection> {
        let n = run.payloads.len();
        let checked = self.check_publish(&run.channel, run.first_seq, n, |i| run.payloads[i].len());
        let Ok((channel, producer)) = checked else {
            // Some publish of the run is refused: each goes alone, for its own answer.
            for frame in v2::Record::Publish(run).into_frames() {
                self.on_frame(frame)?;
            }
            return Ok(());
        };
        let bytes = run.payloads.iter().map(|p| p.len()).sum();
        let first_seq = run.first_seq;
        let command = PublishRunCommand {
            producer,
            first_seq,
            payloads: run.payloads,
            reply: self.outbox.clone(),
        };
        channel
            .try_send(command)
            .map_err(|_| Self::overloaded(&run.channel, Some(first_seq)))?;
        self.outbox.publishes_started(n, bytes);
        Ok(())
    }

    fn wants_input(&self) -> bool {
        self.outbox.wants_input()
    }

    fn admin_channels(&self) -> LocalBoxFuture<'static, Vec<SessionChannel>> {
        let conn_id = self.conn.conn_id;
        let asks: Vec<_> = self
            .attached
            .iter()
            .map(|(name, (addr, _))| {
                let (name, addr) = (name.clone(), addr.clone());
                async move {
                    let answer = tokio::time::timeout(
                        INTROSPECT_TIMEOUT,
                        addr.send(DescribeMember { conn_id }),
                    )
                    .await;
                    match answer {
                        Ok(Ok(Some(facts))) => facts,
                        // Its actor did not answer: what this connection knows.
                        _ => SessionChannel {
                            channel: name,
                            subscribed: false,
                            live: false,
                            epoch: None,
                            offset: None,
                            behind: None,
                        },
                    }
                }
            })
            .collect();
        Box::pin(async move {
            let mut channels = futures::future::join_all(asks).await;
            channels.sort_by(|a, b| a.channel.cmp(&b.channel));
            channels
        })
    }

    fn publishes_in_flight(&self) -> usize {
        self.outbox.in_flight()
    }

    fn on_close(&mut self) {
        for (_, (channel, _)) in self.attached.drain() {
            channel.do_send(Unsubscribe {
                conn_id: self.conn.conn_id,
                reply: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_transport::hub::Kick;
    use tether_transport::protocol::{
        Attach, Attached, ClientId, Detach, Epoch, InstanceId, Offset, Payload, Position, Publish,
        SessionId,
    };
    use tokio::sync::mpsc;

    const T: Duration = Duration::from_secs(5);

    /// Stands in for a hub session's mailbox: kicks fail the test.
    struct Sink;

    impl Actor for Sink {
        type Context = Context<Self>;
    }

    impl Handler<Kick> for Sink {
        type Result = ();
        fn handle(&mut self, kick: Kick, _: &mut Context<Self>) {
            panic!("connection kicked: {}", kick.0);
        }
    }

    /// Splits the unmasked WebSocket frames a hub writes into their payloads (text frames
    /// only: what the channels send a v1 connection).
    fn split_frames(buf: &mut bytes::BytesMut) -> Vec<bytes::Bytes> {
        let mut out = Vec::new();
        loop {
            if buf.len() < 2 {
                return out;
            }
            let (len, header) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                127 if buf.len() >= 10 => {
                    let mut n = [0; 8];
                    n.copy_from_slice(&buf[2..10]);
                    (u64::from_be_bytes(n) as usize, 10)
                }
                126 | 127 => return out,
                n => (usize::from(n), 2),
            };
            if buf.len() < header + len {
                return out;
            }
            let frame = buf.split_to(header + len).freeze();
            out.push(frame.slice(header..));
        }
    }

    /// One connection's channel handler, and what the channels sent it.
    struct Peer {
        handler: Box<dyn ConnectionHandler>,
        frames: mpsc::UnboundedReceiver<Frame>,
    }

    impl Peer {
        fn open(service: &ChannelService, conn_id: u64) -> Peer {
            let (tx, frames) = mpsc::unbounded_channel();
            let budget = std::sync::Arc::new(tether_transport::hub::OutboundBudget::new(1 << 30));
            let (pipe, body) = tether_transport::hub::wire::OutboundPipe::new(budget.clone());
            // The connection's writer, into an in-memory socket whose other end decodes every
            // frame the channels send.
            let (socket, mut peer) = tokio::io::duplex(1 << 20);
            actix_rt::spawn(tether_transport::hub::wire::Writer::new(body, socket));
            actix_rt::spawn(async move {
                use tokio::io::AsyncReadExt as _;
                let mut buf = bytes::BytesMut::new();
                while peer.read_buf(&mut buf).await.is_ok_and(|n| n > 0) {
                    for text in split_frames(&mut buf) {
                        let _ = tx.send(Frame::decode_shared(&text, usize::MAX).unwrap());
                    }
                }
            });
            let outbox = SessionOutbox::new(
                conn_id,
                1,
                pipe,
                Sink.start().recipient(),
                budget,
                Default::default(),
            );
            let conn = ConnInfo {
                conn_id,
                identity: tether_transport::hub::Identity::new("tester").unwrap(),
                client_id: ClientId(format!("client-{conn_id}")),
                instance: Some(InstanceId("i".into())),
                session: SessionId(format!("s-{conn_id}")),
            };
            Peer {
                handler: service.open(conn, outbox),
                frames,
            }
        }

        fn attach(&mut self, channel: &str, subscribe: bool, resume: Option<Position>) {
            self.handler
                .on_frame(Frame::Attach(Attach {
                    channel: channel.into(),
                    subscribe,
                    resume,
                    producer: None,
                }))
                .unwrap();
        }

        fn publish(&mut self, channel: &str, seq: u64) {
            self.handler
                .on_frame(Frame::Publish(Publish {
                    channel: channel.into(),
                    seq,
                    payload: Payload::from_value(&seq).unwrap(),
                }))
                .unwrap();
        }

        fn detach(&mut self, channel: &str) {
            self.handler
                .on_frame(Frame::Detach(Detach {
                    channel: channel.into(),
                }))
                .unwrap();
        }

        async fn next(&mut self) -> Frame {
            tokio::time::timeout(T, self.frames.recv())
                .await
                .expect("a frame in time")
                .expect("sink alive")
        }

        async fn attached(&mut self) -> Attached {
            match self.next().await {
                Frame::Attached(a) => a,
                other => panic!("expected attached, got {other:?}"),
            }
        }

        /// The ack of `seq` (and, when subscribed, its message, in either order).
        async fn acked(&mut self, seq: u64, subscribed: bool) -> (Epoch, Offset) {
            let (mut ack, mut message) = (None, !subscribed);
            while ack.is_none() || !message {
                match self.next().await {
                    Frame::Ack(a) if a.seq == seq => {
                        ack = Some((a.epoch.unwrap(), a.offset.unwrap()))
                    }
                    Frame::Message(m) => message = m.payload.decode::<u64>().unwrap() == seq,
                    other => panic!("expected the ack of {seq}, got {other:?}"),
                }
            }
            ack.unwrap()
        }

        async fn detached(&mut self) {
            match self.next().await {
                Frame::Detached(_) => {}
                other => panic!("expected detached, got {other:?}"),
            }
        }
    }

    /// A service running its channels on the test's own thread (so the paused clock drives
    /// them), over `store`.
    fn service(store: Arc<MemoryHistory>, ttl: Duration) -> ChannelService {
        ChannelService::builder()
            .store(store)
            .threads(0)
            .idle_ttl(ttl)
            .build()
            .unwrap()
    }

    async fn wait_for_count(service: &ChannelService, n: usize) {
        let mut count = service.watch_channels();
        tokio::time::timeout(T, count.wait_for(|c| *c == n))
            .await
            .unwrap_or_else(|_| panic!("{} channels, expected {n}", service.channel_count()))
            .unwrap();
    }

    /// Lets every actor run what is ready, without moving the clock.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[actix_rt::test]
    async fn an_unused_channel_expires_after_its_ttl_and_comes_back_in_a_new_epoch() {
        tokio::time::pause();
        let store = Arc::new(MemoryHistory::default());
        let ttl = Duration::from_secs(60);
        let service = service(store.clone(), ttl);
        let mut peer = Peer::open(&service, 1);
        peer.attach("room", true, None);
        let first = peer.attached().await;
        peer.publish("room", 1);
        let (epoch, offset) = peer.acked(1, true).await;
        assert_eq!((epoch.clone(), offset), (first.epoch.clone(), Offset(1)));
        peer.detach("room");
        peer.detached().await;
        assert_eq!(service.channel_count(), 1);

        tokio::time::advance(ttl - Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(service.channel_count(), 1, "not before its TTL");
        assert_eq!(store.channel_count(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        wait_for_count(&service, 0).await;
        assert_eq!(store.channel_count(), 0, "its history went with it");

        // A subscriber resuming from where it was is told of the gap into the new epoch.
        peer.attach(
            "room",
            true,
            Some(Position {
                epoch: epoch.clone(),
                offset: Offset(1),
            }),
        );
        let again = peer.attached().await;
        assert_ne!(again.epoch, epoch);
        assert!(!again.resumed);
        let gap = again.gap.expect("a gap into the new epoch");
        assert_eq!(gap.from.epoch, epoch);
        assert_eq!(gap.from.offset, Offset(2));
        assert_eq!(gap.to.epoch, again.epoch);
        assert_eq!(service.channel_count(), 1);
    }

    #[actix_rt::test]
    async fn a_channel_with_any_connection_attached_never_expires() {
        tokio::time::pause();
        let store = Arc::new(MemoryHistory::default());
        let ttl = Duration::from_secs(1);
        let service = service(store, ttl);
        // Publish-only: not a subscriber, but attached all the same.
        let mut publisher = Peer::open(&service, 1);
        publisher.attach("room", false, None);
        let attached = publisher.attached().await;
        // A subscriber comes and goes meanwhile.
        let mut subscriber = Peer::open(&service, 2);
        subscriber.attach("room", true, None);
        subscriber.attached().await;
        subscriber.detach("room");
        subscriber.detached().await;
        for seq in 1..=5 {
            tokio::time::advance(ttl * 3).await;
            settle().await;
            publisher.publish("room", seq);
            let (epoch, offset) = publisher.acked(seq, false).await;
            assert_eq!((epoch, offset), (attached.epoch.clone(), Offset(seq)));
        }
        assert_eq!(service.channel_count(), 1);
        // Its connection closes: now the TTL runs.
        publisher.handler.on_close();
        tokio::time::advance(ttl).await;
        wait_for_count(&service, 0).await;
    }

    #[actix_rt::test]
    async fn an_attach_at_the_moment_of_expiry_reaches_a_live_channel() {
        tokio::time::pause();
        let store = Arc::new(MemoryHistory::default());
        let ttl = Duration::from_millis(100);
        let service = service(store, ttl);
        let mut peer = Peer::open(&service, 1);
        let mut seq = 0;
        // Around the deadline, in steps finer than the timer's resolution.
        for step in 0..40u64 {
            peer.attach("room", true, None);
            peer.attached().await;
            seq += 1;
            peer.publish("room", seq);
            peer.acked(seq, true).await;
            peer.detach("room");
            peer.detached().await;
            tokio::time::advance(
                ttl - Duration::from_millis(4) + Duration::from_micros(step * 200),
            )
            .await;
            // Attach and publish in the same instant the channel may be retiring.
            peer.attach("room", true, None);
            seq += 1;
            peer.publish("room", seq);
            peer.attached().await;
            peer.acked(seq, true).await;
            peer.detach("room");
            peer.detached().await;
            assert!(service.channel_count() <= 1);
        }
        tokio::time::advance(ttl).await;
        wait_for_count(&service, 0).await;
    }

    #[actix_rt::test]
    async fn a_channel_retires_only_when_no_attach_is_on_its_way() {
        let store = Arc::new(MemoryHistory::default());
        store.append_now(
            "room",
            vec![super::super::history::AppendRequest {
                producer: ProducerKey {
                    identity: tether_transport::hub::Identity::new("tester").unwrap(),
                    client: ClientId("c".into()),
                    instance: InstanceId("i".into()),
                    producer: String::new(),
                }
                .into(),
                seq: 1,
                payload: Payload::from_value(&1).unwrap(),
            }],
            tokio::time::Instant::now(),
        );
        let registry = Arc::new(Registry {
            channels: Mutex::new(HashMap::new()),
            count: tokio::sync::watch::Sender::new(0),
            next_id: AtomicU64::new(1),
            store: store.clone(),
        });
        // An actor that never runs: only its address matters here.
        let (tx, _rx) = actix::dev::channel::channel::<HubChannel>(1);
        let attaching = Arc::new(AtomicUsize::new(1));
        registry.lock().insert(
            "room".into(),
            Entry {
                addr: Addr::new(tx),
                id: 7,
                attaching: attaching.clone(),
            },
        );
        assert_eq!(registry.retire("room", 7), Retirement::AttachOnItsWay);
        assert_eq!(
            store.channel_count(),
            1,
            "kept while an attach is on its way"
        );
        assert_eq!(registry.retire("room", 6), Retirement::NotRegistered);
        assert_eq!(
            registry.lock().len(),
            1,
            "another actor's entry is not touched"
        );
        attaching.store(0, Ordering::Release);
        assert_eq!(registry.retire("room", 7), Retirement::Retired);
        assert!(registry.lock().is_empty());
        assert_eq!(store.channel_count(), 0, "the store was told");
        assert_eq!(*registry.count.borrow(), 0);
        assert_eq!(registry.retire("room", 7), Retirement::NotRegistered);
    }

    #[test]
    fn the_idle_ttl_is_validated() {
        let system = actix::System::new();
        system.block_on(async {
            let err = ChannelService::builder()
                .idle_ttl(Duration::ZERO)
                .threads(0)
                .build()
                .unwrap_err();
            assert!(matches!(
                err,
                TransportError::InvalidConfig {
                    field: "idle_ttl",
                    ..
                }
            ));
            assert!(ChannelService::builder()
                .idle_ttl(Duration::from_millis(1))
                .threads(0)
                .build()
                .is_ok());
        });
    }

    /// The in-memory store, except that the first append on channel `hot` holds the channel's
    /// thread until the test lets it go (a thread that was busy while a burst arrived).
    struct HeldStore {
        inner: MemoryHistory,
        hold: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl HistoryStore for HeldStore {
        fn append(
            &self,
            channel: &str,
            seen: Option<Position>,
            fence: super::super::history::Fence,
            batch: Vec<super::super::history::AppendRequest>,
        ) -> futures::future::BoxFuture<
            'static,
            Result<super::super::history::Appended, crate::ChannelError>,
        > {
            if channel == "hot" {
                let held = self.hold.lock().unwrap().take();
                if let Some(release) = held {
                    let _ = release.recv();
                }
            }
            self.inner.append(channel, seen, fence, batch)
        }

        fn read(
            &self,
            channel: &str,
            seen: Option<Position>,
            after: Offset,
            limit: PageLimit,
        ) -> futures::future::BoxFuture<
            'static,
            Result<super::super::history::Page, crate::ChannelError>,
        > {
            self.inner.read(channel, seen, after, limit)
        }

        fn watch(&self, channel: &str, sink: super::super::history::NoticeSink) {
            self.inner.watch(channel, sink)
        }

        fn unwatch(&self, channel: &str) {
            self.inner.unwatch(channel)
        }

        fn health(&self) -> super::super::history::StoreHealth {
            self.inner.health()
        }
    }

    #[actix_rt::test]
    async fn a_flooded_channel_yields_its_thread_to_the_other_channels_there() {
        let (release, hold) = std::sync::mpsc::channel();
        let store = Arc::new(HeldStore {
            inner: MemoryHistory::default(),
            hold: Mutex::new(Some(hold)),
        });
        // One thread for every channel: the flooded one shares it with the healthy one.
        let service = ChannelService::builder()
            .store(store)
            .threads(1)
            .build()
            .unwrap();
        let mut healthy = Peer::open(&service, 1);
        healthy.attach("steady", true, None);
        healthy.attached().await;
        let mut flood = Peer::open(&service, 2);
        flood.attach("hot", false, None);
        flood.attached().await;
        // The first publish holds the thread; the burst queues behind it, and so does the
        // healthy channel's next publish.
        const BURST: u64 = 60_000;
        for seq in 1..=BURST {
            flood.publish("hot", seq);
        }
        healthy.publish("steady", 1);
        let released = std::time::Instant::now();
        release.send(()).unwrap();
        healthy.acked(1, true).await;
        let waited = released.elapsed();
        // The flood is served all the same, in order.
        for seq in 1..=BURST {
            match flood.next().await {
                Frame::Ack(ack) => assert_eq!(ack.seq, seq),
                other => panic!("expected the ack of {seq}, got {other:?}"),
            }
        }
        let flood_took = released.elapsed();
        assert!(
            waited < Duration::from_millis(100),
            "the healthy channel waited {waited:?} behind a burst the flooded one took \
             {flood_took:?} to serve"
        );
    }
}
