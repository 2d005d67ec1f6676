//! Tether's benchmarks live in `benches/`:
//!
//! * `protocol` — encoding and decoding of v1 frames (criterion).
//! * `reconnect` — the ReconnectManager's and heartbeat's per-decision cost (criterion).
//!
//! Run them with `cargo bench -p tether-benches`.
