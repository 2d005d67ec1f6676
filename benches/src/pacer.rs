//! Paced publishing: a thread that hands out send permits at a fixed rate, for latency measured
//! at a given load (e.g. half the maximum rate) rather than flat out.
//!
//! tokio's timers have a 1 ms resolution, which at tens of thousands of messages per second
//! would release bursts of dozens of messages at once and measure their queueing. The pacer
//! instead sleeps on its own thread with the kernel's high-resolution timers (timer slack set
//! to 1 µs) and adds a permit to a [`Semaphore`] for every message that has come due; the
//! publisher, on the runtime being measured, takes one permit per message.
//!
//! It sleeps at least [`MIN_TICK`] at a time and then releases every permit that came due
//! meanwhile. Sleeping once per message instead (every 4 µs at 250,000 messages/s) kept the
//! pacer's thread busy on a core of its own with system calls and woke the measured runtime
//! once per message from another thread — on two cores, a third busy thread beside the system
//! being measured.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// The shortest sleep of the pacer's thread: 50 µs (at most a burst of what comes due in 50 µs
/// is released at once — 12 messages at 250,000/s).
pub const MIN_TICK: Duration = Duration::from_micros(50);

/// A running pacer: `permits` gains one permit per message as it comes due.
#[derive(Debug)]
pub struct Pacer {
    permits: Arc<Semaphore>,
    thread: Option<JoinHandle<()>>,
}

impl Pacer {
    /// Starts releasing `messages` permits at `per_sec` per second, the first at once.
    pub fn start(messages: usize, per_sec: f64) -> std::io::Result<Pacer> {
        let permits = Arc::new(Semaphore::new(0));
        let released = permits.clone();
        let per_sec = per_sec.max(1.0);
        let thread = std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || {
                // SAFETY: PR_SET_TIMERSLACK takes an unsigned long argument and only changes
                // this thread's timer slack.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong) };
                let start = Instant::now();
                let mut issued = 0usize;
                while issued < messages {
                    let due =
                        ((start.elapsed().as_secs_f64() * per_sec) as usize + 1).min(messages);
                    if due > issued {
                        released.add_permits(due - issued);
                        issued = due;
                    }
                    if issued >= messages {
                        break;
                    }
                    let next = start + Duration::from_secs_f64(issued as f64 / per_sec);
                    let now = Instant::now();
                    std::thread::sleep(next.saturating_duration_since(now).max(MIN_TICK));
                }
            })?;
        Ok(Pacer {
            permits,
            thread: Some(thread),
        })
    }

    /// Takes the next message's permit if it is already due.
    pub fn try_next(&self) -> bool {
        match self.permits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Waits until the next message is due and takes its permit.
    pub async fn next(&self) -> Result<(), tokio::sync::AcquireError> {
        self.permits.acquire().await?.forget();
        Ok(())
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        // The thread ends by itself once it has released every permit; a pacer dropped early
        // (a failed round) is left to finish releasing into a semaphore nobody reads.
        if let Some(thread) = self.thread.take() {
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `n` permits of a pacer at `per_sec`; the time that took.
    async fn paced(n: usize, per_sec: f64) -> Duration {
        let pacer = Pacer::start(n, per_sec).unwrap();
        let start = Instant::now();
        for _ in 0..n {
            pacer.next().await.unwrap();
        }
        start.elapsed()
    }

    #[tokio::test]
    async fn permits_come_at_the_rate() {
        // 200 at 2,000/s: the last is due after 99.5 ms.
        let elapsed = paced(200, 2_000.0).await;
        assert!(elapsed >= Duration::from_millis(95), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[tokio::test]
    async fn a_fast_rate_is_released_in_ticks_and_keeps_its_pace() {
        // 20,000 at 400,000/s: due over 50 ms, released every tick or so.
        let elapsed = paced(20_000, 400_000.0).await;
        assert!(elapsed >= Duration::from_millis(45), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }
}
