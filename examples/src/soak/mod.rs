//! The soak tool's engine: fault schedules, the full message ledger, the connection timeline,
//! latencies, service-level objectives, hub metrics, resource readings and the report.
//! `examples/soak.rs` drives it.

pub mod clock;
pub mod faults;
pub mod latency;
pub mod ledger;
pub mod metrics;
pub mod record;
pub mod report;
pub mod resources;
pub mod slo;
pub mod timeline;
