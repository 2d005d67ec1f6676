//! The soak tool's engine: fault schedules, the full message ledger, the connection timeline,
//! resource readings and the report. `examples/soak.rs` drives it.

pub mod faults;
pub mod ledger;
pub mod report;
pub mod resources;
pub mod timeline;
