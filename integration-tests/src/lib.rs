//! Test support for Tether, and Tether's loopback integration tests (`tests/`).
//!
//! * [`FaultProxy`]: a fault-injecting TCP proxy that sits between clients and a hub and can
//!   cut, stall, refuse, delay or blackhole connections on demand.
//! * [`RedisServer`]: a private `redis-server` process on a loopback port, killed and
//!   restarted on demand (tests that need Redis use a real one and never skip).
//! * [`process`]: child processes that die with their parent.
//! * [`raw`]: a raw WebSocket peer, for tests that check exact frames, errors and close codes.
//! * [`attack`]: a hostile peer on a bare TCP socket (lying frame headers, never reading), a
//!   healthy publisher/subscriber pair to run beside attacks, and the process's peak memory.
//! * [`harness`]: a real hub on loopback with test-speed timings, fast-retrying client
//!   configurations, and an [`EventLog`](harness::EventLog) that waits for typed transitions
//!   with a timeout.
//! * [`TestCert`]: a self-signed certificate made at run time, for hubs that serve TLS.
//!
//! Used by the integration tests, the examples and the soak tool. Not part of Tether's public
//! API and never published.

#![warn(missing_docs)]

pub mod attack;
pub mod harness;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod redis_server;
pub mod tls;

pub use proxy::{FaultProxy, ProxyStats};
pub use redis_server::{Persistence, RedisServer};
pub use tls::TestCert;
