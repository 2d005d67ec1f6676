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
/// recorder installed when the channel opened. The queue depth and the delivery count change
/// per message but are reported per run of work ([`ChannelMeters::report`], when the core's
/// actions have been taken, and on drop): one gauge and one counter update per run instead
/// of three per message. Ack latencies are recorded exactly, but equal ones in a row as one
/// `record_many` (the publishes of one burst share their acceptance time, and the acks of one
/// ack run their arrival time, so a run of acks is mostly a few distinct values).
#[derive(Debug)]
pub(crate) struct ChannelMeters {
    queue_depth: metrics::Gauge,
    ack_seconds: metrics::Histogram,
    delivered: metrics::Counter,
    pub(crate) replayed: metrics::Counter,
    /// Change of the queue depth not reported yet.
    depth_change: i64,
    /// Messages delivered and not counted yet.
    delivered_unreported: u64,
    /// Ack latency not recorded yet, and how many acks in a row had it.
    ack_unrecorded: Option<(f64, u64)>,
}

impl ChannelMeters {
    pub(crate) fn new() -> Self {
        ChannelMeters {
            queue_depth: metrics::gauge!(PUBLISH_QUEUE_DEPTH),
            ack_seconds: metrics::histogram!(PUBLISH_ACK_SECONDS),
            delivered: metrics::counter!(MESSAGES_DELIVERED),
            replayed: metrics::counter!(PUBLISH_REPLAYED),
            depth_change: 0,
            delivered_unreported: 0,
            ack_unrecorded: None,
        }
    }

    /// A publish was acknowledged `seconds` after it was accepted.
    pub(crate) fn acked_after(&mut self, seconds: f64) {
        match &mut self.ack_unrecorded {
            Some((value, count)) if *value == seconds => *count += 1,
            pending => {
                if let Some((value, count)) = pending.replace((seconds, 1)) {
                    self.ack_seconds.record_many(value, count as usize);
                }
            }
        }
    }

    /// `n` publishes joined the queue.
    pub(crate) fn queued(&mut self, n: usize) {
        self.depth_change = self.depth_change.saturating_add(n as i64);
    }

    /// `n` publishes left the queue (answered).
    pub(crate) fn dequeued(&mut self, n: usize) {
        self.depth_change = self.depth_change.saturating_sub(n as i64);
    }

    /// One message went to the application.
    pub(crate) fn delivered_one(&mut self) {
        self.delivered_unreported += 1;
    }

    /// Reports what changed since the last report.
    pub(crate) fn report(&mut self) {
        match std::mem::take(&mut self.depth_change) {
            0 => {}
            n if n > 0 => self.queue_depth.increment(n as f64),
            n => self.queue_depth.decrement(n.unsigned_abs() as f64),
        }
        match std::mem::take(&mut self.delivered_unreported) {
            0 => {}
            n => self.delivered.increment(n),
        }
        if let Some((value, count)) = self.ack_unrecorded.take() {
            self.ack_seconds.record_many(value, count as usize);
        }
    }
}

impl Drop for ChannelMeters {
    fn drop(&mut self) {
        self.report();
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
        meters.queued(3);
        meters.dequeued(1);
        meters.delivered_one();
        meters.delivered_one();
        for seconds in [0.5, 0.5, 0.5, 0.25, 0.5] {
            meters.acked_after(seconds);
        }
        // Nothing reported before the run is done.
        let before = handle.render();
        assert_eq!(
            line(&before, PUBLISH_QUEUE_DEPTH),
            Some("tether_publish_queue_depth 0")
        );
        meters.report();
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
        // A drop below zero, then a drop of the meters, reports what was left.
        meters.dequeued(2);
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
