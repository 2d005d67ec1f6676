//! A standalone Tether hub: one node, with its channel history in memory (the default) or in
//! Redis Streams shared by any number of nodes.
//!
//! ```text
//! cargo run --release --example hub -- --bind 127.0.0.1:8080 --token secret
//! cargo run --release --example hub -- --bind 127.0.0.1:8081 --store redis://127.0.0.1:6379 --node-id a
//! cargo run --release --example hub -- --bind 127.0.0.1:8082 --store redis://127.0.0.1:6379 --node-id b
//! curl http://127.0.0.1:8081/health
//! curl http://127.0.0.1:8081/metrics
//! ```
//!
//! The session admin API (`/sessions`, `/channels`), behind a token given by flag or by
//! `TETHER_HUB_ADMIN_TOKEN`:
//!
//! ```text
//! cargo run --release --example hub -- --admin-token 0123456789abcdef-admin
//! curl -H 'Authorization: Bearer 0123456789abcdef-admin' http://127.0.0.1:8080/sessions
//! ```
//!
//! TLS (`wss://`): a PEM certificate chain and key, by flag or by `TETHER_HUB_TLS_CERT` /
//! `TETHER_HUB_TLS_KEY`:
//!
//! ```text
//! cargo run --release --example hub -- --bind 0.0.0.0:8443 --tls-cert hub.crt --tls-key hub.key
//! TETHER_HUB_TLS_CERT=hub.crt TETHER_HUB_TLS_KEY=hub.key cargo run --release --example hub
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tether_channels::hub::{ChannelService, RedisStore, Retention};
use tether_transport::hub::{Hub, HubConfigBuilder, StaticTokens};

/// Runs a Tether hub until Ctrl-C or SIGTERM.
#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// Accept only clients presenting one of these tokens (repeatable); each token is its own
    /// identity (sessions and publish dedupe belong to it). Default: accept all, each client id
    /// its own anonymous identity (development only: anyone can be any client).
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
    /// Where channel history lives: `memory` (this process; lost with it) or a Redis URL
    /// (`redis://host:port[/db]`), shared by every hub node given the same one.
    #[arg(long, default_value = "memory")]
    store: String,
    /// Prefix of this deployment's Redis keys.
    #[arg(long, default_value = "tether")]
    redis_prefix: String,
    /// This node's name (in /health and the logs). Default: hub-{pid}.
    #[arg(long)]
    node_id: Option<String>,
    /// Serve TLS (wss://) with this PEM certificate chain (leaf first). Needs --tls-key.
    /// Default: TETHER_HUB_TLS_CERT, else plain ws://.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert. Default: TETHER_HUB_TLS_KEY.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Turn the session admin API on behind this bearer token (16 to 4096 visible ASCII bytes;
    /// the same on every node). Default: TETHER_HUB_ADMIN_TOKEN, else the admin API is off.
    #[arg(long)]
    admin_token: Option<String>,
    /// Where the other nodes reach this one's admin API (http://host:port). Default:
    /// TETHER_HUB_ADVERTISE_URL, else the bound address.
    #[arg(long)]
    advertise_url: Option<String>,
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tether_examples::init_tracing();
    let args = Args::parse();
    let retention = Retention {
        max_messages: args.history,
        max_age: Duration::from_secs(args.history_secs),
        ..Retention::default()
    };
    let mut channels = ChannelService::builder().retention(retention);
    match args.store.as_str() {
        "memory" => {}
        url if url.starts_with("redis://") || url.starts_with("redis+unix://") => {
            let store = RedisStore::builder(url)
                .prefix(args.redis_prefix.clone())
                .retention(retention)
                .build()?;
            channels = channels.store(store);
        }
        other => return Err(format!("--store {other:?}: expected memory or redis://…").into()),
    }
    let mut builder = HubConfigBuilder::from_env()?
        .bind(args.bind)
        .handler(Arc::new(channels.build()?))
        .heartbeat(
            Duration::from_millis(args.heartbeat_ms),
            Duration::from_millis(args.idle_timeout_ms),
        );
    if let Some(workers) = args.workers {
        builder = builder.workers(workers);
    }
    if let Some(node_id) = args.node_id {
        builder = builder.node_id(node_id);
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        builder = builder.tls_files(cert, key);
    }
    if !args.token.is_empty() {
        builder = builder.authenticator(StaticTokens::new(args.token));
    }
    if let Some(token) = args.admin_token {
        builder = builder.admin_token(token);
    }
    if let Some(url) = args.advertise_url {
        builder = builder.advertise_url(url);
    }
    let hub = Hub::start(builder.build()?)?;
    let http = match hub.state().config.tls {
        Some(_) => "https",
        None => "http",
    };
    println!(
        "hub {} listening on {} (store: {}; health: {http}://{}/health)",
        hub.state().config.node_id,
        hub.ws_url(),
        args.store,
        hub.local_addr()
    );
    // Ctrl-C, or SIGTERM from a process manager (`docker stop`, systemd).
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    println!("stopping");
    hub.stop().await;
    Ok(())
}
