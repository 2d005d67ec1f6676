//! Hub memory per idle connection (target ≤ 8 KiB): the hub process' RSS (`VmRSS`) before and after a separate
//! client process opened N idle connections, each a `Transport` with no channels (default
//! settings: heartbeat 10 s / 25 s). Baseline in the same run: a plain tokio TCP server process
//! (no WebSocket, no actor; one task per accepted socket, parked in `read` with a 1 KiB buffer)
//! holding the same number of idle connections from a plain TCP client process.
//!
//! A second reference, to tell the framework's share from Tether's: a bare actix-web +
//! actix-web-actors WebSocket server (an actor per connection that ignores every message, the
//! hub's default two workers) holding as many idle WebSocket connections from tokio-tungstenite
//! clients.
//!
//! ```text
//! cargo run --release -p tether-benches --bin idle_memory -- --connections 1000,10000
//! ```
//!
//! Every server and client is this binary re-executed with a `--role`; each measurement gets a
//! fresh server process. Besides RSS, each server reports its heap in use (glibc `mallinfo2`)
//! before and after: what the connections hold, without the pages the allocator keeps.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tether_benches::multiproc::{
    self, child_heap_bytes, die_with_parent, free_loopback_addr, health_connections, heap_bytes,
    pace, raise_nofile_limit, spawn_hub, stdin_command_loop, vm_rss_kib, ChildProc, Result,
};
use tether_integration_tests::tls::TestCert;
use tether_transport::{Transport, TransportConfig};
use tokio::io::AsyncReadExt;

/// Hub RSS per idle connection, against a plain TCP server.
#[derive(Parser, Debug)]
struct Args {
    /// Connection counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000usize, 10_000])]
    connections: Vec<usize>,
    /// Seconds to let a server settle after the last connection arrived, before reading RSS.
    #[arg(long, default_value_t = 3.0)]
    settle_secs: f64,
    /// Connections opened per second by the client process.
    #[arg(long, default_value_t = 2000)]
    ramp_per_sec: usize,
    /// Give up waiting for the connections after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Also measure the hub serving TLS (`wss://`, a self-signed certificate the clients trust).
    #[arg(long)]
    tls: bool,
    /// Internal: the CA file a TLS client helper trusts (it then connects with `wss://`).
    #[arg(long, hide = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// Internal: the role of a helper process (`hub`, `tether-clients`, `tcp-server`,
    /// `tcp-clients`, `actix-ws-server`, `ws-clients`).
    #[arg(long, hide = true)]
    role: Option<String>,
    /// Internal: the server address a helper binds or connects to.
    #[arg(long, hide = true)]
    bind: Option<SocketAddr>,
    /// Internal: how many connections a client helper opens.
    #[arg(long, hide = true, default_value_t = 0)]
    count: usize,
}

fn main() -> ExitCode {
    raise_nofile_limit();
    let args = Args::parse();
    let result = match (args.role.as_deref(), args.bind) {
        (Some("hub"), Some(bind)) => multiproc::run_hub_role(bind),
        (Some("tether-clients"), Some(bind)) => tether_clients_role(bind, &args),
        (Some("tcp-server"), Some(bind)) => tcp_server_role(bind),
        (Some("tcp-clients"), Some(bind)) => tcp_clients_role(bind, &args),
        (Some("actix-ws-server"), Some(bind)) => actix_ws_server_role(bind),
        (Some("ws-clients"), Some(bind)) => ws_clients_role(bind, &args),
        (Some(role), _) => Err(format!("unknown role {role:?} (or --bind missing)").into()),
        (None, _) => actix_rt::System::new().block_on(run(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idle_memory: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Which server a measurement is about.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Tether,
    TetherTls,
    ActixWs,
    RawTcp,
}

/// The hub's target: at most 8 KiB of RSS per idle connection.
const TARGET_KIB: f64 = 8.0;

/// RSS before and after, in KiB; heap in use before and after, in bytes.
struct Measurement {
    before_kib: u64,
    after_kib: u64,
    heap_before: u64,
    heap_after: u64,
}

impl Measurement {
    fn per_connection(&self, n: usize) -> f64 {
        (self.after_kib as f64 - self.before_kib as f64) / n.max(1) as f64
    }

    fn heap_per_connection(&self, n: usize) -> f64 {
        (self.heap_after as f64 - self.heap_before as f64) / n.max(1) as f64
    }
}

/// Answers `heap` on stdin with `HEAP bytes` (what the measurement asks each server).
fn answer_heap(command: &str) {
    if command == "heap" {
        println!("HEAP {}", heap_bytes());
    }
}

async fn run(args: &Args) -> Result<()> {
    println!(
        "idle_memory: hub RSS (VmRSS) before/after N idle connections from a separate client \
         process; tether clients are Transports with no channels (default settings); baseline: \
         plain tokio TCP server, one task per socket parked in read() with a 1 KiB buffer; \
         reference: bare actix-web + actix-web-actors WebSocket server, tungstenite clients"
    );
    let mut rows = Vec::new();
    for &n in &args.connections {
        let tether = measure(Kind::Tether, n, args).await?;
        let actix = measure(Kind::ActixWs, n, args).await?;
        let raw = measure(Kind::RawTcp, n, args).await?;
        let tls = match args.tls {
            true => Some(measure(Kind::TetherTls, n, args).await?),
            false => None,
        };
        rows.push((n, tether, actix, raw, tls));
    }
    println!();
    println!("RSS per connection in KiB (heap in use per connection in bytes)");
    println!(
        " connections | tether KiB/conn (heap B) | target ≤ 8 KiB | bare actix-web WS KiB/conn (heap B) | raw TCP KiB/conn (heap B) | tether RSS before → after | tether TLS KiB/conn (heap B)"
    );
    println!(
        "-------------|--------------------------|----------------|-------------------------------------|---------------------------|---------------------------|-----------------------------"
    );
    for (n, tether, actix, raw, tls) in &rows {
        let per = tether.per_connection(*n);
        let verdict = if per <= TARGET_KIB { "met" } else { "MISSED" };
        println!(
            "{n:>12} | {:>24} | {verdict:>14} | {:>35} | {:>25} | {:>7} KiB → {:>7} KiB | {:>28}",
            format!("{per:.2} ({:.0})", tether.heap_per_connection(*n)),
            format!(
                "{:.2} ({:.0})",
                actix.per_connection(*n),
                actix.heap_per_connection(*n)
            ),
            format!(
                "{:.2} ({:.0})",
                raw.per_connection(*n),
                raw.heap_per_connection(*n)
            ),
            tether.before_kib,
            tether.after_kib,
            match tls {
                Some(tls) => format!(
                    "{:.2} ({:.0})",
                    tls.per_connection(*n),
                    tls.heap_per_connection(*n)
                ),
                None => "-".to_owned(),
            },
        );
    }
    Ok(())
}

async fn measure(kind: Kind, n: usize, args: &Args) -> Result<Measurement> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let bind = free_loopback_addr()?;
    let tls_files = match kind {
        Kind::TetherTls => {
            let dir = std::env::temp_dir().join(format!("idle_memory-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            TestCert::localhost().write_to(&dir)?
        }
        _ => Default::default(),
    };
    let (label, server_role, client_role) = match kind {
        Kind::Tether => ("tether hub", "hub", "tether-clients"),
        Kind::TetherTls => ("tether hub over TLS", "hub", "tether-clients"),
        Kind::ActixWs => ("bare actix-web WS server", "actix-ws-server", "ws-clients"),
        Kind::RawTcp => ("raw TCP server", "tcp-server", "tcp-clients"),
    };
    let mut server = match kind {
        Kind::Tether => {
            let (hub, _) = spawn_hub(bind).await?;
            // Warm the HTTP path the measurement polls, so its one-off allocations are in the
            // baseline.
            health_connections(bind).await?;
            hub
        }
        Kind::TetherTls => {
            // The hub child reads its certificate from the environment it inherits.
            std::env::set_var("TETHER_HUB_TLS_CERT", &tls_files.0);
            std::env::set_var("TETHER_HUB_TLS_KEY", &tls_files.1);
            let spawned = spawn_hub(bind).await;
            std::env::remove_var("TETHER_HUB_TLS_CERT");
            std::env::remove_var("TETHER_HUB_TLS_KEY");
            spawned?.0
        }
        Kind::ActixWs | Kind::RawTcp => {
            let mut server = ChildProc::spawn(
                server_role,
                &role_args(server_role, bind, 0, args.ramp_per_sec),
            )?;
            server
                .expect_line("LISTENING", Duration::from_secs(30))
                .await?;
            server
        }
    };
    let pid = server.pid().ok_or("server already exited")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kib = vm_rss_kib(pid)?;
    let heap_before = child_heap_bytes(&mut server).await?;

    let mut client_args = role_args(client_role, bind, n, args.ramp_per_sec);
    if kind == Kind::TetherTls {
        client_args.extend(["--tls-ca".to_owned(), tls_files.0.display().to_string()]);
    }
    let clients = ChildProc::spawn(client_role, &client_args)?;
    let started = Instant::now();
    let mut seen = 0;
    while seen < n {
        if started.elapsed() > timeout {
            return Err(format!("{label}: only {seen}/{n} connections after {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        seen = match kind {
            // A loaded machine (the clients' connect storm fills the listen backlog) may not
            // answer one poll in time: the next one will.
            Kind::Tether => match health_connections(bind).await {
                Ok(count) => count as usize,
                Err(e) => {
                    eprintln!("  {label}: /health: {e}; polling again");
                    seen
                }
            },
            // Its /health is behind TLS: the hub child answers on stdin instead.
            Kind::TetherTls => {
                server.send("connections").await?;
                let line = server
                    .expect_line("CONNECTIONS ", Duration::from_secs(10))
                    .await?;
                line.parse()?
            }
            Kind::ActixWs | Kind::RawTcp => {
                let mut latest = seen;
                while let Some(line) = server.try_line() {
                    if let Some(count) = line.strip_prefix("CONNECTIONS ") {
                        latest = count.trim().parse()?;
                    }
                }
                latest
            }
        };
    }
    let ramp = started.elapsed();
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
    let after_kib = vm_rss_kib(pid)?;
    let heap_after = child_heap_bytes(&mut server).await?;
    if kind == Kind::Tether {
        let still = health_connections(bind).await?;
        if still as usize != n {
            return Err(format!("{label}: {still} connections after settling, not {n}").into());
        }
    }
    let m = Measurement {
        before_kib,
        after_kib,
        heap_before,
        heap_after,
    };
    println!(
        "  {label}: {n} connections in {:.1} s; RSS {before_kib} KiB → {after_kib} KiB = {:.2} KiB/conn; heap {heap_before} B → {heap_after} B = {:.0} B/conn",
        ramp.as_secs_f64(),
        m.per_connection(n),
        m.heap_per_connection(n)
    );
    clients.kill().await?;
    server.kill().await?;
    Ok(m)
}

fn role_args(role: &str, bind: SocketAddr, count: usize, ramp_per_sec: usize) -> Vec<String> {
    [
        "--role",
        role,
        "--bind",
        &bind.to_string(),
        "--count",
        &count.to_string(),
        "--ramp-per-sec",
        &ramp_per_sec.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Client helper: `--count` Transports (no channels, default settings) to the hub at `bind`,
/// started at `--ramp-per-sec`, held until stdin closes.
fn tether_clients_role(bind: SocketAddr, args: &Args) -> Result<()> {
    die_with_parent();
    let (count, per_sec) = (args.count, args.ramp_per_sec);
    actix_rt::System::new().block_on(async move {
        let scheme = if args.tls_ca.is_some() { "wss" } else { "ws" };
        let url = format!("{scheme}://{bind}/ws");
        let mut transports = Vec::with_capacity(count);
        let started = Instant::now();
        for i in 0..count {
            pace(started, i, per_sec).await;
            let mut config = TransportConfig::builder(url.clone());
            if let Some(ca) = &args.tls_ca {
                config = config.tls_ca_file(ca);
            }
            transports.push(Transport::start(config.build()?));
        }
        println!("STARTED {count}");
        stdin_command_loop(|_| {}).await;
        Ok::<_, multiproc::BoxError>(())
    })?;
    std::process::exit(0)
}

/// Baseline server helper: a tokio TCP server (two worker threads, like the hub's two workers)
/// that accepts every connection into its own task, parked in `read` with a 1 KiB buffer.
/// Prints `LISTENING`, then `CONNECTIONS n` whenever the count changed (checked every 100 ms).
fn tcp_server_role(bind: SocketAddr) -> Result<()> {
    die_with_parent();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind).await?;
        println!("LISTENING {bind}");
        let open = Arc::new(AtomicUsize::new(0));
        tokio::spawn({
            let open = open.clone();
            async move {
                loop {
                    let Ok((mut socket, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    open.fetch_add(1, Ordering::Relaxed);
                    let open = open.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        while let Ok(1..) = socket.read(&mut buf).await {}
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
        });
        tokio::spawn(report_connections(open.clone()));
        stdin_command_loop(answer_heap).await;
        Ok::<_, multiproc::BoxError>(())
    })?;
    std::process::exit(0)
}

/// Baseline client helper: `--count` plain TCP connections to `bind`, opened at
/// `--ramp-per-sec`, held until stdin closes.
fn tcp_clients_role(bind: SocketAddr, args: &Args) -> Result<()> {
    die_with_parent();
    let (count, per_sec) = (args.count, args.ramp_per_sec);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut sockets = Vec::with_capacity(count);
        let started = Instant::now();
        for i in 0..count {
            pace(started, i, per_sec).await;
            let socket = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(bind),
            )
            .await
            .map_err(|_| format!("connection {i} timed out"))??;
            sockets.push(socket);
        }
        println!("STARTED {count}");
        stdin_command_loop(|_| {}).await;
        Ok::<_, multiproc::BoxError>(())
    })?;
    std::process::exit(0)
}

/// Reference server helper: a bare actix-web + actix-web-actors WebSocket endpoint at `/ws`
/// (one [`IdleWs`] actor per connection, one worker per core like the hub). Prints `LISTENING`,
/// then `CONNECTIONS n` whenever the count changed (checked every 100 ms).
fn actix_ws_server_role(bind: SocketAddr) -> Result<()> {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

    async fn route(
        req: HttpRequest,
        stream: web::Payload,
        open: web::Data<AtomicUsize>,
    ) -> Result<HttpResponse, actix_web::Error> {
        let open = open.into_inner();
        actix_web_actors::ws::start(IdleWs { open }, &req, stream)
    }

    die_with_parent();
    actix_rt::System::new().block_on(async move {
        let open = web::Data::new(AtomicUsize::new(0));
        let data = open.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/ws", web::get().to(route))
        })
        .disable_signals()
        .bind(bind)?
        .run();
        actix_rt::spawn(server);
        println!("LISTENING {bind}");
        actix_rt::spawn(report_connections(open.into_inner()));
        stdin_command_loop(answer_heap).await;
        Ok::<_, multiproc::BoxError>(())
    })?;
    std::process::exit(0)
}

/// The reference server's per-connection actor: counts itself and ignores every message.
struct IdleWs {
    open: Arc<AtomicUsize>,
}

impl actix::Actor for IdleWs {
    type Context = actix_web_actors::ws::WebsocketContext<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl
    actix::StreamHandler<Result<actix_web_actors::ws::Message, actix_web_actors::ws::ProtocolError>>
    for IdleWs
{
    fn handle(
        &mut self,
        _msg: Result<actix_web_actors::ws::Message, actix_web_actors::ws::ProtocolError>,
        _ctx: &mut Self::Context,
    ) {
    }
}

/// Reference client helper: `--count` tokio-tungstenite WebSocket connections to `ws://bind/ws`,
/// opened at `--ramp-per-sec`, held (never read) until stdin closes.
fn ws_clients_role(bind: SocketAddr, args: &Args) -> Result<()> {
    die_with_parent();
    let (count, per_sec) = (args.count, args.ramp_per_sec);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let url = format!("ws://{bind}/ws");
        let mut sockets = Vec::with_capacity(count);
        let started = Instant::now();
        for i in 0..count {
            pace(started, i, per_sec).await;
            let (socket, _) = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_tungstenite::connect_async(url.as_str()),
            )
            .await
            .map_err(|_| format!("WebSocket {i} timed out"))??;
            sockets.push(socket);
        }
        println!("STARTED {count}");
        stdin_command_loop(|_| {}).await;
        Ok::<_, multiproc::BoxError>(())
    })?;
    std::process::exit(0)
}

/// Prints `CONNECTIONS n` for the parent process whenever the count of open connections
/// changes (checked every 100 ms).
async fn report_connections(open: Arc<AtomicUsize>) {
    let mut last = usize::MAX;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = open.load(Ordering::Relaxed);
        if now != last {
            println!("CONNECTIONS {now}");
            last = now;
        }
    }
}
