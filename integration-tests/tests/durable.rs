//! The durable client outbox across a SIGKILL: a real hub, a child client process publishing a
//! numbered stream through the fault proxy, killed while accepted publishes are still unacked,
//! restarted on the same store — and a subscriber that must see every accepted message exactly
//! once, in order.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use tether_channels::durable::DurableStore;
use tether_channels::hub::Retention;
use tether_channels::{
    BufferLimits, Channel, ChannelError, ChannelEvent, ChannelEvents, ChannelOptions,
    DurableFailure,
};
use tether_integration_tests::harness::{
    collect_messages, fast_client, free_addr, init_tracing, open_attached, start_channel_hub,
    ws_url,
};
use tether_integration_tests::FaultProxy;
use tether_transport::Transport;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const T: Duration = Duration::from_secs(10);
const CHANNEL: &str = "numbered";
const COUNT: u64 = 600;

fn temp_store(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tether-durable-it-{}-{}",
        std::process::id(),
        tether_transport::protocol::InstanceId::random().0
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Starts the durable publisher child on `store`, publishing `1..=COUNT` to `url`.
fn spawn_publisher(url: &str, store: &std::path::Path) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_durable_publisher"));
    command
        .args([url, store.to_str().expect("utf-8 path"), CHANNEL])
        .arg(COUNT.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("publisher starts");
    let stdout = child.stdout.take().expect("piped stdout");
    (child, BufReader::new(stdout).lines())
}

/// Reads the child's lines until one satisfies `wanted`; returns it.
async fn until_line(
    lines: &mut Lines<BufReader<ChildStdout>>,
    wanted: impl Fn(&str) -> bool,
    timeout: Duration,
) -> String {
    tokio::time::timeout(timeout, async {
        loop {
            match lines.next_line().await.expect("read child stdout") {
                Some(line) if wanted(&line) => return line,
                Some(_) => {}
                None => panic!("the publisher exited before the expected line"),
            }
        }
    })
    .await
    .expect("expected line within the timeout")
}

fn accepted(line: &str) -> Option<u64> {
    line.strip_prefix("accepted ")?.parse().ok()
}

#[actix_rt::test]
async fn a_durable_publisher_killed_mid_stream_delivers_every_accepted_message_exactly_once() {
    init_tracing();
    let hub_addr = free_addr();
    let hub = start_channel_hub(
        hub_addr,
        Retention {
            max_messages: 100_000,
            ..Retention::default()
        },
    );
    let proxy = FaultProxy::start(hub_addr).expect("proxy starts");
    let subscriber = Transport::start(fast_client(ws_url(hub_addr)).build().unwrap());
    let (reader, mut events, _) = open_attached(&subscriber, CHANNEL, ChannelOptions::default(), T)
        .await
        .expect("subscriber attached");
    let store_path = temp_store("publisher.redb");
    let url = ws_url(proxy.local_addr());

    // First run: publish through the proxy, stall the path a third of the way in so that acks
    // stop coming back while publishes keep being accepted, then SIGKILL the process.
    let (mut first, mut lines) = spawn_publisher(&url, &store_path);
    let recovered = until_line(&mut lines, |l| l.starts_with("recovered "), T).await;
    assert_eq!(recovered, "recovered 0 0");
    until_line(&mut lines, |l| accepted(l) == Some(COUNT / 3), T).await;
    assert!(
        proxy.stall_all() >= 1,
        "the publisher's connection was stalled"
    );
    until_line(&mut lines, |l| accepted(l) == Some(COUNT / 2), T).await;
    first.start_kill().expect("SIGKILL sent");
    let status = first.wait().await.expect("child reaped");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "killed by SIGKILL");
    proxy.cut_stalled();

    // What the killed process left: accepted publishes the hub never acknowledged.
    let (last_seq, unacked) = {
        let store = DurableStore::open(&store_path).expect("store free after the kill");
        (
            store.last_seq(CHANNEL).unwrap(),
            store.queued(CHANNEL).unwrap(),
        )
    };
    assert!(last_seq >= COUNT / 2, "accepted {last_seq} before the kill");
    assert!(unacked > 0, "accepted-but-unacked publishes at the kill");

    // Second run, same configuration: it re-sends what was left, then continues the stream.
    let (mut second, mut lines) = spawn_publisher(&url, &store_path);
    let recovered = until_line(&mut lines, |l| l.starts_with("recovered "), T).await;
    assert_eq!(recovered, format!("recovered {last_seq} {unacked}"));
    // While it runs, the store is its own: another process is refused.
    match DurableStore::open(&store_path) {
        Err(ChannelError::Durable { kind, message, .. }) => {
            assert_eq!(kind, DurableFailure::Locked, "{message}");
        }
        other => panic!("a second process opened a store in use: {other:?}"),
    }
    until_line(&mut lines, |l| l == "done", Duration::from_secs(60)).await;
    let status = tokio::time::timeout(T, second.wait())
        .await
        .expect("publisher exits")
        .expect("child reaped");
    assert!(status.success(), "second run exited with {status}");

    // A third run has nothing new to publish: at most a few acknowledged publishes whose
    // removal had not been written yet are re-sent, and the hub recognises them.
    let (mut third, mut lines) = spawn_publisher(&url, &store_path);
    let recovered = until_line(&mut lines, |l| l.starts_with("recovered "), T).await;
    assert!(
        recovered.starts_with(&format!("recovered {COUNT} ")),
        "{recovered}"
    );
    until_line(&mut lines, |l| l == "done", T).await;
    assert!(third.wait().await.expect("child reaped").success());

    // A marker published after the last run's last ack: whatever the hub stored before it
    // (duplicates included) reaches the subscriber before it.
    let numbers = numbers_until_marker(&reader, &mut events).await;
    let expected: Vec<u64> = (1..=COUNT).collect();
    assert_eq!(numbers.len(), expected.len(), "messages received");
    assert_eq!(numbers, expected, "every message exactly once, in order");
    subscriber.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_full_durable_outbox_refuses_publishes_while_a_healthy_client_keeps_working() {
    init_tracing();
    let hub_addr = free_addr();
    let hub = start_channel_hub(hub_addr, Retention::default());
    let proxy = FaultProxy::start(hub_addr).expect("proxy starts");
    // The durable client's path answers nothing: its publishes are stored, none acknowledged.
    proxy.set_blackhole(true);
    let store = DurableStore::open(temp_store("bounded.redb")).expect("store opens");
    let config = store
        .transport_config(ws_url(proxy.local_addr()))
        .backoff(Duration::from_millis(50), Duration::from_millis(400), 2.0)
        .handshake_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let transport = Transport::start(config);
    let options = ChannelOptions {
        limits: BufferLimits {
            max_messages: 5,
            ..BufferLimits::default()
        },
        ..ChannelOptions::publish_only()
    };
    let (channel, _events, recovered) =
        Channel::open_durable(&transport, "bounded", options.clone(), &store)
            .await
            .expect("durable channel opens");
    assert_eq!((recovered.last_seq, recovered.pending.len()), (0, 0));
    let mut publishes = Vec::new();
    for n in 1..=5u64 {
        let mut publish = channel.publish(&n);
        assert_eq!(publish.accepted().await.expect("accepted"), n);
        publishes.push(publish);
    }
    // Past the bound: refused (retryable), nothing more written.
    let mut refused = channel.publish(&6);
    match refused.accepted().await {
        Err(e @ ChannelError::QueueFull { messages: 5, .. }) => assert!(!e.is_permanent()),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert_eq!(store.queued("bounded").unwrap(), 5);
    // A second handle on the same channel and store is refused: it would reuse the numbers.
    match Channel::open_durable(&transport, "bounded", options, &store).await {
        Err(ChannelError::Durable { kind, .. }) => assert_eq!(kind, DurableFailure::ChannelInUse),
        other => panic!("expected ChannelInUse, got {:?}", other.map(|_| ())),
    }
    // A transport without the store's identity cannot carry a durable channel.
    let stranger = Transport::start(fast_client(ws_url(hub_addr)).build().unwrap());
    match Channel::open_durable(&stranger, "other", ChannelOptions::publish_only(), &store).await {
        Err(ChannelError::Durable { kind, .. }) => {
            assert_eq!(kind, DurableFailure::InvalidOptions)
        }
        other => panic!("expected InvalidOptions, got {:?}", other.map(|_| ())),
    }

    // Meanwhile a healthy client publishes and receives as usual.
    let (healthy, mut healthy_events, _) =
        open_attached(&stranger, "healthy", ChannelOptions::default(), T)
            .await
            .expect("healthy client attached");
    healthy
        .publish(&"still working")
        .await
        .expect("healthy publish acknowledged");
    collect_messages(&mut healthy_events, 1, T)
        .await
        .expect("healthy client receives");

    // The path comes back: the stored publishes are acknowledged and there is room again.
    proxy.set_blackhole(false);
    proxy.cut_all();
    for publish in publishes {
        let ack = tokio::time::timeout(T, publish)
            .await
            .expect("acknowledged within the timeout")
            .expect("acknowledged");
        assert!(!ack.duplicate);
    }
    let mut next = channel.publish(&6);
    assert_eq!(next.accepted().await.expect("room again"), 6);
    tokio::time::timeout(T, next)
        .await
        .expect("acknowledged within the timeout")
        .expect("acknowledged");
    assert_eq!(store.last_seq("bounded").unwrap(), 6);
    transport.close().await;
    stranger.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_durable_client_closed_gracefully_is_continued_by_a_new_instance_exactly_once() {
    const N: u64 = 200;
    init_tracing();
    let hub_addr = free_addr();
    let hub = start_channel_hub(
        hub_addr,
        Retention {
            max_messages: 100_000,
            ..Retention::default()
        },
    );
    let proxy = FaultProxy::start(hub_addr).expect("proxy starts");
    let subscriber = Transport::start(fast_client(ws_url(hub_addr)).build().unwrap());
    let (reader, mut events, _) = open_attached(&subscriber, CHANNEL, ChannelOptions::default(), T)
        .await
        .expect("subscriber attached");
    let store_path = temp_store("graceful.redb");
    let url = ws_url(proxy.local_addr());
    let config = |store: &DurableStore| {
        store
            .transport_config(url.clone())
            .backoff(Duration::from_millis(50), Duration::from_millis(400), 2.0)
            .build()
            .unwrap()
    };

    // First instance: N accepted publishes, the path stalled half way so that the close finds
    // some of them unacknowledged; then a normal shutdown.
    let left = {
        let store = DurableStore::open(&store_path).expect("store opens");
        let transport = Transport::start(config(&store));
        let (channel, _events, recovered) =
            Channel::open_durable(&transport, CHANNEL, ChannelOptions::publish_only(), &store)
                .await
                .expect("durable channel opens");
        assert_eq!((recovered.last_seq, recovered.pending.len()), (0, 0));
        let mut publishes: Vec<tether_channels::PublishFuture> = Vec::new();
        for n in 1..=N {
            if n == N / 2 {
                // Let the first half be acknowledged, then stall the path.
                for publish in publishes.drain(..) {
                    tokio::time::timeout(T, publish)
                        .await
                        .expect("ack within the timeout")
                        .expect("acknowledged");
                }
                assert!(proxy.stall_all() >= 1, "the publisher's path was stalled");
            }
            let mut publish = channel.publish(&serde_json::json!({ "n": n }));
            assert_eq!(publish.accepted().await.expect("accepted"), n);
            publishes.push(publish);
        }
        transport.close().await;
        // Every publish left unacknowledged by the close is answered `Persisted`.
        let mut persisted = 0;
        for publish in publishes {
            match tokio::time::timeout(T, publish).await.expect("answered") {
                Ok(_) => {}
                Err(ChannelError::Persisted { .. }) => persisted += 1,
                Err(e) => panic!("unexpected answer at close: {e}"),
            }
        }
        assert!(persisted > 0, "the close left unacknowledged publishes");
        drop(channel);
        drop(store);
        persisted
    };
    proxy.cut_stalled();

    // A new instance with the same configuration and store: it re-sends what was left.
    let store = DurableStore::open(&store_path).expect("the closed instance released the store");
    assert_eq!(store.last_seq(CHANNEL).unwrap(), N);
    let queued = store.queued(CHANNEL).unwrap();
    assert!(queued >= left, "{queued} stored, {left} persisted at close");
    let transport = Transport::start(config(&store));
    let (_channel, _events, recovered) =
        Channel::open_durable(&transport, CHANNEL, ChannelOptions::publish_only(), &store)
            .await
            .expect("durable channel reopens");
    assert_eq!(recovered.last_seq, N);
    assert_eq!(recovered.pending.len(), queued);
    for publish in recovered.pending {
        tokio::time::timeout(T, publish)
            .await
            .expect("re-sent publish acknowledged within the timeout")
            .expect("re-sent publish acknowledged");
    }

    // Everything before the marker, exactly once and in order.
    let numbers = numbers_until_marker(&reader, &mut events).await;
    let expected: Vec<u64> = (1..=N).collect();
    assert_eq!(numbers, expected, "every message exactly once, in order");
    transport.close().await;
    subscriber.close().await;
    hub.stop().await;
}

/// Publishes a marker on `reader`'s channel and returns the `n` of every message `events`
/// brings before it (whatever the hub stored before the marker, duplicates included).
async fn numbers_until_marker(reader: &Channel, events: &mut ChannelEvents) -> Vec<u64> {
    reader
        .publish(&serde_json::json!({ "marker": true }))
        .await
        .expect("marker acknowledged");
    let mut numbers = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = events.recv().await {
            match event {
                ChannelEvent::Message(m) => {
                    let value: serde_json::Value = serde_json::from_str(m.payload.json()).unwrap();
                    if value.get("marker").is_some() {
                        return;
                    }
                    numbers.push(value["n"].as_u64().expect("numbered message"));
                }
                ChannelEvent::Discontinuity(d) => panic!("discontinuity {d:?}"),
            }
        }
        panic!("subscriber stream ended");
    })
    .await
    .expect("marker delivered");
    numbers
}
