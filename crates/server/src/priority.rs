//! Thread priorities: the work of requests already admitted goes before taking in new ones.
//!
//! The async runtime's worker threads read, decode and refuse requests; the user-tower workers
//! compute the admitted ones. On a saturated core the two compete, and the kernel shares it by
//! weight, so at equal priority a flood of refusals slows every admitted request down and the
//! admitted throughput falls to a fraction of capacity (`ServeConfig::grpc_thread_nice`).
//! Lowering the runtime's threads (raising their nice value) needs no privileges, unlike raising
//! the user-tower workers. The runtime's blocking pool is lowered with them (its threads start
//! from lowered ones and inherit their priority, and could not come back up without privileges);
//! it only loads reloaded snapshots, while the CPU work of every admitted request, `SimilarItems`
//! searches included, runs on the user-tower workers.

use std::io;

/// The nice value for threads `by` levels below the calling one, up to 19: as `nice -n` does for
/// a process, relative, so that a server started under `nice` keeps the same gap. Taken once, on
/// the thread whose priority the others inherit, since a thread created by a lowered thread
/// starts lowered and adding `by` there again would count it twice.
pub fn below_this_thread(by: i32) -> io::Result<i32> {
    Ok((this_thread_nice()? + by).min(19))
}

/// Sets the calling thread's nice value; on Linux it is a per-thread attribute.
#[cfg(target_os = "linux")]
pub fn set_this_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority only reads its arguments.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, this_thread_id(), nice) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's nice value: lowering is relative, so it is read first.
#[cfg(target_os = "linux")]
pub fn this_thread_nice() -> io::Result<i32> {
    // getpriority returns the nice value itself, so -1 is only an error if errno says so.
    // SAFETY: errno is this thread's own; getpriority only reads its arguments.
    let tid = this_thread_id();
    unsafe { *libc::__errno_location() = 0 };
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    match io::Error::last_os_error() {
        e if nice == -1 && e.raw_os_error() != Some(0) => Err(e),
        _ => Ok(nice),
    }
}

/// The calling thread's id: with `PRIO_PROCESS`, Linux applies a nice value to the one thread
/// it names.
#[cfg(target_os = "linux")]
fn this_thread_id() -> libc::id_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

/// Elsewhere a nice value may be the whole process's: leave it alone.
#[cfg(not(target_os = "linux"))]
pub fn set_this_thread_nice(_nice: i32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "per-thread priorities are only set on Linux",
    ))
}

#[cfg(not(target_os = "linux"))]
pub fn this_thread_nice() -> io::Result<i32> {
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_lowers_itself_and_leaves_the_others_as_they_were() {
        let before = this_thread_nice().unwrap();
        let target = below_this_thread(3).unwrap();
        assert_eq!(target, (before + 3).min(19));
        let lowered = std::thread::spawn(move || {
            set_this_thread_nice(target).unwrap();
            this_thread_nice().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, target);
        assert_eq!(this_thread_nice().unwrap(), before);
    }

    /// A thread inherits its creator's nice value: adding `by` to a lowered thread's own (as the
    /// first version did, in each thread as it started) lowered the blocking pool twice.
    #[test]
    fn a_thread_started_by_a_lowered_thread_is_not_lowered_twice() {
        let target = below_this_thread(2).unwrap();
        let inner = std::thread::spawn(move || {
            set_this_thread_nice(target).unwrap();
            std::thread::spawn(move || {
                set_this_thread_nice(target).unwrap();
                this_thread_nice().unwrap()
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inner, target);
    }
}
