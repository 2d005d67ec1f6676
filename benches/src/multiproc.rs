//! Plumbing shared by the whole-system benchmark binaries `storm`, `idle_memory` and `idle_cpu`.
//!
//! Runs with 10,000 connections need the hub and the clients in separate processes (each
//! process may hold at most 20,000 open files), so every binary re-executes itself
//! ([`std::env::current_exe`]) with a `--role` argument for its helper processes. This module
//! holds:
//!
//! * [`ChildProc`]: such a child, with its stdout read line by line, killed when dropped (and,
//!   through [`die_with_parent`], when the parent dies);
//! * [`run_hub_role`]: the hub child (a channel-serving hub that samples its own connection
//!   count every 10 ms and answers `peak` on stdin);
//! * readers for `/proc` (RSS, CPU ticks), `getrusage`, a minimal HTTP/1.1 GET for `/health`
//!   and `/metrics`, and percentile helpers.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tether_channels::hub::ChannelService;
use tether_transport::hub::{Hub, HubConfigBuilder};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// Any error, boxed; the binaries print it and exit non-zero.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `Result` with a [`BoxError`].
pub type Result<T, E = BoxError> = std::result::Result<T, E>;

/// The longest a helper process lives, whatever happens to its parent: 30 minutes.
pub const MAX_CHILD_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Interval at which the hub child samples its connection count: 10 ms.
pub const HUB_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

/// Width of the window over which the hub child reports its peak connect rate: 100 ms.
pub const PEAK_WINDOW: Duration = Duration::from_millis(100);

/// Raises this process' soft `RLIMIT_NOFILE` to its hard limit (`rlimit` clamps `u64::MAX` to
/// it); returns the soft limit now in force, or 0 when it could not be changed.
pub fn raise_nofile_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

pub use tether_integration_tests::process::die_with_parent;

/// Wall-clock time now in nanoseconds since the Unix epoch (comparable across processes on one
/// machine).
pub fn unix_nanos_now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The wall-clock instant `nanos` nanoseconds after the Unix epoch.
pub fn system_time_from_nanos(nanos: u128) -> SystemTime {
    let secs = (nanos / 1_000_000_000) as u64;
    let sub = (nanos % 1_000_000_000) as u32;
    UNIX_EPOCH + Duration::new(secs, sub)
}

/// A loopback address whose port was free a moment ago.
pub fn free_loopback_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Part `j` of `n` spread evenly over `parts` (the first `n % parts` parts take one more).
pub fn share(n: usize, parts: usize, j: usize) -> usize {
    let parts = parts.max(1);
    n / parts + usize::from(j < n % parts)
}

/// A helper process: this binary re-executed with a role. Its stdout is read line by line;
/// stdin stays open as a command channel (children exit when it closes). Killed on drop.
pub struct ChildProc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
}

impl ChildProc {
    /// Starts `current_exe() args…` as the child called `name` (used in messages). Must be
    /// called inside a tokio runtime (an actix system is one).
    pub fn spawn(name: &str, args: &[String]) -> Result<ChildProc> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawn {name}: {e}"))?;
        let stdout = child.stdout.take().ok_or("child has no stdout")?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(ChildProc {
            name: name.to_owned(),
            child,
            stdin,
            lines,
        })
    }

    /// The child's process id (`None` once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits up to `timeout` for a stdout line starting with `prefix`; returns the rest of it.
    /// Other lines are echoed to stderr, tagged with the child's name.
    pub async fn expect_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => match line.strip_prefix(prefix) {
                    Some(rest) => return Ok(rest.trim().to_owned()),
                    None => eprintln!("[{}] {line}", self.name),
                },
                Ok(None) => {
                    let status = self.child.try_wait().ok().flatten();
                    return Err(format!(
                        "{} closed its stdout (exit status {status:?}) before printing {prefix:?}",
                        self.name
                    )
                    .into());
                }
                Err(_) => {
                    return Err(format!(
                        "{} printed no {prefix:?} line within {timeout:?}",
                        self.name
                    )
                    .into())
                }
            }
        }
    }

    /// The next stdout line, waiting up to `timeout` for it; `None` when the child closed its
    /// stdout.
    pub async fn next_line(&mut self, timeout: Duration) -> Result<Option<String>> {
        tokio::time::timeout(timeout, self.lines.recv())
            .await
            .map_err(|_| format!("{} printed nothing within {timeout:?}", self.name).into())
    }

    /// The next stdout line if one is already there.
    pub fn try_line(&mut self) -> Option<String> {
        self.lines.try_recv().ok()
    }

    /// Writes one command line to the child's stdin.
    pub async fn send(&mut self, command: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or("stdin already closed")?;
        stdin.write_all(command.as_bytes()).await?;
        stdin.write_all(b"\n").await?;
        stdin.flush().await?;
        Ok(())
    }

    /// SIGKILLs the child and waits (up to 10 s) until it is reaped.
    pub async fn kill(mut self) -> Result<()> {
        self.stdin.take();
        self.child.start_kill().ok();
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .map_err(|_| format!("{} did not die within 10 s of SIGKILL", self.name))??;
        Ok(())
    }
}

/// Reads lines from this process' stdin until it closes or `MAX_CHILD_LIFETIME` passes,
/// handing each to `on_line`. Used by child roles as their command loop: the parent closing
/// stdin (or dying) ends the child.
pub async fn stdin_command_loop(mut on_line: impl FnMut(&str)) {
    let deadline = tokio::time::Instant::now() + MAX_CHILD_LIFETIME;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => on_line(line.trim()),
            _ => return,
        }
    }
}

/// One sample of the hub child's connection count: time since bind, open connections.
type Sample = (Duration, usize);

/// The peak connect rate in `samples`: the largest rise of the connection count between two
/// samples at most [`PEAK_WINDOW`] apart, scaled to connections per second. Returns
/// `(per_second, window_start)`.
pub fn peak_rate(samples: &[(Duration, usize)]) -> (f64, Duration) {
    let mut best = (0usize, Duration::ZERO);
    let mut i = 0;
    for j in 0..samples.len() {
        while samples[j].0 - samples[i].0 > PEAK_WINDOW {
            i += 1;
        }
        let rise = samples[j].1.saturating_sub(samples[i].1);
        if rise > best.0 {
            best = (rise, samples[i].0);
        }
    }
    (best.0 as f64 / PEAK_WINDOW.as_secs_f64(), best.1)
}

/// The hub child (`--role hub --bind ADDR`): a hub serving channels (default
/// [`ChannelService`], default hub settings: one worker per core, heartbeat 10 s / 25 s) on
/// `bind`.
///
/// Prints `LISTENING <unix-nanos> <pid>` as soon as the socket is bound, then samples
/// [`HubHandle::connection_count`](tether_transport::hub::HubHandle::connection_count) every
/// [`HUB_SAMPLE_INTERVAL`]. On the stdin command `peak` it prints
/// `PEAK <connects-per-s> <window-start-ms> <max-connections> <first-at-max-ms>` (times since
/// bind); on `heap`, `HEAP <bytes>` ([`heap_bytes`]); on `connections`, `CONNECTIONS <n>`. It
/// serves TLS when `TETHER_HUB_TLS_CERT` and `TETHER_HUB_TLS_KEY` are set. Exits when stdin
/// closes. Never returns.
pub fn run_hub_role(bind: SocketAddr) -> ! {
    die_with_parent();
    let system = actix_rt::System::new();
    let result: Result<()> = system.block_on(async move {
        let channels = ChannelService::builder().build()?;
        let config = HubConfigBuilder::from_env()?
            .bind(bind)
            .handler(Arc::new(channels))
            .build()?;
        let hub = Hub::start(config)?;
        let bound_at = unix_nanos_now();
        let started = Instant::now();
        println!("LISTENING {bound_at} {}", std::process::id());

        let samples: Rc<RefCell<Vec<Sample>>> = Rc::new(RefCell::new(Vec::new()));
        let sampler = {
            let samples = samples.clone();
            let state = hub.state().clone();
            actix_rt::spawn(async move {
                let mut tick = tokio::time::interval(HUB_SAMPLE_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while started.elapsed() < MAX_CHILD_LIFETIME {
                    tick.tick().await;
                    samples
                        .borrow_mut()
                        .push((started.elapsed(), state.connection_count()));
                }
            })
        };

        stdin_command_loop(|command| {
            if command == "heap" {
                println!("HEAP {}", heap_bytes());
            }
            if command == "connections" {
                println!("CONNECTIONS {}", hub.connection_count());
            }
            if command == "peak" {
                let samples = samples.borrow();
                let (rate, at) = peak_rate(&samples);
                let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
                let first_at_max = samples
                    .iter()
                    .find(|s| s.1 == max)
                    .map(|s| s.0)
                    .unwrap_or_default();
                println!(
                    "PEAK {rate:.0} {} {max} {}",
                    at.as_millis(),
                    first_at_max.as_millis()
                );
            }
        })
        .await;
        sampler.abort();
        hub.stop().await;
        Ok(())
    });
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("hub child: {e}");
            std::process::exit(1)
        }
    }
}

/// Bytes the allocator has handed out and not taken back, in every arena (glibc's
/// `mallinfo2`: in-use chunks plus mmapped ones). Unlike RSS, it does not see pages the
/// allocator keeps, nor stacks and code: what the program holds.
pub fn heap_bytes() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

/// Asks a child that answers `heap` (the hub child, the bare actix-web server) for its
/// [`heap_bytes`].
pub async fn child_heap_bytes(child: &mut ChildProc) -> Result<u64> {
    child.send("heap").await?;
    let line = child.expect_line("HEAP ", Duration::from_secs(10)).await?;
    Ok(line.trim().parse()?)
}

/// Starts a hub child on `bind` and waits for it to listen; returns it with the wall-clock
/// instant it reported being bound.
pub async fn spawn_hub(bind: SocketAddr) -> Result<(ChildProc, SystemTime)> {
    let args = [
        "--role".to_owned(),
        "hub".to_owned(),
        "--bind".to_owned(),
        bind.to_string(),
    ];
    let mut hub = ChildProc::spawn("hub", &args)?;
    let line = hub
        .expect_line("LISTENING ", Duration::from_secs(30))
        .await?;
    let nanos: u128 = line
        .split_whitespace()
        .next()
        .ok_or("empty LISTENING line")?
        .parse()?;
    Ok((hub, system_time_from_nanos(nanos)))
}

/// A minimal HTTP/1.1 `GET` with `Connection: close`; returns the body of a 200 response.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or("malformed HTTP response")?;
        if !head.starts_with("HTTP/1.1 200") {
            let status = head.lines().next().unwrap_or_default();
            return Err(format!("GET {path}: {status}").into());
        }
        Ok::<_, BoxError>(body.to_owned())
    };
    tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| format!("GET http://{addr}{path} timed out after {timeout:?}"))?
}

/// The hub's open WebSocket connections, from `/health`.
pub async fn health_connections(addr: SocketAddr) -> Result<u64> {
    let body = http_get(addr, "/health", Duration::from_secs(5)).await?;
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    doc["connections"]
        .as_u64()
        .ok_or_else(|| format!("/health has no connections field: {body}").into())
}

/// `tether_hub_handshakes_total` by `result` label, from the hub's `/metrics`.
pub async fn hub_handshakes(addr: SocketAddr) -> Result<BTreeMap<String, f64>> {
    let body = http_get(addr, "/metrics", Duration::from_secs(5)).await?;
    Ok(parse_handshakes(&body))
}

/// `tether_hub_handshakes_total{result="…"} N` lines of a Prometheus text page, by result.
pub fn parse_handshakes(metrics: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("tether_hub_handshakes_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let result = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("result="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default();
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(result).or_insert(0.0) += v;
        }
    }
    out
}

/// Resident set size of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS line")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed VmRSS line")?
        .parse()?;
    Ok(kib)
}

/// `utime + stime` of this process in clock ticks (fields 14 and 15 of `/proc/self/stat`).
pub fn self_cpu_ticks() -> Result<u64> {
    cpu_ticks_of("/proc/self/stat")
}

/// `utime + stime` of process `pid` in clock ticks (from `/proc/<pid>/stat`).
pub fn pid_cpu_ticks(pid: u32) -> Result<u64> {
    cpu_ticks_of(&format!("/proc/{pid}/stat"))
}

fn cpu_ticks_of(path: &str) -> Result<u64> {
    let stat = std::fs::read_to_string(path)?;
    // The command name (field 2) may contain spaces; the fields after it follow the last ')'.
    let after = stat.rsplit_once(')').ok_or("malformed stat file")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11).ok_or("no utime")?.parse()?;
    let stime: u64 = fields.get(12).ok_or("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 if unavailable).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// User + system CPU time of this process from `getrusage(RUSAGE_SELF)` (microsecond
/// resolution, unlike the clock ticks of `/proc`).
pub fn self_rusage_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The `p`-th percentile (0–100, nearest rank) of `sorted` (ascending); 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sleeps until `start + index / per_sec` (pacing a ramp of `per_sec` starts per second).
pub async fn pace(start: Instant, index: usize, per_sec: usize) {
    let due = start + Duration::from_secs_f64(index as f64 / per_sec.max(1) as f64);
    let now = Instant::now();
    if due > now {
        tokio::time::sleep(due - now).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        for (n, parts) in [(10_000, 4), (10_001, 4), (3, 8), (0, 3), (7, 1)] {
            let shares: Vec<usize> = (0..parts).map(|j| share(n, parts, j)).collect();
            assert_eq!(shares.iter().sum::<usize>(), n);
            assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn peak_rate_finds_the_busiest_window() {
        let ms = Duration::from_millis;
        let samples = [
            (ms(0), 0),
            (ms(50), 10),
            (ms(100), 20),
            (ms(150), 120),
            (ms(200), 130),
            (ms(300), 130),
        ];
        let (rate, at) = peak_rate(&samples);
        assert_eq!(rate, 1100.0);
        assert_eq!(at, ms(50));
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn handshakes_are_read_from_prometheus_text() {
        let text = "# TYPE tether_hub_handshakes_total counter\n\
                    tether_hub_handshakes_total{result=\"welcomed\"} 10\n\
                    tether_hub_handshakes_total{result=\"resumed\"} 2\n\
                    tether_hub_connections 12\n";
        let map = parse_handshakes(text);
        assert_eq!(map["welcomed"], 10.0);
        assert_eq!(map["resumed"], 2.0);
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn proc_readers_work_on_this_process() {
        assert!(vm_rss_kib(std::process::id()).unwrap() > 0);
        self_cpu_ticks().unwrap();
        assert!(clock_ticks_per_sec() > 0);
    }
}
