//! The soak tool: a hub, N clients on K channels publishing at a rate, faults injected through
//! the fault proxy (and the hub itself), and a report computed from a full log of every message.
//!
//! ```text
//! cargo run --release --example soak                        # 60 s, default faults, embedded hub
//! cargo run --release --example soak -- --clients 200 --channels 20 --rate 2000 \
//!     --duration 300 --faults cut@5s,stall@17s,restart@31s --json soak.json --svg soak.svg
//! ```
//!
//! Exit status: 0 when nothing was lost, duplicated or reordered; 1 otherwise; 2 when the run
//! could not be set up.
//!
//! The embedded hub keeps its channel history across `restart` faults (the restart stops and
//! starts the server: every connection drops, connects are refused while it is down), which is
//! what a hub with a durable history store does. A hub that loses its history is a different
//! promise — a reported `Discontinuity`, covered by the integration tests.

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
use tether_channels::hub::{ChannelService, Retention};
use tether_channels::{BufferLimits, Channel, ChannelEvent, ChannelOptions};
use tether_examples::soak::faults::{parse_duration, parse_faults, FaultKind, FaultSpec};
use tether_examples::soak::ledger::Ledger;
use tether_examples::soak::report::Report;
use tether_examples::soak::resources;
use tether_examples::soak::timeline::{Percentiles, Timeline, Transition};
use tether_integration_tests::harness::free_addr;
use tether_integration_tests::FaultProxy;
use tether_transport::hub::{Hub, HubConfig, HubHandle};
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
    /// Faults: comma list of KIND@EVERY, KIND one of cut, stall, restart, refuse:DURATION,
    /// latency:DURATION. Empty for none.
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
    /// How long the hub stays down on a restart fault.
    #[arg(long, default_value = "1s")]
    restart_down: String,
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

    // The hub (embedded unless --hub-url), always behind the fault proxy.
    let hub_addr = free_addr();
    let service = ChannelService::builder()
        .retention(Retention {
            max_messages: 1_000_000,
            ..Retention::default()
        })
        .build()?;
    let hub_config = HubConfig::builder()
        .bind(hub_addr)
        .workers(1)
        .heartbeat(heartbeat, idle)
        .handler(Arc::new(service))
        .build()?;
    let (upstream, path, hub) = match &args.hub_url {
        Some(url) => {
            let (addr, path) = upstream_of(url)?;
            (addr, path, None)
        }
        None => (
            hub_addr,
            hub_config.ws_path.clone(),
            Some(Hub::start(hub_config.clone())?),
        ),
    };
    let hub: Rc<RefCell<Option<HubHandle>>> = Rc::new(RefCell::new(hub));
    let proxy = Rc::new(FaultProxy::start(upstream)?);
    let url = format!("ws://{}{}", proxy.local_addr(), path);

    // Clients, each recording its transitions and deliveries.
    let ledger = Rc::new(RefCell::new(Ledger::new(
        (0..args.clients)
            .map(|i| (i % args.channels) as usize)
            .collect(),
    )));
    let timeline = Rc::new(RefCell::new(Timeline::new()));
    let mut clients = Vec::new();
    for i in 0..args.clients {
        let config = TransportConfig::builder(url.clone())
            .heartbeat(heartbeat, idle)
            .seed(args.seed.wrapping_add(u64::from(i)))
            .build()?;
        let (transport, mut states) = Transport::start_with_events(config);
        let tl = timeline.clone();
        actix_rt::spawn(async move {
            while let Some(ev) = states.recv().await {
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
                        Ok(body) => ledger.borrow_mut().delivered(i, body.p, body.s),
                        Err(e) => tracing::error!(%e, "foreign payload on a soak channel"),
                    },
                    ChannelEvent::Discontinuity(d) => {
                        tracing::warn!(from = %d.from, to = %d.to, "discontinuity");
                        ledger.borrow_mut().discontinuity();
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
        url,
        start.elapsed().as_secs_f64(),
        duration.as_secs_f64(),
        args.faults
    );

    // The measured run: publishing and faults.
    let run_start = start.elapsed();
    let cpu_start = resources::cpu_time();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut fault_tasks = Vec::new();
    for spec in faults.iter().copied() {
        if spec.kind == FaultKind::Restart && hub.borrow().is_none() {
            eprintln!("soak: skipping {spec}: an external hub cannot be restarted from here");
            continue;
        }
        fault_tasks.push(actix_rt::spawn(inject(
            spec,
            stop.clone(),
            proxy.clone(),
            hub.clone(),
            hub_config.clone(),
            timeline.clone(),
            start,
            idle,
            restart_down,
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
                    Ok(_) => ledger.borrow_mut().acked(publisher, seq),
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
    proxy.stop_refusing();
    proxy.set_latency(Duration::ZERO);
    proxy.cut_stalled();
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
    let hub = hub.borrow_mut().take();
    if let Some(hub) = hub {
        hub.stop().await;
    }
    Ok(report)
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
    proxy: Rc<FaultProxy>,
    hub: Rc<RefCell<Option<HubHandle>>>,
    hub_config: HubConfig,
    timeline: Rc<RefCell<Timeline>>,
    start: Instant,
    idle: Duration,
    restart_down: Duration,
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
                proxy.cut_all();
            }
            FaultKind::Stall => {
                proxy.stall_all();
                // Both ends give up on a stalled connection within the idle timeout; then
                // release the proxy's side of it.
                let proxy = proxy.clone();
                actix_rt::spawn(async move {
                    tokio::time::sleep(idle * 2).await;
                    proxy.cut_stalled();
                });
            }
            FaultKind::Refuse(d) => {
                proxy.refuse_for(d);
                proxy.cut_all();
            }
            FaultKind::Latency(d) => {
                proxy.set_latency(d);
                tokio::time::sleep((spec.every / 2).min(Duration::from_secs(2))).await;
                proxy.set_latency(Duration::ZERO);
            }
            FaultKind::Restart => {
                let running = hub.borrow_mut().take();
                if let Some(running) = running {
                    running.stop().await;
                }
                tokio::time::sleep(restart_down).await;
                match Hub::start(hub_config.clone()) {
                    Ok(h) => *hub.borrow_mut() = Some(h),
                    Err(e) => tracing::error!(%e, "hub did not come back"),
                }
            }
        }
    }
}
