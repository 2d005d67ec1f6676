//! The Redis Streams store against a real, private redis-server: atomic numbering and dedupe,
//! paging, retention, epochs, health, notifications, and several stores (hub nodes) on one
//! Redis.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_channels::hub::{
    AppendOutcome, AppendRequest, Fence, HistoryStore, PageLimit, ProducerKey, RedisStore,
    Retention, StoreNotice,
};
use tether_channels::ChannelError;
use tether_integration_tests::{Persistence, RedisServer};
use tether_transport::hub::Identity;
use tether_transport::protocol::{ClientId, InstanceId, Offset, Payload, Position};

const T: Duration = Duration::from_secs(10);

fn store(redis: &RedisServer, retention: Retention) -> Arc<RedisStore> {
    RedisStore::builder(redis.url())
        .retention(retention)
        .probe_interval(Duration::from_millis(50))
        .response_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .expect("store builds")
}

fn producer(name: &str) -> ProducerKey {
    ProducerKey {
        identity: Identity::new("alice").unwrap(),
        client: ClientId(name.into()),
        instance: InstanceId("instance:1".into()),
        producer: "handle".into(),
    }
}

fn req(name: &str, seq: u64) -> AppendRequest {
    AppendRequest {
        producer: producer(name).into(),
        seq,
        payload: Payload::from_json(&format!("{{\"from\":\"{name}\",\"seq\":\"{seq:04}\"}}"))
            .unwrap(),
    }
}

/// The fence of a writer's first (and only) append: always applies.
fn fresh() -> Fence {
    Fence {
        token: uuid_like(),
        number: 1,
        after: 0,
    }
}

fn uuid_like() -> String {
    tether_transport::protocol::Epoch::random().to_string()
}

fn all() -> PageLimit {
    PageLimit {
        max_messages: 100_000,
        max_bytes: usize::MAX,
    }
}

/// Appends `seqs` of producer `a` one batch each, then reads the whole channel.
async fn append_each(
    s: &RedisStore,
    channel: &str,
    seqs: std::ops::RangeInclusive<u64>,
) -> tether_channels::hub::Page {
    for i in seqs {
        s.append(channel, None, fresh(), vec![req("a", i)])
            .await
            .unwrap();
    }
    s.read(channel, None, Offset(0), all()).await.unwrap()
}

/// Polls `check` until it holds (a condition the test can observe), failing after `T`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + T;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `channel` once the store answers again (after a Redis restart).
async fn read_when_back(s: &RedisStore, channel: &str) -> tether_channels::hub::Page {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match s.read(channel, None, Offset(0), all()).await {
            Ok(page) => return page,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "store not back: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opaque payloads — not JSON, not even UTF-8 — are stored and read back as the same bytes
/// (a page that held one used to fail to read, leaving its subscribers unable to catch up).
#[tokio::test]
async fn opaque_payloads_are_stored_and_read_back_as_the_same_bytes() {
    let redis = RedisServer::start().expect("redis");
    let s = store(&redis, Retention::default());
    let blobs: Vec<Vec<u8>> = vec![(0..=255u8).rev().collect(), Vec::new(), b"[1]".to_vec()];
    let requests = blobs
        .iter()
        .zip(1..)
        .map(|(blob, seq)| AppendRequest {
            producer: producer("a").into(),
            seq,
            payload: Payload::from_bytes(blob.clone()),
        })
        .collect();
    s.append("blobs", None, fresh(), requests).await.unwrap();
    let page = s.read("blobs", None, Offset(0), all()).await.unwrap();
    let read: Vec<&[u8]> = page.messages.iter().map(|m| m.payload.as_bytes()).collect();
    assert_eq!(read, blobs.iter().map(Vec::as_slice).collect::<Vec<_>>());
}

#[tokio::test]
async fn appends_number_dedupe_and_page() {
    let redis = RedisServer::start().expect("redis");
    let s = store(&redis, Retention::default());
    let first = s
        .append(
            "room",
            None,
            fresh(),
            (1..=5).map(|i| req("a", i)).collect(),
        )
        .await
        .unwrap();
    assert_eq!(first.head, Offset(5));
    assert_eq!(
        first.outcomes,
        (1..=5)
            .map(|i| AppendOutcome::Stored(Offset(i)))
            .collect::<Vec<_>>()
    );
    // A replay of 4 and 5 with a new 6, and another producer's 1: one atomic step.
    let again = s
        .append(
            "room",
            None,
            fresh(),
            vec![req("a", 4), req("a", 5), req("a", 6), req("b", 1)],
        )
        .await
        .unwrap();
    assert_eq!(
        again.outcomes,
        [
            AppendOutcome::Duplicate(Some(Offset(4))),
            AppendOutcome::Duplicate(Some(Offset(5))),
            AppendOutcome::Stored(Offset(6)),
            AppendOutcome::Stored(Offset(7)),
        ]
    );
    assert_eq!(again.epoch, first.epoch);

    let page = s
        .read(
            "room",
            None,
            Offset(2),
            PageLimit {
                max_messages: 3,
                max_bytes: usize::MAX,
            },
        )
        .await
        .unwrap();
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset.0).collect();
    assert_eq!(offsets, [3, 4, 5]);
    assert_eq!(page.messages[0].payload, req("a", 3).payload);
    assert_eq!((page.first, page.head), (Offset(1), Offset(7)));
    // Bytes bound: each payload is 25 bytes; 60 bytes hold two; a tiny bound still gives one.
    let by_bytes = s
        .read(
            "room",
            None,
            Offset(0),
            PageLimit {
                max_messages: 100,
                max_bytes: 60,
            },
        )
        .await
        .unwrap();
    assert_eq!(by_bytes.messages.len(), 2);
    let tiny = PageLimit {
        max_messages: 100,
        max_bytes: 1,
    };
    assert_eq!(
        s.read("room", None, Offset(0), tiny)
            .await
            .unwrap()
            .messages
            .len(),
        1
    );
    let position = s
        .read("room", None, Offset(0), PageLimit::POSITION_ONLY)
        .await
        .unwrap();
    assert!(position.messages.is_empty());
    assert_eq!(position.head, Offset(7));
}

/// `req` for a producer with the given identity and ids.
fn req_of(identity: &str, client: &str, instance: &str, seq: u64) -> AppendRequest {
    AppendRequest {
        producer: ProducerKey {
            identity: Identity::new(identity).unwrap(),
            client: ClientId(client.into()),
            instance: InstanceId(instance.into()),
            producer: "handle".into(),
        }
        .into(),
        seq,
        payload: Payload::from_json(&format!("\"{identity} {seq}\"")).unwrap(),
    }
}

#[tokio::test]
async fn dedupe_state_belongs_to_an_identity_and_no_ids_forge_another_producer() {
    let redis = RedisServer::start().expect("redis");
    let s = store(&redis, Retention::default());
    let stored = |a: &tether_channels::hub::Appended| a.outcomes.clone();
    // alice's producer publishes 1 and 2.
    let alice = s
        .append(
            "room",
            None,
            fresh(),
            vec![req_of("alice", "c", "i", 1), req_of("alice", "c", "i", 2)],
        )
        .await
        .unwrap();
    assert_eq!(
        stored(&alice),
        [
            AppendOutcome::Stored(Offset(1)),
            AppendOutcome::Stored(Offset(2))
        ]
    );
    // mallory presents the same client id, instance, handle and seqs: its own messages.
    let mallory = s
        .append(
            "room",
            None,
            fresh(),
            vec![
                req_of("mallory", "c", "i", 1),
                req_of("mallory", "c", "i", 2),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        stored(&mallory),
        [
            AppendOutcome::Stored(Offset(3)),
            AppendOutcome::Stored(Offset(4))
        ]
    );
    // Each one's replays are still recognised, against its own offsets.
    let replays = s
        .append(
            "room",
            None,
            fresh(),
            vec![req_of("alice", "c", "i", 2), req_of("mallory", "c", "i", 1)],
        )
        .await
        .unwrap();
    assert_eq!(
        stored(&replays),
        [
            AppendOutcome::Duplicate(Some(Offset(2))),
            AppendOutcome::Duplicate(Some(Offset(3)))
        ]
    );
    // Ids that a plain join would merge with alice's (identity "alice", client "c", instance
    // "i") are another producer.
    let forged = s
        .append(
            "room",
            None,
            fresh(),
            vec![
                req_of("alice:c", "", "i", 1),
                req_of("alice", "c:i", "", 1),
                req_of("alice", "c\u{1f}i", "", 1),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        stored(&forged),
        [
            AppendOutcome::Stored(Offset(5)),
            AppendOutcome::Stored(Offset(6)),
            AppendOutcome::Stored(Offset(7))
        ]
    );
    let page = s.read("room", None, Offset(0), all()).await.unwrap();
    assert_eq!(page.messages.len(), 7);
}

#[tokio::test]
async fn retention_trims_by_count_bytes_and_age() {
    let redis = RedisServer::start().expect("redis");
    let by_count = store(
        &redis,
        Retention {
            max_messages: 3,
            ..Retention::default()
        },
    );
    let page = append_each(&by_count, "count", 1..=10).await;
    assert_eq!(page.first, Offset(8));
    assert_eq!(page.messages.len(), 3);
    assert!(redis
        .command("XLEN tether:5:count:s")
        .unwrap()
        .contains(":3"));
    // Retention works a batch (one stream entry) at a time: a batch of 5 stays whole until
    // what follows it alone reaches the count.
    by_count
        .append(
            "count",
            None,
            fresh(),
            (11..=15).map(|i| req("a", i)).collect(),
        )
        .await
        .unwrap();
    let page = by_count
        .read("count", None, Offset(0), all())
        .await
        .unwrap();
    assert_eq!(page.first, Offset(11), "the batch is kept whole");
    assert_eq!(
        page.messages.iter().map(|m| m.offset.0).collect::<Vec<_>>(),
        (11..=15).collect::<Vec<_>>()
    );
    let page = append_each(&by_count, "count", 16..=18).await;
    assert_eq!(page.first, Offset(16));
    // Paging starts inside a batch when asked to.
    let inside = by_count
        .read(
            "count",
            None,
            Offset(16),
            PageLimit {
                max_messages: 1,
                max_bytes: usize::MAX,
            },
        )
        .await
        .unwrap();
    assert_eq!(inside.messages[0].offset, Offset(17));

    let by_bytes = store(
        &redis,
        Retention {
            max_bytes: 60,
            ..Retention::default()
        },
    );
    let page = append_each(&by_bytes, "bytes", 1..=6).await;
    assert_eq!(page.first, Offset(5), "25-byte payloads, 60 bytes kept");

    let by_age = store(
        &redis,
        Retention {
            max_age: Duration::from_millis(200),
            ..Retention::default()
        },
    );
    by_age
        .append("age", None, fresh(), vec![req("a", 1), req("a", 2)])
        .await
        .unwrap();
    // Redis's own clock decides; wait until it has moved past the age limit.
    eventually("messages expire by age", || {
        let by_age = by_age.clone();
        async move {
            let page = by_age.read("age", None, Offset(0), all()).await.unwrap();
            page.messages.is_empty() && page.first == Offset(3) && page.head == Offset(2)
        }
    })
    .await;
}

#[tokio::test]
async fn two_stores_appending_to_one_channel_never_collide() {
    let redis = RedisServer::start().expect("redis");
    let keep_all = Retention {
        max_messages: 10_000,
        ..Retention::default()
    };
    let nodes = [store(&redis, keep_all), store(&redis, keep_all)];
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for p in 0..4 {
            let node = node.clone();
            let name = format!("n{n}p{p}");
            tasks.push(tokio::spawn(async move {
                let mut offsets = Vec::new();
                for batch in 0..25u64 {
                    let requests = (1..=10).map(|i| req(&name, batch * 10 + i)).collect();
                    let appended = node
                        .append("shared", None, fresh(), requests)
                        .await
                        .unwrap();
                    for outcome in appended.outcomes {
                        match outcome {
                            AppendOutcome::Stored(o) => offsets.push(o.0),
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                }
                // Replaying everything through the other path is all duplicates.
                let replay = node
                    .append(
                        "shared",
                        None,
                        fresh(),
                        (1..=250).map(|i| req(&name, i)).collect(),
                    )
                    .await
                    .unwrap();
                assert!(replay
                    .outcomes
                    .iter()
                    .all(|o| matches!(o, AppendOutcome::Duplicate(_))));
                offsets
            }));
        }
    }
    let mut offsets = Vec::new();
    for task in tasks {
        let mine = task.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "one producer's offsets grow"
        );
        offsets.extend(mine);
    }
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        (1..=2000).collect::<Vec<u64>>(),
        "no offset twice, none missing"
    );
    let page = nodes[1]
        .read("shared", None, Offset(0), all())
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for m in &page.messages {
        assert!(
            seen.insert(m.payload.json().to_owned()),
            "stored twice: {}",
            m.payload.json()
        );
    }
    assert_eq!(seen.len(), 2000);
}

#[tokio::test]
async fn the_epoch_is_the_streams_identity() {
    let mut redis = RedisServer::start_with(Persistence::AofAlways).expect("redis");
    let s = store(&redis, Retention::default());
    let e1 = s
        .append("room", None, fresh(), vec![req("a", 1)])
        .await
        .unwrap()
        .epoch;
    // A new store (a restarted hub) finds the same epoch.
    let restarted = store(&redis, Retention::default());
    let page = restarted
        .read("room", None, Offset(0), all())
        .await
        .unwrap();
    assert_eq!((page.epoch.clone(), page.head), (e1.clone(), Offset(1)));
    // Redis restarted with its data: same epoch.
    redis.restart().unwrap();
    assert_eq!(read_when_back(&s, "room").await.epoch, e1);

    // A node that has seen offset 5 in this epoch while the store's head is 1 (a replica
    // promoted behind its master): the tail is lost, so a new epoch starts.
    let ahead = Position {
        epoch: e1.clone(),
        offset: Offset(5),
    };
    let appended = s
        .append("room", Some(ahead), fresh(), vec![req("a", 2)])
        .await
        .unwrap();
    assert_ne!(appended.epoch, e1);
    assert_eq!(
        appended.head,
        Offset(1),
        "numbering starts again in the new epoch"
    );
    let e2 = appended.epoch;
    // Seen positions at or behind the head change nothing.
    let behind = Position {
        epoch: e2.clone(),
        offset: Offset(1),
    };
    let page = s
        .read("room", Some(behind), Offset(0), all())
        .await
        .unwrap();
    assert_eq!(page.epoch, e2);
}

#[tokio::test]
async fn a_redis_that_lost_its_data_gets_a_new_epoch() {
    let mut redis = RedisServer::start().expect("redis");
    let s = store(&redis, Retention::default());
    let e1 = s
        .append("room", None, fresh(), vec![req("a", 1), req("a", 2)])
        .await
        .unwrap()
        .epoch;
    redis.restart().unwrap();
    let page = read_when_back(&s, "room").await;
    assert_ne!(page.epoch, e1);
    assert_eq!(page.head, Offset(0));
}

#[tokio::test]
async fn redis_down_is_a_retryable_error_and_unhealthy_until_it_returns() {
    let mut redis = RedisServer::start_with(Persistence::AofAlways).expect("redis");
    let s = store(&redis, Retention::default());
    s.append("room", None, fresh(), vec![req("a", 1)])
        .await
        .unwrap();
    eventually("healthy", || {
        let s = s.clone();
        async move { s.health().healthy }
    })
    .await;
    redis.kill();
    let err = s
        .append("room", None, fresh(), vec![req("a", 2)])
        .await
        .expect_err("redis is down");
    assert!(matches!(err, ChannelError::Store { .. }), "{err:?}");
    assert!(!err.is_permanent());
    let health = s.health();
    assert!(!health.healthy);
    assert!(health.reason.is_some());
    redis.restart().unwrap();
    eventually("healthy again", || {
        let s = s.clone();
        async move { s.health().healthy }
    })
    .await;
    let appended = s
        .append("room", None, fresh(), vec![req("a", 2)])
        .await
        .unwrap();
    assert_eq!(appended.outcomes, [AppendOutcome::Stored(Offset(2))]);
}

#[tokio::test]
async fn watchers_hear_other_nodes_appends_and_resync_after_the_link_drops() {
    let mut redis = RedisServer::start_with(Persistence::AofAlways).expect("redis");
    let watcher = store(&redis, Retention::default());
    let writer = store(&redis, Retention::default());
    let heard = Arc::new(Mutex::new(Vec::new()));
    let sink_heard = heard.clone();
    watcher.watch(
        "room",
        Arc::new(move |notice| sink_heard.lock().unwrap().push(notice)),
    );
    // The subscription is confirmed by the resync it triggers.
    eventually("subscribed", || {
        let heard = heard.clone();
        async move { heard.lock().unwrap().contains(&StoreNotice::Resync) }
    })
    .await;
    writer
        .append("room", None, fresh(), vec![req("w", 1)])
        .await
        .unwrap();
    writer
        .append("other", None, fresh(), vec![req("w", 1)])
        .await
        .unwrap();
    eventually("advanced to 1", || {
        let heard = heard.clone();
        async move {
            heard.lock().unwrap().iter().any(|n| {
                matches!(
                    n,
                    StoreNotice::Advanced {
                        head: Offset(1),
                        ..
                    }
                )
            })
        }
    })
    .await;
    heard.lock().unwrap().clear();
    redis.restart().unwrap();
    eventually("resync after the link is back", || {
        let heard = heard.clone();
        async move { heard.lock().unwrap().contains(&StoreNotice::Resync) }
    })
    .await;
    watcher.unwatch("room");
    heard.lock().unwrap().clear();
    eventually("writer reconnected", || {
        let writer = writer.clone();
        async move {
            writer
                .append("room", None, fresh(), vec![req("w", 2)])
                .await
                .is_ok()
        }
    })
    .await;
    writer
        .append("room", None, fresh(), vec![req("w", 3)])
        .await
        .unwrap();
    // Give a notification the time a delivered one takes (a round trip), then check none came.
    let _ = writer.read("room", None, Offset(0), all()).await;
    assert!(
        !heard
            .lock()
            .unwrap()
            .iter()
            .any(|n| matches!(n, StoreNotice::Advanced { .. })),
        "no notices after unwatch"
    );
}

#[tokio::test]
async fn a_fenced_append_applies_only_after_its_predecessor() {
    let redis = RedisServer::start().expect("redis");
    let s = store(&redis, Retention::default());
    let token = uuid_like();
    let fence = |number: u64| Fence {
        token: token.clone(),
        number,
        after: number - 1,
    };
    // Number 2 before number 1 applied: refused, nothing stored.
    let err = s
        .append("room", None, fence(2), vec![req("a", 1)])
        .await
        .expect_err("no predecessor");
    assert!(err.to_string().contains("TETHER_FENCE"), "{err}");
    assert!(!err.is_permanent());
    s.append("room", None, fence(1), vec![req("a", 1)])
        .await
        .unwrap();
    s.append("room", None, fence(2), vec![req("a", 2)])
        .await
        .unwrap();
    // A gap in the numbers (number 3 never applied): refused.
    assert!(s
        .append("room", None, fence(4), vec![req("a", 4)])
        .await
        .is_err());
    let page = s.read("room", None, Offset(0), all()).await.unwrap();
    assert_eq!(page.head, Offset(2));
    // Numbers never repeat within a token: an append that must follow number 5 (which never
    // applied) is refused even though the key once held other values.
    assert!(s
        .append(
            "room",
            None,
            Fence {
                token: token.clone(),
                number: 6,
                after: 5,
            },
            vec![req("a", 6)]
        )
        .await
        .is_err());
    // Another writer's fence is its own.
    s.append("room", None, fresh(), vec![req("b", 1)])
        .await
        .unwrap();
}

#[tokio::test]
async fn pipelined_appends_reach_redis_in_the_order_they_were_made() {
    // Calls made in order and awaited together must apply in order, or the second one's fence
    // refuses it: including the very first calls on a fresh Redis (no script cached yet).
    let redis = RedisServer::start().expect("redis");
    let s = store(
        &redis,
        Retention {
            max_messages: 100_000,
            ..Retention::default()
        },
    );
    let token = uuid_like();
    let mut seq = 0;
    for round in 0..100u64 {
        let mut calls = Vec::new();
        for number in 1..=4 {
            seq += 1;
            let number = 4 * round + number;
            let fence = Fence {
                token: token.clone(),
                number,
                after: number - 1,
            };
            calls.push(s.append("ordered", None, fence, vec![req("a", seq)]));
        }
        for (i, result) in futures::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
        {
            let appended = result.unwrap_or_else(|e| panic!("round {round}, call {i}: {e}"));
            assert!(matches!(appended.outcomes[0], AppendOutcome::Stored(_)));
        }
    }
    let page = s.read("ordered", None, Offset(0), all()).await.unwrap();
    assert_eq!(page.head, Offset(400));
}
