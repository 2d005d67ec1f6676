//! Metric names (all `tether_*`) and the process-wide Prometheus recorder the hub renders.
//!
//! Names live here, once, so that dashboards and code cannot drift apart.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Counter: connection attempts started (first connects and reconnects).
pub const RECONNECT_ATTEMPTS: &str = "tether_reconnect_attempts_total";
/// Counter: successful reconnects (every handshake after the first one of a transport).
pub const RECONNECTS: &str = "tether_reconnects_total";
/// Counter, label `category`: failed attempts and lost connections by error category.
pub const CONNECTION_FAILURES: &str = "tether_connection_failures_total";
/// Gauge, label `state`: number of client transports in each connection state.
pub const CONNECTION_STATE: &str = "tether_connection_state";
/// Counter, labels `from`, `to`: state transitions.
pub const STATE_TRANSITIONS: &str = "tether_state_transitions_total";
/// Histogram: seconds from losing an established connection to being connected again.
pub const RECOVERY_SECONDS: &str = "tether_recovery_seconds";
/// Counter: lag notices — an event subscriber fell more than its capacity behind and was given
/// the count it missed and the latest transition instead of the transitions themselves.
pub const EVENTS_LAGGED: &str = "tether_events_lagged_total";
/// Gauge: WebSocket connections open on the hub.
pub const HUB_CONNECTIONS: &str = "tether_hub_connections";
/// Counter, label `result` (`welcomed`, `resumed`, `rejected`, `timeout`): hub handshakes.
pub const HUB_HANDSHAKES: &str = "tether_hub_handshakes_total";
/// Counter, label `code`: frames the hub refused (malformed, oversized, unexpected…).
pub const HUB_FRAMES_REJECTED: &str = "tether_hub_frames_rejected_total";
/// Counter: hub connections closed because the client went silent.
pub const HUB_IDLE_TIMEOUTS: &str = "tether_hub_idle_timeouts_total";
/// Counter: frames refused from their header for declaring more than the frame limit.
pub const HUB_OVERSIZED_FRAMES: &str = "tether_hub_oversized_frames_total";
/// Counter: hub connections reset because their writer made no progress for the write
/// timeout (the peer stopped reading).
pub const HUB_WRITE_STALLS: &str = "tether_hub_write_stalls_total";
/// Counter: times the hub stopped reading a connection (backpressure: too many publish bytes
/// awaiting their acks).
pub const HUB_READS_PAUSED: &str = "tether_hub_reads_paused_total";

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often the recorder installed by [`prometheus`] drains its histograms' new samples into
/// their summaries. The recorder keeps every sample recorded since the last drain, and
/// rendering `/metrics` is the only other drain: without this, a hub nobody scrapes would hold
/// every histogram sample it ever recorded (one per acknowledged publish, among others).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the Prometheus recorder as the global `metrics` recorder, once per process, and
/// returns its handle; a thread of its own (`tether-metrics-upkeep`) drains the histograms
/// every [`UPKEEP_INTERVAL`]. `None` when the application had already installed a recorder of
/// its own (then `/metrics` on the hub says so instead of rendering).
pub fn prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    let upkeep = handle.clone();
                    if let Err(e) = spawn_upkeep(UPKEEP_INTERVAL, move || {
                        upkeep.run_upkeep();
                        true
                    }) {
                        // Rendering still drains; only an unscraped hub then keeps samples.
                        tracing::warn!(error = %e, "metrics upkeep thread not started; histograms drain only when /metrics is rendered");
                    }
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder is already installed; /metrics will not render");
                    None
                }
            }
        })
        .clone()
}

/// Runs `upkeep` every `interval` on a thread of its own until it returns `false` (the global
/// recorder's never does: it lives as long as the process).
fn spawn_upkeep(
    interval: Duration,
    mut upkeep: impl FnMut() -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tether-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            if !upkeep() {
                return;
            }
        })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(RECONNECT_ATTEMPTS, "Connection attempts started");
    describe_counter!(RECONNECTS, "Successful reconnects");
    describe_counter!(
        CONNECTION_FAILURES,
        "Failed attempts and lost connections by category"
    );
    describe_gauge!(
        CONNECTION_STATE,
        "Client transports in each connection state"
    );
    describe_counter!(STATE_TRANSITIONS, "Connection state transitions");
    describe_histogram!(
        RECOVERY_SECONDS,
        Unit::Seconds,
        "Connection lost to connected again"
    );
    describe_counter!(
        EVENTS_LAGGED,
        "Lag notices given to event subscribers that fell behind"
    );
    describe_gauge!(HUB_CONNECTIONS, "WebSocket connections open on the hub");
    describe_counter!(HUB_HANDSHAKES, "Hub handshakes by result");
    describe_counter!(HUB_FRAMES_REJECTED, "Frames refused by the hub, by code");
    describe_counter!(HUB_IDLE_TIMEOUTS, "Hub connections closed for silence");
    describe_counter!(
        HUB_OVERSIZED_FRAMES,
        "Frames refused from their header for exceeding the frame limit"
    );
    describe_counter!(
        HUB_READS_PAUSED,
        "Times the hub stopped reading a connection for backpressure"
    );
    describe_counter!(
        HUB_WRITE_STALLS,
        "Hub connections reset because the peer stopped reading"
    );
    describe_counter!(HUB_ADMIN_REQUESTS, "Admin API requests, by result");
    describe_counter!(
        HUB_ADMIN_DISCONNECTS,
        "Connections the admin API dropped, by mode"
    );
    describe_counter!(
        HUB_ADMIN_PEER_ERRORS,
        "Admin peers that did not answer for their part of a request"
    );
    describe_counter!(
        HUB_RESUMES_REFUSED,
        "Session resumes refused (a new session issued), by reason"
    );
}
/// Counter: error frames clients sent to the hub (logged a few per minute per connection).
pub const HUB_CLIENT_ERRORS: &str = "tether_hub_client_errors_total";
/// Counter, label `reason` (`unknown`: no such session or expired; `not_owner`: another
/// identity's or client id's session): `hello.resume` not honoured, a new session issued.
pub const HUB_RESUMES_REFUSED: &str = "tether_hub_resumes_refused_total";
/// Counter: admin API requests, by `result` (`ok`, `unauthorized`, `disabled`).
pub const HUB_ADMIN_REQUESTS: &str = "tether_hub_admin_requests_total";
/// Counter: connections the admin API dropped, by `mode` (`close`, `reset`).
pub const HUB_ADMIN_DISCONNECTS: &str = "tether_hub_admin_disconnects_total";
/// Counter: admin peers that did not answer for their part of an admin request.
pub const HUB_ADMIN_PEER_ERRORS: &str = "tether_hub_admin_peer_errors_total";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upkeep_runs_again_and_again_on_its_own_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = spawn_upkeep(Duration::from_millis(1), move || {
            tx.send(std::thread::current().name().map(str::to_owned))
                .is_ok()
        })
        .unwrap();
        for _ in 0..3 {
            let name = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("upkeep ran");
            assert_eq!(name.as_deref(), Some("tether-metrics-upkeep"));
        }
        drop(rx);
        thread.join().unwrap();
    }
}
