//! `cnn`: two conv-bn-relu-maxpool stages (`width`, `2 * width` channels), residual blocks with
//! stochastic depth, a hidden fully connected layer, dropout and the classifier.

use mentor_plan::CnnPlan;
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use super::{conv, drop_path, InPlace, ModelConfig};

/// A 3x3 convolution followed by batch norm, or a biased convolution without it.
#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    bn: Option<nn::BatchNorm>,
}

impl ConvBn {
    fn new(path: nn::Path, input: i64, output: i64, batch_norm: bool) -> ConvBn {
        if !batch_norm {
            let config = nn::ConvConfig {
                padding: 1,
                ..Default::default()
            };
            return ConvBn {
                conv: nn::conv2d(&path / "conv", input, output, 3, config),
                bn: None,
            };
        }
        ConvBn {
            conv: conv(&path / "conv", input, output, 3, 1, 1),
            bn: Some(nn::batch_norm2d(&path / "bn", output, Default::default())),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let xs = self.conv.forward(xs);
        match &self.bn {
            Some(bn) => bn.forward_t(&xs, train),
            None => xs,
        }
    }
}

#[derive(Debug)]
struct ResidualBlock {
    first: ConvBn,
    second: ConvBn,
    survival: f64,
}

impl ResidualBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let residual = self.first.forward_t(xs, train).relu_in_place();
        let residual = self.second.forward_t(&residual, train);
        (xs + drop_path(&residual, self.survival, train)).relu_in_place()
    }
}

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
    pub fn new(root: &nn::Path, plan: &CnnPlan, config: &ModelConfig) -> Cnn {
        let width = plan.width as i64;
        let blocks = plan.residual_blocks as usize;
        let hidden = plan.hidden as i64;
        let spatial = config.resolution / 4;
        let norm = plan.batch_norm;
        Cnn {
            stage1: ConvBn::new(root / "stage1", config.channels, width, norm),
            stage2: ConvBn::new(root / "stage2", width, 2 * width, norm),
            blocks: (0..blocks)
                .map(|index| ResidualBlock {
                    first: ConvBn::new(
                        root / format!("block{index}") / "first",
                        2 * width,
                        2 * width,
                        norm,
                    ),
                    second: ConvBn::new(
                        root / format!("block{index}") / "second",
                        2 * width,
                        2 * width,
                        norm,
                    ),
                    survival: config.survival(index, blocks),
                })
                .collect(),
            hidden: nn::linear(
                root / "hidden",
                2 * width * spatial * spatial,
                hidden,
                Default::default(),
            ),
            classifier: nn::linear(
                root / "classifier",
                hidden,
                config.classes,
                Default::default(),
            ),
            dropout: config.dropout,
        }
    }
}

impl ModuleT for Cnn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let xs = self
            .stage1
            .forward_t(xs, train)
            .relu_in_place()
            .max_pool2d_default(2);
        let mut xs = self
            .stage2
            .forward_t(&xs, train)
            .relu_in_place()
            .max_pool2d_default(2);
        for block in &self.blocks {
            xs = block.forward_t(&xs, train);
        }
        let xs = self.hidden.forward(&xs.flatten(1, -1)).relu_in_place();
        self.classifier.forward(&xs.dropout(self.dropout, train))
    }
}
