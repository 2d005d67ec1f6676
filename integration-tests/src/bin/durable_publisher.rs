//! A client process with a durable outbox, for the kill-and-restart test (tests/durable.rs)
//! and the README's walk-through: publishes `{"n": 1}`, `{"n": 2}` … `{"n": COUNT}` on a
//! durable channel, continuing after whatever an earlier run of the same store accepted.
//!
//! ```text
//! durable_publisher WS_URL STORE_PATH CHANNEL COUNT
//! ```
//!
//! Prints, one a line: `recovered LAST_SEQ PENDING` once the channel is open (the last
//! sequence number an earlier run gave out, and how many of its publishes the hub had not
//! acknowledged), `accepted N` once publish N is committed to the store, `done` once every
//! publish is acknowledged. Exits 0 after `done`, 2 on an error (printed to stderr).

use std::io::Write;
use std::time::Duration;

use tether_channels::durable::DurableStore;
use tether_channels::{Channel, ChannelOptions};
use tether_transport::Transport;

struct Args {
    url: String,
    store: String,
    channel: String,
    count: u64,
}

fn parse() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, store, channel, count] = args.as_slice() else {
        return Err("usage: durable_publisher WS_URL STORE_PATH CHANNEL COUNT".into());
    };
    Ok(Args {
        url: url.clone(),
        store: store.clone(),
        channel: channel.clone(),
        count: count.parse().map_err(|e| format!("COUNT {count:?}: {e}"))?,
    })
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let store = DurableStore::open(&args.store)?;
    // Default heartbeats (10 s / 25 s): a stalled path keeps acks away for that long.
    let config = store
        .transport_config(args.url)
        .backoff(Duration::from_millis(50), Duration::from_millis(400), 2.0)
        .build()?;
    let transport = Transport::start(config);
    let (channel, _events, recovered) = Channel::open_durable(
        &transport,
        args.channel,
        ChannelOptions::publish_only(),
        &store,
    )
    .await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "recovered {} {}",
        recovered.last_seq,
        recovered.pending.len()
    )?;
    let mut pending = recovered.pending;
    for n in recovered.last_seq + 1..=args.count {
        let mut publish = channel.publish(&serde_json::json!({ "n": n }));
        let seq = publish.accepted().await?;
        if seq != n {
            return Err(format!("publish {n} got sequence number {seq}").into());
        }
        writeln!(out, "accepted {n}")?;
        pending.push(publish);
    }
    for publish in pending {
        publish.await?;
    }
    writeln!(out, "done")?;
    transport.close().await;
    Ok(())
}

fn main() {
    tether_integration_tests::process::die_with_parent();
    let result = parse()
        .map_err(Into::into)
        .and_then(|args| actix::System::new().block_on(run(args)));
    if let Err(e) = result {
        eprintln!("durable_publisher: {e}");
        std::process::exit(2);
    }
}
