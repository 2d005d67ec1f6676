//! One clock for every process of a run: `CLOCK_MONOTONIC`, which all processes on a machine
//! share, in nanoseconds. A publisher puts its reading in the payload; a subscriber in another
//! process subtracts it from its own reading (as `benches/src/payload.rs` does within one).

use std::time::Duration;

/// `CLOCK_MONOTONIC` now, in nanoseconds (since an unspecified point, the same for every process
/// on this machine until it reboots).
pub fn monotonic_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer; CLOCK_MONOTONIC is
    // always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// How long ago `then` (a [`monotonic_nanos`] reading) was; zero if it is in the future.
pub fn since(then: u64) -> Duration {
    Duration::from_nanos(monotonic_nanos().saturating_sub(then))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward() {
        let a = monotonic_nanos();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_nanos();
        assert!(b >= a + 2_000_000, "{a} → {b}");
        assert!(since(a) >= Duration::from_millis(2));
        assert_eq!(since(u64::MAX), Duration::ZERO);
    }
}
