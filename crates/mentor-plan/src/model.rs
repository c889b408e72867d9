//! The model section of a plan: which architecture, its knobs, and how a student grows.
//!
//! Pure data and arithmetic (growth, EfficientNet compound scaling, input resolution); the
//! worker builds the networks.

use serde::{Deserialize, Serialize};

use crate::PlanError;

/// An architecture and its settings; `kind` selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModelPlan {
    /// A small conv net for tests and small images.
    Cnn(CnnPlan),
    /// WideResNet-depth-widen (pre-activation), the semi-supervised benchmark model.
    WideResnet(WideResnetPlan),
    /// ResNet v1 with batch norm (torchvision layout).
    Resnet(ResnetPlan),
    /// BiT: ResNet v2 with Group Normalization and Weight Standardization.
    Bit(BitPlan),
    /// DenseNet configured like torchvision's `DenseNet(...)`.
    Densenet(DensenetPlan),
    /// EfficientNet with compound scaling.
    Efficientnet(EfficientnetPlan),
}

/// The `kind` values of [`ModelPlan`], as plans spell them.
const MODEL_KINDS: &[&str] = &[
    "cnn",
    "wide-resnet",
    "resnet",
    "bit",
    "densenet",
    "efficientnet",
];

/// Read by hand rather than derived: serde's derived internally tagged enums buffer the table
/// and lose the key of a wrong value ("expected u32", of no field); this reads the variant's
/// own table, whose errors name the field.
impl<'de> Deserialize<'de> for ModelPlan {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(deserializer)?;
        let kind = match table.remove("kind") {
            Some(toml::Value::String(kind)) => kind,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "`kind` must be a string (one of {}), not {other}",
                    MODEL_KINDS.join(", ")
                )))
            }
            None => return Err(D::Error::missing_field("kind")),
        };
        // A role's own setting written after its `.model` header lands in the model's table.
        if let Some(key) = ["precision", "checkpoint"]
            .into_iter()
            .find(|key| table.contains_key(*key))
        {
            return Err(D::Error::custom(format!(
                "`{key}` is a setting of the role (`[teacher]` or `[student]`), not of its model: write it under the role's header, before its `.model` table (a line after `[teacher.model]` belongs to the model)"
            )));
        }
        fn read<T: serde::de::DeserializeOwned>(
            table: toml::Table,
        ) -> Result<T, serde_path_to_error::Error<toml::de::Error>> {
            use serde::de::IntoDeserializer;
            serde_path_to_error::deserialize(table.into_deserializer())
        }
        let model = match kind.as_str() {
            "cnn" => read(table).map(ModelPlan::Cnn),
            "wide-resnet" => read(table).map(ModelPlan::WideResnet),
            "resnet" => read(table).map(ModelPlan::Resnet),
            "bit" => read(table).map(ModelPlan::Bit),
            "densenet" => read(table).map(ModelPlan::Densenet),
            "efficientnet" => read(table).map(ModelPlan::Efficientnet),
            other => return Err(D::Error::unknown_variant(other, MODEL_KINDS)),
        };
        model.map_err(|error| {
            let path = error.path().to_string();
            let message = error.into_inner().message().to_string();
            if path == "." {
                D::Error::custom(format!("kind = \"{kind}\": {message}"))
            } else {
                D::Error::custom(format!("kind = \"{kind}\": `{path}`: {message}"))
            }
        })
    }
}

/// First layers of the ResNet-style models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stem {
    /// 7x7 stride-2 convolution and a stride-2 max pool (ImageNet-size inputs).
    #[default]
    Imagenet,
    /// 3x3 stride-1 convolution, no pooling (28-32 pixel inputs).
    Small,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnPlan {
    /// Channels of the first stage; the second has twice as many.
    #[serde(default = "default_cnn_width")]
    pub width: u32,
    /// Residual blocks after the conv stages (stochastic depth applies to them).
    #[serde(default)]
    pub residual_blocks: u32,
    /// Units of the hidden fully connected layer.
    #[serde(default = "default_hidden")]
    pub hidden: u32,
    /// Width added at each round after the first.
    #[serde(default)]
    pub width_growth_per_round: u32,
    /// Batch normalization after each convolution (off: plain conv-ReLU, no batch statistics).
    #[serde(default = "default_true")]
    pub batch_norm: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WideResnetPlan {
    /// Total depth, 6n + 4 (28 in the benchmark).
    #[serde(default = "default_wrn_depth")]
    pub depth: u32,
    /// Widening factor k.
    #[serde(default = "default_widen")]
    pub widen: u32,
    /// k added at each round after the first.
    #[serde(default)]
    pub widen_growth_per_round: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResnetPlan {
    /// 18, 34 (basic blocks), 50, 101 or 152 (bottlenecks).
    pub depth: u32,
    /// Channel multiplier of every stage (1 = the standard ResNet).
    #[serde(default = "default_one")]
    pub width: u32,
    #[serde(default)]
    pub width_growth_per_round: u32,
    #[serde(default)]
    pub stem: Stem,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitPlan {
    /// 50, 101 or 152.
    pub depth: u32,
    /// Width multiplier, x1 to x4.
    #[serde(default = "default_one")]
    pub width: u32,
    #[serde(default)]
    pub width_growth_per_round: u32,
    #[serde(default)]
    pub stem: Stem,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DensenetPlan {
    #[serde(default = "default_growth_rate")]
    pub growth_rate: u32,
    #[serde(default = "default_block_config")]
    pub block_config: Vec<u32>,
    #[serde(default = "default_init_features")]
    pub num_init_features: u32,
    #[serde(default = "default_bn_size")]
    pub bn_size: u32,
    /// Dropout after each dense layer.
    #[serde(default)]
    pub drop_rate: f64,
    #[serde(default)]
    pub stem: Stem,
    /// Growth rate added at each round after the first.
    #[serde(default)]
    pub growth_rate_growth_per_round: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfficientnetPlan {
    /// `b0` to `b7`: the published width, depth and resolution coefficients.
    #[serde(default)]
    pub preset: Option<String>,
    /// Compound coefficient: depth 1.2^phi, width 1.1^phi, resolution 1.15^phi.
    #[serde(default)]
    pub phi: Option<f64>,
    /// Added to phi (or to the preset's index) at each round after the first.
    #[serde(default)]
    pub phi_growth_per_round: f64,
    /// Resolution of B0 / phi 0 (default: the data set's image size; 224 on ImageNet).
    #[serde(default)]
    pub base_resolution: Option<u32>,
}

fn default_cnn_width() -> u32 {
    32
}
fn default_hidden() -> u32 {
    128
}
fn default_wrn_depth() -> u32 {
    28
}
fn default_widen() -> u32 {
    2
}
fn default_one() -> u32 {
    1
}
fn default_growth_rate() -> u32 {
    32
}
fn default_block_config() -> Vec<u32> {
    vec![6, 12, 24, 16]
}
fn default_init_features() -> u32 {
    64
}
fn default_bn_size() -> u32 {
    4
}

/// Compound scaling coefficients of an EfficientNet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EfficientnetScaling {
    pub width: f64,
    pub depth: f64,
    /// Resolution relative to B0's.
    pub resolution: f64,
}

/// Published (width, depth, resolution) of B0..B7.
pub const EFFICIENTNET_PRESETS: [(f64, f64, u32); 8] = [
    (1.0, 1.0, 224),
    (1.0, 1.1, 240),
    (1.1, 1.2, 260),
    (1.2, 1.4, 300),
    (1.4, 1.8, 380),
    (1.6, 2.2, 456),
    (1.8, 2.6, 528),
    (2.0, 3.1, 600),
];

/// The index of preset `b0` to `b7`, spelled exactly so (`b01` would be another plan text for
/// the same run).
fn preset_index(name: &str) -> Option<usize> {
    let digit = name.strip_prefix('b')?;
    let index: usize = digit.parse().ok()?;
    (index < EFFICIENTNET_PRESETS.len() && digit == index.to_string()).then_some(index)
}

impl EfficientnetPlan {
    /// The scaling coefficients (at this plan's phi or preset, before growth).
    pub fn scaling(&self) -> EfficientnetScaling {
        if let Some(index) = self.preset.as_deref().and_then(preset_index) {
            let (width, depth, resolution) = EFFICIENTNET_PRESETS[index];
            return EfficientnetScaling {
                width,
                depth,
                resolution: resolution as f64 / 224.0,
            };
        }
        let phi = self.phi.unwrap_or(0.0);
        EfficientnetScaling {
            width: 1.1f64.powf(phi),
            depth: 1.2f64.powf(phi),
            resolution: 1.15f64.powf(phi),
        }
    }

    /// A size to compare two EfficientNets by.
    fn size(&self) -> f64 {
        match self.preset.as_deref().and_then(preset_index) {
            Some(index) => index as f64,
            None => self.phi.unwrap_or(0.0),
        }
    }
}

fn invalid(field: String, reason: impl Into<String>) -> PlanError {
    PlanError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl ModelPlan {
    pub fn kind_name(&self) -> &'static str {
        match self {
            ModelPlan::Cnn(_) => "cnn",
            ModelPlan::WideResnet(_) => "wide-resnet",
            ModelPlan::Resnet(_) => "resnet",
            ModelPlan::Bit(_) => "bit",
            ModelPlan::Densenet(_) => "densenet",
            ModelPlan::Efficientnet(_) => "efficientnet",
        }
    }

    /// The model of round `round` (1-based): growth applied, growth fields cleared.
    pub fn at_round(&self, round: u32) -> ModelPlan {
        let steps = round.saturating_sub(1);
        match self {
            ModelPlan::Cnn(plan) => ModelPlan::Cnn(CnnPlan {
                width: plan.width + plan.width_growth_per_round * steps,
                width_growth_per_round: 0,
                ..plan.clone()
            }),
            ModelPlan::WideResnet(plan) => ModelPlan::WideResnet(WideResnetPlan {
                widen: plan.widen + plan.widen_growth_per_round * steps,
                widen_growth_per_round: 0,
                ..plan.clone()
            }),
            ModelPlan::Resnet(plan) => ModelPlan::Resnet(ResnetPlan {
                width: plan.width + plan.width_growth_per_round * steps,
                width_growth_per_round: 0,
                ..plan.clone()
            }),
            ModelPlan::Bit(plan) => ModelPlan::Bit(BitPlan {
                width: plan.width + plan.width_growth_per_round * steps,
                width_growth_per_round: 0,
                ..plan.clone()
            }),
            ModelPlan::Densenet(plan) => ModelPlan::Densenet(DensenetPlan {
                growth_rate: plan.growth_rate + plan.growth_rate_growth_per_round * steps,
                growth_rate_growth_per_round: 0,
                ..plan.clone()
            }),
            ModelPlan::Efficientnet(plan) => {
                let growth = plan.phi_growth_per_round * steps as f64;
                let grown = match plan.preset.as_deref().and_then(preset_index) {
                    // A whole step that stays within b0..b7 keeps the named preset; past b7
                    // there is none (`b8` would read as no preset at all), so phi takes over.
                    Some(index) if growth.fract() == 0.0 && index as f64 + growth <= 7.0 => {
                        EfficientnetPlan {
                            preset: Some(format!("b{}", index + growth as usize)),
                            phi: None,
                            ..plan.clone()
                        }
                    }
                    Some(index) => EfficientnetPlan {
                        preset: None,
                        phi: Some(index as f64 + growth),
                        ..plan.clone()
                    },
                    None => EfficientnetPlan {
                        phi: Some(plan.phi.unwrap_or(0.0) + growth),
                        ..plan.clone()
                    },
                };
                ModelPlan::Efficientnet(EfficientnetPlan {
                    phi_growth_per_round: 0.0,
                    ..grown
                })
            }
        }
    }

    /// Side of the square input images the model wants, given the data set's image size.
    pub fn input_resolution(&self, data_size: u32) -> u32 {
        match self {
            ModelPlan::Efficientnet(plan) => {
                let base = plan.base_resolution.unwrap_or(data_size) as f64;
                (base * plan.scaling().resolution).round().max(1.0) as u32
            }
            _ => data_size,
        }
    }

    /// Why the model cannot take square inputs of `side` pixels (after the resizing of
    /// [`ModelPlan::input_resolution`]), if it cannot: a pooling that would get a feature map
    /// smaller than its window. The models whose downsampling is padded or adaptive take any.
    pub fn input_side_problem(&self, side: u32) -> Option<String> {
        match self {
            ModelPlan::Cnn(_) if side < 4 => Some(format!(
                "cnn on {side}x{side} inputs: its two 2x2 max pools need at least 4x4"
            )),
            ModelPlan::Densenet(plan) => {
                // conv0 (7x7 stride 2, padded) and a 3x3 stride-2 padded max pool, each
                // ceil(n / 2); `small` keeps the side. Each transition halves it (2x2 average
                // pool, floor).
                let mut feature = match plan.stem {
                    Stem::Imagenet => side.div_ceil(2).div_ceil(2),
                    Stem::Small => side,
                };
                let transitions = plan.block_config.len().saturating_sub(1);
                for transition in 1..=transitions {
                    if feature < 2 {
                        let hint = match plan.stem {
                            Stem::Imagenet => {
                                "; stem = \"small\" keeps the full side (for 28-32 pixel images)"
                            }
                            Stem::Small => "; use fewer blocks (block_config)",
                        };
                        return Some(format!(
                            "densenet on {side}x{side} inputs: its features are {feature}x{feature} at transition {transition} of {transitions}, whose 2x2 average pool needs at least 2x2{hint}"
                        ));
                    }
                    feature /= 2;
                }
                None
            }
            _ => None,
        }
    }

    /// Whether the model has residual blocks (where stochastic depth applies).
    pub fn has_residual_blocks(&self) -> bool {
        match self {
            ModelPlan::Cnn(plan) => plan.residual_blocks > 0,
            ModelPlan::Densenet(_) => false,
            _ => true,
        }
    }

    /// Whether this model is at least as large as `other` in every size setting (`None`: other
    /// kinds, which do not compare).
    pub fn at_least_as_large_as(&self, other: &ModelPlan) -> Option<bool> {
        (self.sizes().0 == other.sizes().0).then(|| self.first_smaller_than(other).is_none())
    }

    /// The first size setting in which this model is smaller than `other` of the same kind:
    /// its name, this model's value and `other`'s.
    pub fn first_smaller_than(&self, other: &ModelPlan) -> Option<(&'static str, f64, f64)> {
        let ((kind, mine), (other_kind, theirs)) = (self.sizes(), other.sizes());
        if kind != other_kind {
            return None;
        }
        mine.into_iter()
            .zip(theirs)
            .find(|((_, a), (_, b))| a < b)
            .map(|((name, a), (_, b))| (name, a, b))
    }

    /// The model's kind and the settings its size grows with, in the order they are compared.
    fn sizes(&self) -> (&'static str, Vec<(&'static str, f64)>) {
        match self {
            ModelPlan::Cnn(a) => (
                "cnn",
                vec![
                    ("width", a.width as f64),
                    ("residual_blocks", a.residual_blocks as f64),
                    ("hidden", a.hidden as f64),
                ],
            ),
            ModelPlan::WideResnet(a) => (
                "wide-resnet",
                vec![("depth", a.depth as f64), ("widen", a.widen as f64)],
            ),
            ModelPlan::Resnet(a) => (
                "resnet",
                vec![("depth", a.depth as f64), ("width", a.width as f64)],
            ),
            ModelPlan::Bit(a) => (
                "bit",
                vec![("depth", a.depth as f64), ("width", a.width as f64)],
            ),
            ModelPlan::Densenet(a) => (
                "densenet",
                vec![
                    ("growth_rate", a.growth_rate as f64),
                    (
                        "block_config (sum)",
                        a.block_config.iter().sum::<u32>() as f64,
                    ),
                    ("num_init_features", a.num_init_features as f64),
                ],
            ),
            ModelPlan::Efficientnet(a) => ("efficientnet", vec![("preset or phi", a.size())]),
        }
    }

    /// Whether this plan grows from round to round.
    pub fn grows(&self) -> bool {
        match self {
            ModelPlan::Cnn(plan) => plan.width_growth_per_round > 0,
            ModelPlan::WideResnet(plan) => plan.widen_growth_per_round > 0,
            ModelPlan::Resnet(plan) => plan.width_growth_per_round > 0,
            ModelPlan::Bit(plan) => plan.width_growth_per_round > 0,
            ModelPlan::Densenet(plan) => plan.growth_rate_growth_per_round > 0,
            ModelPlan::Efficientnet(plan) => plan.phi_growth_per_round > 0.0,
        }
    }

    /// The name of this kind's growth field (`width_growth_per_round`, ...).
    pub fn growth_field(&self) -> &'static str {
        match self {
            ModelPlan::Cnn(_) | ModelPlan::Resnet(_) | ModelPlan::Bit(_) => {
                "width_growth_per_round"
            }
            ModelPlan::WideResnet(_) => "widen_growth_per_round",
            ModelPlan::Densenet(_) => "growth_rate_growth_per_round",
            ModelPlan::Efficientnet(_) => "phi_growth_per_round",
        }
    }

    /// Checks the knobs; `path` is the field path of this section (`student.model`).
    pub fn validate(&self, path: &str, rounds: u32) -> Result<(), PlanError> {
        let field = |name: &str| format!("{path}.{name}");
        match self {
            ModelPlan::Cnn(plan) => {
                if plan.width == 0 {
                    return Err(invalid(field("width"), "must be >= 1"));
                }
                if plan.hidden == 0 {
                    return Err(invalid(field("hidden"), "must be >= 1"));
                }
            }
            ModelPlan::WideResnet(plan) => {
                if plan.depth < 10 || (plan.depth - 4) % 6 != 0 {
                    return Err(invalid(
                        field("depth"),
                        "must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...)",
                    ));
                }
                if plan.widen == 0 {
                    return Err(invalid(field("widen"), "must be >= 1"));
                }
            }
            ModelPlan::Resnet(plan) => {
                if ![18, 34, 50, 101, 152].contains(&plan.depth) {
                    return Err(invalid(
                        field("depth"),
                        "must be one of 18, 34, 50, 101, 152",
                    ));
                }
                if plan.width == 0 {
                    return Err(invalid(field("width"), "must be >= 1"));
                }
            }
            ModelPlan::Bit(plan) => {
                if ![50, 101, 152].contains(&plan.depth) {
                    return Err(invalid(field("depth"), "must be one of 50, 101, 152"));
                }
                if !(1..=4).contains(&plan.width) {
                    return Err(invalid(
                        field("width"),
                        "must be between 1 and 4 (BiT-R50x1 to x4)",
                    ));
                }
            }
            ModelPlan::Densenet(plan) => {
                for (name, value) in [
                    ("growth_rate", plan.growth_rate),
                    ("num_init_features", plan.num_init_features),
                    ("bn_size", plan.bn_size),
                ] {
                    if value == 0 {
                        return Err(invalid(field(name), "must be >= 1"));
                    }
                }
                if plan.block_config.is_empty() || plan.block_config.contains(&0) {
                    return Err(invalid(
                        field("block_config"),
                        "must list at least one block, each with >= 1 layer",
                    ));
                }
                if !(0.0..1.0).contains(&plan.drop_rate) {
                    return Err(invalid(field("drop_rate"), "must be in [0, 1)"));
                }
            }
            ModelPlan::Efficientnet(plan) => {
                match (&plan.preset, plan.phi) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            field("phi"),
                            "give either `preset` or `phi`, not both",
                        ))
                    }
                    (None, None) => {
                        return Err(invalid(
                            field("preset"),
                            "give `preset` (b0 to b7) or `phi`",
                        ))
                    }
                    (Some(preset), None) => {
                        let Some(index) = preset_index(preset) else {
                            return Err(invalid(
                                field("preset"),
                                format!("unknown preset `{preset}`, expected b0 to b7"),
                            ));
                        };
                        let last = index as f64
                            + plan.phi_growth_per_round * rounds.saturating_sub(1) as f64;
                        if plan.phi_growth_per_round.fract() == 0.0 && last > 7.0 {
                            return Err(invalid(
                                field("phi_growth_per_round"),
                                format!(
                                    "grows past b7 by round {rounds}; use `phi` for larger models"
                                ),
                            ));
                        }
                    }
                    (None, Some(phi)) => {
                        if !(0.0..=10.0).contains(&phi) {
                            return Err(invalid(field("phi"), "must be in [0, 10]"));
                        }
                    }
                }
                if !(plan.phi_growth_per_round >= 0.0 && plan.phi_growth_per_round.is_finite()) {
                    return Err(invalid(field("phi_growth_per_round"), "must be >= 0"));
                }
                if plan.base_resolution == Some(0) {
                    return Err(invalid(field("base_resolution"), "must be >= 1"));
                }
            }
        }
        self.validate_growth(path, rounds)
    }

    /// Checks the model of the last round: growth per round must keep its knob in range.
    fn validate_growth(&self, path: &str, rounds: u32) -> Result<(), PlanError> {
        let field = |name: &str| format!("{path}.{name}");
        let last = rounds.max(1);
        let (name, base, growth, most) = match self {
            ModelPlan::Cnn(plan) => ("width", plan.width, plan.width_growth_per_round, None),
            ModelPlan::WideResnet(plan) => ("widen", plan.widen, plan.widen_growth_per_round, None),
            ModelPlan::Resnet(plan) => ("width", plan.width, plan.width_growth_per_round, None),
            ModelPlan::Bit(plan) => ("width", plan.width, plan.width_growth_per_round, Some(4)),
            ModelPlan::Densenet(plan) => (
                "growth_rate",
                plan.growth_rate,
                plan.growth_rate_growth_per_round,
                None,
            ),
            ModelPlan::Efficientnet(_) => {
                if let ModelPlan::Efficientnet(grown) = self.at_round(last) {
                    if let Some(phi) = grown.phi.filter(|phi| *phi > 10.0) {
                        return Err(invalid(
                            field("phi_growth_per_round"),
                            format!("makes round {last}'s phi {phi}, past 10"),
                        ));
                    }
                }
                return Ok(());
            }
        };
        let growth_field = field(&format!("{name}_growth_per_round"));
        let grown = growth
            .checked_mul(last - 1)
            .and_then(|growth| growth.checked_add(base));
        match (grown, most) {
            (None, _) => Err(invalid(
                growth_field,
                format!("makes round {last}'s {name} overflow"),
            )),
            (Some(grown), Some(most)) if grown > most => Err(invalid(
                growth_field,
                format!("makes round {last}'s {name} {grown}, past {most}"),
            )),
            _ => Ok(()),
        }
    }
}
