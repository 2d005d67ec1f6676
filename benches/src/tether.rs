//! The Tether side of the whole-system benchmarks: an embedded hub serving channels on
//! loopback, and clients whose channels are attached before measuring starts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_channels::hub::{ChannelService, HistoryStore, Retention};
use tether_channels::{Channel, ChannelEvents, ChannelOptions, ChannelState};
use tether_transport::hub::{Hub, HubConfig, HubConfigBuilder, HubHandle};
use tether_transport::{event_channel, Transport, TransportConfig};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
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

/// A client configuration with Tether's documented defaults, for the hub at `url`.
pub fn client_config(url: &str) -> Result<TransportConfig, BoxError> {
    // `TETHER_PROTOCOL_VERSION=1` measures the JSON protocol (child processes inherit it).
    let mut builder = TransportConfig::builder(url);
    if let Ok(v) = std::env::var("TETHER_PROTOCOL_VERSION") {
        builder = builder.protocol_version(v.trim().parse()?);
    }
    Ok(builder.build()?)
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

/// [`publish_windowed`], each publish also waiting for its turn from `pacer` when there is one;
/// `opaque` publishes the payloads as opaque bytes ([`Payload::from_bytes`], no JSON check).
pub async fn publish_paced(
    channel: &Channel,
    n: usize,
    size: usize,
    window: usize,
    clock: Clock,
    pacer: Option<&Pacer>,
    opaque: bool,
) -> Result<(), BoxError> {
    let mut outstanding = FuturesUnordered::new();
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
