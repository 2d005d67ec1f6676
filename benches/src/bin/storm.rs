//! Reconnect storm: N clients (each a `Transport` with one attached `Channel`) connected to a
//! hub process; the hub process is killed and restarted on the same port after `--down-secs`.
//! Measured, from the moment the new hub process is bound: the time until each client is
//! `Connected` again with its channel re-attached (`Syncing → Connected`, reason `Resynced`),
//! and the peak connect rate the hub saw (its own connection count sampled every 10 ms, busiest
//! 100 ms window).
//!
//! ```text
//! cargo run --release -p tether-benches --bin storm -- --clients 1000,10000 --down-secs 3
//! ```
//!
//! The clients live in `--client-procs` processes of their own (default 4: this binary
//! re-executed with `--role clients`, reporting every client's trace when asked), or with
//! `--client-procs 1` all in this process (one actix system, one thread); the hub is this
//! binary re-executed with `--role hub`. Every client uses the default reconnect policy (or the
//! `TETHER_RECONNECT_*` settings of the environment, to try another) and
//! heartbeat.
//!
//! Beside each measurement the tool reports the reconnect policy's recovery on its own for the
//! same losses and the same return (`policy alone`: a `ReconnectManager` per client, every
//! refused attempt, handshake and re-attach taking no time), so that what the policy costs and
//! what the hub and the clients add can be told apart in the same run.
//!
//! Why spread them: clients in one process see a hub's crash one after another on its one
//! thread — 10,000 take it about 0.6 s — so their reconnect schedules start late, and attempt
//! #3 lands after the hub's return where, in processes of their own, a share of them would
//! try while it is still down.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use actix::{Actor, Context, Handler};
use clap::Parser;
use tether_benches::multiproc::{
    self, clock_ticks_per_sec, free_loopback_addr, hub_handshakes, pace, percentile, pid_cpu_ticks,
    raise_nofile_limit, self_rusage_cpu, spawn_hub, ChildProc, Result,
};
use tether_benches::tether::client_config;
use tether_channels::{Channel, ChannelEvents, ChannelOptions, ChannelState, ChannelStateChanged};
use tether_transport::reconnect::NextStep;
use tether_transport::{
    ConnectionState, ConnectionStateChanged, ReconnectManager, ReconnectPolicy, TransitionReason,
    Transport,
};

/// Reconnect storm after a hub restart.
#[derive(Parser, Debug)]
struct Args {
    /// Client counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000usize, 10_000])]
    clients: Vec<usize>,
    /// Seconds between killing the hub process and starting the new one.
    #[arg(long, default_value_t = 3.0)]
    down_secs: f64,
    /// Seconds every client stays connected before the kill (the stability window must pass).
    #[arg(long, default_value_t = 6.0)]
    hold_secs: f64,
    /// Clients started per second during the initial ramp.
    #[arg(long, default_value_t = 2000)]
    ramp_per_sec: usize,
    /// Distinct channel names; client i attaches to `storm-{i % channels}`.
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Give up waiting for the clients (to connect, or to recover) after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout_secs: u64,
    /// Print every connection transition after the kill, counted in 250 ms bins.
    #[arg(long)]
    timeline: bool,
    /// Client processes to spread the clients over (1: all of them in this process, where
    /// their schedules start late: see the crate docs above).
    #[arg(long, default_value_t = 4)]
    client_procs: usize,
    /// Only print the reconnect policy's recovery on its own (no hub, no sockets) after an
    /// outage of each of these lengths in seconds, comma-separated, for the largest of
    /// `--clients`, every client losing its connection at the kill — to weigh a policy
    /// (`TETHER_RECONNECT_*`) before running the storm with it.
    #[arg(long, value_delimiter = ',')]
    policy_alone: Vec<f64>,
    /// Internal: the role of a helper process (`hub`, `clients`).
    #[arg(long, hide = true)]
    role: Option<String>,
    /// Internal (`--role clients`): the hub's WebSocket URL.
    #[arg(long, hide = true)]
    url: Option<String>,
    /// Internal (`--role clients`): the index of this process' first client.
    #[arg(long, hide = true, default_value_t = 0)]
    first: usize,
    /// Internal (`--role clients`): how many clients this process runs.
    #[arg(long, hide = true, default_value_t = 0)]
    count: usize,
    /// Internal: the hub child's listening address.
    #[arg(long, hide = true)]
    bind: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let limit = raise_nofile_limit();
    let args = Args::parse();
    if !args.policy_alone.is_empty() {
        return match print_policy_alone(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("storm: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // The clients' sockets are all in this process (the hub's in its own): one file each, plus
    // the runtime's, the hub child's pipes and the /health and /metrics requests.
    let most = args
        .clients
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .div_ceil(args.client_procs.max(1));
    if args.role.is_none() && (limit as usize) < most + 256 {
        eprintln!(
            "storm: {most} clients need about {} open files in this process; its limit is {limit} \
             (the soft limit is raised to the hard one; the hard one could not be raised)",
            most + 256
        );
        return ExitCode::FAILURE;
    }
    match (args.role.as_deref(), args.bind) {
        (Some("hub"), Some(bind)) => multiproc::run_hub_role(bind),
        (Some("clients"), _) => {
            let system = actix_rt::System::new();
            return match system.block_on(run_clients_role(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("storm clients: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        (Some(role), _) => {
            eprintln!("storm: unknown role {role:?} (or --bind missing)");
            return ExitCode::FAILURE;
        }
        (None, _) => {}
    }
    let system = actix_rt::System::new();
    match system.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One row of the result table.
struct Row {
    clients: usize,
    p50_ms: f64,
    p99_ms: f64,
    /// The reconnect policy's p99 on its own for the same losses and return ([`policy_alone_ms`]).
    policy_p99_ms: f64,
    max_ms: f64,
    peak_per_sec: f64,
}

/// The reconnect policy in a few words, and whether it is the default.
fn describe_policy(policy: &ReconnectPolicy) -> String {
    format!(
        "{:?} {} ms ×{} → {} s, ±{:.0} %, fast retry 0–{} ms after a stable drop ({})",
        policy.strategy,
        policy.initial_delay.as_millis(),
        policy.multiplier,
        policy.max_delay.as_secs(),
        policy.jitter * 100.0,
        policy.fast_retry_spread.as_millis(),
        if *policy == ReconnectPolicy::default() {
            "the default"
        } else {
            "NOT the default: TETHER_RECONNECT_* in the environment"
        }
    )
}

/// `--policy-alone`: the policy's own recovery after outages of the given lengths.
fn print_policy_alone(args: &Args) -> Result<()> {
    let policy = client_config("ws://127.0.0.1:1/ws")?.reconnect;
    let n = args.clients.iter().copied().max().unwrap_or(10_000);
    println!("policy: {}", describe_policy(&policy));
    println!(
        "{n} clients losing their connection at the kill; recovery = the first attempt at or \
         after the hub's return, attempts and handshakes taking no time"
    );
    println!(" hub down s | p50 ms | p99 ms | max ms | target (p99 ≤ 2 s after hub back)");
    println!("------------|--------|--------|--------|----------------------------------");
    let losses = vec![Some(Duration::ZERO); n];
    for &down in &args.policy_alone {
        let mut alone = policy_alone_ms(&policy, &losses, Duration::from_secs_f64(down), n as u64);
        alone.sort_by(f64::total_cmp);
        let p99 = percentile(&alone, 99.0);
        println!(
            "{down:>11.2} | {:>6.0} | {p99:>6.0} | {:>6.0} | {}",
            percentile(&alone, 50.0),
            alone.last().copied().unwrap_or(0.0),
            if p99 <= 2000.0 { "met" } else { "MISSED" }
        );
    }
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    println!(
        "storm: hub process killed and restarted after {:.1} s on the same port; reconnect policy \
         {}; default heartbeat; clients in {}, the hub in a child process; open-file limit {} per \
         process",
        args.down_secs,
        describe_policy(&client_config("ws://127.0.0.1:1/ws")?.reconnect),
        match args.client_procs {
            0 | 1 => format!("this process (pid {})", std::process::id()),
            k => format!("{k} client processes"),
        },
        rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(0)
    );
    println!(
        "latency = new hub bound → client's Syncing → Connected (Resynced); peak = hub child's own \
         connection count sampled every 10 ms, busiest 100 ms window"
    );
    let mut rows = Vec::new();
    for &n in &args.clients {
        rows.push(run_one(n, &args).await?);
    }
    println!();
    println!(" clients |   p50 ms |   p99 ms |   max ms | policy alone p99 ms | peak connects/s | target (p99 ≤ 2 s after hub back)");
    println!("---------|----------|----------|----------|---------------------|-----------------|----------------------------------");
    for r in &rows {
        let verdict = match (r.p99_ms <= 2000.0, r.policy_p99_ms <= 2000.0) {
            (true, _) => "met",
            (false, true) => "MISSED",
            (false, false) => "MISSED (so is it by the policy alone)",
        };
        println!(
            "{:>8} | {:>8.0} | {:>8.0} | {:>8.0} | {:>19.0} | {:>15.0} | {verdict}",
            r.clients, r.p50_ms, r.p99_ms, r.max_ms, r.policy_p99_ms, r.peak_per_sec
        );
    }
    println!(
        "policy alone: when each client's first attempt at or after the hub's return goes out \
         under the clients' reconnect policy, with refused attempts, handshakes and re-attaches \
         taking no time (a fresh ReconnectManager per client from the moment it saw the loss: \
         another draw of the jitter). What a hub with no cost would give; a measured figure can \
         be below it when load delays attempts past the return"
    );
    Ok(())
}

/// What one client went through, as its recorder saw it.
#[derive(Debug, Default, Clone)]
struct ClientTrace {
    state: Option<ConnectionState>,
    channel: Option<ChannelState>,
    /// After the kill: when the connection loss was seen.
    lost: Option<SystemTime>,
    /// After the kill: when the latest attempt (→ Connecting) began.
    attempt_started: Option<SystemTime>,
    /// After the kill: the first handshake (Connecting → Connected), with the attempt number.
    handshake: Option<(SystemTime, u32)>,
    /// After the kill: the first `Syncing → Connected` (Resynced): connected with the channel
    /// re-attached.
    recovered: Option<SystemTime>,
    /// After the kill: the channel was re-attached.
    reattached: bool,
}

#[derive(Default)]
struct Shared {
    clients: Vec<ClientTrace>,
    armed: bool,
    /// After the kill: every connection transition, for `--timeline`: when, `from → to`, and
    /// whether it was a loss (an up connection gone).
    log: Vec<(SystemTime, String, bool)>,
}

impl Shared {
    fn ready(&self) -> usize {
        self.clients
            .iter()
            .filter(|c| {
                c.state == Some(ConnectionState::Connected)
                    && c.channel == Some(ChannelState::Attached)
            })
            .count()
    }

    fn recovered(&self) -> usize {
        self.clients
            .iter()
            .filter(|c| c.recovered.is_some() && c.reattached)
            .count()
    }

    fn lost(&self) -> usize {
        self.clients.iter().filter(|c| c.lost.is_some()).count()
    }

    fn describe(&self) -> String {
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for c in &self.clients {
            let key = format!("{:?}/{:?}", c.state, c.channel);
            *states.entry(key).or_default() += 1;
        }
        format!("{states:?}")
    }
}

/// Records one client's connection and channel transitions into the shared table.
struct Recorder {
    index: usize,
    shared: Rc<RefCell<Shared>>,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<ConnectionStateChanged> for Recorder {
    type Result = ();

    fn handle(&mut self, ev: ConnectionStateChanged, _ctx: &mut Context<Self>) {
        let now = SystemTime::now();
        let mut shared = self.shared.borrow_mut();
        let armed = shared.armed;
        if armed {
            let loss = ev.from.is_up() && ev.to == ConnectionState::Disconnected;
            shared
                .log
                .push((now, format!("{} → {}", ev.from, ev.to), loss));
        }
        let c = &mut shared.clients[self.index];
        c.state = Some(ev.to);
        if !armed {
            return;
        }
        match (ev.from, ev.to) {
            (from, ConnectionState::Disconnected) if from.is_up() && c.lost.is_none() => {
                c.lost = Some(now)
            }
            (_, ConnectionState::Connecting) if c.handshake.is_none() => {
                c.attempt_started = Some(now)
            }
            (ConnectionState::Connecting, ConnectionState::Connected) if c.handshake.is_none() => {
                c.handshake = Some((now, ev.attempt))
            }
            (ConnectionState::Syncing, ConnectionState::Connected)
                if c.recovered.is_none() && ev.reason == TransitionReason::Resynced =>
            {
                c.recovered = Some(now)
            }
            _ => {}
        }
    }
}

impl Handler<ChannelStateChanged> for Recorder {
    type Result = ();

    fn handle(&mut self, ev: ChannelStateChanged, _ctx: &mut Context<Self>) {
        let mut shared = self.shared.borrow_mut();
        let armed = shared.armed;
        let c = &mut shared.clients[self.index];
        c.channel = Some(ev.to);
        if armed && ev.to == ChannelState::Attached {
            c.reattached = true;
        }
    }
}

/// One client: the transport, its channel and the channel's (unread) message stream.
struct Client {
    transport: Transport,
    _channel: Channel,
    _events: ChannelEvents,
}

/// Polls `shared` every 50 ms until `done` holds, for at most `timeout`.
async fn wait_for(
    shared: &Rc<RefCell<Shared>>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Shared) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if done(&shared.borrow()) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "not all clients {what} within {timeout:?}: {}",
                shared.borrow().describe()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Clients started in this process: their transports, channels and recorded traces.
struct Population {
    shared: Rc<RefCell<Shared>>,
    clients: Vec<Client>,
}

impl Population {
    /// Starts `count` clients of `url` at `ramp_per_sec`; client `i` (counted from `first`
    /// across all processes) attaches to `storm-{i % channels}`.
    async fn start(
        url: &str,
        first: usize,
        count: usize,
        ramp_per_sec: usize,
        channels: usize,
    ) -> Result<Population> {
        let shared = Rc::new(RefCell::new(Shared {
            clients: vec![ClientTrace::default(); count],
            armed: false,
            log: Vec::new(),
        }));
        let mut clients = Vec::with_capacity(count);
        let ramp = Instant::now();
        for index in 0..count {
            pace(ramp, index, ramp_per_sec).await;
            let recorder = Recorder {
                index,
                shared: shared.clone(),
            }
            .start();
            let config = client_config(url)?;
            let transport =
                Transport::start_with_subscribers(config, vec![recorder.clone().recipient()]);
            let (channel, events) = Channel::open_with_state(
                &transport,
                format!("storm-{}", (first + index) % channels.max(1)),
                ChannelOptions::default(),
                vec![recorder.recipient()],
            )
            .await?;
            clients.push(Client {
                transport,
                _channel: channel,
                _events: events,
            });
        }
        Ok(Population { shared, clients })
    }

    /// Closes every transport (giving up after 60 s).
    async fn close(self) {
        let closing = futures::future::join_all(self.clients.iter().map(|c| c.transport.close()));
        if tokio::time::timeout(Duration::from_secs(60), closing)
            .await
            .is_err()
        {
            println!("  (closing the transports took over 60 s; going on)");
        }
    }
}

/// Where the clients run: here, or in client processes (`--client-procs`).
enum Clients {
    Here(Population),
    Spread(Vec<ChildProc>),
}

impl Clients {
    /// Starts `n` clients of `url` and waits until every one is connected with its channel
    /// attached.
    async fn start(n: usize, url: &str, args: &Args, timeout: Duration) -> Result<Clients> {
        let procs = args.client_procs.max(1);
        if procs == 1 {
            let here = Population::start(url, 0, n, args.ramp_per_sec, args.channels).await?;
            wait_for(&here.shared, timeout, "connected and attached", |s| {
                s.ready() == n
            })
            .await?;
            return Ok(Clients::Here(here));
        }
        let mut children = Vec::with_capacity(procs);
        let mut first = 0;
        for j in 0..procs {
            let count = multiproc::share(n, procs, j);
            let role_args: Vec<String> = [
                "--role",
                "clients",
                "--url",
                url,
                "--first",
                &first.to_string(),
                "--count",
                &count.to_string(),
                "--ramp-per-sec",
                &(args.ramp_per_sec / procs).max(1).to_string(),
                "--channels",
                &args.channels.to_string(),
                "--timeout-secs",
                &args.timeout_secs.to_string(),
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            children.push(ChildProc::spawn(&format!("clients {j}"), &role_args)?);
            first += count;
        }
        for child in &mut children {
            child.expect_line("READY", timeout).await?;
        }
        Ok(Clients::Spread(children))
    }

    /// From now on, transitions count (the kill comes next).
    async fn arm(&mut self) -> Result<()> {
        match self {
            Clients::Here(here) => here.shared.borrow_mut().armed = true,
            Clients::Spread(children) => {
                for child in children.iter_mut() {
                    child.send("ARM").await?;
                }
                for child in children.iter_mut() {
                    child.expect_line("ARMED", Duration::from_secs(30)).await?;
                }
            }
        }
        Ok(())
    }

    /// CPU time the client process(es) used so far.
    fn cpu(&self) -> Duration {
        match self {
            Clients::Here(_) => self_rusage_cpu(),
            Clients::Spread(children) => {
                let ticks: u64 = children
                    .iter()
                    .filter_map(|c| c.pid())
                    .filter_map(|pid| pid_cpu_ticks(pid).ok())
                    .sum();
                Duration::from_secs_f64(ticks as f64 / clock_ticks_per_sec() as f64)
            }
        }
    }

    /// "es" when there are several client processes.
    fn plural(&self) -> &'static str {
        match self {
            Clients::Here(_) => "",
            Clients::Spread(_) => "es",
        }
    }

    /// How many clients saw the loss so far (known only here).
    fn lost(&self) -> Option<usize> {
        match self {
            Clients::Here(here) => Some(here.shared.borrow().lost()),
            Clients::Spread(_) => None,
        }
    }

    /// Waits until every client recovered (up to `timeout`) and returns their traces, with
    /// how long the wait took or why it ended early.
    async fn recover(&mut self, n: usize, timeout: Duration) -> Result<(Shared, Result<Duration>)> {
        match self {
            Clients::Here(here) => {
                let waited =
                    wait_for(&here.shared, timeout, "recovered", |s| s.recovered() == n).await;
                let shared = here.shared.borrow();
                Ok((
                    Shared {
                        clients: shared.clients.clone(),
                        armed: true,
                        log: shared.log.clone(),
                    },
                    waited,
                ))
            }
            Clients::Spread(children) => {
                let started = Instant::now();
                for child in children.iter_mut() {
                    child.send("REPORT").await?;
                }
                let mut shared = Shared {
                    armed: true,
                    ..Shared::default()
                };
                let mut short = Vec::new();
                for (j, child) in children.iter_mut().enumerate() {
                    loop {
                        let line = child
                            .next_line(timeout + Duration::from_secs(30))
                            .await?
                            .ok_or_else(|| format!("client process {j} exited before DONE"))?;
                        if let Some(rest) = line.strip_prefix("TRACE ") {
                            shared.clients.push(decode_trace(rest)?);
                        } else if let Some(rest) = line.strip_prefix("LOG ") {
                            shared.log.push(decode_log(rest)?);
                        } else if let Some(rest) = line.strip_prefix("DONE ") {
                            if !rest.trim().is_empty() {
                                short.push(format!("process {j}: {}", rest.trim()));
                            }
                            break;
                        } else {
                            eprintln!("[clients {j}] {line}");
                        }
                    }
                }
                let waited = if short.is_empty() {
                    Ok(started.elapsed())
                } else {
                    Err(short.join("; ").into())
                };
                Ok((shared, waited))
            }
        }
    }

    /// Closes the transports (here) or the client processes.
    async fn close(self) {
        match self {
            Clients::Here(here) => here.close().await,
            Clients::Spread(children) => {
                for child in children {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// `--role clients`: runs `--count` clients of `--url`, prints `READY` once every one is
/// attached; on `ARM` starts counting transitions (`ARMED`); on `REPORT` waits until every one
/// recovered (up to `--timeout-secs`), then prints a `TRACE` line per client, a `LOG` line per
/// transition and `DONE` (followed by why, when not all recovered). Ends when stdin closes.
async fn run_clients_role(args: Args) -> Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    let url = args.url.clone().ok_or("--url missing")?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let count = args.count;
    let here = Population::start(&url, args.first, count, args.ramp_per_sec, args.channels).await?;
    wait_for(&here.shared, timeout, "connected and attached", |s| {
        s.ready() == count
    })
    .await?;
    println!("READY");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "ARM" => {
                here.shared.borrow_mut().armed = true;
                println!("ARMED");
            }
            "REPORT" => {
                let waited = wait_for(&here.shared, timeout, "recovered", |s| {
                    s.recovered() == count
                })
                .await;
                let shared = here.shared.borrow();
                for c in &shared.clients {
                    println!("TRACE {}", encode_trace(c));
                }
                for (at, what, loss) in &shared.log {
                    println!("LOG {} {} {what}", nanos_of(at), u8::from(*loss));
                }
                match waited {
                    Ok(_) => println!("DONE "),
                    Err(e) => println!("DONE {e}"),
                }
            }
            _ => {}
        }
    }
    here.close().await;
    Ok(())
}

fn nanos_of(at: &SystemTime) -> u128 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A trace as one line: `lost reattached recovered handshake attempt attempt_started`, times
/// in Unix nanoseconds, `-` for none.
fn encode_trace(c: &ClientTrace) -> String {
    let time = |t: Option<SystemTime>| t.map_or("-".to_owned(), |t| nanos_of(&t).to_string());
    format!(
        "{} {} {} {} {} {}",
        time(c.lost),
        u8::from(c.reattached),
        time(c.recovered),
        time(c.handshake.map(|(t, _)| t)),
        c.handshake.map_or("-".to_owned(), |(_, a)| a.to_string()),
        time(c.attempt_started)
    )
}

fn decode_trace(line: &str) -> Result<ClientTrace> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 6 {
        return Err(format!("bad TRACE line {line:?}").into());
    }
    let time = |v: &str| -> Result<Option<SystemTime>> {
        Ok(match v {
            "-" => None,
            v => Some(multiproc::system_time_from_nanos(v.parse()?)),
        })
    };
    let handshake = match (time(f[3])?, f[4]) {
        (Some(t), a) if a != "-" => Some((t, a.parse()?)),
        _ => None,
    };
    Ok(ClientTrace {
        lost: time(f[0])?,
        reattached: f[1] == "1",
        recovered: time(f[2])?,
        handshake,
        attempt_started: time(f[5])?,
        ..ClientTrace::default()
    })
}

fn decode_log(line: &str) -> Result<(SystemTime, String, bool)> {
    let mut f = line.splitn(3, ' ');
    let (Some(at), Some(loss), Some(what)) = (f.next(), f.next(), f.next()) else {
        return Err(format!("bad LOG line {line:?}").into());
    };
    Ok((
        multiproc::system_time_from_nanos(at.parse()?),
        what.to_owned(),
        loss == "1",
    ))
}

async fn run_one(n: usize, args: &Args) -> Result<Row> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let bind = free_loopback_addr()?;
    let url = format!("ws://{bind}/ws");
    println!("\n== {n} clients, hub on {bind}");
    let (hub, _) = spawn_hub(bind).await?;
    let ramp = Instant::now();
    let mut clients = Clients::start(n, &url, args, timeout).await?;
    println!(
        "  {n} connected with their channel attached ({:.1} s after the ramp began); holding {:.1} s",
        ramp.elapsed().as_secs_f64(),
        args.hold_secs
    );
    tokio::time::sleep(Duration::from_secs_f64(args.hold_secs)).await;

    // The crash: SIGKILL the hub process.
    clients.arm().await?;
    let killed_at = Instant::now();
    let killed_wall = SystemTime::now();
    let client_cpu_at_kill = clients.cpu();
    hub.kill().await?;
    let down = Duration::from_secs_f64(args.down_secs);
    tokio::time::sleep(down.saturating_sub(killed_at.elapsed())).await;
    let lost = clients.lost();
    let (mut hub, back_at) = spawn_hub(bind).await?;
    let (client_cpu_at_back, back_instant) = (clients.cpu(), Instant::now());
    let hub_pid = hub.pid().ok_or("new hub already exited")?;
    let hub_ticks_at_back = pid_cpu_ticks(hub_pid)?;
    println!(
        "  hub killed; {}; new hub bound {:.2} s after the kill",
        lost.map_or(
            "the client processes count their losses".to_owned(),
            |l| format!("{l}/{n} clients saw the loss")
        ),
        killed_at.elapsed().as_secs_f64()
    );

    let (shared, recovery) = clients.recover(n, timeout).await?;
    let recovered = shared.recovered();
    let (client_cpu_done, hub_ticks_done) = (clients.cpu(), pid_cpu_ticks(hub_pid)?);
    let recovery_wall = back_instant.elapsed().as_secs_f64();
    let outage_wall = (back_instant - killed_at).as_secs_f64();
    let hub_cpu = (hub_ticks_done - hub_ticks_at_back) as f64 / clock_ticks_per_sec() as f64;
    println!(
        "  CPU while the hub was down ({outage_wall:.1} s): client process{} {:.0} % of one core; \
         while recovering ({recovery_wall:.1} s): client process{} {:.0} %, hub process {:.0} % \
         (2 cores in all)",
        clients.plural(),
        100.0 * (client_cpu_at_back - client_cpu_at_kill).as_secs_f64() / outage_wall,
        clients.plural(),
        100.0 * (client_cpu_done - client_cpu_at_back).as_secs_f64() / recovery_wall,
        100.0 * hub_cpu / recovery_wall
    );
    if let Err(e) = recovery {
        println!("  {recovered}/{n} recovered; {e}");
    }

    report_timeline(&shared, killed_wall, back_at, args.timeline);
    hub.send("peak").await?;
    let peak_line = hub.expect_line("PEAK ", Duration::from_secs(10)).await?;
    let peak: Vec<f64> = peak_line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let peak_per_sec = peak.first().copied().unwrap_or(0.0);
    // Reported, not required: a hub too busy to answer still leaves the latencies to report.
    let handshakes = match hub_handshakes(bind).await {
        Ok(h) => format!("{h:?}"),
        Err(e) => format!("unavailable ({e})"),
    };

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (mut latencies, mut connect_ms, mut resync_ms, mut attempts) =
        (Vec::new(), Vec::new(), Vec::new(), BTreeMap::new());
    for c in &shared.clients {
        // A client that never recovered counts as infinitely late: percentiles are over all n.
        let Some(at) = c.recovered else {
            latencies.push(f64::INFINITY);
            continue;
        };
        latencies.push(ms(at.duration_since(back_at).unwrap_or_default()));
        if let Some((handshake, attempt)) = c.handshake {
            resync_ms.push(ms(at.duration_since(handshake).unwrap_or_default()));
            *attempts.entry(attempt).or_insert(0usize) += 1;
            if let Some(started) = c.attempt_started {
                connect_ms.push(ms(handshake.duration_since(started).unwrap_or_default()));
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    connect_ms.sort_by(f64::total_cmp);
    resync_ms.sort_by(f64::total_cmp);
    let policy = client_config(&url)?.reconnect;
    let back_since_kill = back_at.duration_since(killed_wall).unwrap_or_default();
    let losses: Vec<Option<Duration>> = shared
        .clients
        .iter()
        .map(|c| {
            c.lost
                .map(|at| at.duration_since(killed_wall).unwrap_or_default())
        })
        .collect();
    let mut alone = policy_alone_ms(&policy, &losses, back_since_kill, n as u64);
    alone.sort_by(f64::total_cmp);
    let row = Row {
        clients: n,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        policy_p99_ms: percentile(&alone, 99.0),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        peak_per_sec,
    };
    println!(
        "  recovered {recovered}/{n}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms after the hub was back \
         (over all {n}; one not recovered counts as inf)",
        row.p50_ms, row.p99_ms, row.max_ms
    );
    println!(
        "  the policy alone, for these losses and this return: p50 {:.0} ms, p99 {:.0} ms, max \
         {:.0} ms (measured minus policy alone: p50 {:+.0} ms, p99 {:+.0} ms)",
        percentile(&alone, 50.0),
        row.policy_p99_ms,
        alone.last().copied().unwrap_or(0.0),
        row.p50_ms - percentile(&alone, 50.0),
        row.p99_ms - row.policy_p99_ms
    );
    println!("  reconnected on attempt #: {attempts:?} (1 = the fast retry right after the drop)");
    for (what, v) in [
        (
            "successful attempt (→ Connecting to handshake done)",
            &connect_ms,
        ),
        (
            "re-attach (handshake done to Syncing → Connected)",
            &resync_ms,
        ),
    ] {
        println!(
            "  {what}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(0.0)
        );
    }
    println!(
        "  hub: peak {peak_per_sec:.0} connects/s (100 ms window from +{} ms), {} connections, all \
         in by +{} ms; /metrics handshakes {handshakes}",
        peak.get(1).copied().unwrap_or(0.0),
        peak.get(2).copied().unwrap_or(0.0),
        peak.get(3).copied().unwrap_or(0.0)
    );

    // The hub holds one descriptor per connection: near the open-file limit it cannot accept
    // everyone (nor /health, /metrics).
    let hub_fds = std::fs::read_dir(format!("/proc/{hub_pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let hub_limit = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(0);
    println!(
        "  hub process open files: {hub_fds} of its limit {hub_limit} ({:.2} per client){}",
        hub_fds as f64 / n.max(1) as f64,
        if hub_fds as u64 + 16 >= hub_limit {
            " — AT THE LIMIT: it can accept nothing more (a client still outside, /health, /metrics)"
        } else {
            ""
        }
    );

    clients.close().await;
    hub.kill().await?;
    Ok(row)
}

/// The reconnect policy's recovery on its own, in ms after the hub's return at `back` (after the kill): for
/// each client that saw its loss at `losses[i]` after the kill (`None`: never saw it — counted as
/// infinitely late, as in the measurement), when its first attempt at or after the return goes
/// out, if every refused attempt failed the instant it began and the successful one took no
/// time. A fresh [`ReconnectManager`] per client (seeded from `seed` and the index) follows the
/// rules the clients do: a stable connection lost, then a failure per attempt before the return.
fn policy_alone_ms(
    policy: &ReconnectPolicy,
    losses: &[Option<Duration>],
    back: Duration,
    seed: u64,
) -> Vec<f64> {
    // The connection was up for longer than the stability window before the kill.
    let connected = tokio::time::Instant::now();
    let killed = connected + policy.stability_window + Duration::from_secs(1);
    let back = killed + back;
    losses
        .iter()
        .enumerate()
        .map(|(i, lost)| {
            let Some(lost) = lost else {
                return f64::INFINITY;
            };
            let mut manager =
                ReconnectManager::new(policy.clone(), Some(seed ^ ((i as u64) << 20)));
            manager.on_connected(connected);
            let mut now = killed + *lost;
            let mut step = manager.on_connection_lost(now);
            loop {
                let wait = match step {
                    NextStep::Retry { delay, .. } => delay,
                    NextStep::Suspend { probe_in, .. } => probe_in,
                    NextStep::WaitForManual | NextStep::GiveUp { .. } => return f64::INFINITY,
                };
                now += wait;
                manager.begin_attempt(now);
                if now >= back {
                    return (now - back).as_secs_f64() * 1000.0;
                }
                step = manager.on_attempt_failed(now);
            }
        })
        .collect()
}

/// Prints when the clients saw the loss, relative to the kill, and with `full`, every
/// connection transition after the kill counted in 250 ms bins.
fn report_timeline(shared: &Shared, killed: SystemTime, back: SystemTime, full: bool) {
    let since_kill = |t: &SystemTime| {
        t.duration_since(killed)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    };
    let losses: Vec<i64> = shared
        .log
        .iter()
        .filter(|(_, _, loss)| *loss)
        .map(|(t, _, _)| since_kill(t))
        .collect();
    let span = |v: &[i64]| (v.iter().min().copied(), v.iter().max().copied());
    let (first, last) = span(&losses);
    println!(
        "  client side: {} losses seen from +{} to +{} ms after the kill; hub back at +{} ms",
        losses.len(),
        first.unwrap_or(0),
        last.unwrap_or(0),
        since_kill(&back)
    );
    if !full {
        return;
    }
    let mut bins: BTreeMap<(i64, String), usize> = BTreeMap::new();
    for (t, what, _) in &shared.log {
        let bin = since_kill(t) / 250 * 250;
        *bins.entry((bin, what.clone())).or_default() += 1;
    }
    println!("  timeline (ms after the kill, transition, clients):");
    for ((bin, what), count) in bins {
        println!("    +{bin:>6}  {what:<26} {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_alone_follows_the_reconnect_schedule() {
        let policy = ReconnectPolicy::default();
        let losses = vec![Some(Duration::ZERO); 10_000];
        // Back at once: every client's fast retry (0–250 ms after the drop) finds it.
        let instant = policy_alone_ms(&policy, &losses, Duration::ZERO, 1);
        assert!(instant.iter().all(|&ms| (0.0..=250.0).contains(&ms)));
        // Back after 3 s: attempt #3 falls 2.25–4.0 s after the drop, so a share of the clients
        // try just before the return and wait for attempt #4 (4 s ± 25 % later).
        let mut three = policy_alone_ms(&policy, &losses, Duration::from_secs(3), 1);
        three.sort_by(f64::total_cmp);
        assert!(
            percentile(&three, 50.0) < 1000.0,
            "{}",
            percentile(&three, 50.0)
        );
        assert!(
            percentile(&three, 99.0) > 4000.0,
            "{}",
            percentile(&three, 99.0)
        );
        assert!(three.last().is_some_and(|&ms| ms <= 6000.0));
        // A loss seen later moves the schedule with it; one never seen never recovers.
        let late = policy_alone_ms(
            &policy,
            &[Some(Duration::from_secs(3)), None],
            Duration::from_secs(3),
            1,
        );
        assert!((0.0..=250.0).contains(&late[0]), "{late:?}");
        assert!(late[1].is_infinite());
    }

    #[test]
    fn traces_and_log_lines_cross_the_process_boundary_unchanged() {
        let at = |n: u64| multiproc::system_time_from_nanos(u128::from(n) * 1_000_000_007);
        for trace in [
            ClientTrace::default(),
            ClientTrace {
                lost: Some(at(0)),
                reattached: true,
                recovered: Some(at(3)),
                handshake: Some((at(2), 4)),
                attempt_started: Some(at(1)),
                ..ClientTrace::default()
            },
        ] {
            let back = decode_trace(&encode_trace(&trace)).unwrap();
            assert_eq!(
                (
                    back.lost,
                    back.reattached,
                    back.recovered,
                    back.handshake,
                    back.attempt_started
                ),
                (
                    trace.lost,
                    trace.reattached,
                    trace.recovered,
                    trace.handshake,
                    trace.attempt_started
                )
            );
        }
        let line = format!("{} 1 connected → disconnected", nanos_of(&at(5)));
        assert_eq!(
            decode_log(&line).unwrap(),
            (at(5), "connected → disconnected".to_owned(), true)
        );
        assert!(decode_trace("1 2 3").is_err());
        assert!(decode_log("nope").is_err());
    }
}
