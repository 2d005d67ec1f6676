//! The ReconnectManager and heartbeat are consulted on every failure and every timer: their
//! decisions must cost nanoseconds, so an idle or retrying client costs timers only.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tether_transport::heartbeat::Heartbeat;
use tether_transport::{ReconnectManager, ReconnectPolicy};
use tokio::time::Instant;

fn bench(c: &mut Criterion) {
    c.bench_function("reconnect decision (attempt failed)", |b| {
        let mut m = ReconnectManager::new(
            ReconnectPolicy {
                max_attempts: None,
                ..ReconnectPolicy::default()
            },
            Some(1),
        );
        let now = Instant::now();
        b.iter(|| {
            m.begin_attempt(now);
            black_box(m.on_attempt_failed(now))
        })
    });
    c.bench_function("heartbeat poll", |b| {
        let now = Instant::now();
        let mut hb = Heartbeat::new(Duration::from_secs(10), Duration::from_secs(25), now);
        b.iter(|| black_box(hb.poll(now)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
