//! The worker's model code: architectures, noise, training, evaluation and pseudo-labelling.
//!
//! Everything here runs on the dedicated libtorch thread of the worker binary, never on a tokio
//! thread. It talks to the rest of the process through plain structs ([`tasks`]) and progress
//! callbacks; it knows nothing of gRPC.

pub mod augment;
pub mod cpu;
pub mod dataset;
pub mod distributed;
pub mod models;
pub mod mpl;
pub mod optim;
pub mod tasks;
pub mod window;

/// Waits until `device` has finished the work queued on it (nothing to wait for on the CPU):
/// what a timing of GPU work must do before it reads the clock.
pub fn synchronize(device: tch::Device) {
    if let tch::Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Parses `cpu`, `cuda` (the first GPU) or `cuda:N`.
pub fn parse_device(text: &str) -> Result<tch::Device, String> {
    if text == "cpu" {
        return Ok(tch::Device::Cpu);
    }
    let index = if text == "cuda" {
        Some("0")
    } else {
        text.strip_prefix("cuda:")
    };
    let Some(index) = index else {
        return Err(format!(
            "unknown device `{text}`, expected `cpu`, `cuda` or `cuda:N`"
        ));
    };
    let index: usize = index
        .parse()
        .map_err(|_| format!("unknown device `{text}`, expected `cpu`, `cuda` or `cuda:N`"))?;
    if !tch::Cuda::is_available() {
        return Err(format!(
            "device `{text}` asked for, but CUDA is not available on this machine"
        ));
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(format!(
            "device `{text}` asked for, but this machine has {count} CUDA device(s)"
        ));
    }
    Ok(tch::Device::Cuda(index))
}
