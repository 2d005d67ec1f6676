//! The delivery invariants over real sockets: a real hub, real clients, the fault proxy in
//! between. No message lost, none duplicated, every gap reported.

use std::time::Duration;

use tether_channels::hub::{ChannelService, Retention};
use tether_channels::{
    BufferLimits, ChannelError, ChannelEvent, ChannelOptions, ChannelReason, ChannelState,
};
use tether_integration_tests::harness::{
    account_for, collect_messages, fast_client, free_addr, init_tracing, open_attached,
    read_to_end, start_channel_hub, start_hub_with, ws_url, EventLog,
};
use tether_integration_tests::FaultProxy;
use tether_transport::protocol::Offset;
use tether_transport::{event_channel, ConnectionState, StateEvent, Transport, TransportConfig};

const T: Duration = Duration::from_secs(10);

/// Waits for every future, but never forever: an unanswered publish fails the test.
async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(futures))
        .await
        .expect("every publish answered within 60 s")
}

/// Publishes `range` on `channel` and waits until every one is acknowledged.
async fn publish_all(
    channel: &tether_channels::Channel,
    range: std::ops::RangeInclusive<u64>,
) -> Vec<tether_channels::PublishAck> {
    join_all(range.map(|i| channel.publish(&i)))
        .await
        .into_iter()
        .map(|r| r.expect("publish acknowledged"))
        .collect()
}

/// Cuts a client off (its proxy refuses new connections and cuts the current ones) and waits
/// until its channel is suspended.
async fn take_offline(
    proxy: &FaultProxy,
    states: &mut EventLog<tether_channels::ChannelStateChanged>,
) {
    proxy.refuse_for(Duration::from_secs(60));
    proxy.cut_all();
    states
        .until_channel_state(ChannelState::Suspended, T)
        .await
        .unwrap();
}

/// Asserts that no further event arrives (no duplicate trails behind the last message).
async fn nothing_more(events: &mut tether_channels::ChannelEvents) {
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
        panic!("unexpected extra event {extra:?}");
    }
}

/// The ack of one publish, within a timeout.
async fn acked(publish: tether_channels::PublishFuture) -> tether_channels::PublishAck {
    tokio::time::timeout(T, publish)
        .await
        .expect("publish answered in time")
        .expect("publish acknowledged")
}

fn retention(max_messages: usize) -> Retention {
    Retention {
        max_messages,
        ..Retention::default()
    }
}

/// A client that reconnects quickly and never suspends (the tests cut connections on purpose).
fn client(url: String) -> TransportConfig {
    fast_client(url)
        .max_attempts(None)
        .stability_window(Duration::from_millis(100))
        .build()
        .unwrap()
}

fn start(config: TransportConfig) -> (Transport, EventLog) {
    let (transport, rx) = Transport::start_with_events(config);
    (transport, EventLog::new(rx))
}

/// The payloads of the messages among `events`, asserting offsets are contiguous.
fn payloads(events: &[ChannelEvent]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut last: Option<Offset> = None;
    for ev in events {
        match ev {
            ChannelEvent::Message(m) => {
                if let Some(last) = last {
                    assert_eq!(m.offset, last.next(), "offsets must be contiguous");
                }
                last = Some(m.offset);
                out.push(m.payload.decode::<u64>().unwrap());
            }
            ChannelEvent::Discontinuity(d) => panic!("unexpected discontinuity {d:?}"),
        }
    }
    out
}

#[actix_rt::test]
async fn ten_thousand_messages_under_repeated_cuts_arrive_exactly_once_in_order() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), retention(20_000));
    let proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let url = ws_url(proxy.local_addr());
    let (subscriber, _) = start(client(url.clone()));
    let (publisher, _) = start(client(url));
    let (_sub, mut events, _) = open_attached(&subscriber, "stream", ChannelOptions::default(), T)
        .await
        .unwrap();
    let options = ChannelOptions {
        subscribe: false,
        limits: BufferLimits {
            max_messages: 20_000,
            ..BufferLimits::default()
        },
        ..ChannelOptions::default()
    };
    let (publishing, _, _) = open_attached(&publisher, "stream", options, T)
        .await
        .unwrap();

    const N: u64 = 10_000;
    let acks: Vec<_> = (1..=N).map(|i| publishing.publish(&i)).collect();

    // Cut every connection at points of the transfer rather than at times (the transfer can
    // take less than any fixed cadence): with the first message, then with every 2,000th, so
    // both the publisher (early on, most publishes still unacknowledged) and the subscriber
    // resume several times.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut received = Vec::new();
    let (mut messages, mut cuts) = (0usize, 0usize);
    while messages < N as usize {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("only {messages} of {N} messages within 120 s"))
            .expect("the subscription stays open");
        if matches!(event, ChannelEvent::Message(_)) {
            messages += 1;
            if messages % 2_000 == 1 {
                cuts += usize::from(proxy.cut_all() > 0);
            }
        }
        received.push(event);
    }
    let results = join_all(acks).await;

    assert_eq!(payloads(&received), (1..=N).collect::<Vec<_>>());
    let stored: Vec<u64> = results
        .iter()
        .map(|r| {
            r.as_ref()
                .expect("every publish acknowledged")
                .offset
                .unwrap()
                .0
        })
        .collect();
    let mut sorted = stored.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        N as usize,
        "every publish stored exactly once"
    );
    assert!(
        cuts >= 2,
        "the proxy must actually have cut connections ({cuts})"
    );
    // Nothing more arrives: no duplicate trails behind.
    nothing_more(&mut events).await;
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_subscriber_that_was_away_receives_everything_on_resume() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), retention(1000));
    let sub_proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let (subscriber, mut sub_events) = start(client(ws_url(sub_proxy.local_addr())));
    let (publisher, _) = start(client(hub.ws_url()));
    let (_sub, mut events, mut sub_states) =
        open_attached(&subscriber, "news", ChannelOptions::default(), T)
            .await
            .unwrap();
    let (news, _, _) = open_attached(&publisher, "news", ChannelOptions::publish_only(), T)
        .await
        .unwrap();

    acked(news.publish(&0u64)).await;
    assert_eq!(
        payloads(&collect_messages(&mut events, 1, T).await.unwrap()),
        [0]
    );

    // The subscriber drops off and cannot come back for now.
    sub_proxy.refuse_for(Duration::from_secs(60));
    sub_proxy.cut_all();
    sub_events
        .until_state(ConnectionState::Disconnected, T)
        .await
        .unwrap();
    sub_states
        .until_channel_state(ChannelState::Suspended, T)
        .await
        .unwrap();
    publish_all(&news, 1..=500).await;

    sub_proxy.stop_refusing();
    let attached = sub_states
        .until_channel_state(ChannelState::Attached, T)
        .await
        .unwrap();
    assert!(attached.resumed, "resumed exactly where it left off");
    let got = collect_messages(&mut events, 500, T).await.unwrap();
    assert_eq!(payloads(&got), (1..=500).collect::<Vec<_>>());
    // The transport re-synced its channel before calling itself connected again.
    sub_events
        .until_state(ConnectionState::Connected, T)
        .await
        .unwrap();
    assert!(sub_events
        .path()
        .contains(&(ConnectionState::Syncing, ConnectionState::Connected)));
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn publishes_made_while_disconnected_are_delivered_exactly_once_after_reconnect() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), retention(1000));
    let pub_proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let (publisher, mut pub_events) = start(client(ws_url(pub_proxy.local_addr())));
    let (subscriber, _) = start(client(hub.ws_url()));
    let (_sub, mut events, _) = open_attached(&subscriber, "orders", ChannelOptions::default(), T)
        .await
        .unwrap();
    let (orders, _, mut pub_states) =
        open_attached(&publisher, "orders", ChannelOptions::publish_only(), T)
            .await
            .unwrap();

    take_offline(&pub_proxy, &mut pub_states).await;
    let pending: Vec<_> = (1..=100u64).map(|i| orders.publish(&i)).collect();
    let status = publisher.status().await.unwrap();
    assert_ne!(status.state, ConnectionState::Connected);
    assert_eq!(status.channels[0].queue_depth, 100);
    assert_eq!(status.channels[0].state, "suspended");

    pub_proxy.stop_refusing();
    pub_events
        .until_state(ConnectionState::Connected, T)
        .await
        .unwrap();
    for r in join_all(pending).await {
        assert!(!r.unwrap().duplicate);
    }
    let got = collect_messages(&mut events, 100, T).await.unwrap();
    assert_eq!(payloads(&got), (1..=100).collect::<Vec<_>>());
    nothing_more(&mut events).await;
    publisher.close().await;
    subscriber.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_replay_whose_ack_was_lost_is_stored_once() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), retention(1000));
    let pub_proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let (publisher, _) = start(client(ws_url(pub_proxy.local_addr())));
    let (subscriber, _) = start(client(hub.ws_url()));
    let (_sub, mut events, _) = open_attached(&subscriber, "ledger", ChannelOptions::default(), T)
        .await
        .unwrap();
    let (ledger, _, _) = open_attached(&publisher, "ledger", ChannelOptions::publish_only(), T)
        .await
        .unwrap();

    // Slow the publisher's link so its ack is still in the proxy when the hub has stored the
    // message; then cut: the ack is lost, the publish is replayed on the next connection.
    pub_proxy.set_latency(Duration::from_millis(400));
    let ack = ledger.publish(&42u64);
    let first = collect_messages(&mut events, 1, T).await.unwrap();
    assert_eq!(payloads(&first), [42]);
    pub_proxy.set_latency(Duration::ZERO);
    pub_proxy.cut_all();

    let ack = ack.await.unwrap();
    assert!(ack.duplicate, "acknowledged as a replay");
    match &first[0] {
        ChannelEvent::Message(m) => assert_eq!(ack.offset, Some(m.offset)),
        other => panic!("{other:?}"),
    }
    // Stored once: the subscriber sees nothing more, the next publish gets the next offset.
    nothing_more(&mut events).await;
    let next = acked(ledger.publish(&43u64)).await;
    assert_eq!(next.offset, ack.offset.map(Offset::next));
    publisher.close().await;
    subscriber.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn history_exceeded_is_reported_as_a_discontinuity_with_the_right_range() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), retention(10));
    let sub_proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let (subscriber, _) = start(client(ws_url(sub_proxy.local_addr())));
    let (publisher, _) = start(client(hub.ws_url()));
    let (_sub, mut events, mut states) =
        open_attached(&subscriber, "ticks", ChannelOptions::default(), T)
            .await
            .unwrap();
    let (ticks, _, _) = open_attached(&publisher, "ticks", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    publish_all(&ticks, 1..=3).await;
    assert_eq!(
        payloads(&collect_messages(&mut events, 3, T).await.unwrap()),
        [1, 2, 3]
    );

    take_offline(&sub_proxy, &mut states).await;
    publish_all(&ticks, 4..=30).await;
    sub_proxy.stop_refusing();

    let attached = states
        .until_channel_state(ChannelState::Attached, T)
        .await
        .unwrap();
    assert!(!attached.resumed);
    let got = collect_messages(&mut events, 10, T).await.unwrap();
    match &got[0] {
        ChannelEvent::Discontinuity(d) => {
            assert_eq!(d.from.offset, Offset(4));
            assert_eq!(d.to.offset, Offset(20));
            assert_eq!(d.from.epoch, d.to.epoch);
        }
        other => panic!("expected a discontinuity first, got {other:?}"),
    }
    assert_eq!(payloads(&got[1..]), (21..=30).collect::<Vec<_>>());
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_hub_that_lost_its_memory_is_a_new_epoch_and_a_discontinuity_not_silence() {
    init_tracing();
    let addr = free_addr();
    let hub = start_channel_hub(addr, retention(1000));
    let (subscriber, mut sub_events) = start(client(ws_url(addr)));
    let (publisher, _) = start(client(ws_url(addr)));
    let (_sub, mut events, mut states) =
        open_attached(&subscriber, "feed", ChannelOptions::default(), T)
            .await
            .unwrap();
    let (feed, _, mut feed_states) =
        open_attached(&publisher, "feed", ChannelOptions::publish_only(), T)
            .await
            .unwrap();
    publish_all(&feed, 1..=5).await;
    let before = collect_messages(&mut events, 5, T).await.unwrap();
    let old_epoch = match &before[4] {
        ChannelEvent::Message(m) => m.epoch.clone(),
        other => panic!("{other:?}"),
    };

    hub.stop().await;
    sub_events
        .until_state(ConnectionState::Disconnected, T)
        .await
        .unwrap();
    let hub = start_channel_hub(addr, retention(1000));
    let attached = states
        .until(T, |e| {
            e.to == ChannelState::Attached
                && e.reason == ChannelReason::AttachConfirmed
                && e.from == ChannelState::Attaching
        })
        .await
        .unwrap();
    assert!(!attached.resumed);
    feed_states
        .until_channel_state(ChannelState::Attached, T)
        .await
        .unwrap();
    acked(feed.publish(&6u64)).await;

    let after = collect_messages(&mut events, 1, T).await.unwrap();
    match &after[..] {
        [ChannelEvent::Discontinuity(d), ChannelEvent::Message(m)] => {
            assert_eq!(d.from.epoch, old_epoch);
            assert_eq!(d.from.offset, Offset(6));
            assert_ne!(d.to.epoch, old_epoch);
            assert_eq!(
                d.to.offset,
                Offset(0),
                "nothing of the new epoch is missing"
            );
            assert_eq!(m.epoch, d.to.epoch);
            assert_eq!(m.offset, Offset(1));
            assert_eq!(m.payload.decode::<u64>().unwrap(), 6);
        }
        other => panic!("expected discontinuity then message, got {other:?}"),
    }
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_hub_started_again_with_the_same_service_keeps_its_channels_epochs() {
    init_tracing();
    // Channels run on the hub's workers (the default): they end with the first hub. The next
    // attach of each starts a new actor on the second hub's worker, which continues from the
    // service's store — same epoch, next offset, no discontinuity.
    let addr = free_addr();
    let service = ChannelService::builder()
        .retention(retention(1000))
        .build()
        .unwrap();
    let hub = start_hub_with(addr, service.clone());
    let (subscriber, mut sub_events) = start(client(ws_url(addr)));
    let (publisher, _) = start(client(ws_url(addr)));
    let (_sub, mut events, mut states) =
        open_attached(&subscriber, "feed", ChannelOptions::default(), T)
            .await
            .unwrap();
    let (feed, _, mut feed_states) =
        open_attached(&publisher, "feed", ChannelOptions::publish_only(), T)
            .await
            .unwrap();
    publish_all(&feed, 1..=5).await;
    let mut received = collect_messages(&mut events, 5, T).await.unwrap();

    hub.stop().await;
    sub_events
        .until_state(ConnectionState::Disconnected, T)
        .await
        .unwrap();
    let hub = start_hub_with(addr, service.clone());
    let attached = states
        .until(T, |e| {
            e.to == ChannelState::Attached && e.from == ChannelState::Attaching
        })
        .await
        .unwrap();
    assert!(attached.resumed, "the subscriber resumed in the same epoch");
    feed_states
        .until_channel_state(ChannelState::Attached, T)
        .await
        .unwrap();
    publish_all(&feed, 6..=10).await;
    received.extend(collect_messages(&mut events, 5, T).await.unwrap());
    // Contiguous offsets in one epoch, no discontinuity (`payloads` asserts both).
    assert_eq!(payloads(&received), (1..=10).collect::<Vec<_>>());
    let epochs: std::collections::HashSet<_> = received
        .iter()
        .filter_map(|e| match e {
            ChannelEvent::Message(m) => Some(m.epoch.clone()),
            ChannelEvent::Discontinuity(_) => None,
        })
        .collect();
    assert_eq!(epochs.len(), 1, "one epoch across both hubs");
    assert_eq!(service.channel_count(), 1);
    nothing_more(&mut events).await;
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn one_denied_channel_fails_alone_while_the_others_work() {
    init_tracing();
    let service = ChannelService::builder()
        .authorizer(
            |_conn: &tether_transport::hub::ConnInfo, channel: &str, _subscribe: bool| {
                if channel == "secret" {
                    Err("not for you".to_string())
                } else {
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let hub = start_hub_with(free_addr(), service);
    let proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let (transport, mut conn_events) = start(client(ws_url(proxy.local_addr())));
    let (a, mut a_events, _) = open_attached(&transport, "a", ChannelOptions::default(), T)
        .await
        .unwrap();
    let (b, mut b_events, _) = open_attached(&transport, "b", ChannelOptions::default(), T)
        .await
        .unwrap();
    let (recipient, rx) = tether_transport::event_channel(64);
    let (_secret, _) = tether_channels::Channel::open_with_state(
        &transport,
        "secret",
        ChannelOptions::default(),
        vec![recipient],
    )
    .await
    .unwrap();
    let mut secret_states = EventLog::new(rx);
    secret_states
        .until_channel_state(ChannelState::Failed, T)
        .await
        .unwrap();

    // a and b work, over a cut and a resync too.
    acked(a.publish(&1u64)).await;
    acked(b.publish(&2u64)).await;
    proxy.cut_all();
    conn_events
        .until(T, |e| {
            e.from == ConnectionState::Syncing && e.to == ConnectionState::Connected
        })
        .await
        .unwrap();
    acked(a.publish(&3u64)).await;
    acked(b.publish(&4u64)).await;
    assert_eq!(
        payloads(&collect_messages(&mut a_events, 2, T).await.unwrap()),
        [1, 3]
    );
    assert_eq!(
        payloads(&collect_messages(&mut b_events, 2, T).await.unwrap()),
        [2, 4]
    );

    let status = transport.status().await.unwrap();
    assert_eq!(status.state, ConnectionState::Connected);
    let secret_status = status.channels.iter().find(|c| c.name == "secret").unwrap();
    assert_eq!(secret_status.state, "failed");
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_denied_channel_fails_its_publishes_with_a_typed_error() {
    init_tracing();
    let service = ChannelService::builder()
        .authorizer(
            |_: &tether_transport::hub::ConnInfo, channel: &str, _: bool| {
                (channel != "secret")
                    .then_some(())
                    .ok_or_else(|| "no".to_string())
            },
        )
        .build()
        .unwrap();
    let hub = start_hub_with(free_addr(), service);
    let (transport, _) = start(client(hub.ws_url()));
    let (recipient, rx) = tether_transport::event_channel(64);
    let (secret, _) = tether_channels::Channel::open_with_state(
        &transport,
        "secret",
        ChannelOptions::default(),
        vec![recipient],
    )
    .await
    .unwrap();
    let pending = secret.publish(&1u64);
    let mut states = EventLog::new(rx);
    let failed = states
        .until_channel_state(ChannelState::Failed, T)
        .await
        .unwrap();
    assert!(matches!(failed.reason, ChannelReason::Refused(_)));
    match pending.await {
        Err(e @ ChannelError::Failed { .. }) => assert!(e.is_permanent()),
        other => panic!("{other:?}"),
    }
    match secret.publish(&2u64).await {
        Err(ChannelError::Failed { .. }) => {}
        other => panic!("{other:?}"),
    }
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_full_buffer_refuses_with_queue_full_and_loses_nothing_it_accepted() {
    init_tracing();
    let addr = free_addr();
    let (publisher, _) = start(client(ws_url(addr)));
    let options = ChannelOptions {
        subscribe: false,
        limits: BufferLimits {
            max_messages: 5,
            ..BufferLimits::default()
        },
        ..ChannelOptions::default()
    };
    let (channel, _) = tether_channels::Channel::open(&publisher, "q", options)
        .await
        .unwrap();
    let accepted: Vec<_> = (1..=5u64).map(|i| channel.publish(&i)).collect();
    match channel.publish(&6u64).await {
        Err(e @ ChannelError::QueueFull { .. }) => assert!(!e.is_permanent()),
        other => panic!("expected QueueFull, got {other:?}"),
    }

    // The hub appears: the five accepted messages are stored, once each, in order.
    let hub = start_channel_hub(addr, retention(1000));
    let offsets: Vec<u64> = join_all(accepted)
        .await
        .into_iter()
        .map(|r| r.unwrap().offset.unwrap().0)
        .collect();
    assert_eq!(offsets, [1, 2, 3, 4, 5]);
    assert_eq!(publisher.status().await.unwrap().channels[0].queue_depth, 0);
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_subscriber_that_stops_reading_catches_up_from_history_without_loss() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), retention(1000));
    let (subscriber, _) = start(client(hub.ws_url()));
    let (publisher, _) = start(client(hub.ws_url()));
    let small = ChannelOptions {
        event_capacity: 8,
        ..ChannelOptions::default()
    };
    let (_sub, mut events, mut states) = open_attached(&subscriber, "firehose", small, T)
        .await
        .unwrap();
    let (firehose, _, _) = open_attached(&publisher, "firehose", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    // The subscriber reads nothing while 200 messages are published and stored.
    publish_all(&firehose, 1..=200).await;
    // Now it reads: everything arrives, once, in order — the overflow was caught up from
    // history by re-attaching, not dropped.
    let got = collect_messages(&mut events, 200, T).await.unwrap();
    assert_eq!(payloads(&got), (1..=200).collect::<Vec<_>>());
    assert!(states
        .until(T, |e| e.reason == ChannelReason::CatchingUp)
        .await
        .is_ok());
    nothing_more(&mut events).await;
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_channel_reopened_on_the_same_transport_is_a_new_producer() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), retention(1000));
    let (transport, _) = start(client(hub.ws_url()));
    let (subscriber, _) = start(client(hub.ws_url()));
    let (_sub, mut events, _) = open_attached(&subscriber, "room", ChannelOptions::default(), T)
        .await
        .unwrap();
    let (room, _, _) = open_attached(&transport, "room", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    publish_all(&room, 1..=3).await;
    room.detach().await;
    let (again, _, _) = open_attached(&transport, "room", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    // Sequence numbers restart at 1 on the new handle; they must not be taken for replays.
    for r in join_all((4..=6u64).map(|i| again.publish(&i))).await {
        assert!(!r.unwrap().duplicate);
    }
    let got = collect_messages(&mut events, 6, T).await.unwrap();
    assert_eq!(payloads(&got), [1, 2, 3, 4, 5, 6]);
    transport.close().await;
    subscriber.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn oversized_payloads_are_refused_with_typed_errors_not_reconnect_loops() {
    init_tracing();
    let service = ChannelService::builder()
        .max_message_size(2048)
        .build()
        .unwrap();
    let hub = start_hub_with(free_addr(), service);
    let (transport, mut conn_events) = start(
        fast_client(hub.ws_url())
            .max_frame_size(8 * 1024)
            .build()
            .unwrap(),
    );
    let (room, _, _) = open_attached(&transport, "big", ChannelOptions::default(), T)
        .await
        .unwrap();
    // Larger than the transport's frame limit: refused at once by the client.
    match tokio::time::timeout(T, room.publish(&"x".repeat(16 * 1024)))
        .await
        .expect("answered at once")
    {
        Err(ChannelError::PayloadTooLarge { .. }) => {}
        other => panic!("{other:?}"),
    }
    // Within the frame limit but above the hub's message limit: refused by the hub, for that
    // publish only.
    match tokio::time::timeout(T, room.publish(&"x".repeat(4 * 1024)))
        .await
        .expect("answered by the hub")
    {
        Err(e @ ChannelError::Rejected { .. }) => assert!(e.is_permanent()),
        other => panic!("{other:?}"),
    }
    let ok = acked(room.publish(&"small")).await;
    assert_eq!(ok.offset, Some(Offset(1)));
    conn_events
        .until(T, |e| {
            e.from == ConnectionState::Syncing && e.to == ConnectionState::Connected
        })
        .await
        .unwrap();
    conn_events
        .expect_quiet(Duration::from_millis(200))
        .await
        .expect("the connection never dropped");
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_failed_transport_answers_every_pending_publish() {
    init_tracing();
    let config = tether_integration_tests::harness::test_hub_config(free_addr())
        .authenticator(tether_transport::hub::StaticTokens::new(["right"]))
        .build()
        .unwrap();
    let hub = tether_transport::hub::Hub::start(config).unwrap();
    let (transport, mut conn_events) =
        start(fast_client(hub.ws_url()).token("wrong").build().unwrap());
    let (room, _) = tether_channels::Channel::open(&transport, "room", ChannelOptions::default())
        .await
        .unwrap();
    let pending = room.publish(&1u64);
    conn_events
        .until_state(ConnectionState::Failed, T)
        .await
        .unwrap();
    match tokio::time::timeout(T, pending).await.expect("answered") {
        Err(ChannelError::Failed { cause, .. }) => assert!(cause.is_permanent()),
        other => panic!("{other:?}"),
    }
    match tokio::time::timeout(T, room.publish(&2u64))
        .await
        .expect("answered")
    {
        Err(ChannelError::Failed { .. }) => {}
        other => panic!("{other:?}"),
    }
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_publish_cut_off_after_it_was_sent_is_reported_as_unconfirmed() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), retention(1000));
    let proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let (transport, _) = start(client(ws_url(proxy.local_addr())));
    let (room, _, _) = open_attached(&transport, "room", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    // The ack will take a second to come back; the transport is closed before that.
    proxy.set_latency(Duration::from_secs(1));
    let sent = room.publish(&1u64);
    let never_sent_status = room.status().await.unwrap();
    assert_eq!(never_sent_status.queue_depth, 1);
    transport.close().await;
    match tokio::time::timeout(T, sent).await.expect("answered") {
        Err(e @ ChannelError::Unconfirmed { .. }) => {
            assert!(e.is_permanent());
            assert!(matches!(
                e,
                ChannelError::Unconfirmed { ref cause, .. } if **cause == ChannelError::TransportClosed
            ));
        }
        other => panic!("expected Unconfirmed, got {other:?}"),
    }
    hub.stop().await;
}

#[actix_rt::test]
async fn the_evicting_overflow_policy_answers_what_it_evicts_and_delivers_the_rest() {
    init_tracing();
    let addr = free_addr();
    let (publisher, _) = start(client(ws_url(addr)));
    let options = ChannelOptions {
        subscribe: false,
        limits: BufferLimits {
            max_messages: 3,
            overflow: tether_channels::OverflowPolicy::EvictOldestUnsent,
            ..BufferLimits::default()
        },
        ..ChannelOptions::default()
    };
    let (channel, _) = tether_channels::Channel::open(&publisher, "q", options)
        .await
        .unwrap();
    // The hub is not there yet: nothing is sent, so the oldest can be evicted safely.
    let futures: Vec<_> = (1..=5u64).map(|i| channel.publish(&i)).collect();
    let hub = start_channel_hub(addr, retention(1000));
    let results = join_all(futures).await;
    for (i, r) in results.iter().enumerate().take(2) {
        match r {
            Err(e @ ChannelError::Evicted { seq, .. }) => {
                assert_eq!(*seq, i as u64 + 1);
                assert!(!e.is_permanent());
            }
            other => panic!("publish {}: {other:?}", i + 1),
        }
    }
    let offsets: Vec<u64> = results[2..]
        .iter()
        .map(|r| r.as_ref().unwrap().offset.unwrap().0)
        .collect();
    assert_eq!(offsets, [1, 2, 3]);
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn the_smallest_event_stream_still_delivers_everything_in_order() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), retention(1000));
    let (subscriber, _) = start(client(hub.ws_url()));
    let (publisher, _) = start(client(hub.ws_url()));
    let tiny = ChannelOptions {
        event_capacity: 1,
        ..ChannelOptions::default()
    };
    let (_sub, mut events, _) = open_attached(&subscriber, "drip", tiny, T).await.unwrap();
    let (drip, _, _) = open_attached(&publisher, "drip", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    publish_all(&drip, 1..=20).await;
    let got = collect_messages(&mut events, 20, T).await.unwrap();
    assert_eq!(payloads(&got), (1..=20).collect::<Vec<_>>());
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_channel_state_subscriber_that_stops_reading_is_told_what_it_missed_and_where_things_stand(
) {
    init_tracing();
    let hub = start_channel_hub(free_addr(), retention(100));
    let proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let (transport, _) = start(client(ws_url(proxy.local_addr())));
    let (complete, complete_rx) = event_channel(1024);
    // Holds one unread transition; it reads nothing until the channel is detached.
    let (slow, mut slow_rx) = event_channel(1);
    let (channel, _events) = tether_channels::Channel::open_with_state(
        &transport,
        "room",
        ChannelOptions::default(),
        vec![complete, slow],
    )
    .await
    .unwrap();
    let mut states = EventLog::new(complete_rx);

    states
        .until_channel_state(ChannelState::Attached, T)
        .await
        .unwrap();
    // The current state is readable without waiting, and already there when the event is.
    assert_eq!(channel.state(), ChannelState::Attached);
    proxy.cut_all();
    states
        .until_channel_state(ChannelState::Suspended, T)
        .await
        .unwrap();
    states
        .until_channel_state(ChannelState::Attached, T)
        .await
        .unwrap();
    assert_eq!(*channel.watch_state().borrow(), ChannelState::Attached);
    channel.detach().await;
    states
        .until_channel_state(ChannelState::Detached, T)
        .await
        .unwrap();
    assert_eq!(channel.state(), ChannelState::Detached);

    let read = read_to_end(&mut slow_rx, T).await.unwrap();
    let lags = account_for(states.seen(), &read).unwrap();
    assert!(lags >= 1, "a reader one transition deep lagged: {read:?}");
    assert_eq!(
        read.last().map(StateEvent::state),
        Some(ChannelState::Detached)
    );
    assert_eq!(slow_rx.state(), Some(ChannelState::Detached));
    transport.close().await;
    hub.stop().await;
}
