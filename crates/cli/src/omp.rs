//! Thread-pool environment for FAISS, OpenMP and OpenBLAS.
//!
//! libgomp and OpenBLAS read their settings once, in constructors that run before `main`, so
//! setting the variables from Rust is too late for this process. When the user has not chosen,
//! we set them and re-execute ourselves once:
//!
//! - `OMP_WAIT_POLICY=PASSIVE` always: spinning OpenMP threads made FAISS searches 3-4x slower
//!   on 2 cores (docs/benchmarks.md).
//! - `OPENBLAS_NUM_THREADS=1` for `serve`: serving runs many tiny matrix products from several
//!   threads at once, and OpenBLAS's own pool only added wake-ups and `sched_yield` spinning
//!   (a quarter of the server's CPU in a profile); with it, closed-loop Recommend/s rose from
//!   2,264 to 2,626 and the open-loop p99 at 1,000/s fell from 73 ms to 9 ms (docs/benchmarks.md).
//!   Batch jobs keep OpenBLAS's threads: FAISS's k-means needs them.
//! - `OMP_NUM_THREADS=1` for `serve`: FAISS otherwise splits every single-query search over an
//!   OpenMP team, and waking the team costs more than the search; requests already run in
//!   parallel. On the 1M-item benchmark closed-loop Recommend/s rose from 3,284 to 3,997 and the
//!   open-loop p99 at 2,000/s fell from 21.8 to 13.8 ms (docs/benchmarks.md).
//!
//! - `GLIBC_TUNABLES` (malloc) for every command but `serve`: libtorch frees each step's large
//!   tensors, and glibc hands memory above its thresholds back to the kernel, so the next step
//!   faults it in again, page by page (280M minor faults in one Complete Journey training, a
//!   third of its CPU time in the kernel). Allocating below a 32 MiB mmap threshold and keeping
//!   freed memory (trim threshold 4 GiB, 256 MiB top pad) trained 18–32% more examples/s
//!   (docs/benchmarks.md). Serving keeps glibc's defaults: its figures were measured with them.
//!
//! - `OPENBLAS_CORETYPE` when OpenBLAS does not know the CPU: Debian's OpenBLAS 0.3.21 falls
//!   back to its SSE3 `Prescott` kernels on CPU models newer than it (an Emerald Rapids Xeon,
//!   family 6 model 207, in session 14), and libtorch's matrix products in this binary resolve
//!   to that OpenBLAS. With the AVX-512 kernels (`SkylakeX`) the same training step ran 2.5x
//!   more examples/s (docs/benchmarks.md); `Haswell` is chosen on AVX2 CPUs.
//!
//! An explicit setting of any of these variables is always respected.

use std::os::unix::process::CommandExt;

/// glibc malloc settings for batch jobs (training, indexing, evaluation): see the module docs.
pub const BATCH_MALLOC_TUNABLES: &str = "glibc.malloc.mmap_threshold=33554432:\
glibc.malloc.trim_threshold=4294967296:glibc.malloc.top_pad=268435456";

/// Re-executes the current binary with the settings above unless they are already set.
/// Falls through silently (keeping the defaults) if the re-exec is impossible.
pub fn ensure_thread_environment() {
    // args_os: a non-UTF-8 argument is the argument parser's to report, not a panic here.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).take(2).collect();
    let serving = args.first().is_some_and(|a| a == "serve")
        || (args.len() == 2 && args[0] == "pipeline" && args[1] == "serve");
    let mut missing: Vec<(&str, &str)> = Vec::new();
    if !serving && std::env::var_os("GLIBC_TUNABLES").is_none() {
        missing.push(("GLIBC_TUNABLES", BATCH_MALLOC_TUNABLES));
    }
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        missing.push(("OMP_WAIT_POLICY", "PASSIVE"));
    }
    if serving && std::env::var_os("OPENBLAS_NUM_THREADS").is_none() {
        missing.push(("OPENBLAS_NUM_THREADS", "1"));
    }
    if serving && std::env::var_os("OMP_NUM_THREADS").is_none() {
        missing.push(("OMP_NUM_THREADS", "1"));
    }
    if std::env::var_os("OPENBLAS_CORETYPE").is_none() {
        if let Some(core) = openblas_coretype() {
            missing.push(("OPENBLAS_CORETYPE", core));
        }
    }
    if missing.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .envs(missing.iter().copied())
        .exec();
    // exec only returns on failure; carry on with the defaults.
    errln!("warning: could not re-execute with {missing:?}: {err}");
}

/// The OpenBLAS kernels to ask for when OpenBLAS fell back to its generic `Prescott` ones on a
/// CPU that has AVX-512 or AVX2 (the features as the OS enables them); `None` when OpenBLAS
/// recognised the CPU.
#[cfg(target_arch = "x86_64")]
fn openblas_coretype() -> Option<&'static str> {
    #[link(name = "openblas")]
    extern "C" {
        fn openblas_get_corename() -> *const std::ffi::c_char;
    }
    // SAFETY: OpenBLAS returns a pointer to a static NUL-terminated string (its `gotoblas`
    // table's name), valid for the life of the process.
    let name = unsafe {
        let p = openblas_get_corename();
        if p.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().to_lowercase()
    };
    if name != "prescott" {
        return None;
    }
    let avx512 = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512cd");
    if avx512 {
        Some("SkylakeX")
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        Some("Haswell")
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn openblas_coretype() -> Option<&'static str> {
    None
}
