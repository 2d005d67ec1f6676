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
/// recorder installed when the channel opened. The queue depth and the delivery count are
/// reported per run of work ([`ChannelMeters::report`], when the core's actions have been
/// taken): one gauge and one counter update per run instead of three per message. The depth
/// is the outbox's own length, so no path that changes the outbox can make the gauge drift;
/// a channel dropped takes its share of the gauge with it.
#[derive(Debug)]
pub(crate) struct ChannelMeters {
    queue_depth: metrics::Gauge,
    pub(crate) ack_seconds: metrics::Histogram,
    delivered: metrics::Counter,
    pub(crate) replayed: metrics::Counter,
    /// The depth last added to the gauge.
    reported_depth: usize,
    /// Messages delivered and not counted yet.
    delivered_unreported: u64,
}

impl ChannelMeters {
    pub(crate) fn new() -> Self {
        ChannelMeters {
            queue_depth: metrics::gauge!(PUBLISH_QUEUE_DEPTH),
            ack_seconds: metrics::histogram!(PUBLISH_ACK_SECONDS),
            delivered: metrics::counter!(MESSAGES_DELIVERED),
            replayed: metrics::counter!(PUBLISH_REPLAYED),
            reported_depth: 0,
            delivered_unreported: 0,
        }
    }

    /// One message went to the application.
    pub(crate) fn delivered_one(&mut self) {
        self.delivered_unreported += 1;
    }

    /// Reports what changed since the last report: the queue is `depth` long now.
    pub(crate) fn report(&mut self, depth: usize) {
        let before = std::mem::replace(&mut self.reported_depth, depth);
        if depth > before {
            self.queue_depth.increment((depth - before) as f64);
        } else if depth < before {
            self.queue_depth.decrement((before - depth) as f64);
        }
        match std::mem::take(&mut self.delivered_unreported) {
            0 => {}
            n => self.delivered.increment(n),
        }
    }
}

impl Drop for ChannelMeters {
    fn drop(&mut self) {
        // The channel and its queue are gone.
        self.report(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    fn line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(name))
    }

    #[test]
    fn depth_and_deliveries_are_reported_per_run_and_on_drop() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let mut meters = metrics::with_local_recorder(&recorder, ChannelMeters::new);
        meters.delivered_one();
        meters.delivered_one();
        for seconds in [0.5, 0.5, 0.5, 0.25, 0.5] {
            meters.ack_seconds.record(seconds);
        }
        // Nothing reported before the run is done.
        let before = handle.render();
        assert_eq!(
            line(&before, PUBLISH_QUEUE_DEPTH),
            Some("tether_publish_queue_depth 0")
        );
        meters.report(2);
        let after = handle.render();
        assert_eq!(
            line(&after, PUBLISH_QUEUE_DEPTH),
            Some("tether_publish_queue_depth 2")
        );
        assert_eq!(
            line(&after, MESSAGES_DELIVERED),
            Some("tether_messages_delivered_total 2")
        );
        // Every ack latency is there, equal ones in a row included.
        let acks = |suffix: &str| line(&after, &format!("{PUBLISH_ACK_SECONDS}_{suffix}"));
        assert_eq!(acks("count"), Some("tether_publish_ack_seconds_count 5"));
        assert_eq!(acks("sum"), Some("tether_publish_ack_seconds_sum 2.25"));
        // A drop of the meters reports what was left, and takes its depth back.
        meters.delivered_one();
        drop(meters);
        let dropped = handle.render();
        assert_eq!(
            line(&dropped, PUBLISH_QUEUE_DEPTH),
            Some("tether_publish_queue_depth 0")
        );
        assert_eq!(
            line(&dropped, MESSAGES_DELIVERED),
            Some("tether_messages_delivered_total 3")
        );
    }
}
