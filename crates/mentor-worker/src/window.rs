//! Per-step statistics (losses, counts) summed where the model runs, read when a training loop
//! reports: reading a value from a GPU at every step would make the host wait for every queued
//! kernel before it could queue the next.

use tch::{Device, Kind, Tensor};

/// The sums of a report window: one 1-d tensor of values a step, added on their device.
#[derive(Debug, Default)]
pub struct Window {
    sums: Option<Tensor>,
    steps: u64,
}

impl Window {
    /// Adds one step's values (any float kind, summed in f64).
    pub fn add(&mut self, values: &Tensor) {
        match &mut self.sums {
            Some(sums) => {
                let _ = sums.g_add_(values);
            }
            // A copy: the sums must not share the caller's storage.
            None => self.sums = Some(values.detach().to_kind(Kind::Double).copy()),
        }
        self.steps += 1;
    }

    /// Steps added since the window started.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The sums (waits for the device); empty before the first step.
    pub fn read(&self) -> Vec<f64> {
        self.sums.as_ref().map(read_f64).unwrap_or_default()
    }

    /// Starts the next window.
    pub fn clear(&mut self) {
        *self = Window::default();
    }
}

/// The values of a 1-d tensor as f64 (waits for its device; empty if it cannot be read).
pub fn read_f64(values: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(values.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_sums_steps_in_f64_until_cleared() {
        let mut window = Window::default();
        assert!(window.read().is_empty());
        window.add(&Tensor::from_slice(&[1.5f32, 2.0]));
        window.add(&Tensor::from_slice(&[0.25f32, 1.0]));
        assert_eq!((window.read(), window.steps()), (vec![1.75, 3.0], 2));
        window.clear();
        window.add(&Tensor::from_slice(&[4.0f32, 0.0]));
        assert_eq!((window.read(), window.steps()), (vec![4.0, 0.0], 1));
    }
}
