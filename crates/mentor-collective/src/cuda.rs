//! The CUDA runtime calls the collectives need: choosing the calling thread's device, and a
//! device's PCI bus id (which GPU of its host a worker's device is).
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
type DeviceGetPciBusId = unsafe extern "C" fn(*mut std::ffi::c_char, c_int, c_int) -> c_int;

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

/// The first CUDA runtime that opens (kept open for the process's life).
fn runtime() -> Result<&'static libloading::Library, CollectiveError> {
    static RUNTIME: OnceLock<Result<libloading::Library, String>> = OnceLock::new();
    let loaded = RUNTIME.get_or_init(|| {
        let mut failures = Vec::new();
        for path in candidates() {
            // SAFETY: loading the CUDA runtime runs its initialisers, which have no
            // preconditions.
            match unsafe { libloading::Library::new(&path) } {
                Ok(library) => return Ok(library),
                Err(error) => failures.push(format!("{path}: {error}")),
            }
        }
        Err(format!(
            "the CUDA runtime (libcudart) was not found; tried {}",
            failures.join("; ")
        ))
    });
    loaded
        .as_ref()
        .map_err(|message| CollectiveError::Nccl(message.clone()))
}

/// `cudaSetDevice`, from the runtime.
fn set_device_function() -> Result<SetDevice, CollectiveError> {
    let library = runtime()?;
    // SAFETY: `cudaSetDevice` has this signature in every CUDA version.
    unsafe { library.get::<SetDevice>(b"cudaSetDevice\0") }
        .map(|symbol| *symbol)
        .map_err(|error| CollectiveError::Nccl(format!("cudaSetDevice: {error}")))
}

/// The PCI bus id of CUDA device `index` (`cudaDeviceGetPCIBusId`: "0000:3B:00.0"), which
/// names one GPU of its host whatever `CUDA_VISIBLE_DEVICES` numbers it.
pub fn pci_bus_id(index: usize) -> Result<String, CollectiveError> {
    let library = runtime()?;
    // SAFETY: `cudaDeviceGetPCIBusId(char*, int, int)` has this signature in every CUDA
    // version since 4.1.
    let function = unsafe { library.get::<DeviceGetPciBusId>(b"cudaDeviceGetPCIBusId\0") }
        .map(|symbol| *symbol)
        .map_err(|error| CollectiveError::Nccl(format!("cudaDeviceGetPCIBusId: {error}")))?;
    let ordinal = c_int::try_from(index)
        .map_err(|_| CollectiveError::Nccl(format!("CUDA device {index} is out of range")))?;
    // 13 characters and the terminator are enough ("0000:3B:00.0"); room for more.
    let mut buffer = [0 as std::ffi::c_char; 64];
    // SAFETY: the buffer is as long as the length passed; the runtime writes a terminated
    // string into it, or returns an error code.
    let code = unsafe { function(buffer.as_mut_ptr(), buffer.len() as c_int, ordinal) };
    if code != 0 {
        return Err(CollectiveError::Nccl(format!(
            "cudaDeviceGetPCIBusId({index}) failed with CUDA error {code}"
        )));
    }
    // Terminated within the buffer whatever the runtime wrote.
    buffer[buffer.len() - 1] = 0;
    // SAFETY: a terminated string within the buffer.
    let id = unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) };
    Ok(id.to_string_lossy().into_owned())
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
