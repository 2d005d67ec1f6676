//! Client CPU while the hub is down: K `Transport`s (default policy: 1 s ×2 → 60 s, ±25 %;
//! after 10 failures the breaker suspends them into 60 s probes) pointed at a loopback port
//! where nothing listens, in one actix system; the process' CPU time (`utime + stime` from
//! `/proc/self/stat`, clock ticks from `sysconf(_SC_CLK_TCK)`) over `--secs`, as a percentage
//! of one core.
//!
//! Baselines in the same run, each in its own process of the same shape (one actix system):
//! K plain actors re-arming an actix `run_later` timer at the same cadence (the same backoff
//! sequence with ±25 % jitter and the same 10-failure suspension to 60 s), and an idle actix
//! system with no actors at all.
//!
//! ```text
//! cargo run --release -p tether-benches --bin idle_cpu -- --clients 100 --secs 60
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext, Context, Handler};
use clap::Parser;
use tether_benches::multiproc::{
    clock_ticks_per_sec, die_with_parent, free_loopback_addr, raise_nofile_limit, self_cpu_ticks,
    self_rusage_cpu, ChildProc, Result,
};
use tether_transport::reconnect::{
    DEFAULT_INITIAL_DELAY, DEFAULT_JITTER, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_DELAY,
    DEFAULT_MULTIPLIER, DEFAULT_SUSPEND_INTERVAL,
};
use tether_transport::{ConnectionState, ConnectionStateChanged, Transport, TransportConfig};

/// CPU of transports waiting to reconnect, against timers at the same cadence.
#[derive(Parser, Debug)]
struct Args {
    /// Number of transports (and of baseline timers).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Length of the measurement window in seconds.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Seconds to wait after starting the workload before the window opens (0: the window
    /// covers the first, fastest retries; about 250 gets past the backoff to the 60 s probes).
    #[arg(long, default_value_t = 0)]
    warmup_secs: u64,
    /// Internal: the role of a helper process (`transports`, `timers`, `idle`).
    #[arg(long, hide = true)]
    role: Option<String>,
    /// Internal: the address where nothing listens.
    #[arg(long, hide = true)]
    bind: Option<SocketAddr>,
}

fn main() -> ExitCode {
    raise_nofile_limit();
    let args = Args::parse();
    let result = match args.role.as_deref() {
        Some(role) => measure_role(role, &args),
        None => actix_rt::System::new().block_on(run(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idle_cpu: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One process' figures.
struct Figures {
    ticks: u64,
    hz: u64,
    rusage: Duration,
    wall: Duration,
    /// Attempts (transports) or timer firings (timers) inside the window.
    events: u64,
    note: String,
}

impl Figures {
    fn parse(line: &str) -> Result<Figures> {
        let mut it = line.splitn(6, ' ');
        let mut num = || -> Result<u64> { Ok(it.next().ok_or("short CPU line")?.parse()?) };
        let (ticks, hz, rusage_us, wall_us, events) = (num()?, num()?, num()?, num()?, num()?);
        Ok(Figures {
            ticks,
            hz,
            rusage: Duration::from_micros(rusage_us),
            wall: Duration::from_micros(wall_us),
            events,
            note: it.next().unwrap_or_default().to_owned(),
        })
    }

    /// CPU % of one core from the clock ticks of `/proc/self/stat`.
    fn percent_ticks(&self) -> f64 {
        100.0 * (self.ticks as f64 / self.hz as f64) / self.wall.as_secs_f64()
    }

    /// CPU % of one core from `getrusage`.
    fn percent_rusage(&self) -> f64 {
        100.0 * self.rusage.as_secs_f64() / self.wall.as_secs_f64()
    }
}

async fn run(args: &Args) -> Result<()> {
    let dead = free_loopback_addr()?;
    println!(
        "idle_cpu: {} clients → {dead} (nothing listens), default policy; {} s window; three \
         processes run side by side, each one actix system",
        args.clients, args.secs
    );
    let common = |role: &str| {
        [
            "--role",
            role,
            "--clients",
            &args.clients.to_string(),
            "--secs",
            &args.secs.to_string(),
            "--warmup-secs",
            &args.warmup_secs.to_string(),
            "--bind",
            &dead.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let roles = [
        ("transports", "tether Transports, no hub"),
        ("timers", "baseline: run_later timers, same cadence"),
        ("idle", "baseline: idle actix System"),
    ];
    let mut children = Vec::new();
    for (role, _) in roles {
        children.push(ChildProc::spawn(role, &common(role))?);
    }
    let wait = Duration::from_secs(args.warmup_secs + args.secs + 60);
    let mut figures = Vec::new();
    for child in &mut children {
        figures.push(Figures::parse(&child.expect_line("CPU ", wait).await?)?);
    }
    for child in children {
        child.kill().await?;
    }
    println!();
    println!(
        " workload                                  | count | window s | CPU ticks (@{} Hz) | CPU % of one core (/proc) | CPU % (getrusage) | target < 0.1 % | notes",
        figures[0].hz
    );
    println!(
        "-------------------------------------------|-------|----------|--------------------|---------------------------|-------------------|----------------|------"
    );
    for ((role, label), f) in roles.iter().zip(&figures) {
        let count = if *role == "idle" { 0 } else { args.clients };
        let verdict = match (*role, f.percent_ticks() < 0.1) {
            ("transports", true) => "met",
            ("transports", false) => "MISSED",
            _ => "-",
        };
        println!(
            " {label:<41} | {count:>5} | {:>8.1} | {:>18} | {:>25.4} | {:>17.4} | {verdict:>14} | {}",
            f.wall.as_secs_f64(),
            f.ticks,
            f.percent_ticks(),
            f.percent_rusage(),
            f.note
        );
    }
    println!();
    println!(
        "CPU % counts utime+stime over the window; clock ticks per second from sysconf(_SC_CLK_TCK) \
         (one tick = {:.4} % of one core over this window); getrusage gives µs resolution",
        100.0 / (figures[0].hz as f64 * figures[0].wall.as_secs_f64())
    );
    for (f, what) in [
        (&figures[0], "failed attempt"),
        (&figures[1], "timer firing"),
    ] {
        if f.events > 0 {
            let per = f.rusage.as_secs_f64() / f.events as f64;
            println!(
                "per {what}: {:.0} µs of CPU; at one per client per 60 s (the suspended probes) \
                 that would be {:.4} % of one core for {} clients",
                per * 1e6,
                100.0 * per * args.clients as f64 / 60.0,
                args.clients
            );
        }
    }
    Ok(())
}

/// A helper process: starts its workload, measures its own CPU over `--secs`, prints
/// `CPU <ticks> <clk_tck> <rusage-µs> <wall-µs> <events> <note>` and exits.
fn measure_role(role: &str, args: &Args) -> Result<()> {
    die_with_parent();
    let (k, secs, warmup) = (
        args.clients,
        Duration::from_secs(args.secs),
        args.warmup_secs,
    );
    let dead = args.bind.ok_or("--bind missing")?;
    actix_rt::System::new().block_on(async move {
        let counter = Counter::default().start();
        let mut transports = Vec::new();
        match role {
            "transports" => {
                let url = format!("ws://{dead}/ws");
                for _ in 0..k {
                    let config = TransportConfig::builder(url.clone()).build()?;
                    transports.push(Transport::start_with_subscribers(
                        config,
                        vec![counter.clone().recipient()],
                    ));
                }
            }
            "timers" => {
                for i in 0..k {
                    BackoffTimer::new(i as u64 + 1).start();
                }
            }
            "idle" => {}
            other => return Err(format!("unknown role {other:?}").into()),
        }
        tokio::time::sleep(Duration::from_secs(warmup)).await;
        let events = |c: &Counts| match role {
            "transports" => c.attempts,
            "timers" => FIRINGS.with(|f| f.get()),
            _ => 0,
        };
        let at_start = counter.send(GetCounts).await?;
        let (ticks0, rusage0, wall0) = (self_cpu_ticks()?, self_rusage_cpu(), Instant::now());
        let events0 = events(&at_start);
        tokio::time::sleep(secs).await;
        let (ticks1, rusage1, wall) = (self_cpu_ticks()?, self_rusage_cpu(), wall0.elapsed());
        let at_end = counter.send(GetCounts).await?;
        let events1 = events(&at_end);
        let note = match role {
            "transports" => format!(
                "{} attempts, {} entered Suspended, {} came up",
                at_end.attempts - at_start.attempts,
                at_end.suspended - at_start.suspended,
                at_end.up - at_start.up
            ),
            "timers" => format!("{} timer firings", events1 - events0),
            _ => String::new(),
        };
        println!(
            "CPU {} {} {} {} {} {note}",
            ticks1 - ticks0,
            clock_ticks_per_sec(),
            (rusage1 - rusage0).as_micros(),
            wall.as_micros(),
            events1 - events0
        );
        drop(transports);
        Ok::<_, tether_benches::multiproc::BoxError>(())
    })?;
    std::process::exit(0)
}

/// Counts the transports' attempts and suspensions (one shared actor for all of them).
#[derive(Default)]
struct Counter {
    attempts: u64,
    suspended: u64,
    up: u64,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Handler<ConnectionStateChanged> for Counter {
    type Result = ();

    fn handle(&mut self, ev: ConnectionStateChanged, _ctx: &mut Context<Self>) {
        match ev.to {
            ConnectionState::Connecting => self.attempts += 1,
            ConnectionState::Suspended => self.suspended += 1,
            s if s.is_up() => self.up += 1,
            _ => {}
        }
    }
}

/// Asks the [`Counter`] for its totals.
struct GetCounts;

/// The [`Counter`]'s totals.
struct Counts {
    attempts: u64,
    suspended: u64,
    up: u64,
}

impl actix::Message for GetCounts {
    type Result = Counts;
}

impl Handler<GetCounts> for Counter {
    type Result = actix::MessageResult<GetCounts>;

    fn handle(&mut self, _: GetCounts, _ctx: &mut Context<Self>) -> Self::Result {
        actix::MessageResult(Counts {
            attempts: self.attempts,
            suspended: self.suspended,
            up: self.up,
        })
    }
}

thread_local! {
    static FIRINGS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Baseline: an actor that re-arms one `run_later` timer on the transports' schedule — the
/// default backoff sequence (1 s ×2 capped at 60 s, ±25 % jitter), then after 10 firings the
/// breaker's 60 s (±25 %) probes — and does nothing else.
struct BackoffTimer {
    rng: u64,
    fired: u32,
    base: Duration,
}

impl BackoffTimer {
    fn new(seed: u64) -> Self {
        BackoffTimer {
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            fired: 0,
            base: DEFAULT_INITIAL_DELAY,
        }
    }

    /// The next delay, jittered uniformly in ±`DEFAULT_JITTER` (xorshift64*).
    fn next_delay(&mut self) -> Duration {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let unit =
            (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
        let factor = 1.0 - DEFAULT_JITTER + 2.0 * DEFAULT_JITTER * unit;
        let base = if self.fired >= DEFAULT_MAX_ATTEMPTS {
            DEFAULT_SUSPEND_INTERVAL
        } else {
            let b = self.base;
            self.base = self.base.mul_f64(DEFAULT_MULTIPLIER).min(DEFAULT_MAX_DELAY);
            b
        };
        base.mul_f64(factor)
    }

    fn arm(&mut self, ctx: &mut Context<Self>) {
        let delay = self.next_delay();
        ctx.run_later(delay, |timer, ctx| {
            timer.fired += 1;
            FIRINGS.with(|f| f.set(f.get() + 1));
            timer.arm(ctx);
        });
    }
}

impl Actor for BackoffTimer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.arm(ctx);
    }
}
