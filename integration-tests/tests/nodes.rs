//! Several hub nodes on one real Redis: cross-node fan-out, concurrent publishers on one
//! channel, a hub restart that keeps every epoch, failover of a client between nodes under load,
//! and Redis itself stopping mid-stream — each checked for exactly-once, in-order delivery.

use std::net::SocketAddr;
use std::time::Duration;

use awc::ws;
use futures::StreamExt as _;
use tether_channels::hub::Retention;
use tether_channels::{
    BufferLimits, Channel, ChannelEvent, ChannelEvents, ChannelOptions, PublishFuture,
};
use tether_integration_tests::harness::{
    collect_messages, fast_client, free_addr, init_tracing, open_attached, redis_channel_service,
    start_hub_with, ws_url,
};
use tether_integration_tests::raw::{attached, next_frame, raw, send, Conn};
use tether_integration_tests::{Persistence, RedisServer};
use tether_transport::hub::HubHandle;
use tether_transport::protocol::{Ack, Epoch, ErrorCode, Frame, Offset};
use tether_transport::{Transport, TransportConfig};

const T: Duration = Duration::from_secs(20);

fn keep(max_messages: usize) -> Retention {
    Retention {
        max_messages,
        ..Retention::default()
    }
}

/// One hub node on the Redis at `url`.
fn node(url: &str, bind: SocketAddr) -> HubHandle {
    start_hub_with(bind, redis_channel_service(url, keep(100_000)))
}

/// A client that reconnects quickly, never suspends, and rotates through `urls`.
fn client(urls: &[String]) -> Transport {
    let mut builder = fast_client(urls[0].clone());
    for url in &urls[1..] {
        builder = builder.endpoint(url.clone());
    }
    let config: TransportConfig = builder
        .max_attempts(None)
        .stability_window(Duration::from_millis(100))
        .build()
        .unwrap();
    Transport::start(config)
}

fn publisher_options() -> ChannelOptions {
    ChannelOptions {
        subscribe: false,
        limits: BufferLimits {
            max_messages: 50_000,
            ..BufferLimits::default()
        },
        ..ChannelOptions::default()
    }
}

/// Attaches `name` as a subscriber on `transport`; its events.
async fn subscribe(transport: &Transport, name: &str) -> ChannelEvents {
    let (_channel, events, _) = open_attached(transport, name, ChannelOptions::default(), T)
        .await
        .unwrap();
    events
}

/// Attaches `name` as a publisher on `transport`.
async fn publishing(transport: &Transport, name: &str) -> Channel {
    let (channel, _, _) = open_attached(transport, name, publisher_options(), T)
        .await
        .unwrap();
    channel
}

/// Asserts the events are messages with contiguous offsets in one epoch (no discontinuity),
/// and returns `(epoch, payloads)`.
fn in_order(events: &[ChannelEvent]) -> (Option<Epoch>, Vec<String>) {
    let mut epoch = None;
    let mut last: Option<Offset> = None;
    let mut out = Vec::new();
    for ev in events {
        match ev {
            ChannelEvent::Message(m) => {
                if let Some(last) = last {
                    assert_eq!(m.offset, last.next(), "offsets must be contiguous");
                }
                if let Some(e) = &epoch {
                    assert_eq!(&m.epoch, e, "one epoch");
                }
                epoch = Some(m.epoch.clone());
                last = Some(m.offset);
                out.push(m.payload.decode::<String>().unwrap());
            }
            ChannelEvent::Discontinuity(d) => panic!("unexpected discontinuity {d:?}"),
        }
    }
    (epoch, out)
}

async fn acked_all(futures: Vec<PublishFuture>) -> Vec<u64> {
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(futures))
        .await
        .expect("every publish answered within 60 s");
    results
        .into_iter()
        .map(|r| r.expect("acknowledged").offset.expect("placed").0)
        .collect()
}

/// The offsets the acks of `futures` give (none for a duplicate of unknown offset).
async fn acked_placed(futures: Vec<PublishFuture>) -> Vec<Option<u64>> {
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(futures))
        .await
        .expect("every publish answered within 60 s");
    results
        .into_iter()
        .map(|r| r.expect("acknowledged").offset.map(|o| o.0))
        .collect()
}

async fn nothing_more(events: &mut ChannelEvents) {
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
        panic!("unexpected extra event {extra:?}");
    }
}

fn publish_range(
    channel: &Channel,
    tag: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Vec<PublishFuture> {
    range
        .map(|i| channel.publish(&format!("{tag}-{i}")))
        .collect()
}

#[actix_rt::test]
async fn a_message_published_on_one_node_reaches_subscribers_on_every_node_once_in_order() {
    init_tracing();
    let redis = RedisServer::start().expect("redis");
    let a = node(&redis.url(), free_addr());
    let b = node(&redis.url(), free_addr());
    let sub_a = client(&[a.ws_url()]);
    let sub_b = client(&[b.ws_url()]);
    let publisher = client(&[a.ws_url()]);
    let mut events_a = subscribe(&sub_a, "room").await;
    let mut events_b = subscribe(&sub_b, "room").await;
    let room = publishing(&publisher, "room").await;

    let offsets = acked_all(publish_range(&room, "m", 1..=300)).await;
    assert_eq!(offsets, (1..=300).collect::<Vec<_>>());
    let expected: Vec<String> = (1..=300).map(|i| format!("m-{i}")).collect();
    for events in [&mut events_a, &mut events_b] {
        let got = collect_messages(events, 300, T).await.unwrap();
        let (_, payloads) = in_order(&got);
        assert_eq!(payloads, expected);
        nothing_more(events).await;
    }
    for t in [sub_a, sub_b, publisher] {
        t.close().await;
    }
    a.stop().await;
    b.stop().await;
}

#[actix_rt::test]
async fn publishers_on_two_nodes_share_one_order() {
    init_tracing();
    let redis = RedisServer::start().expect("redis");
    let a = node(&redis.url(), free_addr());
    let b = node(&redis.url(), free_addr());
    let sub_a = client(&[a.ws_url()]);
    let sub_b = client(&[b.ws_url()]);
    let pub_a = client(&[a.ws_url()]);
    let pub_b = client(&[b.ws_url()]);
    let mut events_a = subscribe(&sub_a, "shared").await;
    let mut events_b = subscribe(&sub_b, "shared").await;
    let on_a = publishing(&pub_a, "shared").await;
    let on_b = publishing(&pub_b, "shared").await;

    const N: u64 = 500;
    let mut futures = publish_range(&on_a, "a", 1..=N);
    futures.extend(publish_range(&on_b, "b", 1..=N));
    let mut offsets = acked_all(futures).await;
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=2 * N).collect::<Vec<_>>(), "no offset twice");

    let got_a = collect_messages(&mut events_a, 2 * N as usize, T)
        .await
        .unwrap();
    let got_b = collect_messages(&mut events_b, 2 * N as usize, T)
        .await
        .unwrap();
    let (_, order_a) = in_order(&got_a);
    let (_, order_b) = in_order(&got_b);
    assert_eq!(order_a, order_b, "every node delivers the same order");
    for tag in ["a", "b"] {
        let mine: Vec<&String> = order_a.iter().filter(|p| p.starts_with(tag)).collect();
        let expected: Vec<String> = (1..=N).map(|i| format!("{tag}-{i}")).collect();
        assert_eq!(
            mine,
            expected.iter().collect::<Vec<_>>(),
            "each publisher's order kept"
        );
    }
    nothing_more(&mut events_a).await;
    nothing_more(&mut events_b).await;
    for t in [sub_a, sub_b, pub_a, pub_b] {
        t.close().await;
    }
    a.stop().await;
    b.stop().await;
}

#[actix_rt::test]
async fn a_restarted_hub_keeps_every_epoch_and_subscribers_resume_without_a_gap() {
    init_tracing();
    let redis = RedisServer::start().expect("redis");
    let bind = free_addr();
    let hub = node(&redis.url(), bind);
    let subscriber = client(&[ws_url(bind)]);
    let publisher = client(&[ws_url(bind)]);
    let mut events = subscribe(&subscriber, "news").await;
    let news = publishing(&publisher, "news").await;
    acked_all(publish_range(&news, "before", 1..=100)).await;
    let before = collect_messages(&mut events, 100, T).await.unwrap();

    // The hub process goes away with its memory; a new one comes up on the same port.
    hub.stop().await;
    let pending = publish_range(&news, "during", 1..=50);
    let hub = node(&redis.url(), bind);
    acked_all(pending).await;
    acked_all(publish_range(&news, "after", 1..=50)).await;
    let after = collect_messages(&mut events, 100, T).await.unwrap();

    let mut all = before;
    all.extend(after);
    let (_, payloads) = in_order(&all);
    let expected: Vec<String> = (1..=100)
        .map(|i| format!("before-{i}"))
        .chain((1..=50).map(|i| format!("during-{i}")))
        .chain((1..=50).map(|i| format!("after-{i}")))
        .collect();
    assert_eq!(
        payloads, expected,
        "no gap, no duplicate, one epoch across the restart"
    );
    nothing_more(&mut events).await;
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_client_fails_over_to_another_node_under_load_with_nothing_lost_or_repeated() {
    init_tracing();
    let redis = RedisServer::start().expect("redis");
    let (bind_a, bind_b) = (free_addr(), free_addr());
    let a = node(&redis.url(), bind_a);
    let b = node(&redis.url(), bind_b);
    let urls = [ws_url(bind_a), ws_url(bind_b)];
    // Publisher and subscriber both start on node A (first endpoint); a watcher sits on B.
    let on_a = client(&urls);
    let watcher = client(&[ws_url(bind_b)]);
    let mut watched = subscribe(&watcher, "live").await;
    let both = ChannelOptions {
        subscribe: true,
        ..publisher_options()
    };
    let (live, mut events, _) = open_attached(&on_a, "live", both, T).await.unwrap();

    const N: u64 = 2000;
    // Publish in a steady stream, and kill node A once a third has arrived.
    let publishing = actix_rt::spawn({
        let live = live.clone();
        async move {
            let mut futures = Vec::new();
            for i in 1..=N {
                futures.push(live.publish(&format!("m-{i}")));
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            acked_all(futures).await
        }
    });
    let first = collect_messages(&mut events, (N / 3) as usize, T)
        .await
        .unwrap();
    a.stop().await;
    let rest = collect_messages(&mut events, (N - N / 3) as usize, Duration::from_secs(60))
        .await
        .unwrap();
    let mut offsets = publishing.await.unwrap();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(
        offsets.len(),
        N as usize,
        "every publish stored exactly once"
    );

    let expected: Vec<String> = (1..=N).map(|i| format!("m-{i}")).collect();
    let mut all = first;
    all.extend(rest);
    let (_, payloads) = in_order(&all);
    assert_eq!(
        payloads, expected,
        "the failed-over subscriber: exactly once, in order"
    );
    let seen_by_b = collect_messages(&mut watched, N as usize, T).await.unwrap();
    assert_eq!(
        in_order(&seen_by_b).1,
        expected,
        "the other node's subscriber too"
    );
    nothing_more(&mut events).await;
    assert_eq!(b.connection_count(), 2, "the client moved to node B");
    on_a.close().await;
    watcher.close().await;
    b.stop().await;
}

#[actix_rt::test]
async fn redis_stopping_mid_stream_loses_nothing_acknowledged_and_reports_no_false_gap() {
    init_tracing();
    let mut redis = RedisServer::start_with(Persistence::AofAlways).expect("redis");
    let hub = node(&redis.url(), free_addr());
    let subscriber = client(&[hub.ws_url()]);
    let publisher = client(&[hub.ws_url()]);
    let mut events = subscribe(&subscriber, "orders").await;
    let orders = publishing(&publisher, "orders").await;
    let health_url = format!("http://{}/health", hub.local_addr());
    let http = awc::Client::default();

    acked_all(publish_range(&orders, "m", 1..=200)).await;
    redis.kill();
    // Publishes while Redis is down are refused for now, kept by the client, replayed later.
    let pending = publish_range(&orders, "m", 201..=400);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let mut response = http.get(&health_url).send().await.unwrap();
        let body: serde_json::Value = response.json().await.unwrap();
        if body["status"] == "unhealthy" {
            assert_eq!(response.status().as_u16(), 503);
            assert_eq!(body["store"]["kind"], "redis");
            assert!(body["store"]["reason"].is_string(), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never unhealthy: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.restart().unwrap();
    // Every publish is acknowledged. An append whose answer was lost with the connection to
    // Redis may still have applied: its publishes come back as replays, acknowledged as
    // duplicates, and this store does not remember the offsets of older duplicates — such an
    // ack carries none (PROTOCOL.md §5). Where an offset is given, it is the right one.
    let offsets = acked_placed(pending).await;
    for (seq, offset) in (201..=400).zip(&offsets) {
        assert!(
            offset.is_none_or(|o| o == seq),
            "publish {seq} acked at {offset:?}"
        );
    }
    let got = collect_messages(&mut events, 400, T).await.unwrap();
    let (_, payloads) = in_order(&got);
    assert_eq!(
        payloads,
        (1..=400).map(|i| format!("m-{i}")).collect::<Vec<_>>()
    );
    nothing_more(&mut events).await;
    let body: serde_json::Value = http
        .get(&health_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "ok", "{body}");
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_redis_that_lost_its_data_is_reported_as_a_discontinuity_never_as_silence() {
    init_tracing();
    let mut redis = RedisServer::start().expect("redis");
    let hub = node(&redis.url(), free_addr());
    let subscriber = client(&[hub.ws_url()]);
    let publisher = client(&[hub.ws_url()]);
    let mut events = subscribe(&subscriber, "feed").await;
    let feed = publishing(&publisher, "feed").await;
    acked_all(publish_range(&feed, "old", 1..=20)).await;
    let old = collect_messages(&mut events, 20, T).await.unwrap();
    let (old_epoch, _) = in_order(&old);
    redis.restart().unwrap(); // no persistence: everything is gone
                              // In small steps: the new epoch's head stays below the old one for a while, and nothing
                              // of the old epoch (a late notice, a remembered head) may make it look lost again.
    let mut offsets = Vec::new();
    for step in [1..=3, 4..=8, 9..=20] {
        offsets.extend(acked_all(publish_range(&feed, "new", step)).await);
    }
    assert_eq!(
        offsets,
        (1..=20).collect::<Vec<_>>(),
        "numbering restarts in a new epoch"
    );
    let got = collect_messages(&mut events, 20, T).await.unwrap();
    let ChannelEvent::Discontinuity(gap) = &got[0] else {
        panic!("the new epoch must be announced first: {:?}", got[0]);
    };
    assert_eq!(Some(&gap.from.epoch), old_epoch.as_ref());
    assert_eq!(gap.from.offset, Offset(21));
    let (new_epoch, payloads) = in_order(&got[1..]);
    assert_ne!(new_epoch, old_epoch);
    assert_eq!(
        payloads,
        (1..=20).map(|i| format!("new-{i}")).collect::<Vec<_>>()
    );
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

/// Reads frames until an `ack` for `seq` arrives (messages on the way are skipped).
async fn ack_of(conn: &mut Conn, seq: u64) -> Ack {
    loop {
        match next_frame(conn).await {
            Some(Frame::Ack(ack)) if ack.seq == seq => return ack,
            Some(Frame::Ack(_)) | Some(Frame::Message(_)) => continue,
            other => panic!("expected the ack of {seq}, got {other:?}"),
        }
    }
}

/// A raw connection as one client instance, with `channel` attached by handle `producer`.
async fn raw_publisher(url: &str, channel: &str, producer: &str) -> Conn {
    attached(url, "dup", "i1", channel, false, producer).await
}

fn publish_frame(channel: &str, seq: u64) -> String {
    format!(r#"{{"type":"publish","channel":"{channel}","seq":{seq},"payload":{seq}}}"#)
}

#[actix_rt::test]
async fn a_publish_stored_through_one_node_is_recognised_through_another() {
    init_tracing();
    let redis = RedisServer::start().expect("redis");
    let a = node(&redis.url(), free_addr());
    let b = node(&redis.url(), free_addr());
    let mut via_a = raw_publisher(&a.ws_url(), "orders", "handle").await;
    let mut epoch = None;
    for seq in 1..=3 {
        send(&mut via_a, publish_frame("orders", seq)).await;
        let ack = ack_of(&mut via_a, seq).await;
        assert_eq!((ack.offset, ack.duplicate), (Some(Offset(seq)), false));
        epoch = ack.epoch;
    }
    // The same instance and handle on node B resends 2 and 3 (their acks were "lost") and
    // goes on with 4.
    let mut via_b = raw_publisher(&b.ws_url(), "orders", "handle").await;
    for seq in 2..=4 {
        send(&mut via_b, publish_frame("orders", seq)).await;
    }
    for (seq, offset, duplicate) in [(2, 2, true), (3, 3, true), (4, 4, false)] {
        let ack = ack_of(&mut via_b, seq).await;
        assert_eq!(
            (ack.offset, ack.duplicate, ack.epoch.clone()),
            (Some(Offset(offset)), duplicate, epoch.clone()),
            "seq {seq}"
        );
    }
    a.stop().await;
    b.stop().await;
}

#[actix_rt::test]
async fn with_redis_down_a_publish_gets_unavailable_and_a_1013_close_and_an_attach_a_channel_error()
{
    init_tracing();
    let mut redis = RedisServer::start_with(Persistence::AofAlways).expect("redis");
    let hub = node(&redis.url(), free_addr());
    let mut publisher = raw_publisher(&hub.ws_url(), "orders", "handle").await;
    send(&mut publisher, publish_frame("orders", 1)).await;
    assert_eq!(ack_of(&mut publisher, 1).await.offset, Some(Offset(1)));

    redis.kill();
    send(&mut publisher, publish_frame("orders", 2)).await;
    let mut refused = None;
    let close = loop {
        match tokio::time::timeout(T, publisher.next())
            .await
            .expect("in time")
        {
            Some(Ok(ws::Frame::Text(bytes))) => {
                if let Ok(Frame::Error(e)) =
                    Frame::decode(std::str::from_utf8(&bytes).unwrap(), usize::MAX)
                {
                    if e.seq == Some(2) {
                        refused = Some(e);
                    }
                }
            }
            Some(Ok(ws::Frame::Close(reason))) => break reason.map(|r| r.code),
            Some(Ok(_)) => continue,
            other => panic!("expected an error and a close, got {other:?}"),
        }
    };
    let refused = refused.expect("an error about publish 2");
    assert_eq!(refused.code, ErrorCode::Unavailable);
    assert!(!refused.permanent, "retryable: the client resends it later");
    assert_eq!(close, Some(ws::CloseCode::Again));

    // An attach while Redis is down is refused for that channel only; the connection stays.
    let mut other = raw(&hub.ws_url()).await;
    send(&mut other, r#"{"type":"hello","v":1,"client_id":"other"}"#).await;
    assert!(matches!(
        next_frame(&mut other).await,
        Some(Frame::Welcome(_))
    ));
    send(&mut other, r#"{"type":"attach","channel":"fresh"}"#).await;
    match next_frame(&mut other).await {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert_eq!(e.channel.as_deref(), Some("fresh"));
            assert!(!e.permanent);
        }
        other => panic!("expected a channel error, got {other:?}"),
    }
    redis.restart().unwrap();
    // The same connection attaches once Redis answers again.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        send(&mut other, r#"{"type":"attach","channel":"fresh"}"#).await;
        match next_frame(&mut other).await {
            Some(Frame::Attached(_)) => break,
            Some(Frame::Error(e)) if e.code == ErrorCode::Unavailable => {
                assert!(tokio::time::Instant::now() < deadline, "never attached");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    hub.stop().await;
}
