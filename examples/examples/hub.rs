//! A standalone Tether hub.
//!
//! ```text
//! cargo run --release --example hub -- --bind 127.0.0.1:8080 --token secret
//! curl http://127.0.0.1:8080/health
//! curl http://127.0.0.1:8080/metrics
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tether_channels::hub::{ChannelService, Retention};
use tether_transport::hub::{Hub, HubConfig, StaticTokens};

/// Runs a Tether hub until Ctrl-C.
#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// Accept only clients presenting one of these tokens (repeatable). Default: accept all.
    #[arg(long)]
    token: Vec<String>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    heartbeat_ms: u64,
    /// Idle timeout in milliseconds.
    #[arg(long, default_value_t = 25_000)]
    idle_timeout_ms: u64,
    /// Messages of history kept per channel.
    #[arg(long, default_value_t = 1000)]
    history: usize,
    /// Seconds of history kept per channel.
    #[arg(long, default_value_t = 86_400)]
    history_secs: u64,
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tether_examples::init_tracing();
    let args = Args::parse();
    let channels = ChannelService::builder()
        .retention(Retention {
            max_messages: args.history,
            max_age: Duration::from_secs(args.history_secs),
            ..Retention::default()
        })
        .build()?;
    let mut builder = HubConfig::builder()
        .bind(args.bind)
        .handler(Arc::new(channels))
        .heartbeat(
            Duration::from_millis(args.heartbeat_ms),
            Duration::from_millis(args.idle_timeout_ms),
        );
    if let Some(workers) = args.workers {
        builder = builder.workers(workers);
    }
    if !args.token.is_empty() {
        builder = builder.authenticator(StaticTokens::new(args.token));
    }
    let hub = Hub::start(builder.build()?)?;
    println!(
        "hub listening on {} (health: http://{}/health)",
        hub.ws_url(),
        hub.local_addr()
    );
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    hub.stop().await;
    Ok(())
}
