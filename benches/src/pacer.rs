//! Paced publishing: a thread that hands out send permits at a fixed rate, for latency measured
//! at a given load (e.g. half the maximum rate) rather than flat out.
//!
//! tokio's timers have a 1 ms resolution, which at tens of thousands of messages per second
//! would release bursts of dozens of messages at once and measure their queueing. The pacer
//! instead sleeps on its own thread with the kernel's high-resolution timers (timer slack set
//! to 1 µs) and adds a permit to a [`Semaphore`] for every message that has come due; the
//! publisher, on the runtime being measured, takes one permit per message.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

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
                    let next = start + Duration::from_secs_f64(issued as f64 / per_sec);
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
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

    #[tokio::test]
    async fn permits_come_at_the_rate() {
        let pacer = Pacer::start(200, 2_000.0).unwrap();
        let start = Instant::now();
        for _ in 0..200 {
            pacer.next().await.unwrap();
        }
        let elapsed = start.elapsed();
        // 200 at 2,000/s: the last is due after 99.5 ms.
        assert!(elapsed >= Duration::from_millis(95), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }
}
