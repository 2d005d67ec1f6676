//! The soak tool: a hub, N clients on K channels publishing at a rate, faults injected through
//! the fault proxy (and the hub itself), and a report computed from a full log of every message.
//!
//! ```text
//! cargo run --release --example soak                        # 60 s, default faults, embedded hub
//! cargo run --release --example soak -- --clients 200 --channels 20 --rate 2000 \
//!     --duration 300 --faults cut@5s,stall@17s,restart@31s --json soak.json --svg soak.svg
//! ```
//!
//! Several hub processes on one Redis, one of them SIGKILLed every 7 s:
//!
//! ```text
//! cargo run --release --example soak -- --hub-nodes 3 --store redis \
//!     --faults cut@5s,kill-node@7s,restart@13s
//! ```
//!
//! Over TLS: `--tls` makes a self-signed certificate at start; the hubs (embedded or processes)
//! serve it, the clients trust it and connect with `wss://` through the fault proxies (which
//! forward the encrypted bytes as they are):
//!
//! ```text
//! cargo run --release --example soak -- --duration 15 --clients 6 --channels 2 --rate 100 --tls
//! ```
//!
//! Exit status: 0 when nothing was silently lost, duplicated or reordered (and, where history
//! is durable, no discontinuity was reported); 1 otherwise; 2 when the run could not be set up.
//!
//! Hubs: by default one hub embedded in this process, which keeps its channel history across
//! `restart` faults (the server stops and starts; the channel service lives on). With
//! `--hub-nodes N`, N hub *processes* (this binary, re-executed) each behind its own fault
//! proxy; every client knows all of them and fails over. `--store redis` starts a private
//! redis-server for the run (or give `redis://…`); `--store memory` with hub processes keeps
//! history in each process, so a killed one honestly loses it: the deliveries inside the
//! discontinuities its subscribers are told of are counted apart from silent loss (which must
//! still be 0).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::{Deserialize, Serialize};
use tether_channels::hub::{ChannelService, RedisStore, Retention};
use tether_channels::{BufferLimits, Channel, ChannelEvent, ChannelOptions};
use tether_examples::soak::faults::{parse_duration, parse_faults, FaultKind, FaultSpec};
use tether_examples::soak::ledger::{Ledger, ReportedGap};
use tether_examples::soak::report::Report;
use tether_examples::soak::resources;
use tether_examples::soak::timeline::{Percentiles, Timeline, Transition};
use tether_integration_tests::harness::free_addr;
use tether_integration_tests::process::die_with_parent;
use tether_integration_tests::{FaultProxy, RedisServer, TestCert};
use tether_transport::hub::{Hub, HubConfig, HubConfigBuilder, HubHandle};
use tether_transport::protocol::Payload;
use tether_transport::{Transport, TransportConfig};

const DEFAULT_FAULTS: &str = "cut@5s,latency:100ms@7s,stall@13s,refuse:1s@19s,restart@29s";

/// Load and chaos test for Tether: measures uptime, recovery time, loss and speed.
#[derive(Parser, Debug)]
struct Args {
    /// Client transports.
    #[arg(long, default_value_t = 20)]
    clients: u32,
    /// Channels (client i publishes on and subscribes to channel i mod K).
    #[arg(long, default_value_t = 4)]
    channels: u32,
    /// Total publish rate, messages per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Payload size in bytes (approximate JSON size).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Length of the run in seconds (publishing and faults; the drain comes after).
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Faults: comma list of KIND@EVERY, KIND one of cut, stall, restart, kill-node (with
    /// --hub-nodes), refuse:DURATION, latency:DURATION. Empty for none.
    #[arg(long, default_value = DEFAULT_FAULTS)]
    faults: String,
    /// Seed for client jitter and payload padding.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Target an external hub (ws://host:port/path) instead of the embedded one (restart
    /// faults are then skipped).
    #[arg(long)]
    hub_url: Option<String>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the recovery histogram and connection timeline as SVG here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Idle timeout of clients and hub in milliseconds (the heartbeat is a quarter of it).
    #[arg(long, default_value_t = 2000)]
    idle_timeout_ms: u64,
    /// How long to wait after the run for every publish to be acknowledged and delivered.
    #[arg(long, default_value = "60s")]
    drain: String,
    /// How long the hub stays down on a restart or kill-node fault.
    #[arg(long, default_value = "1s")]
    restart_down: String,
    /// Hub processes, each behind its own fault proxy (0: one hub embedded in this process).
    #[arg(long, default_value_t = 0)]
    hub_nodes: u32,
    /// Where channel history lives: `memory`, `redis` (a private redis-server started for the
    /// run) or a Redis URL (`redis://host:port`).
    #[arg(long, default_value = "memory")]
    store: String,
    /// Serve and connect over TLS: a self-signed certificate is made at start, the hubs serve
    /// it (hub processes get it through TETHER_HUB_TLS_CERT / TETHER_HUB_TLS_KEY), the clients
    /// trust it and connect with wss://.
    #[arg(long)]
    tls: bool,
    /// Internal: serve one hub node on this address (how `--hub-nodes` starts its processes).
    #[arg(long, hide = true)]
    serve_hub: Option<SocketAddr>,
    /// Internal: the served node's id.
    #[arg(long, hide = true)]
    node_id: Option<String>,
}

/// The soak payload: publisher, sequence, padding.
#[derive(Serialize, Deserialize)]
struct Body {
    p: u32,
    s: u64,
    #[serde(default)]
    x: String,
}

struct Client {
    transport: Transport,
    channel: Channel,
    next_seq: Cell<u64>,
}

#[actix::main]
async fn main() -> ExitCode {
    tether_examples::init_tracing();
    let args = Args::parse();
    if let Some(bind) = args.serve_hub {
        return match serve_hub(bind, &args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("soak hub node: {e}");
                ExitCode::from(2)
            }
        };
    }
    match run(args).await {
        Ok(report) if report.passed() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::from(2)
        }
    }
}

fn upstream_of(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{url:?}: only ws:// hubs can be put behind the fault proxy"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    Ok((
        addr,
        if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
    ))
}

async fn run(args: Args) -> Result<Report, Box<dyn std::error::Error>> {
    if args.clients == 0 || args.channels == 0 || args.channels > args.clients {
        return Err("need at least one client per channel (--clients ≥ --channels ≥ 1)".into());
    }
    if !(args.rate.is_finite() && args.rate >= 0.0) {
        return Err("--rate must be a non-negative number".into());
    }
    let faults = parse_faults(&args.faults)?;
    let drain = parse_duration(&args.drain)?;
    let restart_down = parse_duration(&args.restart_down)?;
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let idle = Duration::from_millis(args.idle_timeout_ms.max(40));
    let heartbeat = idle / 4;
    let start = Instant::now();

    // The store, the hubs (embedded, processes, or external), each behind its fault proxy.
    let (store, _redis) = resolve_store(&args.store)?;
    if args.hub_nodes > 1 && store == StoreChoice::Memory {
        return Err(
            "hub processes share nothing in memory: use --store redis with --hub-nodes > 1".into(),
        );
    }
    if args.hub_url.is_some() && args.hub_nodes > 0 {
        return Err("--hub-url and --hub-nodes exclude each other".into());
    }
    if args.hub_url.is_some() && args.tls {
        return Err("--tls makes its own certificate for its own hubs: not with --hub-url".into());
    }
    // One certificate for the run, for every hub (the clients trust it).
    let tls = args.tls.then(SoakTls::new).transpose()?;
    let (hubs, upstreams, path) = match &args.hub_url {
        Some(url) => {
            let (addr, path) = upstream_of(url)?;
            (Hubs::External, vec![addr], path)
        }
        None if args.hub_nodes == 0 => {
            let base = match &tls {
                Some(tls) => tls.cert.serve(HubConfig::builder()),
                None => HubConfig::builder(),
            };
            let config = hub_config(
                base,
                free_addr(),
                idle,
                channel_service(&store)?,
                "embedded",
            )?;
            let hub = Hub::start(config.clone())?;
            let (bind, path) = (config.bind, config.ws_path.clone());
            (
                Hubs::Embedded {
                    hub: RefCell::new(Some(hub)),
                    config: Box::new(config),
                },
                vec![bind],
                path,
            )
        }
        None => {
            let nodes = Nodes::new(
                args.hub_nodes,
                &store,
                args.idle_timeout_ms,
                tls.as_ref().map(|t| t.files.clone()),
            )?;
            for i in 0..args.hub_nodes as usize {
                nodes.start(i).await?;
            }
            let addrs = nodes.addrs();
            (Hubs::Processes(nodes), addrs, "/ws".to_owned())
        }
    };
    let hubs = Rc::new(hubs);
    let proxies = upstreams
        .iter()
        .map(|addr| FaultProxy::start(*addr).map(Rc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let urls: Vec<String> = proxies
        .iter()
        .map(|p| format!("{scheme}://{}{}", p.local_addr(), path))
        .collect();

    // Clients, each recording its transitions and deliveries.
    let ledger = Rc::new(RefCell::new(Ledger::new(
        (0..args.clients)
            .map(|i| (i % args.channels) as usize)
            .collect(),
    )));
    let timeline = Rc::new(RefCell::new(Timeline::new()));
    let mut clients = Vec::new();
    for i in 0..args.clients {
        // Every client knows every node, starting with its own (spreads the load).
        let first = i as usize % urls.len();
        let mut builder = TransportConfig::builder(urls[first].clone());
        for k in 1..urls.len() {
            builder = builder.endpoint(urls[(first + k) % urls.len()].clone());
        }
        if let Some(tls) = &tls {
            builder = tls.cert.trust(builder);
        }
        let config = builder
            .heartbeat(heartbeat, idle)
            .seed(args.seed.wrapping_add(u64::from(i)))
            .build()?;
        let (transport, mut states) = Transport::start_with_events(config);
        let tl = timeline.clone();
        actix_rt::spawn(async move {
            while let Some(event) = states.recv().await {
                // After a lag the latest transition says where the client is from then on.
                let ev = event.transition();
                tl.borrow_mut().transition(Transition {
                    at: start.elapsed(),
                    client: i,
                    from: ev.from,
                    to: ev.to,
                });
            }
        });
        let options = ChannelOptions {
            limits: BufferLimits {
                max_messages: 1_000_000,
                max_bytes: 1 << 30,
                ..BufferLimits::default()
            },
            ..ChannelOptions::default()
        };
        let (channel, mut events) =
            Channel::open(&transport, format!("soak-{}", i % args.channels), options).await?;
        let ledger = ledger.clone();
        actix_rt::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    ChannelEvent::Message(m) => match m.payload.decode::<Body>() {
                        Ok(body) => ledger.borrow_mut().delivered(i, body.p, body.s, &m.epoch.0),
                        Err(e) => tracing::error!(%e, "foreign payload on a soak channel"),
                    },
                    ChannelEvent::Discontinuity(d) => {
                        tracing::warn!(from = %d.from, to = %d.to, "discontinuity");
                        let gap = ReportedGap {
                            from: (d.from.epoch.0.clone(), d.from.offset.0),
                            to: (d.to.epoch.0.clone(), d.to.offset.0),
                        };
                        ledger.borrow_mut().discontinuity(i, gap);
                    }
                }
            }
        });
        clients.push(Rc::new(Client {
            transport,
            channel,
            next_seq: Cell::new(0),
        }));
    }
    wait_attached(&clients, Duration::from_secs(30)).await?;
    println!(
        "soak: {} clients attached to {} channels through {} ({:.1} s); running {:.0} s with faults [{}]",
        args.clients,
        args.channels,
        urls.join(", "),
        start.elapsed().as_secs_f64(),
        duration.as_secs_f64(),
        args.faults
    );

    // The measured run: publishing and faults.
    let run_start = start.elapsed();
    let cpu_start = resources::cpu_time();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut fault_tasks = Vec::new();
    let restart_failures = Rc::new(Cell::new(0u64));
    for spec in faults.iter().copied() {
        let runs = match (spec.kind, hubs.as_ref()) {
            (FaultKind::Restart, Hubs::External) => {
                Err("an external hub cannot be restarted from here")
            }
            (FaultKind::KillNode, Hubs::External | Hubs::Embedded { .. }) => {
                Err("kill-node needs hub processes (--hub-nodes N)")
            }
            _ => Ok(()),
        };
        if let Err(why) = runs {
            eprintln!("soak: skipping {spec}: {why}");
            continue;
        }
        fault_tasks.push(actix_rt::spawn(inject(
            spec,
            stop.clone(),
            proxies.clone(),
            hubs.clone(),
            timeline.clone(),
            start,
            idle,
            restart_down,
            restart_failures.clone(),
        )));
    }
    let pending = Rc::new(Cell::new(0usize));
    let pad = "x".repeat(args.payload.saturating_sub(24));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut owed = 0.0f64;
    let mut next_client = 0usize;
    let deadline = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < deadline {
        tick.tick().await;
        owed += args.rate / 100.0;
        while owed >= 1.0 {
            owed -= 1.0;
            let client = clients[next_client].clone();
            let publisher = next_client as u32;
            next_client = (next_client + 1) % clients.len();
            let seq = client.next_seq.get() + 1;
            client.next_seq.set(seq);
            let payload = Payload::from_value(&Body {
                p: publisher,
                s: seq,
                x: pad.clone(),
            })?;
            ledger.borrow_mut().published();
            let ack = client.channel.publish_payload(payload);
            pending.set(pending.get() + 1);
            let (ledger, pending) = (ledger.clone(), pending.clone());
            actix_rt::spawn(async move {
                match ack.await {
                    Ok(ack) => {
                        let at = ack.offset.zip(ack.epoch).map(|(o, e)| (e.0, o.0));
                        ledger.borrow_mut().acked(publisher, seq, at)
                    }
                    Err(e) => {
                        tracing::warn!(%e, publisher, seq, "publish failed");
                        ledger.borrow_mut().failed();
                    }
                }
                pending.set(pending.get() - 1);
            });
        }
    }
    let _ = stop_tx.send(true);
    let run_end = start.elapsed();
    let cpu_used = resources::cpu_time().saturating_sub(cpu_start);
    let delivered_in_run = ledger.borrow().totals().delivered;
    // A fault in progress (a restart, a latency window) finishes before the drain.
    for task in fault_tasks {
        let _ = task.await;
    }

    // Drain: faults off, stragglers nudged, every publish answered and delivered.
    for proxy in &proxies {
        proxy.stop_refusing();
        proxy.set_latency(Duration::ZERO);
        proxy.cut_stalled();
    }
    for c in &clients {
        let _ = c.transport.reconnect_now().await;
    }
    let drain_deadline = tokio::time::Instant::now() + drain;
    let mut drained = false;
    while tokio::time::Instant::now() < drain_deadline {
        if pending.get() == 0 && ledger.borrow().outstanding() == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late duplicates would show up right after the drain: give them a moment to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for line in ledger.borrow().silent_losses(10) {
        eprintln!("soak: {line}");
    }
    if !drained {
        // Say exactly where each client stands, for whoever investigates.
        for (i, c) in clients.iter().enumerate() {
            if let Ok(status) = c.transport.status().await {
                eprintln!(
                    "soak: after the drain, client {i}: {} (attempt {}), channels {}",
                    status.state,
                    status.attempt,
                    serde_json::to_string(&status.channels).unwrap_or_default()
                );
            }
        }
    }

    let report = {
        let tl = timeline.borrow();
        let recovery = tl.recovery_ms(args.clients);
        let mut fault_counts = BTreeMap::new();
        for (_, kind) in tl.faults() {
            *fault_counts.entry(kind.name().to_owned()).or_insert(0) += 1;
        }
        let run = run_end - run_start;
        let report = Report {
            clients: args.clients,
            channels: args.channels,
            duration_s: run.as_secs_f64(),
            faults: fault_counts,
            totals: ledger.borrow().totals(),
            reconnects: tl.reconnects(args.clients),
            attempts: tl.attempts(),
            uptime_ratio: tl.uptime_ratio(args.clients, run_start, run_end),
            recovery_ms: Percentiles::of(&recovery),
            detection_ms: Percentiles::of(&tl.detection_ms(args.clients)),
            throughput_msgs_per_s: delivered_in_run as f64 / run.as_secs_f64(),
            cpu_percent: 100.0 * cpu_used.as_secs_f64() / run.as_secs_f64(),
            rss_max_mib: resources::peak_rss_mib(),
            drained,
            fault_spec: args.faults.clone(),
            seed: args.seed,
            store: store.name().to_owned(),
            hub_nodes: args.hub_nodes,
            continuity_expected: !(store == StoreChoice::Memory && args.hub_nodes > 0),
            hub_restart_failures: restart_failures.get(),
            tls: tls.is_some(),
        };
        print!("{}", report.text());
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        }
        if let Some(path) = &args.svg {
            let series = tl.connected_series(args.clients, Duration::from_millis(100), run_end);
            std::fs::write(path, report.svg(&recovery, &series, tl.faults()))?;
        }
        report
    };

    for c in &clients {
        c.transport.close().await;
    }
    hubs.stop_all().await;
    Ok(report)
}

/// Where channel history lives for a run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StoreChoice {
    Memory,
    Redis(String),
}

impl StoreChoice {
    fn name(&self) -> &'static str {
        match self {
            StoreChoice::Memory => "memory",
            StoreChoice::Redis(_) => "redis",
        }
    }
}

/// `memory`, `redis` (a private redis-server, kept alive by the returned guard) or a URL.
fn resolve_store(spec: &str) -> Result<(StoreChoice, Option<RedisServer>), String> {
    match spec {
        "memory" => Ok((StoreChoice::Memory, None)),
        "redis" => {
            let server = RedisServer::start()?;
            Ok((StoreChoice::Redis(server.url()), Some(server)))
        }
        url if url.starts_with("redis://") => Ok((StoreChoice::Redis(url.to_owned()), None)),
        other => Err(format!(
            "--store {other:?}: expected memory, redis or redis://…"
        )),
    }
}

fn channel_service(store: &StoreChoice) -> Result<ChannelService, Box<dyn std::error::Error>> {
    let retention = Retention {
        max_messages: 1_000_000,
        ..Retention::default()
    };
    let mut builder = ChannelService::builder().retention(retention);
    if let StoreChoice::Redis(url) = store {
        builder = builder.store(RedisStore::builder(url).retention(retention).build()?);
    }
    Ok(builder.build()?)
}

/// The run's certificate, and the files hub processes read it from (removed when dropped).
struct SoakTls {
    cert: TestCert,
    dir: PathBuf,
    files: (PathBuf, PathBuf),
}

impl SoakTls {
    fn new() -> Result<Self, String> {
        let cert = TestCert::localhost();
        let dir = std::env::temp_dir().join(format!("tether-soak-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let files = cert
            .write_to(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(SoakTls { cert, dir, files })
    }
}

impl Drop for SoakTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `base` (the TLS identity, if any) with the soak's hub settings.
fn hub_config(
    base: HubConfigBuilder,
    bind: SocketAddr,
    idle: Duration,
    service: ChannelService,
    node_id: &str,
) -> Result<HubConfig, Box<dyn std::error::Error>> {
    Ok(base
        .bind(bind)
        .workers(1)
        .heartbeat(idle / 4, idle)
        .handler(Arc::new(service))
        .node_id(node_id)
        // A graceful restart spreads the fleet's reconnects over this window.
        .shutdown_retry(Duration::from_millis(100), Duration::from_secs(1))
        .build()?)
}

/// The `--serve-hub` mode: one hub node until SIGINT (graceful) or SIGTERM.
async fn serve_hub(bind: SocketAddr, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    die_with_parent();
    let (store, _) = match args.store.as_str() {
        "memory" => (StoreChoice::Memory, None::<RedisServer>),
        url => (StoreChoice::Redis(url.to_owned()), None),
    };
    let idle = Duration::from_millis(args.idle_timeout_ms.max(40));
    let node_id = args.node_id.clone().unwrap_or_else(|| "node".into());
    // TLS, when the soak runs with --tls, comes through TETHER_HUB_TLS_CERT / _KEY.
    let hub = Hub::start(hub_config(
        HubConfigBuilder::from_env()?,
        bind,
        idle,
        channel_service(&store)?,
        &node_id,
    )?)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    hub.stop().await;
    Ok(())
}

/// One hub process.
struct Node {
    addr: SocketAddr,
    id: String,
    child: Option<tokio::process::Child>,
}

/// The hub processes of a run: this binary re-executed in `--serve-hub` mode.
struct Nodes {
    exe: PathBuf,
    common: Vec<String>,
    /// The certificate chain and key files when the nodes serve TLS.
    tls: Option<(PathBuf, PathBuf)>,
    nodes: RefCell<Vec<Node>>,
    next_victim: Cell<usize>,
}

impl Nodes {
    fn new(
        n: u32,
        store: &StoreChoice,
        idle_timeout_ms: u64,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let store = match store {
            StoreChoice::Memory => "memory".to_owned(),
            StoreChoice::Redis(url) => url.clone(),
        };
        let common = vec![
            "--store".into(),
            store,
            "--idle-timeout-ms".into(),
            idle_timeout_ms.to_string(),
        ];
        let nodes = (0..n)
            .map(|i| Node {
                addr: free_addr(),
                id: format!("node-{i}"),
                child: None,
            })
            .collect();
        Ok(Nodes {
            exe,
            common,
            tls,
            nodes: RefCell::new(nodes),
            next_victim: Cell::new(0),
        })
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.borrow().iter().map(|n| n.addr).collect()
    }

    /// Whether node `i` is running.
    fn is_up(&self, i: usize) -> bool {
        self.nodes.borrow()[i].child.is_some()
    }

    /// Starts node `i` and waits until it listens.
    async fn start(&self, i: usize) -> Result<(), String> {
        let (addr, id) = {
            let nodes = self.nodes.borrow();
            (nodes[i].addr, nodes[i].id.clone())
        };
        let mut command = tokio::process::Command::new(&self.exe);
        match &self.tls {
            Some((cert, key)) => command
                .env("TETHER_HUB_TLS_CERT", cert)
                .env("TETHER_HUB_TLS_KEY", key),
            None => command
                .env_remove("TETHER_HUB_TLS_CERT")
                .env_remove("TETHER_HUB_TLS_KEY"),
        };
        let child = command
            .arg("--serve-hub")
            .arg(addr.to_string())
            .arg("--node-id")
            .arg(&id)
            .args(&self.common)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start hub {id}: {e}"))?;
        self.nodes.borrow_mut()[i].child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            let exited = self.nodes.borrow_mut()[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.nodes.borrow_mut()[i].child = None;
                return Err(format!("hub {id} exited at start: {status}"));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("hub {id} did not listen on {addr} within 15 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops node `i`: SIGKILL, or SIGINT and a graceful stop (SIGKILL after 5 s).
    async fn stop(&self, i: usize, graceful: bool) {
        let child = self.nodes.borrow_mut()[i].child.take();
        let Some(mut child) = child else {
            return;
        };
        if graceful {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) with a pid of our own child and a valid signal number.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = child.kill().await;
    }

    /// The next node to restart or kill (round robin).
    fn victim(&self) -> usize {
        let i = self.next_victim.get();
        self.next_victim.set((i + 1) % self.nodes.borrow().len());
        i
    }
}

/// The hubs of a run.
enum Hubs {
    /// One hub in this process (its channel service survives restarts).
    Embedded {
        hub: RefCell<Option<HubHandle>>,
        config: Box<HubConfig>,
    },
    /// Hub processes.
    Processes(Nodes),
    /// A hub elsewhere (`--hub-url`): only network faults.
    External,
}

impl Hubs {
    /// Stops a hub (graceful) or kills one (SIGKILL), waits `down`, starts it again. `false`
    /// when the hub did not come back.
    async fn bounce(&self, kill: bool, down: Duration) -> bool {
        match self {
            Hubs::Embedded { hub, config } => {
                let running = hub.borrow_mut().take();
                if let Some(running) = running {
                    running.stop().await;
                }
                tokio::time::sleep(down).await;
                match Hub::start(HubConfig::clone(config)) {
                    Ok(h) => {
                        *hub.borrow_mut() = Some(h);
                        true
                    }
                    Err(e) => {
                        eprintln!("soak: the hub did not come back: {e}");
                        false
                    }
                }
            }
            Hubs::Processes(nodes) => {
                let victim = nodes.victim();
                if !nodes.is_up(victim) {
                    // Another fault has this node down already (overlapping schedules).
                    return true;
                }
                nodes.stop(victim, !kill).await;
                tokio::time::sleep(down).await;
                match nodes.start(victim).await {
                    Ok(()) => true,
                    Err(e) => {
                        eprintln!("soak: a hub node did not come back: {e}");
                        false
                    }
                }
            }
            Hubs::External => true,
        }
    }

    async fn stop_all(&self) {
        match self {
            Hubs::Embedded { hub, .. } => {
                let running = hub.borrow_mut().take();
                if let Some(running) = running {
                    running.stop().await;
                }
            }
            Hubs::Processes(nodes) => {
                let n = nodes.nodes.borrow().len();
                for i in 0..n {
                    nodes.stop(i, true).await;
                }
            }
            Hubs::External => {}
        }
    }
}

/// Waits until every client's channel is attached.
async fn wait_attached(clients: &[Rc<Client>], within: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    for (i, c) in clients.iter().enumerate() {
        loop {
            let state = c.channel.status().await.map_err(|e| e.to_string())?.state;
            if state == "attached" {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "client {i}: channel still {state} after {within:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Fires one fault kind every `spec.every` until `stop`.
#[allow(clippy::too_many_arguments)]
async fn inject(
    spec: FaultSpec,
    mut stop: tokio::sync::watch::Receiver<bool>,
    proxies: Vec<Rc<FaultProxy>>,
    hubs: Rc<Hubs>,
    timeline: Rc<RefCell<Timeline>>,
    start: Instant,
    idle: Duration,
    restart_down: Duration,
    restart_failures: Rc<Cell<u64>>,
) {
    let mut tick = tokio::time::interval(spec.every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        timeline.borrow_mut().fault(start.elapsed(), spec.kind);
        tracing::info!(fault = spec.kind.name(), "injecting");
        match spec.kind {
            FaultKind::Cut => {
                for proxy in &proxies {
                    proxy.cut_all();
                }
            }
            FaultKind::Stall => {
                for proxy in &proxies {
                    proxy.stall_all();
                }
                // Both ends give up on a stalled connection within the idle timeout; then
                // release the proxies' side of it.
                let proxies = proxies.clone();
                actix_rt::spawn(async move {
                    tokio::time::sleep(idle * 2).await;
                    for proxy in &proxies {
                        proxy.cut_stalled();
                    }
                });
            }
            FaultKind::Refuse(d) => {
                for proxy in &proxies {
                    proxy.refuse_for(d);
                    proxy.cut_all();
                }
            }
            FaultKind::Latency(d) => {
                for proxy in &proxies {
                    proxy.set_latency(d);
                }
                tokio::time::sleep((spec.every / 2).min(Duration::from_secs(2))).await;
                for proxy in &proxies {
                    proxy.set_latency(Duration::ZERO);
                }
            }
            FaultKind::Restart | FaultKind::KillNode => {
                if !hubs
                    .bounce(spec.kind == FaultKind::KillNode, restart_down)
                    .await
                {
                    restart_failures.set(restart_failures.get() + 1);
                }
            }
        }
    }
}
