//! Runs the decoder fuzz targets: `cargo run --release -p tether-fuzz -- --inputs 10000000`.
//!
//! Inputs are split over `--threads` workers, each with its own seed derived from `--seed`.
//! Exits non-zero on the first failure, after writing the input that caused it to
//! `--crash-dir` (default `target/fuzz-crashes`).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Fuzz Tether's frame decoders (stable Rust)")]
struct Args {
    /// Inputs to run in total.
    #[arg(long, default_value_t = 10_000_000)]
    inputs: u64,
    /// Seed of the first worker (each worker adds its index).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Worker threads (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where a failing input is written.
    #[arg(long, default_value = "target/fuzz-crashes")]
    crash_dir: PathBuf,
}

fn main() {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .max(1);
    // Panics are expected inputs' business (caught and reported), not noise on stderr.
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads as u64)
        .map(|i| {
            let share = args.inputs / threads as u64 + u64::from(i < args.inputs % threads as u64);
            let seed = args.seed.wrapping_add(i);
            std::thread::spawn(move || (seed, tether_fuzz::run(share, seed)))
        })
        .collect();
    let mut totals = tether_fuzz::Totals::default();
    let mut failed = false;
    for worker in workers {
        let (seed, result) = worker.join().expect("worker thread");
        match result {
            Ok(t) => {
                totals.frames += t.frames;
                totals.streams += t.streams;
                totals.records += t.records;
            }
            Err((error, input)) => {
                failed = true;
                let _ = std::fs::create_dir_all(&args.crash_dir);
                let path = args.crash_dir.join(format!("crash-seed-{seed}"));
                let _ = std::fs::write(&path, &input);
                eprintln!(
                    "FAILED (seed {seed}): {error}; input written to {}",
                    path.display()
                );
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let total = totals.frames + totals.records + totals.streams;
    println!(
        "{total} inputs ({} JSON frames, {} v2 binary frames, {} WebSocket streams) in {secs:.1} s on {threads} threads: {:.0} inputs/s{}",
        totals.frames,
        totals.records,
        totals.streams,
        total as f64 / secs,
        if failed { ", FAILED" } else { ", no failure" }
    );
    if failed {
        std::process::exit(1);
    }
}
