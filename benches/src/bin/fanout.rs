//! Fan-out benchmark: one publisher, many subscribers, one channel, over loopback, with the
//! subscribers in processes of their own, apart from the hub.
//!
//! For each subscriber count, Tether (a hub process with a `ChannelService`; subscriber
//! processes with one `Transport` and channel per subscriber; a publish-only channel in this
//! process) and a raw tokio-tungstenite broadcast relay (a relay process; raw subscriber
//! processes; the raw publisher in this process) are measured in the same run: deliveries/s,
//! i.e. subscribers × messages divided by the time from the first publish until every
//! subscriber has every message. Both systems are set up side by side (setup is not measured)
//! and warmed up, then measured in alternating rounds; the median round is reported.
//!
//! Also reported, per system: the CPU the hub (relay) process spent per delivery, in µs —
//! `utime + stime` of `/proc/<pid>/stat` over the measured rounds (from the first publish until
//! the last subscriber had everything) divided by the deliveries of those rounds — and the same
//! for the subscriber processes. The target, tether ÷ raw ≥ 0.3×, is printed next to
//! the ratio (a target, not an assertion).
//!
//! Processes: this binary re-executed with a hidden `--role` (`tether-hub`, `raw-relay`,
//! `tether-subscribers`, `raw-subscribers`). A subscriber process prints `READY` once its
//! subscribers are connected (attached), then `D <index> <unix-nanos>` whenever every one of
//! its subscribers holds message `<index>` (each subscriber receives in order, so these come in
//! order); the parent takes the end of a round, and the raw publisher its window, from those
//! lines.
//!
//! `cargo run --release -p tether-benches --bin fanout -- --help`

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::stream::{self, FuturesUnordered};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tether_benches::multiproc::{
    clock_ticks_per_sec, die_with_parent, pid_cpu_ticks, raise_nofile_limit, stdin_command_loop,
    unix_nanos_now, ChildProc,
};
use tether_benches::payload::{make_payload, Clock};
use tether_benches::raw::{self, RawClient};
use tether_benches::report::{bytes_text, ratio_text, thousands, write_json, Table};
use tether_benches::stats::{per_second, ratio, RoundRates};
use tether_benches::tether::{self as tether_side, CHANNEL};
use tether_benches::{sys, within, BoxError};
use tether_channels::{Channel, ChannelEvent, ChannelEvents, ChannelOptions};
use tether_transport::protocol::Payload;
use tether_transport::Transport;
use tokio_tungstenite::tungstenite::Message;

/// Time one subscriber has to connect (and, for Tether, attach).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Batches queued per subscriber in the raw relay.
const RAW_QUEUE: usize = 64;
/// Target ratio tether ÷ raw deliveries/s (issue 9).
const RATIO_TARGET: f64 = 0.3;

#[derive(Debug, Parser)]
#[command(
    about = "Fan-out deliveries/s with one publisher and many subscribers (in separate processes from the hub): Tether vs a raw WebSocket broadcast relay"
)]
struct Args {
    /// Subscriber counts (comma-separated); one row each.
    #[arg(long, value_delimiter = ',', default_values_t = [1000usize])]
    subscribers: Vec<usize>,
    /// Processes the subscribers are spread over (per system), none of them the hub's.
    #[arg(long, default_value_t = 1)]
    subscriber_procs: usize,
    /// Messages published per measured round; each goes to every subscriber.
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// Measured rounds per subscriber count, Tether and raw alternating; the median round is
    /// reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Messages published first and not measured.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Most messages outstanding at once (Tether: unacknowledged; raw: not yet received by
    /// every subscriber).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Connections being set up at once, per subscriber process.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Leave Nagle's algorithm on for the raw baseline's sockets (by default the raw relay and
    /// clients set TCP_NODELAY, as low-latency WebSocket servers usually do).
    #[arg(long)]
    raw_nagle: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Pause before every round (and warm-up) so the other system's leftover work has drained.
    #[arg(long, default_value_t = 100)]
    settle_ms: u64,
    /// Give up on a round (or the warm-up) after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Internal: the role of a helper process.
    #[arg(long, hide = true)]
    role: Option<String>,
    /// Internal: the URL a subscriber helper connects to.
    #[arg(long, hide = true)]
    url: Option<String>,
    /// Internal: how many subscribers a helper serves or opens.
    #[arg(long, hide = true, default_value_t = 0)]
    count: usize,
}

impl Args {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// Messages a subscriber receives over the whole run.
    fn total(&self) -> usize {
        self.warmup + self.rounds * self.messages
    }

    /// Time a helper has to connect `count` subscribers.
    fn setup_timeout(&self, count: usize) -> Duration {
        SETUP_TIMEOUT + Duration::from_millis(count as u64 * 5)
    }

    /// Arguments of a helper process with `role`: the run's settings plus its own.
    fn helper(&self, role: &str, url: Option<&str>, count: usize) -> Vec<String> {
        let mut out = vec![
            "--role".to_owned(),
            role.to_owned(),
            "--count".to_owned(),
            count.to_string(),
            "--messages".to_owned(),
            self.messages.to_string(),
            "--rounds".to_owned(),
            self.rounds.to_string(),
            "--warmup".to_owned(),
            self.warmup.to_string(),
            "--payload".to_owned(),
            self.payload.to_string(),
            "--connect-concurrency".to_owned(),
            self.connect_concurrency.to_string(),
        ];
        if let Some(url) = url {
            out.push("--url".to_owned());
            out.push(url.to_owned());
        }
        if self.raw_nagle {
            out.push("--raw-nagle".to_owned());
        }
        out
    }
}

/// One system's figures for one subscriber count.
#[derive(Debug, Clone, Serialize)]
struct Figures {
    /// The median round's deliveries/s (the reported figure).
    deliveries_per_sec: f64,
    min_deliveries_per_sec: f64,
    max_deliveries_per_sec: f64,
    /// Every round's deliveries/s, in order.
    rounds: Vec<f64>,
    /// Time to connect (and attach) every subscriber and the publisher; not measured.
    setup_ms: f64,
    /// CPU of the hub (relay) process over the measured rounds ÷ their deliveries, µs.
    hub_cpu_us_per_delivery: f64,
    /// CPU of the subscriber processes over the measured rounds ÷ their deliveries, µs.
    subscribers_cpu_us_per_delivery: f64,
    /// CPU of the publisher (this process) over the measured rounds ÷ their deliveries, µs.
    publisher_cpu_us_per_delivery: f64,
}

/// CPU clock ticks spent over the measured rounds, by process.
#[derive(Debug, Default, Clone, Copy)]
struct Ticks {
    hub: u64,
    subscribers: u64,
    publisher: u64,
}

/// Clock ticks as µs per delivery.
fn us_per_delivery(ticks: u64, deliveries: u64) -> f64 {
    if deliveries == 0 {
        return f64::NAN;
    }
    ticks as f64 * 1e6 / clock_ticks_per_sec() as f64 / deliveries as f64
}

impl Figures {
    fn new(rates: &RoundRates, setup: Duration, ticks: Ticks, deliveries: u64) -> Self {
        Figures {
            deliveries_per_sec: rates.median(),
            min_deliveries_per_sec: rates.min(),
            max_deliveries_per_sec: rates.max(),
            rounds: rates.rounds.clone(),
            setup_ms: setup.as_secs_f64() * 1000.0,
            hub_cpu_us_per_delivery: us_per_delivery(ticks.hub, deliveries),
            subscribers_cpu_us_per_delivery: us_per_delivery(ticks.subscribers, deliveries),
            publisher_cpu_us_per_delivery: us_per_delivery(ticks.publisher, deliveries),
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
struct Row {
    subscribers: usize,
    subscriber_procs: usize,
    tether: Figures,
    raw: Figures,
    /// tether deliveries/s ÷ raw deliveries/s (medians).
    ratio: f64,
    /// The target for `ratio`.
    ratio_target: f64,
}

/// The whole report (what `--json` writes).
#[derive(Debug, Clone, Serialize)]
struct Report {
    benchmark: &'static str,
    messages_per_round: usize,
    rounds: usize,
    warmup: usize,
    payload_bytes: usize,
    window: usize,
    rows: Vec<Row>,
}

fn main() -> ExitCode {
    sys::init_tracing();
    let args = Args::parse();
    let result = match args.role.as_deref() {
        None => actix_rt::System::new().block_on(run(&args)),
        Some("tether-hub") => tether_hub_role(&args),
        Some("raw-relay") => raw_relay_role(&args),
        Some("tether-subscribers") => tether_subscribers_role(&args),
        Some("raw-subscribers") => raw_subscribers_role(&args),
        Some(role) => Err(format!("unknown role {role:?}").into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "fanout{}: {e}",
                args.role.map(|r| format!(" ({r})")).unwrap_or_default()
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), BoxError> {
    if args.messages == 0
        || args.rounds == 0
        || args.window == 0
        || args.connect_concurrency == 0
        || args.subscriber_procs == 0
    {
        return Err("--messages, --rounds, --window, --connect-concurrency and \
                    --subscriber-procs must be at least 1"
            .into());
    }
    if args.subscribers.contains(&0) {
        return Err("subscriber counts must be at least 1".into());
    }
    let limit = raise_nofile_limit();
    let most = args.subscribers.iter().copied().max().unwrap_or(0);
    // The hub (relay) process holds every subscriber's socket and the publisher's.
    if (limit as usize) < most + 256 {
        return Err(format!(
            "{most} subscribers on one hub process need about {} open files; the limit is {limit}",
            most + 256
        )
        .into());
    }
    println!(
        "fanout: 1 publisher (this process) → hub process → N subscribers in {} other process(es) \
         on 127.0.0.1; {} rounds × {} messages of {} (+{} warm-up), window {}, open-file limit {limit}",
        args.subscriber_procs,
        args.rounds,
        args.messages,
        bytes_text(args.payload),
        args.warmup,
        args.window
    );
    let clock = Clock::new();
    let mut rows = Vec::new();
    for &subscribers in &args.subscribers {
        let (tether, raw) = measure(args, subscribers, clock).await?;
        for (name, f) in [("tether", &tether), ("raw", &raw)] {
            println!(
                "  {subscribers:>6} subscribers  {name:<6} {:>10} deliveries/s (rounds {}–{}; setup {:.0} ms); \
                 CPU per delivery: hub {:.3} µs, subscribers {:.3} µs, publisher {:.3} µs",
                thousands(f.deliveries_per_sec),
                thousands(f.min_deliveries_per_sec),
                thousands(f.max_deliveries_per_sec),
                f.setup_ms,
                f.hub_cpu_us_per_delivery,
                f.subscribers_cpu_us_per_delivery,
                f.publisher_cpu_us_per_delivery,
            );
        }
        let r = ratio(tether.deliveries_per_sec, raw.deliveries_per_sec);
        rows.push(Row {
            subscribers,
            subscriber_procs: args.subscriber_procs,
            ratio: r,
            ratio_target: RATIO_TARGET,
            tether,
            raw,
        });
    }

    let mut table = Table::new([
        "subscribers",
        "tether deliveries/s",
        "raw deliveries/s",
        "ratio",
        "target",
        "tether hub µs/delivery",
        "raw relay µs/delivery",
    ]);
    for row in &rows {
        table.row([
            thousands(row.subscribers as f64),
            thousands(row.tether.deliveries_per_sec),
            thousands(row.raw.deliveries_per_sec),
            ratio_text(row.ratio),
            format!(
                "≥ {} {}",
                ratio_text(row.ratio_target),
                if row.ratio >= row.ratio_target {
                    "met"
                } else {
                    "MISSED"
                }
            ),
            format!("{:.3}", row.tether.hub_cpu_us_per_delivery),
            format!("{:.3}", row.raw.hub_cpu_us_per_delivery),
        ]);
    }
    println!();
    println!("{table}");
    println!(
        "deliveries/s: median of the rounds; ratio = tether ÷ raw (1.00x = as fast as the raw relay); \
         µs/delivery: the hub (relay) process' utime+stime over the measured rounds ÷ their deliveries \
         (clock ticks of {} ms)",
        1000 / clock_ticks_per_sec().max(1)
    );

    if let Some(path) = &args.json {
        let report = Report {
            benchmark: "fanout",
            messages_per_round: args.messages,
            rounds: args.rounds,
            warmup: args.warmup,
            payload_bytes: args.payload,
            window: args.window,
            rows,
        };
        write_json(path, &report)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Sets up both systems with `subscribers` subscribers, warms both up, then runs the rounds,
/// alternating which system goes first.
async fn measure(
    args: &Args,
    subscribers: usize,
    clock: Clock,
) -> Result<(Figures, Figures), BoxError> {
    let mut tether = Side::start(System::Tether, args, subscribers).await?;
    let mut raw = match Side::start(System::Raw, args, subscribers).await {
        Ok(raw) => raw,
        Err(e) => {
            tether.stop().await;
            return Err(e);
        }
    };
    let measured = async {
        tether.round(args.warmup, args, clock).await?;
        raw.round(args.warmup, args, clock).await?;
        let deliveries = (subscribers * args.messages) as u64;
        let (mut t, mut r) = (RoundRates::default(), RoundRates::default());
        let (mut t_ticks, mut r_ticks) = (Ticks::default(), Ticks::default());
        let add = |rates: &mut RoundRates, sum: &mut Ticks, (elapsed, ticks): (Duration, Ticks)| {
            rates.push(per_second(deliveries, elapsed));
            sum.hub += ticks.hub;
            sum.subscribers += ticks.subscribers;
            sum.publisher += ticks.publisher;
        };
        for round in 1..=args.rounds {
            let n = args.messages;
            if round % 2 == 1 {
                add(&mut t, &mut t_ticks, tether.round(n, args, clock).await?);
                add(&mut r, &mut r_ticks, raw.round(n, args, clock).await?);
            } else {
                add(&mut r, &mut r_ticks, raw.round(n, args, clock).await?);
                add(&mut t, &mut t_ticks, tether.round(n, args, clock).await?);
            }
        }
        let all = deliveries * args.rounds as u64;
        Ok::<_, BoxError>((
            Figures::new(&t, tether.setup, t_ticks, all),
            Figures::new(&r, raw.setup, r_ticks, all),
        ))
    }
    .await;
    tether.stop().await;
    raw.stop().await;
    measured
}

// ---------------------------------------------------------------------------------------------
// The parent's side of one system: its hub (relay) process, its subscriber processes, and the
// publisher in this process.

#[derive(Debug, Clone, Copy, PartialEq)]
enum System {
    Tether,
    Raw,
}

/// The publisher of one system.
enum Publisher {
    Tether {
        transport: Transport,
        channel: Channel,
    },
    Raw(RawClient),
}

/// A subscriber process and how far every one of its subscribers has got.
struct SubscriberProc {
    child: ChildProc,
    /// Messages every subscriber of this process holds (one more than the last `D` index).
    done: usize,
    /// When the last `D` line's message reached its last subscriber (Unix nanos).
    done_at: u128,
}

impl SubscriberProc {
    fn take(&mut self, line: &str) -> Result<(), BoxError> {
        let mut parts = line.split_whitespace();
        let index: usize = parts.next().ok_or("empty D line")?.parse()?;
        self.done = index + 1;
        self.done_at = parts.next().ok_or("D line without a time")?.parse()?;
        Ok(())
    }

    /// Takes every `D` line already there.
    fn drain(&mut self) -> Result<(), BoxError> {
        while let Some(line) = self.child.try_line() {
            match line.strip_prefix("D ") {
                Some(rest) => self.take(rest)?,
                None => eprintln!("[subscribers] {line}"),
            }
        }
        Ok(())
    }

    /// Waits for the next `D` line.
    async fn next(&mut self, timeout: Duration) -> Result<(), BoxError> {
        let rest = self.child.expect_line("D ", timeout).await?;
        self.take(&rest)
    }
}

/// One system under test.
struct Side {
    system: System,
    hub: ChildProc,
    hub_pid: u32,
    subscribers: Vec<SubscriberProc>,
    publisher: Option<Publisher>,
    /// Messages published so far.
    sent: usize,
    setup: Duration,
}

impl Side {
    async fn start(system: System, args: &Args, subscribers: usize) -> Result<Side, BoxError> {
        let started = Instant::now();
        let (hub_role, sub_role) = match system {
            System::Tether => ("tether-hub", "tether-subscribers"),
            System::Raw => ("raw-relay", "raw-subscribers"),
        };
        let mut hub = ChildProc::spawn(hub_role, &args.helper(hub_role, None, subscribers))?;
        let line = hub
            .expect_line("LISTENING ", Duration::from_secs(30))
            .await?;
        let url = line
            .split_whitespace()
            .next()
            .ok_or("empty LISTENING line")?
            .to_owned();
        let hub_pid = hub.pid().ok_or("hub process already exited")?;
        let mut side = Side {
            system,
            hub,
            hub_pid,
            subscribers: Vec::new(),
            publisher: None,
            sent: 0,
            setup: Duration::ZERO,
        };
        match side.connect(args, subscribers, sub_role, &url).await {
            Ok(()) => {
                side.setup = started.elapsed();
                Ok(side)
            }
            Err(e) => {
                side.stop().await;
                Err(e)
            }
        }
    }

    async fn connect(
        &mut self,
        args: &Args,
        subscribers: usize,
        role: &str,
        url: &str,
    ) -> Result<(), BoxError> {
        let procs = args.subscriber_procs.min(subscribers);
        for i in 0..procs {
            let count = tether_benches::multiproc::share(subscribers, procs, i);
            let child =
                ChildProc::spawn(&format!("{role} {i}"), &args.helper(role, Some(url), count))?;
            self.subscribers.push(SubscriberProc {
                child,
                done: 0,
                done_at: 0,
            });
        }
        let timeout = args.setup_timeout(subscribers);
        for sub in &mut self.subscribers {
            sub.child.expect_line("READY", timeout).await?;
        }
        // Every subscriber is in: the raw relay takes the next connection as its publisher.
        self.publisher = Some(match self.system {
            System::Tether => {
                let (transport, channel, _) = tether_side::connect(
                    url,
                    CHANNEL,
                    ChannelOptions::publish_only(),
                    SETUP_TIMEOUT,
                )
                .await?;
                Publisher::Tether { transport, channel }
            }
            System::Raw => Publisher::Raw(
                within(
                    SETUP_TIMEOUT,
                    "raw publisher connect",
                    raw::connect(url, !args.raw_nagle),
                )
                .await?,
            ),
        });
        Ok(())
    }

    /// Messages every subscriber of every process holds.
    fn done(&self) -> usize {
        self.subscribers.iter().map(|s| s.done).min().unwrap_or(0)
    }

    fn ticks(&self) -> Result<Ticks, BoxError> {
        let mut subscribers = 0;
        for sub in &self.subscribers {
            subscribers += pid_cpu_ticks(sub.child.pid().ok_or("subscriber process exited")?)?;
        }
        Ok(Ticks {
            hub: pid_cpu_ticks(self.hub_pid)?,
            subscribers,
            publisher: tether_benches::multiproc::self_cpu_ticks()?,
        })
    }

    /// Publishes `n` messages with at most `--window` outstanding; returns the time until every
    /// subscriber had them all, and the CPU ticks each process spent meanwhile.
    async fn round(
        &mut self,
        n: usize,
        args: &Args,
        clock: Clock,
    ) -> Result<(Duration, Ticks), BoxError> {
        if n == 0 {
            return Ok((Duration::ZERO, Ticks::default()));
        }
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        let before = self.ticks()?;
        let start_nanos = unix_nanos_now();
        let timeout = args.timeout();
        let target = self.sent + n;
        let (sent, subscribers) = (self.sent, &mut self.subscribers);
        let publisher = self.publisher.as_mut().ok_or("no publisher")?;
        match publisher {
            Publisher::Tether { channel, .. } => {
                within(
                    timeout,
                    "tether publishing",
                    publish_tether(channel, n, args, clock),
                )
                .await?;
            }
            Publisher::Raw(socket) => {
                let publishing = async {
                    for i in 0..n {
                        // A message is outstanding until every subscriber has it.
                        loop {
                            for sub in subscribers.iter_mut() {
                                sub.drain()?;
                            }
                            let done = subscribers.iter().map(|s| s.done).min().unwrap_or(0);
                            if sent + i - done < args.window {
                                break;
                            }
                            socket.flush().await?;
                            if let Some(slowest) = subscribers.iter_mut().min_by_key(|s| s.done) {
                                slowest.next(timeout).await?;
                            }
                        }
                        socket
                            .feed(Message::text(make_payload(args.payload, clock.micros())))
                            .await?;
                    }
                    socket.flush().await?;
                    Ok::<(), BoxError>(())
                };
                within(timeout, "raw publishing", publishing).await?;
            }
        }
        self.sent = target;
        let what = match self.system {
            System::Tether => "tether round",
            System::Raw => "raw round",
        };
        let deadline = Instant::now() + timeout;
        for sub in &mut self.subscribers {
            sub.drain()?;
            while sub.done < target {
                let left = deadline.saturating_duration_since(Instant::now());
                sub.next(left).await.map_err(|e| format!("{what}: {e}"))?;
            }
        }
        let after = self.ticks()?;
        let end_nanos = self
            .subscribers
            .iter()
            .map(|s| s.done_at)
            .max()
            .unwrap_or(start_nanos);
        debug_assert!(self.done() >= target);
        let elapsed = Duration::from_nanos(end_nanos.saturating_sub(start_nanos) as u64);
        Ok((
            elapsed,
            Ticks {
                hub: after.hub - before.hub,
                subscribers: after.subscribers - before.subscribers,
                publisher: after.publisher - before.publisher,
            },
        ))
    }

    async fn stop(mut self) {
        match self.publisher.take() {
            Some(Publisher::Tether { transport, channel }) => {
                drop(channel);
                transport.close().await;
            }
            Some(Publisher::Raw(mut socket)) => {
                if let Err(e) = socket.close(None).await {
                    tracing::debug!(error = %e, "raw publisher close");
                }
            }
            None => {}
        }
        for sub in self.subscribers.drain(..) {
            if let Err(e) = sub.child.kill().await {
                tracing::warn!(error = %e, "subscriber process");
            }
        }
        if let Err(e) = self.hub.kill().await {
            tracing::warn!(error = %e, "hub process");
        }
    }
}

/// Publishes `n` timestamped payloads on `channel`, at most `--window` unacknowledged.
async fn publish_tether(
    channel: &Channel,
    n: usize,
    args: &Args,
    clock: Clock,
) -> Result<(), BoxError> {
    let mut outstanding = FuturesUnordered::new();
    for _ in 0..n {
        if outstanding.len() >= args.window {
            if let Some(ack) = outstanding.next().await {
                ack?;
            }
        }
        let text = make_payload(args.payload, clock.micros());
        let payload = Payload::from_json_bytes(text.into())?;
        outstanding.push(channel.publish_payload(payload));
    }
    while let Some(ack) = outstanding.next().await {
        ack?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Helper processes

/// `tether-hub`: a hub (one HTTP worker, the channel service on one thread, history for the
/// whole run) on `127.0.0.1:0`. Prints `LISTENING <ws-url>`; stops when stdin closes.
fn tether_hub_role(args: &Args) -> Result<(), BoxError> {
    die_with_parent();
    raise_nofile_limit();
    actix_rt::System::new().block_on(async {
        let hub = tether_side::start_hub(args.total(), args.payload)?;
        println!("LISTENING {}", hub.ws_url());
        stdin_command_loop(|_| {}).await;
        hub.stop().await;
        Ok::<_, BoxError>(())
    })?;
    std::process::exit(0)
}

/// `raw-relay`: the broadcast relay for `--count` subscribers, then a publisher. Prints
/// `LISTENING <url>`; exits when stdin closes.
fn raw_relay_role(args: &Args) -> Result<(), BoxError> {
    die_with_parent();
    raise_nofile_limit();
    let relay = raw::spawn_broadcast_relay(args.count, RAW_QUEUE, !args.raw_nagle)?;
    println!("LISTENING {}", relay.url());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(stdin_command_loop(|_| {}));
    std::process::exit(0)
}

/// Counts, per message index, the subscribers of this process holding it; prints
/// `D <index> <unix-nanos>` when the last one does.
struct Tally {
    counts: Vec<usize>,
    subscribers: usize,
}

impl Tally {
    fn shared(total: usize, subscribers: usize) -> Rc<RefCell<Tally>> {
        Rc::new(RefCell::new(Tally {
            counts: vec![0; total],
            subscribers,
        }))
    }

    fn received(&mut self, index: usize) {
        if let Some(count) = self.counts.get_mut(index) {
            *count += 1;
            if *count == self.subscribers {
                println!("D {index} {}", unix_nanos_now());
            }
        }
    }
}

/// `tether-subscribers`: `--count` Transports to `--url`, each with the channel attached.
/// Prints `READY` once all are, then `D` lines; exits when stdin closes.
fn tether_subscribers_role(args: &Args) -> Result<(), BoxError> {
    die_with_parent();
    raise_nofile_limit();
    let url = args.url.clone().ok_or("--url missing")?;
    let (count, total) = (args.count, args.total());
    actix_rt::System::new().block_on(async move {
        let tally = Tally::shared(total, count);
        let mut transports = Vec::with_capacity(count);
        let mut channels = Vec::with_capacity(count);
        let mut connecting = stream::iter(0..count)
            .map(|_| tether_side::connect(&url, CHANNEL, ChannelOptions::default(), SETUP_TIMEOUT))
            .buffer_unordered(args.connect_concurrency);
        while let Some(connected) = connecting.next().await {
            let (transport, channel, events) = connected?;
            transports.push(transport);
            channels.push(channel);
            actix_rt::spawn(tether_count(events, tally.clone(), total));
        }
        drop(connecting);
        println!("READY {count}");
        stdin_command_loop(|_| {}).await;
        Ok::<_, BoxError>(())
    })?;
    std::process::exit(0)
}

async fn tether_count(mut events: ChannelEvents, tally: Rc<RefCell<Tally>>, total: usize) {
    let mut received = 0;
    while received < total {
        match events.recv().await {
            Some(ChannelEvent::Message(_)) => {
                tally.borrow_mut().received(received);
                received += 1;
            }
            Some(ChannelEvent::Discontinuity(d)) => {
                tracing::error!(?d, "tether subscriber saw a discontinuity");
                return;
            }
            None => {
                tracing::error!(received, "tether subscriber's channel closed");
                return;
            }
        }
    }
}

/// `raw-subscribers`: `--count` raw sockets to `--url`. Prints `READY` once all are connected,
/// then `D` lines; exits when stdin closes.
fn raw_subscribers_role(args: &Args) -> Result<(), BoxError> {
    die_with_parent();
    raise_nofile_limit();
    let url = args.url.clone().ok_or("--url missing")?;
    let (count, total, nodelay) = (args.count, args.total(), !args.raw_nagle);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let tally = Tally::shared(total, count);
        let mut connecting = stream::iter(0..count)
            .map(|_| {
                within(
                    SETUP_TIMEOUT,
                    "raw subscriber connect",
                    raw::connect(&url, nodelay),
                )
            })
            .buffer_unordered(args.connect_concurrency);
        while let Some(socket) = connecting.next().await {
            tokio::task::spawn_local(raw_count(socket?, tally.clone(), total));
        }
        drop(connecting);
        println!("READY {count}");
        stdin_command_loop(|_| {}).await;
        Ok::<_, BoxError>(())
    })?;
    std::process::exit(0)
}

async fn raw_count(mut socket: RawClient, tally: Rc<RefCell<Tally>>, total: usize) {
    let mut received = 0;
    while received < total {
        match socket.next().await {
            Some(Ok(Message::Text(_))) => {
                tally.borrow_mut().received(received);
                received += 1;
            }
            Some(Ok(Message::Close(_))) | None => {
                tracing::error!(received, "raw subscriber's connection closed");
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::error!(received, error = %e, "raw subscriber's connection failed");
                return;
            }
        }
    }
}
