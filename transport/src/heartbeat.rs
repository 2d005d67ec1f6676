//! Liveness of one physical connection, shared by both ends.
//!
//! Any frame received proves the peer alive. When nothing has been received for `interval`, a
//! WebSocket ping goes out (at most one per `interval`); when nothing has been received for
//! `idle_timeout`, the connection is declared dead — this is what catches half-open connections
//! where TCP is up and nothing flows. The monitor is pure: the actor asks it what to do and when
//! to ask again, so detection is exact to the timer, and a quiet connection costs one timer.

use std::time::Duration;

use tokio::time::Instant;

/// Default ping interval: 10 s.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Default idle timeout: 25 s (a dead peer is detected within 30 s).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(25);

/// What the connection's owner should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatAction {
    /// Send a ping if `ping`, then ask again after `next_check`.
    Continue {
        /// Whether to send a ping now.
        ping: bool,
        /// When to call [`Heartbeat::poll`] again.
        next_check: Duration,
    },
    /// Nothing received for longer than the idle timeout: close the connection.
    TimedOut {
        /// How long the connection has been silent.
        silent_for: Duration,
    },
}

/// The liveness state of one connection.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    idle_timeout: Duration,
    last_seen: Instant,
    last_ping: Option<Instant>,
}

impl Heartbeat {
    /// A monitor for a connection that was last heard from at `now`.
    pub fn new(interval: Duration, idle_timeout: Duration, now: Instant) -> Self {
        Heartbeat {
            interval,
            idle_timeout,
            last_seen: now,
            last_ping: None,
        }
    }

    /// When the peer was last heard from.
    pub fn last_seen(&self) -> Instant {
        self.last_seen
    }

    /// Something (any frame, ping, or pong) arrived at `now`.
    pub fn on_activity(&mut self, now: Instant) {
        self.last_seen = self.last_seen.max(now);
    }

    /// How long the connection has been silent at `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_seen)
    }

    /// Decides what to do at `now`.
    pub fn poll(&mut self, now: Instant) -> HeartbeatAction {
        let silent = self.silent_for(now);
        if silent >= self.idle_timeout {
            return HeartbeatAction::TimedOut { silent_for: silent };
        }
        let since_ping = self
            .last_ping
            .map(|p| now.saturating_duration_since(p))
            .unwrap_or(Duration::MAX);
        let ping = silent >= self.interval && since_ping >= self.interval;
        if ping {
            self.last_ping = Some(now);
        }
        let until_timeout = self.idle_timeout - silent;
        let until_ping = if ping {
            self.interval
        } else {
            // Next ping is due once silence reaches the interval and the last ping is old enough.
            let by_silence = self.interval.saturating_sub(silent);
            let by_ping = self.interval.saturating_sub(since_ping.min(self.interval));
            by_silence.max(by_ping)
        };
        HeartbeatAction::Continue {
            ping,
            next_check: until_timeout.min(until_ping).max(Duration::from_millis(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_pinged_then_timed_out_exactly() {
        let mut hb = Heartbeat::new(secs(10), secs(25), Instant::now());
        assert_eq!(
            hb.poll(Instant::now()),
            HeartbeatAction::Continue {
                ping: false,
                next_check: secs(10)
            }
        );
        tokio::time::advance(secs(10)).await;
        assert_eq!(
            hb.poll(Instant::now()),
            HeartbeatAction::Continue {
                ping: true,
                next_check: secs(10)
            }
        );
        tokio::time::advance(secs(10)).await;
        assert_eq!(
            hb.poll(Instant::now()),
            HeartbeatAction::Continue {
                ping: true,
                next_check: secs(5)
            }
        );
        tokio::time::advance(secs(5)).await;
        assert_eq!(
            hb.poll(Instant::now()),
            HeartbeatAction::TimedOut {
                silent_for: secs(25)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_keeps_it_alive_without_pings() {
        let mut hb = Heartbeat::new(secs(10), secs(25), Instant::now());
        for _ in 0..100 {
            tokio::time::advance(secs(9)).await;
            hb.on_activity(Instant::now());
            match hb.poll(Instant::now()) {
                HeartbeatAction::Continue { ping, .. } => assert!(!ping),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pong_after_ping_resets_the_silence() {
        let mut hb = Heartbeat::new(secs(1), secs(3), Instant::now());
        tokio::time::advance(secs(1)).await;
        assert!(matches!(
            hb.poll(Instant::now()),
            HeartbeatAction::Continue { ping: true, .. }
        ));
        tokio::time::advance(Duration::from_millis(20)).await;
        hb.on_activity(Instant::now());
        assert_eq!(hb.silent_for(Instant::now()), Duration::ZERO);
        tokio::time::advance(Duration::from_millis(2900)).await;
        assert!(matches!(
            hb.poll(Instant::now()),
            HeartbeatAction::Continue { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn one_second_timeouts_work_for_tests() {
        let mut hb = Heartbeat::new(Duration::from_millis(300), secs(1), Instant::now());
        let mut waited = Duration::ZERO;
        loop {
            match hb.poll(Instant::now()) {
                HeartbeatAction::Continue { next_check, .. } => {
                    tokio::time::advance(next_check).await;
                    waited += next_check;
                }
                HeartbeatAction::TimedOut { silent_for } => {
                    assert_eq!(silent_for, secs(1));
                    break;
                }
            }
        }
        assert_eq!(waited, secs(1));
    }
}
