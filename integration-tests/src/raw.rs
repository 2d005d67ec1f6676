//! A raw WebSocket peer for tests that speak the protocol frame by frame (bad input, exact
//! error codes and close codes), over a real socket.

use std::time::Duration;

use actix_codec::Framed;
use awc::ws::{self, CloseCode};
use awc::BoxedSocket;
use futures::{SinkExt as _, StreamExt as _};
use tether_transport::protocol::{ErrorCode, Frame};

/// How long a raw peer waits for the next frame or the close.
pub const RAW_TIMEOUT: Duration = Duration::from_secs(5);

/// An upgraded WebSocket connection.
pub type Conn = Framed<BoxedSocket, ws::Codec>;

/// Opens a WebSocket to `url` (frames up to 4 MiB).
pub async fn raw(url: &str) -> Conn {
    let (_, conn) = awc::Client::new()
        .ws(url)
        .max_frame_size(4 * 1024 * 1024)
        .connect()
        .await
        .expect("upgrade");
    conn
}

/// Sends one text frame.
pub async fn send(conn: &mut Conn, text: impl Into<String>) {
    conn.send(ws::Message::Text(text.into().into()))
        .await
        .unwrap();
}

/// Sends a `hello` as client `raw` and expects the `welcome`.
pub async fn hello(conn: &mut Conn) {
    send(conn, r#"{"type":"hello","v":1,"client_id":"raw"}"#).await;
    match next_frame(conn).await {
        Some(Frame::Welcome(_)) => {}
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// The next protocol frame (pings and pongs skipped); `None` once the connection closed.
pub async fn next_frame(conn: &mut Conn) -> Option<Frame> {
    loop {
        match tokio::time::timeout(RAW_TIMEOUT, conn.next())
            .await
            .expect("frame in time")?
        {
            Ok(ws::Frame::Text(bytes)) => {
                return Some(
                    Frame::decode(std::str::from_utf8(&bytes).unwrap(), usize::MAX).unwrap(),
                )
            }
            Ok(ws::Frame::Ping(_)) | Ok(ws::Frame::Pong(_)) => continue,
            Ok(ws::Frame::Close(_)) | Err(_) => return None,
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads until the hub closes: the last error frame it sent, and the close code.
pub async fn error_and_close(conn: &mut Conn) -> (Option<ErrorCode>, Option<CloseCode>) {
    let mut code = None;
    loop {
        match tokio::time::timeout(RAW_TIMEOUT, conn.next())
            .await
            .expect("close in time")
        {
            Some(Ok(ws::Frame::Text(bytes))) => {
                if let Ok(Frame::Error(e)) =
                    Frame::decode(std::str::from_utf8(&bytes).unwrap(), usize::MAX)
                {
                    code = Some(e.code);
                }
            }
            Some(Ok(ws::Frame::Close(reason))) => return (code, reason.map(|r| r.code)),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("read error {e:?} (error frame {code:?})"),
            None => return (code, None),
        }
    }
}

/// Opens a connection as `client_id` / `instance` and attaches `channel` (publish-only when
/// `subscribe` is false, with handle `producer`); expects the `welcome` and the `attached`.
pub async fn attached(
    url: &str,
    client_id: &str,
    instance: &str,
    channel: &str,
    subscribe: bool,
    producer: &str,
) -> Conn {
    let mut conn = raw(url).await;
    send(
        &mut conn,
        format!(r#"{{"type":"hello","v":1,"client_id":"{client_id}","instance":"{instance}"}}"#),
    )
    .await;
    match next_frame(&mut conn).await {
        Some(Frame::Welcome(_)) => {}
        other => panic!("expected welcome, got {other:?}"),
    }
    send(
        &mut conn,
        format!(
            r#"{{"type":"attach","channel":"{channel}","subscribe":{subscribe},"producer":"{producer}"}}"#
        ),
    )
    .await;
    match next_frame(&mut conn).await {
        Some(Frame::Attached(_)) => {}
        other => panic!("expected attached, got {other:?}"),
    }
    conn
}
