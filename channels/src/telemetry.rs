//! Metric names of the channels layer (all `tether_*`), in one place.

/// Gauge: published messages not yet acknowledged, over all channels of the process.
pub const PUBLISH_QUEUE_DEPTH: &str = "tether_publish_queue_depth";
/// Counter: publishes sent again after a reconnect.
pub const PUBLISH_REPLAYED: &str = "tether_publish_replayed_total";
/// Histogram: seconds from `publish()` to the hub's ack.
pub const PUBLISH_ACK_SECONDS: &str = "tether_publish_ack_seconds";
/// Counter, label `side` (`client`, `hub`): duplicates recognised and dropped.
pub const DUPLICATES_DROPPED: &str = "tether_duplicates_dropped_total";
/// Histogram: seconds one durable-outbox commit took (client side).
pub const DURABLE_COMMIT_SECONDS: &str = "tether_durable_commit_seconds";
/// Histogram: publishes written per durable-outbox commit (group commit).
pub const DURABLE_COMMIT_BATCH: &str = "tether_durable_commit_batch";
/// Counter: durable-outbox commits that failed.
pub const DURABLE_COMMIT_ERRORS: &str = "tether_durable_commit_errors_total";
/// Counter: discontinuities reported to subscribers.
pub const DISCONTINUITIES: &str = "tether_discontinuities_total";
/// Counter: messages delivered to subscribers (client side).
pub const MESSAGES_DELIVERED: &str = "tether_messages_delivered_total";
/// Counter: live messages skipped while a slow subscriber catches up from history.
pub const LAG_SKIPPED: &str = "tether_lag_skipped_total";
/// Counter: messages stored by the hub.
pub const HUB_MESSAGES_STORED: &str = "tether_hub_messages_stored_total";
/// Counter: message frames the hub fanned out (live and replayed).
pub const HUB_DELIVERIES: &str = "tether_hub_deliveries_total";
/// Counter: history messages replayed to resuming subscribers.
pub const HUB_REPLAYED: &str = "tether_hub_replayed_total";
/// Counter: replay or catch-up pages that waited for a connection's socket to drain.
pub const HUB_REPLAYS_PACED: &str = "tether_hub_replays_paced_total";
/// Counter: connections closed because they could not keep up.
pub const HUB_SLOW_CONSUMERS: &str = "tether_hub_slow_consumers_total";
/// Gauge: channels on the hub.
pub const HUB_CHANNELS: &str = "tether_hub_channels";
/// Counter, label `op` (`append`, `read`): history store operations that failed.
pub const HUB_STORE_ERRORS: &str = "tether_hub_store_errors_total";
/// Histogram: seconds one append batch took in the history store.
pub const HUB_STORE_APPEND_SECONDS: &str = "tether_hub_store_append_seconds";
/// Histogram: publishes per append batch.
pub const HUB_STORE_APPEND_BATCH: &str = "tether_hub_store_append_batch";
/// Counter: epochs this hub saw a channel change to (a store that lost a stream).
pub const HUB_EPOCH_CHANGES: &str = "tether_hub_epoch_changes_total";
/// Counter: producers a full dedupe table forgot to make room (their later replays would be
/// stored again).
pub const HUB_PRODUCERS_FORGOTTEN: &str = "tether_hub_producers_forgotten_total";
/// Counter: channels that expired (no connection attached, nothing in progress, for the idle
/// TTL) and left the hub's registry.
pub const HUB_CHANNELS_EXPIRED: &str = "tether_hub_channels_expired_total";
/// Counter: times a channel yielded its thread to the other channels there after a full turn
/// of work.
pub const HUB_CHANNEL_YIELDS: &str = "tether_hub_channel_yields_total";

/// The handles a client channel updates per message, registered once per channel: a
/// `metrics::counter!(NAME)` call looks its key up in the recorder's registry every time, which
/// on the publish and delivery paths cost more than the work it counts. They report to the
/// recorder installed when the channel opened.
#[derive(Debug, Clone)]
pub(crate) struct ChannelMeters {
    pub(crate) queue_depth: metrics::Gauge,
    pub(crate) ack_seconds: metrics::Histogram,
    pub(crate) delivered: metrics::Counter,
    pub(crate) replayed: metrics::Counter,
}

impl ChannelMeters {
    pub(crate) fn new() -> Self {
        ChannelMeters {
            queue_depth: metrics::gauge!(PUBLISH_QUEUE_DEPTH),
            ack_seconds: metrics::histogram!(PUBLISH_ACK_SECONDS),
            delivered: metrics::counter!(MESSAGES_DELIVERED),
            replayed: metrics::counter!(PUBLISH_REPLAYED),
        }
    }
}
