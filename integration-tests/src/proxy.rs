//! A fault-injecting TCP proxy for tests.
//!
//! [`FaultProxy`] listens on a local port and forwards every inbound TCP
//! connection to an upstream address. While it runs, tests can inject the
//! network faults Tether has to survive:
//!
//! * [`FaultProxy::cut_all`] resets every proxied connection,
//! * [`FaultProxy::stall_all`] freezes every current connection while keeping
//!   its sockets open (a half-open connection),
//! * [`FaultProxy::refuse_for`] resets new connections for a while,
//! * [`FaultProxy::set_latency`] delays every chunk in both directions,
//! * [`FaultProxy::set_blackhole`] accepts new connections but never answers,
//! * [`FaultProxy::set_upstream`] redirects new connections elsewhere.
//!
//! The proxy runs on its own OS thread with its own single-threaded tokio
//! runtime, so it can be driven from an actix `System`, a `#[tokio::test]` or
//! a plain thread alike. All controls take `&self` and may be called from any
//! thread.
//!
//! ```no_run
//! # fn demo(hub: std::net::SocketAddr) -> std::io::Result<()> {
//! use tether_integration_tests::FaultProxy;
//!
//! let proxy = FaultProxy::start(hub)?;
//! let client_target = proxy.local_addr(); // point the client here
//! # let _ = client_target;
//! // ... later, simulate a network drop:
//! proxy.cut_all();
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::debug;

/// Size of the read buffer used for each direction of a connection.
const CHUNK_SIZE: usize = 16 * 1024;

/// How many chunks may be in flight (read but not yet written) per direction.
const PIPE_DEPTH: usize = 64;

/// Upper bound for [`FaultProxy::set_latency`], so deadlines never overflow.
const MAX_LATENCY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Back-off after a failed `accept()` (e.g. file-descriptor exhaustion), so
/// the accept loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// A snapshot of a [`FaultProxy`]'s counters, as returned by
/// [`FaultProxy::stats`].
///
/// All counters are cumulative since the proxy was started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Inbound connections taken into service (forwarded or blackholed).
    /// Connections rejected while refusing are counted in `refused` instead.
    pub accepted: u64,
    /// Inbound connections reset immediately because the proxy was refusing
    /// (see [`FaultProxy::refuse_for`]).
    pub refused: u64,
    /// Connections closed by [`FaultProxy::cut_all`].
    pub cut: u64,
    /// Connections frozen by [`FaultProxy::stall_all`].
    pub stalled: u64,
    /// Bytes forwarded from clients to the upstream.
    pub bytes_up: u64,
    /// Bytes forwarded from the upstream back to clients.
    pub bytes_down: u64,
}

/// Control state of a single proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ctrl {
    /// Forwarding normally.
    Run,
    /// Frozen: nothing is forwarded, sockets stay open.
    Stall,
    /// Close both sides with a reset.
    Cut,
}

/// Direction of a byte stream through the proxy.
#[derive(Clone, Copy, Debug)]
enum Dir {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

/// What to do with a freshly accepted connection.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Forward to this upstream.
    Forward(SocketAddr),
    /// Hold open, read and discard, never answer.
    Blackhole,
}

/// How a connection's forwarding ended.
#[derive(Debug)]
enum Outcome {
    /// Both directions reached EOF cleanly.
    Finished,
    /// A socket error ended the connection.
    Failed(io::Error),
    /// The connection was cut by the controller (possibly after a stall).
    Cut,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    cut: AtomicU64,
    stalled: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// State shared between the [`FaultProxy`] handle and its proxy thread.
struct Shared {
    upstream: Mutex<SocketAddr>,
    refuse_until: Mutex<Option<Instant>>,
    blackhole: AtomicBool,
    latency_nanos: AtomicU64,
    conns: Mutex<HashMap<u64, watch::Sender<Ctrl>>>,
    next_id: AtomicU64,
    counters: Counters,
}

impl Shared {
    fn new(upstream: SocketAddr) -> Self {
        Self {
            upstream: Mutex::new(upstream),
            refuse_until: Mutex::new(None),
            blackhole: AtomicBool::new(false),
            latency_nanos: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    fn is_refusing(&self) -> bool {
        let mut until = lock(&self.refuse_until);
        match *until {
            Some(deadline) if Instant::now() < deadline => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    fn byte_counter(&self, dir: Dir) -> &AtomicU64 {
        match dir {
            Dir::Up => &self.counters.bytes_up,
            Dir::Down => &self.counters.bytes_down,
        }
    }
}

/// Locks a mutex, ignoring poisoning (the guarded data stays consistent
/// because every critical section is a single infallible update).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fault-injecting TCP proxy running on its own thread.
///
/// Every inbound connection on [`local_addr`](Self::local_addr) is forwarded
/// to the current upstream. Faults are injected through the `&self` control
/// methods, which may be called from any thread. Dropping the proxy stops the
/// accept loop, closes every connection and joins the proxy thread.
pub struct FaultProxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1` with an OS-assigned port, forwarding to
    /// `upstream`.
    ///
    /// This is synchronous: when it returns `Ok`, the proxy is already
    /// accepting connections on [`local_addr`](Self::local_addr).
    pub fn start(upstream: SocketAddr) -> io::Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), upstream)
    }

    /// Starts a proxy listening on `listen`, forwarding to `upstream`.
    ///
    /// Like [`start`](Self::start), but with an explicit listen address
    /// (use port 0 to let the OS choose).
    pub fn start_on(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;

        let shared = Arc::new(Shared::new(upstream));
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("tether-fault-proxy-{}", local_addr.port()))
            .spawn(move || run_proxy_thread(listener, thread_shared, shutdown_rx, ready_tx))?;

        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("fault proxy thread exited during startup")));
        if let Err(e) = ready {
            if thread.join().is_err() {
                debug!("fault proxy thread panicked during startup");
            }
            return Err(e);
        }

        debug!(%local_addr, %upstream, "fault proxy started");
        Ok(Self {
            local_addr,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// The address the proxy listens on; point clients here.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The upstream address new connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        *lock(&self.shared.upstream)
    }

    /// Immediately closes every open connection on both sides, with a TCP
    /// reset where possible, and returns how many were cut.
    ///
    /// This includes stalled and blackholed connections. New connections
    /// keep working afterwards.
    pub fn cut_all(&self) -> usize {
        let conns: Vec<_> = lock(&self.shared.conns).drain().collect();
        for (_, ctrl) in &conns {
            ctrl.send_replace(Ctrl::Cut);
        }
        let n = conns.len();
        self.shared
            .counters
            .cut
            .fetch_add(n as u64, Ordering::Relaxed);
        debug!(proxy = %self.local_addr, connections = n, "cut all connections");
        n
    }

    /// Freezes every current connection: no more bytes are forwarded in
    /// either direction, but both sockets stay open (a half-open connection:
    /// TCP is up, nothing flows). Returns how many connections were newly
    /// stalled.
    ///
    /// Stalled connections stay stalled until [`cut_all`](Self::cut_all) or
    /// until the proxy is dropped. Connections opened afterwards are not
    /// affected.
    pub fn stall_all(&self) -> usize {
        let conns = lock(&self.shared.conns);
        let n = conns
            .values()
            .filter(|ctrl| {
                ctrl.send_if_modified(|state| {
                    if *state == Ctrl::Run {
                        *state = Ctrl::Stall;
                        true
                    } else {
                        false
                    }
                })
            })
            .count();
        drop(conns);
        self.shared
            .counters
            .stalled
            .fetch_add(n as u64, Ordering::Relaxed);
        debug!(proxy = %self.local_addr, connections = n, "stalled all connections");
        n
    }

    /// Closes only the stalled connections (as [`cut_all`](Self::cut_all) does) and returns how
    /// many. Long chaos runs use it to release half-open connections once both ends have
    /// given up on them.
    pub fn cut_stalled(&self) -> usize {
        let mut conns = lock(&self.shared.conns);
        let stalled: Vec<_> = conns
            .iter()
            .filter(|(_, ctrl)| *ctrl.borrow() == Ctrl::Stall)
            .map(|(id, _)| *id)
            .collect();
        for id in &stalled {
            if let Some(ctrl) = conns.remove(id) {
                ctrl.send_replace(Ctrl::Cut);
            }
        }
        drop(conns);
        let n = stalled.len();
        self.shared
            .counters
            .cut
            .fetch_add(n as u64, Ordering::Relaxed);
        debug!(proxy = %self.local_addr, connections = n, "cut stalled connections");
        n
    }

    /// For the next `d`, every new inbound connection is accepted and
    /// immediately reset, without connecting to the upstream. Existing
    /// connections are unaffected.
    ///
    /// Calling this again replaces the previous refusal window.
    pub fn refuse_for(&self, d: Duration) {
        let until = Instant::now().checked_add(d.min(MAX_LATENCY));
        *lock(&self.shared.refuse_until) = until;
        debug!(proxy = %self.local_addr, duration = ?d, "refusing new connections");
    }

    /// Ends a refusal window started by [`refuse_for`](Self::refuse_for).
    pub fn stop_refusing(&self) {
        *lock(&self.shared.refuse_until) = None;
        debug!(proxy = %self.local_addr, "no longer refusing connections");
    }

    /// Adds `d` of one-way delay to every chunk in both directions, for
    /// current and new connections, preserving byte order. `Duration::ZERO`
    /// removes the delay. Values above one year are clamped.
    pub fn set_latency(&self, d: Duration) {
        let d = d.min(MAX_LATENCY);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.shared.latency_nanos.store(nanos, Ordering::Relaxed);
        debug!(proxy = %self.local_addr, latency = ?d, "latency set");
    }

    /// While `on`, new inbound connections are accepted and held open, but
    /// never forwarded and never answered (what the client sends is read and
    /// discarded). Models a server that accepts TCP but never answers the
    /// WebSocket upgrade.
    ///
    /// Blackholed connections count in [`connection_count`](Self::connection_count)
    /// and are closed by [`cut_all`](Self::cut_all); turning the blackhole
    /// off does not release them.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::Relaxed);
        debug!(proxy = %self.local_addr, on, "blackhole set");
    }

    /// Forwards new connections to `addr`. Existing connections keep their
    /// current upstream.
    pub fn set_upstream(&self, addr: SocketAddr) {
        *lock(&self.shared.upstream) = addr;
        debug!(proxy = %self.local_addr, upstream = %addr, "upstream set");
    }

    /// Number of currently open connections held by the proxy (forwarding,
    /// stalled or blackholed).
    pub fn connection_count(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// A snapshot of the proxy's cumulative counters.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            cut: c.cut.load(Ordering::Relaxed),
            stalled: c.stalled.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("local_addr", &self.local_addr)
            .field("upstream", &self.upstream())
            .field("connections", &self.connection_count())
            .finish_non_exhaustive()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // An error only means the thread already stopped.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                debug!(proxy = %self.local_addr, "fault proxy thread panicked");
            }
        }
        debug!(proxy = %self.local_addr, "fault proxy stopped");
    }
}

/// Body of the proxy thread: builds the runtime, reports readiness, runs the
/// accept loop until shutdown, then drops the runtime (which cancels every
/// connection task and closes their sockets).
fn run_proxy_thread(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: oneshot::Receiver<()>,
    ready: std::sync::mpsc::SyncSender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        drop(ready);
        accept_loop(listener, shared, shutdown).await;
    });
    drop(runtime);
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => handle_inbound(&shared, stream, peer),
            Err(e) => {
                debug!(error = %e, "fault proxy accept failed");
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                }
            }
        }
    }
    debug!("fault proxy accept loop stopped");
}

fn handle_inbound(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    if shared.is_refusing() {
        shared.counters.refused.fetch_add(1, Ordering::Relaxed);
        debug!(%peer, "refusing connection");
        reset(&stream);
        return;
    }
    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
    let mode = if shared.blackhole.load(Ordering::Relaxed) {
        Mode::Blackhole
    } else {
        Mode::Forward(*lock(&shared.upstream))
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (ctrl_tx, ctrl_rx) = watch::channel(Ctrl::Run);
    lock(&shared.conns).insert(id, ctrl_tx);
    let guard = ConnGuard {
        shared: Arc::clone(shared),
        id,
    };
    tokio::spawn(run_connection(guard, stream, peer, mode, ctrl_rx));
}

/// Unregisters a connection when its task ends (or is cancelled).
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.shared.conns).remove(&self.id);
    }
}

async fn run_connection(
    guard: ConnGuard,
    inbound: TcpStream,
    peer: SocketAddr,
    mode: Mode,
    ctrl: watch::Receiver<Ctrl>,
) {
    let shared = Arc::clone(&guard.shared);
    let sockets = serve(&shared, guard.id, inbound, peer, mode, ctrl).await;
    // Unregister before closing, so once a client observes the close,
    // `connection_count` already reflects it.
    drop(guard);
    drop(sockets);
}

/// Serves one connection and hands back its sockets (with a reset armed if
/// they should be aborted) for the caller to close.
async fn serve(
    shared: &Shared,
    id: u64,
    mut inbound: TcpStream,
    peer: SocketAddr,
    mode: Mode,
    mut ctrl: watch::Receiver<Ctrl>,
) -> (TcpStream, Option<TcpStream>) {
    set_nodelay(&inbound);

    let upstream_addr = match mode {
        Mode::Blackhole => {
            debug!(id, %peer, "blackholing connection");
            let outcome = supervise(discard(&mut inbound), &mut ctrl).await;
            finish(id, peer, outcome, &inbound, None);
            return (inbound, None);
        }
        Mode::Forward(addr) => addr,
    };

    let connected = tokio::select! {
        biased;
        () = wait_cut(&mut ctrl) => None,
        connected = TcpStream::connect(upstream_addr) => Some(connected),
    };
    let mut upstream = match connected {
        Some(Ok(upstream)) => upstream,
        Some(Err(e)) => {
            debug!(id, %peer, upstream = %upstream_addr, error = %e,
                "upstream connect failed; closing inbound connection");
            reset(&inbound);
            return (inbound, None);
        }
        None => {
            debug!(id, %peer, "connection cut while connecting upstream");
            reset(&inbound);
            return (inbound, None);
        }
    };
    set_nodelay(&upstream);
    debug!(id, %peer, upstream = %upstream_addr, "forwarding connection");

    let outcome = {
        let (in_read, in_write) = inbound.split();
        let (up_read, up_write) = upstream.split();
        let pump = async {
            tokio::try_join!(
                pipe(in_read, up_write, shared, Dir::Up),
                pipe(up_read, in_write, shared, Dir::Down),
            )
            .map(|_| ())
        };
        supervise(pump, &mut ctrl).await
    };
    finish(id, peer, outcome, &inbound, Some(&upstream));
    (inbound, Some(upstream))
}

/// Drives `pump` while the connection is running. On stall, drops the pump
/// (so nothing more flows) and waits for a cut; the caller still owns the
/// sockets, so they stay open meanwhile.
async fn supervise<F>(pump: F, ctrl: &mut watch::Receiver<Ctrl>) -> Outcome
where
    F: Future<Output = io::Result<()>>,
{
    let interrupted = {
        let mut pump = pin!(pump);
        tokio::select! {
            biased;
            state = wait_not_running(ctrl) => state,
            result = &mut pump => {
                return match result {
                    Ok(()) => Outcome::Finished,
                    Err(e) => Outcome::Failed(e),
                };
            }
        }
    };
    if interrupted == Ctrl::Stall {
        debug!("connection stalled");
        wait_cut(ctrl).await;
    }
    Outcome::Cut
}

/// Waits until the connection leaves [`Ctrl::Run`]; a dropped controller
/// counts as a cut.
async fn wait_not_running(ctrl: &mut watch::Receiver<Ctrl>) -> Ctrl {
    match ctrl.wait_for(|state| *state != Ctrl::Run).await {
        Ok(state) => *state,
        Err(_) => Ctrl::Cut,
    }
}

/// Waits until the connection is cut; a dropped controller counts as a cut.
async fn wait_cut(ctrl: &mut watch::Receiver<Ctrl>) {
    let _ = ctrl.wait_for(|state| *state == Ctrl::Cut).await;
}

fn finish(
    id: u64,
    peer: SocketAddr,
    outcome: Outcome,
    inbound: &TcpStream,
    upstream: Option<&TcpStream>,
) {
    match outcome {
        Outcome::Finished => debug!(id, %peer, "connection closed"),
        Outcome::Failed(e) => {
            debug!(id, %peer, error = %e, "connection failed; resetting both sides");
            reset(inbound);
            upstream.into_iter().for_each(reset);
        }
        Outcome::Cut => {
            debug!(id, %peer, "connection cut");
            reset(inbound);
            upstream.into_iter().for_each(reset);
        }
    }
}

/// Forwards one direction: a reader pushes `(deadline, bytes)` into a
/// channel, a writer waits for each deadline before writing, so latency is
/// applied per chunk without reordering. EOF is propagated as a half-close.
async fn pipe(
    mut src: ReadHalf<'_>,
    mut dst: WriteHalf<'_>,
    shared: &Shared,
    dir: Dir,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Option<tokio::time::Instant>, Vec<u8>)>(PIPE_DEPTH);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let n = src.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            let latency = shared.latency();
            let deadline = (!latency.is_zero()).then(|| tokio::time::Instant::now() + latency);
            if tx.send((deadline, buf[..n].to_vec())).await.is_err() {
                // The writer stopped; it reports its own error.
                return Ok(());
            }
        }
    };
    let writer = async move {
        let counter = shared.byte_counter(dir);
        while let Some((deadline, data)) = rx.recv().await {
            if let Some(deadline) = deadline {
                tokio::time::sleep_until(deadline).await;
            }
            dst.write_all(&data).await?;
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        dst.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// Reads and discards everything until EOF (used for blackholed connections).
async fn discard(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK_SIZE];
    while stream.read(&mut buf).await? != 0 {}
    Ok(())
}

fn set_nodelay(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "failed to set TCP_NODELAY");
    }
}

/// Arms a TCP reset: with a zero linger, closing the socket sends RST instead
/// of FIN. The socket is closed when the stream is dropped.
fn reset(stream: &TcpStream) {
    // `set_linger` is deprecated because a *non-zero* linger blocks on close;
    // a zero linger never blocks. (`set_zero_linger` needs a newer tokio than
    // the workspace's minimum.)
    #[allow(deprecated)]
    if let Err(e) = stream.set_linger(Some(Duration::ZERO)) {
        debug!(error = %e, "failed to set zero linger");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::time::timeout;

    /// Generous bound for events that should happen "immediately".
    const PROMPT: Duration = Duration::from_secs(5);
    /// How long to wait to conclude that nothing arrives.
    const QUIET: Duration = Duration::from_millis(300);

    /// A tiny echo server; returns its address and how many connections it
    /// accepted.
    async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind echo server");
        let addr = listener.local_addr().expect("echo addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, accepted)
    }

    async fn connect(proxy: &FaultProxy) -> TcpStream {
        timeout(PROMPT, TcpStream::connect(proxy.local_addr()))
            .await
            .expect("connect timed out")
            .expect("connect failed")
    }

    async fn round_trip(stream: &mut TcpStream, msg: &[u8]) {
        stream.write_all(msg).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        timeout(PROMPT, stream.read_exact(&mut buf))
            .await
            .expect("echo timed out")
            .expect("echo read failed");
        assert_eq!(buf, msg);
    }

    /// Asserts the peer closed the stream (EOF or error) without sending data.
    async fn assert_closed(stream: &mut TcpStream) {
        let mut buf = [0u8; 64];
        match timeout(PROMPT, stream.read(&mut buf))
            .await
            .expect("stream was not closed")
        {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("expected close, got {n} bytes"),
        }
    }

    /// Connects and asserts the connection is reset or closed without any
    /// data. On loopback the reset may already surface from `connect`.
    async fn assert_connection_rejected(proxy: &FaultProxy) {
        match timeout(PROMPT, TcpStream::connect(proxy.local_addr()))
            .await
            .expect("connect timed out")
        {
            Ok(mut stream) => assert_closed(&mut stream).await,
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
    }

    /// Asserts nothing arrives within [`QUIET`] and the stream is not closed.
    async fn assert_silent(stream: &mut TcpStream) {
        let mut buf = [0u8; 64];
        let res = timeout(QUIET, stream.read(&mut buf)).await;
        assert!(res.is_err(), "expected silence, got {res:?}");
    }

    #[tokio::test]
    async fn forwards_bytes_both_ways() {
        let (echo, accepted) = echo_server().await;
        let proxy = FaultProxy::start(echo).expect("start proxy");
        assert_ne!(proxy.local_addr().port(), 0);

        let mut client = connect(&proxy).await;
        round_trip(&mut client, b"hello").await;
        round_trip(&mut client, b"world!").await;

        assert_eq!(proxy.connection_count(), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let stats = proxy.stats();
        assert_eq!(stats.accepted, 1);
        assert_eq!(stats.bytes_up, 11);
        // The second round trip proves the first echo was fully accounted.
        assert!(stats.bytes_down >= 5, "{stats:?}");
    }

    #[tokio::test]
    async fn cut_all_closes_connections_and_new_ones_work() {
        let (echo, _) = echo_server().await;
        let proxy = FaultProxy::start(echo).expect("start proxy");

        let mut client = connect(&proxy).await;
        round_trip(&mut client, b"ping").await;

        assert_eq!(proxy.cut_all(), 1);
        assert_closed(&mut client).await;
        assert_eq!(proxy.connection_count(), 0);
        assert_eq!(proxy.stats().cut, 1);

        let mut fresh = connect(&proxy).await;
        round_trip(&mut fresh, b"again").await;
        assert_eq!(proxy.cut_all(), 1);
        assert_eq!(proxy.stats().cut, 2);
    }

    #[tokio::test]
    async fn stall_all_freezes_current_connections_only() {
        let (echo, _) = echo_server().await;
        let proxy = FaultProxy::start(echo).expect("start proxy");

        let mut stalled = connect(&proxy).await;
        round_trip(&mut stalled, b"before").await;

        assert_eq!(proxy.stall_all(), 1);
        stalled.write_all(b"lost").await.expect("write to stalled");
        assert_silent(&mut stalled).await;
        assert_eq!(proxy.connection_count(), 1);

        let mut fresh = connect(&proxy).await;
        round_trip(&mut fresh, b"fresh").await;
        assert_silent(&mut stalled).await;

        // Only the fresh connection is still running.
        assert_eq!(proxy.stall_all(), 1);
        assert_eq!(proxy.stats().stalled, 2);

        // Stalled connections are released by a cut.
        assert_eq!(proxy.cut_all(), 2);
        assert_closed(&mut stalled).await;
        assert_closed(&mut fresh).await;
    }

    #[tokio::test]
    async fn cut_stalled_releases_only_the_stalled_connections() {
        let (echo, _) = echo_server().await;
        let proxy = FaultProxy::start(echo).expect("start proxy");
        let mut stalled = connect(&proxy).await;
        round_trip(&mut stalled, b"before").await;
        assert_eq!(proxy.stall_all(), 1);
        let mut fresh = connect(&proxy).await;
        round_trip(&mut fresh, b"fresh").await;

        assert_eq!(proxy.cut_stalled(), 1);
        assert_closed(&mut stalled).await;
        round_trip(&mut fresh, b"still").await;
        assert_eq!(proxy.connection_count(), 1);
    }

    #[tokio::test]
    async fn refuse_for_resets_new_connections_until_stopped() {
        let (echo, accepted) = echo_server().await;
        let proxy = FaultProxy::start(echo).expect("start proxy");

        let mut existing = connect(&proxy).await;
        round_trip(&mut existing, b"a").await;

        proxy.refuse_for(Duration::from_secs(60));
        assert_connection_rejected(&proxy).await;
        assert_eq!(proxy.stats().refused, 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        // Existing connections are unaffected.
        round_trip(&mut existing, b"b").await;

        proxy.stop_refusing();
        let mut fresh = connect(&proxy).await;
        round_trip(&mut fresh, b"c").await;
        assert_eq!(proxy.stats().accepted, 2);
    }

    #[tokio::test]
    async fn latency_delays_both_directions_in_order() {
        let (echo, _) = echo_server().await;
        let proxy = FaultProxy::start(echo).expect("start proxy");

        let mut client = connect(&proxy).await;
        round_trip(&mut client, b"warmup").await;

        proxy.set_latency(Duration::from_millis(200));
        let payload: Vec<u8> = (0..=255u8).cycle().take(4000).collect();
        let started = Instant::now();
        for chunk in payload.chunks(100) {
            client.write_all(chunk).await.expect("write");
        }
        let mut buf = vec![0u8; payload.len()];
        timeout(PROMPT, client.read_exact(&mut buf))
            .await
            .expect("delayed echo timed out")
            .expect("read");
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(390), "{elapsed:?}");
        assert_eq!(buf, payload);

        proxy.set_latency(Duration::ZERO);
        let started = Instant::now();
        round_trip(&mut client, b"fast").await;
        assert!(started.elapsed() < Duration::from_millis(390));
    }

    #[tokio::test]
    async fn blackhole_accepts_but_never_answers() {
        let (echo, accepted) = echo_server().await;
        let proxy = FaultProxy::start(echo).expect("start proxy");

        proxy.set_blackhole(true);
        let mut client = connect(&proxy).await;
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert_silent(&mut client).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
        assert_eq!(proxy.stats().accepted, 1);
        assert_eq!(proxy.stats().bytes_up, 0);
        assert_eq!(proxy.connection_count(), 1);

        proxy.set_blackhole(false);
        let mut fresh = connect(&proxy).await;
        round_trip(&mut fresh, b"hi").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        assert_eq!(proxy.cut_all(), 2);
        assert_closed(&mut client).await;
    }

    #[tokio::test]
    async fn set_upstream_redirects_new_connections() {
        let (first, first_count) = echo_server().await;
        let (second, second_count) = echo_server().await;
        let proxy = FaultProxy::start(first).expect("start proxy");

        let mut old = connect(&proxy).await;
        round_trip(&mut old, b"one").await;

        proxy.set_upstream(second);
        assert_eq!(proxy.upstream(), second);
        let mut new = connect(&proxy).await;
        round_trip(&mut new, b"two").await;
        round_trip(&mut old, b"still one").await;

        assert_eq!(first_count.load(Ordering::SeqCst), 1);
        assert_eq!(second_count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn upstream_failure_closes_inbound() {
        let dead = {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .expect("bind");
            listener.local_addr().expect("addr")
        };
        let proxy = FaultProxy::start(dead).expect("start proxy");
        assert_connection_rejected(&proxy).await;
        assert_eq!(proxy.connection_count(), 0);
    }

    #[tokio::test]
    async fn drop_returns_promptly_and_closes_connections() {
        let (echo, _) = echo_server().await;
        let proxy = FaultProxy::start(echo).expect("start proxy");

        let mut stalled = connect(&proxy).await;
        round_trip(&mut stalled, b"x").await;
        proxy.stall_all();
        let mut active = connect(&proxy).await;
        round_trip(&mut active, b"y").await;
        proxy.set_latency(Duration::from_secs(30));
        active.write_all(b"in flight").await.expect("write");

        let started = Instant::now();
        drop(proxy);
        assert!(started.elapsed() < Duration::from_secs(2));

        assert_closed(&mut stalled).await;
        assert_closed(&mut active).await;
    }

    #[test]
    fn works_from_a_plain_thread() {
        use std::io::{Read, Write};

        let upstream = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let upstream_addr = upstream.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut s, _) = upstream.accept().expect("accept");
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).expect("server read");
            s.write_all(&buf).expect("server write");
        });

        let proxy = FaultProxy::start(upstream_addr).expect("start proxy");
        let mut client = std::net::TcpStream::connect(proxy.local_addr()).expect("connect");
        client.set_read_timeout(Some(PROMPT)).expect("timeout");
        client.write_all(b"sync").expect("write");
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"sync");
        server.join().expect("server thread");
        drop(proxy);
    }
}
