//! The hub against hostile peers, over real sockets: lying frame headers, peers that stop
//! reading, replay amplification, and a graceful stop. Every attack runs beside a healthy
//! publisher/subscriber pair that must lose nothing and not stall, and the process's peak
//! memory must stay within what the hub's budgets allow.

use std::sync::Arc;
use std::time::Duration;

use actix_http::ws::Frame as WsFrame;
use tether_channels::hub::{ChannelService, Retention};
use tether_channels::ChannelOptions;
use tether_integration_tests::attack::{
    connected, current_rss, frame_header, peak_rss, reset_peak_rss, GatedStore, HealthyPair,
    HostilePeer, Read,
};
use tether_integration_tests::harness::{
    free_addr, init_tracing, open_attached, test_hub_config, wait_for_connections,
};
use tether_transport::hub::{Hub, HubConfigBuilder, HubHandle};
use tether_transport::protocol::{ErrorCode, Frame, RetryWindow};
use tether_transport::ConnectionState;

const T: Duration = Duration::from_secs(10);
const MIB: u64 = 1024 * 1024;

/// Peak memory is one figure per process: the tests that measure it take turns.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn channel_hub(config: HubConfigBuilder, retention: Retention) -> HubHandle {
    let service = ChannelService::builder()
        .retention(retention)
        .build()
        .expect("valid channel service");
    Hub::start(
        config
            .handler(Arc::new(service))
            .build()
            .expect("valid hub config"),
    )
    .expect("hub starts")
}

fn retention(max_bytes: usize) -> Retention {
    Retention {
        max_messages: 100_000,
        max_bytes,
        ..Retention::default()
    }
}

fn text_frame(read: &Read) -> Option<Frame> {
    match read {
        Read::Frame(WsFrame::Text(bytes)) => {
            Frame::decode(std::str::from_utf8(bytes).ok()?, usize::MAX).ok()
        }
        _ => None,
    }
}

#[actix_rt::test]
async fn an_oversized_frame_header_is_refused_before_its_payload_is_buffered() {
    init_tracing();
    let _turn = MEASURING.lock().await;
    let hub = channel_hub(
        test_hub_config(free_addr()).max_frame_size(64 * 1024),
        retention(MIB as usize),
    );
    let mut pair = HealthyPair::start(&hub.ws_url()).await;
    pair.publish_acked(1, 20).await;
    reset_peak_rss();
    let before = current_rss();
    for declared in [64 * MIB, 1 << 40] {
        let mut peer = HostilePeer::connect(hub.local_addr(), "/ws", None).await;
        peer.hello("liar").await;
        // The header and the first kilobyte of its "payload" in one write.
        let mut bytes = frame_header(declared);
        bytes.extend(vec![b'x'; 1024]);
        let started = tokio::time::Instant::now();
        peer.send_raw(&bytes).await.unwrap();
        let error = text_frame(&peer.next_frame(T).await);
        match error {
            Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::FrameTooLarge),
            other => panic!("expected frame_too_large, got {other:?}"),
        }
        assert_eq!(peer.until_close(T).await.ok(), Some(1009), "{declared}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused from the header, not after the payload: {:?}",
            started.elapsed()
        );
        // The connection is gone: the rest of the promised payload cannot be sent.
        let chunk = vec![b'x'; 256 * 1024];
        let mut sent = 0u64;
        while sent < 64 * MIB && peer.send_raw(&chunk).await.is_ok() {
            sent += chunk.len() as u64;
        }
        assert!(sent < 64 * MIB, "the hub kept reading a refused frame");
    }
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 16 * MIB, "peak memory grew by {grown} bytes");
    let stall = pair.publish_acked(21, 40).await;
    pair.assert_received_in_order(40).await;
    tracing::info!(?stall, grown, "healthy pair beside lying headers");
    pair.sub_events
        .expect_quiet(Duration::from_millis(100))
        .await
        .unwrap();
}

#[actix_rt::test]
async fn a_subscriber_that_stops_reading_is_reset_at_the_tcp_level_and_stalls_nobody() {
    init_tracing();
    let _turn = MEASURING.lock().await;
    let config = test_hub_config(free_addr())
        .outbound_budget(256 * 1024)
        .write_timeout(Duration::from_secs(1))
        .close_timeout(Duration::from_millis(500));
    let hub = channel_hub(config, retention(4 * MIB as usize));
    let mut pair = HealthyPair::start(&hub.ws_url()).await;
    let (flooder, _) = connected(&hub.ws_url()).await;
    let (flood, _, _) = open_attached(&flooder, "flood", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    wait_for_connections(&hub, 3, T).await.unwrap();

    // A subscriber with a tiny receive window that reads nothing after its attach.
    let mut sleeper = HostilePeer::connect(hub.local_addr(), "/ws", Some(4096)).await;
    sleeper.hello("sleeper").await;
    sleeper
        .send_text(r#"{"type":"attach","channel":"flood","subscribe":true}"#)
        .await
        .unwrap();
    match text_frame(&sleeper.next_frame(T).await) {
        Some(Frame::Attached(_)) => {}
        other => panic!("expected attached, got {other:?}"),
    }
    reset_peak_rss();
    let before = current_rss();
    let started = tokio::time::Instant::now();
    // 8 MiB at it, as fast as the publisher can; the healthy pair goes on meanwhile.
    let blob = "z".repeat(16 * 1024);
    let acks: Vec<_> = (0..512).map(|_| flood.publish(&blob)).collect();
    let stall = pair.publish_acked(1, 100).await;
    for ack in acks {
        ack.await.expect("the flood is stored");
    }
    // Closed by the hub without the sleeper reading a byte more: the write stall is seen
    // within the write timeout, and the TCP connection is reset.
    wait_for_connections(&hub, 3, Duration::from_secs(8))
        .await
        .unwrap();
    let closed_after = started.elapsed();
    match sleeper.until_closed(T).await {
        Read::Reset(_) | Read::Eof => {}
        other => panic!("{other:?}"),
    }
    let grown = peak_rss().saturating_sub(before);
    tracing::info!(?closed_after, ?stall, grown, "slow consumer");
    assert!(
        closed_after < Duration::from_secs(6),
        "took {closed_after:?}"
    );
    assert!(
        stall < Duration::from_secs(1),
        "healthy publish waited {stall:?}"
    );
    assert!(grown < 64 * MIB, "peak memory grew by {grown} bytes");
    pair.assert_received_in_order(100).await;
}

#[actix_rt::test]
async fn repeated_resumes_from_the_start_are_paced_by_the_outbound_budget() {
    init_tracing();
    let _turn = MEASURING.lock().await;
    let config = test_hub_config(free_addr())
        .outbound_budget(MIB as usize)
        .write_timeout(Duration::from_secs(2))
        .close_timeout(Duration::from_millis(500));
    let hub = channel_hub(config, retention(32 * MIB as usize));
    let (filler, _) = connected(&hub.ws_url()).await;
    let (big, _, _) = open_attached(&filler, "big", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    // 16 MiB of history, in rounds that fit the publisher's 16 MiB outbox.
    let blob = "h".repeat(256 * 1024);
    for _ in 0..4 {
        let acks: Vec<_> = (0..16).map(|_| big.publish(&blob)).collect();
        for ack in acks {
            ack.await.expect("stored");
        }
    }
    let mut pair = HealthyPair::start(&hub.ws_url()).await;
    wait_for_connections(&hub, 3, T).await.unwrap();

    reset_peak_rss();
    let before = current_rss();
    // Two connections, 24 resumes from the start each, and neither reads a byte of it.
    let mut peers = Vec::new();
    for i in 0..2 {
        let mut peer = HostilePeer::connect(hub.local_addr(), "/ws", Some(4096)).await;
        peer.hello(&format!("amplifier-{i}")).await;
        for _ in 0..24 {
            peer.send_text(
                r#"{"type":"attach","channel":"big","subscribe":true,"resume":{"epoch":"elsewhere","offset":0}}"#,
            )
            .await
            .unwrap();
        }
        peers.push(peer);
    }
    let stall = pair.publish_acked(1, 50).await;
    // Their replays wait for sockets that never drain, until the write timeout resets them.
    wait_for_connections(&hub, 3, Duration::from_secs(8))
        .await
        .unwrap();
    let grown = peak_rss().saturating_sub(before);
    tracing::info!(grown, ?stall, "replay amplification");
    // Before the budget: +1.1 GiB for this attack (every replay materialised at once).
    assert!(grown < 64 * MIB, "peak memory grew by {grown} bytes");
    assert!(
        stall < Duration::from_secs(1),
        "healthy publish waited {stall:?}"
    );
    pair.assert_received_in_order(50).await;
}

/// The hub's counter `name` from its `/metrics`.
async fn hub_counter(hub: &HubHandle, name: &str) -> u64 {
    let url = format!("http://{}/metrics", hub.local_addr());
    let mut response = awc::Client::new().get(url).send().await.expect("/metrics");
    let body = response.body().await.expect("metrics body");
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[actix_rt::test]
async fn a_publisher_outrunning_a_stalled_store_is_held_back_by_tcp_not_by_hub_memory() {
    init_tracing();
    let _turn = MEASURING.lock().await;
    let (gate, open) = tokio::sync::watch::channel(false);
    let service = ChannelService::builder()
        .store(Arc::new(GatedStore::new(open)))
        .max_in_flight_bytes_per_connection(MIB as usize)
        .build()
        .unwrap();
    let hub = Hub::start(
        test_hub_config(free_addr())
            .handler(Arc::new(service))
            .build()
            .unwrap(),
    )
    .unwrap();
    let mut pair = HealthyPair::start(&hub.ws_url()).await;
    let mut publisher = HostilePeer::connect(hub.local_addr(), "/ws", None).await;
    publisher.hello("eager").await;
    publisher
        .send_text(r#"{"type":"attach","channel":"slow","subscribe":false,"producer":"p"}"#)
        .await
        .unwrap();
    match text_frame(&publisher.next_frame(T).await) {
        Some(Frame::Attached(_)) => {}
        other => panic!("expected attached, got {other:?}"),
    }
    // 12 MiB of publishes at a store that answers nothing, framed before measuring.
    let blob = "s".repeat(256 * 1024);
    let publishes: Vec<String> = (1..=48)
        .map(|seq| {
            format!(r#"{{"type":"publish","channel":"slow","seq":{seq},"payload":"{blob}"}}"#)
        })
        .collect();
    let bytes = publisher.frame_texts(&publishes);
    drop(publishes);
    let paused_before = hub_counter(&hub, "tether_hub_reads_paused_total").await;
    reset_peak_rss();
    let before = current_rss();
    let writer = actix_rt::spawn(async move {
        publisher.send_raw(&bytes).await.expect("written once read");
        publisher
    });
    // The hub stops reading the publisher once 1 MiB waits for the store.
    let deadline = tokio::time::Instant::now() + T;
    while hub_counter(&hub, "tether_hub_reads_paused_total").await <= paused_before {
        assert!(tokio::time::Instant::now() < deadline, "never paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stall = pair.publish_acked(1, 30).await;
    let grown = peak_rss().saturating_sub(before);
    tracing::info!(grown, ?stall, "publisher held back");
    // Without the bound the hub would hold all 12 MiB; the rest waits in TCP buffers.
    assert!(grown < 8 * MIB, "peak memory grew by {grown} bytes");
    // The store comes back: everything is read, stored once and acknowledged in order.
    gate.send_replace(true);
    let mut publisher = writer.await.unwrap();
    let mut acked = Vec::new();
    while acked.len() < 48 {
        match text_frame(&publisher.next_frame(T).await) {
            Some(Frame::Ack(ack)) => {
                assert!(!ack.duplicate);
                acked.push(ack.seq);
            }
            Some(other) => panic!("{other:?}"),
            None => {}
        }
    }
    assert_eq!(acked, (1..=48).collect::<Vec<u64>>());
    assert!(stall < Duration::from_secs(1), "{stall:?}");
    pair.assert_received_in_order(30).await;
}

#[actix_rt::test]
async fn a_stopping_hub_says_shutting_down_and_clients_come_back_within_its_window() {
    init_tracing();
    let window = (Duration::from_millis(300), Duration::from_millis(600));
    let addr = free_addr();
    let config = test_hub_config(addr).shutdown_retry(window.0, window.1);
    let hub = channel_hub(config.clone(), retention(MIB as usize));
    let (_client, mut events) = connected(&hub.ws_url()).await;
    let mut peer = HostilePeer::connect(addr, "/ws", None).await;
    peer.hello("watcher").await;
    wait_for_connections(&hub, 2, T).await.unwrap();

    let started = tokio::time::Instant::now();
    let stopping = actix_rt::spawn(hub.stop());
    match text_frame(&peer.next_frame(T).await) {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, ErrorCode::ShuttingDown);
            assert!(!e.permanent);
            assert_eq!(e.retry_after_ms, Some(RetryWindow::new(window.0, window.1)));
        }
        other => panic!("expected shutting_down, got {other:?}"),
    }
    assert_eq!(peer.until_close(T).await.ok(), Some(1001));
    // Answer the close: the hub ends the TCP connection right away (no 1 s linger).
    let answered = tokio::time::Instant::now();
    let mut close = Vec::new();
    {
        use actix_codec::Encoder as _;
        let mut codec = actix_http::ws::Codec::new().client_mode();
        let mut buf = bytes::BytesMut::new();
        codec
            .encode(actix_http::ws::Message::Close(None), &mut buf)
            .unwrap();
        close.extend_from_slice(&buf);
    }
    peer.send_raw(&close).await.unwrap();
    assert!(matches!(
        peer.until_closed(T).await,
        Read::Eof | Read::Reset(_)
    ));
    let linger = answered.elapsed();
    assert!(linger < Duration::from_millis(500), "lingered {linger:?}");

    // The client was told, not cut: it comes back at a moment inside the window.
    let lost = events
        .until_state(ConnectionState::Disconnected, T)
        .await
        .unwrap();
    let retry_in = lost.retry_in.expect("a retry is scheduled");
    assert!(
        retry_in >= window.0 && retry_in <= window.1,
        "retry in {retry_in:?}"
    );
    stopping.await.unwrap();
    let stop_took = started.elapsed();
    assert!(
        stop_took < Duration::from_secs(2),
        "the drain waited {stop_took:?} for clients that had left"
    );
    // Back up on the same port: the client reconnects by itself.
    let _hub = channel_hub(config, retention(MIB as usize));
    events
        .until_state(ConnectionState::Connected, T)
        .await
        .unwrap();
}
