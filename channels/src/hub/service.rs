//! The hub's channel service: the [`SessionHandler`] that plugs channels into a hub, the
//! registry of [`HubChannel`] actors, and per-channel authorization.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tether_transport::hub::{
    ConnInfo, ConnectionHandler, FrameRejection, HandlerHealth, Outbound, SessionHandler,
    SessionOutbox,
};
use tether_transport::protocol::{check_identifier, Detached, ErrorCode, Frame, MAX_ID_LEN};
use tether_transport::{ErrorCategory, TransportError};

use super::history::{DedupeLimits, HistoryStore, MemoryHistory, PageLimit, Retention};
use super::hub_channel::{HubChannel, PublishCommand, Subscribe, Unsubscribe};
use super::log::{ProducerKey, DEFAULT_DEDUPE_WINDOW, DEFAULT_MAX_PRODUCERS, DEFAULT_PRODUCER_TTL};
use crate::error::validate_name;

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

    /// Dedicated threads that run channel actors. Default 1. 0 runs each channel on the hub
    /// worker that first attached it (fewer thread hops), but then a channel — and its
    /// in-memory history — ends with that worker when the server stops.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
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
                channels: Mutex::new(HashMap::new()),
                arbiters,
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

struct Inner {
    channels: Mutex<HashMap<String, Addr<HubChannel>>>,
    arbiters: Vec<Arbiter>,
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
    fn channel(&self, name: &str) -> Result<Addr<HubChannel>, TransportError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(addr) = channels.get(name) {
            if addr.connected() {
                return Ok(addr.clone());
            }
        }
        if channels.len() >= self.max_channels && !channels.contains_key(name) {
            return Err(refusal(
                ErrorCode::Overloaded,
                ErrorCategory::Service,
                false,
                format!(
                    "the hub holds its maximum of {} channels",
                    self.max_channels
                ),
            ));
        }
        // With no dedicated threads, a channel lives on the worker of the connection that
        // created it: for a single-worker hub every hop stays on one thread.
        let arbiter = if self.arbiters.is_empty() {
            Arbiter::current()
        } else {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            name.hash(&mut hasher);
            self.arbiters[(hasher.finish() as usize) % self.arbiters.len()].handle()
        };
        // The mailbox exists, with its full capacity, before the actor runs: commands sent to
        // a channel that is still starting (an attach and a burst of publishes in one write)
        // queue instead of finding the default 16-slot mailbox full.
        let (tx, rx) = actix::dev::channel::channel::<HubChannel>(self.channel_mailbox);
        let addr = Addr::new(tx);
        let (store, page, owned) = (self.store.clone(), self.page, name.to_owned());
        let max_pending = self.channel_mailbox;
        arbiter.spawn_fn(move || {
            Context::with_receiver(rx).run(HubChannel::new(owned, store, page, max_pending));
        });
        channels.insert(name.to_owned(), addr.clone());
        Ok(addr)
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
            threads: 1,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// Number of channels that exist on the hub.
    pub fn channel_count(&self) -> usize {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
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

    fn open(&self, conn: ConnInfo, outbox: SessionOutbox) -> Box<dyn ConnectionHandler> {
        Box::new(ConnHandler {
            conn,
            outbox,
            inner: self.inner.clone(),
            attached: HashMap::new(),
            in_flight: 0,
            in_flight_bytes: 0,
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
    attached: HashMap<String, (Addr<HubChannel>, Option<ProducerKey>)>,
    in_flight: usize,
    /// Payload bytes of the publishes awaiting their acks.
    in_flight_bytes: usize,
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
                let channel = self
                    .inner
                    .channel(&name)
                    .map_err(|e| Self::reject(e, &name, None, false))?;
                let subscribe = Subscribe {
                    conn_id: self.conn.conn_id,
                    outbox: self.outbox.clone(),
                    resume: attach.resume,
                    subscribe: attach.subscribe,
                };
                channel
                    .try_send(subscribe)
                    .map_err(|_| Self::overloaded(&name, None))?;
                // Scoped by the identity: another identity presenting the same ids is another
                // producer (its publishes are never taken for replays of these).
                let producer = self.conn.instance.clone().map(|instance| ProducerKey {
                    identity: self.conn.identity.clone(),
                    client: self.conn.client_id.clone(),
                    instance,
                    producer: attach.producer.unwrap_or_default(),
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
                        let text = Frame::Detached(Detached {
                            channel: detach.channel,
                        })
                        .encode();
                        let _ = self.outbox.send(Outbound {
                            text: text.into(),
                            completes_publish: None,
                        });
                    }
                }
                Ok(())
            }
            Frame::Publish(publish) => {
                let name = publish.channel;
                let seq = publish.seq;
                let Some((channel, producer)) = self.attached.get(&name) else {
                    let error = refusal(
                        ErrorCode::NotAttached,
                        ErrorCategory::Subscription,
                        true,
                        "attach before publishing".into(),
                    );
                    return Err(Self::reject(error, &name, Some(seq), false));
                };
                let Some(producer) = producer.clone() else {
                    let error = refusal(
                        ErrorCode::UnexpectedFrame,
                        ErrorCategory::Protocol,
                        true,
                        "publishing requires an instance id in the hello".into(),
                    );
                    return Err(Self::reject(error, &name, Some(seq), false));
                };
                if seq == 0 || seq > MAX_SEQ {
                    // Permanent for this publish: sequence numbers are 1 … 2^53 − 1 (exact in
                    // every JSON implementation and in the Redis store's scripts).
                    let error = refusal(
                        ErrorCode::MalformedFrame,
                        ErrorCategory::Protocol,
                        true,
                        format!("publish seq {seq} is outside 1 ..= {MAX_SEQ}"),
                    );
                    return Err(Self::reject(error, &name, Some(seq), false));
                }
                if publish.payload.len() > self.inner.max_message_size {
                    // Permanent for this publish: resending the same bytes cannot succeed.
                    let error = refusal(
                        ErrorCode::FrameTooLarge,
                        ErrorCategory::Protocol,
                        true,
                        format!(
                            "payload of {} bytes exceeds the hub's maximum of {}",
                            publish.payload.len(),
                            self.inner.max_message_size
                        ),
                    );
                    return Err(Self::reject(error, &name, Some(seq), false));
                }
                if self.in_flight >= self.inner.max_in_flight {
                    let error = refusal(
                        ErrorCode::RateLimited,
                        ErrorCategory::Service,
                        false,
                        format!(
                            "more than {} publishes awaiting acks",
                            self.inner.max_in_flight
                        ),
                    );
                    return Err(Self::reject(error, &name, Some(seq), true));
                }
                let bytes = publish.payload.len();
                let command = PublishCommand {
                    producer,
                    seq,
                    payload: publish.payload,
                    reply: self.outbox.clone(),
                };
                channel
                    .try_send(command)
                    .map_err(|_| Self::overloaded(&name, Some(seq)))?;
                self.in_flight += 1;
                self.in_flight_bytes += bytes;
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

    fn on_outbound(&mut self, out: &Outbound) {
        if let Some(bytes) = out.completes_publish {
            self.in_flight = self.in_flight.saturating_sub(1);
            self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
        }
    }

    fn wants_input(&self) -> bool {
        self.in_flight_bytes < self.inner.max_in_flight_bytes
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
