//! TLS over real sockets: a hub serving `wss://` with a certificate made at run time, clients
//! that trust it (or do not), the fault proxy forwarding the encrypted bytes in between.

use std::sync::Arc;
use std::time::Duration;

use tether_channels::hub::{ChannelService, Retention};
use tether_channels::{ChannelEvent, ChannelOptions, ChannelState};
use tether_integration_tests::harness::{
    collect_messages, fast_client, free_addr, init_tracing, open_attached, start_hub,
    test_hub_config, EventLog,
};
use tether_integration_tests::{FaultProxy, TestCert};
use tether_transport::hub::{Hub, HubHandle};
use tether_transport::{
    ConnectionState, ErrorCategory, TransitionReason, Transport, TransportConfig, TransportError,
};

const T: Duration = Duration::from_secs(10);

/// A channel hub on loopback serving TLS with `cert`.
fn start_tls_hub(cert: &TestCert) -> HubHandle {
    let service = ChannelService::builder()
        .retention(Retention {
            max_messages: 10_000,
            ..Retention::default()
        })
        .build()
        .expect("valid channel service");
    let config = cert
        .serve(test_hub_config(free_addr()))
        .handler(Arc::new(service))
        .build()
        .expect("valid hub config");
    Hub::start(config).expect("hub starts")
}

fn start(config: TransportConfig) -> (Transport, EventLog) {
    let (transport, rx) = Transport::start_with_events(config);
    (transport, EventLog::new(rx))
}

/// The payloads of the messages among `events`, in arrival order.
fn payloads(events: &[ChannelEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|ev| match ev {
            ChannelEvent::Message(m) => m.payload.decode::<u64>().unwrap(),
            ChannelEvent::Discontinuity(d) => panic!("unexpected discontinuity {d:?}"),
        })
        .collect()
}

#[actix_rt::test]
async fn a_wss_client_survives_a_cut_through_the_proxy_and_loses_nothing() {
    init_tracing();
    let cert = TestCert::localhost();
    let hub = start_tls_hub(&cert);
    assert!(hub.ws_url().starts_with("wss://"), "{}", hub.ws_url());
    let proxy = FaultProxy::start(hub.local_addr()).unwrap();
    let url = format!("wss://{}/ws", proxy.local_addr());
    let client = || {
        cert.trust(fast_client(url.clone()))
            .max_attempts(None)
            .stability_window(Duration::from_millis(100))
            .build()
            .unwrap()
    };
    let (subscriber, mut sub_log) = start(client());
    let (publisher, _) = start(client());
    let (_sub, mut events, mut sub_states) =
        open_attached(&subscriber, "secure", ChannelOptions::default(), T)
            .await
            .unwrap();
    let options = ChannelOptions {
        subscribe: false,
        ..ChannelOptions::default()
    };
    let (publishing, _, mut pub_states) = open_attached(&publisher, "secure", options, T)
        .await
        .unwrap();
    assert_eq!(
        proxy.stats().accepted,
        2,
        "both clients went through the proxy"
    );

    let first: Vec<_> = (1..=50u64).map(|i| publishing.publish(&i)).collect();
    for ack in first {
        tokio::time::timeout(T, ack).await.unwrap().unwrap();
    }
    // Cut both TLS connections; publish more while they are down.
    assert_eq!(proxy.cut_all(), 2);
    let second: Vec<_> = (51..=100u64).map(|i| publishing.publish(&i)).collect();
    sub_log
        .until(T, |ev| {
            matches!(ev.reason, TransitionReason::ConnectionLost(_))
        })
        .await
        .unwrap();
    for states in [&mut sub_states, &mut pub_states] {
        states
            .until_channel_state(ChannelState::Suspended, T)
            .await
            .unwrap();
        states
            .until_channel_state(ChannelState::Attached, T)
            .await
            .unwrap();
    }
    for ack in second {
        tokio::time::timeout(T, ack).await.unwrap().unwrap();
    }

    let received = collect_messages(&mut events, 100, T).await.unwrap();
    assert_eq!(payloads(&received), (1..=100).collect::<Vec<_>>());
    // Nothing trails behind: no duplicate after the replay.
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
        panic!("unexpected extra event {extra:?}");
    }
    // Both came back over new TLS connections through the proxy.
    assert!(proxy.stats().accepted >= 4, "{:?}", proxy.stats());
    assert_eq!(hub.connection_count(), 2);
    subscriber.close().await;
    publisher.close().await;
    hub.stop().await;
}

/// Starts a client with `config`, waits for `Failed`, and returns the error it failed with
/// after checking that it failed at its first attempt and retries no more.
async fn fails_at_once(config: TransportConfig) -> TransportError {
    let (transport, mut log) = start(config);
    let failed = log
        .until_state(ConnectionState::Failed, T)
        .await
        .expect("the client fails");
    assert_eq!(
        log.path(),
        [
            (ConnectionState::Initialized, ConnectionState::Connecting),
            (ConnectionState::Connecting, ConnectionState::Failed)
        ],
        "no retry before Failed"
    );
    log.expect_quiet(Duration::from_millis(300))
        .await
        .expect("no retry after Failed");
    let status = transport.status().await.unwrap();
    assert_eq!(status.state, ConnectionState::Failed);
    let summary = status.last_error.expect("the error is in the status");
    assert!(summary.permanent);
    assert_eq!(summary.category, ErrorCategory::Auth);
    transport.close().await;
    match failed.reason {
        TransitionReason::PermanentError(error) => error,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

#[actix_rt::test]
async fn a_client_that_does_not_trust_the_hub_certificate_fails_with_a_typed_permanent_error() {
    init_tracing();
    let cert = TestCert::localhost();
    let hub = start_tls_hub(&cert);

    // Only the built-in roots: a self-signed certificate is not among them.
    let error = fails_at_once(fast_client(hub.ws_url()).build().unwrap()).await;
    match &error {
        TransportError::TlsCertificate { endpoint, reason } => {
            assert_eq!(endpoint, &hub.ws_url());
            assert!(reason.contains("UnknownIssuer"), "{reason}");
        }
        other => panic!("expected TlsCertificate, got {other:?}"),
    }
    assert!(error.is_permanent());

    // Trusting another certificate is no better.
    let other = TestCert::localhost();
    let error = fails_at_once(other.trust(fast_client(hub.ws_url())).build().unwrap()).await;
    assert!(
        matches!(error, TransportError::TlsCertificate { .. }),
        "{error:?}"
    );

    // The right certificate for the wrong name.
    let elsewhere = TestCert::for_names(&["hub.example.invalid"]);
    let hub_elsewhere = start_tls_hub(&elsewhere);
    let error = fails_at_once(
        elsewhere
            .trust(fast_client(hub_elsewhere.ws_url()))
            .build()
            .unwrap(),
    )
    .await;
    match &error {
        TransportError::TlsCertificate { reason, .. } => {
            assert!(reason.contains("not valid for name"), "{reason}")
        }
        other => panic!("expected TlsCertificate, got {other:?}"),
    }
    // None of them ever got a WebSocket.
    assert_eq!(hub.connection_count(), 0);
    assert_eq!(hub_elsewhere.connection_count(), 0);
    hub.stop().await;
    hub_elsewhere.stop().await;
}

#[actix_rt::test]
async fn wss_to_a_plain_hub_is_a_retryable_handshake_error() {
    init_tracing();
    let hub = start_hub(free_addr());
    let url = format!("wss://{}/ws", hub.local_addr());
    let (transport, mut log) = start(fast_client(url).build().unwrap());
    for _ in 0..2 {
        let ev = log
            .until(T, |ev| {
                matches!(ev.reason, TransitionReason::AttemptFailed(_))
            })
            .await
            .unwrap();
        assert_eq!(ev.to, ConnectionState::Disconnected);
        match ev.reason {
            TransitionReason::AttemptFailed(TransportError::TlsHandshake { .. }) => {}
            other => panic!("expected TlsHandshake, got {other:?}"),
        }
    }
    transport.close().await;
    hub.stop().await;
}

#[actix_rt::test]
async fn a_tls_hub_does_not_serve_plain_ws() {
    init_tracing();
    let cert = TestCert::localhost();
    let hub = start_tls_hub(&cert);
    let url = format!("ws://{}/ws", hub.local_addr());
    let (transport, mut log) = start(fast_client(url).build().unwrap());
    let ev = log
        .until(T, |ev| {
            matches!(ev.reason, TransitionReason::AttemptFailed(_))
        })
        .await
        .unwrap();
    // The hub answers the plain upgrade request with a TLS alert, which is no HTTP response.
    assert_eq!(ev.to, ConnectionState::Disconnected, "retryable: {ev:?}");
    assert!(
        matches!(
            ev.reason,
            TransitionReason::AttemptFailed(TransportError::Connect { .. })
        ),
        "{ev:?}"
    );
    assert_eq!(hub.connection_count(), 0);
    transport.close().await;
    hub.stop().await;
}
