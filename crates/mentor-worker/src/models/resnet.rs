//! ResNet v1 with batch norm, torchvision's layout (stride on the 3x3 convolution of
//! bottlenecks): basic blocks for depths 18 and 34, bottlenecks for 50, 101 and 152. `width`
//! multiplies every stage's channels; the `small` stem replaces the 7x7 convolution and max
//! pool by a 3x3 convolution for 28-32 pixel images.

use mentor_plan::{ResnetPlan, Stem};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use super::{conv, drop_path, global_average_pool, InPlace, ModelConfig};

/// Blocks per stage and whether they are bottlenecks.
pub fn layout(depth: u32) -> ([usize; 4], bool) {
    match depth {
        18 => ([2, 2, 2, 2], false),
        34 => ([3, 4, 6, 3], false),
        50 => ([3, 4, 6, 3], true),
        101 => ([3, 4, 23, 3], true),
        _ => ([3, 8, 36, 3], true),
    }
}

#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl ConvBn {
    fn new(
        path: &nn::Path,
        name: usize,
        input: i64,
        output: i64,
        kernel: i64,
        stride: i64,
    ) -> ConvBn {
        ConvBn {
            conv: conv(
                path / format!("conv{name}"),
                input,
                output,
                kernel,
                stride,
                1,
            ),
            bn: nn::batch_norm2d(path / format!("bn{name}"), output, Default::default()),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.conv.forward(xs), train)
    }
}

#[derive(Debug)]
struct Block {
    layers: Vec<ConvBn>,
    downsample: Option<ConvBn>,
    survival: f64,
}

impl Block {
    fn new(
        path: nn::Path,
        input: i64,
        planes: i64,
        stride: i64,
        bottleneck: bool,
        survival: f64,
    ) -> Block {
        let expansion = if bottleneck { 4 } else { 1 };
        let layers = if bottleneck {
            vec![
                ConvBn::new(&path, 1, input, planes, 1, 1),
                ConvBn::new(&path, 2, planes, planes, 3, stride),
                ConvBn::new(&path, 3, planes, planes * expansion, 1, 1),
            ]
        } else {
            vec![
                ConvBn::new(&path, 1, input, planes, 3, stride),
                ConvBn::new(&path, 2, planes, planes, 3, 1),
            ]
        };
        let downsample = (stride != 1 || input != planes * expansion).then(|| {
            let path = &path / "downsample";
            ConvBn {
                conv: conv(&path / "0", input, planes * expansion, 1, stride, 1),
                bn: nn::batch_norm2d(&path / "1", planes * expansion, Default::default()),
            }
        });
        Block {
            layers,
            downsample,
            survival,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut residual = xs.shallow_clone();
        let last = self.layers.len() - 1;
        for (index, layer) in self.layers.iter().enumerate() {
            residual = layer.forward_t(&residual, train);
            if index < last {
                residual = residual.relu_in_place();
            }
        }
        let shortcut = match &self.downsample {
            Some(downsample) => downsample.forward_t(xs, train),
            None => xs.shallow_clone(),
        };
        (shortcut + drop_path(&residual, self.survival, train)).relu_in_place()
    }
}

#[derive(Debug)]
pub struct Resnet {
    stem: ConvBn,
    pool: bool,
    blocks: Vec<Block>,
    fc: nn::Linear,
    dropout: f64,
}

impl Resnet {
    pub fn new(root: &nn::Path, plan: &ResnetPlan, config: &ModelConfig) -> Resnet {
        let (counts, bottleneck) = layout(plan.depth);
        let width = plan.width as i64;
        let base = 64 * width;
        let stem = match plan.stem {
            Stem::Imagenet => ConvBn::new(root, 1, config.channels, base, 7, 2),
            Stem::Small => ConvBn::new(root, 1, config.channels, base, 3, 1),
        };
        let total: usize = counts.iter().sum();
        let expansion = if bottleneck { 4 } else { 1 };
        let mut blocks = Vec::with_capacity(total);
        let mut input = base;
        for (stage, &count) in counts.iter().enumerate() {
            let planes = base << stage;
            for index in 0..count {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let position = blocks.len();
                let path = root / format!("layer{}", stage + 1) / index.to_string();
                blocks.push(Block::new(
                    path,
                    input,
                    planes,
                    stride,
                    bottleneck,
                    config.survival(position, total),
                ));
                input = planes * expansion;
            }
        }
        Resnet {
            stem,
            pool: plan.stem == Stem::Imagenet,
            blocks,
            fc: nn::linear(root / "fc", input, config.classes, Default::default()),
            dropout: config.dropout,
        }
    }
}

impl ModuleT for Resnet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = self.stem.forward_t(xs, train).relu_in_place();
        if self.pool {
            xs = xs.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for block in &self.blocks {
            xs = block.forward_t(&xs, train);
        }
        self.fc
            .forward(&global_average_pool(&xs).dropout(self.dropout, train))
    }
}
