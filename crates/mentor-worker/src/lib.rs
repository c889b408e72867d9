//! The worker's model code: architectures, noise, training, evaluation and pseudo-labelling.
//!
//! Everything here runs on the dedicated libtorch thread of the worker binary, never on a tokio
//! thread. It talks to the rest of the process through plain structs ([`tasks`]) and progress
//! callbacks; it knows nothing of gRPC.

pub mod augment;
pub mod cpu;
pub mod dataset;
pub mod distributed;
pub mod memory;
pub mod models;
pub mod mpl;
pub mod optim;
pub mod resume;
pub mod tasks;
pub mod window;

/// Waits until `device` has finished the work queued on it (nothing to wait for on the CPU):
/// what a timing of GPU work must do before it reads the clock.
pub fn synchronize(device: tch::Device) {
    if let tch::Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// libtorch's message in the text of an error or a panic: without the Rust wrapping of a
/// panicking unwrap (``called `Result::unwrap()` on an `Err` value: Torch("...")``, the error's
/// Debug text, quoted with escaped newlines) and the C++ trace after it ("Exception raised
/// from ..."): what a user can act on. Other texts are kept whole.
pub fn libtorch_message(text: &str) -> String {
    let (inner, newline, quoted) = match text.split_once("Torch(\"") {
        Some((_, inner)) => (inner, "\\n", true),
        None => (text, "\n", false),
    };
    let end = inner
        .find(&format!("{newline}Exception raised from"))
        .or_else(|| if quoted { inner.rfind("\")") } else { None })
        .unwrap_or(inner.len());
    let message = inner[..end].trim();
    if quoted {
        message.replace("\\\"", "\"")
    } else {
        message.to_string()
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

/// Runs one task `task` on this long-lived libtorch thread, a panic (a libtorch error) caught
/// as its end. Libtorch's thread-local modes are set as a task expects them first: a task that
/// panicked inside tch's `no_grad` or `autocast` closures skipped their restore, and would
/// leave gradients off (every later training failing at its backward) or autocast on (later
/// float32 trainings silently in half precision).
pub fn run_isolated<T>(task: impl FnOnce() -> T) -> std::thread::Result<T> {
    models::Autocast::off_on_this_thread();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tch::with_grad(task)))
}

#[cfg(test)]
mod tests {
    use super::libtorch_message;

    /// A task that panics with gradients off and autocast on leaves neither to the next task
    /// on its thread.
    #[test]
    fn a_task_that_panics_leaves_no_libtorch_mode_to_the_next() {
        use crate::models::Autocast;
        use tch::{Device, Kind, Tensor};
        let failed = super::run_isolated(|| {
            tch::no_grad(|| {
                std::mem::forget(Autocast::bfloat16(Device::Cpu));
                panic!("a libtorch error");
            })
        });
        assert!(failed.is_err());
        let next = super::run_isolated(|| {
            let weight = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            (
                (&weight * 2.0).requires_grad(),
                Autocast::is_enabled(Device::Cpu),
            )
        });
        assert_eq!(next.expect("the next task"), (true, false));
    }

    #[test]
    fn a_libtorch_error_or_panic_reads_as_libtorch_s_message() {
        // What a pooling window larger than its input panics with.
        let panic = "called `Result::unwrap()` on an `Err` value: Torch(\"Given input size: \
                     (4x1x1). Calculated output size: (4x0x0). Output size is too small\\n\
                     Exception raised from pool2d_shape_check at /pytorch/aten/src/ATen/native/\
                     Pool.h:160 (most recent call first):\\nframe #0: c10::Error::Error(\")";
        assert_eq!(
            libtorch_message(panic),
            "Given input size: (4x1x1). Calculated output size: (4x0x0). Output size is too small"
        );
        let quoted = "called `Result::unwrap()` on an `Err` value: Torch(\"no \\\"x\\\" here\")";
        assert_eq!(libtorch_message(quoted), "no \"x\" here");
        assert_eq!(
            libtorch_message("index out of bounds"),
            "index out of bounds"
        );
        // An error's own text (a checkpoint that does not load): the trace goes too.
        assert_eq!(
            libtorch_message(
                "Internal torch error: PytorchStreamReader failed reading zip archive\n\
                 Exception raised from valid at inline_container.cc:242"
            ),
            "Internal torch error: PytorchStreamReader failed reading zip archive"
        );
    }
}
