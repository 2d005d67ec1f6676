//! Process CPU time and peak memory, read from `/proc` (Linux). Elsewhere they read as zero.

use std::time::Duration;

/// Clock ticks per second for `/proc/self/stat` times (the Linux ABI value `USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user + system) this process has used so far.
pub fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    Duration::from_secs_f64((ticks(11) + ticks(12)) / TICKS_PER_SECOND)
}

/// Peak resident set size of this process, in MiB (`VmHWM`).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        if cfg!(target_os = "linux") {
            let before = cpu_time();
            let mut x = 0u64;
            for i in 0..50_000_000u64 {
                x = x.wrapping_add(i ^ (x >> 3));
            }
            std::hint::black_box(x);
            assert!(cpu_time() > before);
            assert!(peak_rss_mib() > 1.0);
        }
    }
}
