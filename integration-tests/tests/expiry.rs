//! Hub-wide state that no longer only grows: channels nobody has attached for their idle TTL
//! leave the hub (in memory, with their history), Redis keys of channels carry a TTL renewed by
//! every use, and an attach that races with a channel's expiry still reaches a live channel.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use awc::ws;
use futures::SinkExt as _;
use tether_channels::hub::{
    AppendRequest, ChannelService, Fence, HistoryStore, PageLimit, ProducerKey, RedisStore,
};
use tether_channels::{ChannelEvent, ChannelOptions};
use tether_integration_tests::harness::{free_addr, init_tracing, open_attached, test_hub_config};
use tether_integration_tests::raw::{next_frame, raw, send, Conn};
use tether_integration_tests::RedisServer;
use tether_transport::hub::{Hub, HubHandle};
use tether_transport::protocol::{
    Attached, ClientId, Epoch, Frame, InstanceId, Offset, Payload, Position,
};
use tether_transport::Transport;

const T: Duration = Duration::from_secs(10);

/// A client of `url`, connected (the attack tools' helper, without its event log).
async fn connected(url: &str) -> Transport {
    tether_integration_tests::attack::connected(url).await.0
}

/// A hub serving `service`, with a heartbeat long enough for raw connections that answer no
/// pings while the test is busy elsewhere.
fn hub_with(service: ChannelService, workers: usize) -> HubHandle {
    let config = test_hub_config(free_addr())
        .workers(workers)
        .heartbeat(Duration::from_secs(5), Duration::from_secs(30))
        .handler(Arc::new(service))
        .build()
        .unwrap();
    Hub::start(config).unwrap()
}

/// A raw connection as `client`, welcomed.
async fn welcomed(url: &str, client: &str) -> Conn {
    let mut conn = raw(url).await;
    send(
        &mut conn,
        format!(r#"{{"type":"hello","v":1,"client_id":"{client}","instance":"i"}}"#),
    )
    .await;
    assert!(matches!(
        next_frame(&mut conn).await,
        Some(Frame::Welcome(_))
    ));
    conn
}

/// Attaches (subscribed) and publishes one message on each of `channels`, in one write; returns
/// each channel's `attached` frame once every publish is acknowledged and delivered — delivered
/// where the subscription started before it (`attached.head` 0: with a shared store the
/// publish may be numbered before the attach is answered, and then precedes the subscription).
async fn one_message_each(conn: &mut Conn, channels: &[String]) -> Vec<Attached> {
    for name in channels {
        conn.feed(ws::Message::Text(
            format!(r#"{{"type":"attach","channel":"{name}"}}"#).into(),
        ))
        .await
        .unwrap();
        conn.feed(ws::Message::Text(
            format!(r#"{{"type":"publish","channel":"{name}","seq":1,"payload":"only"}}"#).into(),
        ))
        .await
        .unwrap();
    }
    conn.flush().await.unwrap();
    let mut attached: Vec<Attached> = Vec::new();
    let (mut acks, mut delivered) = (0, 0);
    let owed = |attached: &[Attached]| attached.iter().filter(|a| a.head == Offset(0)).count();
    while attached.len() < channels.len() || acks < channels.len() || delivered < owed(&attached) {
        match next_frame(conn).await {
            Some(Frame::Attached(a)) => {
                assert!(a.head <= Offset(1), "{a:?}");
                attached.push(a);
            }
            Some(Frame::Ack(ack)) => {
                assert_eq!(ack.offset, Some(Offset(1)));
                acks += 1;
            }
            Some(Frame::Message(m)) => {
                assert_eq!(m.offset, Offset(1));
                delivered += 1;
            }
            other => panic!("after {acks} acks: {other:?}"),
        }
    }
    assert_eq!(delivered, owed(&attached), "nothing delivered twice");
    attached
}

/// A subscriber and a publisher on channel `steady`; each `ping` publishes the next number and
/// waits for its delivery, in order.
struct HealthyPair {
    subscriber: Transport,
    publisher: Transport,
    steady: tether_channels::Channel,
    messages: tether_channels::ChannelEvents,
    sent: u64,
}

impl HealthyPair {
    async fn start(url: &str) -> HealthyPair {
        let subscriber = connected(url).await;
        let publisher = connected(url).await;
        let (_, messages, _) = open_attached(&subscriber, "steady", ChannelOptions::default(), T)
            .await
            .unwrap();
        let (steady, _, _) = open_attached(&publisher, "steady", ChannelOptions::publish_only(), T)
            .await
            .unwrap();
        HealthyPair {
            subscriber,
            publisher,
            steady,
            messages,
            sent: 0,
        }
    }

    async fn ping(&mut self) {
        self.sent += 1;
        let ack = self.steady.publish(&self.sent);
        match tokio::time::timeout(T, self.messages.recv()).await {
            Ok(Some(ChannelEvent::Message(m))) => {
                assert_eq!(m.payload.decode::<u64>().unwrap(), self.sent, "in order");
            }
            other => panic!("healthy message {}: {other:?}", self.sent),
        }
        ack.await.expect("healthy publish acked");
    }

    async fn close(self) {
        self.subscriber.close().await;
        self.publisher.close().await;
    }
}

/// Pings the healthy pair until the hub holds `n` channels (at most `T`).
async fn ping_until_channels(pair: &mut HealthyPair, service: &ChannelService, n: usize) {
    let count = service.watch_channels();
    let deadline = tokio::time::Instant::now() + T;
    while *count.borrow() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} channels, expected {n}",
            service.channel_count()
        );
        pair.ping().await;
    }
}

#[actix_rt::test]
async fn two_thousand_unused_channels_expire_while_a_used_one_goes_on() {
    init_tracing();
    let service = ChannelService::builder()
        .idle_ttl(Duration::from_millis(300))
        .build()
        .unwrap();
    let hub = hub_with(service.clone(), 1);
    let url = hub.ws_url();
    let mut pair = HealthyPair::start(&url).await;
    pair.ping().await;

    // 2,000 channels with one message each, from four connections (500 each: under the
    // per-connection limit), the healthy pair going on in between.
    let mut conns = Vec::new();
    let mut first = None;
    for c in 0..4 {
        let mut conn = welcomed(&url, &format!("crowd-{c}")).await;
        let names: Vec<String> = (0..500).map(|i| format!("crowd-{c}-{i}")).collect();
        let attached = one_message_each(&mut conn, &names).await;
        first.get_or_insert_with(|| attached[0].clone());
        conns.push(conn);
        pair.ping().await;
    }
    assert_eq!(service.channel_count(), 2001);

    // Every client of the crowd leaves: their channels expire; the used one stays.
    drop(conns);
    ping_until_channels(&mut pair, &service, 1).await;
    for _ in 0..5 {
        pair.ping().await;
    }
    assert_eq!(service.channel_count(), 1);

    // A subscriber that comes back to an expired channel is told of the gap into a new epoch
    // (its history went with it): a Discontinuity, never silence.
    let old = first.unwrap();
    let mut back = welcomed(&url, "crowd-0").await;
    send(
        &mut back,
        format!(
            r#"{{"type":"attach","channel":"{}","resume":{{"epoch":"{}","offset":1}}}}"#,
            old.channel, old.epoch
        ),
    )
    .await;
    match next_frame(&mut back).await {
        Some(Frame::Attached(a)) => {
            assert_ne!(a.epoch, old.epoch);
            assert!(!a.resumed);
            let gap = a.gap.expect("a gap into the new epoch");
            assert_eq!(
                gap.from,
                Position {
                    epoch: old.epoch.clone(),
                    offset: Offset(2)
                }
            );
            assert_eq!(gap.to.epoch, a.epoch);
        }
        other => panic!("expected attached, got {other:?}"),
    }
    drop(back);
    pair.close().await;
    let mut count = service.watch_channels();
    tokio::time::timeout(T, count.wait_for(|c| *c == 0))
        .await
        .expect("every channel expired")
        .unwrap();
    hub.stop().await;
}

#[actix_rt::test]
async fn attaches_racing_with_expiry_reach_a_live_channel_and_lose_nothing() {
    init_tracing();
    // Expiry as soon as a millisecond passes with nobody attached. A client detaches and
    // attaches again one round trip later — before, at or after the channel retires — and
    // every fourth time waits for the channel to be gone first (so it surely starts again).
    let service = ChannelService::builder()
        .idle_ttl(Duration::from_millis(1))
        .threads(1)
        .build()
        .unwrap();
    let hub = hub_with(service.clone(), 2);
    let mut conn = welcomed(&hub.ws_url(), "racer").await;
    let mut count = service.watch_channels();
    let mut epochs = HashSet::new();
    let mut restarted_in_the_race = 0;
    let mut previous: Option<Epoch> = None;
    for seq in 1..=200u64 {
        let waited = seq % 4 == 0;
        if waited {
            tokio::time::timeout(T, count.wait_for(|c| *c == 0))
                .await
                .expect("the unused channel expires")
                .unwrap();
        }
        send(&mut conn, r#"{"type":"attach","channel":"race"}"#).await;
        send(
            &mut conn,
            format!(r#"{{"type":"publish","channel":"race","seq":{seq},"payload":{seq}}}"#),
        )
        .await;
        let epoch = match next_frame(&mut conn).await {
            Some(Frame::Attached(a)) => a.epoch,
            other => panic!("cycle {seq}: expected attached, got {other:?}"),
        };
        // While attached the channel cannot expire: the ack and the message come in the epoch
        // it attached to.
        let (mut acked, mut delivered) = (false, false);
        while !(acked && delivered) {
            match next_frame(&mut conn).await {
                Some(Frame::Ack(ack)) => {
                    assert_eq!(
                        (ack.seq, ack.epoch.as_ref()),
                        (seq, Some(&epoch)),
                        "cycle {seq}"
                    );
                    acked = true;
                }
                Some(Frame::Message(m)) => {
                    assert_eq!(
                        (m.epoch.clone(), m.payload.json()),
                        (epoch.clone(), seq.to_string().as_str()),
                        "cycle {seq}"
                    );
                    delivered = true;
                }
                other => panic!("cycle {seq}: {other:?}"),
            }
        }
        send(&mut conn, r#"{"type":"detach","channel":"race"}"#).await;
        assert!(matches!(
            next_frame(&mut conn).await,
            Some(Frame::Detached(_))
        ));
        if !waited && previous.as_ref().is_some_and(|p| *p != epoch) {
            restarted_in_the_race += 1;
        }
        previous = Some(epoch.clone());
        epochs.insert(epoch);
    }
    eprintln!(
        "the channel started {} times, {restarted_in_the_race} of them while the attach raced",
        epochs.len()
    );
    assert!(epochs.len() > 50, "it expired every time it was waited for");
    hub.stop().await;
}

/// A Redis reply's integer (`:N\r\n`).
fn int_reply(reply: &str) -> i64 {
    reply
        .trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not an integer reply: {reply:?}"))
}

/// How many keys the Redis holds, and how many of them have a TTL (`INFO keyspace`).
fn keys_and_expiring(redis: &RedisServer) -> (u64, u64) {
    let info = redis.command("INFO keyspace").unwrap();
    let Some(db) = info.lines().find_map(|l| l.strip_prefix("db0:")) else {
        return (0, 0);
    };
    let field = |name: &str| {
        db.split(',')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {db:?}"))
    };
    (field("keys"), field("expires"))
}

fn channel_key(channel: &str, suffix: &str) -> String {
    format!("tether:{}:{channel}:{suffix}", channel.len())
}

fn ttl_ms(redis: &RedisServer, key: &str) -> i64 {
    int_reply(&redis.command(&format!("PTTL {key}")).unwrap())
}

/// A store on `redis` whose channel keys expire `key_ttl` after their last use (a command may
/// take up to 5 s: the test host may be busy; the notification link is probed at the default
/// interval).
fn redis_store(redis: &RedisServer, key_ttl: Duration) -> Arc<RedisStore> {
    RedisStore::builder(redis.url())
        .key_ttl(key_ttl)
        .response_timeout(Duration::from_secs(5))
        .build()
        .expect("store builds")
}

fn publish(seq: u64) -> AppendRequest {
    AppendRequest {
        producer: ProducerKey {
            identity: tether_transport::hub::Identity::new("tester").unwrap(),
            client: ClientId("c".into()),
            instance: InstanceId("i".into()),
            producer: String::new(),
        }
        .into(),
        seq,
        payload: Payload::from_value(&seq).unwrap(),
    }
}

fn fence() -> Fence {
    Fence {
        token: Epoch::random().to_string(),
        number: 1,
        after: 0,
    }
}

#[tokio::test]
async fn redis_keys_of_a_channel_expire_after_the_key_ttl_and_every_use_renews_them() {
    let redis = RedisServer::start().expect("redis");
    let minute = Duration::from_secs(60);
    let s = redis_store(&redis, minute);

    // An attach to a channel nobody used reads its position: that creates its meta hash, with
    // the TTL — nothing of it is kept for ever.
    s.read("never", None, Offset(0), PageLimit::POSITION_ONLY)
        .await
        .unwrap();
    let meta = ttl_ms(&redis, &channel_key("never", "m"));
    assert!((1..=60_000).contains(&meta), "meta PTTL {meta}");

    // An append: stream, index and meta share one deadline.
    s.append("room", None, fence(), vec![publish(1)])
        .await
        .unwrap();
    for suffix in ["s", "i", "m"] {
        let ttl = ttl_ms(&redis, &channel_key("room", suffix));
        assert!((55_000..=60_000).contains(&ttl), "{suffix}: PTTL {ttl}");
    }
    // No key without a TTL: fence and producer keys expire too.
    let (keys, expiring) = keys_and_expiring(&redis);
    assert!(keys >= 5, "{keys} keys");
    assert_eq!(expiring, keys, "every key has a TTL");

    // A read (an attach, a resume, a catch-up) renews them.
    for suffix in ["s", "i", "m"] {
        redis
            .command(&format!("PEXPIRE {} 5000", channel_key("room", suffix)))
            .unwrap();
    }
    s.read("room", None, Offset(0), PageLimit::default())
        .await
        .unwrap();
    for suffix in ["s", "i", "m"] {
        let ttl = ttl_ms(&redis, &channel_key("room", suffix));
        assert!(ttl > 50_000, "{suffix} renewed: PTTL {ttl}");
    }
}

#[tokio::test]
async fn a_channel_whose_redis_keys_expired_starts_a_new_epoch() {
    let redis = RedisServer::start().expect("redis");
    let s = redis_store(&redis, Duration::from_millis(300));
    let first = s
        .append("room", None, fence(), vec![publish(1)])
        .await
        .unwrap();
    // Redis removes them on its own once the TTL passed (checked, not slept on).
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let exists = int_reply(
            &redis
                .command(&format!(
                    "EXISTS {} {} {}",
                    channel_key("room", "s"),
                    channel_key("room", "i"),
                    channel_key("room", "m")
                ))
                .unwrap(),
        );
        if exists == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "keys never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = Position {
        epoch: first.epoch.clone(),
        offset: first.head,
    };
    let page = s
        .read("room", Some(seen), Offset(0), PageLimit::default())
        .await
        .unwrap();
    assert_ne!(
        page.epoch, first.epoch,
        "the expired channel's epoch went with it"
    );
    assert_eq!((page.head, page.first), (Offset(0), Offset(1)));
}

#[actix_rt::test]
async fn on_redis_unused_channels_leave_the_hub_and_their_keys_carry_a_ttl() {
    init_tracing();
    let redis = RedisServer::start().expect("redis");
    let key_ttl = Duration::from_secs(120);
    let service = ChannelService::builder()
        .store(redis_store(&redis, key_ttl))
        .idle_ttl(Duration::from_millis(200))
        .build()
        .unwrap();
    let hub = hub_with(service.clone(), 1);
    let url = hub.ws_url();
    let mut pair = HealthyPair::start(&url).await;
    let mut conn = welcomed(&url, "crowd").await;
    let names: Vec<String> = (0..200).map(|i| format!("crowd-{i}")).collect();
    one_message_each(&mut conn, &names).await;
    // And one attached without a publish: a channel never used before.
    send(&mut conn, r#"{"type":"attach","channel":"untouched"}"#).await;
    assert!(matches!(
        next_frame(&mut conn).await,
        Some(Frame::Attached(_))
    ));
    pair.ping().await;
    assert_eq!(service.channel_count(), 202);
    drop(conn);
    ping_until_channels(&mut pair, &service, 1).await;
    pair.ping().await;

    // The data stays in Redis for other nodes and later resumes — for the key TTL, not for ever.
    for name in names
        .iter()
        .take(20)
        .chain(std::iter::once(&"untouched".to_owned()))
    {
        let ttl = ttl_ms(&redis, &channel_key(name, "m"));
        assert!(
            (1..=key_ttl.as_millis() as i64).contains(&ttl),
            "{name}: PTTL {ttl}"
        );
    }
    let (keys, expiring) = keys_and_expiring(&redis);
    assert!(keys > 600, "{keys} keys");
    assert_eq!(expiring, keys, "every key has a TTL");
    pair.close().await;
    hub.stop().await;
}
