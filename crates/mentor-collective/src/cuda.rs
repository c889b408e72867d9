//! The one CUDA runtime call the collectives need: choosing the calling thread's device.
//!
//! NCCL binds a communicator to the thread's current CUDA device, and the null stream its
//! collectives run on is that device's. libtorch changes the device only for the span of each
//! operation, so a worker on `cuda:1` whose thread never chose its device would form its NCCL
//! communicator on GPU 0 (refused as "Duplicate GPU" next to the worker that owns it) and enqueue
//! on the wrong stream. The runtime is loaded at run time, as NCCL is: the copy libtorch mapped
//! in this process (found in `/proc/self/maps`), else the usual names.
#![allow(unsafe_code)]

use std::ffi::c_int;
use std::sync::OnceLock;

use crate::CollectiveError;

type SetDevice = unsafe extern "C" fn(c_int) -> c_int;

/// Where the CUDA runtime may be, the mapped copy first.
fn candidates() -> Vec<String> {
    let mut paths = Vec::new();
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        for path in maps
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5))
        {
            let name = path.rsplit('/').next().unwrap_or(path);
            if name.starts_with("libcudart.so") && !paths.iter().any(|p| p == path) {
                paths.push(path.to_string());
            }
        }
    }
    for name in ["libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
        paths.push(name.to_string());
    }
    paths
}

/// `cudaSetDevice`, from the first runtime that opens (kept open for the process's life).
fn set_device_function() -> Result<SetDevice, CollectiveError> {
    static RUNTIME: OnceLock<Result<(libloading::Library, SetDevice), String>> = OnceLock::new();
    let loaded = RUNTIME.get_or_init(|| {
        let mut failures = Vec::new();
        for path in candidates() {
            // SAFETY: loading the CUDA runtime runs its initialisers, which have no
            // preconditions; `cudaSetDevice` has this signature in every CUDA version.
            match unsafe { libloading::Library::new(&path) } {
                Ok(library) => match unsafe { library.get::<SetDevice>(b"cudaSetDevice\0") } {
                    Ok(symbol) => {
                        let function = *symbol;
                        return Ok((library, function));
                    }
                    Err(error) => failures.push(format!("{path}: {error}")),
                },
                Err(error) => failures.push(format!("{path}: {error}")),
            }
        }
        Err(format!(
            "the CUDA runtime (libcudart) was not found; tried {}",
            failures.join("; ")
        ))
    });
    match loaded {
        Ok((_, function)) => Ok(*function),
        Err(message) => Err(CollectiveError::Nccl(message.clone())),
    }
}

/// Makes CUDA device `index` the calling thread's current device (`cudaSetDevice`).
pub fn set_current_device(index: usize) -> Result<(), CollectiveError> {
    let set_device = set_device_function()?;
    let ordinal = c_int::try_from(index)
        .map_err(|_| CollectiveError::Nccl(format!("CUDA device {index} is out of range")))?;
    // SAFETY: a plain runtime call on a valid ordinal type; errors come back as a code.
    let code = unsafe { set_device(ordinal) };
    if code == 0 {
        Ok(())
    } else {
        Err(CollectiveError::Nccl(format!(
            "cudaSetDevice({index}) failed with CUDA error {code} (35: no or too old a CUDA driver; 100: no CUDA device; 101: no such device)"
        )))
    }
}
