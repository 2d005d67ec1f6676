//! A terminal chat client: lines typed are published to a room; the room's messages, gaps and
//! connection changes are printed. Kill and restart the hub while chatting: nothing typed is
//! lost, nothing is shown twice.
//!
//! ```text
//! cargo run --release --example hub -- --bind 127.0.0.1:8080
//! cargo run --example chat -- --url ws://127.0.0.1:8080/ws --room lobby --name ada
//! ```

use clap::Parser;
use serde::{Deserialize, Serialize};
use tether_channels::{Channel, ChannelEvent, ChannelOptions};
use tether_transport::{Transport, TransportConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Chat in a Tether room.
#[derive(Parser, Debug)]
struct Args {
    /// Hub WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Room (channel) name.
    #[arg(long, default_value = "lobby")]
    room: String,
    /// Your name.
    #[arg(long, default_value = "anonymous")]
    name: String,
    /// Token, if the hub requires one.
    #[arg(long)]
    token: Option<String>,
    /// This client's id (what the hub's admin API lists it by). Default: a random one.
    #[arg(long)]
    client_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Line {
    name: String,
    text: String,
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tether_examples::init_tracing();
    let args = Args::parse();
    let mut config = TransportConfig::builder(&args.url);
    if let Some(token) = &args.token {
        config = config.token(token);
    }
    if let Some(id) = &args.client_id {
        config = config.client_id(id);
    }
    let start = std::time::Instant::now();
    let (transport, mut states) = Transport::start_with_events(config.build()?);
    let (room, mut events) =
        Channel::open(&transport, &args.room, ChannelOptions::default()).await?;
    actix_rt::spawn(async move {
        while let Some(change) = states.recv().await {
            eprintln!("{}", tether_examples::describe_event(start, &change));
        }
    });
    actix_rt::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                ChannelEvent::Message(m) => match m.payload.decode::<Line>() {
                    Ok(line) => println!("[{}] {}: {}", m.offset, line.name, line.text),
                    Err(_) => println!("[{}] {}", m.offset, m.payload.json()),
                },
                ChannelEvent::Discontinuity(d) => {
                    println!(
                        "-- messages {} … {} could not be recovered --",
                        d.from, d.to
                    )
                }
            }
        }
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(text) = lines.next_line().await? {
        let line = Line {
            name: args.name.clone(),
            text,
        };
        let ack = room.publish(&line);
        // Answered when the hub stored it, however many reconnects that takes.
        actix_rt::spawn(async move {
            if let Err(e) = ack.await {
                eprintln!("not sent: {e}");
            }
        });
    }
    transport.close().await;
    Ok(())
}
