//! EfficientNet with compound scaling, torchvision's layout: a 3x3 stride-2 stem, seven stages
//! of MBConv blocks (expansion, depthwise convolution, squeeze-and-excitation, projection,
//! stochastic depth on the residual), a 1x1 head convolution, global pooling, dropout and the
//! classifier. Width scales channels (rounded to multiples of 8), depth scales block counts.

use mentor_plan::EfficientnetPlan;
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use super::{conv, drop_path, global_average_pool, ModelConfig};

/// B0's stages: (expansion, kernel, stride, input channels, output channels, blocks).
const STAGES: [(i64, i64, i64, i64, i64, i64); 7] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
];

/// Rounds channels to a multiple of 8, never more than 10% below (torchvision's rule).
pub fn make_divisible(value: f64) -> i64 {
    let rounded = (8i64).max(((value + 4.0) as i64) / 8 * 8);
    if (rounded as f64) < 0.9 * value {
        rounded + 8
    } else {
        rounded
    }
}

fn batch_norm(path: nn::Path, channels: i64) -> nn::BatchNorm {
    let config = nn::BatchNormConfig {
        eps: 1e-3,
        momentum: 0.01,
        ..Default::default()
    };
    nn::batch_norm2d(path, channels, config)
}

/// Convolution, batch norm, optional SiLU (torchvision's `Conv2dNormActivation`).
#[derive(Debug)]
struct ConvNormActivation {
    conv: nn::Conv2D,
    norm: nn::BatchNorm,
    activation: bool,
}

impl ConvNormActivation {
    #[allow(clippy::too_many_arguments)]
    fn new(
        path: nn::Path,
        input: i64,
        output: i64,
        kernel: i64,
        stride: i64,
        groups: i64,
        activation: bool,
    ) -> Self {
        ConvNormActivation {
            conv: conv(&path / "0", input, output, kernel, stride, groups),
            norm: batch_norm(&path / "1", output),
            activation,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = self.norm.forward_t(&self.conv.forward(xs), train);
        if self.activation {
            // In place, as torchvision does: batch norm's backward does not need its output.
            let _ = xs.silu_();
        }
        xs
    }
}

#[derive(Debug)]
struct SqueezeExcitation {
    fc1: nn::Conv2D,
    fc2: nn::Conv2D,
}

impl SqueezeExcitation {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let scale = xs.adaptive_avg_pool2d([1, 1]);
        let scale = self.fc2.forward(&self.fc1.forward(&scale).silu()).sigmoid();
        xs * scale
    }
}

#[derive(Debug)]
struct MbConv {
    expand: Option<ConvNormActivation>,
    depthwise: ConvNormActivation,
    excitation: SqueezeExcitation,
    project: ConvNormActivation,
    residual: bool,
    survival: f64,
}

impl MbConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        path: nn::Path,
        input: i64,
        output: i64,
        expansion: i64,
        kernel: i64,
        stride: i64,
        survival: f64,
    ) -> MbConv {
        let expanded = make_divisible((input * expansion) as f64);
        let squeeze = (input / 4).max(1);
        let block = &path / "block";
        let mut index = 0;
        let mut next = || {
            let name = index.to_string();
            index += 1;
            &block / name
        };
        let expand = (expanded != input)
            .then(|| ConvNormActivation::new(next(), input, expanded, 1, 1, 1, true));
        let depthwise =
            ConvNormActivation::new(next(), expanded, expanded, kernel, stride, expanded, true);
        let se = next();
        let bias = nn::ConvConfig::default();
        let excitation = SqueezeExcitation {
            fc1: nn::conv2d(&se / "fc1", expanded, squeeze, 1, bias),
            fc2: nn::conv2d(&se / "fc2", squeeze, expanded, 1, bias),
        };
        let project = ConvNormActivation::new(next(), expanded, output, 1, 1, 1, false);
        MbConv {
            expand,
            depthwise,
            excitation,
            project,
            residual: stride == 1 && input == output,
            survival,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut out = match &self.expand {
            Some(expand) => expand.forward_t(xs, train),
            None => xs.shallow_clone(),
        };
        out = self.depthwise.forward_t(&out, train);
        out = self.excitation.forward(&out);
        out = self.project.forward_t(&out, train);
        if self.residual {
            xs + drop_path(&out, self.survival, train)
        } else {
            out
        }
    }
}

#[derive(Debug)]
pub struct Efficientnet {
    stem: ConvNormActivation,
    blocks: Vec<MbConv>,
    head: ConvNormActivation,
    classifier: nn::Linear,
    dropout: f64,
}

impl Efficientnet {
    pub fn new(root: &nn::Path, plan: &EfficientnetPlan, config: &ModelConfig) -> Efficientnet {
        let scaling = plan.scaling();
        let width = |channels: i64| make_divisible(channels as f64 * scaling.width);
        let depth = |blocks: i64| (blocks as f64 * scaling.depth).ceil() as i64;
        let features = root / "features";
        let stem_channels = width(STAGES[0].3);
        let stem = ConvNormActivation::new(
            &features / "0",
            config.channels,
            stem_channels,
            3,
            2,
            1,
            true,
        );
        let total: i64 = STAGES.iter().map(|stage| depth(stage.5)).sum();
        let mut blocks = Vec::with_capacity(total as usize);
        let mut input = stem_channels;
        for (stage_index, &(expansion, kernel, stride, _, output, count)) in
            STAGES.iter().enumerate()
        {
            let output = width(output);
            let stage = &features / (stage_index + 1).to_string();
            for index in 0..depth(count) {
                let position = blocks.len();
                let stride = if index == 0 { stride } else { 1 };
                let survival = config.survival(position, total as usize);
                blocks.push(MbConv::new(
                    &stage / index.to_string(),
                    input,
                    output,
                    expansion,
                    kernel,
                    stride,
                    survival,
                ));
                input = output;
            }
        }
        let head_channels = 4 * input;
        let head = ConvNormActivation::new(
            &features / (STAGES.len() + 1).to_string(),
            input,
            head_channels,
            1,
            1,
            1,
            true,
        );
        Efficientnet {
            stem,
            blocks,
            head,
            classifier: nn::linear(
                root / "classifier" / "1",
                head_channels,
                config.classes,
                Default::default(),
            ),
            dropout: config.dropout,
        }
    }
}

impl ModuleT for Efficientnet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = self.stem.forward_t(xs, train);
        for block in &self.blocks {
            xs = block.forward_t(&xs, train);
        }
        let xs = global_average_pool(&self.head.forward_t(&xs, train));
        self.classifier.forward(&xs.dropout(self.dropout, train))
    }
}
