//! Tether's benchmarks.
//!
//! Micro-benchmarks (criterion) live in `benches/`:
//!
//! * `protocol` — encoding and decoding of v1 frames.
//! * `reconnect` — the ReconnectManager's and heartbeat's per-decision cost.
//!
//! Whole-system benchmarks are binaries in `src/bin/`. `e2e` and `fanout` measure Tether over
//! loopback and a raw WebSocket baseline (tokio-tungstenite) in the same run and report the
//! ratio `tether / raw` (1.00x = as fast as the raw relay):
//!
//! * `e2e` — one publisher, one subscriber, one channel: throughput (messages/s) and latency
//!   (p50/p99, µs, from the publish call to receipt) of publish → hub → subscriber, for 64 B
//!   and 1 KiB payloads. The baseline is a relay that forwards every text frame of one socket to
//!   another. A second phase publishes at half (`--paced-fraction`) of each system's own
//!   measured maximum, paced by a [`pacer`] thread, and reports p50/p99 there (target: Tether's
//!   p99 ≤ 1 ms); the throughput targets (≥ 0.5× at 64 B, ≥ 0.6× at 1 KiB) print beside the
//!   ratios.
//! * `fanout` — one publisher and many subscribers (default 1,000) on one channel:
//!   deliveries/s (subscribers × messages ÷ time until every subscriber has every message). The
//!   baseline is a relay that forwards every frame to every subscriber. The hub (relay) runs in
//!   a process of its own and the subscribers in `--subscriber-procs` others; the hub's CPU per
//!   delivery (µs, `/proc/<pid>/stat`) is reported, and the target ratio (≥ 0.3×).
//!
//! * `store` — channel history in memory vs Redis with one and with three hub nodes: end to end
//!   and fan-out in alternating rounds, Redis's CPU per message, and failover recovery after a
//!   node stops under load (starts a private redis-server from the OS package).
//!
//! They measure; they assert nothing about performance.
//!
//! ## How to run
//!
//! ```sh
//! cargo bench -p tether-benches                          # the criterion micro-benchmarks
//! cargo run --release -p tether-benches --bin e2e        # 5 rounds × 20,000 messages, 64 B and 1 KiB
//! cargo run --release -p tether-benches --bin fanout     # 1,000 subscribers, 5 rounds × 200 messages
//! cargo run --release -p tether-benches --bin store      # memory vs Redis (1 and 3 nodes), failover
//! cargo run --release -p tether-benches --bin e2e -- --messages 50000 --window 256 --payloads 64,1024,16384 --json e2e.json
//! cargo run --release -p tether-benches --bin fanout -- --subscribers 100,1000,4000 --messages 200 --json fanout.json
//! ```
//!
//! `--help` lists every flag (`--rounds`, `--warmup`, `--window`, `--settle-ms`, `--raw-nagle`,
//! `--timeout-secs`…). Logs go to stderr (`RUST_LOG`, default `warn`). With the defaults each
//! binary finishes in seconds (well under two minutes) on a 2-core machine; the machine should
//! otherwise be idle, as every figure is a rate of two processes' worth of threads sharing it.
//!
//! ## Method and fairness
//!
//! * Both systems are set up side by side (connection setup is not measured), warmed up, then
//!   measured in alternating rounds (Tether first on odd rounds, raw first on even ones) after a
//!   short settle pause; the median round's rate is reported (JSON has every round), latency
//!   percentiles are over every measured message.
//! * `e2e`'s clients (Tether `Transport`s or raw tokio-tungstenite sockets) run on the binary's
//!   main thread, an actix system (a tokio current-thread runtime), beside the hub and the relay;
//!   `fanout`'s publisher runs there too, its hub, relay and subscribers in processes of their
//!   own (one thread each for the subscribers). The Tether hub runs with one HTTP worker thread
//!   plus the channel service's one actor thread; the raw relay runs on one thread with its own
//!   current-thread runtime.
//! * Same payload bytes (JSON `{"t":<µs>,"p":"xx…"}`), same window of outstanding messages:
//!   Tether's publishes awaiting their ack; the raw publisher (no acks) the messages not yet
//!   received by its subscriber (every subscriber, for `fanout`).
//! * The raw side is a tuned baseline, not a straw man: writes are buffered and flushed when
//!   nothing more is ready, the broadcast relay forwards what the publisher had ready as one
//!   shared batch per subscriber, and its sockets set `TCP_NODELAY` (`--raw-nagle` leaves
//!   Nagle's algorithm on instead). Every queue is bounded; relay IO errors are logged and drop
//!   the connection.
//!
//! Shared pieces: [`payload`] (timestamped payloads and the clock), [`pacer`] (paced publishing), [`stats`] (latency
//! percentiles, round medians, completion latches), [`raw`] (the baseline relays and clients),
//! [`tether`] (an embedded hub and attached channels), [`report`] (tables and JSON), [`sys`]
//! (open-file limit and logging), [`within`] (timeouts).
//!
//! ## Storm, idle memory, idle CPU: hub and clients in separate processes
//!
//! Each machine allows 20,000 open files per process, so these three put the hub and the
//! clients in separate processes: the binary re-executes itself with a hidden `--role` for its
//! helpers (a hub child, client children, baseline servers), reads their stdout and the hub's
//! `/health` and `/metrics`, and kills them on exit, error paths included. Every process raises
//! `RLIMIT_NOFILE` to its hard limit first. Plumbing: [`multiproc`].
//!
//! ```sh
//! cargo run --release -p tether-benches --bin storm        # --clients 1000,10000 --down-secs 3
//! cargo run --release -p tether-benches --bin idle_memory  # --connections 1000,10000
//! cargo run --release -p tether-benches --bin idle_cpu     # --clients 100 --secs 60
//! ```
//!
//! * `storm` — N clients (a `Transport` with one attached `Channel` each, default policy) on a
//!   hub process that is SIGKILLed and restarted on the same port after `--down-secs`: p50/p99/max
//!   time from the new hub being bound to each client's `Syncing → Connected` (Resynced), and the
//!   peak connect rate (the hub child samples its own connection count every 10 ms; busiest
//!   100 ms window). Target: p99 ≤ 2 s. `--timeline` prints every transition after the kill in
//!   250 ms bins. About 35 s for the default 1,000 and 10,000 clients.
//! * `idle_memory` — hub RSS per idle connection (`Transport`s without channels) against a plain
//!   tokio TCP server holding as many idle sockets, with a bare actix-web + actix-web-actors
//!   WebSocket server as a reference for the framework's share. Target: ≤ 10 KiB per
//!   connection. About 45 s.
//! * `idle_cpu` — CPU of K transports retrying against a port where nothing listens, against K
//!   actix `run_later` timers on the same cadence and an idle actix system (three processes side
//!   by side). Target: < 0.1 % of one core. Takes `--secs` (60) plus `--warmup-secs` (0; about
//!   250 reaches the 60 s probes).
//!
//! `idle_memory --conns 100000 --client-procs 8` spreads the connections over several hub
//! processes (≤ 18,000 per hub process under the 20,000-file limit; each hub on its own
//! 127.0.0.x address) and client processes, and
//! reports RSS per connection per hub process, the time to connect, CPU, open files and the
//! kernel's socket and slab memory.

#![warn(missing_docs)]

pub mod pacer;
pub mod payload;
pub mod raw;
pub mod report;
pub mod stats;
pub mod sys;
pub mod tether;

/// The error type of the benchmark plumbing: anything that went wrong, with its message.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub mod multiproc;

/// `future`'s result, or an error naming `what` once `timeout` has passed.
pub async fn within<T>(
    timeout: std::time::Duration,
    what: &str,
    future: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| format!("{what} did not finish within {timeout:?}"))?
}
