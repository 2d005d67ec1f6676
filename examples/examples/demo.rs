//! The reconnect demo: an embedded hub is stopped and restarted while a client rides it out.
//! Every typed state transition is printed with its timing.
//!
//! ```text
//! cargo run --example demo -- --cycles 3 --down-secs 3
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use tether_integration_tests::harness::free_addr;
use tether_transport::hub::{Hub, HubConfig};
use tether_transport::{ConnectionState, Transport, TransportConfig};

/// Stops and restarts an embedded hub under a connected client.
#[derive(Parser, Debug)]
struct Args {
    /// How many stop/restart cycles.
    #[arg(long, default_value_t = 3)]
    cycles: u32,
    /// How long the hub stays down each time, in seconds.
    #[arg(long, default_value_t = 3.0)]
    down_secs: f64,
    /// How long the client stays connected before each stop, in seconds (past the 2 s
    /// stability window, so the first retry after the drop goes out at once).
    #[arg(long, default_value_t = 6.0)]
    up_secs: f64,
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tether_examples::init_tracing();
    let args = Args::parse();
    let addr = free_addr();
    let hub_config = || HubConfig::builder().bind(addr).workers(1).build();
    let mut hub = Hub::start(hub_config()?)?;
    let start = Instant::now();
    println!(
        "hub on {}; client connecting with the default policy (1 s ×2 → 60 s, ±25 %)",
        hub.ws_url()
    );

    let (transport, mut events) =
        Transport::start_with_events(TransportConfig::builder(hub.ws_url()).build()?);
    let printer = actix_rt::spawn(async move {
        let mut recovered = Vec::new();
        let mut lost_at = None;
        while let Some(event) = events.recv().await {
            println!("{}", tether_examples::describe_event(start, &event));
            let ev = event.transition();
            match ev.to {
                ConnectionState::Disconnected if ev.from.is_up() => lost_at = Some(Instant::now()),
                ConnectionState::Connected => {
                    if let Some(at) = lost_at.take() {
                        recovered.push(at.elapsed());
                    }
                }
                ConnectionState::Closed => break,
                _ => {}
            }
        }
        recovered
    });

    for cycle in 1..=args.cycles {
        tokio::time::sleep(Duration::from_secs_f64(args.up_secs)).await;
        println!(
            "{:>8.3}s  --- cycle {cycle}: stopping the hub for {:.1} s",
            start.elapsed().as_secs_f64(),
            args.down_secs
        );
        hub.stop().await;
        tokio::time::sleep(Duration::from_secs_f64(args.down_secs)).await;
        println!(
            "{:>8.3}s  --- cycle {cycle}: hub back",
            start.elapsed().as_secs_f64()
        );
        hub = Hub::start(hub_config()?)?;
    }
    tokio::time::sleep(Duration::from_secs_f64(args.up_secs.min(3.0))).await;
    let status = transport.status().await?;
    println!("status: {}", serde_json::to_string_pretty(&status)?);
    transport.close().await;
    let recovered = printer.await?;
    hub.stop().await;
    let times: Vec<String> = recovered
        .iter()
        .map(|d| format!("{:.2} s", d.as_secs_f64()))
        .collect();
    println!(
        "recovery times (connection lost → connected): {}",
        times.join(", ")
    );
    if status.reconnect_count < u64::from(args.cycles) {
        return Err(format!(
            "expected {} reconnects, saw {}",
            args.cycles, status.reconnect_count
        )
        .into());
    }
    Ok(())
}
