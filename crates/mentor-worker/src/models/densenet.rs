//! DenseNet, configured exactly like torchvision's `DenseNet(growth_rate, block_config,
//! num_init_features, bn_size, drop_rate, num_classes)`: dense layers with a 1x1 bottleneck to
//! `bn_size * growth_rate` channels, concatenated features, transitions (BN, ReLU, 1x1
//! convolution halving the channels, 2x2 average pool) between blocks.

use mentor_plan::{DensenetPlan, Stem};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use super::{conv, global_average_pool, InPlace, ModelConfig};

#[derive(Debug)]
struct DenseLayer {
    norm1: nn::BatchNorm,
    conv1: nn::Conv2D,
    norm2: nn::BatchNorm,
    conv2: nn::Conv2D,
    drop_rate: f64,
}

impl DenseLayer {
    fn forward_t(&self, features: &Tensor, train: bool) -> Tensor {
        let xs = self
            .conv1
            .forward(&self.norm1.forward_t(features, train).relu_in_place());
        let xs = self
            .conv2
            .forward(&self.norm2.forward_t(&xs, train).relu_in_place());
        xs.dropout(self.drop_rate, train)
    }
}

#[derive(Debug)]
struct Transition {
    norm: nn::BatchNorm,
    conv: nn::Conv2D,
}

#[derive(Debug)]
pub struct Densenet {
    conv0: nn::Conv2D,
    norm0: nn::BatchNorm,
    pool: bool,
    blocks: Vec<(Vec<DenseLayer>, Option<Transition>)>,
    norm5: nn::BatchNorm,
    classifier: nn::Linear,
    dropout: f64,
}

impl Densenet {
    pub fn new(root: &nn::Path, plan: &DensenetPlan, config: &ModelConfig) -> Densenet {
        let features = root / "features";
        let growth = plan.growth_rate as i64;
        let bottleneck = plan.bn_size as i64 * growth;
        let init = plan.num_init_features as i64;
        let conv0 = match plan.stem {
            Stem::Imagenet => conv(&features / "conv0", config.channels, init, 7, 2, 1),
            Stem::Small => conv(&features / "conv0", config.channels, init, 3, 1, 1),
        };
        let mut channels = init;
        let mut blocks = Vec::new();
        for (index, &layers) in plan.block_config.iter().enumerate() {
            let block = &features / format!("denseblock{}", index + 1);
            let dense_layers = (0..layers as i64)
                .map(|layer| {
                    let path = &block / format!("denselayer{}", layer + 1);
                    let input = channels + layer * growth;
                    DenseLayer {
                        norm1: nn::batch_norm2d(&path / "norm1", input, Default::default()),
                        conv1: conv(&path / "conv1", input, bottleneck, 1, 1, 1),
                        norm2: nn::batch_norm2d(&path / "norm2", bottleneck, Default::default()),
                        conv2: conv(&path / "conv2", bottleneck, growth, 3, 1, 1),
                        drop_rate: plan.drop_rate,
                    }
                })
                .collect();
            channels += layers as i64 * growth;
            let transition = (index + 1 < plan.block_config.len()).then(|| {
                let path = &features / format!("transition{}", index + 1);
                let transition = Transition {
                    norm: nn::batch_norm2d(&path / "norm", channels, Default::default()),
                    conv: conv(&path / "conv", channels, channels / 2, 1, 1, 1),
                };
                channels /= 2;
                transition
            });
            blocks.push((dense_layers, transition));
        }
        Densenet {
            conv0,
            norm0: nn::batch_norm2d(&features / "norm0", init, Default::default()),
            pool: plan.stem == Stem::Imagenet,
            blocks,
            norm5: nn::batch_norm2d(&features / "norm5", channels, Default::default()),
            classifier: nn::linear(
                root / "classifier",
                channels,
                config.classes,
                Default::default(),
            ),
            dropout: config.dropout,
        }
    }
}

impl ModuleT for Densenet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = self
            .norm0
            .forward_t(&self.conv0.forward(xs), train)
            .relu_in_place();
        if self.pool {
            xs = xs.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for (layers, transition) in &self.blocks {
            let mut features = vec![xs];
            for layer in layers {
                let input = Tensor::cat(&features, 1);
                features.push(layer.forward_t(&input, train));
            }
            xs = Tensor::cat(&features, 1);
            if let Some(transition) = transition {
                let reduced = transition
                    .conv
                    .forward(&transition.norm.forward_t(&xs, train).relu_in_place());
                xs = reduced.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None);
            }
        }
        let xs = global_average_pool(&self.norm5.forward_t(&xs, train).relu_in_place());
        self.classifier.forward(&xs.dropout(self.dropout, train))
    }
}
