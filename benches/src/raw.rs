//! The raw WebSocket baselines: relays built directly on tokio-tungstenite, with none of
//! Tether's protocol (no handshake, acks, offsets, history or reconnects), and raw clients.
//!
//! Each relay runs on its own thread with its own current-thread tokio runtime, serves one run
//! and then ends. Roles are decided by accept order: first the subscriber connection(s), then
//! the publisher. A connection whose IO fails is logged and dropped; the relay never panics on
//! network errors. Every queue is bounded.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::BoxError;

/// A raw client socket.
pub type RawClient = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A relay's server-side socket.
type ServerSocket = WebSocketStream<TcpStream>;

/// Consecutive `accept` failures after which a relay gives up.
const MAX_ACCEPT_ERRORS: u32 = 100;

/// A running relay: its address and its thread.
#[derive(Debug)]
pub struct RelayHandle {
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl RelayHandle {
    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL raw clients connect to.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Waits up to `timeout` for the relay's thread to end (it ends once its publisher
    /// disconnected and the subscribers were told). Returns whether it did; a relay still
    /// running is left to end on its own.
    pub async fn join(mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(thread) = &self.thread {
            if thread.is_finished() {
                if let Some(thread) = self.thread.take() {
                    if thread.join().is_err() {
                        tracing::warn!("raw relay thread panicked");
                    }
                }
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// Starts a one-to-one relay on `127.0.0.1:0`: it accepts a subscriber connection, then a
/// publisher connection, and forwards every text frame from the publisher to the subscriber,
/// in order, nothing else. Writes are flushed whenever the publisher has nothing more ready.
pub fn spawn_pair_relay(nodelay: bool) -> std::io::Result<RelayHandle> {
    spawn_relay("raw-pair-relay", move |listener| async move {
        let Some(subscriber) = accept_ws(&listener, "subscriber", nodelay).await else {
            return;
        };
        let Some(publisher) = accept_ws(&listener, "publisher", nodelay).await else {
            return;
        };
        drop(listener);
        forward(publisher, subscriber).await;
    })
}

/// Most frames the broadcast relay forwards as one batch.
pub const MAX_BATCH: usize = 256;

/// Frames read from the publisher in one go, shared by every subscriber's queue.
type Batch = Arc<[Utf8Bytes]>;

/// Starts a broadcast relay on `127.0.0.1:0`: it accepts `subscribers` subscriber connections,
/// then a publisher connection, and forwards every text frame from the publisher to every
/// subscriber, in order.
///
/// Frames the publisher has ready together (up to [`MAX_BATCH`]) travel as one batch: each
/// subscriber's writer task gets it through a queue of `queue` batches, writes it and flushes
/// once its queue is empty — one write per subscriber per batch, as a tuned broadcast server
/// would. A full queue holds the publisher back (no frame is dropped); a subscriber whose
/// socket fails is logged and dropped.
pub fn spawn_broadcast_relay(
    subscribers: usize,
    queue: usize,
    nodelay: bool,
) -> std::io::Result<RelayHandle> {
    let queue = queue.max(1);
    spawn_relay("raw-broadcast-relay", move |listener| async move {
        let mut outboxes: Vec<(usize, mpsc::Sender<Batch>)> = Vec::with_capacity(subscribers);
        let mut writers = Vec::with_capacity(subscribers);
        while outboxes.len() < subscribers {
            let Some(socket) = accept_ws(&listener, "subscriber", nodelay).await else {
                return;
            };
            let id = outboxes.len();
            let (tx, rx) = mpsc::channel(queue);
            writers.push(tokio::spawn(write_loop(id, socket, rx)));
            outboxes.push((id, tx));
        }
        let Some(mut publisher) = accept_ws(&listener, "publisher", nodelay).await else {
            return;
        };
        drop(listener);
        let mut open = true;
        while open {
            let mut batch = Vec::new();
            // Wait for one frame, then take whatever else is ready without waiting.
            let mut next = Some(publisher.next().await);
            while let Some(item) = next {
                match item {
                    Some(Ok(Message::Text(text))) => batch.push(text),
                    Some(Ok(Message::Close(_))) | None => open = false,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "raw relay: publisher read failed, dropped");
                        open = false;
                    }
                }
                next = match open && batch.len() < MAX_BATCH {
                    true => publisher.next().now_or_never(),
                    false => None,
                };
            }
            if batch.is_empty() {
                continue;
            }
            let batch: Batch = batch.into();
            let mut failed = Vec::new();
            for (i, (_, tx)) in outboxes.iter().enumerate() {
                if tx.send(batch.clone()).await.is_err() {
                    failed.push(i);
                }
            }
            for i in failed.into_iter().rev() {
                let (id, _) = outboxes.swap_remove(i);
                tracing::warn!(subscriber = id, "raw relay: subscriber gone, dropped");
            }
        }
        drop(outboxes);
        for writer in writers {
            if let Err(e) = writer.await {
                tracing::warn!(error = %e, "raw relay: writer task failed");
            }
        }
    })
}

/// Connects a raw client to `url`; `nodelay` disables Nagle's algorithm on its socket.
pub async fn connect(url: &str, nodelay: bool) -> Result<RawClient, BoxError> {
    let (socket, _response) =
        tokio_tungstenite::connect_async_with_config(url, None, nodelay).await?;
    Ok(socket)
}

/// Binds `127.0.0.1:0` here (so the address is known and bind errors surface at once), then
/// serves `relay` on a new thread with its own current-thread runtime.
fn spawn_relay<F, Fut>(name: &str, relay: F) -> std::io::Result<RelayHandle>
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let listener = StdTcpListener::bind(("127.0.0.1", 0))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => relay(listener).await,
                    Err(e) => tracing::warn!(error = %e, "raw relay: listener unusable"),
                }
            });
        })?;
    Ok(RelayHandle {
        addr,
        thread: Some(thread),
    })
}

/// Accepts the next connection that completes a WebSocket handshake. Failed handshakes are
/// logged and skipped; `None` after [`MAX_ACCEPT_ERRORS`] consecutive accept failures.
/// `nodelay` disables Nagle's algorithm on the accepted socket.
async fn accept_ws(listener: &TcpListener, role: &str, nodelay: bool) -> Option<ServerSocket> {
    let mut errors = 0;
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                errors = 0;
                if let Err(e) = tcp.set_nodelay(nodelay) {
                    tracing::warn!(%peer, error = %e, "raw relay: set_nodelay failed");
                }
                match tokio_tungstenite::accept_async(tcp).await {
                    Ok(socket) => return Some(socket),
                    Err(e) => {
                        tracing::warn!(%peer, role, error = %e, "raw relay: handshake failed, dropped")
                    }
                }
            }
            Err(e) => {
                errors += 1;
                tracing::warn!(role, error = %e, "raw relay: accept failed");
                if errors >= MAX_ACCEPT_ERRORS {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Forwards text frames from `publisher` to `subscriber` until either side ends or fails.
/// Frames are buffered while more are ready and flushed when the publisher has none.
async fn forward(mut publisher: ServerSocket, mut subscriber: ServerSocket) {
    let mut unflushed = false;
    loop {
        let next = if unflushed {
            match publisher.next().now_or_never() {
                Some(next) => next,
                None => {
                    if let Err(e) = subscriber.flush().await {
                        tracing::warn!(error = %e, "raw relay: subscriber write failed, dropped");
                        return;
                    }
                    unflushed = false;
                    continue;
                }
            }
        } else {
            publisher.next().await
        };
        match next {
            Some(Ok(Message::Text(text))) => {
                if let Err(e) = subscriber.feed(Message::Text(text)).await {
                    tracing::warn!(error = %e, "raw relay: subscriber write failed, dropped");
                    return;
                }
                unflushed = true;
            }
            Some(Ok(Message::Close(_))) | None => break,
            // Pings are answered by tungstenite itself; nothing else is relayed.
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "raw relay: publisher read failed, dropped");
                break;
            }
        }
    }
    if let Err(e) = subscriber.close(None).await {
        tracing::debug!(error = %e, "raw relay: closing the subscriber failed");
    }
}

/// Writes every batch queued for one broadcast subscriber, flushing whenever its queue is
/// empty; closes the socket once the queue is closed.
async fn write_loop(id: usize, mut socket: ServerSocket, mut queue: mpsc::Receiver<Batch>) {
    while let Some(batch) = queue.recv().await {
        let mut next = Some(batch);
        while let Some(batch) = next {
            for text in batch.iter() {
                if let Err(e) = socket.feed(Message::Text(text.clone())).await {
                    tracing::warn!(subscriber = id, error = %e, "raw relay: write failed, dropped");
                    return;
                }
            }
            next = queue.try_recv().ok();
        }
        if let Err(e) = socket.flush().await {
            tracing::warn!(subscriber = id, error = %e, "raw relay: flush failed, dropped");
            return;
        }
    }
    if let Err(e) = socket.close(None).await {
        tracing::debug!(subscriber = id, error = %e, "raw relay: close failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pair_relay_forwards_text_in_order() {
        let relay = spawn_pair_relay(true).unwrap();
        let mut sub = connect(&relay.url(), true).await.unwrap();
        let mut publisher = connect(&relay.url(), true).await.unwrap();
        for i in 0..100 {
            publisher.feed(Message::text(i.to_string())).await.unwrap();
        }
        publisher.flush().await.unwrap();
        for i in 0..100 {
            match sub.next().await {
                Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), i.to_string()),
                other => panic!("{other:?}"),
            }
        }
        publisher.close(None).await.unwrap();
        assert!(relay.join(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn the_broadcast_relay_forwards_to_every_subscriber() {
        let relay = spawn_broadcast_relay(3, 2, true).unwrap();
        let mut subs = Vec::new();
        for _ in 0..3 {
            subs.push(connect(&relay.url(), true).await.unwrap());
        }
        let mut publisher = connect(&relay.url(), true).await.unwrap();
        for i in 0..10 {
            publisher.send(Message::text(i.to_string())).await.unwrap();
        }
        for sub in &mut subs {
            for i in 0..10 {
                match sub.next().await {
                    Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), i.to_string()),
                    other => panic!("{other:?}"),
                }
            }
        }
        publisher.close(None).await.unwrap();
        assert!(relay.join(Duration::from_secs(5)).await);
    }
}
