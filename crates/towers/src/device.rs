//! Choosing where tensors live.

use tch::Device;

use crate::error::{Error, Result};

/// Makes libtorch's CUDA backend visible if this machine can load it.
///
/// rustc links with `--as-needed`, which drops `libtorch_cuda.so` (nothing references it
/// directly), and its CUDA dependencies are not installed on CPU machines anyway. Loading it at
/// run time, before anything asks libtorch about CUDA, lets its static initialisers register the
/// CUDA hooks, so the same binary uses a GPU where a full PyTorch 2.11 installation is on the
/// loader path (see docs/development.md) and stays CPU-only elsewhere. Runs once.
pub fn load_cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        let name = c"libtorch_cuda.so";
        // SAFETY: dlopen with a valid C string; the handle is intentionally never closed.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a thread-local C string or null.
            let why = unsafe { libc::dlerror() };
            let why = if why.is_null() {
                String::new()
            } else {
                unsafe { std::ffi::CStr::from_ptr(why) }
                    .to_string_lossy()
                    .into_owned()
            };
            tracing::debug!("CUDA backend not loaded ({why}); using CPU only");
            false
        } else {
            true
        }
    })
}

/// Sets the thread count of OpenBLAS, when the matrix products of this process resolved to
/// it, and returns the count it had; `None` (and nothing changed) with any other BLAS.
///
/// OpenBLAS keeps one pool of threads for the whole process. Training's batch parts call it from
/// several threads at once, each wanting its products run on its own thread: a shared pool of
/// more than one thread would serialise them and spin between calls (`trainer::parts`).
pub fn set_blas_threads(threads: i32) -> Option<i32> {
    type Get = unsafe extern "C" fn() -> libc::c_int;
    type Set = unsafe extern "C" fn(libc::c_int);
    // SAFETY: dlsym over the symbols already loaded, with valid C strings; both symbols, when
    // present, are OpenBLAS's functions of exactly these signatures.
    unsafe {
        let get = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_get_num_threads".as_ptr());
        let set = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_set_num_threads".as_ptr());
        if get.is_null() || set.is_null() {
            return None;
        }
        let get: Get = std::mem::transmute::<*mut libc::c_void, Get>(get);
        let set: Set = std::mem::transmute::<*mut libc::c_void, Set>(set);
        let before = get();
        if before != threads {
            set(threads.max(1));
        }
        Some(before)
    }
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`. `auto` picks the first GPU when libtorch sees one.
pub fn parse_device(spec: &str) -> Result<Device> {
    load_cuda_backend();
    let err = |reason: &str| Error::Device {
        device: spec.to_string(),
        reason: reason.to_string(),
    };
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0).map_err(|r| err(&r)),
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n).map_err(|r| err(&r)),
            _ => Err(err("expected auto, cpu, cuda or cuda:N")),
        },
    }
}

fn cuda(n: usize) -> std::result::Result<Device, String> {
    let count = tch::Cuda::device_count() as usize;
    if n < count {
        Ok(Device::Cuda(n))
    } else if count == 0 {
        Err(
            "libtorch sees no CUDA device on this machine (see docs/development.md for GPU builds)"
                .into(),
        )
    } else {
        Err(format!("only {count} CUDA device(s) visible"))
    }
}

/// Human-readable name of a device, as recorded in metrics.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("`tpu`") && err.contains("cuda:N"), "{err}");
        assert!(parse_device("cuda:x").is_err());
        if tch::Cuda::device_count() == 0 {
            let err = parse_device("cuda").unwrap_err().to_string();
            assert!(err.contains("no CUDA device"), "{err}");
            assert_eq!(parse_device("auto").unwrap(), Device::Cpu);
        }
    }
}
