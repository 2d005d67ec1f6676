//! Durable outbox benchmark: publishes/s (publish → hub ack, at most `--window` unacknowledged)
//! of one publisher with its outbox in memory and with the durable outbox (every publish
//! committed to a redb file before it is sent; concurrent publishes share a commit), measured
//! in alternating rounds of one run against one embedded hub. Reports the median round of
//! each and the ratio durable ÷ memory, with the durable side's publish → accepted (committed)
//! and publish → ack latencies.
//!
//! The store lives in `--dir` (default: the system's temporary directory), so the figure is
//! that disk's fsync cost: a tmpfs measures no fsync at all.
//!
//! `cargo run --release -p tether-benches --bin durable -- --help`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::Serialize;
use tether_benches::payload::{make_payload, Clock};
use tether_benches::report::{ratio_text, thousands, write_json, Table};
use tether_benches::stats::{per_second, ratio, Latencies, LatencySummary, RoundRates};
use tether_benches::tether::{self as tether_side, client_config, CHANNEL};
use tether_benches::BoxError;
use tether_channels::durable::DurableStore;
use tether_channels::{BufferLimits, Channel, ChannelOptions, ChannelState};
use tether_transport::protocol::Payload;
use tether_transport::Transport;

const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Parser)]
#[command(about = "Publishes/s with the outbox in memory vs the durable (redb) outbox")]
struct Args {
    /// Publishes per measured round.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Measured rounds per configuration (they alternate round by round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Most unacknowledged publishes at once.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Directory for the durable stores (one file per round, removed after it).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    messages: usize,
    window: usize,
    payload: usize,
    dir: String,
    memory: RoundRates,
    durable: RoundRates,
    ratio: f64,
    durable_accepted: LatencySummary,
    durable_ack: LatencySummary,
    memory_ack: LatencySummary,
}

/// One round: `n` publishes with at most `window` outstanding; returns publishes/s and the
/// publish → accepted and publish → ack latencies.
async fn round(
    channel: &Channel,
    n: usize,
    size: usize,
    window: usize,
) -> Result<(f64, Latencies, Latencies), BoxError> {
    let clock = Clock::new();
    let mut accepted = Latencies::with_capacity(n);
    let mut acked = Latencies::with_capacity(n);
    let mut outstanding = FuturesUnordered::new();
    let started = Instant::now();
    for _ in 0..n {
        if outstanding.len() >= window {
            if let Some(result) = outstanding.next().await {
                let (accepted_us, ack_us) = result?;
                accepted.record(accepted_us);
                acked.record(ack_us);
            }
        }
        let sent = clock.micros();
        let payload = Payload::from_json(&make_payload(size, sent))?;
        let mut publish = channel.publish_payload(payload);
        outstanding.push(async move {
            publish.accepted().await?;
            let accepted_us = clock.micros().saturating_sub(sent);
            publish.await?;
            Ok::<_, BoxError>((accepted_us, clock.micros().saturating_sub(sent)))
        });
    }
    while let Some(result) = outstanding.next().await {
        let (accepted_us, ack_us) = result?;
        accepted.record(accepted_us);
        acked.record(ack_us);
    }
    let rate = per_second(n as u64, started.elapsed());
    Ok((rate, accepted, acked))
}

fn options(args: &Args) -> ChannelOptions {
    ChannelOptions {
        limits: BufferLimits {
            max_in_flight: args.window,
            ..BufferLimits::default()
        },
        ..ChannelOptions::publish_only()
    }
}

async fn wait_attached(channel: &Channel) -> Result<(), BoxError> {
    let mut state = channel.watch_state();
    tokio::time::timeout(
        SETUP_TIMEOUT,
        state.wait_for(|s| *s == ChannelState::Attached),
    )
    .await
    .map_err(|_| "channel not attached in time")??;
    Ok(())
}

async fn run(args: Args) -> Result<Report, BoxError> {
    let total = args.messages * args.rounds * 2 + 2 * args.window;
    let hub = tether_side::start_hub(total, args.payload)?;
    let url = hub.ws_url();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("tether-durable-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let memory_transport = Transport::start(client_config(&url)?);
    let (memory_channel, _events) =
        tether_side::open_attached(&memory_transport, CHANNEL, options(&args), SETUP_TIMEOUT)
            .await?;

    let mut report = Report {
        messages: args.messages,
        window: args.window,
        payload: args.payload,
        dir: dir.display().to_string(),
        memory: RoundRates::default(),
        durable: RoundRates::default(),
        ratio: f64::NAN,
        durable_accepted: Latencies::default().summary(),
        durable_ack: Latencies::default().summary(),
        memory_ack: Latencies::default().summary(),
    };
    let (mut durable_accepted, mut durable_ack, mut memory_ack) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    // Warm-up: one small round each, not counted.
    round(&memory_channel, args.window * 4, args.payload, args.window).await?;
    for r in 0..args.rounds {
        let (rate, _, acked) =
            round(&memory_channel, args.messages, args.payload, args.window).await?;
        report.memory.push(rate);
        memory_ack.extend(&acked);

        let path = dir.join(format!("round-{r}.redb"));
        let store = DurableStore::open(&path)?;
        let transport = Transport::start(store.transport_config(url.clone()).build()?);
        let (channel, _events, _recovered) =
            Channel::open_durable(&transport, CHANNEL, options(&args), &store).await?;
        wait_attached(&channel).await?;
        if r == 0 {
            round(&channel, args.window * 4, args.payload, args.window).await?;
        }
        let (rate, accepted, acked) =
            round(&channel, args.messages, args.payload, args.window).await?;
        report.durable.push(rate);
        durable_accepted.extend(&accepted);
        durable_ack.extend(&acked);
        channel.detach().await;
        transport.close().await;
        drop(store);
        let _ = std::fs::remove_file(&path);
    }
    report.ratio = ratio(report.durable.median(), report.memory.median());
    report.durable_accepted = durable_accepted.summary();
    report.durable_ack = durable_ack.summary();
    report.memory_ack = memory_ack.summary();
    memory_transport.close().await;
    hub.stop().await;
    let _ = std::fs::remove_dir(&dir);
    Ok(report)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json.clone();
    let result = actix::System::new().block_on(run(args));
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("durable bench failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{} publishes per round, window {}, {} B payloads, store in {}",
        report.messages, report.window, report.payload, report.dir
    );
    let mut table = Table::new([
        "outbox",
        "publishes/s (median)",
        "min",
        "max",
        "ack p50 µs",
        "ack p99 µs",
        "accepted p50 µs",
        "accepted p99 µs",
    ]);
    table.row([
        "memory".to_owned(),
        thousands(report.memory.median()),
        thousands(report.memory.min()),
        thousands(report.memory.max()),
        report.memory_ack.p50_us.to_string(),
        report.memory_ack.p99_us.to_string(),
        String::new(),
        String::new(),
    ]);
    table.row([
        "durable (redb)".to_owned(),
        thousands(report.durable.median()),
        thousands(report.durable.min()),
        thousands(report.durable.max()),
        report.durable_ack.p50_us.to_string(),
        report.durable_ack.p99_us.to_string(),
        report.durable_accepted.p50_us.to_string(),
        report.durable_accepted.p99_us.to_string(),
    ]);
    println!("{}", table.render());
    println!("durable / memory: {}", ratio_text(report.ratio));
    if let Some(path) = json {
        if let Err(e) = write_json(&path, &report) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
