//! Model architectures the plan can name, built on a tch `VarStore` path.
//!
//! Every model takes images `[n, channels, r, r]` already normalised and returns logits
//! `[n, classes]`. Noise is part of the model and active in training mode only: dropout before
//! the classifier and stochastic depth (linear rule, per-sample, identity in eval mode) on
//! residual blocks. Layouts follow torchvision where it has the model, so parameter counts match.

mod bit;
mod cnn;
mod densenet;
mod efficientnet;
mod resnet;
mod wide_resnet;

use mentor_plan::{ModelPlan, NoisePlan};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// What a model is built from: the plan's architecture at a round, plus its noise.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The architecture with growth already applied.
    pub model: ModelPlan,
    pub classes: i64,
    pub channels: i64,
    /// Side of the square input images.
    pub resolution: i64,
    /// Dropout before the classifier.
    pub dropout: f64,
    /// Survival probability of the last residual block.
    pub last_survival: f64,
}

impl ModelConfig {
    /// The model of `round` for images of `channels` x `data_size` x `data_size`.
    pub fn from_plan(
        model: &ModelPlan,
        noise: &NoisePlan,
        round: u32,
        classes: u32,
        channels: i64,
        data_size: i64,
    ) -> ModelConfig {
        let model = model.at_round(round);
        ModelConfig {
            resolution: model.input_resolution(data_size as u32) as i64,
            model,
            classes: classes as i64,
            channels,
            dropout: noise.dropout,
            last_survival: noise.stochastic_depth_survival,
        }
    }

    /// Survival probability of residual block `index` (0-based) of `blocks` (linear rule).
    pub fn survival(&self, index: usize, blocks: usize) -> f64 {
        1.0 - (index + 1) as f64 / blocks.max(1) as f64 * (1.0 - self.last_survival)
    }
}

/// A model ready to run.
pub type Model = Box<dyn ModuleT + Send>;

/// Builds the model a config names under `root`.
pub fn build(root: &nn::Path, config: &ModelConfig) -> Model {
    match &config.model {
        ModelPlan::Cnn(plan) => Box::new(cnn::Cnn::new(root, plan, config)),
        ModelPlan::WideResnet(plan) => Box::new(wide_resnet::WideResnet::new(root, plan, config)),
        ModelPlan::Resnet(plan) => Box::new(resnet::Resnet::new(root, plan, config)),
        ModelPlan::Bit(plan) => Box::new(bit::Bit::new(root, plan, config)),
        ModelPlan::Densenet(plan) => Box::new(densenet::Densenet::new(root, plan, config)),
        ModelPlan::Efficientnet(plan) => {
            Box::new(efficientnet::Efficientnet::new(root, plan, config))
        }
    }
}

/// Drops the residual of whole samples with probability `1 - survival`, scaling kept ones by
/// `1 / survival`; the identity in eval mode.
pub fn drop_path(residual: &Tensor, survival: f64, train: bool) -> Tensor {
    if !train || survival >= 1.0 {
        return residual.shallow_clone();
    }
    let size = residual.size();
    let mut shape = vec![size[0]];
    shape.extend(std::iter::repeat_n(1, size.len() - 1));
    let keep = Tensor::rand(shape.as_slice(), (Kind::Float, residual.device()))
        .lt(survival)
        .to_kind(residual.kind());
    residual * keep / survival
}

/// A convolution without bias.
pub(crate) fn conv(
    path: nn::Path,
    input: i64,
    output: i64,
    kernel: i64,
    stride: i64,
    groups: i64,
) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding: (kernel - 1) / 2,
        groups,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(path, input, output, kernel, config)
}

/// Activations computed in place on fresh outputs (batch norm, group norm, convolutions, sums:
/// none of them needs its output for backward), as torchvision's `inplace=True` does.
pub(crate) trait InPlace {
    fn relu_in_place(self) -> Tensor;
}

impl InPlace for Tensor {
    fn relu_in_place(mut self) -> Tensor {
        let _ = self.relu_();
        self
    }
}

/// Global average pooling to `[n, c]`.
pub(crate) fn global_average_pool(xs: &Tensor) -> Tensor {
    xs.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
}

/// Number of trainable parameters in a variable store.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

#[cfg(test)]
mod tests;
