//! The Tether side of the whole-system benchmarks: an embedded hub serving channels on
//! loopback, and clients whose channels are attached before measuring starts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_channels::hub::{ChannelService, HistoryStore, Retention};
use tether_channels::{Channel, ChannelEvents, ChannelOptions, ChannelState};
use tether_transport::hub::{Hub, HubConfig, HubConfigBuilder, HubHandle};
use tether_transport::{event_channel, Transport, TransportConfig};

use std::collections::VecDeque;
use std::future::Future;

use tether_transport::protocol::Payload;

use crate::pacer::Pacer;
use crate::payload::{make_payload, Clock};
use crate::BoxError;

/// The channel every benchmark publishes on.
pub const CHANNEL: &str = "bench";

/// Per-message overhead assumed when sizing the hub's history: the `message` frame around a
/// payload (type, channel, epoch, offset).
pub const FRAME_OVERHEAD: usize = 256;

/// Starts a hub on `127.0.0.1:0` with one HTTP worker and a [`ChannelService`] whose channels
/// run on that worker (the default placement: the whole hub is one thread), and whose history
/// keeps at least `messages` messages of `payload_size` bytes each (so nothing a
/// run publishes is evicted while it runs). Must run inside an actix system.
pub fn start_hub(messages: usize, payload_size: usize) -> Result<HubHandle, BoxError> {
    start_hub_on(messages, payload_size, None)
}

/// History retention that keeps `messages` of `payload_size` bytes each.
pub fn retention_for(messages: usize, payload_size: usize) -> Retention {
    Retention {
        max_messages: messages.max(1),
        max_bytes: messages
            .max(1)
            .saturating_mul(payload_size + FRAME_OVERHEAD)
            .max(Retention::default().max_bytes),
        ..Retention::default()
    }
}

/// [`start_hub`] with channel history in `store` (in memory when `None`): one hub node of
/// several when the store is shared.
pub fn start_hub_on(
    messages: usize,
    payload_size: usize,
    store: Option<Arc<dyn HistoryStore>>,
) -> Result<HubHandle, BoxError> {
    start_hub_configured(messages, payload_size, store, |config| config)
}

/// [`start_hub_on`] with the hub's configuration adjusted by `configure` before it is built.
pub fn start_hub_configured(
    messages: usize,
    payload_size: usize,
    store: Option<Arc<dyn HistoryStore>>,
    configure: impl FnOnce(HubConfigBuilder) -> HubConfigBuilder,
) -> Result<HubHandle, BoxError> {
    let retention = retention_for(messages, payload_size);
    let mut builder = ChannelService::builder().retention(retention);
    if let Some(store) = store {
        builder = builder.store(store);
    }
    let service = builder.build()?;
    let bind: SocketAddr = "127.0.0.1:0".parse()?;
    let config = configure(
        HubConfig::builder()
            .bind(bind)
            .workers(1)
            .handler(Arc::new(service)),
    )
    .build()?;
    Ok(Hub::start(config)?)
}

/// A client configuration for the hub at `url`: Tether's documented defaults, and the `TETHER_*`
/// settings of the environment but the endpoints (the benchmark's hub is its own; child
/// processes inherit them): `TETHER_PROTOCOL_VERSION=1` measures the JSON protocol,
/// `TETHER_RECONNECT_*` another reconnect policy.
pub fn client_config(url: &str) -> Result<TransportConfig, BoxError> {
    Ok(TransportConfig::builder(url)
        .apply_env(|key| {
            (key != "TETHER_ENDPOINTS")
                .then(|| std::env::var(key).ok())
                .flatten()
        })?
        .build()?)
}

/// Opens `name` on `transport` and waits up to `timeout` until the hub confirmed the attach.
pub async fn open_attached(
    transport: &Transport,
    name: &str,
    options: ChannelOptions,
    timeout: Duration,
) -> Result<(Channel, ChannelEvents), BoxError> {
    let (recipient, mut states) = event_channel(64);
    let (channel, events) =
        Channel::open_with_state(transport, name, options, vec![recipient]).await?;
    let attached = tokio::time::timeout(timeout, async {
        while let Some(event) = states.recv().await {
            let change = event.transition();
            match change.to {
                ChannelState::Attached => return Ok(()),
                ChannelState::Failed => {
                    return Err(format!("channel {name} failed: {:?}", change.reason))
                }
                _ => {}
            }
        }
        Err(format!("channel {name} closed before attaching"))
    })
    .await
    .map_err(|_| format!("channel {name} not attached within {timeout:?}"))?;
    attached?;
    Ok((channel, events))
}

/// Starts a transport to `url` and opens channel `name` on it, attached.
pub async fn connect(
    url: &str,
    name: &str,
    options: ChannelOptions,
    timeout: Duration,
) -> Result<(Transport, Channel, ChannelEvents), BoxError> {
    let transport = Transport::start(client_config(url)?);
    match open_attached(&transport, name, options, timeout).await {
        Ok((channel, events)) => Ok((transport, channel, events)),
        Err(e) => {
            transport.close().await;
            Err(e)
        }
    }
}

/// Publishes `n` timestamped payloads of `size` bytes on `channel`, keeping at most `window`
/// unacknowledged; returns once every one is acknowledged.
pub async fn publish_windowed(
    channel: &Channel,
    n: usize,
    size: usize,
    window: usize,
    clock: Clock,
) -> Result<(), BoxError> {
    publish_paced(channel, n, size, window, clock, None, false).await
}

/// Futures awaited in the order they were pushed. A channel acknowledges its publishes in
/// order, so the oldest outstanding one is the next to complete, and the ones behind it are
/// usually complete by the time it is: awaiting them in order registers one waker at a time.
/// (A `FuturesUnordered` gives each future a task of its own and a wake per completion —
/// about a fifth of the benchmark's thread at 64 B, for work that is the benchmark's, not the
/// path's; `FuturesOrdered` is built on one and costs the same.)
#[derive(Debug)]
pub struct InOrder<F> {
    queue: VecDeque<F>,
}

impl<F: Future + Unpin> InOrder<F> {
    /// Empty.
    pub fn new() -> Self {
        InOrder {
            queue: VecDeque::new(),
        }
    }

    /// How many are outstanding.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Adds `future` behind the others.
    pub fn push(&mut self, future: F) {
        self.queue.push_back(future);
    }

    /// The oldest one's output, once it has completed; `None` when none are outstanding.
    /// Cancel-safe: a future it is waiting on stays queued.
    pub async fn next(&mut self) -> Option<F::Output> {
        let output = self.queue.front_mut()?.await;
        self.queue.pop_front();
        Some(output)
    }
}

impl<F: Future + Unpin> Default for InOrder<F> {
    fn default() -> Self {
        Self::new()
    }
}

/// [`publish_windowed`], each publish also waiting for its turn from `pacer` when there is one;
/// `opaque` publishes the payloads as opaque bytes ([`Payload::from_bytes`], no JSON check).
/// The window's publishes are awaited in order ([`InOrder`]).
pub async fn publish_paced(
    channel: &Channel,
    n: usize,
    size: usize,
    window: usize,
    clock: Clock,
    pacer: Option<&Pacer>,
    opaque: bool,
) -> Result<(), BoxError> {
    let mut outstanding = InOrder::new();
    for _ in 0..n {
        if let Some(pacer) = pacer {
            // Acks that came in while waiting are collected as they arrive.
            let mut turn = std::pin::pin!(pacer.next());
            loop {
                tokio::select! {
                    biased;
                    turn_result = &mut turn => { turn_result?; break; }
                    Some(ack) = outstanding.next(), if !outstanding.is_empty() => { ack?; }
                }
            }
        }
        if outstanding.len() >= window {
            if let Some(ack) = outstanding.next().await {
                ack?;
            }
        }
        let text = make_payload(size, clock.micros());
        let payload = if opaque {
            Payload::from_bytes(text)
        } else {
            Payload::from_json_bytes(text.into())?
        };
        outstanding.push(channel.publish_payload(payload));
    }
    while let Some(ack) = outstanding.next().await {
        ack?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn in_order_yields_in_push_order_and_keeps_what_it_was_waiting_on() {
        let mut queue = InOrder::new();
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
        for rx in receivers {
            queue.push(rx);
        }
        let mut senders = senders.into_iter().enumerate().collect::<Vec<_>>();
        // The newest completes first: waiting on the oldest gives up, and it stays queued.
        let (i, tx) = senders.pop().unwrap();
        tx.send(i).unwrap();
        assert!(queue.next().now_or_never().is_none());
        assert_eq!(queue.len(), 3);
        for (i, tx) in senders {
            tx.send(i).unwrap();
        }
        let mut got = Vec::new();
        while let Some(out) = queue.next().await {
            got.push(out.unwrap());
        }
        assert_eq!(got, [0, 1, 2]);
        assert!(queue.is_empty());
    }
}
