//! WideResNet-depth-k (pre-activation), as in the semi-supervised benchmarks (FixMatch, MPL):
//! a 3x3 stem to 16 channels, three groups of (depth - 4) / 6 blocks of 16k, 32k and 64k
//! channels with strides 1, 2, 2, then BN-ReLU, global pooling, dropout and the classifier.

use mentor_plan::WideResnetPlan;
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use super::{conv, drop_path, global_average_pool, InPlace, ModelConfig};

#[derive(Debug)]
struct Block {
    bn1: nn::BatchNorm,
    conv1: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv2: nn::Conv2D,
    shortcut: Option<nn::Conv2D>,
    survival: f64,
}

impl Block {
    fn new(path: nn::Path, input: i64, output: i64, stride: i64, survival: f64) -> Block {
        Block {
            bn1: nn::batch_norm2d(&path / "bn1", input, Default::default()),
            conv1: conv(&path / "conv1", input, output, 3, stride, 1),
            bn2: nn::batch_norm2d(&path / "bn2", output, Default::default()),
            conv2: conv(&path / "conv2", output, output, 3, 1, 1),
            shortcut: (input != output || stride != 1)
                .then(|| conv(&path / "shortcut", input, output, 1, stride, 1)),
            survival,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let activated = self.bn1.forward_t(xs, train).relu_in_place();
        let residual = self.conv1.forward(&activated);
        let residual = self
            .conv2
            .forward(&self.bn2.forward_t(&residual, train).relu_in_place());
        let shortcut = match &self.shortcut {
            Some(projection) => projection.forward(&activated),
            None => xs.shallow_clone(),
        };
        shortcut + drop_path(&residual, self.survival, train)
    }
}

#[derive(Debug)]
pub struct WideResnet {
    stem: nn::Conv2D,
    blocks: Vec<Block>,
    bn: nn::BatchNorm,
    classifier: nn::Linear,
    dropout: f64,
}

impl WideResnet {
    pub fn new(root: &nn::Path, plan: &WideResnetPlan, config: &ModelConfig) -> WideResnet {
        let per_group = ((plan.depth - 4) / 6) as usize;
        let widths = [16, 32, 64].map(|w| w * plan.widen as i64);
        let total = 3 * per_group;
        let mut blocks = Vec::with_capacity(total);
        let mut input = 16;
        for (group, &width) in widths.iter().enumerate() {
            for index in 0..per_group {
                let stride = if group > 0 && index == 0 { 2 } else { 1 };
                let position = blocks.len();
                let path = root / format!("group{group}") / format!("block{index}");
                blocks.push(Block::new(
                    path,
                    input,
                    width,
                    stride,
                    config.survival(position, total),
                ));
                input = width;
            }
        }
        WideResnet {
            stem: conv(root / "stem", config.channels, 16, 3, 1, 1),
            blocks,
            bn: nn::batch_norm2d(root / "bn", input, Default::default()),
            classifier: nn::linear(
                root / "classifier",
                input,
                config.classes,
                Default::default(),
            ),
            dropout: config.dropout,
        }
    }
}

impl ModuleT for WideResnet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = self.stem.forward(xs);
        for block in &self.blocks {
            xs = block.forward_t(&xs, train);
        }
        let xs = global_average_pool(&self.bn.forward_t(&xs, train).relu_in_place());
        self.classifier.forward(&xs.dropout(self.dropout, train))
    }
}
