//! The hub against bad input, over real sockets: every malformed, oversized, out-of-order or
//! unknown-version frame gets a typed error frame and a close, and other clients never notice.

use std::time::Duration;

use awc::ws::{self, CloseCode};
use futures::SinkExt as _;
use tether_integration_tests::attack::{
    assert_received_in_order, connected, GatedStore, HealthyPair,
};
use tether_integration_tests::harness::{
    free_addr, init_tracing, start_hub, test_hub_config, wait_for_connections, EventLog,
};
use tether_integration_tests::raw::{attached, error_and_close, hello, next_frame, raw, send};
use tether_transport::hub::Hub;
use tether_transport::protocol::{ErrorCode, Frame};
use tether_transport::{ConnectionState, Transport};

const T: Duration = Duration::from_secs(5);

/// A healthy client beside every bad one: it must not see a single transition.
async fn bystander(url: String) -> (Transport, EventLog) {
    connected(&url).await
}

#[actix_rt::test]
async fn bad_input_gets_typed_errors_and_closes_without_touching_other_clients() {
    init_tracing();
    let config = test_hub_config(free_addr())
        .max_frame_size(64 * 1024)
        .build()
        .unwrap();
    let hub = Hub::start(config).unwrap();
    let url = hub.ws_url();
    let (good, mut good_events) = bystander(url.clone()).await;

    let cases: Vec<(&str, bool, String, ErrorCode, CloseCode)> = vec![
        ("not json", true, "{{{".into(), ErrorCode::MalformedFrame, CloseCode::Protocol),
        ("unknown type", true, r#"{"type":"launch"}"#.into(), ErrorCode::MalformedFrame, CloseCode::Protocol),
        (
            "future version",
            false,
            r#"{"type":"hello","v":9,"client_id":"x"}"#.into(),
            ErrorCode::UnsupportedVersion,
            CloseCode::Policy,
        ),
        (
            "frame before hello",
            false,
            r#"{"type":"welcome","v":1,"session":"s","resumed":false,"heartbeat_ms":1,"idle_timeout_ms":2}"#.into(),
            ErrorCode::UnexpectedFrame,
            CloseCode::Protocol,
        ),
        (
            "second hello",
            true,
            r#"{"type":"hello","v":1,"client_id":"raw"}"#.into(),
            ErrorCode::UnexpectedFrame,
            CloseCode::Protocol,
        ),
        ("oversized", true, "x".repeat(100 * 1024), ErrorCode::FrameTooLarge, CloseCode::Size),
    ];
    for (name, after_hello, text, want_code, want_close) in cases {
        let mut conn = raw(&url).await;
        if after_hello {
            hello(&mut conn).await;
        }
        send(&mut conn, text).await;
        let (code, close) = error_and_close(&mut conn).await;
        assert_eq!(code, Some(want_code), "{name}");
        assert_eq!(close, Some(want_close), "{name}");
    }

    // Binary frames are not part of protocol v1.
    let mut conn = raw(&url).await;
    hello(&mut conn).await;
    conn.send(ws::Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let (code, close) = error_and_close(&mut conn).await;
    assert_eq!(
        (code, close),
        (
            Some(ErrorCode::UnexpectedFrame),
            Some(CloseCode::Unsupported)
        )
    );

    // Every bad connection is gone; the bystander never noticed.
    wait_for_connections(&hub, 1, T).await.unwrap();
    good_events
        .expect_quiet(Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(
        good.status().await.unwrap().state,
        ConnectionState::Connected
    );
    good.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_connection_that_never_says_hello_is_closed() {
    init_tracing();
    let config = test_hub_config(free_addr())
        .hello_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let hub = Hub::start(config).unwrap();
    let mut conn = raw(&hub.ws_url()).await;
    let (code, close) = error_and_close(&mut conn).await;
    assert_eq!(code, Some(ErrorCode::UnexpectedFrame));
    assert_eq!(close, Some(CloseCode::Policy));
    wait_for_connections(&hub, 0, T).await.unwrap();
    hub.stop().await;
}

#[actix_rt::test]
async fn a_flood_of_garbage_connections_leaves_the_hub_serving() {
    init_tracing();
    let hub = start_hub(free_addr());
    let url = hub.ws_url();
    let floods = (0..50).map(|i| {
        let url = url.clone();
        async move {
            let mut conn = raw(&url).await;
            send(&mut conn, format!("garbage {i}")).await;
            error_and_close(&mut conn).await
        }
    });
    let results = futures::future::join_all(floods).await;
    assert!(results
        .iter()
        .all(|(code, _)| *code == Some(ErrorCode::MalformedFrame)));
    let (good, _events) = bystander(url).await;
    good.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn health_and_metrics_endpoints() {
    init_tracing();
    let hub = start_hub(free_addr());
    let (good, _events) = bystander(hub.ws_url()).await;
    let base = format!("http://{}", hub.local_addr());
    let client = awc::Client::new();

    let mut resp = client.get(format!("{base}/health")).send().await.unwrap();
    assert!(resp.status().is_success());
    let health: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["connections"], 1);
    assert_eq!(health["sessions"], 1);
    assert!(health["uptime_s"].as_f64().unwrap() >= 0.0);

    let mut resp = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert!(resp.status().is_success());
    let body = String::from_utf8(resp.body().await.unwrap().to_vec()).unwrap();
    for name in [
        "tether_hub_connections",
        "tether_hub_handshakes_total",
        "tether_reconnect_attempts_total",
        "tether_connection_state",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    good.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn publish_sequence_numbers_outside_one_to_two_to_the_53_are_refused_for_that_publish_only() {
    init_tracing();
    let hub = tether_integration_tests::harness::start_channel_hub(
        free_addr(),
        tether_channels::hub::Retention::default(),
    );
    let mut conn = attached(&hub.ws_url(), "raw", "i", "c", true, "").await;
    for bad in [0u64, 1 << 53, u64::MAX] {
        send(
            &mut conn,
            format!(r#"{{"type":"publish","channel":"c","seq":{bad},"payload":1}}"#),
        )
        .await;
        match next_frame(&mut conn).await {
            Some(Frame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::MalformedFrame);
                assert!(e.permanent);
                assert_eq!(e.seq, Some(bad));
            }
            other => panic!("seq {bad}: expected an error, got {other:?}"),
        }
    }
    // The connection and the channel go on.
    let top = (1u64 << 53) - 1;
    send(
        &mut conn,
        format!(r#"{{"type":"publish","channel":"c","seq":{top},"payload":1}}"#),
    )
    .await;
    loop {
        match next_frame(&mut conn).await {
            Some(Frame::Ack(ack)) => {
                assert_eq!(ack.seq, top);
                break;
            }
            Some(Frame::Message(_)) => continue,
            other => panic!("expected the ack, got {other:?}"),
        }
    }
    hub.stop().await;
}

#[actix_rt::test]
async fn oversized_identifiers_are_refused_with_a_typed_error_while_a_healthy_pair_goes_on() {
    use tether_integration_tests::harness::start_channel_hub;
    init_tracing();
    let hub = start_channel_hub(free_addr(), tether_channels::hub::Retention::default());
    let url = hub.ws_url();
    // The healthy pair: a subscriber and a publisher that keep going throughout.
    let HealthyPair {
        subscriber: sub_t,
        mut sub_events,
        publisher: pub_t,
        mut messages,
        steady,
    } = HealthyPair::start(&url).await;

    let long = "x".repeat(1024 * 1024 - 200);
    let mut published = 0u64;
    let hellos = [
        format!(r#"{{"type":"hello","v":1,"client_id":"{long}"}}"#),
        format!(r#"{{"type":"hello","v":1,"client_id":"ok","instance":"{long}"}}"#),
        format!(r#"{{"type":"hello","v":1,"client_id":"ok","token":"{long}"}}"#),
        format!(r#"{{"type":"hello","v":1,"client_id":"ok","resume":"{long}"}}"#),
        r#"{"type":"hello","v":1,"client_id":""}"#.to_owned(),
    ];
    for text in hellos {
        let mut conn = raw(&url).await;
        send(&mut conn, text).await;
        let (code, close) = error_and_close(&mut conn).await;
        assert_eq!(code, Some(ErrorCode::InvalidIdentifier));
        assert_eq!(close, Some(CloseCode::Policy));
        published += 1;
        steady
            .publish(&published)
            .await
            .expect("the healthy publisher goes on");
    }
    // A too-long producer handle refuses that attach only; the connection goes on.
    let mut conn = raw(&url).await;
    send(
        &mut conn,
        r#"{"type":"hello","v":1,"client_id":"ok","instance":"i"}"#,
    )
    .await;
    assert!(matches!(
        next_frame(&mut conn).await,
        Some(Frame::Welcome(_))
    ));
    send(
        &mut conn,
        format!(
            r#"{{"type":"attach","channel":"c","producer":"{}"}}"#,
            "p".repeat(129)
        ),
    )
    .await;
    match next_frame(&mut conn).await {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, ErrorCode::InvalidIdentifier);
            assert_eq!(e.channel.as_deref(), Some("c"));
            assert!(e.permanent);
        }
        other => panic!("expected an attach error, got {other:?}"),
    }
    send(
        &mut conn,
        r#"{"type":"attach","channel":"c","producer":"p"}"#,
    )
    .await;
    assert!(matches!(
        next_frame(&mut conn).await,
        Some(Frame::Attached(_))
    ));

    // The healthy subscriber got everything, in order, and never saw a transition.
    assert_received_in_order(&mut messages, published).await;
    sub_events
        .expect_quiet(Duration::from_millis(100))
        .await
        .unwrap();
    sub_t.close().await;
    pub_t.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn an_attach_followed_by_a_burst_of_publishes_in_one_write_is_never_refused() {
    init_tracing();
    // Channel actors on the worker that reads the burst (threads 0): a new channel's actor
    // cannot start until the burst has been read, so its mailbox must hold it.
    let service = tether_channels::hub::ChannelService::builder()
        .threads(0)
        .build()
        .unwrap();
    let hub = tether_integration_tests::harness::start_hub_with(free_addr(), service);
    for round in 0..6 {
        let mut conn = raw(&hub.ws_url()).await;
        send(
            &mut conn,
            format!(r#"{{"type":"hello","v":1,"client_id":"b{round}","instance":"i"}}"#),
        )
        .await;
        assert!(matches!(
            next_frame(&mut conn).await,
            Some(Frame::Welcome(_))
        ));
        // A channel nobody used yet: its actor is still starting while the burst arrives.
        let channel = format!("burst-{round}");
        conn.feed(ws::Message::Text(
            format!(r#"{{"type":"attach","channel":"{channel}","subscribe":false}}"#).into(),
        ))
        .await
        .unwrap();
        for seq in 1..=200u64 {
            conn.feed(ws::Message::Text(
                format!(
                    r#"{{"type":"publish","channel":"{channel}","seq":{seq},"payload":{seq}}}"#
                )
                .into(),
            ))
            .await
            .unwrap();
        }
        conn.flush().await.unwrap();
        let mut acked = 0;
        while acked < 200 {
            match next_frame(&mut conn).await {
                Some(Frame::Ack(_)) => acked += 1,
                Some(Frame::Attached(_)) => {}
                other => panic!("round {round}: after {acked} acks, {other:?}"),
            }
        }
    }
    hub.stop().await;
}

#[actix_rt::test]
async fn one_connection_cannot_attach_more_than_its_channel_limit() {
    init_tracing();
    let service = tether_channels::hub::ChannelService::builder()
        .max_channels_per_connection(3)
        .build()
        .unwrap();
    let hub = tether_integration_tests::harness::start_hub_with(free_addr(), service);
    let mut greedy = attached(&hub.ws_url(), "greedy", "i", "c0", true, "").await;
    for c in ["c1", "c2"] {
        send(
            &mut greedy,
            format!(r#"{{"type":"attach","channel":"{c}"}}"#),
        )
        .await;
        assert!(matches!(
            next_frame(&mut greedy).await,
            Some(Frame::Attached(_))
        ));
    }
    send(&mut greedy, r#"{"type":"attach","channel":"c3"}"#).await;
    match next_frame(&mut greedy).await {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, ErrorCode::TooManyChannels);
            assert_eq!(e.channel.as_deref(), Some("c3"));
            assert!(e.permanent);
        }
        other => panic!("expected the limit, got {other:?}"),
    }
    // Re-attaching one it has is not a new channel; detaching one makes room.
    send(&mut greedy, r#"{"type":"attach","channel":"c1"}"#).await;
    assert!(matches!(
        next_frame(&mut greedy).await,
        Some(Frame::Attached(_))
    ));
    send(&mut greedy, r#"{"type":"detach","channel":"c0"}"#).await;
    assert!(matches!(
        next_frame(&mut greedy).await,
        Some(Frame::Detached(_))
    ));
    send(&mut greedy, r#"{"type":"attach","channel":"c3"}"#).await;
    assert!(matches!(
        next_frame(&mut greedy).await,
        Some(Frame::Attached(_))
    ));
    // Another connection has its own allowance.
    let mut other = attached(&hub.ws_url(), "other", "i", "c0", true, "").await;
    send(&mut other, r#"{"type":"attach","channel":"d1"}"#).await;
    assert!(matches!(
        next_frame(&mut other).await,
        Some(Frame::Attached(_))
    ));
    hub.stop().await;
}

/// Accepts everyone after asking a slow "external service" (so frames pipelined behind the
/// hello arrive while it thinks).
struct SlowAuth;

impl tether_transport::hub::Authenticator for SlowAuth {
    fn authenticate(
        &self,
        client_id: &tether_transport::protocol::ClientId,
        _token: Option<&str>,
    ) -> futures::future::BoxFuture<
        'static,
        Result<tether_transport::hub::Identity, tether_transport::hub::AuthRejection>,
    > {
        let identity = tether_transport::hub::Identity::anonymous(client_id);
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            Ok(identity)
        })
    }
}

fn slow_auth_channel_hub() -> tether_transport::hub::HubHandle {
    let service = tether_channels::hub::ChannelService::builder()
        .build()
        .unwrap();
    let config = test_hub_config(free_addr())
        .authenticator(SlowAuth)
        .handler(std::sync::Arc::new(service))
        .build()
        .unwrap();
    Hub::start(config).unwrap()
}

#[actix_rt::test]
async fn frames_pipelined_behind_the_hello_are_served_after_the_welcome() {
    init_tracing();
    let hub = slow_auth_channel_hub();
    let mut conn = raw(&hub.ws_url()).await;
    for text in [
        r#"{"type":"hello","v":1,"client_id":"eager","instance":"i"}"#,
        r#"{"type":"attach","channel":"c"}"#,
        r#"{"type":"publish","channel":"c","seq":1,"payload":"first"}"#,
    ] {
        conn.feed(ws::Message::Text(text.into())).await.unwrap();
    }
    conn.flush().await.unwrap();
    assert!(matches!(
        next_frame(&mut conn).await,
        Some(Frame::Welcome(_))
    ));
    assert!(matches!(
        next_frame(&mut conn).await,
        Some(Frame::Attached(_))
    ));
    let mut acked = false;
    let mut delivered = false;
    while !(acked && delivered) {
        match next_frame(&mut conn).await {
            Some(Frame::Ack(ack)) => acked = ack.seq == 1,
            Some(Frame::Message(m)) => delivered = m.payload.json() == r#""first""#,
            other => panic!("{other:?}"),
        }
    }
    hub.stop().await;
}

#[actix_rt::test]
async fn more_than_64_frames_before_the_welcome_close_the_connection() {
    init_tracing();
    let hub = slow_auth_channel_hub();
    let mut conn = raw(&hub.ws_url()).await;
    conn.feed(ws::Message::Text(
        r#"{"type":"hello","v":1,"client_id":"flood","instance":"i"}"#.into(),
    ))
    .await
    .unwrap();
    for _ in 0..70 {
        conn.feed(ws::Message::Text(
            r#"{"type":"attach","channel":"c"}"#.into(),
        ))
        .await
        .unwrap();
    }
    conn.flush().await.unwrap();
    let (code, close) = error_and_close(&mut conn).await;
    assert_eq!(code, Some(ErrorCode::UnexpectedFrame));
    assert_eq!(close, Some(CloseCode::Policy));
    hub.stop().await;
}

#[actix_rt::test]
async fn a_store_that_stops_keeping_up_bounds_the_queued_publishes_and_no_other_channel_stalls() {
    init_tracing();
    let (gate, open) = tokio::sync::watch::channel(false);
    let store = std::sync::Arc::new(GatedStore::new(open));
    let service = tether_channels::hub::ChannelService::builder()
        .store(store)
        .channel_mailbox(8)
        .build()
        .unwrap();
    let hub = tether_integration_tests::harness::start_hub_with(free_addr(), service);
    let url = hub.ws_url();
    let HealthyPair {
        subscriber: sub_t,
        sub_events: _sub_events,
        publisher: pub_t,
        mut messages,
        steady,
    } = HealthyPair::start(&url).await;

    // Appends in the store (blocked), eight queued behind them: the next one is refused.
    let mut flood = attached(&url, "flood", "i", "slow", false, "p").await;
    for seq in 1..=30u64 {
        flood
            .feed(ws::Message::Text(
                format!(r#"{{"type":"publish","channel":"slow","seq":{seq},"payload":{seq}}}"#)
                    .into(),
            ))
            .await
            .unwrap();
    }
    flood.flush().await.unwrap();
    let first_refusal = match next_frame(&mut flood).await {
        Some(Frame::Error(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(first_refusal.code, ErrorCode::Overloaded);
    // At most 8 queued behind at most two appends in the store (how the first publishes were
    // batched decides which of seq 9, 10, 11 is the first one refused).
    let refused = first_refusal.seq.expect("about a publish");
    assert!((9..=11).contains(&refused), "first refused: {refused}");
    assert!(!first_refusal.permanent);
    let (_, close) = error_and_close(&mut flood).await;
    assert_eq!(close, Some(CloseCode::Again));

    // Meanwhile the other channel flows, in order.
    for i in 1..=20u64 {
        steady
            .publish(&i)
            .await
            .expect("the healthy channel goes on");
    }
    assert_received_in_order(&mut messages, 20).await;
    gate.send_replace(true);
    sub_t.close().await;
    pub_t.close().await;
    hub.stop().await;
}
