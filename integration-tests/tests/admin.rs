//! The session admin API over loopback against real hubs: the token is required, sessions and
//! channels are paged and described, a disconnect drops a connection whose client comes back
//! losing nothing, and on several nodes of one Redis every node answers for all of them.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tether_channels::hub::{ChannelService, Retention};
use tether_channels::{ChannelEvents, ChannelOptions};
use tether_integration_tests::attack::assert_received_in_order;
use tether_integration_tests::harness::{
    connected_with, fast_client, free_addr, init_tracing, open_attached, redis_channel_service,
    test_hub_config, wait_for_connections, ws_url, EventLog,
};
use tether_integration_tests::{RedisServer, TestCert};
use tether_transport::hub::{Hub, HubHandle};
use tether_transport::{ConnectionState, Transport, TransportConfig};

const T: Duration = Duration::from_secs(10);
const TOKEN: &str = "admin-token-for-tests-0123456789";

fn hub(service: ChannelService, node_id: &str, token: Option<&str>) -> HubHandle {
    let mut config = test_hub_config(SocketAddr::from(([127, 0, 0, 1], 0)))
        .node_id(node_id)
        .handler(std::sync::Arc::new(service));
    if let Some(token) = token {
        config = config.admin_token(token);
    }
    Hub::start(config.build().expect("valid hub config")).expect("hub starts")
}

fn memory_service() -> ChannelService {
    ChannelService::builder().build().expect("valid service")
}

/// `method` `path` on the hub at `addr` with `token` (none: no `Authorization`); the status,
/// the `WWW-Authenticate` header and the JSON body.
async fn call(
    addr: SocketAddr,
    post: bool,
    path: &str,
    token: Option<&str>,
) -> (u16, Option<String>, Value) {
    let client = awc::Client::builder().timeout(T).finish();
    request(&client, format!("http://{addr}{path}"), post, token).await
}

async fn request(
    client: &awc::Client,
    url: String,
    post: bool,
    token: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut request = if post {
        client.post(&url)
    } else {
        client.get(&url)
    };
    if let Some(token) = token {
        request = request.insert_header(("Authorization", format!("Bearer {token}")));
    }
    let mut response = request.send().await.expect("the hub answers");
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.body().await.expect("a body");
    let json =
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {body:?}"));
    (response.status().as_u16(), challenge, json)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, _, body) = call(addr, false, path, Some(TOKEN)).await;
    (status, body)
}

async fn post(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, _, body) = call(addr, true, path, Some(TOKEN)).await;
    (status, body)
}

/// A client `client_id` of `url`, connected, with its transitions.
async fn client(url: &str, client_id: &str) -> (Transport, EventLog) {
    let config = fast_client(url.to_owned())
        .client_id(client_id)
        .max_attempts(None)
        .build()
        .expect("config");
    connected_with(config, T).await
}

async fn subscribed(transport: &Transport, name: &str) -> ChannelEvents {
    let (_, events, _) = open_attached(transport, name, ChannelOptions::default(), T)
        .await
        .expect("attached");
    events
}

fn names(list: &Value, field: &str, key: &str) -> Vec<String> {
    list[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} in {list}"))
        .iter()
        .map(|s| s[key].as_str().unwrap().to_owned())
        .collect()
}

#[actix_rt::test]
async fn the_admin_api_wants_its_token_and_is_off_without_one() {
    init_tracing();
    let off = hub(memory_service(), "off", None);
    let (status, _, body) = call(off.local_addr(), false, "/sessions", Some(TOKEN)).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "admin_disabled");

    let on = hub(memory_service(), "on", Some(TOKEN));
    let addr = on.local_addr();
    for path in ["/sessions", "/sessions/x", "/channels", "/channels/x"] {
        let (status, challenge, body) = call(addr, false, path, None).await;
        assert_eq!(status, 401, "{path} without a token");
        assert_eq!(body["error"], "unauthorized");
        assert!(challenge.unwrap().starts_with("Bearer"));
        let (status, _, _) =
            call(addr, false, path, Some("admin-token-for-tests-012345678X")).await;
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    let (status, _, _) = call(addr, true, "/sessions/x/disconnect", Some("nope")).await;
    assert_eq!(status, 401);

    let (status, body) = get(addr, "/sessions").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sessions"], serde_json::json!([]));
    assert_eq!(body["nodes"], serde_json::json!(["on"]));
    assert_eq!(get(addr, "/sessions?limit=0").await.0, 400);
    assert_eq!(get(addr, "/sessions?limit=1001").await.0, 400);
    assert_eq!(get(addr, "/sessions?cursor=not-hex").await.0, 400);
    assert_eq!(get(addr, "/channels?cursor=zz").await.0, 400);

    // Tokens are checked when the hub is built.
    assert!(test_hub_config(free_addr())
        .admin_token("short")
        .build()
        .is_err());
    off.stop().await;
    on.stop().await;
}

#[actix_rt::test]
async fn sessions_are_paged_and_described_with_their_channels() {
    init_tracing();
    let hub = hub(memory_service(), "solo", Some(TOKEN));
    let (addr, url) = (hub.local_addr(), hub.ws_url());
    let mut clients = Vec::new();
    let mut feeds = Vec::new();
    for id in ["c-3", "c-0", "c-4", "c-1", "c-2"] {
        let (transport, _) = client(&url, id).await;
        feeds.push(subscribed(&transport, "room").await);
        clients.push(transport);
    }
    let (publisher, _) = client(&url, "pub").await;
    let (room, _, _) = open_attached(&publisher, "room", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    for i in 1..=10u64 {
        room.publish(&i).await.expect("acknowledged");
    }
    for feed in &mut feeds {
        assert_received_in_order(feed, 10).await;
    }

    // Pages of two, walked with the cursor: every session once, by client id.
    let mut seen = Vec::new();
    let mut path = "/sessions?limit=2".to_owned();
    loop {
        let (status, page) = get(addr, &path).await;
        assert_eq!(status, 200, "{page}");
        assert!(page["sessions"].as_array().unwrap().len() <= 2);
        for s in page["sessions"].as_array().unwrap() {
            assert_eq!(s["state"], "connected");
            assert_eq!(s["node"], "solo");
            assert_eq!(s["reconnects"], 0);
        }
        seen.extend(names(&page, "sessions", "client_id"));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/sessions?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["c-0", "c-1", "c-2", "c-3", "c-4", "pub"]);

    let (status, detail) = get(addr, "/sessions/c-1").await;
    assert_eq!(status, 200, "{detail}");
    let session = &detail["sessions"][0];
    assert_eq!(session["state"], "connected");
    assert!(session["connected_since_unix_ms"].as_u64().unwrap() > 0);
    assert!(session.get("disconnected_since_unix_ms").is_none());
    let connection = &session["connection"];
    assert!(connection["peer_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(connection["protocol_version"], 2);
    assert!(connection["last_heartbeat_unix_ms"].as_u64().unwrap() > 0);
    let channels = connection["channels"].as_array().unwrap();
    assert_eq!(channels.len(), 1, "{detail}");
    assert_eq!(channels[0]["channel"], "room");
    assert_eq!(channels[0]["subscribed"], true);
    assert_eq!(channels[0]["live"], true);
    assert_eq!(channels[0]["offset"], 10);
    assert_eq!(channels[0]["behind"], 0);

    let (status, body) = get(addr, "/sessions/nobody").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown_client");

    // A client that left is disconnected, resumable, and says since when.
    let leaving = clients.remove(0); // c-3
    let before = hub.connection_count();
    leaving.close().await;
    // The session is detached before the hub counts its connection closed.
    wait_for_connections(&hub, before - 1, T).await.unwrap();
    let (status, detached) = get(addr, "/sessions/c-3").await;
    assert_eq!(status, 200, "{detached}");
    assert_eq!(detached["sessions"][0]["state"], "disconnected");
    assert!(
        detached["sessions"][0]["disconnected_since_unix_ms"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(detached["sessions"][0].get("connection").is_none());
    hub.stop().await;
}

/// Waits until every one of `hubs` has announced itself to its peers (within [`T`]).
async fn announced(hubs: &[&HubHandle]) {
    for hub in hubs {
        let mut watch = hub.watch_admin_announced();
        tokio::time::timeout(T, watch.wait_for(|done| *done))
            .await
            .expect("announced within the timeout")
            .expect("the hub is running");
    }
}

#[actix_rt::test]
async fn a_disconnected_client_comes_back_and_loses_nothing() {
    init_tracing();
    let hub = hub(memory_service(), "solo", Some(TOKEN));
    let (addr, url) = (hub.local_addr(), hub.ws_url());
    let (subscriber, mut sub_events) = client(&url, "sub").await;
    let mut feed = subscribed(&subscriber, "steady").await;
    let (publisher, _) = client(&url, "pub").await;
    let (steady, _, _) = open_attached(&publisher, "steady", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    let publishing = actix_rt::spawn(async move {
        for i in 1..=300u64 {
            steady.publish(&i).await.expect("acknowledged");
        }
        steady
    });

    for mode in ["close", "reset"] {
        let (status, body) = post(addr, &format!("/sessions/sub/disconnect?mode={mode}")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["mode"], mode);
        assert_eq!(body["disconnected"].as_array().unwrap().len(), 1);
        sub_events
            .until_state(ConnectionState::Disconnected, T)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        sub_events
            .until_state(ConnectionState::Connected, T)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
    }
    publishing.await.unwrap();
    assert_received_in_order(&mut feed, 300).await;

    // The session was resumed (and counted) before its welcome reached the client.
    let (status, detail) = get(addr, "/sessions/sub").await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["sessions"][0]["state"], "connected");
    assert_eq!(detail["sessions"][0]["reconnects"], 2);
    assert_eq!(
        detail["sessions"].as_array().unwrap().len(),
        1,
        "one session, resumed"
    );

    let (status, body) = post(addr, "/sessions/nobody/disconnect").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_connected");
    assert_eq!(
        post(addr, "/sessions/sub/disconnect?mode=gently").await.0,
        400
    );
    drop(publisher);
    hub.stop().await;
}

#[actix_rt::test]
async fn channels_are_listed_and_described() {
    init_tracing();
    let hub = hub(memory_service(), "solo", Some(TOKEN));
    let (addr, url) = (hub.local_addr(), hub.ws_url());
    let (reader, _) = client(&url, "reader").await;
    let mut feeds = Vec::new();
    for name in ["b", "room/1", "a", "c"] {
        feeds.push(subscribed(&reader, name).await);
    }
    let (writer, _) = client(&url, "writer").await;
    let (b, _, _) = open_attached(&writer, "b", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    for i in 1..=3u64 {
        b.publish(&i).await.expect("acknowledged");
    }
    assert_received_in_order(&mut feeds[0], 3).await;

    let (status, first) = get(addr, "/channels?limit=2").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(names(&first, "channels", "name"), ["a", "b"]);
    let b_summary = &first["channels"][1];
    assert_eq!(b_summary["head"], 3);
    assert_eq!(b_summary["subscribers"], 1);
    assert_eq!(b_summary["nodes"], serde_json::json!(["solo"]));
    let cursor = first["next_cursor"].as_str().expect("more follow");
    let (_, rest) = get(addr, &format!("/channels?limit=2&cursor={cursor}")).await;
    assert_eq!(names(&rest, "channels", "name"), ["c", "room/1"]);
    assert_eq!(rest["next_cursor"], Value::Null);

    let (status, detail) = get(addr, "/channels/b").await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["head"], 3);
    assert_eq!(detail["first_retained"], 1);
    assert!(detail["epoch"].as_str().is_some());
    let subscribers = detail["subscribers"].as_array().unwrap();
    assert_eq!(subscribers.len(), 1);
    assert_eq!(subscribers[0]["client_id"], "reader");
    assert_eq!(subscribers[0]["node"], "solo");
    assert_eq!(subscribers[0]["offset"], 3);
    assert_eq!(subscribers[0]["behind"], 0);
    assert_eq!(
        detail["by_node"]["solo"]["members"], 2,
        "the writer is a member"
    );

    // Names with a slash, plain or percent-encoded.
    for path in ["/channels/room/1", "/channels/room%2F1"] {
        let (status, detail) = get(addr, path).await;
        assert_eq!(status, 200, "{path}: {detail}");
        assert_eq!(detail["name"], "room/1");
    }
    let (status, body) = get(addr, "/channels/never").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown_channel");
    drop(writer);
    hub.stop().await;
}

#[actix_rt::test]
async fn every_node_of_a_redis_cluster_answers_for_all_of_them() {
    init_tracing();
    let redis = RedisServer::start().expect("redis-server");
    let service = || redis_channel_service(&redis.url(), Retention::default());
    let a = hub(service(), "node-a", Some(TOKEN));
    let b = hub(service(), "node-b", Some(TOKEN));
    let (on_a, _) = client(&ws_url(a.local_addr()), "on-a").await;
    let (on_b, mut b_events) = client(&ws_url(b.local_addr()), "on-b").await;
    let mut feed_a = subscribed(&on_a, "shared").await;
    let mut feed_b = subscribed(&on_b, "shared").await;

    // Each node finds the other through Redis.
    announced(&[&a, &b]).await;
    for node in [a.local_addr(), b.local_addr()] {
        let (status, page) = get(node, "/sessions").await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["nodes"], serde_json::json!(["node-a", "node-b"]));
        assert_eq!(names(&page, "sessions", "client_id"), ["on-a", "on-b"]);
        assert_eq!(names(&page, "sessions", "node"), ["node-a", "node-b"]);
        assert_eq!(page["unreachable"], serde_json::json!([]));
    }
    let (status, far) = get(a.local_addr(), "/sessions/on-b").await;
    assert_eq!(status, 200, "{far}");
    assert_eq!(far["sessions"][0]["node"], "node-b");
    assert_eq!(
        far["sessions"][0]["connection"]["channels"][0]["channel"],
        "shared"
    );

    // Node a drops a connection of node b's; the client comes back and loses nothing.
    let (status, body) = post(a.local_addr(), "/sessions/on-b/disconnect?mode=reset").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["disconnected"][0]["node"], "node-b");
    b_events
        .until_state(ConnectionState::Disconnected, T)
        .await
        .unwrap();
    b_events
        .until_state(ConnectionState::Connected, T)
        .await
        .unwrap();
    let (publisher, _) = client(&ws_url(a.local_addr()), "pub").await;
    let (shared, _, _) = open_attached(&publisher, "shared", ChannelOptions::publish_only(), T)
        .await
        .unwrap();
    for i in 1..=5u64 {
        shared.publish(&i).await.expect("acknowledged");
    }
    assert_received_in_order(&mut feed_a, 5).await;
    assert_received_in_order(&mut feed_b, 5).await;

    // Both feeds had every message: both subscribers are attached on their nodes.
    let (status, channel) = get(b.local_addr(), "/channels/shared").await;
    assert_eq!(status, 200, "{channel}");
    assert_eq!(channel["subscribers"].as_array().unwrap().len(), 2);
    assert_eq!(channel["head"], 5);
    assert_eq!(names(&channel, "subscribers", "node"), ["node-a", "node-b"]);
    let (_, list) = get(b.local_addr(), "/channels").await;
    assert_eq!(list["channels"][0]["subscribers"], 2, "{list}");
    assert_eq!(
        list["channels"][0]["nodes"],
        serde_json::json!(["node-a", "node-b"])
    );

    // Whoever can write to Redis cannot collect admin tokens by announcing a node: an entry
    // without this cluster's proof is named and never asked.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    let forged = format!(
        "HSET tether:admin:nodes evil \"{expires} 00 http://{}\"",
        trap.local_addr().unwrap()
    );
    redis
        .command(&forged)
        .expect("a forged announcement written");
    let (status, page) = get(a.local_addr(), "/sessions").await;
    assert_eq!(status, 200, "{page}");
    let evil = page["unreachable"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["node"] == "evil")
        .unwrap_or_else(|| panic!("the forged node is named: {page}"));
    assert!(
        evil["error"].as_str().unwrap().contains("not signed"),
        "{evil}"
    );
    assert!(
        matches!(trap.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the forged node's address was never contacted"
    );
    assert_eq!(
        page["nodes"],
        serde_json::json!(["node-a", "node-b"]),
        "{page}"
    );

    // A node that crashed is named, not silently left out, until its entry expires.
    b.kill().await;
    let (status, page) = get(a.local_addr(), "/sessions").await;
    assert_eq!(status, 200);
    assert!(
        page["unreachable"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["node"] == "node-b"),
        "{page}"
    );
    assert_eq!(page["nodes"], serde_json::json!(["node-a"]));
    drop(publisher);
    a.stop().await;
}

#[actix_rt::test]
async fn a_flood_of_refused_admin_requests_costs_a_healthy_pair_nothing() {
    init_tracing();
    let hub = hub(memory_service(), "solo", Some(TOKEN));
    let addr = hub.local_addr();
    let mut pair = tether_integration_tests::attack::HealthyPair::start(&hub.ws_url()).await;
    let flood = actix_rt::spawn(async move {
        let long = "x".repeat(8 * 1024);
        for i in 0..300 {
            let (status, _, _) = match i % 5 {
                0 => call(addr, false, "/sessions", None).await,
                1 => call(addr, false, "/sessions", Some(&long)).await,
                2 => {
                    call(
                        addr,
                        true,
                        "/sessions/sub/disconnect",
                        Some("wrong-token-wrong-token"),
                    )
                    .await
                }
                3 => call(addr, false, "/sessions?limit=100000", Some(TOKEN)).await,
                _ => {
                    call(
                        addr,
                        false,
                        &format!("/sessions?cursor={long}"),
                        Some(TOKEN),
                    )
                    .await
                }
            };
            assert!(matches!(status, 400 | 401 | 431), "refused, got {status}");
        }
    });
    pair.publish_acked(1, 200).await;
    flood.await.unwrap();
    pair.assert_received_in_order(200).await;
    pair.sub_events
        .expect_quiet(Duration::from_millis(100))
        .await
        .expect("the healthy subscriber's connection never dropped");
    hub.stop().await;
}

#[actix_rt::test]
async fn tls_nodes_ask_each_other_over_https_trusting_the_peer_ca() {
    init_tracing();
    let redis = RedisServer::start().expect("redis-server");
    let cert = TestCert::localhost();
    let tls_node = |id: &str, trust_peers: bool| {
        let mut config = cert
            .serve(test_hub_config(SocketAddr::from(([127, 0, 0, 1], 0))))
            .node_id(id)
            .handler(std::sync::Arc::new(redis_channel_service(
                &redis.url(),
                Retention::default(),
            )))
            .admin_token(TOKEN);
        if trust_peers {
            config = config.admin_peer_ca(cert.cert_pem.clone());
        }
        Hub::start(config.build().expect("valid hub config")).expect("hub starts")
    };
    let a = tls_node("tls-a", true);
    let b = tls_node("tls-b", true);
    let config = cert
        .trust(fast_client(b.ws_url()))
        .client_id("on-b")
        .build()
        .unwrap();
    let (on_b, _) = connected_with(config, T).await;

    let trust = cert
        .trust(TransportConfig::builder(a.ws_url()))
        .build()
        .unwrap()
        .tls
        .rustls_config()
        .expect("a TLS client")
        .clone();
    let https = awc::Client::builder()
        .connector(awc::Connector::new().rustls_0_23(trust))
        .timeout(T)
        .finish();
    let ask = |hub: &HubHandle, path: &str| format!("https://{}{path}", hub.local_addr());
    announced(&[&a, &b]).await;
    let (status, _, page) = request(&https, ask(&a, "/sessions"), false, Some(TOKEN)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["nodes"], serde_json::json!(["tls-a", "tls-b"]));
    assert_eq!(names(&page, "sessions", "client_id"), ["on-b"]);
    assert_eq!(page["unreachable"], serde_json::json!([]));

    // A node that does not trust its peers' CA says so rather than answering for itself only.
    let c = tls_node("tls-c", false);
    let (status, _, page) = request(&https, ask(&c, "/sessions"), false, Some(TOKEN)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["unreachable"].as_array().unwrap().len(), 2, "{page}");
    assert_eq!(page["nodes"], serde_json::json!(["tls-c"]));
    drop(on_b);
    for hub in [a, b, c] {
        hub.stop().await;
    }
}

#[actix_rt::test]
async fn a_client_bound_to_a_local_address_connects_from_it() {
    init_tracing();
    let hub = hub(memory_service(), "solo", Some(TOKEN));
    let config = fast_client(hub.ws_url())
        .client_id("sourced")
        .local_address([127, 0, 0, 2].into())
        .build()
        .unwrap();
    let (sourced, _) = connected_with(config, T).await;
    let (status, detail) = get(hub.local_addr(), "/sessions/sourced").await;
    assert_eq!(status, 200, "{detail}");
    let peer = detail["sessions"][0]["connection"]["peer_addr"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(peer.starts_with("127.0.0.2:"), "{peer}");
    drop(sourced);
    hub.stop().await;
}
