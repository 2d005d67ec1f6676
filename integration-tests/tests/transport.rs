//! The transport core over real loopback sockets: a real hub, real clients, and the fault proxy.
//! Every wait is for a typed event with a timeout.

use std::time::{Duration, Instant};

use tether_integration_tests::harness::{
    account_for, fast_client, free_addr, init_tracing, read_to_end, start_hub, test_hub_config,
    wait_for_connections, ws_url, EventLog,
};
use tether_integration_tests::FaultProxy;
use tether_transport::hub::{Hub, StaticTokens};
use tether_transport::{
    event_channel, ConnectionState::*, ReconnectOutcome, StateEvent, TransitionReason, Transport,
    TransportError,
};

const T: Duration = Duration::from_secs(5);

fn start(config: tether_transport::TransportConfig) -> (Transport, EventLog) {
    let (transport, rx) = Transport::start_with_events(config);
    (transport, EventLog::new(rx))
}

#[actix_rt::test]
async fn connects_and_reports_every_transition_in_order() {
    init_tracing();
    let hub = start_hub(free_addr());
    let (transport, mut events) = start(fast_client(hub.ws_url()).build().unwrap());

    let connected = events.until_state(Connected, T).await.unwrap();
    assert_eq!(
        events.path(),
        [(Initialized, Connecting), (Connecting, Connected)]
    );
    match &connected.reason {
        TransitionReason::HandshakeCompleted {
            resumed, endpoint, ..
        } => {
            assert!(!resumed);
            assert_eq!(endpoint, &hub.ws_url());
        }
        other => panic!("{other:?}"),
    }
    let status = transport.status().await.unwrap();
    assert_eq!(status.state, Connected);
    assert!(status.connected_since_unix_ms.is_some());
    assert!(status.session.is_some());
    assert_eq!(hub.connection_count(), 1);

    transport.close().await;
    events.until_state(Closed, T).await.unwrap();
    hub.stop().await;
}

#[actix_rt::test]
async fn a_state_subscriber_that_stops_reading_is_told_what_it_missed_and_where_things_stand() {
    init_tracing();
    let addr = free_addr();
    let hub = start_hub(addr);
    let (complete, complete_rx) = event_channel(1024);
    // Holds one unread transition; it reads nothing until the transport is closed.
    let (slow, mut slow_rx) = event_channel(1);
    let transport = Transport::start_with_subscribers(
        fast_client(ws_url(addr)).build().unwrap(),
        vec![complete, slow],
    );
    let mut events = EventLog::new(complete_rx);

    events.until_state(Connected, T).await.unwrap();
    // The current state is readable without waiting, and already there when the event is.
    assert_eq!(transport.state(), Connected);
    hub.stop().await;
    events.until_state(Disconnected, T).await.unwrap();
    events.until_state(Connecting, T).await.unwrap();
    events.until_state(Disconnected, T).await.unwrap();
    let hub = start_hub(addr);
    events.until_state(Connected, T).await.unwrap();
    let mut watch = transport.watch_state();
    assert_eq!(*watch.borrow_and_update(), Connected);
    transport.close().await;
    events.until_state(Closed, T).await.unwrap();
    assert_eq!(transport.state(), Closed);
    assert_eq!(*watch.borrow(), Closed);

    let read = read_to_end(&mut slow_rx, T).await.unwrap();
    let lags = account_for(events.seen(), &read).unwrap();
    assert!(lags >= 1, "a reader one transition deep lagged: {read:?}");
    // The last thing it learnt is where the transport ended.
    assert_eq!(read.last().map(StateEvent::state), Some(Closed));
    assert_eq!(slow_rx.state(), Some(Closed));
    hub.stop().await;
}

#[actix_rt::test]
async fn hub_restart_on_the_same_port_reconnects_with_events_in_order() {
    init_tracing();
    let addr = free_addr();
    let hub = start_hub(addr);
    let (transport, mut events) = start(fast_client(ws_url(addr)).build().unwrap());
    events.until_state(Connected, T).await.unwrap();
    let first_session = transport.status().await.unwrap().session.unwrap();

    hub.stop().await;
    let lost = events.until_state(Disconnected, T).await.unwrap();
    assert!(
        matches!(lost.reason, TransitionReason::ConnectionLost(_)),
        "{:?}",
        lost.reason
    );
    assert!(lost.retry_in.is_some());

    let hub = start_hub(addr);
    events.until_state(Connected, T).await.unwrap();
    // Everything after the loss, in order: retries until the hub is back, then connected.
    let after: Vec<_> = events.path().into_iter().skip(2).collect();
    assert_eq!(after.first(), Some(&(Connected, Disconnected)));
    assert_eq!(after.last(), Some(&(Connecting, Connected)));
    for pair in after.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "transitions chain: {after:?}");
    }
    assert!(after[1..after.len() - 1]
        .iter()
        .all(|t| matches!(t, (Disconnected, Connecting) | (Connecting, Disconnected))));
    let status = transport.status().await.unwrap();
    assert_eq!(status.reconnect_count, 1);
    // A new hub process has no memory of the old session: a new one is issued.
    assert_ne!(status.session.unwrap(), first_session);

    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_cut_connection_resumes_its_session_on_the_same_hub() {
    init_tracing();
    let hub = start_hub(free_addr());
    let proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let (transport, mut events) = start(fast_client(ws_url(proxy.local_addr())).build().unwrap());
    events.until_state(Connected, T).await.unwrap();
    let session = transport.status().await.unwrap().session.unwrap();

    assert_eq!(proxy.cut_all(), 1);
    events.until_state(Disconnected, T).await.unwrap();
    let back = events.until_state(Connected, T).await.unwrap();
    match back.reason {
        TransitionReason::HandshakeCompleted {
            session: s,
            resumed,
            ..
        } => {
            assert!(resumed);
            assert_eq!(s, session);
        }
        other => panic!("{other:?}"),
    }
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_stable_connection_that_drops_is_retried_at_once() {
    init_tracing();
    let hub = start_hub(free_addr());
    let proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let config = fast_client(ws_url(proxy.local_addr()))
        .backoff(Duration::from_secs(10), Duration::from_secs(60), 2.0)
        .stability_window(Duration::from_millis(100))
        .build()
        .unwrap();
    let (transport, mut events) = start(config);
    events.until_state(Connected, T).await.unwrap();
    // The connection stays up past the 100 ms stability window.
    events
        .expect_quiet(Duration::from_millis(250))
        .await
        .unwrap();

    proxy.cut_all();
    let lost = events.until_state(Disconnected, T).await.unwrap();
    let delay = lost.retry_in.unwrap();
    assert!(
        delay <= Duration::from_millis(250),
        "fast path delay {delay:?}"
    );
    let started = Instant::now();
    events.until_state(Connected, T).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn an_unanswered_handshake_times_out_and_is_retried() {
    init_tracing();
    let hub = start_hub(free_addr());
    let proxy = FaultProxy::start(hub.local_addr()).unwrap();
    proxy.set_blackhole(true);
    let config = fast_client(ws_url(proxy.local_addr()))
        .handshake_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let (transport, mut events) = start(config);

    let failed = events.until_state(Disconnected, T).await.unwrap();
    match &failed.reason {
        TransitionReason::AttemptFailed(TransportError::HandshakeTimeout { after, .. }) => {
            assert_eq!(*after, Duration::from_millis(300));
        }
        other => panic!("{other:?}"),
    }
    assert!(failed.time_in_previous >= Duration::from_millis(300));
    // And it is retried: a second attempt starts by itself.
    let retry = events.until_state(Connecting, T).await.unwrap();
    assert_eq!(retry.attempt, 2);

    proxy.set_blackhole(false);
    events.until_state(Connected, T).await.unwrap();
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_silent_connection_is_detected_within_the_idle_timeout_on_both_ends() {
    init_tracing();
    let hub = start_hub(free_addr());
    let proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let (transport, mut events) = start(fast_client(ws_url(proxy.local_addr())).build().unwrap());
    events.until_state(Connected, T).await.unwrap();

    assert_eq!(proxy.stall_all(), 1);
    let stalled_at = Instant::now();
    let lost = events.until_state(Disconnected, T).await.unwrap();
    let detected_after = stalled_at.elapsed();
    assert!(
        matches!(
            lost.reason,
            TransitionReason::ConnectionLost(TransportError::HeartbeatTimeout { .. })
        ),
        "{:?}",
        lost.reason
    );
    // Idle timeout is 1 s: silence began at most one ping interval before the stall.
    assert!(
        detected_after <= Duration::from_millis(1500),
        "{detected_after:?}"
    );

    // The replacement connection comes up while the stalled one is still held open.
    events.until_state(Connected, T).await.unwrap();
    // The hub closes the stalled connection on its own idle timeout: one connection remains.
    wait_for_connections(&hub, 1, T)
        .await
        .expect("hub closes the silent connection");
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn rejected_credentials_fail_permanently_without_retry() {
    init_tracing();
    let config = test_hub_config(free_addr())
        .authenticator(StaticTokens::new(["right"]))
        .build()
        .unwrap();
    let hub = Hub::start(config).unwrap();
    let client = fast_client(hub.ws_url()).token("wrong").build().unwrap();
    let (transport, mut events) = start(client);

    let failed = events.until_state(Failed, T).await.unwrap();
    assert_eq!(
        events.path(),
        [(Initialized, Connecting), (Connecting, Failed)]
    );
    match &failed.reason {
        TransitionReason::PermanentError(e @ TransportError::AuthRejected { .. }) => {
            assert!(e.is_permanent())
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(failed.retry_in, None);
    // Zero further attempts: several backoff periods pass with no transition.
    events
        .expect_quiet(Duration::from_millis(800))
        .await
        .unwrap();
    let status = transport.status().await.unwrap();
    assert_eq!(status.state, Failed);
    assert!(status.last_error.unwrap().permanent);

    // The right token, a different client: welcomed.
    let good = fast_client(hub.ws_url()).token("right").build().unwrap();
    let (good, mut good_events) = start(good);
    good_events.until_state(Connected, T).await.unwrap();
    good.close().await;
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn max_attempts_suspends_then_recovers_when_the_hub_returns() {
    init_tracing();
    let addr = free_addr();
    let config = fast_client(ws_url(addr))
        .max_attempts(Some(3))
        .suspend_interval(Duration::from_millis(400))
        .build()
        .unwrap();
    let (transport, mut events) = start(config);

    let suspended = events.until_state(Suspended, T).await.unwrap();
    assert!(
        matches!(
            suspended.reason,
            TransitionReason::BreakerOpened { failures: 3, .. }
        ),
        "{:?}",
        suspended.reason
    );
    let probe = suspended.retry_in.unwrap();
    assert!(probe >= Duration::from_millis(300) && probe <= Duration::from_millis(500));
    // A failed probe goes back to Suspended (slow interval), not to the fast sequence.
    events.until_state(Connecting, T).await.unwrap();
    let again = events.until_state(Suspended, T).await.unwrap();
    assert!(again.retry_in.unwrap() >= Duration::from_millis(300));

    let hub = start_hub(addr);
    let connected = events.until_state(Connected, T).await.unwrap();
    assert_eq!(connected.from, Connecting);
    assert_eq!(transport.status().await.unwrap().state, Connected);
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn reconnect_now_skips_a_long_wait_and_is_rate_limited() {
    init_tracing();
    let addr = free_addr();
    let config = fast_client(ws_url(addr))
        .backoff(Duration::from_secs(30), Duration::from_secs(60), 2.0)
        .manual_reconnect_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let (transport, mut events) = start(config);
    let waiting = events.until_state(Disconnected, T).await.unwrap();
    assert!(waiting.retry_in.unwrap() >= Duration::from_secs(20));
    let status = transport.status().await.unwrap();
    assert!(status.next_retry_in_ms.unwrap() > 20_000);

    let hub = start_hub(addr);
    let asked = Instant::now();
    assert_eq!(
        transport.reconnect_now().await,
        Ok(ReconnectOutcome::Started)
    );
    let connected = events.until_state(Connected, T).await.unwrap();
    assert!(asked.elapsed() < Duration::from_secs(2));
    assert!(events
        .seen()
        .iter()
        .any(|e| e.reason == TransitionReason::ManualReconnect));
    assert_eq!(connected.from, Connecting);
    assert_eq!(
        transport.reconnect_now().await,
        Ok(ReconnectOutcome::AlreadyConnected)
    );

    // Rate limit: drop the hub, and ask twice in a row.
    hub.stop().await;
    events.until_state(Disconnected, T).await.unwrap();
    let _ = transport.reconnect_now().await;
    match transport.reconnect_now().await {
        Err(TransportError::RateLimited { retry_after }) => {
            assert!(retry_after <= Duration::from_secs(1))
        }
        Ok(ReconnectOutcome::AlreadyConnecting) => {}
        other => panic!("{other:?}"),
    }
    transport.close().await;
}

#[actix_rt::test]
async fn close_cancels_every_timer_and_nothing_fires_later() {
    init_tracing();
    let addr = free_addr();
    let config = fast_client(ws_url(addr))
        .backoff(Duration::from_millis(200), Duration::from_millis(200), 1.0)
        .build()
        .unwrap();
    let (transport, mut events) = start(config);
    let waiting = events.until_state(Disconnected, T).await.unwrap();
    assert!(waiting.retry_in.is_some());

    transport.close().await;
    let closed = events.until_state(Closed, T).await.unwrap();
    assert_eq!(closed.reason, TransitionReason::ClosedByApplication);
    assert!(!transport.is_running());
    assert_eq!(
        transport.status().await.unwrap_err(),
        TransportError::Closed
    );
    assert_eq!(transport.reconnect_now().await, Err(TransportError::Closed));

    // A hub appears where the retry would have gone: nothing connects, nothing is published.
    let hub = start_hub(addr);
    events
        .expect_quiet(Duration::from_millis(800))
        .await
        .unwrap();
    assert_eq!(hub.connection_count(), 0);
    hub.stop().await;
}

#[actix_rt::test]
async fn close_while_connected_closes_the_socket() {
    init_tracing();
    let hub = start_hub(free_addr());
    let (transport, mut events) = start(fast_client(hub.ws_url()).build().unwrap());
    events.until_state(Connected, T).await.unwrap();
    transport.close().await;
    events.until_state(Closed, T).await.unwrap();
    wait_for_connections(&hub, 0, T)
        .await
        .expect("the hub sees the connection close");
    hub.stop().await;
}

#[actix_rt::test]
async fn attempts_rotate_through_endpoints() {
    init_tracing();
    let hub = start_hub(free_addr());
    let dead = ws_url(free_addr());
    let config = fast_client(dead).endpoint(hub.ws_url()).build().unwrap();
    let (transport, mut events) = start(config);
    let connected = events.until_state(Connected, T).await.unwrap();
    assert_eq!(connected.attempt, 2);
    match connected.reason {
        TransitionReason::HandshakeCompleted { endpoint, .. } => assert_eq!(endpoint, hub.ws_url()),
        other => panic!("{other:?}"),
    }
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_dead_endpoint_costs_no_backoff_step_while_another_is_untried() {
    init_tracing();
    let a = start_hub(free_addr());
    let b = start_hub(free_addr());
    // Backoff steps of 5 s: anything that waits for one fails the time limits below.
    let config = fast_client(a.ws_url())
        .endpoint(b.ws_url())
        .backoff(Duration::from_secs(5), Duration::from_secs(60), 2.0)
        .build()
        .unwrap();
    let (transport, mut events) = start(config);
    events.until_state(Connected, T).await.unwrap();
    // Past the stability window (300 ms) with nothing happening: the connection is stable.
    events
        .expect_quiet(Duration::from_millis(400))
        .await
        .unwrap();
    // Node A dies: the fast path retries it, it refuses, and B is tried at once.
    let lost_at = tokio::time::Instant::now();
    a.stop().await;
    let connected = events
        .until_state(Connected, Duration::from_secs(2))
        .await
        .unwrap();
    match connected.reason {
        TransitionReason::HandshakeCompleted { endpoint, .. } => assert_eq!(endpoint, b.ws_url()),
        other => panic!("{other:?}"),
    }
    assert!(
        lost_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        lost_at.elapsed()
    );
    // B dies young (within the stability window): that is flapping, never a quick move — the
    // next attempt waits out a backoff step, whatever endpoints remain.
    b.stop().await;
    let lost = events
        .until(T, |ev| {
            matches!(ev.reason, TransitionReason::ConnectionLost(_))
        })
        .await
        .unwrap();
    assert!(
        lost.retry_in.unwrap() >= Duration::from_millis(3750),
        "a backoff step: {:?}",
        lost.retry_in
    );
    transport.close().await;
}

#[actix_rt::test]
async fn a_client_whose_session_was_taken_over_starts_a_new_one_instead_of_taking_it_back() {
    use tether_integration_tests::raw::{next_frame, raw, send};
    use tether_transport::protocol::Frame;
    init_tracing();
    let hub = start_hub(free_addr());
    let (transport, mut events) =
        start(fast_client(hub.ws_url()).client_id("same").build().unwrap());
    events.until_state(Connected, T).await.unwrap();
    let session = transport
        .status()
        .await
        .unwrap()
        .session
        .expect("a session");
    // Another connection with the same client id resumes that session.
    let mut other = raw(&hub.ws_url()).await;
    send(
        &mut other,
        format!(r#"{{"type":"hello","v":1,"client_id":"same","resume":"{session}"}}"#),
    )
    .await;
    match next_frame(&mut other).await {
        Some(Frame::Welcome(w)) => assert!(w.resumed),
        other => panic!("{other:?}"),
    }
    // The transport is closed with 4001, reconnects, and gets a session of its own.
    let lost = events
        .until(T, |ev| {
            matches!(ev.reason, TransitionReason::ConnectionLost(_))
        })
        .await
        .unwrap();
    match &lost.reason {
        TransitionReason::ConnectionLost(TransportError::ConnectionClosed { code, .. }) => {
            assert_eq!(*code, Some(4001))
        }
        other => panic!("{other:?}"),
    }
    let back = events.until_state(Connected, T).await.unwrap();
    match back.reason {
        TransitionReason::HandshakeCompleted {
            session: new,
            resumed,
            ..
        } => {
            assert!(!resumed);
            assert_ne!(new, session);
        }
        other => panic!("{other:?}"),
    }
    // The other connection keeps the session it resumed: nothing took it back.
    wait_for_connections(&hub, 2, T).await.unwrap();
    events
        .expect_quiet(Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(hub.connection_count(), 2);
    transport.close().await;
    hub.stop().await;
}
