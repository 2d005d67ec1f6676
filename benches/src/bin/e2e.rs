//! End-to-end benchmark: one publisher → hub → one subscriber on one channel, over loopback.
//!
//! For each payload size, Tether (an embedded hub with a `ChannelService`, a publish-only
//! channel and a subscribing channel on two `Transport`s) and a raw tokio-tungstenite relay are
//! measured in the same run: throughput (messages/s until the subscriber has all of them) and
//! latency (p50/p99 in µs from the publish call to receipt, from a timestamp in the payload).
//! Both keep at most `--window` messages outstanding: Tether's unacknowledged publishes; the
//! raw publisher (which has no acks) the messages its subscriber has not received yet. Both
//! systems are set up side by side and warmed up, then measured in alternating rounds; the
//! median round is reported.
//!
//! A second phase then measures latency at a given load: each system publishes
//! `--paced-messages` at `--paced-fraction` (default half) of its own measured maximum (the
//! median round above), paced by a [`Pacer`] thread, and reports p50/p99 there. The issue's
//! targets are printed next to the figures (they are targets, not assertions): throughput
//! ratio ≥ 0.5× at 64 B and ≥ 0.6× at 1 KiB, p99 ≤ 1 ms at half the maximum rate.
//!
//! `cargo run --release -p tether-benches --bin e2e -- --help`

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tether_benches::pacer::Pacer;
use tether_benches::payload::{make_payload, sent_at, Clock};
use tether_benches::raw::{self, RawClient, RelayHandle};
use tether_benches::report::{bytes_text, ratio_text, thousands, write_json, Table};
use tether_benches::stats::{per_second, ratio, Latencies, LatencySummary, RoundRates};
use tether_benches::tether::{self as tether_side, CHANNEL};
use tether_benches::{sys, within, BoxError};
use tether_channels::hub::Retention;
use tether_channels::{BufferLimits, Channel, ChannelEvent, ChannelEvents, ChannelOptions};
use tether_transport::hub::HubHandle;
use tether_transport::Transport;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

/// Time a channel has to attach, and a raw socket to connect.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    about = "End-to-end publish → hub → subscriber throughput and latency: Tether vs a raw WebSocket relay"
)]
struct Args {
    /// Messages per measured round, per payload size.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Measured rounds per payload size, Tether and raw alternating; the median round's
    /// throughput is reported, latency percentiles are over every measured message.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Messages sent first and not measured, on the same connections.
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Most messages outstanding at once.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Payload sizes in bytes (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 1024])]
    payloads: Vec<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Leave Nagle's algorithm on for the raw baseline's sockets (by default the raw relay and
    /// clients set TCP_NODELAY, as low-latency WebSocket servers usually do).
    #[arg(long)]
    raw_nagle: bool,
    /// Pause before every round (and warm-up) so the other system's leftover work has drained.
    #[arg(long, default_value_t = 100)]
    settle_ms: u64,
    /// Give up on a round (or the warm-up) after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Latency phase: publish at this fraction of each system's own measured maximum rate
    /// (0 skips the phase).
    #[arg(long, default_value_t = 0.5)]
    paced_fraction: f64,
    /// Latency phase: messages published at the paced rate, per system and payload size.
    #[arg(long, default_value_t = 20_000)]
    paced_messages: usize,
    /// Tether publishes the payloads as opaque bytes (`Payload::from_bytes`: no JSON check)
    /// instead of checked JSON text. The raw relay carries the same bytes either way.
    #[arg(long)]
    opaque: bool,
    /// Messages the hub's channel history keeps (default: the hub's own default, the last
    /// 1,000). `0` keeps every message the run publishes, so the hub holds every frame it
    /// received until the run ends: each new frame is then fresh memory, and the page faults
    /// of touching it cost the hub's thread about 40 % at 1 KiB.
    #[arg(long, default_value_t = Retention::default().max_messages)]
    history: usize,
}

/// Target throughput ratio (tether ÷ raw) for a payload size, from issue 9: ≥ 0.5× at 64 B,
/// ≥ 0.6× at 1 KiB; none for other sizes.
fn ratio_target(payload: usize) -> Option<f64> {
    match payload {
        64 => Some(0.5),
        1024 => Some(0.6),
        _ => None,
    }
}

/// Target p99 latency at half the maximum rate, µs (issue 9).
const PACED_P99_TARGET_US: u64 = 1_000;

/// `met` or `MISSED`.
fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

impl Args {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    fn settle(&self) -> Duration {
        Duration::from_millis(self.settle_ms)
    }
}

/// One round of one system.
struct Round {
    elapsed: Duration,
    latencies: Latencies,
}

/// The threads of Tether's embedded hub: actix-server's and the hub's own (its metrics upkeep).
const TETHER_SERVER: &[&str] = &["actix-", "tether-"];

/// The raw relay's thread.
const RAW_SERVER: &[&str] = &["raw-pair-relay"];

/// CPU time used so far by the clients (this process's main thread, where both systems'
/// clients run) and by one system's server threads (named with one of its prefixes).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    clients: Duration,
    server: Duration,
}

impl Cpu {
    fn now(server: &[&str]) -> Cpu {
        Cpu {
            clients: sys::threads_cpu(None),
            server: server.iter().map(|p| sys::threads_cpu(Some(p))).sum(),
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            clients: self.clients.saturating_sub(before.clients),
            server: self.server.saturating_sub(before.server),
        }
    }
}

/// Every measured round of one system for one payload size.
#[derive(Default)]
struct Rounds {
    rates: RoundRates,
    latencies: Latencies,
    cpu: Cpu,
    messages: u64,
}

impl Rounds {
    fn add(&mut self, messages: usize, round: Round, cpu: Cpu) {
        self.rates.push(per_second(messages as u64, round.elapsed));
        self.latencies.extend(&round.latencies);
        self.cpu.clients += cpu.clients;
        self.cpu.server += cpu.server;
        self.messages += messages as u64;
    }

    fn figures(&self) -> Figures {
        let per_message = |d: Duration| d.as_secs_f64() * 1e6 / self.messages.max(1) as f64;
        Figures {
            msgs_per_sec: self.rates.median(),
            min_msgs_per_sec: self.rates.min(),
            max_msgs_per_sec: self.rates.max(),
            rounds: self.rates.rounds.clone(),
            latency: self.latencies.summary(),
            client_cpu_us_per_msg: per_message(self.cpu.clients),
            server_cpu_us_per_msg: per_message(self.cpu.server),
        }
    }
}

/// One system's figures for one payload size.
#[derive(Debug, Clone, Serialize)]
struct Figures {
    /// The median round's throughput (the reported figure).
    msgs_per_sec: f64,
    min_msgs_per_sec: f64,
    max_msgs_per_sec: f64,
    /// Every round's throughput, in order.
    rounds: Vec<f64>,
    /// Publish call → receipt, over every measured message.
    latency: LatencySummary,
    /// CPU of the clients' thread (publisher and subscriber) per message, over every measured
    /// round, in µs.
    client_cpu_us_per_msg: f64,
    /// CPU of the hub's (relay's) threads per message, over every measured round, in µs.
    server_cpu_us_per_msg: f64,
}

/// One system's latency at a paced rate.
#[derive(Debug, Clone, Serialize)]
struct Paced {
    /// The rate asked for: `--paced-fraction` × this system's median msgs/s.
    target_msgs_per_sec: f64,
    /// Messages ÷ time until the subscriber had all of them.
    achieved_msgs_per_sec: f64,
    /// Publish call → receipt, over every paced message.
    latency: LatencySummary,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
struct Row {
    payload_bytes: usize,
    tether: Figures,
    raw: Figures,
    /// tether msgs/s ÷ raw msgs/s (medians).
    throughput_ratio: f64,
    /// The target for `throughput_ratio`, where it sets one for this size.
    throughput_ratio_target: Option<f64>,
    /// Latency at the paced rate (absent with `--paced-fraction 0`).
    tether_paced: Option<Paced>,
    raw_paced: Option<Paced>,
}

/// The whole report (what `--json` writes).
#[derive(Debug, Clone, Serialize)]
struct Report {
    benchmark: &'static str,
    messages_per_round: usize,
    rounds: usize,
    warmup: usize,
    window: usize,
    paced_fraction: f64,
    paced_messages: usize,
    rows: Vec<Row>,
}

#[actix::main]
async fn main() -> ExitCode {
    sys::init_tracing();
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), BoxError> {
    if args.messages == 0 || args.window == 0 || args.rounds == 0 {
        return Err("--messages, --rounds and --window must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&args.paced_fraction) {
        return Err("--paced-fraction must be between 0 and 1".into());
    }
    println!(
        "e2e: 1 publisher → hub → 1 subscriber on 127.0.0.1; {} rounds × {} messages per payload \
         size (+{} warm-up), window {}",
        args.rounds, args.messages, args.warmup, args.window
    );
    let clock = Clock::new();
    let mut rows = Vec::new();
    for &size in &args.payloads {
        let measured = measure_payload(args, size, clock).await?;
        let (tether, raw) = (measured.tether, measured.raw);
        for (name, f) in [("tether", &tether), ("raw", &raw)] {
            println!(
                "  {:>7}  {name:<6} {:>9} msgs/s (rounds {}–{})  p50 {} µs  p99 {} µs  max {} µs  \
                 CPU per message: clients {:.2} µs, {} {:.2} µs",
                bytes_text(size),
                thousands(f.msgs_per_sec),
                thousands(f.min_msgs_per_sec),
                thousands(f.max_msgs_per_sec),
                f.latency.p50_us,
                f.latency.p99_us,
                f.latency.max_us,
                f.client_cpu_us_per_msg,
                if name == "tether" { "hub" } else { "relay" },
                f.server_cpu_us_per_msg,
            );
        }
        for (name, p) in [
            ("tether", &measured.tether_paced),
            ("raw", &measured.raw_paced),
        ] {
            if let Some(p) = p {
                println!(
                    "  {:>7}  {name:<6} paced at {} msgs/s (achieved {}): p50 {} µs  p99 {} µs  max {} µs",
                    bytes_text(size),
                    thousands(p.target_msgs_per_sec),
                    thousands(p.achieved_msgs_per_sec),
                    p.latency.p50_us,
                    p.latency.p99_us,
                    p.latency.max_us,
                );
            }
        }
        rows.push(Row {
            payload_bytes: size,
            throughput_ratio: ratio(tether.msgs_per_sec, raw.msgs_per_sec),
            throughput_ratio_target: ratio_target(size),
            tether,
            raw,
            tether_paced: measured.tether_paced,
            raw_paced: measured.raw_paced,
        });
    }

    let mut table = Table::new([
        "payload",
        "tether msgs/s",
        "raw msgs/s",
        "ratio",
        "target",
        "tether p50/p99 µs",
        "raw p50/p99 µs",
        "clients CPU µs/msg tether / raw",
        "hub / relay CPU µs/msg",
    ]);
    for row in &rows {
        let target = match row.throughput_ratio_target {
            Some(t) => format!("≥ {} {}", ratio_text(t), verdict(row.throughput_ratio >= t)),
            None => "—".into(),
        };
        table.row([
            bytes_text(row.payload_bytes),
            thousands(row.tether.msgs_per_sec),
            thousands(row.raw.msgs_per_sec),
            ratio_text(row.throughput_ratio),
            target,
            format!(
                "{} / {}",
                row.tether.latency.p50_us, row.tether.latency.p99_us
            ),
            format!("{} / {}", row.raw.latency.p50_us, row.raw.latency.p99_us),
            format!(
                "{:.2} / {:.2}",
                row.tether.client_cpu_us_per_msg, row.raw.client_cpu_us_per_msg
            ),
            format!(
                "{:.2} / {:.2}",
                row.tether.server_cpu_us_per_msg, row.raw.server_cpu_us_per_msg
            ),
        ]);
    }
    println!();
    println!("{table}");
    println!("msgs/s: median of the rounds; ratio = tether msgs/s ÷ raw msgs/s (1.00x = as fast as the raw relay); latency over every message of the flat-out rounds");
    println!("CPU µs/msg: each thread's CPU clock over every flat-out round ÷ its messages; clients = the benchmark's thread, where both systems' publisher and subscriber run");

    if args.paced_fraction > 0.0 {
        let mut paced = Table::new([
            "payload",
            "tether paced msgs/s",
            "tether p50/p99 µs",
            "target p99",
            "raw paced msgs/s",
            "raw p50/p99 µs",
        ]);
        for row in &rows {
            let (Some(t), Some(r)) = (&row.tether_paced, &row.raw_paced) else {
                continue;
            };
            paced.row([
                bytes_text(row.payload_bytes),
                format!(
                    "{} (asked {})",
                    thousands(t.achieved_msgs_per_sec),
                    thousands(t.target_msgs_per_sec)
                ),
                format!("{} / {}", t.latency.p50_us, t.latency.p99_us),
                format!(
                    "≤ {PACED_P99_TARGET_US} µs {}",
                    verdict(t.latency.p99_us <= PACED_P99_TARGET_US)
                ),
                format!(
                    "{} (asked {})",
                    thousands(r.achieved_msgs_per_sec),
                    thousands(r.target_msgs_per_sec)
                ),
                format!("{} / {}", r.latency.p50_us, r.latency.p99_us),
            ]);
        }
        println!();
        println!(
            "Latency at {:.0} % of each system's own maximum ({} messages each, paced):",
            args.paced_fraction * 100.0,
            args.paced_messages
        );
        println!("{paced}");
        println!(
            "asked = {} × that system's median msgs/s above; achieved = messages ÷ time until the subscriber had them all",
            args.paced_fraction
        );
    }

    if let Some(path) = &args.json {
        let report = Report {
            benchmark: "e2e",
            messages_per_round: args.messages,
            rounds: args.rounds,
            warmup: args.warmup,
            window: args.window,
            paced_fraction: args.paced_fraction,
            paced_messages: args.paced_messages,
            rows,
        };
        write_json(path, &report)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Both systems' figures for one payload size.
struct Measured {
    tether: Figures,
    raw: Figures,
    tether_paced: Option<Paced>,
    raw_paced: Option<Paced>,
}

/// One paced run: `n` messages at `fraction` × `max_rate`.
fn paced(n: usize, target: f64, round: Round) -> Paced {
    Paced {
        target_msgs_per_sec: target,
        achieved_msgs_per_sec: per_second(n as u64, round.elapsed),
        latency: round.latencies.summary(),
    }
}

/// Sets up both systems for one payload size, warms both up, then runs the rounds, alternating
/// which system goes first; then the paced latency phase, Tether first.
async fn measure_payload(args: &Args, size: usize, clock: Clock) -> Result<Measured, BoxError> {
    let paced_messages = if args.paced_fraction > 0.0 {
        args.paced_messages
    } else {
        0
    };
    let retained = match args.history {
        0 => args.warmup + args.rounds * args.messages + paced_messages,
        n => n,
    };
    let mut tether =
        TetherPair::start(retained, size, args.window, args.settle(), args.opaque).await?;
    let mut raw = match RawPair::start(!args.raw_nagle, args.settle()).await {
        Ok(raw) => raw,
        Err(e) => {
            tether.stop().await;
            return Err(e);
        }
    };
    let measured = async {
        let timeout = args.timeout();
        let (window, warmup) = (args.window, args.warmup);
        within(
            timeout,
            "tether warm-up",
            tether.round(warmup, size, window, clock, None),
        )
        .await?;
        within(
            timeout,
            "raw warm-up",
            raw.round(warmup, size, window, clock, None),
        )
        .await?;
        let (mut t, mut r) = (Rounds::default(), Rounds::default());
        for i in 0..args.rounds {
            let n = args.messages;
            // Alternating which goes first, so neither always follows the other's leftovers.
            let order = if i % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for tether_turn in order {
                if tether_turn {
                    let before = Cpu::now(TETHER_SERVER);
                    let round = within(
                        timeout,
                        "tether round",
                        tether.round(n, size, window, clock, None),
                    )
                    .await?;
                    t.add(n, round, Cpu::now(TETHER_SERVER).since(before));
                } else {
                    let before = Cpu::now(RAW_SERVER);
                    let round = within(
                        timeout,
                        "raw round",
                        raw.round(n, size, window, clock, None),
                    )
                    .await?;
                    r.add(n, round, Cpu::now(RAW_SERVER).since(before));
                }
            }
        }
        let (tether_figures, raw_figures) = (t.figures(), r.figures());
        let (mut tether_paced, mut raw_paced) = (None, None);
        if paced_messages > 0 {
            let n = paced_messages;
            let rate = args.paced_fraction * tether_figures.msgs_per_sec;
            let round = within(
                timeout,
                "tether paced run",
                tether.round(n, size, window, clock, Some(rate)),
            )
            .await?;
            tether_paced = Some(paced(n, rate, round));
            let rate = args.paced_fraction * raw_figures.msgs_per_sec;
            let round = within(
                timeout,
                "raw paced run",
                raw.round(n, size, window, clock, Some(rate)),
            )
            .await?;
            raw_paced = Some(paced(n, rate, round));
        }
        Ok::<_, BoxError>(Measured {
            tether: tether_figures,
            raw: raw_figures,
            tether_paced,
            raw_paced,
        })
    }
    .await;
    tether.stop().await;
    raw.stop().await;
    measured
}

// ---------------------------------------------------------------------------------------------
// Tether

/// An embedded hub, a publisher and a subscriber, attached to the same channel.
struct TetherPair {
    hub: HubHandle,
    publisher: Transport,
    subscriber: Transport,
    channel: Channel,
    _subscription: Channel,
    events: Option<ChannelEvents>,
    settle: Duration,
    opaque: bool,
}

impl TetherPair {
    async fn start(
        retained: usize,
        size: usize,
        window: usize,
        settle: Duration,
        opaque: bool,
    ) -> Result<Self, BoxError> {
        let hub = tether_side::start_hub(retained, size)?;
        let url = hub.ws_url();
        let subscriber =
            tether_side::connect(&url, CHANNEL, ChannelOptions::default(), SETUP_TIMEOUT).await;
        let (subscriber, subscription, events) = match subscriber {
            Ok(s) => s,
            Err(e) => {
                hub.stop().await;
                return Err(e);
            }
        };
        let options = ChannelOptions {
            limits: BufferLimits {
                max_messages: BufferLimits::default().max_messages.max(window * 2),
                ..BufferLimits::default()
            },
            ..ChannelOptions::publish_only()
        };
        match tether_side::connect(&url, CHANNEL, options, SETUP_TIMEOUT).await {
            Ok((publisher, channel, _)) => Ok(TetherPair {
                hub,
                publisher,
                subscriber,
                channel,
                _subscription: subscription,
                events: Some(events),
                settle,
                opaque,
            }),
            Err(e) => {
                subscriber.close().await;
                hub.stop().await;
                Err(e)
            }
        }
    }

    /// Publishes `n` messages with at most `window` unacknowledged (at `paced` messages/s when
    /// given), until the subscriber has received all of them.
    async fn round(
        &mut self,
        n: usize,
        size: usize,
        window: usize,
        clock: Clock,
        paced: Option<f64>,
    ) -> Result<Round, BoxError> {
        tokio::time::sleep(self.settle).await;
        // Started after the settle pause, so no turn piles up during it.
        let pacer = paced.map(|rate| Pacer::start(n, rate)).transpose()?;
        let pacer = pacer.as_ref();
        let events = self.events.take().ok_or("the subscriber failed earlier")?;
        let receiver = actix_rt::spawn(tether_receive(events, n, clock));
        let start = Instant::now();
        tether_side::publish_paced(&self.channel, n, size, window, clock, pacer, self.opaque)
            .await?;
        let (events, latencies, end) = receiver.await??;
        self.events = Some(events);
        Ok(Round {
            elapsed: end - start,
            latencies,
        })
    }

    async fn stop(self) {
        self.publisher.close().await;
        self.subscriber.close().await;
        self.hub.stop().await;
    }
}

async fn tether_receive(
    mut events: ChannelEvents,
    n: usize,
    clock: Clock,
) -> Result<(ChannelEvents, Latencies, Instant), BoxError> {
    let mut latencies = Latencies::with_capacity(n);
    while latencies.len() < n {
        match events.recv().await {
            Some(ChannelEvent::Message(m)) => {
                let now = clock.micros();
                let sent = sent_at(m.payload.as_bytes()).ok_or("payload without a timestamp")?;
                latencies.record(now.saturating_sub(sent));
            }
            Some(ChannelEvent::Discontinuity(d)) => {
                return Err(format!("tether subscriber saw a discontinuity: {d:?}").into())
            }
            None => return Err("tether subscriber's channel closed".into()),
        }
    }
    Ok((events, latencies, Instant::now()))
}

// ---------------------------------------------------------------------------------------------
// Raw baseline

/// A raw relay with its subscriber and publisher sockets.
struct RawPair {
    relay: RelayHandle,
    publisher: RawClient,
    subscriber: Option<RawClient>,
    settle: Duration,
}

impl RawPair {
    async fn start(nodelay: bool, settle: Duration) -> Result<Self, BoxError> {
        let relay = raw::spawn_pair_relay(nodelay)?;
        let url = relay.url();
        // Accept order decides the roles: the subscriber first.
        let sockets = async {
            let subscriber = within(
                SETUP_TIMEOUT,
                "raw subscriber connect",
                raw::connect(&url, nodelay),
            )
            .await?;
            let publisher = within(
                SETUP_TIMEOUT,
                "raw publisher connect",
                raw::connect(&url, nodelay),
            )
            .await?;
            Ok::<_, BoxError>((subscriber, publisher))
        }
        .await;
        match sockets {
            Ok((subscriber, publisher)) => Ok(RawPair {
                relay,
                publisher,
                subscriber: Some(subscriber),
                settle,
            }),
            Err(e) => {
                relay.join(Duration::ZERO).await;
                Err(e)
            }
        }
    }

    /// Sends `n` messages keeping at most `window` not yet received by the subscriber (each
    /// at `paced` messages/s when given), flushing whenever it has to wait, until the
    /// subscriber has received all of them.
    async fn round(
        &mut self,
        n: usize,
        size: usize,
        window: usize,
        clock: Clock,
        paced: Option<f64>,
    ) -> Result<Round, BoxError> {
        tokio::time::sleep(self.settle).await;
        // Started after the settle pause, so no turn piles up during it.
        let pacer = paced.map(|rate| Pacer::start(n, rate)).transpose()?;
        let pacer = pacer.as_ref();
        let subscriber = self
            .subscriber
            .take()
            .ok_or("the subscriber failed earlier")?;
        let permits = Arc::new(Semaphore::new(window));
        let receiver = actix_rt::spawn(raw_receive(subscriber, n, clock, permits.clone()));
        let start = Instant::now();
        for _ in 0..n {
            if let Some(pacer) = pacer {
                if !pacer.try_next() {
                    // Nothing is held back while waiting for the next turn.
                    self.publisher.flush().await?;
                    pacer.next().await?;
                }
            }
            match permits.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(_) => {
                    self.publisher.flush().await?;
                    permits.acquire().await?.forget();
                }
            }
            self.publisher
                .feed(Message::text(make_payload(size, clock.micros())))
                .await?;
        }
        self.publisher.flush().await?;
        let (subscriber, latencies, end) = receiver.await??;
        self.subscriber = Some(subscriber);
        Ok(Round {
            elapsed: end - start,
            latencies,
        })
    }

    async fn stop(mut self) {
        if let Err(e) = self.publisher.close(None).await {
            tracing::debug!(error = %e, "raw publisher close");
        }
        drop(self.subscriber.take());
        if !self.relay.join(Duration::from_secs(5)).await {
            tracing::warn!("raw relay still running after the run");
        }
    }
}

async fn raw_receive(
    mut subscriber: RawClient,
    n: usize,
    clock: Clock,
    permits: Arc<Semaphore>,
) -> Result<(RawClient, Latencies, Instant), BoxError> {
    let mut latencies = Latencies::with_capacity(n);
    while latencies.len() < n {
        match subscriber.next().await {
            Some(Ok(Message::Text(text))) => {
                let now = clock.micros();
                let sent = sent_at(text.as_str()).ok_or("payload without a timestamp")?;
                latencies.record(now.saturating_sub(sent));
                permits.add_permits(1);
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err("raw subscriber's connection closed".into())
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok((subscriber, latencies, Instant::now()))
}
