//! BiT (Big Transfer): ResNet v2 with Group Normalization (32 groups) and Weight
//! Standardization, pre-activation bottleneck units, width multiplier x1 to x4, depths 50, 101
//! and 152. No batch statistics: nothing to synchronise across workers, nothing to re-estimate.

use mentor_plan::{BitPlan, Stem};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use super::{drop_path, global_average_pool, resnet, InPlace, ModelConfig};

/// A convolution whose weight is standardised per output channel before use.
#[derive(Debug)]
struct StdConv {
    weight: Tensor,
    stride: i64,
    padding: i64,
}

impl StdConv {
    fn new(path: nn::Path, input: i64, output: i64, kernel: i64, stride: i64) -> StdConv {
        StdConv {
            weight: path.var(
                "weight",
                &[output, input, kernel, kernel],
                nn::init::DEFAULT_KAIMING_NORMAL,
            ),
            stride,
            padding: (kernel - 1) / 2,
        }
    }
}

impl Module for StdConv {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let dims: &[i64] = &[1, 2, 3];
        let (variance, mean) = self.weight.var_mean_dim(dims, false, true);
        let weight = (&self.weight - mean) / (variance + 1e-10).sqrt();
        xs.conv2d(
            &weight,
            None::<Tensor>,
            [self.stride; 2],
            [self.padding; 2],
            [1, 1],
            1,
        )
    }
}

fn group_norm(path: nn::Path, channels: i64) -> nn::GroupNorm {
    nn::group_norm(path, 32, channels, Default::default())
}

#[derive(Debug)]
struct Unit {
    gn1: nn::GroupNorm,
    conv1: StdConv,
    gn2: nn::GroupNorm,
    conv2: StdConv,
    gn3: nn::GroupNorm,
    conv3: StdConv,
    downsample: Option<StdConv>,
    survival: f64,
}

impl Unit {
    fn new(path: nn::Path, input: i64, output: i64, stride: i64, survival: f64) -> Unit {
        let middle = output / 4;
        Unit {
            gn1: group_norm(&path / "gn1", input),
            conv1: StdConv::new(&path / "conv1", input, middle, 1, 1),
            gn2: group_norm(&path / "gn2", middle),
            conv2: StdConv::new(&path / "conv2", middle, middle, 3, stride),
            gn3: group_norm(&path / "gn3", middle),
            conv3: StdConv::new(&path / "conv3", middle, output, 1, 1),
            downsample: (stride != 1 || input != output)
                .then(|| StdConv::new(&path / "downsample", input, output, 1, stride)),
            survival,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let activated = self.gn1.forward(xs).relu_in_place();
        let shortcut = match &self.downsample {
            Some(projection) => projection.forward(&activated),
            None => xs.shallow_clone(),
        };
        let residual = self.conv1.forward(&activated);
        let residual = self
            .conv2
            .forward(&self.gn2.forward(&residual).relu_in_place());
        let residual = self
            .conv3
            .forward(&self.gn3.forward(&residual).relu_in_place());
        shortcut + drop_path(&residual, self.survival, train)
    }
}

#[derive(Debug)]
pub struct Bit {
    root: StdConv,
    pool: bool,
    units: Vec<Unit>,
    norm: nn::GroupNorm,
    head: nn::Linear,
    dropout: f64,
}

impl Bit {
    pub fn new(root: &nn::Path, plan: &BitPlan, config: &ModelConfig) -> Bit {
        let (counts, _) = resnet::layout(plan.depth);
        let width = plan.width as i64;
        let stem = match plan.stem {
            Stem::Imagenet => StdConv::new(root / "root", config.channels, 64 * width, 7, 2),
            Stem::Small => StdConv::new(root / "root", config.channels, 64 * width, 3, 1),
        };
        let total: usize = counts.iter().sum();
        let mut units = Vec::with_capacity(total);
        let mut input = 64 * width;
        for (stage, &count) in counts.iter().enumerate() {
            let output = (256 * width) << stage;
            for index in 0..count {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let position = units.len();
                let path = root / format!("block{}", stage + 1) / format!("unit{:02}", index + 1);
                units.push(Unit::new(
                    path,
                    input,
                    output,
                    stride,
                    config.survival(position, total),
                ));
                input = output;
            }
        }
        Bit {
            root: stem,
            pool: plan.stem == Stem::Imagenet,
            units,
            norm: group_norm(root / "norm", input),
            head: nn::linear(root / "head", input, config.classes, Default::default()),
            dropout: config.dropout,
        }
    }
}

impl ModuleT for Bit {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = self.root.forward(xs);
        if self.pool {
            // BiT's root: pad by one, then a 3x3 stride-2 max pool.
            xs = xs
                .constant_pad_nd([1, 1, 1, 1])
                .max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false);
        }
        for unit in &self.units {
            xs = unit.forward_t(&xs, train);
        }
        let xs = global_average_pool(&self.norm.forward(&xs).relu_in_place());
        self.head.forward(&xs.dropout(self.dropout, train))
    }
}
