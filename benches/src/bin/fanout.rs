//! Fan-out benchmark: one publisher, many subscribers, one channel, over loopback.
//!
//! For each subscriber count, Tether (an embedded hub with a `ChannelService`, one `Transport`
//! and channel per subscriber, a publish-only channel on another) and a raw tokio-tungstenite
//! broadcast relay are measured in the same run: deliveries/s, i.e. subscribers × messages
//! divided by the time from the first publish until every subscriber has every message. Both
//! systems are set up side by side (setup is not measured) and warmed up, then measured in
//! alternating rounds; the median round is reported.
//!
//! `cargo run --release -p tether-benches --bin fanout -- --help`

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::stream::{self, FuturesUnordered};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tether_benches::payload::{make_payload, Clock};
use tether_benches::raw::{self, RawClient, RelayHandle};
use tether_benches::report::{bytes_text, ratio_text, thousands, write_json, Table};
use tether_benches::stats::{per_second, ratio, Completion, RoundRates};
use tether_benches::tether::{self as tether_side, CHANNEL};
use tether_benches::{sys, within, BoxError};
use tether_channels::{Channel, ChannelEvent, ChannelEvents, ChannelOptions};
use tether_transport::hub::HubHandle;
use tether_transport::protocol::Payload;
use tether_transport::Transport;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

/// Time one subscriber has to connect (and, for Tether, attach).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Batches queued per subscriber in the raw relay.
const RAW_QUEUE: usize = 64;

#[derive(Debug, Parser)]
#[command(
    about = "Fan-out deliveries/s with one publisher and many subscribers: Tether vs a raw WebSocket broadcast relay"
)]
struct Args {
    /// Subscriber counts (comma-separated); one row each.
    #[arg(long, value_delimiter = ',', default_values_t = [1000usize])]
    subscribers: Vec<usize>,
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
    /// Connections being set up at once.
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
}

impl Args {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// Messages a subscriber receives over the whole run.
    fn total(&self) -> usize {
        self.warmup + self.rounds * self.messages
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
}

impl Figures {
    fn new(rates: &RoundRates, setup: Duration) -> Self {
        Figures {
            deliveries_per_sec: rates.median(),
            min_deliveries_per_sec: rates.min(),
            max_deliveries_per_sec: rates.max(),
            rounds: rates.rounds.clone(),
            setup_ms: setup.as_secs_f64() * 1000.0,
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
struct Row {
    subscribers: usize,
    tether: Figures,
    raw: Figures,
    /// tether deliveries/s ÷ raw deliveries/s (medians).
    ratio: f64,
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

#[actix::main]
async fn main() -> ExitCode {
    sys::init_tracing();
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), BoxError> {
    if args.messages == 0 || args.rounds == 0 || args.window == 0 || args.connect_concurrency == 0 {
        return Err(
            "--messages, --rounds, --window and --connect-concurrency must be at least 1".into(),
        );
    }
    if args.subscribers.contains(&0) {
        return Err("subscriber counts must be at least 1".into());
    }
    let most = args.subscribers.iter().copied().max().unwrap_or(0);
    let limit = sys::raise_nofile_limit()?;
    // Both systems are up at once: (subscribers + publisher) connections each.
    let needed = sys::fds_needed(2 * (most + 1));
    if limit < needed {
        return Err(format!(
            "{most} subscribers need about {needed} open files; the limit is {limit}"
        )
        .into());
    }
    println!(
        "fanout: 1 publisher → hub → N subscribers on 127.0.0.1; {} rounds × {} messages of {} \
         (+{} warm-up), window {}, open-file limit {limit}",
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
                "  {subscribers:>6} subscribers  {name:<6} {:>10} deliveries/s (rounds {}–{}; setup {:.0} ms)",
                thousands(f.deliveries_per_sec),
                thousands(f.min_deliveries_per_sec),
                thousands(f.max_deliveries_per_sec),
                f.setup_ms
            );
        }
        rows.push(Row {
            subscribers,
            ratio: ratio(tether.deliveries_per_sec, raw.deliveries_per_sec),
            tether,
            raw,
        });
    }

    let mut table = Table::new([
        "subscribers",
        "tether deliveries/s",
        "raw deliveries/s",
        "ratio",
    ]);
    for row in &rows {
        table.row([
            thousands(row.subscribers as f64),
            thousands(row.tether.deliveries_per_sec),
            thousands(row.raw.deliveries_per_sec),
            ratio_text(row.ratio),
        ]);
    }
    println!();
    println!("{table}");
    println!(
        "deliveries/s: median of the rounds; ratio = tether ÷ raw (1.00x = as fast as the raw relay)"
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
    let mut tether = TetherFanout::start(args, subscribers).await?;
    let mut raw = match RawFanout::start(args, subscribers).await {
        Ok(raw) => raw,
        Err(e) => {
            tether.stop().await;
            return Err(e);
        }
    };
    let measured = async {
        tether.round(0, args.warmup, args, clock).await?;
        raw.round(0, args.warmup, args, clock).await?;
        let deliveries = (subscribers * args.messages) as u64;
        let (mut t, mut r) = (RoundRates::default(), RoundRates::default());
        for round in 1..=args.rounds {
            let n = args.messages;
            if round % 2 == 1 {
                t.push(per_second(
                    deliveries,
                    tether.round(round, n, args, clock).await?,
                ));
                r.push(per_second(
                    deliveries,
                    raw.round(round, n, args, clock).await?,
                ));
            } else {
                r.push(per_second(
                    deliveries,
                    raw.round(round, n, args, clock).await?,
                ));
                t.push(per_second(
                    deliveries,
                    tether.round(round, n, args, clock).await?,
                ));
            }
        }
        Ok::<_, BoxError>((Figures::new(&t, tether.setup), Figures::new(&r, raw.setup)))
    }
    .await;
    tether.stop().await;
    raw.stop().await;
    measured
}

/// Latches per phase: latch 0 opens when every subscriber has the warm-up, latch k when every
/// subscriber has the messages of round k.
struct Progress {
    latches: Vec<Completion>,
    warmup: usize,
    per_round: usize,
    total: usize,
}

impl Progress {
    fn new(subscribers: usize, args: &Args) -> Arc<Self> {
        Arc::new(Progress {
            latches: (0..=args.rounds)
                .map(|_| Completion::new(subscribers))
                .collect(),
            warmup: args.warmup,
            per_round: args.messages,
            total: args.total(),
        })
    }

    /// A subscriber now holds `received` messages (called from 0 on).
    fn received(&self, received: usize) {
        if let Some(past_warmup) = received.checked_sub(self.warmup) {
            if past_warmup % self.per_round == 0 {
                if let Some(latch) = self.latches.get(past_warmup / self.per_round) {
                    latch.arrive();
                }
            }
        }
    }

    /// Waits until every subscriber completed phase `phase`; returns when the last one did.
    async fn wait(&self, phase: usize, what: &str, timeout: Duration) -> Result<Instant, BoxError> {
        let latch = self.latches.get(phase).ok_or("no such phase")?;
        tokio::time::timeout(timeout, latch.wait())
            .await
            .map_err(|_| {
                format!(
                    "{what}: {} subscribers still incomplete after {timeout:?}",
                    latch.remaining()
                )
                .into()
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Tether

/// An embedded hub, `subscribers` subscribing transports and one publishing transport.
struct TetherFanout {
    hub: HubHandle,
    transports: Vec<Transport>,
    _subscriptions: Vec<Channel>,
    channel: Option<Channel>,
    progress: Arc<Progress>,
    setup: Duration,
}

impl TetherFanout {
    async fn start(args: &Args, subscribers: usize) -> Result<Self, BoxError> {
        let hub = tether_side::start_hub(args.total(), args.payload)?;
        let mut fanout = TetherFanout {
            hub,
            transports: Vec::with_capacity(subscribers + 1),
            _subscriptions: Vec::with_capacity(subscribers),
            channel: None,
            progress: Progress::new(subscribers, args),
            setup: Duration::ZERO,
        };
        match fanout.connect(args, subscribers).await {
            Ok(()) => Ok(fanout),
            Err(e) => {
                fanout.stop().await;
                Err(e)
            }
        }
    }

    async fn connect(&mut self, args: &Args, subscribers: usize) -> Result<(), BoxError> {
        let started = Instant::now();
        let url = self.hub.ws_url();
        let mut connecting = stream::iter(0..subscribers)
            .map(|_| tether_side::connect(&url, CHANNEL, ChannelOptions::default(), SETUP_TIMEOUT))
            .buffer_unordered(args.connect_concurrency);
        while let Some(connected) = connecting.next().await {
            let (transport, channel, events) = connected?;
            self.transports.push(transport);
            self._subscriptions.push(channel);
            actix_rt::spawn(tether_count(events, self.progress.clone()));
        }
        let (publisher, channel, _) =
            tether_side::connect(&url, CHANNEL, ChannelOptions::publish_only(), SETUP_TIMEOUT)
                .await?;
        self.transports.push(publisher);
        self.channel = Some(channel);
        self.setup = started.elapsed();
        Ok(())
    }

    /// Publishes `n` messages with at most `--window` unacknowledged; returns the time until
    /// every subscriber completed phase `phase`.
    async fn round(
        &mut self,
        phase: usize,
        n: usize,
        args: &Args,
        clock: Clock,
    ) -> Result<Duration, BoxError> {
        let channel = self.channel.as_ref().ok_or("no publisher")?;
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        let start = Instant::now();
        let publishing = async {
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
            Ok::<(), BoxError>(())
        };
        within(args.timeout(), "tether publishing", publishing).await?;
        let end = self
            .progress
            .wait(phase, "tether round", args.timeout())
            .await?;
        Ok(end - start)
    }

    async fn stop(self) {
        futures::future::join_all(self.transports.iter().map(Transport::close)).await;
        self.hub.stop().await;
    }
}

async fn tether_count(mut events: ChannelEvents, progress: Arc<Progress>) {
    let mut received = 0;
    progress.received(received);
    while received < progress.total {
        match events.recv().await {
            Some(ChannelEvent::Message(_)) => {
                received += 1;
                progress.received(received);
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

// ---------------------------------------------------------------------------------------------
// Raw baseline

/// A raw broadcast relay, `subscribers` subscriber sockets (each read by a counting task) and a
/// publisher socket.
struct RawFanout {
    relay: RelayHandle,
    publisher: Option<RawClient>,
    permits: Arc<Semaphore>,
    progress: Arc<Progress>,
    setup: Duration,
}

impl RawFanout {
    async fn start(args: &Args, subscribers: usize) -> Result<Self, BoxError> {
        let nodelay = !args.raw_nagle;
        let relay = raw::spawn_broadcast_relay(subscribers, RAW_QUEUE, nodelay)?;
        let mut fanout = RawFanout {
            relay,
            publisher: None,
            permits: Arc::new(Semaphore::new(args.window)),
            progress: Progress::new(subscribers, args),
            setup: Duration::ZERO,
        };
        match fanout.connect(args, subscribers, nodelay).await {
            Ok(()) => Ok(fanout),
            Err(e) => {
                fanout.stop().await;
                Err(e)
            }
        }
    }

    async fn connect(
        &mut self,
        args: &Args,
        subscribers: usize,
        nodelay: bool,
    ) -> Result<(), BoxError> {
        let started = Instant::now();
        let url = self.relay.url();
        // A message frees a window slot once every subscriber has it.
        let delivered: Arc<Vec<AtomicUsize>> =
            Arc::new((0..args.total()).map(|_| AtomicUsize::new(0)).collect());
        // Accept order decides the roles: every subscriber first, then the publisher.
        let mut connecting = stream::iter(0..subscribers)
            .map(|_| {
                within(
                    SETUP_TIMEOUT,
                    "raw subscriber connect",
                    raw::connect(&url, nodelay),
                )
            })
            .buffer_unordered(args.connect_concurrency);
        while let Some(socket) = connecting.next().await {
            actix_rt::spawn(raw_count(
                socket?,
                self.progress.clone(),
                delivered.clone(),
                self.permits.clone(),
                subscribers,
            ));
        }
        let publisher = within(
            SETUP_TIMEOUT,
            "raw publisher connect",
            raw::connect(&url, nodelay),
        )
        .await?;
        self.publisher = Some(publisher);
        self.setup = started.elapsed();
        Ok(())
    }

    /// Sends `n` messages, each once a window slot is free, flushing whenever it has to wait;
    /// returns the time until every subscriber completed phase `phase`.
    async fn round(
        &mut self,
        phase: usize,
        n: usize,
        args: &Args,
        clock: Clock,
    ) -> Result<Duration, BoxError> {
        let publisher = self.publisher.as_mut().ok_or("no publisher")?;
        let permits = &self.permits;
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        let start = Instant::now();
        let publishing = async {
            for _ in 0..n {
                match permits.try_acquire() {
                    Ok(permit) => permit.forget(),
                    Err(_) => {
                        publisher.flush().await?;
                        permits.acquire().await?.forget();
                    }
                }
                publisher
                    .feed(Message::text(make_payload(args.payload, clock.micros())))
                    .await?;
            }
            publisher.flush().await?;
            Ok::<(), BoxError>(())
        };
        within(args.timeout(), "raw publishing", publishing).await?;
        let end = self
            .progress
            .wait(phase, "raw round", args.timeout())
            .await?;
        Ok(end - start)
    }

    async fn stop(mut self) {
        // Without a publisher the relay is still accepting: it cannot end by itself.
        let mut wait = Duration::ZERO;
        if let Some(mut publisher) = self.publisher.take() {
            if let Err(e) = publisher.close(None).await {
                tracing::debug!(error = %e, "raw publisher close");
            }
            wait = Duration::from_secs(10);
        }
        if !self.relay.join(wait).await && !wait.is_zero() {
            tracing::warn!("raw relay still running after the run");
        }
    }
}

async fn raw_count(
    mut socket: RawClient,
    progress: Arc<Progress>,
    delivered: Arc<Vec<AtomicUsize>>,
    permits: Arc<Semaphore>,
    subscribers: usize,
) {
    let mut received = 0;
    progress.received(received);
    while received < progress.total {
        match socket.next().await {
            Some(Ok(Message::Text(_))) => {
                if let Some(count) = delivered.get(received) {
                    if count.fetch_add(1, Ordering::AcqRel) + 1 == subscribers {
                        permits.add_permits(1);
                    }
                }
                received += 1;
                progress.received(received);
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
