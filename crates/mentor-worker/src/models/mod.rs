//! Model architectures the plan can name, built on a tch `VarStore` path.
//!
//! Every model takes images `[n, channels, r, r]` already normalised and returns logits
//! `[n, classes]`. Noise is part of the model and active in training mode only: dropout before
//! the classifier and stochastic depth (linear rule, per-sample, identity in eval mode) on
//! residual blocks. Layouts follow torchvision where it has the model, so parameter counts match.

mod autocast;
mod bit;
mod cnn;
mod densenet;
mod efficientnet;
mod resnet;
mod wide_resnet;

pub use autocast::Autocast;
use mentor_plan::{ModelPlan, Precision, RolePlan};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

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
    pub precision: Precision,
}

impl ModelConfig {
    /// The same model without its noise (the finetuning's, ALGORITHMS.md section 2: "dropout
    /// off"): no dropout before the classifier or inside DenseNet's layers, no stochastic depth.
    pub fn without_noise(&mut self) {
        self.dropout = 0.0;
        self.last_survival = 1.0;
        if let ModelPlan::Densenet(densenet) = &mut self.model {
            densenet.drop_rate = 0.0;
        }
    }

    /// The model of `round` for images of `channels` x `data_size` x `data_size`.
    pub fn from_plan(
        role: &RolePlan,
        round: u32,
        classes: u32,
        channels: i64,
        data_size: i64,
    ) -> ModelConfig {
        let model = role.model.at_round(round);
        ModelConfig {
            resolution: model.input_resolution(data_size as u32) as i64,
            model,
            classes: classes as i64,
            channels,
            dropout: role.noise.dropout,
            last_survival: role.noise.stochastic_depth_survival,
            precision: role.precision,
        }
    }

    /// Survival probability of residual block `index` (0-based) of `blocks` (linear rule).
    pub fn survival(&self, index: usize, blocks: usize) -> f64 {
        1.0 - (index + 1) as f64 / blocks.max(1) as f64 * (1.0 - self.last_survival)
    }
}

/// A model ready to run.
pub type Model = Box<dyn ModuleT + Send>;

/// Builds the model a config names under `root`. On the CPU its input is laid out
/// channels-last first (see [`channels_last`]), as are its depthwise weights ([`conv2d`]).
/// In `bfloat16` precision it runs under autocast ([`Autocast`]) and returns 32-bit logits.
pub fn build(root: &nn::Path, config: &ModelConfig) -> Model {
    let model = Box::new(CpuChannelsLast(build_layers(root, config)));
    match config.precision {
        Precision::Float32 => model,
        Precision::Bfloat16 => Box::new(autocast::Bfloat16(model)),
    }
}

fn build_layers(root: &nn::Path, config: &ModelConfig) -> Model {
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

/// Runs a model on a channels-last copy of CPU inputs: convolutions follow their input's layout,
/// and oneDNN's channels-last kernels made a training step 1.1-1.5x faster than the default
/// layout (`cnn` on 28x28 grayscale 1.5x, WRN-28-2 and EfficientNet-B0 on 32x32 1.2-1.4x).
/// Depthwise weights are laid out the same way ([`conv2d`]). The values are the same up to
/// float rounding; GPU inputs are passed through unchanged.
#[derive(Debug)]
struct CpuChannelsLast(Model);

impl ModuleT for CpuChannelsLast {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.0.forward_t(&channels_last(xs), train)
    }
}

/// A CPU image batch `[n, c, h, w]` with channels-last strides (`c` varies fastest), as
/// PyTorch's `contiguous(memory_format=torch.channels_last)` lays it out: with one channel the
/// memory is unchanged, but the strides tell the convolution to use its channels-last kernel.
/// Anything else (GPU tensors, tensors that are not 4-D, batches already laid out so) is
/// returned as is.
fn channels_last(xs: &Tensor) -> Tensor {
    let size = xs.size();
    if xs.device() != Device::Cpu || size.len() != 4 {
        return xs.shallow_clone();
    }
    let (c, h, w) = (size[1], size[2], size[3]);
    let strides = [h * w * c, 1, w * c, c];
    if xs.stride() == strides {
        return xs.shallow_clone();
    }
    let mut out = Tensor::empty_strided(size.as_slice(), strides, (xs.kind(), Device::Cpu));
    out.copy_(xs);
    out
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

/// `nn::conv2d` whose weight, on the CPU and for depthwise convolutions (one input channel per
/// group), has channels-last strides like the inputs [`CpuChannelsLast`] gives the model.
/// Measured with `bench-models`: EfficientNet-B0 trained 2.6x and inferred 4x faster so
/// (libtorch picks its kernel from the strides); ordinary convolutions were faster with
/// default-layout weights (ResNet-18 training 1.15x, `cnn` 1.1x), so they keep it. With one
/// input channel per group the memory is that of the default layout, only the strides differ;
/// the weight stays the same variable (its data is replaced), so the optimizer, the collectives
/// and loading see it as before.
pub(crate) fn conv2d(
    path: nn::Path,
    input: i64,
    output: i64,
    kernel: i64,
    config: nn::ConvConfig,
) -> nn::Conv2D {
    let depthwise = config.groups > 1 && config.groups == input;
    let mut conv = nn::conv2d(path, input, output, kernel, config);
    if depthwise && conv.ws.device() == Device::Cpu {
        let laid_out = tch::no_grad(|| channels_last(&conv.ws.detach()));
        conv.ws.set_data(&laid_out);
    }
    conv
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
    conv2d(path, input, output, kernel, config)
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
