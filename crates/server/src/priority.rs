//! Thread priorities: the work of requests already admitted goes before taking in new ones.
//!
//! The async runtime's threads read, decode and refuse requests; the user-tower workers compute
//! the admitted ones. On a saturated core the two compete, and the kernel shares it by weight, so
//! at equal priority a flood of refusals slows every admitted request down and the admitted
//! throughput falls to a fraction of capacity (`ServeConfig::grpc_thread_nice`). Lowering the
//! runtime's threads (raising their nice value) needs no privileges, unlike raising the workers.

use std::io;

/// Raises the nice value of the calling thread (not the whole process) by `by`, up to 19, as
/// `nice -n` does for a process: a thread pool lowers its own threads as they start, below the
/// rest of a process that may itself run under `nice`. On Linux the nice value is a per-thread
/// attribute.
pub fn lower_this_thread(by: i32) -> io::Result<()> {
    let nice = (this_thread_nice()? + by).min(19);
    // SAFETY: gettid takes no arguments and cannot fail; setpriority only reads its arguments.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The nice value of the calling thread.
pub fn this_thread_nice() -> io::Result<i32> {
    // getpriority returns the nice value itself, so -1 is only an error if errno says so.
    // SAFETY: as above; errno is this thread's own.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    unsafe { *libc::__errno_location() = 0 };
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    match io::Error::last_os_error() {
        e if nice == -1 && e.raw_os_error() != Some(0) => Err(e),
        _ => Ok(nice),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_lowers_itself_and_leaves_the_others_as_they_were() {
        let before = this_thread_nice().unwrap();
        let lowered = std::thread::spawn(move || {
            lower_this_thread(3).unwrap();
            this_thread_nice().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (before + 3).min(19));
        assert_eq!(this_thread_nice().unwrap(), before);
    }
}
