//! Child processes that never outlive their parent: hub nodes of the soak, benchmark helpers,
//! private redis-servers.

/// Asks the kernel to SIGKILL this process when its parent dies, so that no helper outlives an
/// aborted run. Call it first thing in every child role.
pub fn die_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // The parent may already be gone (we would then be a child of init or a subreaper).
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        std::process::exit(1);
    }
}

/// Makes a program started by `command` (one that cannot call [`die_with_parent`] itself)
/// die with the thread that starts it.
pub fn kill_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}
