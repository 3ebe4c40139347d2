//! OpenMP wait policy for FAISS.
//!
//! libgomp reads `OMP_WAIT_POLICY` once, in a constructor that runs before `main`, so setting the
//! variable from Rust is too late for this process. Spinning OpenMP threads made FAISS searches
//! 3-4x slower on 2 cores (docs/benchmarks.md), so when the user has not chosen a policy we set
//! `PASSIVE` and re-execute ourselves once. An explicit `OMP_WAIT_POLICY` is always respected.

use std::os::unix::process::CommandExt;

/// Re-executes the current binary with `OMP_WAIT_POLICY=PASSIVE` unless the variable is set.
/// Falls through silently (keeping the default policy) if the re-exec is impossible.
pub fn ensure_passive_wait_policy() {
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .exec();
    // exec only returns on failure; carry on with the default policy.
    eprintln!("warning: could not re-execute with OMP_WAIT_POLICY=PASSIVE: {err}");
}
