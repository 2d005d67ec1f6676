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
//!
//! ## Spread over several processes (e.g. 100,000 connections)
//!
//! A process may hold at most 20,000 open files here (the hard limit; even root cannot raise
//! it), so one hub process cannot hold 100,000 connections. A count above [`PER_HUB_MAX`] (or
//! `--hub-procs`/`--client-procs` above 1) runs Tether only, spread out: `--hub-procs` hub
//! processes (default: as many as needed for ≤ 18,000 connections each), each listening on a
//! loopback address of its own (127.0.0.1, 127.0.0.2, …, so each hub's clients have the
//! ephemeral port range of one destination to themselves), and `--client-procs` client
//! processes (default: ≤ 15,000 sockets each), each spreading its Transports round-robin over
//! the hubs from a source address of its own (127.1.0.1, 127.1.0.2, …:
//! `TransportConfigBuilder::local_address`), so the kernel's search for a free ephemeral port on
//! each connect sees only that process's sockets. Reported: RSS per connection of each hub process, the total, the time until every
//! hub counted all its connections, the CPU the hubs and the clients spent connecting and then
//! idling, open files, and the kernel's socket and slab memory (`/proc/net/sockstat`,
//! `/proc/meminfo`) before and after.
//!
//! ```text
//! cargo run --release -p tether-benches --bin idle_memory -- --conns 100000 --client-procs 8
//! ```

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
    #[arg(long, alias = "conns", value_delimiter = ',', default_values_t = vec![1000usize, 10_000])]
    connections: Vec<usize>,
    /// Hub processes to spread the connections over (0: one per 18,000 connections). Above 1,
    /// Tether only, no baselines.
    #[arg(long, default_value_t = 0)]
    hub_procs: usize,
    /// Client processes to spread the connections over (0: one per 15,000 connections).
    #[arg(long, default_value_t = 0)]
    client_procs: usize,
    /// Spread mode: seconds to measure the hubs' and clients' CPU while everything is idle.
    #[arg(long, default_value_t = 20.0)]
    idle_secs: f64,
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
    /// Internal: the hubs a spread-mode client helper connects to, comma-separated.
    #[arg(long, hide = true, value_delimiter = ',')]
    hubs: Vec<SocketAddr>,
    /// Internal: the index of a spread-mode client helper's first connection (for round-robin).
    #[arg(long, hide = true, default_value_t = 0)]
    offset: usize,
    /// Internal: the source address a spread-mode client helper binds its connections to.
    #[arg(long, hide = true)]
    local_ip: Option<std::net::IpAddr>,
}

/// Most connections given to one hub process by default in spread mode: the open-file hard
/// limit is 20,000 per process and the hub holds one descriptor per connection.
const PER_HUB_MAX: usize = 18_000;
/// Descriptors the hub holds per connection (see [`PER_HUB_MAX`]).
const HUB_FDS_PER_CONN: usize = 1;
/// Most sockets given to one client process by default in spread mode.
const PER_CLIENT_PROC_MAX: usize = 15_000;

fn main() -> ExitCode {
    raise_nofile_limit();
    let args = Args::parse();
    let result = match (args.role.as_deref(), args.bind) {
        (Some("hub"), Some(bind)) => multiproc::run_hub_role(bind),
        (Some("tether-clients"), Some(bind)) => tether_clients_role(bind, &args),
        (Some("spread-clients"), _) => spread_clients_role(&args),
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
        if n > PER_HUB_MAX || args.hub_procs > 1 || args.client_procs > 1 {
            measure_spread(n, args).await?;
            continue;
        }
        let tether = measure(Kind::Tether, n, args).await?;
        let actix = measure(Kind::ActixWs, n, args).await?;
        let raw = measure(Kind::RawTcp, n, args).await?;
        let tls = match args.tls {
            true => Some(measure(Kind::TetherTls, n, args).await?),
            false => None,
        };
        rows.push((n, tether, actix, raw, tls));
    }
    if rows.is_empty() {
        return Ok(());
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

// ---------------------------------------------------------------------------------------------
// Spread mode: several hub processes, several client processes.

/// `n` idle Tether connections over several hub and client processes (see the module docs).
async fn measure_spread(n: usize, args: &Args) -> Result<()> {
    let hubs_n = match args.hub_procs {
        0 => n.div_ceil(PER_HUB_MAX),
        h => h,
    }
    .max(1);
    let clients_n = match args.client_procs {
        0 => n.div_ceil(PER_CLIENT_PROC_MAX),
        c => c,
    }
    .clamp(1, n.max(1));
    // At least twice the ramp's own length, plus half a minute.
    let ramp_secs = n as u64 / args.ramp_per_sec.max(1) as u64;
    let timeout = Duration::from_secs(args.timeout_secs.max(2 * ramp_secs + 30));
    let hz = multiproc::clock_ticks_per_sec() as f64;
    let limit = raise_nofile_limit();
    println!();
    println!(
        "== spread: {n} idle Tether connections over {hubs_n} hub process(es) (≈{} each) and \
         {clients_n} client process(es) (≈{} each); open-file limit {limit} per process (hard; \
         the hub holds {HUB_FDS_PER_CONN} per connection, so one hub process cannot hold them \
         all); ephemeral ports {}",
        n.div_ceil(hubs_n),
        n.div_ceil(clients_n),
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .map(|r| r.split_whitespace().collect::<Vec<_>>().join("–"))
            .unwrap_or_else(|_| "unknown".into()),
    );
    if n.div_ceil(hubs_n) * HUB_FDS_PER_CONN + 256 > limit as usize
        || n.div_ceil(clients_n) + 256 > limit as usize
    {
        return Err(format!(
            "{n} connections over {hubs_n} hub and {clients_n} client processes exceed the \
             open-file limit of {limit} per process: raise --hub-procs/--client-procs"
        )
        .into());
    }

    if hubs_n > 250 {
        return Err(
            format!("{hubs_n} hub processes: at most 250 loopback addresses are used").into(),
        );
    }
    // Hub i listens on 127.0.0.(i+1), so each hub's connections are one destination's 4-tuples.
    let mut hubs = Vec::with_capacity(hubs_n);
    let mut addrs = Vec::with_capacity(hubs_n);
    for i in 0..hubs_n {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, (i + 1) as u8);
        let bind = std::net::TcpListener::bind((ip, 0))?.local_addr()?;
        let (hub, _) = spawn_hub(bind).await?;
        health_connections(bind).await?;
        addrs.push(bind);
        hubs.push(hub);
    }
    let pids: Vec<u32> = hubs
        .iter()
        .map(|h| h.pid().ok_or("hub exited"))
        .collect::<std::result::Result<_, _>>()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kib: Vec<u64> = pids.iter().map(|&p| vm_rss_kib(p)).collect::<Result<_>>()?;
    let kernel_before = KernelMemory::read();
    let hub_ticks_before = ticks_of(&pids)?;

    let hub_list = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let per_proc_rate = (args.ramp_per_sec / clients_n).max(1);
    let mut clients = Vec::with_capacity(clients_n);
    let started = Instant::now();
    let mut offset = 0;
    for j in 0..clients_n {
        let count = multiproc::share(n, clients_n, j);
        let role_args: Vec<String> = [
            "--role",
            "spread-clients",
            "--hubs",
            &hub_list,
            "--count",
            &count.to_string(),
            "--offset",
            &offset.to_string(),
            "--ramp-per-sec",
            &per_proc_rate.to_string(),
            // Each client process connects from an address of its own: the kernel's
            // ephemeral-port search on connect() then sees only this process's sockets to each
            // hub (with one source address for all, at ~85,000 connections that search was a
            // fifth of all CPU and connections churned instead of accumulating).
            "--local-ip",
            &format!("127.1.0.{}", j + 1),
        ]
        .map(str::to_owned)
        .to_vec();
        offset += count;
        clients.push(ChildProc::spawn(&format!("clients {j}"), &role_args)?);
    }
    let client_pids: Vec<u32> = clients
        .iter()
        .map(|c| c.pid().ok_or("client process exited"))
        .collect::<std::result::Result<_, _>>()?;
    let mut seen = vec![0usize; hubs_n];
    let mut last_progress = 0;
    loop {
        if started.elapsed() > timeout {
            return Err(format!(
                "spread: only {}/{n} connections after {timeout:?} (per hub: {seen:?})",
                seen.iter().sum::<usize>()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (i, addr) in addrs.iter().enumerate() {
            // A hub busy with handshakes may answer late: keep its last count and ask again.
            match health_connections(*addr).await {
                Ok(count) => seen[i] = count as usize,
                Err(e) => eprintln!("  (hub {i}: {e}; asking again)"),
            }
        }
        if seen.iter().sum::<usize>() >= n {
            break;
        }
        if started.elapsed().as_secs() / 10 != last_progress {
            last_progress = started.elapsed().as_secs() / 10;
            eprintln!(
                "  … {}/{n} connected after {:.0} s",
                seen.iter().sum::<usize>(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let ramp = started.elapsed();
    let hub_ticks_ramp = ticks_of(&pids)? - hub_ticks_before;
    let client_ticks_ramp = ticks_of(&client_pids)?;

    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
    let after_kib: Vec<u64> = pids.iter().map(|&p| vm_rss_kib(p)).collect::<Result<_>>()?;
    let kernel_after = KernelMemory::read();
    let client_kib: u64 = client_pids
        .iter()
        .map(|&p| vm_rss_kib(p))
        .collect::<Result<Vec<_>>>()?
        .iter()
        .sum();
    let hub_fds: Vec<usize> = pids.iter().map(|&p| open_fds(p)).collect();
    let client_fds: usize = client_pids.iter().map(|&p| open_fds(p)).sum();

    // Idle cost: CPU over --idle-secs with everything connected (heartbeats only).
    let idle_hub_before = ticks_of(&pids)?;
    let idle_client_before = ticks_of(&client_pids)?;
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
    let idle_elapsed = idle_started.elapsed().as_secs_f64();
    let idle_hub = (ticks_of(&pids)? - idle_hub_before) as f64 / hz;
    let idle_client = (ticks_of(&client_pids)? - idle_client_before) as f64 / hz;
    for (i, addr) in addrs.iter().enumerate() {
        seen[i] = health_connections(*addr).await? as usize;
    }
    let still: usize = seen.iter().sum();

    println!(
        "  {n} connections in {:.1} s ({:.0} connects/s; ramp asked {} /s over {clients_n} \
         client processes); still open after settling and idling: {still}",
        ramp.as_secs_f64(),
        n as f64 / ramp.as_secs_f64(),
        args.ramp_per_sec,
    );
    println!("   hub | address              | connections | RSS before → after        | KiB/conn | open files");
    println!("  -----|----------------------|-------------|---------------------------|----------|-----------");
    let mut total_before = 0;
    let mut total_after = 0;
    for i in 0..hubs_n {
        let per = (after_kib[i] as f64 - before_kib[i] as f64) / seen[i].max(1) as f64;
        total_before += before_kib[i];
        total_after += after_kib[i];
        println!(
            "  {i:>4} | {:<20} | {:>11} | {:>8} KiB → {:>8} KiB | {per:>8.2} | {:>10}",
            addrs[i].to_string(),
            seen[i],
            before_kib[i],
            after_kib[i],
            hub_fds[i],
        );
    }
    let per_total = (total_after as f64 - total_before as f64) / still.max(1) as f64;
    println!(
        "   all | {:<20} | {still:>11} | {total_before:>8} KiB → {total_after:>8} KiB | {per_total:>8.2} | {:>10}",
        format!("{hubs_n} processes"),
        hub_fds.iter().sum::<usize>()
    );
    println!(
        "  target ≤ 10 KiB per connection (per hub process): {}",
        if per_total <= 10.0 { "met" } else { "MISSED" }
    );
    println!(
        "  cost: hubs' CPU while connecting {:.1} s ({:.0} µs per connection); clients' CPU while \
         connecting {:.1} s; idle over {idle_elapsed:.0} s: hubs {:.2} % of a core ({:.2} µs/s \
         per connection), clients {:.2} % of a core",
        hub_ticks_ramp as f64 / hz,
        hub_ticks_ramp as f64 / hz * 1e6 / n.max(1) as f64,
        client_ticks_ramp as f64 / hz,
        idle_hub / idle_elapsed * 100.0,
        idle_hub / idle_elapsed * 1e6 / still.max(1) as f64,
        idle_client / idle_elapsed * 100.0,
    );
    println!(
        "  cost: client processes' RSS {client_kib} KiB in all ({:.2} KiB per connection), \
         their open files {client_fds}",
        client_kib as f64 / n.max(1) as f64
    );
    match (kernel_before, kernel_after) {
        (Some(b), Some(a)) => println!(
            "  kernel (whole machine, both ends of every connection; other work on the machine \
             shows here too): TCP sockets {} → {}, TCP buffer memory {} → {} KiB, Slab {} → {} \
             KiB ({:+.2} KiB per connection), open files {} → {}",
            b.tcp_inuse,
            a.tcp_inuse,
            b.tcp_mem_kib,
            a.tcp_mem_kib,
            b.slab_kib,
            a.slab_kib,
            (a.slab_kib as f64 - b.slab_kib as f64) / n.max(1) as f64,
            b.files,
            a.files,
        ),
        _ => println!("  kernel memory: /proc/net/sockstat or /proc/meminfo unreadable"),
    }
    for c in clients {
        c.kill().await?;
    }
    for h in hubs {
        h.kill().await?;
    }
    Ok(())
}

/// Sum of `utime + stime` of `pids`, in clock ticks.
fn ticks_of(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&p| multiproc::pid_cpu_ticks(p)).sum()
}

/// Open file descriptors of `pid` (entries of `/proc/<pid>/fd`; 0 if unreadable).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The kernel's socket and slab figures for the whole machine.
#[derive(Debug, Clone, Copy)]
struct KernelMemory {
    /// `TCP: inuse` of `/proc/net/sockstat`.
    tcp_inuse: u64,
    /// `TCP: mem` of `/proc/net/sockstat` (pages) in KiB.
    tcp_mem_kib: u64,
    /// `Slab` of `/proc/meminfo`.
    slab_kib: u64,
    /// Allocated file handles (first field of `/proc/sys/fs/file-nr`).
    files: u64,
}

impl KernelMemory {
    fn read() -> Option<KernelMemory> {
        let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
        let tcp: Vec<&str> = sockstat
            .lines()
            .find(|l| l.starts_with("TCP:"))?
            .split_whitespace()
            .collect();
        let field = |name: &str| -> Option<u64> {
            let i = tcp.iter().position(|w| *w == name)?;
            tcp.get(i + 1)?.parse().ok()
        };
        let page_kib = {
            // SAFETY: sysconf has no preconditions.
            let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if size > 0 {
                size as u64 / 1024
            } else {
                4
            }
        };
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let slab_kib = meminfo
            .lines()
            .find(|l| l.starts_with("Slab:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let files = std::fs::read_to_string("/proc/sys/fs/file-nr")
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(KernelMemory {
            tcp_inuse: field("inuse")?,
            tcp_mem_kib: field("mem")? * page_kib,
            slab_kib,
            files,
        })
    }
}

/// Spread-mode client helper: `--count` Transports (no channels, default settings), the k-th
/// (counting from `--offset`) to hub `k mod hubs`, started at `--ramp-per-sec`, held until
/// stdin closes.
fn spread_clients_role(args: &Args) -> Result<()> {
    die_with_parent();
    if args.hubs.is_empty() {
        return Err("--hubs missing".into());
    }
    let (count, per_sec, offset) = (args.count, args.ramp_per_sec, args.offset);
    let urls: Vec<String> = args.hubs.iter().map(|a| format!("ws://{a}/ws")).collect();
    actix_rt::System::new().block_on(async move {
        let mut transports = Vec::with_capacity(count);
        let started = Instant::now();
        for i in 0..count {
            pace(started, i, per_sec).await;
            let url = &urls[(offset + i) % urls.len()];
            let mut config = TransportConfig::builder(url.clone());
            if let Some(ip) = args.local_ip {
                config = config.local_address(ip);
            }
            transports.push(Transport::start(config.build()?));
        }
        println!("STARTED {count}");
        stdin_command_loop(|_| {}).await;
        Ok::<_, multiproc::BoxError>(())
    })?;
    std::process::exit(0)
}
