//! Process setup shared by the benchmark binaries: open-file limits and logging.

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (thousands of sockets need it). Returns
/// the soft limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// File descriptors a run needs: two per connection (the client's end and the server's end,
/// both in this process) plus headroom for the runtime, listeners and stdio.
pub fn fds_needed(connections: usize) -> u64 {
    (connections as u64) * 2 + 256
}

/// Installs a `tracing` subscriber writing to stderr (filter from `RUST_LOG`, default `warn`).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// The CPU time (user and system) every thread of this process whose name (`comm`) starts with
/// `prefix` has used so far; `None` for this process's main thread (whatever its name: the
/// benchmark's own runtime). Read from each thread's CPU clock — nanoseconds, where
/// `/proc/…/stat` counts 10 ms ticks, too coarse for rounds of a few hundred milliseconds. A
/// thread that has exited since an earlier reading is no longer counted.
pub fn threads_cpu(prefix: Option<&str>) -> std::time::Duration {
    let main = std::process::id();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return std::time::Duration::ZERO;
    };
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let tid: u32 = task.file_name().to_str()?.parse().ok()?;
            let wanted = match prefix {
                None => tid == main,
                Some(prefix) => {
                    tid != main
                        && std::fs::read_to_string(task.path().join("comm"))
                            .is_ok_and(|comm| comm.starts_with(prefix))
                }
            };
            wanted.then(|| thread_cpu(tid)).flatten()
        })
        .sum()
}

/// The CPU time thread `tid` of this process has used: `clock_gettime` on the thread's CPU
/// clock, whose id the kernel derives from the thread id (what glibc's
/// `pthread_getcpuclockid` returns: the complemented id shifted by three, with the per-thread
/// and scheduler-clock bits).
fn thread_cpu(tid: u32) -> Option<std::time::Duration> {
    const CPUCLOCK_PERTHREAD: libc::clockid_t = 4;
    const CPUCLOCK_SCHED: libc::clockid_t = 2;
    let tid = libc::clockid_t::try_from(tid).ok()?;
    let clock = (!tid << 3) | CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; an unknown clock id is an error return.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| {
        std::time::Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_is_counted_by_its_name_and_the_main_thread_apart() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spin = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("cpu-test-spin".into())
                .spawn(move || {
                    let started = std::time::Instant::now();
                    // Busy for at least 50 ms of its own CPU, then until told to stop.
                    while started.elapsed() < std::time::Duration::from_millis(50)
                        || !stop.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        std::hint::spin_loop();
                    }
                })
                .unwrap()
        };
        // Wait (on a typed condition, not a fixed sleep) until it has used 20 ms.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while threads_cpu(Some("cpu-test-spin")) < std::time::Duration::from_millis(20) {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread's CPU never grew"
            );
            std::thread::yield_now();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spin.join().unwrap();
        assert_eq!(
            threads_cpu(Some("no-such-thread")),
            std::time::Duration::ZERO
        );
        // The test harness runs tests off the main thread: its CPU is separate and nonzero.
        assert!(threads_cpu(None) > std::time::Duration::ZERO);
    }
}
