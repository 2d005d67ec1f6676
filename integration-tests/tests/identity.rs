//! Identities over real sockets: sessions and publish dedupe state belong to the identity the
//! hub's authenticator established, so a client that presents another client's client id,
//! instance, session id, producer handle and sequence numbers — none of them secret — with a
//! token of its own can neither take that client's session nor have its own publishes taken for
//! replays of the other's (or the other's for replays of its own). The same identity still
//! resumes its session and has its replays recognised.

use std::time::Duration;

use awc::ws::CloseCode;
use tether_channels::hub::{ChannelService, Retention};
use tether_integration_tests::harness::{
    free_addr, init_tracing, redis_channel_service, test_hub_config,
};
use tether_integration_tests::raw::{error_and_close, next_frame, raw, send, Conn};
use tether_integration_tests::RedisServer;
use tether_transport::hub::{Hub, HubHandle, Identity, StaticTokens};
use tether_transport::protocol::{
    Ack, Frame, Message, Offset, SessionId, Welcome, CLOSE_SESSION_TAKEN_OVER,
};

/// Alice has two tokens (one being rotated in); Mallory has one of her own.
fn hub_with(service: ChannelService) -> HubHandle {
    let alice = Identity::new("alice").unwrap();
    let mallory = Identity::new("mallory").unwrap();
    let auth = StaticTokens::with_identities([
        ("alice-token", alice.clone()),
        ("alice-next-token", alice),
        ("mallory-token", mallory),
    ])
    .unwrap();
    let config = test_hub_config(free_addr())
        .authenticator(auth)
        .handler(std::sync::Arc::new(service))
        .build()
        .unwrap();
    Hub::start(config).unwrap()
}

/// A raw connection, with the acks and messages it received so far.
struct Peer {
    conn: Conn,
    welcome: Welcome,
    acks: Vec<Ack>,
    messages: Vec<Message>,
}

impl Peer {
    /// Says hello as client `c`, instance `i`, with `token` (and `resume`), and expects the
    /// welcome.
    async fn hello(url: &str, token: &str, resume: Option<&SessionId>) -> Peer {
        let mut conn = raw(url).await;
        let resume = resume
            .map(|s| format!(r#","resume":"{s}""#))
            .unwrap_or_default();
        send(
            &mut conn,
            format!(
                r#"{{"type":"hello","v":1,"client_id":"c","instance":"i","token":"{token}"{resume}}}"#
            ),
        )
        .await;
        let welcome = match next_frame(&mut conn).await {
            Some(Frame::Welcome(w)) => w,
            other => panic!("expected welcome, got {other:?}"),
        };
        Peer {
            conn,
            welcome,
            acks: Vec::new(),
            messages: Vec::new(),
        }
    }

    /// Attaches `room` (subscribing, live) with producer handle `p`; expects the `attached`.
    async fn attach(&mut self) {
        send(
            &mut self.conn,
            r#"{"type":"attach","channel":"room","subscribe":true,"producer":"p"}"#,
        )
        .await;
        match next_frame(&mut self.conn).await {
            Some(Frame::Attached(a)) => assert_eq!(a.replay, 0),
            other => panic!("expected attached, got {other:?}"),
        }
    }

    /// Publishes `text` as `seq` on `room` and returns its ack.
    async fn publish(&mut self, seq: u64, text: &str) -> Ack {
        send(
            &mut self.conn,
            format!(r#"{{"type":"publish","channel":"room","seq":{seq},"payload":"{text}"}}"#),
        )
        .await;
        self.read_until(|p| p.acks.iter().any(|a| a.seq == seq))
            .await;
        let at = self.acks.iter().position(|a| a.seq == seq).unwrap();
        self.acks.remove(at)
    }

    /// Reads frames (each one within the raw timeout; the connection must stay open and send
    /// no error) until `done`.
    async fn read_until(&mut self, done: impl Fn(&Peer) -> bool) {
        while !done(self) {
            match next_frame(&mut self.conn).await {
                Some(Frame::Ack(ack)) => self.acks.push(ack),
                Some(Frame::Message(m)) => self.messages.push(m),
                other => panic!("expected an ack or a message, got {other:?}"),
            }
        }
    }

    /// Waits until the messages received are exactly `expected` (offset, payload text), in
    /// order.
    async fn received(&mut self, expected: &[(u64, &str)]) {
        self.read_until(|p| p.messages.len() >= expected.len())
            .await;
        let got: Vec<(u64, String)> = self
            .messages
            .iter()
            .map(|m| (m.offset.0, m.payload.json().to_owned()))
            .collect();
        let want: Vec<(u64, String)> = expected
            .iter()
            .map(|(o, t)| (*o, format!("\"{t}\"")))
            .collect();
        assert_eq!(got, want);
    }
}

fn stored(ack: &Ack, offset: u64) {
    assert!(!ack.duplicate, "{ack:?} was taken for a replay");
    assert_eq!(ack.offset, Some(Offset(offset)), "{ack:?}");
}

fn duplicate_of(ack: &Ack, offset: u64) {
    assert!(ack.duplicate, "{ack:?} was stored again");
    assert_eq!(ack.offset, Some(Offset(offset)), "{ack:?}");
}

/// Alice, then Mallory with Alice's client id, instance, session id, handle and seqs; then
/// Alice again, resuming.
async fn identities_are_kept_apart(service: ChannelService) {
    let hub = hub_with(service);
    let url = hub.ws_url();

    let mut alice = Peer::hello(&url, "alice-token", None).await;
    assert!(!alice.welcome.resumed);
    alice.attach().await;
    stored(&alice.publish(1, "alice 1").await, 1);
    alice.received(&[(1, "alice 1")]).await;

    // Mallory presents everything of Alice's but her token: a new session of her own…
    let mut mallory = Peer::hello(&url, "mallory-token", Some(&alice.welcome.session)).await;
    assert!(!mallory.welcome.resumed);
    assert_ne!(mallory.welcome.session, alice.welcome.session);
    // …and her publishes with Alice's producer and seqs are stored, and delivered, as hers.
    mallory.attach().await;
    stored(&mallory.publish(1, "mallory 1").await, 2);
    // Alice was not evicted (she would have read a 4001 close): she receives Mallory's
    // message, and her next publish is hers, which Mallory's same seq is not a replay of.
    alice.received(&[(1, "alice 1"), (2, "mallory 1")]).await;
    stored(&alice.publish(2, "alice 2").await, 3);
    stored(&mallory.publish(2, "mallory 2").await, 4);
    alice
        .received(&[
            (1, "alice 1"),
            (2, "mallory 1"),
            (3, "alice 2"),
            (4, "mallory 2"),
        ])
        .await;
    mallory
        .received(&[(2, "mallory 1"), (3, "alice 2"), (4, "mallory 2")])
        .await;
    assert_eq!(hub.connection_count(), 2);

    // Alice herself (with her other token: the same identity) resumes her session, which
    // closes her previous connection as taken over, as before identities.
    let mut again = Peer::hello(&url, "alice-next-token", Some(&alice.welcome.session)).await;
    assert!(again.welcome.resumed);
    assert_eq!(again.welcome.session, alice.welcome.session);
    let (error, close) = error_and_close(&mut alice.conn).await;
    assert_eq!(error, None);
    assert_eq!(close, Some(CloseCode::Other(CLOSE_SESSION_TAKEN_OVER)));
    // Each one's replays are recognised against its own publishes, and only its own.
    again.attach().await;
    duplicate_of(&again.publish(2, "alice 2").await, 3);
    duplicate_of(&mallory.publish(1, "mallory 1").await, 2);
    stored(&again.publish(3, "alice 3").await, 5);
    mallory
        .received(&[
            (2, "mallory 1"),
            (3, "alice 2"),
            (4, "mallory 2"),
            (5, "alice 3"),
        ])
        .await;
    again.received(&[(5, "alice 3")]).await;
    hub.stop().await;
}

#[actix_rt::test]
async fn another_identity_with_the_same_ids_can_neither_take_a_session_nor_dedupe_against_it() {
    init_tracing();
    let service = ChannelService::builder().build().unwrap();
    tokio::time::timeout(Duration::from_secs(30), identities_are_kept_apart(service))
        .await
        .expect("scenario within 30 s");
}

#[actix_rt::test]
async fn identities_are_kept_apart_in_the_redis_store_too() {
    init_tracing();
    let redis = RedisServer::start().expect("redis");
    let service = redis_channel_service(&redis.url(), Retention::default());
    tokio::time::timeout(Duration::from_secs(30), identities_are_kept_apart(service))
        .await
        .expect("scenario within 30 s");
}
