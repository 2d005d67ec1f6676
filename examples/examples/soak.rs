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
//! As a deployment gate: `--slo uptime=0.99,recovery_p99=2s,ack_p99=500ms` names objectives the
//! run must meet. `--client-procs P` spreads the clients over P processes of this binary (one
//! ledger, one report: they send what they observe back as JSON lines). `--hub-url wss://…
//! --token T` aims the clients at a real deployment (no local hub, no fault proxy) and reads
//! its `/metrics` at the start and the end.
//!
//! Exit status: 0 when nothing was silently lost, duplicated or reordered (and, where history
//! is durable, no discontinuity was reported) and every `--slo` objective was met; 1 when
//! something was lost, duplicated or reordered or the run did not finish its work; 3 when the
//! run was correct but missed an objective; 2 when the run could not be set up; 4 when the
//! hub refused the clients' credentials (a wrong or missing `--token`): the run stops at once.
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
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::{Deserialize, Serialize};
use tether_channels::hub::{ChannelService, RedisStore, Retention};
use tether_channels::{BufferLimits, Channel, ChannelEvent, ChannelOptions};
use tether_examples::soak::clock::{monotonic_nanos, since};
use tether_examples::soak::faults::{parse_duration, parse_faults, FaultKind, FaultSpec};
use tether_examples::soak::metrics::{self, HubMetrics};
use tether_examples::soak::record::{Collector, Record};
use tether_examples::soak::report::Report;
use tether_examples::soak::resources;
use tether_examples::soak::slo::{evaluate, parse_slo};
use tether_examples::soak::timeline::Percentiles;
use tether_integration_tests::harness::free_addr;
use tether_integration_tests::process::die_with_parent;
use tether_integration_tests::{FaultProxy, RedisServer, TestCert};
use tether_transport::hub::{Hub, HubConfig, HubConfigBuilder, HubHandle};
use tether_transport::protocol::Payload;
use tether_transport::{Transport, TransportConfig, TransportConfigBuilder};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const DEFAULT_FAULTS: &str = "cut@5s,latency:100ms@7s,stall@13s,refuse:1s@19s,restart@29s";

/// Load and chaos test for Tether: measures uptime, recovery time, latency, loss and speed.
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
    /// --hub-nodes), refuse:DURATION, latency:DURATION. Empty for none. Default: a mix of every
    /// kind the embedded hub allows; none with --hub-url.
    #[arg(long)]
    faults: Option<String>,
    /// Seed for client jitter and payload padding.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Aim every client at this deployment (ws://… or wss://…) instead of a local hub: no fault
    /// proxy, no local hub (so no fault can be injected), and its /metrics is read at the start
    /// and the end of the run.
    #[arg(long)]
    hub_url: Option<String>,
    /// The token clients present in their handshake (for --hub-url deployments that require
    /// one).
    #[arg(long)]
    token: Option<String>,
    /// The hub's admin token, for the `drop` fault against --hub-url (the deployment's
    /// `TETHER_HUB_ADMIN_TOKEN`); the embedded hub gets one of its own.
    #[arg(long)]
    admin_token: Option<String>,
    /// A PEM file of CA certificates to trust for wss:// besides the built-in roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Service-level objectives the run must meet, e.g.
    /// `uptime=0.99,recovery_p99=2s,ack_p99=500ms,cut.recovery_p99=500ms`; exit status 3 and
    /// the missed objectives named when one is not.
    #[arg(long)]
    slo: Option<String>,
    /// Spread the clients over this many child processes (0: every client in this process).
    #[arg(long, default_value_t = 0)]
    client_procs: u32,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the recovery histogram, connection timeline and latency over time as SVG here.
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
    /// Internal: run clients `first..first + count` and report them on stdout (how
    /// `--client-procs` starts its processes).
    #[arg(long, hide = true)]
    client_role: bool,
    /// Internal: the first client of a client process.
    #[arg(long, hide = true, default_value_t = 0)]
    first: u32,
    /// Internal: how many clients a client process runs.
    #[arg(long, hide = true, default_value_t = 0)]
    count: u32,
    /// Internal: the endpoints a client process connects to.
    #[arg(long = "url", hide = true)]
    urls: Vec<String>,
    /// Internal: the run's id, part of every client id (`soak-{run}-{i}`).
    #[arg(long, hide = true, default_value = "")]
    run_id: String,
}

/// The soak payload: publisher, sequence, the publisher's monotonic clock at the publish call
/// (nanoseconds), padding.
#[derive(Serialize, Deserialize)]
struct Body {
    p: u32,
    s: u64,
    t: u64,
    #[serde(default)]
    x: String,
}

struct Client {
    /// Global index (the publisher id).
    id: u32,
    transport: Transport,
    channel: Channel,
    next_seq: Cell<u64>,
}

/// Where clients' observations go: straight into the run's collector, or (in a client
/// process) one JSON line each on stdout, flushed every few milliseconds.
#[derive(Clone)]
enum Sink {
    Local(Rc<RefCell<Collector>>),
    Pipe(Rc<RefCell<std::io::BufWriter<std::io::Stdout>>>),
}

impl Sink {
    fn emit(&self, record: Record) {
        match self {
            Sink::Local(collector) => {
                if let Err(e) = collector.borrow_mut().apply(record) {
                    tracing::error!(%e, "record not applied");
                }
            }
            Sink::Pipe(out) => {
                let mut out = out.borrow_mut();
                // A parent that went away ends this process anyway (die_with_parent).
                let _ = serde_json::to_writer(&mut *out, &record);
                let _ = out.write_all(b"\n");
            }
        }
    }

    /// A control line (client processes only).
    fn control(&self, line: &str) {
        if let Sink::Pipe(out) = self {
            let mut out = out.borrow_mut();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// The hub refused a client's credentials (`auth_rejected` / `auth_required`): the soak stops
/// at once with exit status 4 instead of measuring an outage nothing can end.
#[derive(Debug)]
struct AuthRefused(String);

impl std::fmt::Display for AuthRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the hub refused the clients' credentials ({}): check --token (and --ca-file)",
            self.0
        )
    }
}

impl std::error::Error for AuthRefused {}

/// The control line a client process sends before it exits on [`AuthRefused`].
const AUTH_REFUSED: &str = "auth-refused";

/// Exit status of a run whose clients the hub refused.
const EXIT_AUTH_REFUSED: u8 = 4;

/// How clients connect.
struct ClientSettings {
    urls: Vec<String>,
    channels: u32,
    heartbeat: Duration,
    idle: Duration,
    seed: u64,
    token: Option<String>,
    ca_file: Option<PathBuf>,
    cert: Option<TestCert>,
    /// The run's id: client `i` is `soak-{run}-{i}` (what the `drop` fault names).
    run: String,
}

/// The client id of client `i` of run `run`.
fn client_id(run: &str, i: u32) -> String {
    format!("soak-{run}-{i}")
}

impl ClientSettings {
    /// The transport configuration of client `i`.
    fn config(&self, i: u32) -> Result<TransportConfig, Box<dyn std::error::Error>> {
        // Every client knows every node, starting with its own (spreads the load).
        let first = i as usize % self.urls.len();
        let mut builder = TransportConfig::builder(self.urls[first].clone());
        for k in 1..self.urls.len() {
            builder = builder.endpoint(self.urls[(first + k) % self.urls.len()].clone());
        }
        builder = self.trust(builder).client_id(client_id(&self.run, i));
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        Ok(builder
            .heartbeat(self.heartbeat, self.idle)
            .seed(self.seed.wrapping_add(u64::from(i)))
            .build()?)
    }

    fn trust(&self, mut builder: TransportConfigBuilder) -> TransportConfigBuilder {
        if let Some(cert) = &self.cert {
            builder = cert.trust(builder);
        }
        if let Some(file) = &self.ca_file {
            builder = builder.tls_ca_file(file.clone());
        }
        builder
    }
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
    if args.client_role {
        return match client_role(&args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("soak client process {}: {e}", args.first);
                ExitCode::from(if e.is::<AuthRefused>() {
                    EXIT_AUTH_REFUSED
                } else {
                    2
                })
            }
        };
    }
    match run(args).await {
        Ok(report) if !report.passed() => ExitCode::from(1),
        Ok(report) if !report.slo_met() => ExitCode::from(3),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) if e.is::<AuthRefused>() => {
            eprintln!("soak: {e}");
            ExitCode::from(EXIT_AUTH_REFUSED)
        }
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::from(2)
        }
    }
}

/// Opens clients `first..first + count`, each recording its transitions and deliveries.
async fn start_clients(
    first: u32,
    count: u32,
    settings: &ClientSettings,
    sink: &Sink,
) -> Result<Vec<Rc<Client>>, Box<dyn std::error::Error>> {
    let mut clients = Vec::new();
    for i in first..first + count {
        let (transport, mut states) = Transport::start_with_events(settings.config(i)?);
        let states_sink = sink.clone();
        actix_rt::spawn(async move {
            while let Some(event) = states.recv().await {
                // After a lag the latest transition says where the client is from then on.
                let ev = event.transition();
                states_sink.emit(Record::Transition {
                    mono: monotonic_nanos(),
                    client: i,
                    from: ev.from.as_str().to_owned(),
                    to: ev.to.as_str().to_owned(),
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
        let (channel, mut events) = Channel::open(
            &transport,
            format!("soak-{}", i % settings.channels),
            options,
        )
        .await?;
        let events_sink = sink.clone();
        actix_rt::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    ChannelEvent::Message(m) => match m.payload.decode::<Body>() {
                        Ok(body) => events_sink.emit(Record::Delivered {
                            subscriber: i,
                            publisher: body.p,
                            seq: body.s,
                            epoch: m.epoch.to_string(),
                            mono: monotonic_nanos(),
                            latency_us: since(body.t).as_micros() as u64,
                        }),
                        Err(e) => tracing::error!(%e, "foreign payload on a soak channel"),
                    },
                    ChannelEvent::Discontinuity(d) => {
                        tracing::warn!(from = %d.from, to = %d.to, "discontinuity");
                        events_sink.emit(Record::Discontinuity {
                            subscriber: i,
                            from: (d.from.epoch.to_string(), d.from.offset.0),
                            to: (d.to.epoch.to_string(), d.to.offset.0),
                        });
                    }
                }
            }
        });
        clients.push(Rc::new(Client {
            id: i,
            transport,
            channel,
            next_seq: Cell::new(0),
        }));
    }
    Ok(clients)
}

/// Publishes round robin over `clients` at `rate` per second for `duration`.
async fn publish(
    clients: &[Rc<Client>],
    rate: f64,
    duration: Duration,
    payload: usize,
    sink: &Sink,
) -> Result<(), Box<dyn std::error::Error>> {
    if clients.is_empty() {
        tokio::time::sleep(duration).await;
        return Ok(());
    }
    let pad = "x".repeat(payload.saturating_sub(44));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut owed = 0.0f64;
    let mut next_client = 0usize;
    let deadline = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < deadline {
        tick.tick().await;
        owed += rate / 100.0;
        while owed >= 1.0 {
            owed -= 1.0;
            let client = clients[next_client].clone();
            next_client = (next_client + 1) % clients.len();
            let publisher = client.id;
            let seq = client.next_seq.get() + 1;
            client.next_seq.set(seq);
            let sent = monotonic_nanos();
            let payload = Payload::from_value(&Body {
                p: publisher,
                s: seq,
                t: sent,
                x: pad.clone(),
            })?;
            sink.emit(Record::Published);
            let ack = client.channel.publish_payload(payload);
            let sink = sink.clone();
            actix_rt::spawn(async move {
                match ack.await {
                    Ok(ack) => sink.emit(Record::Acked {
                        publisher,
                        seq,
                        at: ack.offset.zip(ack.epoch).map(|(o, e)| (e.to_string(), o.0)),
                        mono: monotonic_nanos(),
                        latency_us: since(sent).as_micros() as u64,
                    }),
                    Err(e) => {
                        tracing::warn!(%e, publisher, seq, "publish failed");
                        sink.emit(Record::Failed);
                    }
                }
            });
        }
    }
    Ok(())
}

/// The `--client-role` mode: clients `first..first + count`, their observations on stdout,
/// commands on stdin (`run SECONDS`, `nudge`, `close`).
async fn client_role(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    die_with_parent();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let idle = Duration::from_millis(args.idle_timeout_ms.max(40));
    let settings = ClientSettings {
        urls: args.urls.clone(),
        channels: args.channels.max(1),
        heartbeat: idle / 4,
        idle,
        seed: args.seed,
        token: args.token.clone(),
        ca_file: args.ca_file.clone(),
        cert: None,
        run: args.run_id.clone(),
    };
    if settings.urls.is_empty() {
        return Err("a client process needs --url".into());
    }
    let out = Rc::new(RefCell::new(std::io::BufWriter::with_capacity(
        1 << 16,
        std::io::stdout(),
    )));
    let sink = Sink::Pipe(out.clone());
    // Records leave in batches, at most a few milliseconds late (their times are in them).
    let flusher = out.clone();
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        loop {
            tick.tick().await;
            let _ = flusher.borrow_mut().flush();
        }
    });
    let clients = start_clients(args.first, args.count, &settings, &sink).await?;
    match wait_attached(&clients, Duration::from_secs(120)).await {
        Ok(()) => sink.control("ready"),
        Err(e) => {
            if let Some(AuthRefused(why)) = e.downcast_ref::<AuthRefused>() {
                sink.control(&format!("{AUTH_REFUSED} {why}"));
            }
            return Err(e);
        }
    }
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = commands.next_line().await? {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("run"), Some(seconds)) => {
                let duration = Duration::from_secs_f64(seconds.parse()?);
                publish(&clients, args.rate, duration, args.payload, &sink).await?;
                sink.control("ran");
            }
            (Some("nudge"), None) => {
                for c in &clients {
                    let _ = c.transport.reconnect_now().await;
                }
            }
            (Some("close"), None) => break,
            _ => return Err(format!("unknown command {line:?}").into()),
        }
    }
    for c in &clients {
        c.transport.close().await;
    }
    // The last records (the closing transitions) before the final word.
    tokio::task::yield_now().await;
    sink.control("closed");
    Ok(())
}

/// A client process of the run, seen from the parent.
struct ClientProc {
    name: String,
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    controls: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl ClientProc {
    /// Starts `current_exe() --client-role …`; its records go into `collector`.
    fn spawn(
        name: String,
        args: Vec<String>,
        collector: Rc<RefCell<Collector>>,
    ) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start {name}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let (tx, controls) = tokio::sync::mpsc::unbounded_channel();
        let who = name.clone();
        actix_rt::spawn(async move {
            let mut lines = BufReader::with_capacity(1 << 16, stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with('{') {
                    let applied = serde_json::from_str::<Record>(&line)
                        .map_err(|e| e.to_string())
                        .and_then(|r| collector.borrow_mut().apply(r));
                    if let Err(e) = applied {
                        eprintln!("soak: {who} sent a bad record ({e}): {line}");
                    }
                } else if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(ClientProc {
            name,
            child,
            stdin,
            controls,
        })
    }

    async fn send(&mut self, command: &str) -> Result<(), String> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| format!("{}: {e}", self.name))
    }

    /// Waits up to `within` for the control line `word`; [`AuthRefused`] when the process
    /// says the hub refused its clients.
    async fn expect(
        &mut self,
        word: &str,
        within: Duration,
    ) -> Result<(), Box<dyn std::error::Error>> {
        match tokio::time::timeout(within, self.controls.recv()).await {
            Ok(Some(line)) if line == word => Ok(()),
            Ok(Some(line)) if line.starts_with(AUTH_REFUSED) => Err(Box::new(AuthRefused(
                line[AUTH_REFUSED.len()..].trim().to_owned(),
            ))),
            Ok(Some(line)) => Err(format!("{}: expected {word:?}, got {line:?}", self.name).into()),
            Ok(None) => {
                let status = self.child.wait().await.ok();
                Err(format!(
                    "{} exited before saying {word:?} (status {status:?})",
                    self.name
                )
                .into())
            }
            Err(_) => Err(format!("{}: no {word:?} within {within:?}", self.name).into()),
        }
    }
}

/// The clients of a run: here, or in client processes.
enum Fleet {
    Local(Vec<Rc<Client>>),
    Procs(Vec<ClientProc>),
}

impl Fleet {
    async fn nudge(&mut self) -> Result<(), String> {
        match self {
            Fleet::Local(clients) => {
                for c in clients.iter() {
                    let _ = c.transport.reconnect_now().await;
                }
            }
            Fleet::Procs(procs) => {
                for p in procs.iter_mut() {
                    p.send("nudge").await?;
                }
            }
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), String> {
        match self {
            Fleet::Local(clients) => {
                for c in clients.iter() {
                    c.transport.close().await;
                }
            }
            Fleet::Procs(procs) => {
                for p in procs.iter_mut() {
                    p.send("close").await?;
                }
                for p in procs.iter_mut() {
                    p.expect("closed", Duration::from_secs(60))
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = p.child.wait().await;
                }
            }
        }
        Ok(())
    }
}

/// Why `--hub-url` and these faults cannot go together, if they cannot.
fn faults_for_external_hub(faults: &[FaultSpec], admin: bool) -> Result<(), String> {
    if let Some(drop) = faults.iter().find(|f| f.kind == FaultKind::Drop) {
        if !admin {
            return Err(format!(
                "{drop} drops clients through the hub's admin API: give --admin-token"
            ));
        }
    }
    match faults.iter().find(|f| f.kind != FaultKind::Drop) {
        None => Ok(()),
        Some(first) => Err(format!(
            "--hub-url runs without the local fault proxy and hubs, so {} cannot be injected \
             (every fault kind needs one or the other): give --faults \"\" or leave --faults out",
            first.kind.name()
        )),
    }
}

async fn run(args: Args) -> Result<Report, Box<dyn std::error::Error>> {
    if args.clients == 0 || args.channels == 0 || args.channels > args.clients {
        return Err("need at least one client per channel (--clients ≥ --channels ≥ 1)".into());
    }
    if !(args.rate.is_finite() && args.rate >= 0.0) {
        return Err("--rate must be a non-negative number".into());
    }
    if args.client_procs > args.clients {
        return Err("--client-procs must not exceed --clients".into());
    }
    let fault_spec = args.faults.clone().unwrap_or_else(|| {
        if args.hub_url.is_some() {
            String::new()
        } else {
            DEFAULT_FAULTS.to_owned()
        }
    });
    let faults = parse_faults(&fault_spec)?;
    let objectives = parse_slo(args.slo.as_deref().unwrap_or(""))?;
    let drain = parse_duration(&args.drain)?;
    let restart_down = parse_duration(&args.restart_down)?;
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let idle = Duration::from_millis(args.idle_timeout_ms.max(40));
    let heartbeat = idle / 4;
    let start = Instant::now();
    let start_mono = monotonic_nanos();
    // The proxy holds two sockets per client, the embedded hub one more.
    let _ = rlimit::increase_nofile_limit(u64::MAX);

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
        return Err(
            "--tls makes its own certificate for its own hubs: with --hub-url give a wss:// URL \
             (and --ca-file for a private CA)"
                .into(),
        );
    }
    if args.hub_url.is_some() {
        faults_for_external_hub(&faults, args.admin_token.is_some())?;
    }
    // Client ids carry the run's id: two runs against one deployment never share sessions.
    let run_id = format!(
        "{:x}",
        monotonic_nanos() ^ (u64::from(std::process::id()) << 40)
    );
    // The embedded hub's admin API (the `drop` fault uses it).
    let embedded_admin_token = format!("soak-admin-{run_id}-{:x}", monotonic_nanos());
    // One certificate for the run, for every hub (the clients trust it).
    let tls = args.tls.then(SoakTls::new).transpose()?;
    let (hubs, urls, proxies) = match &args.hub_url {
        Some(url) => {
            metrics::metrics_url(url)?;
            (Hubs::External, vec![url.clone()], Vec::new())
        }
        None => {
            let (hubs, upstreams, path) = if args.hub_nodes == 0 {
                let base = match &tls {
                    Some(tls) => tls.cert.serve(HubConfig::builder()),
                    None => HubConfig::builder(),
                };
                let config = hub_config(
                    base.admin_token(embedded_admin_token.clone()),
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
            } else {
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
            };
            let proxies = upstreams
                .iter()
                .map(|addr| FaultProxy::start(*addr).map(Rc::new))
                .collect::<Result<Vec<_>, _>>()?;
            let scheme = if tls.is_some() { "wss" } else { "ws" };
            let urls = proxies
                .iter()
                .map(|p| format!("{scheme}://{}{}", p.local_addr(), path))
                .collect();
            (hubs, urls, proxies)
        }
    };
    let hubs = Rc::new(hubs);
    let settings = ClientSettings {
        urls: urls.clone(),
        channels: args.channels,
        heartbeat,
        idle,
        seed: args.seed,
        token: args.token.clone(),
        ca_file: args.ca_file.clone(),
        cert: tls.as_ref().map(|t| t.cert.clone()),
        run: run_id.clone(),
    };

    // What the deployment's counters say before the run (--hub-url).
    let scrape_target = match &args.hub_url {
        Some(url) => {
            let tls = settings.config(0)?.tls.rustls_config().cloned();
            Some((metrics::metrics_url(url)?, tls))
        }
        None => None,
    };
    let counters_before = match &scrape_target {
        Some((url, tls)) => Some(metrics::scrape(url, tls.clone()).await),
        None => None,
    };

    // Clients, each recording its transitions and deliveries: here, or in client processes.
    let collector = Rc::new(RefCell::new(Collector::new(
        (0..args.clients)
            .map(|i| (i % args.channels) as usize)
            .collect(),
        start_mono,
    )));
    let mut fleet = if args.client_procs == 0 {
        let sink = Sink::Local(collector.clone());
        let clients = start_clients(0, args.clients, &settings, &sink).await?;
        wait_attached(&clients, Duration::from_secs(30)).await?;
        Fleet::Local(clients)
    } else {
        let procs = args.client_procs;
        let mut children = Vec::new();
        for k in 0..procs {
            let first = (u64::from(args.clients) * u64::from(k) / u64::from(procs)) as u32;
            let next = (u64::from(args.clients) * u64::from(k + 1) / u64::from(procs)) as u32;
            let count = next - first;
            let mut child_args = vec![
                "--client-role".to_owned(),
                format!("--first={first}"),
                format!("--count={count}"),
                format!("--clients={}", args.clients),
                format!("--channels={}", args.channels),
                format!(
                    "--rate={}",
                    args.rate * f64::from(count) / f64::from(args.clients)
                ),
                format!("--payload={}", args.payload),
                format!("--seed={}", args.seed),
                format!("--idle-timeout-ms={}", args.idle_timeout_ms),
                format!("--run-id={run_id}"),
            ];
            child_args.extend(urls.iter().map(|u| format!("--url={u}")));
            if let Some(token) = &args.token {
                child_args.push(format!("--token={token}"));
            }
            if let Some(file) = &args.ca_file {
                child_args.push(format!("--ca-file={}", file.display()));
            }
            if let Some(tls) = &tls {
                child_args.push(format!("--ca-file={}", tls.files.0.display()));
            }
            children.push(ClientProc::spawn(
                format!("client process {k}"),
                child_args,
                collector.clone(),
            )?);
        }
        for child in &mut children {
            child.expect("ready", Duration::from_secs(180)).await?;
        }
        Fleet::Procs(children)
    };
    println!(
        "soak: {} clients{} attached to {} channels through {} ({:.1} s); running {:.0} s with faults [{}]",
        args.clients,
        match args.client_procs {
            0 => String::new(),
            n => format!(" in {n} processes"),
        },
        args.channels,
        urls.join(", "),
        start.elapsed().as_secs_f64(),
        duration.as_secs_f64(),
        fault_spec
    );

    // The measured run: publishing and faults.
    let run_start = collector.borrow().since_start(monotonic_nanos());
    let cpu_start = resources::cpu_time();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut fault_tasks = Vec::new();
    let restart_failures = Rc::new(Cell::new(0u64));
    let admin = match (hubs.as_ref(), &args.hub_url) {
        (Hubs::Embedded { config, .. }, _) => Some(Rc::new(AdminHook {
            base: format!(
                "{}://{}",
                if tls.is_some() { "https" } else { "http" },
                config.bind
            ),
            token: embedded_admin_token.clone(),
            tls: settings.config(0)?.tls.rustls_config().cloned(),
            run: run_id.clone(),
            clients: args.clients,
        })),
        (Hubs::External, Some(url)) => args.admin_token.as_ref().map(|token| {
            Rc::new(AdminHook {
                base: metrics::http_base(url).unwrap_or_default(),
                token: token.clone(),
                tls: scrape_target.as_ref().and_then(|(_, tls)| tls.clone()),
                run: run_id.clone(),
                clients: args.clients,
            })
        }),
        _ => None,
    };
    for spec in faults.iter().copied() {
        let runs = match (spec.kind, hubs.as_ref()) {
            (FaultKind::KillNode, Hubs::Embedded { .. }) => {
                Err("kill-node needs hub processes (--hub-nodes N)")
            }
            (FaultKind::Drop, _) if admin.is_none() => {
                Err("drop needs the hub's admin API (the embedded hub, or --hub-url with --admin-token)")
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
            collector.clone(),
            idle,
            restart_down,
            restart_failures.clone(),
            admin.clone(),
        )));
    }
    match &mut fleet {
        Fleet::Local(clients) => {
            let sink = Sink::Local(collector.clone());
            publish(clients, args.rate, duration, args.payload, &sink).await?;
        }
        Fleet::Procs(procs) => {
            for p in procs.iter_mut() {
                p.send(&format!("run {}", duration.as_secs_f64())).await?;
            }
            for p in procs.iter_mut() {
                p.expect("ran", duration + Duration::from_secs(60)).await?;
            }
        }
    }
    let _ = stop_tx.send(true);
    let run_end = collector.borrow().since_start(monotonic_nanos());
    let cpu_used = resources::cpu_time().saturating_sub(cpu_start);
    let delivered_in_run = collector.borrow().ledger.totals().delivered;
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
    fleet.nudge().await?;
    let drain_deadline = tokio::time::Instant::now() + drain;
    let mut drained = false;
    while tokio::time::Instant::now() < drain_deadline {
        let (totals, outstanding) = {
            let c = collector.borrow();
            (c.ledger.totals(), c.ledger.outstanding())
        };
        if totals.acked + totals.failed >= totals.published && outstanding == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late duplicates would show up right after the drain: give them a moment to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for line in collector.borrow().ledger.silent_losses(10) {
        eprintln!("soak: {line}");
    }
    if let (false, Fleet::Local(clients)) = (drained, &fleet) {
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
    let hub_metrics = match (&scrape_target, counters_before) {
        (Some((url, tls)), Some(before)) => {
            let after = metrics::scrape(url, tls.clone()).await;
            Some(match (before, after) {
                (Ok(before), Ok(after)) => HubMetrics {
                    url: url.clone(),
                    counter_deltas: metrics::deltas(&before, &after),
                    error: None,
                },
                (Err(e), _) | (_, Err(e)) => HubMetrics {
                    url: url.clone(),
                    error: Some(e),
                    ..HubMetrics::default()
                },
            })
        }
        _ => None,
    };

    let report = {
        let c = collector.borrow();
        let tl = &c.timeline;
        // A loss belongs to a fault until the clients can have noticed it (twice the idle
        // timeout) and a second more after the fault ended.
        let window = idle * 2 + Duration::from_secs(1);
        let recovery = tl.recovery_ms(args.clients);
        let attributed = tl.attributed(args.clients, window);
        let after_path: Vec<f64> = attributed.iter().filter_map(|a| a.2).collect();
        let detection = tl.detection_ms(args.clients);
        let mut fault_counts = BTreeMap::new();
        for f in tl.faults() {
            *fault_counts.entry(f.kind.name().to_owned()).or_insert(0) += 1;
        }
        let run = run_end - run_start;
        let mut report = Report {
            clients: args.clients,
            channels: args.channels,
            duration_s: run.as_secs_f64(),
            faults: fault_counts,
            totals: c.ledger.totals(),
            reconnects: tl.reconnects(args.clients),
            attempts: tl.attempts(),
            uptime_ratio: tl.uptime_ratio(args.clients, run_start, run_end),
            outages: recovery.len() as u64,
            recovery_ms: Percentiles::of(&recovery),
            outages_after_path: after_path.len() as u64,
            recovery_after_path_ms: Percentiles::of(&after_path),
            recovery_by_fault: tl.recovery_by_fault(args.clients, window),
            detections: detection.len() as u64,
            detection_ms: Percentiles::of(&detection),
            ack_samples: c.ack_latency.len() as u64,
            ack_latency_ms: c.ack_latency.percentiles(),
            delivery_samples: c.delivery_latency.len() as u64,
            delivery_latency_ms: c.delivery_latency.percentiles(),
            throughput_msgs_per_s: delivered_in_run as f64 / run.as_secs_f64(),
            cpu_percent: 100.0 * cpu_used.as_secs_f64() / run.as_secs_f64(),
            rss_max_mib: resources::peak_rss_mib(),
            drained,
            fault_spec: fault_spec.clone(),
            seed: args.seed,
            store: store.name().to_owned(),
            hub_nodes: args.hub_nodes,
            continuity_expected: !(store == StoreChoice::Memory && args.hub_nodes > 0),
            hub_restart_failures: restart_failures.get(),
            tls: tls.is_some()
                || args
                    .hub_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("wss://")),
            client_procs: args.client_procs,
            hub_url: args.hub_url.clone(),
            hub_metrics,
            slo: Vec::new(),
        };
        report.slo = evaluate(&objectives, &report);
        print!("{}", report.text());
        for missed in report.slo.iter().filter(|o| !o.met) {
            eprintln!("soak: SLO missed: {missed}");
        }
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        }
        if let Some(path) = &args.svg {
            let series = tl.connected_series(args.clients, Duration::from_millis(100), run_end);
            let second = Duration::from_secs(1);
            std::fs::write(
                path,
                report.svg(
                    &recovery,
                    &series,
                    tl.faults(),
                    &c.ack_latency.series(second),
                    &c.delivery_latency.series(second),
                ),
            )?;
        }
        report
    };

    fleet.close().await?;
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

/// Waits until every client's channel is attached. A transport that failed permanently ends
/// the wait at once: [`AuthRefused`] when the hub refused its credentials, an error naming the
/// failure otherwise (retrying cannot help either way).
async fn wait_attached(
    clients: &[Rc<Client>],
    within: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = tokio::time::Instant::now() + within;
    for (i, c) in clients.iter().enumerate() {
        loop {
            let state = c.channel.status().await.map_err(|e| e.to_string())?.state;
            if state == "attached" {
                break;
            }
            let status = c.transport.status().await?;
            if status.state == tether_transport::ConnectionState::Failed {
                let (category, message) = status
                    .last_error
                    .map(|e| (e.category, e.message))
                    .unwrap_or((tether_transport::ErrorCategory::Service, "unknown".into()));
                if category == tether_transport::ErrorCategory::Auth {
                    return Err(Box::new(AuthRefused(format!("client {}: {message}", c.id))));
                }
                return Err(format!(
                    "client {}: the transport failed permanently: {message}",
                    c.id
                )
                .into());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("client {i}: channel still {state} after {within:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// What the `drop` fault needs: the hub's admin API and the clients' ids.
struct AdminHook {
    /// `http(s)://host:port` of the hub (not through the proxy).
    base: String,
    token: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    run: String,
    clients: u32,
}

impl AdminHook {
    /// Drops the `round`-th tenth of the clients (clients `i` with `i ≡ round (mod 10)`, at
    /// least one); returns how many could not be asked.
    async fn drop_tenth(&self, round: u32) -> usize {
        let client = metrics::http_client(self.tls.clone());
        let picked: Vec<u32> = match self.clients {
            0..=9 => vec![round % self.clients.max(1)],
            n => (0..n).filter(|i| i % 10 == round % 10).collect(),
        };
        let asks = picked.iter().map(|&i| {
            let id = client_id(&self.run, i);
            let client = &client;
            async move { metrics::admin_drop(client, &self.base, &self.token, &id).await }
        });
        let failed: Vec<String> = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if let Some(first) = failed.first() {
            eprintln!(
                "soak: drop: {} of {} not dropped ({first})",
                failed.len(),
                picked.len()
            );
        }
        failed.len()
    }
}

/// Fires one fault kind every `spec.every` until `stop`, recording when it was injected and
/// when its path was available again.
#[allow(clippy::too_many_arguments)]
async fn inject(
    spec: FaultSpec,
    mut stop: tokio::sync::watch::Receiver<bool>,
    proxies: Vec<Rc<FaultProxy>>,
    hubs: Rc<Hubs>,
    collector: Rc<RefCell<Collector>>,
    idle: Duration,
    restart_down: Duration,
    restart_failures: Rc<Cell<u64>>,
    admin: Option<Rc<AdminHook>>,
) {
    let now = |c: &Rc<RefCell<Collector>>| c.borrow().since_start(monotonic_nanos());
    let mut round = 0u32;
    let mut tick = tokio::time::interval(spec.every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let at = now(&collector);
        let index = collector.borrow_mut().timeline.fault(at, spec.kind);
        let ended = |at: Duration| collector.borrow_mut().timeline.fault_ended(index, at);
        tracing::info!(fault = spec.kind.name(), "injecting");
        match spec.kind {
            FaultKind::Cut => {
                for proxy in &proxies {
                    proxy.cut_all();
                }
                // The proxy accepts new connections at once.
                ended(at);
            }
            FaultKind::Stall => {
                for proxy in &proxies {
                    proxy.stall_all();
                }
                // New connections flow at once; the stalled ones must be noticed.
                ended(at);
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
                // The proxy refuses for `d` from now.
                ended(at + d);
            }
            FaultKind::Latency(d) => {
                for proxy in &proxies {
                    proxy.set_latency(d);
                }
                tokio::time::sleep((spec.every / 2).min(Duration::from_secs(2))).await;
                for proxy in &proxies {
                    proxy.set_latency(Duration::ZERO);
                }
                ended(now(&collector));
            }
            FaultKind::Drop => {
                if let Some(admin) = &admin {
                    admin.drop_tenth(round).await;
                    round = round.wrapping_add(1);
                }
                // Nothing stands in the way of coming back.
                ended(at);
            }
            FaultKind::Restart | FaultKind::KillNode => {
                if hubs
                    .bounce(spec.kind == FaultKind::KillNode, restart_down)
                    .await
                {
                    // The hub listens again.
                    ended(now(&collector));
                } else {
                    restart_failures.set(restart_failures.get() + 1);
                }
            }
        }
    }
}
