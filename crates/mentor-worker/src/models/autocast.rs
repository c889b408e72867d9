//! Mixed precision through libtorch's autocast, which tch does not expose for the CPU: the
//! functions of `at::autocast` are called by their C++ symbols in libtorch_cpu (plain functions
//! of a device-type and a scalar-type byte, and a bool; checked against the pinned torch 2.11.0:
//! a torch without them fails at link time, not at run time).

// The only unsafe code here: the calls into libtorch's thread-local autocast settings.
#![allow(unsafe_code)]

use tch::{Device, Kind, Tensor};

use super::Model;
use tch::nn::ModuleT;

/// `c10::DeviceType` values.
const CPU: i8 = 0;
const CUDA: i8 = 1;
/// `c10::ScalarType::BFloat16`.
const BFLOAT16: i8 = 15;
/// `c10::ScalarType::Half`.
const FLOAT16: i8 = 5;

extern "C" {
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn is_autocast_enabled(device: i8) -> bool;
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn set_autocast_enabled(device: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn get_autocast_dtype(device: i8) -> i8;
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn set_autocast_dtype(device: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast25is_autocast_cache_enabledEv"]
    fn is_autocast_cache_enabled() -> bool;
    #[link_name = "_ZN2at8autocast26set_autocast_cache_enabledEb"]
    fn set_autocast_cache_enabled(enabled: bool);
}

/// Autocast to bfloat16 (or float16) on one device type for the calling thread while it
/// lives; the previous settings come back when it is dropped, also when a libtorch error
/// unwinds through it (tch's own `autocast` closure then leaves autocast on for the thread,
/// and its cast cache holding stale weights). The cast cache stays off inside: weights change
/// at every step, and a cached low-precision copy would outlive its weight.
pub struct Autocast {
    device: i8,
    enabled: bool,
    dtype: i8,
    cache: bool,
}

impl Autocast {
    pub fn bfloat16(device: Device) -> Autocast {
        Autocast::to(device, BFLOAT16)
    }

    /// Autocast to float16 (mixed-precision inference on GPUs).
    pub fn float16(device: Device) -> Autocast {
        Autocast::to(device, FLOAT16)
    }

    /// Turns autocast off on this thread for every device type: what a thread that runs one
    /// task after another does before each (a task that failed inside a scope of autocast
    /// taken without a guard would leave it on).
    pub fn off_on_this_thread() {
        for device in [CPU, CUDA] {
            // SAFETY: writes a thread-local flag.
            unsafe { set_autocast_enabled(device, false) }
        }
    }

    fn to(device: Device, dtype: i8) -> Autocast {
        let device = device_type(device);
        // SAFETY: thread-local settings of libtorch, read and written by value.
        unsafe {
            let previous = Autocast {
                device,
                enabled: is_autocast_enabled(device),
                dtype: get_autocast_dtype(device),
                cache: is_autocast_cache_enabled(),
            };
            set_autocast_dtype(device, dtype);
            set_autocast_cache_enabled(false);
            set_autocast_enabled(device, true);
            previous
        }
    }

    /// Whether autocast is on for `device` on this thread.
    pub fn is_enabled(device: Device) -> bool {
        // SAFETY: reads a thread-local flag.
        unsafe { is_autocast_enabled(device_type(device)) }
    }
}

/// The `c10::DeviceType` whose autocast settings apply to tensors on `device`.
fn device_type(device: Device) -> i8 {
    if device.is_cuda() {
        CUDA
    } else {
        CPU
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: restores the settings read when the guard was made.
        unsafe {
            set_autocast_enabled(self.device, self.enabled);
            set_autocast_dtype(self.device, self.dtype);
            set_autocast_cache_enabled(self.cache);
        }
    }
}

/// A model run under bfloat16 autocast, returning 32-bit logits.
#[derive(Debug)]
pub(super) struct Bfloat16(pub(super) Model);

impl ModuleT for Bfloat16 {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let logits = {
            let _autocast = Autocast::bfloat16(xs.device());
            self.0.forward_t(xs, train)
        };
        logits.to_kind(Kind::Float)
    }
}
