//! Test support for Tether.
//!
//! This crate holds shared helpers for Tether's integration tests, examples
//! and soak tooling. It is not part of the public Tether API and is never
//! published.
//!
//! For now it provides [`FaultProxy`], a small fault-injecting TCP proxy that
//! sits between a client and a hub and can cut, stall, refuse, delay or
//! blackhole connections on demand, so tests can exercise Tether's
//! connection-loss recovery deterministically. A helper for running a real
//! hub in-process will be added later.

pub mod proxy;

pub use proxy::{FaultProxy, ProxyStats};
