//! Model architectures the plan can name.
//!
//! `cnn`: two conv-bn-relu-maxpool stages (`width`, `2 * width` channels), then
//! `residual_blocks` residual blocks with stochastic depth (linear rule, per-sample drop,
//! identity in eval mode), then a hidden fully connected layer, dropout and the classifier.

use mentor_plan::{ModelKind, ModelPlan, NoisePlan};
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

/// Fashion-MNIST pixel statistics; inputs in [0, 1] are normalised inside the model.
const MEAN: f64 = 0.2860;
const STD: f64 = 0.3530;

/// What a model is built from: the plan's architecture at a round, plus its noise.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub kind: ModelKind,
    pub width: i64,
    pub residual_blocks: i64,
    pub hidden: i64,
    pub classes: i64,
    pub channels: i64,
    pub image_size: i64,
    pub dropout: f64,
    pub last_survival: f64,
}

impl ModelConfig {
    pub fn from_plan(
        model: &ModelPlan,
        noise: &NoisePlan,
        round: u32,
        classes: u32,
        image_size: i64,
    ) -> ModelConfig {
        ModelConfig {
            kind: model.kind,
            width: model.width_at_round(round) as i64,
            residual_blocks: model.residual_blocks as i64,
            hidden: model.hidden as i64,
            classes: classes as i64,
            channels: 1,
            image_size,
            dropout: noise.dropout,
            last_survival: noise.stochastic_depth_survival,
        }
    }
}

#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl ConvBn {
    fn new(path: nn::Path, input: i64, output: i64) -> ConvBn {
        let config = nn::ConvConfig {
            padding: 1,
            bias: false,
            ..Default::default()
        };
        ConvBn {
            conv: nn::conv2d(&path / "conv", input, output, 3, config),
            bn: nn::batch_norm2d(&path / "bn", output, Default::default()),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.conv.forward(xs), train)
    }
}

#[derive(Debug)]
struct ResidualBlock {
    first: ConvBn,
    second: ConvBn,
    survival: f64,
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

impl ResidualBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let residual = self.first.forward_t(xs, train).relu();
        let residual = self.second.forward_t(&residual, train);
        (xs + drop_path(&residual, self.survival, train)).relu()
    }
}

/// The `cnn` model.
#[derive(Debug)]
pub struct Cnn {
    stage1: ConvBn,
    stage2: ConvBn,
    blocks: Vec<ResidualBlock>,
    hidden: nn::Linear,
    classifier: nn::Linear,
    dropout: f64,
}

impl Cnn {
    pub fn new(root: &nn::Path, config: &ModelConfig) -> Cnn {
        let width = config.width;
        let blocks = config.residual_blocks;
        let spatial = config.image_size / 4;
        Cnn {
            stage1: ConvBn::new(root / "stage1", config.channels, width),
            stage2: ConvBn::new(root / "stage2", width, 2 * width),
            blocks: (0..blocks)
                .map(|index| ResidualBlock {
                    first: ConvBn::new(
                        root / format!("block{index}") / "first",
                        2 * width,
                        2 * width,
                    ),
                    second: ConvBn::new(
                        root / format!("block{index}") / "second",
                        2 * width,
                        2 * width,
                    ),
                    // Linear rule: survival falls from 1 to `last_survival` at the last block.
                    survival: 1.0
                        - (index + 1) as f64 / blocks as f64 * (1.0 - config.last_survival),
                })
                .collect(),
            hidden: nn::linear(
                root / "hidden",
                2 * width * spatial * spatial,
                config.hidden,
                Default::default(),
            ),
            classifier: nn::linear(
                root / "classifier",
                config.hidden,
                config.classes,
                Default::default(),
            ),
            dropout: config.dropout,
        }
    }
}

impl ModuleT for Cnn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let xs = (xs - MEAN) / STD;
        let xs = self
            .stage1
            .forward_t(&xs, train)
            .relu()
            .max_pool2d_default(2);
        let mut xs = self
            .stage2
            .forward_t(&xs, train)
            .relu()
            .max_pool2d_default(2);
        for block in &self.blocks {
            xs = block.forward_t(&xs, train);
        }
        let xs = self.hidden.forward(&xs.flatten(1, -1)).relu();
        self.classifier.forward(&xs.dropout(self.dropout, train))
    }
}

/// Builds the model a config names under `root`.
pub fn build(root: &nn::Path, config: &ModelConfig) -> Box<dyn ModuleT + Send> {
    match config.kind {
        ModelKind::Cnn => Box::new(Cnn::new(root, config)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(blocks: i64, survival: f64) -> ModelConfig {
        ModelConfig {
            kind: ModelKind::Cnn,
            width: 4,
            residual_blocks: blocks,
            hidden: 8,
            classes: 10,
            channels: 1,
            image_size: 28,
            dropout: 0.5,
            last_survival: survival,
        }
    }

    #[test]
    fn output_shape_is_batch_by_classes() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = build(&vs.root(), &config(2, 0.8));
        let xs = Tensor::rand([3, 1, 28, 28], (Kind::Float, tch::Device::Cpu));
        assert_eq!(model.forward_t(&xs, true).size(), vec![3, 10]);
        assert_eq!(model.forward_t(&xs, false).size(), vec![3, 10]);
    }

    #[test]
    fn eval_mode_is_deterministic_despite_noise() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = build(&vs.root(), &config(2, 0.5));
        let xs = Tensor::rand([5, 1, 28, 28], (Kind::Float, tch::Device::Cpu));
        let a = model.forward_t(&xs, false);
        let b = model.forward_t(&xs, false);
        assert!(a.allclose(&b, 1e-6, 1e-6, false));
    }

    #[test]
    fn drop_path_is_identity_in_eval_and_unbiased_in_training() {
        let xs = Tensor::ones([20000, 3], (Kind::Float, tch::Device::Cpu));
        assert!(drop_path(&xs, 0.7, false).equal(&xs));
        let trained = drop_path(&xs, 0.7, true);
        let mean = trained.mean(Kind::Float).double_value(&[]);
        assert!((mean - 1.0).abs() < 0.03, "{mean}");
        // Whole samples are dropped: each row is all zeros or all 1/0.7.
        let row_min = trained.amin(1, false);
        let row_max = trained.amax(1, false);
        assert!(row_min.equal(&row_max));
    }
}
