//! Tools for attack tests: a hostile WebSocket peer on a bare TCP socket (it can send any bytes,
//! lie in frame headers and stop reading), a healthy publisher/subscriber pair that must keep
//! going beside an attack, and the process's peak memory.

use std::net::SocketAddr;
use std::time::Duration;

use actix_codec::{Decoder as _, Encoder as _};
use actix_http::ws::{Codec, Frame, Message};
use bytes::BytesMut;
use tether_channels::{Channel, ChannelEvent, ChannelEvents, ChannelOptions};
use tether_transport::Transport;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::harness::{collect_messages, fast_client, open_attached, EventLog};

/// How long the helpers here wait for anything.
pub const ATTACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A WebSocket client on a bare TCP socket: it frames what it is told to, sends raw bytes when
/// asked, and reads only when asked (a peer that never reads is one that never calls
/// [`HostilePeer::next_frame`]).
pub struct HostilePeer {
    stream: TcpStream,
    codec: Codec,
    buf: BytesMut,
}

/// What a read found.
#[derive(Debug)]
pub enum Read {
    /// A frame from the hub.
    Frame(Frame),
    /// The hub closed the TCP connection (end of stream).
    Eof,
    /// The connection was reset (or failed otherwise).
    Reset(std::io::ErrorKind),
}

impl HostilePeer {
    /// Opens a TCP connection to `addr` and upgrades it on `path`. `recv_buffer` shrinks the
    /// socket's receive buffer (a peer that does not read then backs the hub up sooner).
    pub async fn connect(addr: SocketAddr, path: &str, recv_buffer: Option<u32>) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let mut stream = socket.connect(addr).await.expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("request");
        let mut buf = BytesMut::new();
        loop {
            let n = tokio::time::timeout(ATTACK_TIMEOUT, stream.read_buf(&mut buf))
                .await
                .expect("upgrade answer in time")
                .expect("read");
            assert!(n > 0, "hub closed during the upgrade");
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
                let _ = buf.split_to(end + 4);
                break;
            }
        }
        HostilePeer {
            stream,
            codec: Codec::new().client_mode(),
            buf,
        }
    }

    /// Sends one text frame (masked, as a client must).
    pub async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        self.codec
            .encode(Message::Text(text.to_owned().into()), &mut out)
            .expect("encode");
        self.stream.write_all(&out).await
    }

    /// `texts` as client text frames, ready for [`HostilePeer::send_raw`].
    pub fn frame_texts(&mut self, texts: &[String]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for text in texts {
            self.codec
                .encode(Message::Text(text.clone().into()), &mut out)
                .expect("encode");
        }
        out.to_vec()
    }

    /// Sends one binary frame (masked): v2 records, or anything else.
    pub async fn send_binary(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        self.codec
            .encode(
                Message::Binary(bytes::Bytes::copy_from_slice(bytes)),
                &mut out,
            )
            .expect("encode");
        self.stream.write_all(&out).await
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends the hello of client `client_id` (with an instance, so that it may publish) and
    /// reads the welcome.
    pub async fn hello(&mut self, client_id: &str) {
        self.hello_v(client_id, 1).await;
    }

    /// [`HostilePeer::hello`] asking for protocol version `v`.
    pub async fn hello_v(&mut self, client_id: &str, v: u16) {
        self.send_text(&format!(
            r#"{{"type":"hello","v":{v},"client_id":"{client_id}","instance":"{client_id}-i"}}"#
        ))
        .await
        .expect("hello");
        match self.next_frame(ATTACK_TIMEOUT).await {
            Read::Frame(Frame::Text(t)) if t.starts_with(br#"{"type":"welcome""#) => {}
            other => panic!("expected the welcome, got {other:?}"),
        }
    }

    /// The next frame from the hub, or how the connection ended; panics after `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => return Read::Frame(frame),
                Ok(None) => {}
                Err(e) => panic!("undecodable frame from the hub: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => panic!("nothing from the hub within {timeout:?}"),
                Ok(Ok(0)) => return Read::Eof,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Read::Reset(e.kind()),
            }
        }
    }

    /// Reads (skipping text, pings and pongs) until the close frame; returns its code, or how
    /// the connection ended without one.
    pub async fn until_close(&mut self, timeout: Duration) -> Result<u16, Read> {
        loop {
            match self.next_frame(timeout).await {
                Read::Frame(Frame::Close(reason)) => {
                    return Ok(reason.map(|r| u16::from(r.code)).unwrap_or(1005))
                }
                Read::Frame(_) => continue,
                other => return Err(other),
            }
        }
    }

    /// Reads and throws away everything until the connection ends (EOF or reset), returning
    /// how it ended; panics if it is still open after `timeout`.
    pub async fn until_closed(&mut self, timeout: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sink = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Err(_) => panic!("connection still open after {timeout:?}"),
                Ok(Ok(0)) => return Read::Eof,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Read::Reset(e.kind()),
            }
        }
    }
}

/// The header of a client text frame declaring `len` payload bytes (masked, 64-bit length
/// when it needs one), with no payload.
pub fn frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x81];
    if len < 126 {
        h.push(0x80 | len as u8);
    } else if len <= u64::from(u16::MAX) {
        h.push(0x80 | 126);
        h.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        h.push(0x80 | 127);
        h.extend_from_slice(&len.to_be_bytes());
    }
    h.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]);
    h
}

/// A subscriber and a publisher on channel `steady` that keep going beside an attack.
pub struct HealthyPair {
    /// The subscribing client.
    pub subscriber: Transport,
    /// Its connection transitions (an attack must cause none).
    pub sub_events: EventLog,
    /// The publishing client.
    pub publisher: Transport,
    /// What the subscriber receives on `steady`.
    pub messages: ChannelEvents,
    /// The publisher's handle on `steady`.
    pub steady: Channel,
}

impl HealthyPair {
    /// Connects both clients to `url` and attaches them to `steady`.
    pub async fn start(url: &str) -> HealthyPair {
        let (subscriber, sub_events) = connected(url).await;
        let (publisher, _) = connected(url).await;
        let (_, messages, _) = open_attached(
            &subscriber,
            "steady",
            ChannelOptions::default(),
            ATTACK_TIMEOUT,
        )
        .await
        .expect("subscriber attached");
        let (steady, _, _) = open_attached(
            &publisher,
            "steady",
            ChannelOptions::publish_only(),
            ATTACK_TIMEOUT,
        )
        .await
        .expect("publisher attached");
        HealthyPair {
            subscriber,
            sub_events,
            publisher,
            messages,
            steady,
        }
    }

    /// Publishes `from..=to` and waits for each to be acknowledged, returning the longest
    /// publish-to-ack time (the stall an attack caused the pair, if any).
    pub async fn publish_acked(&self, from: u64, to: u64) -> Duration {
        let mut worst = Duration::ZERO;
        for i in from..=to {
            let started = tokio::time::Instant::now();
            self.steady.publish(&i).await.expect("acknowledged");
            worst = worst.max(started.elapsed());
        }
        worst
    }

    /// Asserts the subscriber received exactly `1..=n`, in order, and nothing else.
    pub async fn assert_received_in_order(&mut self, n: u64) {
        assert_received_in_order(&mut self.messages, n).await;
    }
}

/// Asserts `messages` brings exactly `1..=n`, in order, and nothing else.
pub async fn assert_received_in_order(messages: &mut ChannelEvents, n: u64) {
    let got = collect_messages(messages, n as usize, ATTACK_TIMEOUT)
        .await
        .expect("every message");
    let values: Vec<u64> = got
        .iter()
        .map(|ev| match ev {
            ChannelEvent::Message(m) => m.payload.decode().expect("a number"),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(values, (1..=n).collect::<Vec<_>>());
}

/// A client of `url`, connected.
pub async fn connected(url: &str) -> (Transport, EventLog) {
    let config = fast_client(url.to_owned()).build().expect("config");
    crate::harness::connected_with(config, ATTACK_TIMEOUT).await
}

/// The process's peak resident memory, in bytes, since the last [`reset_peak_rss`] (Linux).
pub fn peak_rss() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// The process's resident memory now, in bytes (Linux).
pub fn current_rss() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// Restarts the peak-memory count from the current resident memory (Linux: `clear_refs` 5).
pub fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("a memory figure")
}

/// The in-memory store, except that appends on channel `slow` wait until the gate opens (a
/// store that has stopped keeping up).
pub struct GatedStore {
    inner: tether_channels::hub::MemoryHistory,
    open: tokio::sync::watch::Receiver<bool>,
}

impl GatedStore {
    /// Appends on `slow` wait until `open` says `true`.
    pub fn new(open: tokio::sync::watch::Receiver<bool>) -> Self {
        GatedStore {
            inner: tether_channels::hub::MemoryHistory::default(),
            open,
        }
    }
}

impl tether_channels::hub::HistoryStore for GatedStore {
    fn append(
        &self,
        channel: &str,
        seen: Option<tether_transport::protocol::Position>,
        fence: tether_channels::hub::Fence,
        batch: Vec<tether_channels::hub::AppendRequest>,
    ) -> futures::future::BoxFuture<
        'static,
        Result<tether_channels::hub::Appended, tether_channels::ChannelError>,
    > {
        let done = self.inner.append(channel, seen, fence, batch);
        let mut open = self.open.clone();
        let gated = channel == "slow";
        Box::pin(async move {
            if gated {
                let _ = open.wait_for(|o| *o).await;
            }
            done.await
        })
    }

    fn read(
        &self,
        channel: &str,
        seen: Option<tether_transport::protocol::Position>,
        after: tether_transport::protocol::Offset,
        limit: tether_channels::hub::PageLimit,
    ) -> futures::future::BoxFuture<
        'static,
        Result<tether_channels::hub::Page, tether_channels::ChannelError>,
    > {
        self.inner.read(channel, seen, after, limit)
    }

    fn watch(&self, channel: &str, sink: tether_channels::hub::NoticeSink) {
        self.inner.watch(channel, sink)
    }

    fn unwatch(&self, channel: &str) {
        self.inner.unwatch(channel)
    }

    fn health(&self) -> tether_channels::hub::StoreHealth {
        self.inner.health()
    }
}
