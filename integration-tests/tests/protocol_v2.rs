//! Protocol v2 over real sockets: v1 and v2 clients on one channel, batching you can see on the
//! wire, and v2 peers that send what they should not — each beside clients that must lose
//! nothing.

use std::time::Duration;

use actix_http::ws::Frame as WsFrame;
use bytes::{BufMut, BytesMut};
use tether_channels::hub::Retention;
use tether_channels::{ChannelEvent, ChannelOptions};
use tether_integration_tests::attack::{HealthyPair, HostilePeer, Read};
use tether_integration_tests::harness::{
    collect_messages, fast_client, free_addr, init_tracing, open_attached, start_channel_hub,
    ws_url, EventLog,
};
use tether_integration_tests::proxy::FaultProxy;
use tether_transport::protocol::{v2, Attach, ErrorCode, Frame, Offset, Payload};
use tether_transport::Transport;

const T: Duration = Duration::from_secs(10);

async fn client(url: &str, version: u16) -> (Transport, EventLog) {
    let config = fast_client(url.to_owned())
        .protocol_version(version)
        .build()
        .expect("config");
    tether_integration_tests::harness::connected_with(config, T).await
}

/// `(offset, value)` of every message in `events`.
fn numbered(events: &[ChannelEvent]) -> Vec<(u64, u64)> {
    events
        .iter()
        .map(|ev| match ev {
            ChannelEvent::Message(m) => (m.offset.0, m.payload.decode().expect("a number")),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[actix_rt::test]
async fn v1_and_v2_clients_share_a_channel_and_see_the_same_history() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), Retention::default());
    let url = hub.ws_url();
    let (sub_v1, _) = client(&url, 1).await;
    let (sub_v2, _) = client(&url, 2).await;
    let (pub_v1, _) = client(&url, 1).await;
    let (pub_v2, _) = client(&url, 2).await;
    let (_, mut got_v1, _) = open_attached(&sub_v1, "mixed", ChannelOptions::default(), T)
        .await
        .unwrap();
    let (_, mut got_v2, _) = open_attached(&sub_v2, "mixed", ChannelOptions::default(), T)
        .await
        .unwrap();
    let (from_v1, _, _) = open_attached(&pub_v1, "mixed", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    let (from_v2, _, _) = open_attached(&pub_v2, "mixed", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    // Both publishers at once, without waiting for acks: the v2 one's publishes go in runs.
    let mut acks = Vec::new();
    for i in 1..=200u64 {
        acks.push(from_v1.publish(&i));
        acks.push(from_v2.publish(&(1000 + i)));
    }
    let mut offsets = Vec::new();
    for ack in acks {
        offsets.push(ack.await.expect("acknowledged").offset);
    }
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), 400, "every publish has an offset of its own");
    let v1 = numbered(&collect_messages(&mut got_v1, 400, T).await.unwrap());
    let v2 = numbered(&collect_messages(&mut got_v2, 400, T).await.unwrap());
    assert_eq!(v1, v2, "both versions deliver the same history");
    let offsets: Vec<u64> = v1.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (offsets[0]..offsets[0] + 400).collect::<Vec<_>>());
    // Each publisher's messages arrive in its order, each once.
    let of = |base: u64| -> Vec<u64> {
        v1.iter()
            .map(|(_, v)| *v)
            .filter(|v| (base + 1..=base + 200).contains(v))
            .collect()
    };
    assert_eq!(of(0), (1..=200).collect::<Vec<_>>());
    assert_eq!(of(1000), (1001..=1200).collect::<Vec<_>>());
}

/// A raw v2 peer: hello asking for v2, then an attach as a control record.
async fn raw_v2_peer(
    hub: &tether_transport::hub::HubHandle,
    name: &str,
    channel: &str,
) -> HostilePeer {
    let mut peer = HostilePeer::connect(hub.local_addr(), "/ws", None).await;
    peer.hello_v(name, 2).await;
    let mut buf = BytesMut::new();
    v2::encode(
        &v2::Record::Control(Frame::Attach(Attach {
            channel: channel.into(),
            subscribe: true,
            resume: None,
            producer: None,
        })),
        &mut buf,
    );
    peer.send_binary(&buf).await.unwrap();
    loop {
        match peer.next_frame(T).await {
            Read::Frame(WsFrame::Binary(bytes)) => {
                let records = v2::decode(&bytes, usize::MAX).expect("valid records");
                if records
                    .iter()
                    .any(|r| matches!(r, v2::Record::Control(Frame::Attached(_))))
                {
                    return peer;
                }
            }
            Read::Frame(WsFrame::Ping(_) | WsFrame::Pong(_)) => {}
            other => panic!("expected the attached record, got {other:?}"),
        }
    }
}

#[actix_rt::test]
async fn a_burst_reaches_a_v2_subscriber_in_fewer_frames_than_messages() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), Retention::default());
    let url = hub.ws_url();
    let mut watcher = raw_v2_peer(&hub, "watcher", "burst").await;
    let (publisher, _) = client(&url, 2).await;
    let (channel, _, _) = open_attached(&publisher, "burst", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    let acks: Vec<_> = (1..=500u64).map(|i| channel.publish(&i)).collect();
    for ack in acks {
        ack.await.expect("acknowledged");
    }
    let (mut frames, mut values) = (0, Vec::new());
    while values.len() < 500 {
        match watcher.next_frame(T).await {
            Read::Frame(WsFrame::Binary(bytes)) => {
                frames += 1;
                for record in v2::decode(&bytes, usize::MAX).unwrap() {
                    for frame in record.into_frames() {
                        if let Frame::Message(m) = frame {
                            values.push(m.payload.decode::<u64>().unwrap());
                        }
                    }
                }
            }
            Read::Frame(WsFrame::Ping(_) | WsFrame::Pong(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(values, (1..=500).collect::<Vec<_>>());
    assert!(
        frames < 500,
        "{frames} frames for 500 messages: nothing was batched"
    );
}

#[actix_rt::test]
async fn payloads_that_are_not_json_reach_v2_as_bytes_and_v1_as_base64_and_break_nobody() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), Retention::default());
    let url = hub.ws_url();
    let mut pair = HealthyPair::start(&url).await;
    let (sub_v1, mut v1_events) = client(&url, 1).await;
    let (sub_v2, mut v2_events) = client(&url, 2).await;
    let (_, mut got_v1, _) = open_attached(&sub_v1, "poison", ChannelOptions::default(), T)
        .await
        .unwrap();
    let (_, mut got_v2, _) = open_attached(&sub_v2, "poison", ChannelOptions::default(), T)
        .await
        .unwrap();
    let mut hostile = raw_v2_peer(&hub, "hostile", "poison").await;
    let raw: &[u8] = b"\xff{not json";
    let mut buf = BytesMut::new();
    v2::encode(
        &v2::Record::Publish(v2::PublishRun {
            channel: "poison".into(),
            first_seq: 1,
            payloads: vec![
                Payload::from_unchecked(bytes::Bytes::from_static(raw)),
                Payload::from_json("7").unwrap(),
            ],
        }),
        &mut buf,
    );
    hostile.send_binary(&buf).await.unwrap();
    let v1 = collect_messages(&mut got_v1, 2, T).await.unwrap();
    let v2_got = collect_messages(&mut got_v2, 2, T).await.unwrap();
    match (&v1[0], &v2_got[0]) {
        (ChannelEvent::Message(a), ChannelEvent::Message(b)) => {
            assert_eq!(
                a.payload.as_bytes(),
                raw,
                "v1 gets them back from payload_b64"
            );
            assert_eq!(b.payload.as_bytes(), raw, "v2 gets the bytes as sent");
            assert!(b.payload.decode::<serde_json::Value>().is_err());
            assert_eq!(a.offset, b.offset);
        }
        other => panic!("{other:?}"),
    }
    match (&v1[1], &v2_got[1]) {
        (ChannelEvent::Message(a), ChannelEvent::Message(b)) => {
            assert_eq!(a.payload.decode::<u64>().unwrap(), 7);
            assert_eq!(b.payload.decode::<u64>().unwrap(), 7);
            assert_eq!(a.offset, Offset(b.offset.0));
        }
        other => panic!("{other:?}"),
    }
    // Nobody's connection suffered.
    for events in [&mut v1_events, &mut v2_events, &mut pair.sub_events] {
        events
            .expect_quiet(Duration::from_millis(200))
            .await
            .unwrap();
    }
    pair.publish_acked(1, 20).await;
    pair.assert_received_in_order(20).await;
}

/// Opaque payloads, published through the client API by a v1 and a v2 client, reach v1 and v2
/// subscribers as the same bytes, live and replayed from history after an outage.
#[actix_rt::test]
async fn opaque_payloads_cross_both_protocol_versions_as_the_same_bytes() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), Retention::default());
    let url = hub.ws_url();
    // The subscribers go through a proxy, to be cut off for the replay half.
    let proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let proxied = ws_url(proxy.local_addr());
    let (sub_v1, _) = client(&proxied, 1).await;
    let (sub_v2, _) = client(&proxied, 2).await;
    let (pub_v1, _) = client(&url, 1).await;
    let (pub_v2, _) = client(&url, 2).await;
    let (_, mut got_v1, _) = open_attached(&sub_v1, "blobs", ChannelOptions::default(), T)
        .await
        .unwrap();
    let (_, mut got_v2, _) = open_attached(&sub_v2, "blobs", ChannelOptions::default(), T)
        .await
        .unwrap();
    let (from_v1, _, _) = open_attached(&pub_v1, "blobs", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    let (from_v2, _, _) = open_attached(&pub_v2, "blobs", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    // Every byte value, an empty payload, bytes that are JSON, and a larger blob.
    let blob = |i: u8| -> Vec<u8> {
        match i % 4 {
            0 => (0..=255u8).rev().collect(),
            1 => Vec::new(),
            2 => b"[1,2]".to_vec(),
            _ => (0..10_000u32)
                .map(|n| (n * 7 + u32::from(i)) as u8)
                .collect(),
        }
    };
    let publish = |range: std::ops::Range<u8>| {
        let (from_v1, from_v2) = (from_v1.clone(), from_v2.clone());
        async move {
            for i in range {
                let from = if i % 2 == 0 { &from_v1 } else { &from_v2 };
                from.publish_payload(Payload::from_bytes(blob(i)))
                    .await
                    .expect("acknowledged");
            }
        }
    };
    let bytes_of = |events: Vec<ChannelEvent>| -> Vec<Vec<u8>> {
        events
            .into_iter()
            .map(|ev| match ev {
                ChannelEvent::Message(m) => m.payload.as_bytes().to_vec(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let sent = |range: std::ops::Range<u8>| range.map(blob).collect::<Vec<_>>();
    publish(0..20).await;
    assert_eq!(
        bytes_of(collect_messages(&mut got_v1, 20, T).await.unwrap()),
        sent(0..20)
    );
    assert_eq!(
        bytes_of(collect_messages(&mut got_v2, 20, T).await.unwrap()),
        sent(0..20)
    );
    // Cut off, the subscribers miss the next 20; on their return they resume, and the hub
    // replays them from history in each one's version.
    proxy.refuse_for(Duration::from_secs(60));
    assert!(proxy.cut_all() >= 2);
    publish(20..40).await;
    proxy.stop_refusing();
    assert_eq!(
        bytes_of(collect_messages(&mut got_v1, 20, T).await.unwrap()),
        sent(20..40)
    );
    assert_eq!(
        bytes_of(collect_messages(&mut got_v2, 20, T).await.unwrap()),
        sent(20..40)
    );
}

#[actix_rt::test]
async fn malformed_records_close_only_their_sender() {
    init_tracing();
    let hub = start_channel_hub(free_addr(), Retention::default());
    let url = hub.ws_url();
    let mut pair = HealthyPair::start(&url).await;
    // An unknown record kind; a run claiming 4 billion payloads; a truncated record; and a
    // v2 frame on a connection that asked for v1.
    let mut huge = BytesMut::new();
    huge.put_u8(v2::KIND_PUBLISH);
    huge.put_u16_le(6);
    huge.put_slice(b"steady");
    huge.put_u64_le(1);
    huge.put_u32_le(u32::MAX);
    let cases: Vec<(u16, Vec<u8>)> = vec![
        (2, vec![0x7f, 1, 2, 3]),
        (2, huge.to_vec()),
        (2, vec![v2::KIND_ACK, 9]),
        (1, vec![v2::KIND_CONTROL, 0, 0, 0, 0]),
    ];
    for (i, (version, bytes)) in cases.into_iter().enumerate() {
        let mut peer = HostilePeer::connect(hub.local_addr(), "/ws", None).await;
        peer.hello_v(&format!("bad-{i}"), version).await;
        peer.send_binary(&bytes).await.unwrap();
        let mut error = None;
        let code = loop {
            match peer.next_frame(T).await {
                Read::Frame(WsFrame::Binary(b)) => {
                    for record in v2::decode(&b, usize::MAX).unwrap() {
                        if let v2::Record::Control(Frame::Error(e)) = record {
                            error = Some(e.code);
                        }
                    }
                }
                Read::Frame(WsFrame::Text(t)) => {
                    if let Ok(Frame::Error(e)) = Frame::decode_shared(&t, usize::MAX) {
                        error = Some(e.code);
                    }
                }
                Read::Frame(WsFrame::Close(reason)) => {
                    break reason.map(|r| u16::from(r.code)).unwrap_or(1005)
                }
                Read::Frame(_) => {}
                other => panic!("case {i}: ended without a close frame: {other:?}"),
            }
        };
        let expected = if version == 1 {
            (ErrorCode::UnexpectedFrame, 1003)
        } else {
            (ErrorCode::MalformedFrame, 1002)
        };
        assert_eq!((error, code), (Some(expected.0), expected.1), "case {i}");
    }
    pair.sub_events
        .expect_quiet(Duration::from_millis(100))
        .await
        .unwrap();
    pair.publish_acked(1, 20).await;
    pair.assert_received_in_order(20).await;
}
