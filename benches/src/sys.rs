//! Process setup shared by the benchmark binaries: open-file limits and logging.

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (thousands of sockets need it). Returns
/// the soft limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// File descriptors a run needs: two per connection (the client's end and the server's end,
/// both in this process) plus headroom for the runtime, listeners and stdio.
pub fn fds_needed(connections: usize) -> u64 {
    (connections as u64) * 2 + 256
}

/// Installs a `tracing` subscriber writing to stderr (filter from `RUST_LOG`, default `warn`).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
}
