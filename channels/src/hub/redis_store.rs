//! Channel history in Redis Streams, shared by any number of hub nodes. Redis 7.0 commands
//! only.
//!
//! Per channel (keys start with the configured prefix, default `tether`, and carry the
//! channel name length-prefixed so no two channels' keys can collide):
//!
//! | key | type | what |
//! |---|---|---|
//! | `{prefix}:{len}:{channel}:s` | stream | the messages, one entry per append batch: id `{first offset}-0`, fields `t` (Redis time, ms), `c` (messages in it), then `m` (a payload) per message, offsets `first … first + c − 1` |
//! | `{prefix}:{len}:{channel}:i` | list | one `"{first} {count} {bytes} {time}"` per entry, oldest first: what trimming needs without reading payloads |
//! | `{prefix}:{len}:{channel}:m` | hash | `epoch`, `head` (last offset), `first` (oldest retained), `count` and `bytes` retained |
//! | `{prefix}:{len}:{channel}:p:{producer}` | hash | dedupe state of one producer: `h` (highest seq), `e` (epoch), and `{seq}` → offset for the last `window` seqs; expires after the producer TTL. `{producer}` is the identity, client id, instance and handle, each as `{byte length}:{bytes}` (e.g. `5:alice3:c-12:i10:`), so no identity or id can forge another producer's key |
//! | `{prefix}:{len}:{channel}:f:{token}` | string | the last append number of one writer's pipelined appends ([`Fence`]); expires after 10 minutes |
//! | `{prefix}:n:{channel}` | pub/sub channel | `{epoch} {head}` after every append that stored something |
//! | `{prefix}:admin:nodes` | hash | the hub nodes using this store, for the admin API: node id → `"{expires, Unix ms} {proof} {admin URL}"` (an HMAC under the admin token), renewed every 5 s |
//!
//! **Nothing is kept for ever.** The stream, index and meta keys of a channel expire together,
//! the key TTL after the channel was last appended to or read (attaches, resumes, catch-ups and
//! fan-out reads all count; default: the retention's maximum age, 24 h;
//! [`RedisStoreBuilder::key_ttl`]). A channel nobody uses thus leaves Redis, and an attach to a
//! channel that was never used creates only a meta hash that expires like the rest. When the
//! keys of a channel expire its epoch goes with them: a client that resumes later gets a gap
//! into a new epoch. Keep the key TTL longer than any absence clients should resume across
//! (and at least the retention's age, or quiet channels lose history sooner than it says).
//!
//! Both operations are Lua scripts, so each is one atomic step on the Redis server:
//!
//! * **append**: checks the writer's fence; takes (or creates) the channel's epoch; for each
//!   publish, checks the producer's highest seq, and either answers "duplicate" (with the
//!   original offset while remembered) or numbers it `head + 1`; stores the new ones as one
//!   stream entry; trims; notifies. A batch of any size costs one round trip and one `XADD`.
//! * **read**: the channel's epoch, head and first retained offset, trims by age, and one page
//!   of messages after an offset (bounded by count and bytes).
//!
//! The **epoch** is created with the channel's meta hash and changes only when the channel's
//! data is lost: when the hash is gone (a Redis that restarted without persistence, a flushed
//! database), or when a node presents a position (`seen`) in the current epoch beyond the
//! stored head (a replica promoted behind its master, an AOF that lost its last second): the
//! offsets subscribers saw would otherwise be reused, a silent gap. Either way the stream is
//! dropped and numbering starts again at 1 in a new epoch, which every subscriber is told of
//! as a `Discontinuity`.
//!
//! Retention maps onto `XTRIM MINID` (ids are offsets, so count, age and bytes all come down
//! to "drop everything below this offset"), a whole batch at a time: a batch goes when it is
//! older than the age limit, when the channel keeps at least the count limit without it, or
//! while the bytes are over the byte limit. So a channel may keep up to one batch more than
//! its message count (never more bytes than its byte limit).
//!
//! Fan-out across nodes: every node `SUBSCRIBE`s to the notification channels of the channels
//! it has subscribers on (no polling); a notification wakes the node's channel actor, which
//! reads what it has not fanned out yet. When the subscription connection is re-established,
//! every watched channel is told to read its position again ([`StoreNotice::Resync`]), so a
//! notification lost with the connection costs latency, never a message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::Value;
use tether_transport::protocol::{Epoch, Offset, Payload, Position};
use tokio::sync::mpsc;

use super::history::{
    AppendOutcome, AppendRequest, Appended, Fence, HistoryStore, NoticeSink, Page, PageLimit,
    Retention, StoreHealth, StoreNotice, StoredMessage,
};
use super::log::{ProducerKey, DEFAULT_DEDUPE_WINDOW, DEFAULT_PRODUCER_TTL};
use crate::error::ChannelError;

/// Default key prefix: `tether`.
pub const DEFAULT_PREFIX: &str = "tether";
/// Default time Redis has to answer one command before the store reports it unavailable: 2 s.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time to establish a connection to Redis: 1 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default interval of the health probe (`PING`) and of re-establishing the notification link:
/// 500 ms.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(500);

const PRELUDE: &str = r#"
local stream, meta, index = KEYS[1], KEYS[2], KEYS[3]
local function offset_of(id) return tonumber(string.match(id, '^(%d+)')) end
-- The channel's epoch, head, retained bytes and count, and first retained offset; a new epoch
-- (and an empty channel) when the channel is missing or behind what the caller has seen.
local function ensure(candidate, seen_epoch, seen_head)
  local m = redis.call('HMGET', meta, 'epoch', 'head', 'bytes', 'count', 'first')
  local epoch = m[1]
  local head, bytes = tonumber(m[2] or '0'), tonumber(m[3] or '0')
  local count, first = tonumber(m[4] or '0'), tonumber(m[5] or '1')
  if (not epoch) or (epoch == seen_epoch and head < seen_head) then
    epoch, head, bytes, count, first = candidate, 0, 0, 0, 1
    redis.call('DEL', stream, index)
    redis.call('HSET', meta, 'epoch', epoch, 'head', '0', 'bytes', '0', 'count', '0', 'first', '1')
  end
  return epoch, head, bytes, count, first
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The channel's keys expire together, `ttl` ms after this use (one absolute deadline, so none
-- outlives the others).
local function keep(now, ttl)
  local at = string.format('%d', now + ttl)
  redis.call('PEXPIREAT', stream, at)
  redis.call('PEXPIREAT', meta, at)
  redis.call('PEXPIREAT', index, at)
end
-- Drops whole batches, oldest first, while one is too old, or the count stays at or above the
-- limit without it, or the bytes are over the limit. Returns bytes, count, first.
local function trim(now, maxn, maxage, maxb, head, bytes, count, first)
  local cutoff = now - maxage
  local dropped = false
  while true do
    local oldest = redis.call('LINDEX', index, 0)
    if not oldest then
      first = head + 1
      break
    end
    local f, c, b, t = string.match(oldest, '^(%d+) (%d+) (%d+) (%d+)$')
    f, c, b, t = tonumber(f), tonumber(c), tonumber(b), tonumber(t)
    if t < cutoff or count - c >= maxn or bytes > maxb then
      redis.call('LPOP', index)
      count, bytes, first, dropped = count - c, bytes - b, f + c, true
    else
      first = f
      break
    end
  end
  if dropped then
    redis.call('XTRIM', stream, 'MINID', string.format('%d-0', first))
  end
  return bytes, count, first
end
"#;

const APPEND: &str = r#"
-- ARGV: candidate epoch, seen epoch, seen head, max messages, max age ms, max bytes,
--       dedupe window, producer ttl ms, notify channel, fence ("<after> <number>"), key ttl ms, then
--       (seq, payload) per publish; KEYS[4]: the fence key; KEYS[4 + i]: the producer key of
--       publish i.
-- The fence first: this append applies only if the writer's previous one did.
local fence_key = KEYS[4]
local after, fence = string.match(ARGV[10], '^(%d+) (%d+)$')
if after ~= '0' and redis.call('GET', fence_key) ~= after then
  return redis.error_reply('TETHER_FENCE the previous append of this writer did not apply')
end
redis.call('SET', fence_key, fence, 'PX', 600000)
local epoch, head, bytes, count, first = ensure(ARGV[1], ARGV[2], tonumber(ARGV[3]))
local now = now_ms()
local window, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
-- Each producer's dedupe hash is read once and written once per batch; the stored messages
-- become one stream entry (id: the first offset; fields t, c, then m per message).
local out = {}
local producers = {}
local order = {}
local entry = {}
local batch_first, stored, size = head + 1, 0, 0
local n = (#ARGV - 11) / 2
for i = 1, n do
  local pkey = KEYS[4 + i]
  local st = producers[pkey]
  if not st then
    local p = redis.call('HMGET', pkey, 'h', 'e')
    st = { h = tonumber(p[1] or '0'), same = (p[2] == epoch), fields = {}, dels = {}, new = {} }
    producers[pkey] = st
    order[#order + 1] = pkey
  end
  local seq_text = ARGV[10 + 2 * i]
  local seq = tonumber(seq_text)
  if seq <= st.h then
    local off = st.new[seq]
    if not off and st.same then
      off = redis.call('HGET', pkey, seq_text)
      off = off and tonumber(off)
    end
    out[2 * i - 1] = 0
    out[2 * i] = off or -1
  else
    local payload = ARGV[11 + 2 * i]
    head = head + 1
    stored = stored + 1
    size = size + #payload
    entry[2 * stored - 1] = 'm'
    entry[2 * stored] = payload
    st.h = seq
    st.new[seq] = head
    local f = st.fields
    f[#f + 1] = seq_text
    -- Offsets stay far below 1e14, where Lua prints numbers exactly.
    f[#f + 1] = tostring(head)
    if seq > window then st.dels[#st.dels + 1] = string.format('%d', seq - window) end
    out[2 * i - 1] = 1
    out[2 * i] = head
  end
end
if stored > 0 then
  redis.call('XADD', stream, string.format('%d-0', batch_first), 't', now, 'c', stored, unpack(entry))
  redis.call('RPUSH', index, string.format('%d %d %d %d', batch_first, stored, size, now))
  if count == 0 then first = batch_first end
  count, bytes = count + stored, bytes + size
end
for _, pkey in ipairs(order) do
  local st = producers[pkey]
  if #st.fields > 0 then
    redis.call('HSET', pkey, 'h', st.fields[#st.fields - 1], 'e', epoch, unpack(st.fields))
    if #st.dels > 0 then redis.call('HDEL', pkey, unpack(st.dels)) end
    redis.call('PEXPIRE', pkey, ttl)
  end
end
bytes, count, first = trim(now, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]),
  head, bytes, count, first)
redis.call('HSET', meta, 'head', tostring(head), 'bytes', tostring(bytes),
  'count', tostring(count), 'first', tostring(first))
keep(now, tonumber(ARGV[11]))
if stored > 0 then
  redis.call('PUBLISH', ARGV[9], epoch .. ' ' .. tostring(head))
end
return {epoch, head, out}
"#;

const READ: &str = r#"
-- ARGV: candidate epoch, seen epoch, seen head, max messages, max age ms, max bytes,
--       after, page count, page bytes, key ttl ms.
local epoch, head, bytes, count, first = ensure(ARGV[1], ARGV[2], tonumber(ARGV[3]))
local now = now_ms()
local b2, c2, f2 = trim(now, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]),
  head, bytes, count, first)
if c2 ~= count or f2 ~= first then
  redis.call('HSET', meta, 'bytes', tostring(b2), 'count', tostring(c2), 'first', tostring(f2))
end
keep(now, tonumber(ARGV[10]))
first = f2
local msgs = {}
local want = tonumber(ARGV[8])
local from = math.max(tonumber(ARGV[7]) + 1, first)
if want > 0 and from <= head then
  -- The batch holding `from`, then on.
  local start = redis.call('XREVRANGE', stream, string.format('%d-0', from), '-', 'COUNT', 1)
  local cursor = '-'
  if #start > 0 then cursor = start[1][1] end
  local total, limit = 0, tonumber(ARGV[9])
  local done = false
  -- Entries are whole append batches (up to 512 messages or 1 MiB each): take as many at a
  -- time as the page still has room for, judging by the last one, so that one page never
  -- pulls batches it will not use into the script (Redis serves nobody else meanwhile).
  local step = 1
  while not done do
    local entries = redis.call('XRANGE', stream, cursor, '+', 'COUNT', step)
    if #entries == 0 then break end
    local last_count, last_bytes = 1, 1
    for _, e in ipairs(entries) do
      local base, f = offset_of(e[1]), e[2]
      last_count, last_bytes = tonumber(f[4]), 0
      for k = 1, last_count do
        local off = base + k - 1
        local p = f[4 + 2 * k]
        last_bytes = last_bytes + #p
        if off >= from and not done then
          if #msgs > 0 and total + #p > limit then
            done = true
          else
            total = total + #p
            msgs[#msgs + 1] = off
            msgs[#msgs + 1] = p
            if #msgs >= 2 * want then done = true end
          end
        end
      end
      if done then break end
    end
    cursor = '(' .. entries[#entries][1]
    local by_count = math.floor((want - #msgs / 2) / math.max(1, last_count))
    local by_bytes = math.floor((limit - total) / math.max(1, last_bytes))
    step = math.max(1, math.min(16, by_count, by_bytes))
  end
end
return {epoch, head, first, msgs}
"#;

/// Builder for a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    retention: Retention,
    dedupe_window: usize,
    producer_ttl: Duration,
    key_ttl: Option<Duration>,
    response_timeout: Duration,
    connect_timeout: Duration,
    probe_interval: Duration,
}

impl RedisStoreBuilder {
    /// Key prefix, so several deployments can share one Redis. Default `tether`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// History kept per channel. Default 1000 messages / 24 h / 64 MiB of payloads.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Recent `(seq, offset)` pairs kept per producer, to re-ack replays with their original
    /// offset. Default 1024.
    pub fn dedupe_window(mut self, n: usize) -> Self {
        self.dedupe_window = n;
        self
    }

    /// How long a silent producer's dedupe state is kept (a Redis key TTL). Default 24 h.
    pub fn producer_ttl(mut self, ttl: Duration) -> Self {
        self.producer_ttl = ttl;
        self
    }

    /// How long a channel's keys (stream, index, meta) stay in Redis after the channel was last
    /// appended to or read. Default: the retention's maximum age (24 h unless
    /// [`Self::retention`] says otherwise); at least 1 ms.
    ///
    /// Expired keys take the channel's epoch with them: a client that resumes after them gets
    /// a gap into a new epoch (a `Discontinuity`). Keep it longer than any absence clients
    /// should resume across, and at least the retention's age (or a quiet channel's history
    /// goes sooner than the retention says). Independent of a hub's idle TTL
    /// ([`ChannelServiceBuilder::idle_ttl`](super::service::ChannelServiceBuilder::idle_ttl)),
    /// which only stops that node's actor.
    pub fn key_ttl(mut self, ttl: Duration) -> Self {
        self.key_ttl = Some(ttl);
        self
    }

    /// Time Redis has to answer one command. Default 2 s.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Time to establish a connection. Default 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Interval of the health probe and of notification-link reconnects. Default 500 ms.
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// Validates the settings and starts the store's background tasks (health probe,
    /// notification link). Call inside a Tokio runtime (an actix system is one). Redis need
    /// not be up yet: the store connects lazily and reports itself unhealthy until it can.
    pub fn build(self) -> Result<Arc<RedisStore>, ChannelError> {
        let invalid = |field: &'static str, reason: &str| {
            Err(ChannelError::Transport(
                tether_transport::TransportError::InvalidConfig {
                    field,
                    reason: reason.to_owned(),
                },
            ))
        };
        if self.prefix.is_empty() || self.prefix.contains(':') {
            return invalid("redis.prefix", "must be non-empty and contain no ':'");
        }
        if self.retention.max_messages == 0 {
            return invalid("redis.retention.max_messages", "must be at least 1");
        }
        if self.dedupe_window == 0 {
            return invalid("redis.dedupe_window", "must be at least 1");
        }
        if self.producer_ttl < Duration::from_millis(1) {
            return invalid("redis.producer_ttl", "must be at least 1 ms");
        }
        let key_ttl = self.key_ttl.unwrap_or(self.retention.max_age);
        if key_ttl < Duration::from_millis(1) {
            return invalid("redis.key_ttl", "must be at least 1 ms");
        }
        if self.response_timeout.is_zero() || self.connect_timeout.is_zero() {
            return invalid("redis.timeouts", "must be greater than zero");
        }
        if self.probe_interval < Duration::from_millis(10) {
            return invalid("redis.probe_interval", "must be at least 10 ms");
        }
        let client = redis::Client::open(self.url.as_str()).map_err(|e| {
            ChannelError::Transport(tether_transport::TransportError::InvalidConfig {
                field: "redis.url",
                reason: e.to_string(),
            })
        })?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.response_timeout))
            .set_connection_timeout(Some(self.connect_timeout))
            .set_number_of_retries(1)
            .set_max_delay(self.probe_interval);
        let io = IoThread::start()?;
        // The connection's I/O task lives on the store's own thread, whatever the caller's
        // runtime is busy with.
        let manager = {
            let _in_io = io.handle.enter();
            ConnectionManager::new_lazy_with_config(client.clone(), config)
                .map_err(|e| store_error(&e))?
        };
        let health = Arc::new(HealthState {
            healthy: AtomicBool::new(false),
            reason: Mutex::new(Some("not connected yet".into())),
        });
        let (commands, rx) = mpsc::unbounded_channel();
        let watchers: Watchers = Arc::new(Mutex::new(HashMap::new()));
        let peers = Arc::new(RedisPeers {
            manager: manager.clone(),
            handle: io.handle.clone(),
            key: format!("{}:admin:nodes", self.prefix),
        });
        let store = Arc::new(RedisStore {
            peers,
            manager,
            prefix: self.prefix,
            retention: self.retention,
            dedupe_window: self.dedupe_window,
            producer_ttl: self.producer_ttl,
            key_ttl,
            append: Arc::from(format!("{PRELUDE}{APPEND}")),
            read: Arc::from(format!("{PRELUDE}{READ}")),
            health,
            watchers: watchers.clone(),
            commands,
            io,
        });
        let follower = Follower {
            client,
            prefix: store.prefix.clone(),
            watchers,
            interval: self.probe_interval,
            health: store.health.clone(),
        };
        store.io.handle.spawn(follower.run(rx));
        store.io.handle.spawn(probe(
            Arc::downgrade(&store),
            store.manager.clone(),
            self.probe_interval,
        ));
        Ok(store)
    }
}

#[derive(Debug)]
struct HealthState {
    healthy: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl HealthState {
    fn record<T>(&self, result: &Result<T, redis::RedisError>) {
        match result {
            Ok(_) => {
                if !self.healthy.swap(true, Ordering::AcqRel) {
                    tracing::info!("redis store reachable");
                    *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
            }
            // An error reply (a refused fence, a script error) is Redis answering: only a
            // connection that fails, drops or times out makes the store unhealthy.
            Err(e)
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal() =>
            {
                if self.healthy.swap(false, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "redis store unreachable");
                }
                *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            Err(e) => tracing::debug!(error = %e, "redis answered with an error"),
        }
    }
}

/// Where each watched channel's notices go.
type Watchers = Arc<Mutex<HashMap<String, NoticeSink>>>;

enum FollowCommand {
    Subscribe(String),
    Unsubscribe(String),
}

/// Channel history in Redis Streams. See the [module docs](self) for the data layout and the
/// guarantees.
pub struct RedisStore {
    manager: ConnectionManager,
    prefix: String,
    retention: Retention,
    dedupe_window: usize,
    producer_ttl: Duration,
    key_ttl: Duration,
    /// The append script's source (sent with `EVAL`: Redis caches it by its digest).
    append: Arc<str>,
    /// The read script's source.
    read: Arc<str>,
    health: Arc<HealthState>,
    watchers: Watchers,
    commands: mpsc::UnboundedSender<FollowCommand>,
    peers: Arc<RedisPeers>,
    io: IoThread,
}

/// The store's own thread and single-threaded runtime: every Redis connection, the health
/// probe and the notification link run there, so a busy caller thread never delays a store
/// round trip. Ends when the store is dropped.
///
/// Store calls go through one dispatcher task that starts them in the order they were made:
/// two appends of one channel reach Redis in the order the channel sent them (their fence
/// depends on it), which separately spawned tasks would not guarantee.
struct IoThread {
    handle: tokio::runtime::Handle,
    calls: mpsc::UnboundedSender<Call>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// One store call: the (not yet started) request, and where its result goes.
struct Call {
    request: BoxFuture<'static, Result<Value, ChannelError>>,
    reply: tokio::sync::oneshot::Sender<Result<Value, ChannelError>>,
}

/// Starts calls in arrival order (a request is sent to Redis when first polled, and
/// `FuturesUnordered` polls new futures in the order they were pushed), and drives them all.
async fn dispatch(mut calls: mpsc::UnboundedReceiver<Call>) {
    let mut running = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            call = calls.recv() => match call {
                Some(Call { request, reply }) => running.push(async move {
                    let _ = reply.send(request.await);
                }),
                None => break,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
    while running.next().await.is_some() {}
}

impl IoThread {
    fn start() -> Result<IoThread, ChannelError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ChannelError::Store {
                store: "redis",
                message: format!("cannot start the store's runtime: {e}"),
            })?;
        let handle = runtime.handle().clone();
        let (calls, queue) = mpsc::unbounded_channel();
        handle.spawn(dispatch(queue));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("tether-redis".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })
            .map_err(|e| ChannelError::Store {
                store: "redis",
                message: format!("cannot start the store's thread: {e}"),
            })?;
        Ok(IoThread {
            handle,
            calls,
            _stop: stop,
        })
    }

    /// Queues `request` behind every earlier call; resolves with its result.
    fn call(
        &self,
        request: impl std::future::Future<Output = Result<Value, ChannelError>> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<Value, ChannelError>> + Send + 'static {
        let (reply, result) = tokio::sync::oneshot::channel();
        let queued = self.calls.send(Call {
            request: Box::pin(request),
            reply,
        });
        async move {
            queued.map_err(|_| ChannelError::Store {
                store: "redis",
                message: "the store's thread has ended".into(),
            })?;
            result.await.map_err(|_| ChannelError::Store {
                store: "redis",
                message: "the store's thread has ended".into(),
            })?
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("retention", &self.retention)
            .field("healthy", &self.health.healthy.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A builder for a store at `url` (`redis://host:port/db`), with the documented defaults.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            retention: Retention::default(),
            dedupe_window: DEFAULT_DEDUPE_WINDOW,
            producer_ttl: DEFAULT_PRODUCER_TTL,
            key_ttl: None,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            probe_interval: DEFAULT_PROBE_INTERVAL,
        }
    }

    fn key(&self, channel: &str, suffix: &str) -> String {
        format!("{}:{}:{}:{}", self.prefix, channel.len(), channel, suffix)
    }

    fn notify_channel(prefix: &str, channel: &str) -> String {
        format!("{prefix}:n:{channel}")
    }

    fn producer_key(&self, channel: &str, request: &AppendRequest) -> String {
        self.key(channel, &producer_suffix(&request.producer))
    }

    fn retention_args(&self) -> [u64; 3] {
        [
            self.retention.max_messages as u64,
            self.retention.max_age.as_millis().min(u64::MAX as u128) as u64,
            self.retention.max_bytes as u64,
        ]
    }

    /// The key TTL in ms, at most 2^50 (~35,000 years: Lua adds it to the time exactly).
    fn key_ttl_ms(&self) -> u64 {
        self.key_ttl.as_millis().min(1 << 50) as u64
    }
}

/// The key suffix of a producer's dedupe hash: `p:` then its identity, client id, instance and
/// handle, each as `{byte length}:{bytes}`. Every part is the peer's or the authenticator's
/// choice and may hold any character (`:` included): length prefixes keep any two producers'
/// keys apart whatever they hold.
fn producer_suffix(p: &ProducerKey) -> String {
    let parts = [
        p.identity.as_str(),
        p.client.0.as_str(),
        p.instance.0.as_str(),
        p.producer.as_str(),
    ];
    let mut out = String::with_capacity(2 + parts.iter().map(|s| s.len() + 4).sum::<usize>());
    out.push_str("p:");
    for part in parts {
        out.push_str(&part.len().to_string());
        out.push(':');
        out.push_str(part);
    }
    out
}

fn seen_args(seen: &Option<Position>) -> (String, u64) {
    match seen {
        Some(p) => (p.epoch.to_string(), p.offset.0),
        None => (String::new(), 0),
    }
}

fn store_error(e: &redis::RedisError) -> ChannelError {
    ChannelError::Store {
        store: "redis",
        message: e.to_string(),
    }
}

fn malformed(what: &str) -> ChannelError {
    ChannelError::Store {
        store: "redis",
        message: format!("unexpected reply from the store script: {what}"),
    }
}

/// The bytes of a string reply, whichever of RESP's kinds of string it came as.
fn string_bytes(v: &Value) -> Result<&[u8], ChannelError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.as_bytes()),
        Value::VerbatimString { text, .. } => Ok(text.as_bytes()),
        _ => Err(malformed("expected a string")),
    }
}

fn as_bytes(v: &Value) -> Result<bytes::Bytes, ChannelError> {
    string_bytes(v).map(bytes::Bytes::copy_from_slice)
}

fn as_string(v: &Value) -> Result<String, ChannelError> {
    std::str::from_utf8(string_bytes(v)?)
        .map(str::to_owned)
        .map_err(|_| malformed("not UTF-8"))
}

fn as_int(v: &Value) -> Result<i64, ChannelError> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(_) | Value::SimpleString(_) => as_string(v)?
            .parse()
            .map_err(|_| malformed("expected a number")),
        _ => Err(malformed("expected a number")),
    }
}

fn as_array(v: &Value) -> Result<&[Value], ChannelError> {
    match v {
        Value::Array(items) => Ok(items),
        _ => Err(malformed("expected an array")),
    }
}

fn as_offset(v: &Value) -> Result<Offset, ChannelError> {
    u64::try_from(as_int(v)?)
        .map(Offset)
        .map_err(|_| malformed("negative offset"))
}

fn parse_appended(v: &Value) -> Result<Appended, ChannelError> {
    let [epoch, head, outcomes] = as_array(v)? else {
        return Err(malformed("append reply"));
    };
    let outcomes = as_array(outcomes)?
        .chunks(2)
        .map(|pair| {
            let [kind, offset] = pair else {
                return Err(malformed("append outcome"));
            };
            let offset = as_int(offset)?;
            Ok(match as_int(kind)? {
                1 => AppendOutcome::Stored(Offset(offset as u64)),
                _ if offset < 0 => AppendOutcome::Duplicate(None),
                _ => AppendOutcome::Duplicate(Some(Offset(offset as u64))),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Appended {
        epoch: Epoch(as_string(epoch)?.into()),
        head: as_offset(head)?,
        outcomes,
    })
}

fn parse_page(v: &Value) -> Result<Page, ChannelError> {
    let [epoch, head, first, messages] = as_array(v)? else {
        return Err(malformed("read reply"));
    };
    let messages = as_array(messages)?
        .chunks(2)
        .map(|pair| {
            let [offset, payload] = pair else {
                return Err(malformed("read entry"));
            };
            // Stored as published: JSON text, or opaque bytes (`Payload::from_bytes`, or a v2
            // publisher's payload), which need not even be UTF-8.
            let payload = Payload::from_unchecked(as_bytes(payload)?);
            Ok(StoredMessage {
                offset: as_offset(offset)?,
                payload,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Page {
        epoch: Epoch(as_string(epoch)?.into()),
        head: as_offset(head)?,
        first: as_offset(first)?,
        messages,
    })
}

/// Runs `script` with `keys` and `args`, recording the store's health. `EVAL` with the source,
/// not `EVALSHA`: Redis caches the script by its digest all the same, and a script cache
/// emptied by a restart costs no `NOSCRIPT` retry — a retry that could reorder two appends of
/// one channel behind their fence.
async fn invoke(
    script: Arc<str>,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    mut manager: ConnectionManager,
    health: Arc<HealthState>,
) -> Result<Value, ChannelError> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(&*script).arg(keys.len()).arg(keys).arg(args);
    let result: Result<Value, _> = cmd.query_async(&mut manager).await;
    health.record(&result);
    result.map_err(|e| store_error(&e))
}

/// The hub nodes sharing one Redis, for the admin API: one hash, `{prefix}:admin:nodes`,
/// node id → `"{expires, Unix ms} {proof} {admin URL}"` (the proof: see `PeerNode::proof`).
/// Entries past their expiry are ignored, and removed a minute after it.
struct RedisPeers {
    manager: ConnectionManager,
    handle: tokio::runtime::Handle,
    key: String,
}

/// Expired peer entries are removed this long after their expiry.
const PEER_SWEEP_AFTER: Duration = Duration::from_secs(60);

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RedisPeers {
    /// Runs `cmd` on the store's thread.
    fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        cmd: redis::Cmd,
    ) -> BoxFuture<'static, Result<T, String>> {
        let mut manager = self.manager.clone();
        let task = self
            .handle
            .spawn(async move { cmd.query_async::<T>(&mut manager).await });
        Box::pin(async move {
            match task.await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(e) => Err(format!("the store's thread has ended: {e}")),
            }
        })
    }
}

impl tether_transport::hub::AdminPeers for RedisPeers {
    fn announce(
        &self,
        node: tether_transport::hub::PeerNode,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), String>> {
        let expires = unix_now_ms() + ttl.as_millis() as u64;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&self.key)
            .arg(&node.node_id)
            .arg(format!("{expires} {} {}", node.proof, node.url));
        let done = self.run::<i64>(cmd);
        Box::pin(async move { done.await.map(drop) })
    }

    fn nodes(&self) -> BoxFuture<'static, Result<Vec<tether_transport::hub::PeerNode>, String>> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(&self.key);
        let all = self.run::<HashMap<String, String>>(cmd);
        let (manager, handle, key) = (self.manager.clone(), self.handle.clone(), self.key.clone());
        Box::pin(async move {
            let now = unix_now_ms();
            let mut live = Vec::new();
            let mut stale = Vec::new();
            for (node_id, value) in all.await? {
                let parsed = value.splitn(3, ' ').collect::<Vec<_>>();
                let parsed = match parsed[..] {
                    [at, proof, url] => at.parse::<u64>().ok().map(|at| (at, proof, url)),
                    _ => None,
                };
                match parsed {
                    Some((expires, proof, url)) if expires > now => {
                        live.push(tether_transport::hub::PeerNode {
                            node_id,
                            url: url.to_owned(),
                            proof: proof.to_owned(),
                        })
                    }
                    Some((expires, _, _))
                        if now.saturating_sub(expires) < PEER_SWEEP_AFTER.as_millis() as u64 => {}
                    _ => stale.push(node_id),
                }
            }
            if !stale.is_empty() {
                let peers = RedisPeers {
                    manager,
                    handle,
                    key,
                };
                let mut cmd = redis::cmd("HDEL");
                cmd.arg(&peers.key).arg(stale);
                // Best effort: the next reader sweeps what this one could not.
                let _ = peers.run::<i64>(cmd).await;
            }
            live.sort_by(|a, b| a.node_id.cmp(&b.node_id));
            Ok(live)
        })
    }

    fn withdraw(&self, node_id: &str) -> BoxFuture<'static, Result<(), String>> {
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&self.key).arg(node_id);
        let done = self.run::<i64>(cmd);
        Box::pin(async move { done.await.map(drop) })
    }
}

impl HistoryStore for RedisStore {
    fn append(
        &self,
        channel: &str,
        seen: Option<Position>,
        fence: Fence,
        batch: Vec<AppendRequest>,
    ) -> BoxFuture<'static, Result<Appended, ChannelError>> {
        let mut keys = Vec::with_capacity(batch.len() + 4);
        keys.push(self.key(channel, "s"));
        keys.push(self.key(channel, "m"));
        keys.push(self.key(channel, "i"));
        keys.push(self.key(channel, &format!("f:{}", fence.token)));
        keys.extend(batch.iter().map(|r| self.producer_key(channel, r)));
        let (seen_epoch, seen_head) = seen_args(&seen);
        let [max_messages, max_age, max_bytes] = self.retention_args();
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(11 + 2 * batch.len());
        args.push(Epoch::random().to_string().into_bytes());
        args.push(seen_epoch.into_bytes());
        for n in [
            seen_head,
            max_messages,
            max_age,
            max_bytes,
            self.dedupe_window as u64,
            self.producer_ttl.as_millis().min(u64::MAX as u128) as u64,
        ] {
            args.push(n.to_string().into_bytes());
        }
        args.push(Self::notify_channel(&self.prefix, channel).into_bytes());
        args.push(format!("{} {}", fence.after, fence.number).into_bytes());
        args.push(self.key_ttl_ms().to_string().into_bytes());
        for request in &batch {
            args.push(request.seq.to_string().into_bytes());
            args.push(request.payload.as_bytes().to_vec());
        }
        let call = self.io.call(invoke(
            self.append.clone(),
            keys,
            args,
            self.manager.clone(),
            self.health.clone(),
        ));
        let expected = batch.len();
        Box::pin(async move {
            let appended = parse_appended(&call.await?)?;
            if appended.outcomes.len() != expected {
                return Err(malformed("outcome count"));
            }
            Ok(appended)
        })
    }

    fn read(
        &self,
        channel: &str,
        seen: Option<Position>,
        after: Offset,
        limit: PageLimit,
    ) -> BoxFuture<'static, Result<Page, ChannelError>> {
        let keys = vec![
            self.key(channel, "s"),
            self.key(channel, "m"),
            self.key(channel, "i"),
        ];
        let (seen_epoch, seen_head) = seen_args(&seen);
        let [max_messages, max_age, max_bytes] = self.retention_args();
        let mut args: Vec<Vec<u8>> = vec![
            Epoch::random().to_string().into_bytes(),
            seen_epoch.into_bytes(),
        ];
        for n in [
            seen_head,
            max_messages,
            max_age,
            max_bytes,
            after.0,
            limit.max_messages as u64,
            limit.max_bytes as u64,
            self.key_ttl_ms(),
        ] {
            args.push(n.to_string().into_bytes());
        }
        let call = self.io.call(invoke(
            self.read.clone(),
            keys,
            args,
            self.manager.clone(),
            self.health.clone(),
        ));
        Box::pin(async move { parse_page(&call.await?) })
    }

    fn watch(&self, channel: &str, sink: NoticeSink) {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(channel.to_owned(), sink);
        let _ = self
            .commands
            .send(FollowCommand::Subscribe(channel.to_owned()));
    }

    fn unwatch(&self, channel: &str) {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(channel);
        let _ = self
            .commands
            .send(FollowCommand::Unsubscribe(channel.to_owned()));
    }

    fn admin_peers(&self) -> Option<Arc<dyn tether_transport::hub::AdminPeers>> {
        Some(self.peers.clone())
    }

    fn health(&self) -> StoreHealth {
        let healthy = self.health.healthy.load(Ordering::Acquire);
        StoreHealth {
            kind: "redis",
            healthy,
            reason: if healthy {
                None
            } else {
                self.health
                    .reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            },
        }
    }
}

/// Pings Redis every `interval` while the store exists, so `/health` is current even when no
/// channel is busy.
async fn probe(
    store: std::sync::Weak<RedisStore>,
    mut manager: ConnectionManager,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(store) = store.upgrade() else {
            return;
        };
        let result: Result<String, _> = redis::cmd("PING").query_async(&mut manager).await;
        store.health.record(&result);
    }
}

/// The notification link: one pub/sub connection subscribed to the watched channels.
struct Follower {
    client: redis::Client,
    prefix: String,
    watchers: Watchers,
    interval: Duration,
    health: Arc<HealthState>,
}

impl Follower {
    async fn run(self, mut commands: mpsc::UnboundedReceiver<FollowCommand>) {
        let prefix = format!("{}:n:", self.prefix);
        loop {
            if commands.is_closed() {
                return;
            }
            let connected = tokio::time::timeout(self.interval * 4, self.client.get_async_pubsub())
                .await
                .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))
                .and_then(|r| r);
            let pubsub = match connected {
                Ok(pubsub) => pubsub,
                Err(e) => {
                    self.health.record::<()>(&Err(e));
                    tokio::time::sleep(self.interval).await;
                    continue;
                }
            };
            let (mut sink, mut stream) = pubsub.split();
            let names: Vec<String> = self
                .watchers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            let mut ok = true;
            for name in &names {
                if sink
                    .subscribe(RedisStore::notify_channel(&self.prefix, name))
                    .await
                    .is_err()
                {
                    ok = false;
                    break;
                }
            }
            if !ok {
                tokio::time::sleep(self.interval).await;
                continue;
            }
            // Anything appended before these subscriptions took effect was not notified.
            for name in &names {
                self.notify(name, StoreNotice::Resync);
            }
            // The link is pinged: a connection that died silently (a NAT or firewall dropping an
            // idle one) is noticed within a few intervals, then re-made with a resync.
            let mut liveness = tokio::time::interval(self.interval * 4);
            liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            liveness.tick().await;
            loop {
                tokio::select! {
                    _ = liveness.tick() => {
                        // In subscribed mode the answer is ["pong", ""]: any answer will do.
                        let pong: Result<Result<Value, _>, _> =
                            tokio::time::timeout(self.interval * 4, sink.ping()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            break;
                        }
                    }
                    command = commands.recv() => match command {
                        None => return,
                        Some(FollowCommand::Subscribe(name)) => {
                            if sink.subscribe(RedisStore::notify_channel(&self.prefix, &name)).await.is_err() {
                                break;
                            }
                            self.notify(&name, StoreNotice::Resync);
                        }
                        Some(FollowCommand::Unsubscribe(name)) => {
                            if sink.unsubscribe(RedisStore::notify_channel(&self.prefix, &name)).await.is_err() {
                                break;
                            }
                        }
                    },
                    message = stream.next() => match message {
                        None => break,
                        Some(msg) => {
                            let Some(name) = msg.get_channel_name().strip_prefix(&prefix) else {
                                continue;
                            };
                            let Ok(text) = msg.get_payload::<String>() else {
                                continue;
                            };
                            let Some((epoch, head)) = text.split_once(' ') else {
                                continue;
                            };
                            let Ok(head) = head.parse::<u64>() else {
                                continue;
                            };
                            let notice = StoreNotice::Advanced {
                                epoch: Epoch(epoch.into()),
                                head: Offset(head),
                            };
                            self.notify(name, notice);
                        }
                    },
                }
            }
            tracing::warn!("redis notification link lost; reconnecting");
            tokio::time::sleep(self.interval).await;
        }
    }

    fn notify(&self, name: &str, notice: StoreNotice) {
        let sink = self
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        if let Some(sink) = sink {
            sink(notice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_transport::hub::Identity;
    use tether_transport::protocol::{ClientId, InstanceId};

    fn key(identity: &str, client: &str, instance: &str, producer: &str) -> String {
        producer_suffix(&ProducerKey {
            identity: Identity::new(identity).unwrap(),
            client: ClientId(client.into()),
            instance: InstanceId(instance.into()),
            producer: producer.into(),
        })
    }

    #[test]
    fn producer_keys_are_length_prefixed() {
        assert_eq!(key("alice", "c-1", "i", ""), "p:5:alice3:c-11:i0:");
    }

    #[test]
    fn no_choice_of_parts_forges_another_producers_key() {
        // Pairs that naive joining (with ':', '/' or a separator inside a part) would merge.
        let pairs = [
            (key("a:b", "c", "i", "p"), key("a", "b:c", "i", "p")),
            (key("a", "1:b", "i", "p"), key("a1", "b", "i", "p")),
            (key("m", "c", "i1:p", ""), key("m", "c", "i", "p")),
            (key("x", "c\u{1f}i", "p", ""), key("x", "c", "i\u{1f}p", "")),
        ];
        for (a, b) in pairs {
            assert_ne!(a, b);
        }
    }

    proptest::proptest! {
        /// Over a tiny alphabet of digits and ':' (where any naive joining collides), two
        /// producers have one key exactly when they are the same producer.
        #[test]
        fn producer_keys_are_one_to_one(
            a in proptest::collection::vec("[1:a]{0,3}", 4),
            b in proptest::collection::vec("[1:a]{0,3}", 4),
        ) {
            let id = |s: &str| format!("x{s}");
            let ka = key(&id(&a[0]), &a[1], &a[2], &a[3]);
            let kb = key(&id(&b[0]), &b[1], &b[2], &b[3]);
            proptest::prop_assert_eq!(a == b, ka == kb);
        }
    }
}
