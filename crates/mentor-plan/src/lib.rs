//! Training plans: the TOML file a user writes, parsed and validated before anything starts.
//!
//! This crate owns the plan format, its defaults and its validation. It does no I/O beyond
//! reading the plan file and never touches models or the network. Every validation error names
//! the field path (`student.train.steps`) and the reason.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod model;

pub use model::{
    BitPlan, CnnPlan, DensenetPlan, EfficientnetPlan, EfficientnetScaling, ModelPlan, ResnetPlan,
    Stem, WideResnetPlan, EFFICIENTNET_PRESETS,
};

/// The only plan format version this build understands.
pub const PLAN_VERSION: u32 = 1;

/// Why a plan was refused.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read plan `{path}`: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A plan file read but refused: what [`Plan::load`] says, naming the file.
    #[error("invalid plan `{path}`: {error}")]
    InFile {
        path: PathBuf,
        error: Box<PlanError>,
    },
    #[error("plan is not valid TOML for this format: {message}")]
    Parse { message: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PlanError {
    PlanError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The longest timeout or lease a plan may set: ten years, far past any run, and far below
/// what would overflow the deadlines computed from them.
pub const MAX_SECONDS: u64 = 10 * 365 * 24 * 3600;

fn check_seconds(field: &str, seconds: u64) -> Result<(), PlanError> {
    if (1..=MAX_SECONDS).contains(&seconds) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be in [1, {MAX_SECONDS}] (ten years), not {seconds}"),
        ))
    }
}

/// Which self-training method a plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    NoisyStudent,
    MetaPseudoLabels,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::NoisyStudent => "noisy-student",
            Method::MetaPseudoLabels => "meta-pseudo-labels",
        }
    }
}

/// A whole plan. Parse it with [`Plan::from_toml_str`] or [`Plan::load`], which validate it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Plan format version; must be [`PLAN_VERSION`].
    pub version: u32,
    /// Human name of the run, used in status output and directory names.
    pub name: String,
    pub method: Method,
    /// Seed of initialisation, noise and sampling, and of the labeled split unless
    /// `data.split_seed` sets that one.
    #[serde(default)]
    pub seed: u64,
    /// Number of Noisy Student rounds (teacher -> student) to run; read it with
    /// [`Plan::rounds`], which applies the method's default (2 for Noisy Student, 1 for Meta
    /// Pseudo Labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u32>,
    pub data: DataPlan,
    pub teacher: RolePlan,
    pub student: RolePlan,
    #[serde(default)]
    pub pseudo_labels: PseudoLabelPlan,
    /// Meta Pseudo Labels settings (required when `method = "meta-pseudo-labels"`).
    #[serde(default)]
    pub mpl: Option<MplPlan>,
    #[serde(default)]
    pub workers: WorkersPlan,
}

/// Which sign the MPL feedback `h` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MplSign {
    /// `h = s_old - s_new` (first-order Taylor expansion of the paper's objective).
    #[default]
    Theory,
    /// `h = s_new - s_old`, as both reference codebases compute it.
    Reference,
}

/// How the student's labeled loss is measured before and after its step (`h` is their
/// difference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MplFeedback {
    /// In training mode, as both reference codebases: the loss before comes from the student's
    /// forward on labeled and strong images together, the loss after from a second forward on
    /// the labeled images (other dropout and stochastic-depth draws, other batch statistics).
    #[default]
    Train,
    /// In evaluation mode (running batch-norm statistics, no dropout or stochastic depth) on
    /// the labeled images, right before and after the step: the difference is the step's
    /// effect alone. One more forward of the labeled images a step.
    Eval,
}

impl MplFeedback {
    pub fn is_train(&self) -> bool {
        *self == MplFeedback::Train
    }
}

/// Meta Pseudo Labels: teacher and student trained together, then the student finetuned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MplPlan {
    pub steps: u64,
    /// Labeled images per step (global batch).
    pub batch_size: u32,
    /// Unlabeled images per step = `mu * batch_size` (weak and strong view each).
    #[serde(default = "default_mu")]
    pub mu: u32,
    #[serde(default = "default_learning_rate")]
    pub teacher_learning_rate: f64,
    #[serde(default = "default_learning_rate")]
    pub student_learning_rate: f64,
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// The student's optimizer does not step before this step.
    #[serde(default)]
    pub student_wait_steps: u64,
    #[serde(default = "default_label_smoothing")]
    pub label_smoothing: f64,
    #[serde(default = "default_uda_threshold")]
    pub uda_threshold: f64,
    #[serde(default = "default_uda_temperature")]
    pub uda_temperature: f64,
    #[serde(default = "default_lambda_u")]
    pub lambda_u: f64,
    /// The UDA weight ramps up linearly over this many steps.
    #[serde(default)]
    pub uda_steps: u64,
    /// Weight of the MPL term (0 = a UDA-only teacher).
    #[serde(default = "default_one_f64")]
    pub mpl_weight: f64,
    #[serde(default)]
    pub mpl_sign: MplSign,
    /// How the student's labeled losses that make `h` are measured (left out of the written
    /// plan at its default, so that plans and saves of older runs keep their identity).
    #[serde(default, skip_serializing_if = "MplFeedback::is_train")]
    pub feedback: MplFeedback,
    /// Decay of the moving-average baseline subtracted from h (0 = none; 0.99 in the paper).
    #[serde(default)]
    pub baseline_decay: f64,
    /// EMA decay of the student's weights (0 = off).
    #[serde(default)]
    pub ema: f64,
    /// The strong view's augmentation (the weak view is a flip and shift).
    #[serde(default = "default_strong_randaugment")]
    pub randaugment: RandAugmentPlan,
    /// Evaluate teacher and student on the test set every this many steps during the joint
    /// training (0 = never during it: only the run's evaluation tasks after it).
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Rank 0 saves the joint training (teacher, student, EMA, momentum buffers, baseline)
    /// every this many steps; a task that stops resumes from the last save (0 = never).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// The final finetuning of the student on labeled data (steps = 0 skips it).
    #[serde(default)]
    pub finetune: FinetunePlan,
}

/// Finetuning of the MPL student on labeled images only (no noise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetunePlan {
    #[serde(default)]
    pub steps: u64,
    #[serde(default = "default_finetune_batch")]
    pub batch_size: u32,
    #[serde(default = "default_finetune_learning_rate")]
    pub learning_rate: f64,
}

impl Default for FinetunePlan {
    fn default() -> Self {
        FinetunePlan {
            steps: 0,
            batch_size: default_finetune_batch(),
            learning_rate: default_finetune_learning_rate(),
        }
    }
}

fn default_mu() -> u32 {
    3
}
fn default_uda_threshold() -> f64 {
    0.6
}
fn default_uda_temperature() -> f64 {
    0.7
}
fn default_lambda_u() -> f64 {
    1.0
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_finetune_batch() -> u32 {
    512
}
fn default_finetune_learning_rate() -> f64 {
    // ALGORITHMS.md: SGD at 1e-5..3e-5, batch 512, dropout off.
    3e-5
}
fn default_strong_randaugment() -> RandAugmentPlan {
    RandAugmentPlan {
        ops: 2,
        magnitude: 5.0,
        op_list: Vec::new(),
        cutout: 0.0,
    }
}

impl MplPlan {
    /// The finetuning as an ordinary training schedule (constant rate, no warmup).
    pub fn finetune_train_plan(&self) -> TrainPlan {
        TrainPlan {
            steps: self.finetune.steps.max(1),
            batch_size: self.finetune.batch_size,
            unlabeled_ratio: 0,
            optimizer: Optimizer::Sgd,
            learning_rate: self.finetune.learning_rate,
            momentum: self.momentum,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            label_smoothing: self.label_smoothing,
            flip_and_shift: true,
            log_every: self.log_every,
            checkpoint_every: self.checkpoint_every,
        }
    }
}

/// Data sets: IDX files (MNIST layout) with a labeled subset drawn per class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPlan {
    /// Data set format; only `idx` (MNIST / Fashion-MNIST files) today.
    #[serde(default = "default_format")]
    pub format: String,
    /// Directory holding `train-images-idx3-ubyte(.gz)`, `train-labels-idx1-ubyte(.gz)`,
    /// `t10k-images-idx3-ubyte(.gz)` and `t10k-labels-idx1-ubyte(.gz)`.
    pub dir: PathBuf,
    /// Labeled images drawn per class from the training set (the rest is unlabeled).
    pub labeled_per_class: u32,
    /// Seed of that draw; read it with [`Plan::split_seed`] (default: the run's `seed`). Set it
    /// to train with several seeds on one labeled subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_seed: Option<u64>,
    /// Use at most this many unlabeled images (0 = all of them).
    #[serde(default)]
    pub unlabeled_limit: u64,
    /// Evaluate on at most this many test images (0 = all of them).
    #[serde(default)]
    pub test_limit: u64,
    /// Unlabeled examples per pseudo-label shard.
    #[serde(default = "default_shard_size")]
    pub shard_size: u64,
    /// Number of classes of the data set.
    #[serde(default = "default_classes")]
    pub classes: u32,
    /// Where the unlabeled images come from (default: the training set minus the labeled ones).
    #[serde(default)]
    pub unlabeled: UnlabeledPlan,
}

impl DataPlan {
    /// Where the unlabeled images are: `data.dir` for `idx`, else `data.unlabeled.path`.
    pub fn unlabeled_place(&self) -> PathBuf {
        match self.unlabeled.format {
            UnlabeledFormat::Idx => self.dir.clone(),
            _ => self.unlabeled.path.clone().unwrap_or_default(),
        }
    }
}

/// Formats of unlabeled data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnlabeledFormat {
    /// The IDX training set of `data.dir`, minus the labeled images.
    #[default]
    Idx,
    /// A folder (searched recursively) of `.png`, `.jpg` and `.jpeg` files, in path order.
    ImageFolder,
    /// `.tar` shards in the WebDataset layout (`key.jpg|jpeg|png`, optional `key.cls`); one
    /// pseudo-label shard per tar file.
    Webdataset,
}

impl UnlabeledFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            UnlabeledFormat::Idx => "idx",
            UnlabeledFormat::ImageFolder => "image-folder",
            UnlabeledFormat::Webdataset => "webdataset",
        }
    }
}

/// The unlabeled data set. Images of other formats are converted to the labeled data's
/// channels and size (grayscale or RGB, bilinear resize) when decoded.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlabeledPlan {
    #[serde(default)]
    pub format: UnlabeledFormat,
    /// The image folder, or a `.tar` file or a folder of `.tar` files (not used for `idx`).
    #[serde(default)]
    pub path: Option<PathBuf>,
}

fn default_format() -> String {
    "idx".to_string()
}
fn default_shard_size() -> u64 {
    8192
}
fn default_classes() -> u32 {
    10
}

/// Everything about one model role (teacher or student).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolePlan {
    pub model: ModelPlan,
    /// Optimisation of this role's training task (Noisy Student; Meta Pseudo Labels uses `[mpl]`).
    #[serde(default)]
    pub train: Option<TrainPlan>,
    /// Noisy Student, teacher only: the first teacher's weights, read from this safetensors
    /// file (a checkpoint of a model `model` describes) instead of trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    #[serde(default)]
    pub noise: NoisePlan,
    /// Arithmetic of the role's model, in training and inference (left out of the plan's
    /// serialization at its default, so that plans written before it keep their identity).
    #[serde(default, skip_serializing_if = "Precision::is_float32")]
    pub precision: Precision,
}

/// The arithmetic a model runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats throughout.
    #[default]
    Float32,
    /// Mixed precision: libtorch's autocast runs the convolutions and matrix products in
    /// bfloat16 (weights, normalisation, losses and optimiser stay 32-bit), as
    /// `torch.autocast(dtype=torch.bfloat16)` does.
    Bfloat16,
}

impl Precision {
    pub fn is_float32(&self) -> bool {
        *self == Precision::Float32
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Bfloat16 => "bfloat16",
        }
    }
}

/// Optimisation of one training task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainPlan {
    pub steps: u64,
    /// Labeled images per step.
    pub batch_size: u32,
    /// Pseudo-labeled images per step = `unlabeled_ratio * batch_size` (student only).
    #[serde(default)]
    pub unlabeled_ratio: u32,
    #[serde(default)]
    pub optimizer: Optimizer,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub schedule: Schedule,
    /// Label smoothing of the labeled (and hard pseudo-label) cross-entropy.
    #[serde(default = "default_label_smoothing")]
    pub label_smoothing: f64,
    /// Random horizontal flips and small shifts (standard, not counted as student noise).
    #[serde(default = "default_true")]
    pub flip_and_shift: bool,
    /// Report progress every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Rank 0 saves the training (model, batch-norm statistics, momentum buffers, step) every
    /// this many steps; a task that stops resumes from the last save (0 = never). Left out of
    /// the plan's TOML at its default, as plans written before it were.
    #[serde(
        default = "default_checkpoint_every",
        skip_serializing_if = "is_default_checkpoint_every"
    )]
    pub checkpoint_every: u64,
}

fn default_learning_rate() -> f64 {
    0.05
}
fn default_momentum() -> f64 {
    0.9
}
fn default_weight_decay() -> f64 {
    5e-4
}
fn default_label_smoothing() -> f64 {
    0.1
}
fn default_true() -> bool {
    true
}
fn default_log_every() -> u64 {
    50
}
fn default_checkpoint_every() -> u64 {
    1000
}
fn is_default_checkpoint_every(every: &u64) -> bool {
    *every == default_checkpoint_every()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// SGD with Nesterov momentum.
    #[default]
    Sgd,
    Adam,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    #[default]
    Cosine,
    Constant,
}

/// Noise applied while training a role. Inference (pseudo-labelling, evaluation) is always clean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoisePlan {
    /// Dropout probability before the classifier.
    #[serde(default)]
    pub dropout: f64,
    /// Survival probability of the last residual block (linear rule); 1.0 disables it.
    #[serde(default = "default_survival")]
    pub stochastic_depth_survival: f64,
    #[serde(default)]
    pub randaugment: RandAugmentPlan,
}

fn default_survival() -> f64 {
    1.0
}

impl Default for NoisePlan {
    fn default() -> Self {
        NoisePlan {
            dropout: 0.0,
            stochastic_depth_survival: default_survival(),
            randaugment: RandAugmentPlan::default(),
        }
    }
}

/// RandAugment: `ops` random operations per image, each at `magnitude / 10` of its range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandAugmentPlan {
    /// Operations per image (0 disables RandAugment).
    #[serde(default)]
    pub ops: u32,
    /// Magnitude: each operation is applied at `magnitude / 10` of its range (0 to 30).
    #[serde(default)]
    pub magnitude: f64,
    /// Operations to draw from; empty means every operation (`color` leaves 1-channel images
    /// unchanged).
    #[serde(default)]
    pub op_list: Vec<String>,
    /// Side of a square cut out of every image after the operations, as a fraction of the
    /// image side (0 = none; FixMatch's strong view uses 0.5).
    #[serde(default)]
    pub cutout: f64,
}

impl Default for RandAugmentPlan {
    fn default() -> Self {
        RandAugmentPlan {
            ops: 0,
            magnitude: 0.0,
            op_list: Vec::new(),
            cutout: 0.0,
        }
    }
}

/// RandAugment operations. `color` (saturation) changes only 3-channel images.
pub const RANDAUGMENT_OPS: &[&str] = &[
    "identity",
    "auto-contrast",
    "equalize",
    "rotate",
    "posterize",
    "solarize",
    "contrast",
    "brightness",
    "color",
    "sharpness",
    "shear-x",
    "shear-y",
    "translate-x",
    "translate-y",
    "cutout",
];

/// How teacher predictions become training targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PseudoLabelPlan {
    #[serde(default)]
    pub mode: LabelMode,
    /// Softmax temperature of the teacher's predictions.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Probabilities kept per example (k = classes keeps the full distribution); read it with
    /// [`Plan::top_k`], which defaults to 10 or the number of classes if fewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Examples whose top probability is below this are dropped.
    #[serde(default = "default_min_confidence")]
    pub min_confidence: f64,
    /// Class-balance the kept examples (duplicate rare classes, trim abundant ones).
    #[serde(default = "default_true")]
    pub balance: bool,
    /// Examples wanted per class when balancing (0 = unlabeled examples / classes).
    #[serde(default)]
    pub per_class: u64,
    /// Where soft-label shards go: a local directory or an object store URL (`s3://bucket/prefix`,
    /// `gs://`, `az://`, `file:///`), credentials from the environment (default:
    /// `<state-dir>/pseudo-labels`).
    #[serde(default)]
    pub storage: Option<String>,
    /// Images per inference batch.
    #[serde(default = "default_inference_batch")]
    pub batch_size: u32,
    /// CPU threads decoding images ahead of inference (0 = one per core, leaving one core).
    #[serde(default)]
    pub decode_threads: u32,
    /// Decoded batches kept ready ahead of inference.
    #[serde(default = "default_prefetch_batches")]
    pub prefetch_batches: u32,
    /// A labeling task whose worker has not reported progress for this long is given to
    /// another worker (the first one to commit the shard wins).
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
    /// Run teacher inference in reduced precision (autocast) on GPUs; ignored on CPU.
    #[serde(default = "default_true")]
    pub mixed_precision: bool,
}

fn default_prefetch_batches() -> u32 {
    4
}
fn default_lease_seconds() -> u64 {
    120
}

fn default_temperature() -> f64 {
    1.0
}
fn default_min_confidence() -> f64 {
    0.3
}
fn default_inference_batch() -> u32 {
    1024
}

impl Default for PseudoLabelPlan {
    fn default() -> Self {
        PseudoLabelPlan {
            mode: LabelMode::Soft,
            temperature: default_temperature(),
            top_k: None,
            min_confidence: default_min_confidence(),
            balance: true,
            per_class: 0,
            storage: None,
            batch_size: default_inference_batch(),
            decode_threads: 0,
            prefetch_batches: default_prefetch_batches(),
            lease_seconds: default_lease_seconds(),
            mixed_precision: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LabelMode {
    #[default]
    Soft,
    Hard,
}

/// How the coordinator uses workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersPlan {
    /// The run starts once this many workers have registered.
    #[serde(default = "default_min_workers")]
    pub min_workers: u32,
    /// A worker silent for this long is declared dead and its task is given to another.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_seconds: u64,
    /// Ranks of a data-parallel training task (0 = every live worker of the device kind).
    #[serde(default)]
    pub world_size: u32,
    /// Transport of gradients: `auto` (NCCL on GPUs, TCP ring on CPUs, none for one rank),
    /// `single`, `ring` or `nccl`.
    #[serde(default)]
    pub collective: CollectiveKind,
    /// Gradients are all-reduced in buckets of this many megabytes.
    #[serde(default = "default_bucket_size_mb")]
    pub bucket_size_mb: f64,
    /// A collective that makes no progress for this long fails the task.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_seconds: u64,
    /// A group whose ranks have not all joined after this long fails the task.
    #[serde(default = "default_join_timeout")]
    pub join_timeout_seconds: u64,
    /// A training or evaluation that reports no progress for this long (a hung worker that
    /// still heartbeats) is given up and goes to another worker; its first report may take
    /// the join timeout longer (0 = never).
    #[serde(default = "default_progress_timeout")]
    pub progress_timeout_seconds: u64,
}

/// How gradients travel between the ranks of a training group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CollectiveKind {
    #[default]
    Auto,
    Single,
    Ring,
    Nccl,
}

fn default_bucket_size_mb() -> f64 {
    25.0
}
fn default_collective_timeout() -> u64 {
    60
}
fn default_join_timeout() -> u64 {
    60
}
fn default_progress_timeout() -> u64 {
    1800
}

fn default_min_workers() -> u32 {
    1
}
fn default_heartbeat_timeout() -> u64 {
    30
}

impl Default for WorkersPlan {
    fn default() -> Self {
        WorkersPlan {
            min_workers: default_min_workers(),
            heartbeat_timeout_seconds: default_heartbeat_timeout(),
            world_size: 0,
            collective: CollectiveKind::Auto,
            bucket_size_mb: default_bucket_size_mb(),
            collective_timeout_seconds: default_collective_timeout(),
            join_timeout_seconds: default_join_timeout(),
            progress_timeout_seconds: default_progress_timeout(),
        }
    }
}

impl Plan {
    /// Reads and validates a plan file; its errors name the file.
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|error| PlanError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Plan::from_toml_str(&text).map_err(|error| PlanError::InFile {
            path: path.to_path_buf(),
            error: Box::new(error),
        })
    }

    /// Number of rounds to run: the plan's `rounds`, or the method's default (2 Noisy Student
    /// rounds; Meta Pseudo Labels runs one).
    pub fn rounds(&self) -> u32 {
        self.rounds.unwrap_or(match self.method {
            Method::NoisyStudent => 2,
            Method::MetaPseudoLabels => 1,
        })
    }

    /// Probabilities kept per pseudo-labelled example: `pseudo_labels.top_k`, or 10 (all
    /// classes when there are fewer).
    /// The global batch of every training schedule the run has, with its field: each rank of
    /// a data-parallel group takes a slice of it, so no group may have more ranks than the
    /// smallest.
    pub fn training_batches(&self) -> Vec<(String, u32)> {
        let mut batches = Vec::new();
        for (role, plan) in [("teacher", &self.teacher), ("student", &self.student)] {
            if let Some(train) = &plan.train {
                batches.push((format!("{role}.train.batch_size"), train.batch_size));
            }
        }
        if let Some(mpl) = &self.mpl {
            batches.push(("mpl.batch_size".to_string(), mpl.batch_size));
            if mpl.finetune.steps > 0 {
                batches.push((
                    "mpl.finetune.batch_size".to_string(),
                    mpl.finetune.batch_size,
                ));
            }
        }
        batches
    }

    pub fn top_k(&self) -> u32 {
        self.pseudo_labels
            .top_k
            .unwrap_or(self.data.classes.min(10))
    }

    /// Parses and validates a plan.
    pub fn from_toml_str(text: &str) -> Result<Plan, PlanError> {
        let plan = Plan::from_recorded_toml(text)?;
        plan.validate()?;
        Ok(plan)
    }

    /// Reads a plan a run recorded, without checking it: a version with other checks wrote it
    /// (a setting a resume may change, say, that this version's checks refuse), and what
    /// matters is how it differs from the plan given now, which is checked.
    pub fn from_recorded_toml(text: &str) -> Result<Plan, PlanError> {
        toml::from_str(text).map_err(|error| PlanError::Parse {
            message: error.to_string().trim_end().to_string(),
        })
    }

    /// The plan as TOML (what workers receive, and what a run records to recognise its plan
    /// on resume), with every default written out: two plans that run the same serialize the
    /// same, whether a default was written in the file or not.
    /// `data.split_seed` is the exception: left out when it is the run's seed (its default),
    /// so that a plan naming it serializes as plans did before the field existed (a Meta Pseudo
    /// Labels save recognises its joint training by this text).
    pub fn to_toml_string(&self) -> String {
        let mut plan = self.with_defaults_written();
        if plan.data.split_seed == Some(plan.seed) {
            plan.data.split_seed = None;
        }
        toml::to_string(&plan).unwrap_or_default()
    }

    fn with_defaults_written(&self) -> Plan {
        let mut plan = self.clone();
        plan.rounds = Some(self.rounds());
        plan.pseudo_labels.top_k = Some(self.top_k());
        plan
    }

    /// The first setting in which `self` differs from `other`, as `field: A -> B` (A from
    /// `self`), or `None` when they serialize the same. Names what changed when a run
    /// directory is reopened with another plan.
    pub fn first_difference(&self, other: &Plan) -> Option<String> {
        // Another plan altogether first (its name, its method), then the seed: where it
        // changed, the split seed left to its default did too, and the seed is what the user
        // changed.
        if self.method != other.method {
            return Some(format!(
                "method: {} -> {} (another plan altogether)",
                self.method.as_str(),
                other.method.as_str()
            ));
        }
        if self.name != other.name {
            return Some(format!(
                "name: {:?} -> {:?} (another plan altogether)",
                self.name, other.name
            ));
        }
        if self.seed != other.seed {
            return Some(format!("seed: {} -> {}", self.seed, other.seed));
        }
        // Compared resolved: a split seed left to its default is the run's seed.
        let table = |plan: &Plan| {
            let mut resolved = plan.with_defaults_written();
            resolved.data.split_seed = Some(plan.split_seed());
            toml::from_str::<toml::Table>(&toml::to_string(&resolved).unwrap_or_default())
                .unwrap_or_default()
        };
        difference(String::new(), &table(self).into(), &table(other).into())
    }

    /// This plan, the one a run recorded, with the settings a resumed run may change taken
    /// from `plan`:
    /// - its data's folder and its first teacher's file: `data.dir` and `teacher.checkpoint`
    ///   say where the data and the teacher are, not what they are, so a run moved to another
    ///   machine reads the same files from there; `data.unlabeled.path` too when the run
    ///   recorded its unlabeled listing's fingerprint (`listing_recorded`), which then vouches
    ///   that they are the same files;
    /// - how many workers it waits for and spreads over, and how it watches them
    ///   (`workers.min_workers`, `world_size` and the heartbeat, join, collective and progress
    ///   timeouts;
    ///   `pseudo_labels.lease_seconds`), which change nothing it computes beyond float
    ///   rounding: a run resumed after a machine was lost for good goes on with fewer workers.
    ///   The transport (`workers.collective`, `bucket_size_mb`) stays: every rank of a group,
    ///   a worker of the earlier coordinator too, must move gradients the same way.
    ///
    /// (A worker's training save leaves the same settings out of its identity: keep
    /// `mentor-worker`'s `tasks::training_identity` in step.)
    pub fn with_free_settings_of(mut self, plan: &Plan, listing_recorded: bool) -> Plan {
        let (workers, wanted) = (&mut self.workers, &plan.workers);
        workers.min_workers = wanted.min_workers;
        workers.world_size = wanted.world_size;
        workers.heartbeat_timeout_seconds = wanted.heartbeat_timeout_seconds;
        workers.join_timeout_seconds = wanted.join_timeout_seconds;
        workers.collective_timeout_seconds = wanted.collective_timeout_seconds;
        workers.progress_timeout_seconds = wanted.progress_timeout_seconds;
        self.pseudo_labels.lease_seconds = plan.pseudo_labels.lease_seconds;
        self.data.dir = plan.data.dir.clone();
        if let (true, Some(_), Some(given)) = (
            listing_recorded,
            &self.data.unlabeled.path,
            &plan.data.unlabeled.path,
        ) {
            self.data.unlabeled.path = Some(given.clone());
        }
        if let (Some(_), Some(given)) = (&self.teacher.checkpoint, &plan.teacher.checkpoint) {
            self.teacher.checkpoint = Some(given.clone());
        }
        self
    }

    /// The plan with its local paths made absolute where it is read (`data.dir`,
    /// `data.unlabeled.path`, a `pseudo_labels.storage` that is not a URL): workers are sent
    /// the plan and run in other directories, on other machines, so a relative path would
    /// name another place there. `teacher.checkpoint` keeps its form (the coordinator resolves
    /// it itself and records its digest).
    pub fn with_absolute_paths(mut self) -> Result<Plan, PlanError> {
        let absolute = |field: &str, path: &Path| {
            std::path::absolute(path)
                .map_err(|e| invalid(field, format!("`{}`: {e}", path.display())))
        };
        self.data.dir = absolute("data.dir", &self.data.dir)?;
        if let Some(path) = &self.data.unlabeled.path {
            self.data.unlabeled.path = Some(absolute("data.unlabeled.path", path)?);
        }
        if let Some(storage) = self.pseudo_labels.local_storage() {
            let path = absolute("pseudo_labels.storage", storage)?;
            self.pseudo_labels.storage = Some(path.display().to_string());
        }
        Ok(self)
    }

    /// Whether `plan` is this run's plan but for the settings a resumed run may change
    /// ([`Plan::with_free_settings_of`]): a worker of the run may go on under it.
    pub fn same_run_as(&self, plan: &Plan) -> bool {
        self.clone()
            .with_free_settings_of(plan, true)
            .first_difference(plan)
            .is_none()
    }

    /// The seed of the labeled split: `data.split_seed`, else the run's `seed`.
    pub fn split_seed(&self) -> u64 {
        self.data.split_seed.unwrap_or(self.seed)
    }

    /// The role plan (teacher or student) that trained the model of `round`.
    pub fn role(&self, role: Role) -> &RolePlan {
        match role {
            Role::Teacher => &self.teacher,
            Role::Student => &self.student,
        }
    }

    /// Checks that every model of the run takes the data's images, `side` pixels square:
    /// the teacher of round 1 (of the joint training) and each round's student.
    pub fn check_image_side(&self, side: u32) -> Result<(), PlanError> {
        let rounds = match self.method {
            Method::NoisyStudent => self.rounds(),
            Method::MetaPseudoLabels => 1,
        };
        let teacher = ("teacher.model", self.teacher.model.at_round(1), None);
        let students = (1..=rounds).map(|round| {
            let round = (rounds > 1).then_some(round);
            (
                "student.model",
                self.student.model.at_round(round.unwrap_or(1)),
                round,
            )
        });
        for (field, model, round) in std::iter::once(teacher).chain(students) {
            let resolution = model.input_resolution(side);
            if let Some(problem) = model.input_side_problem(resolution) {
                let round = round.map(|r| format!("round {r}: ")).unwrap_or_default();
                let resized = if resolution != side {
                    format!(" (the data's {side}x{side} images resized)")
                } else {
                    String::new()
                };
                return Err(invalid(field, format!("{round}{problem}{resized}")));
            }
        }
        Ok(())
    }

    /// Refuses settings that would do nothing where they are set, naming the first: stochastic
    /// depth on a model without residual blocks, RandAugment settings without operations, a
    /// class-balance size without balancing, noise for a teacher read from a checkpoint. Checked
    /// for new runs (the coordinator, `mentor plan`), not by [`Plan::validate`]: a run recorded
    /// by an earlier build with such a setting resumes with its plan unchanged.
    pub fn check_unused(&self) -> Result<(), PlanError> {
        for (role, plan) in [("teacher", &self.teacher), ("student", &self.student)] {
            if plan.noise.stochastic_depth_survival < 1.0 && !plan.model.has_residual_blocks() {
                return Err(invalid(
                    format!("{role}.noise.stochastic_depth_survival"),
                    format!(
                        "{role}.model has no residual blocks to drop (a cnn with residual_blocks = 0, or a densenet, whose drop_rate is its own); remove it"
                    ),
                ));
            }
            check_randaugment_used(
                &format!("{role}.noise.randaugment"),
                &plan.noise.randaugment,
            )?;
        }
        if self.data.unlabeled.format == UnlabeledFormat::Webdataset
            && self.data.shard_size != default_shard_size()
        {
            return Err(invalid(
                "data.shard_size",
                "not used with format `webdataset`, whose shards are its .tar files (one pseudo-label shard each); remove it",
            ));
        }
        if self.student.model.grows() && self.rounds() <= 1 {
            return Err(invalid(
                format!("student.model.{}", self.student.model.growth_field()),
                "grows the student from round 2 on, and this plan has one round (rounds = 1, or Meta Pseudo Labels); remove it",
            ));
        }
        if let Some(mpl) = &self.mpl {
            check_randaugment_used("mpl.randaugment", &mpl.randaugment)?;
            let finetune = &mpl.finetune;
            if finetune.steps == 0 && *finetune != FinetunePlan::default() {
                return Err(invalid(
                    "mpl.finetune.steps",
                    "is 0 (its default in a table that is given: no finetune), so batch_size and learning_rate apply to nothing: set steps (e.g. 2000)",
                ));
            }
        }
        if self.teacher.checkpoint.is_some() && self.teacher.noise != NoisePlan::default() {
            return Err(invalid(
                "teacher.noise",
                "not used when teacher.checkpoint gives the first teacher (noise applies to training, and it is not trained); remove it",
            ));
        }
        self.pseudo_labels.check_unused()
    }

    /// Checks every field; the first problem found is returned, with the value the plan gave
    /// where the rule alone is stated ("must be in [0, 1), not 1.5").
    pub fn validate(&self) -> Result<(), PlanError> {
        self.check_fields()
            .map_err(|error| self.naming_the_value(error))
    }

    /// `error` with the plan's value of its field appended to a bare rule.
    fn naming_the_value(&self, error: PlanError) -> PlanError {
        let PlanError::Invalid { field, reason } = error else {
            return error;
        };
        if !reason.starts_with("must be") || reason.contains(", not ") {
            return PlanError::Invalid { field, reason };
        }
        let value = toml::Value::try_from(self).ok().and_then(|plan| {
            field
                .split('.')
                .try_fold(plan, |value, key| value.get(key).cloned())
        });
        match value {
            Some(value) if !value.is_table() && !value.is_array() => {
                // After the rule, before its explanation.
                let reason = match reason.split_once(": ") {
                    Some((rule, why)) => format!("{rule}, not {value}: {why}"),
                    None => format!("{reason}, not {value}"),
                };
                PlanError::Invalid { field, reason }
            }
            _ => PlanError::Invalid { field, reason },
        }
    }

    fn check_fields(&self) -> Result<(), PlanError> {
        if self.version != PLAN_VERSION {
            return Err(invalid(
                "version",
                format!(
                    "unsupported plan version {}, expected {PLAN_VERSION}",
                    self.version
                ),
            ));
        }
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(invalid(
                "name",
                "may only hold ASCII letters, digits, `-`, `_` and `.`",
            ));
        }
        if self.name.starts_with('.') {
            // `.` and `..` would make the default run directory `runs/<name>` the runs
            // directory or its parent; other leading dots hide it.
            return Err(invalid("name", "must not start with `.`"));
        }
        if self.method == Method::MetaPseudoLabels {
            let Some(mpl) = &self.mpl else {
                return Err(invalid(
                    "mpl",
                    "required when method = \"meta-pseudo-labels\"",
                ));
            };
            validate_mpl(mpl)?;
            if self.data.unlabeled.format != UnlabeledFormat::Idx {
                return Err(invalid(
                    "data.unlabeled.format",
                    "Meta Pseudo Labels reads its unlabeled batches from the IDX training set; use `idx`",
                ));
            }
            if self.rounds() != 1 {
                return Err(invalid(
                    "rounds",
                    "Meta Pseudo Labels runs one round; set rounds = 1",
                ));
            }
            for (role, plan) in [("teacher", &self.teacher), ("student", &self.student)] {
                if plan.train.is_some() {
                    return Err(invalid(
                        format!("{role}.train"),
                        "not used by Meta Pseudo Labels, whose schedule is [mpl]; remove it",
                    ));
                }
                if plan.checkpoint.is_some() {
                    return Err(invalid(
                        format!("{role}.checkpoint"),
                        "not used by Meta Pseudo Labels, whose teacher and student start together from scratch; remove it",
                    ));
                }
                if plan.noise.randaugment != RandAugmentPlan::default() {
                    return Err(invalid(
                        format!("{role}.noise.randaugment"),
                        "not used by Meta Pseudo Labels, whose strong view is mpl.randaugment; remove it",
                    ));
                }
            }
            // Meta Pseudo Labels writes no pseudo-label shards: of [pseudo_labels] only the
            // evaluation batch applies.
            let value = |labels: &PseudoLabelPlan| toml::Value::try_from(labels).ok();
            // `top_k` as `to_toml_string` writes it, the class count's default, passes too.
            let top_k = self
                .pseudo_labels
                .top_k
                .filter(|&k| k == self.data.classes.min(10));
            let used = PseudoLabelPlan {
                batch_size: self.pseudo_labels.batch_size,
                top_k,
                ..PseudoLabelPlan::default()
            };
            if let (Some(used), Some(given)) = (value(&used), value(&self.pseudo_labels)) {
                if let Some(change) = difference("pseudo_labels".into(), &used, &given) {
                    let field = change.split(':').next().unwrap_or("pseudo_labels");
                    return Err(invalid(
                        field,
                        "not used by Meta Pseudo Labels, which writes no pseudo labels (of \
                         [pseudo_labels] only batch_size, its evaluation batch, applies); remove it",
                    ));
                }
            }
            if self.data.shard_size != default_shard_size() {
                return Err(invalid(
                    "data.shard_size",
                    "not used by Meta Pseudo Labels, which writes no pseudo-label shards; remove it",
                ));
            }
        } else {
            if self.mpl.is_some() {
                return Err(invalid(
                    "mpl",
                    "only meaningful with method = \"meta-pseudo-labels\"",
                ));
            }
            if self.student.checkpoint.is_some() {
                return Err(invalid(
                    "student.checkpoint",
                    "only the teacher starts from a checkpoint; each student trains from scratch",
                ));
            }
            match (&self.teacher.checkpoint, &self.teacher.train) {
                (Some(path), _) if path.as_os_str().is_empty() => {
                    return Err(invalid("teacher.checkpoint", "must not be empty"));
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "teacher.train",
                        "not used when teacher.checkpoint gives the first teacher; remove one of them",
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        "teacher.train",
                        "required for method = \"noisy-student\" (or teacher.checkpoint, the first teacher's weights from a file)",
                    ));
                }
                _ => {}
            }
            if self.student.train.is_none() {
                return Err(invalid(
                    "student.train",
                    "required for method = \"noisy-student\"",
                ));
            }
        }
        if !(1..=1000).contains(&self.rounds()) {
            return Err(invalid("rounds", "must be in [1, 1000]"));
        }
        self.validate_data()?;
        validate_role("teacher", &self.teacher, false, self.rounds())?;
        validate_role("student", &self.student, true, self.rounds())?;
        if let Some((setting, student, teacher)) =
            self.student.model.first_smaller_than(&self.teacher.model)
        {
            return Err(invalid(
                format!("student.model.{setting}"),
                format!("{student} is below the teacher's {teacher}: the student must be at least as large as the teacher"),
            ));
        }
        self.validate_pseudo_labels()?;
        if self.workers.min_workers == 0 {
            return Err(invalid("workers.min_workers", "must be >= 1"));
        }
        check_seconds(
            "workers.heartbeat_timeout_seconds",
            self.workers.heartbeat_timeout_seconds,
        )?;
        // Workers heartbeat every second: one heartbeat a few milliseconds late on a busy
        // machine must not make a worker lost.
        if self.workers.heartbeat_timeout_seconds < 2 {
            return Err(invalid(
                "workers.heartbeat_timeout_seconds",
                "must be >= 2 (workers heartbeat every second)",
            ));
        }
        if !(self.workers.bucket_size_mb > 0.0 && self.workers.bucket_size_mb.is_finite()) {
            return Err(invalid("workers.bucket_size_mb", "must be > 0"));
        }
        check_seconds(
            "workers.collective_timeout_seconds",
            self.workers.collective_timeout_seconds,
        )?;
        check_seconds(
            "workers.join_timeout_seconds",
            self.workers.join_timeout_seconds,
        )?;
        let progress = self.workers.progress_timeout_seconds;
        if progress != 0 {
            check_seconds("workers.progress_timeout_seconds", progress)?;
        }
        let ranks = self.workers.world_size;
        if ranks > 1 {
            // Each rank takes a slice of every global batch, so a batch needs one image per rank.
            let batches = self.training_batches();
            if let Some((field, batch)) = batches.into_iter().find(|(_, batch)| *batch < ranks) {
                return Err(invalid(
                    field,
                    format!("{batch} is smaller than workers.world_size ({ranks}): each rank needs at least one image"),
                ));
            }
        }
        if self.workers.collective == CollectiveKind::Single && self.workers.world_size > 1 {
            return Err(invalid(
                "workers.collective",
                "`single` cannot serve a group of several ranks (workers.world_size > 1)",
            ));
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<(), PlanError> {
        let data = &self.data;
        if data.format != "idx" {
            return Err(invalid(
                "data.format",
                format!("unknown format `{}`, expected `idx`", data.format),
            ));
        }
        if data.dir.as_os_str().is_empty() {
            return Err(invalid("data.dir", "must not be empty"));
        }
        if data.labeled_per_class == 0 {
            return Err(invalid("data.labeled_per_class", "must be >= 1"));
        }
        if data.shard_size == 0 {
            return Err(invalid("data.shard_size", "must be >= 1"));
        }
        if data.classes < 2 {
            return Err(invalid("data.classes", "must be >= 2"));
        }
        if data.classes > u16::MAX as u32 {
            return Err(invalid("data.classes", "must be <= 65535"));
        }
        let unlabeled = &data.unlabeled;
        match (unlabeled.format, &unlabeled.path) {
            (UnlabeledFormat::Idx, Some(_)) => {
                return Err(invalid(
                    "data.unlabeled.path",
                    "not used with format `idx` (the unlabeled images are the training set's)",
                ))
            }
            (UnlabeledFormat::ImageFolder | UnlabeledFormat::Webdataset, None) => {
                return Err(invalid(
                    "data.unlabeled.path",
                    format!("required with format `{}`", unlabeled.format.as_str()),
                ))
            }
            _ => {}
        }
        if unlabeled.format == UnlabeledFormat::Webdataset && data.unlabeled_limit > 0 {
            return Err(invalid(
                "data.unlabeled_limit",
                "not supported with format `webdataset` (each tar file is one shard)",
            ));
        }
        Ok(())
    }

    fn validate_pseudo_labels(&self) -> Result<(), PlanError> {
        let labels = &self.pseudo_labels;
        if !(labels.temperature > 0.0 && labels.temperature.is_finite()) {
            return Err(invalid("pseudo_labels.temperature", "must be > 0"));
        }
        if labels.top_k == Some(0) || self.top_k() > self.data.classes {
            return Err(invalid(
                "pseudo_labels.top_k",
                format!("must be between 1 and data.classes ({})", self.data.classes),
            ));
        }
        if !(0.0..1.0).contains(&labels.min_confidence) {
            return Err(invalid("pseudo_labels.min_confidence", "must be in [0, 1)"));
        }
        // Upper bounds keep a typo from allocating the worker's memory away at start (the
        // pipeline reserves its batches and queue slots up front).
        if !(1..=65_536).contains(&labels.batch_size) {
            return Err(invalid("pseudo_labels.batch_size", "must be in [1, 65536]"));
        }
        if labels.decode_threads > 1024 {
            return Err(invalid("pseudo_labels.decode_threads", "must be <= 1024"));
        }
        if let Some(storage) = &labels.storage {
            if storage.trim().is_empty() {
                return Err(invalid(
                    "pseudo_labels.storage",
                    "must not be empty when set",
                ));
            }
            if let Some((scheme, _)) = storage.split_once("://") {
                const SCHEMES: [&str; 9] = [
                    "file", "s3", "s3a", "gs", "az", "adl", "azure", "abfs", "abfss",
                ];
                if scheme == "http" || scheme == "https" {
                    return Err(invalid(
                        "pseudo_labels.storage",
                        "an HTTP store cannot write a shard exactly once (it has no conditional writes); use a directory or s3://, gs://, az://",
                    ));
                }
                if scheme == "memory" {
                    return Err(invalid(
                        "pseudo_labels.storage",
                        "`memory://` would give each process a store of its own: labelers' shards would not reach the student",
                    ));
                }
                if !SCHEMES.contains(&scheme) {
                    return Err(invalid(
                        "pseudo_labels.storage",
                        format!(
                            "unknown URL scheme `{scheme}`, expected a local path or one of {}",
                            SCHEMES.join(", ")
                        ),
                    ));
                }
            }
        }
        if !(1..=1024).contains(&labels.prefetch_batches) {
            return Err(invalid(
                "pseudo_labels.prefetch_batches",
                "must be in [1, 1024]",
            ));
        }
        check_seconds("pseudo_labels.lease_seconds", labels.lease_seconds)?;
        Ok(())
    }
}

fn validate_role(
    role: &str,
    plan: &RolePlan,
    is_student: bool,
    rounds: u32,
) -> Result<(), PlanError> {
    let model = &plan.model;
    model.validate(&format!("{role}.model"), rounds)?;
    if !is_student && model.grows() {
        return Err(invalid(
            format!("{role}.model"),
            "only students grow; the teacher of later rounds is the previous student",
        ));
    }
    let Some(train) = &plan.train else {
        return validate_noise(role, &plan.noise);
    };
    if train.steps == 0 {
        return Err(invalid(format!("{role}.train.steps"), "must be >= 1"));
    }
    if !(1..=MAX_BATCH).contains(&train.batch_size) {
        return Err(invalid(
            format!("{role}.train.batch_size"),
            format!("must be in [1, {MAX_BATCH}]"),
        ));
    }
    if train.unlabeled_ratio > MAX_RATIO {
        return Err(invalid(
            format!("{role}.train.unlabeled_ratio"),
            format!("must be <= {MAX_RATIO}"),
        ));
    }
    if is_student && train.unlabeled_ratio == 0 {
        return Err(invalid(
            format!("{role}.train.unlabeled_ratio"),
            format!("required, from 1 to {MAX_RATIO} (0 or left out): the student learns from pseudo-labeled images"),
        ));
    }
    if !is_student && train.unlabeled_ratio != 0 {
        return Err(invalid(
            format!("{role}.train.unlabeled_ratio"),
            "the first teacher trains on labeled images only; leave it out",
        ));
    }
    if !(train.learning_rate > 0.0 && train.learning_rate.is_finite()) {
        return Err(invalid(
            format!("{role}.train.learning_rate"),
            "must be > 0",
        ));
    }
    if !(0.0..1.0).contains(&train.momentum) {
        return Err(invalid(
            format!("{role}.train.momentum"),
            "must be in [0, 1)",
        ));
    }
    if !(train.weight_decay >= 0.0 && train.weight_decay.is_finite()) {
        return Err(invalid(
            format!("{role}.train.weight_decay"),
            "must be >= 0",
        ));
    }
    if train.warmup_steps >= train.steps {
        return Err(invalid(
            format!("{role}.train.warmup_steps"),
            format!("must be below {role}.train.steps ({})", train.steps),
        ));
    }
    if !(0.0..1.0).contains(&train.label_smoothing) {
        return Err(invalid(
            format!("{role}.train.label_smoothing"),
            "must be in [0, 1)",
        ));
    }
    if train.log_every == 0 {
        return Err(invalid(format!("{role}.train.log_every"), "must be >= 1"));
    }
    validate_noise(role, &plan.noise)
}

fn validate_noise(role: &str, noise: &NoisePlan) -> Result<(), PlanError> {
    if !(0.0..1.0).contains(&noise.dropout) {
        return Err(invalid(
            format!("{role}.noise.dropout"),
            "must be in [0, 1)",
        ));
    }
    if !(noise.stochastic_depth_survival > 0.0 && noise.stochastic_depth_survival <= 1.0) {
        return Err(invalid(
            format!("{role}.noise.stochastic_depth_survival"),
            "must be in (0, 1]",
        ));
    }
    validate_randaugment(&format!("{role}.noise.randaugment"), &noise.randaugment)
}

/// The largest batch a plan may ask for (images of one step, all ranks together), and the
/// largest ratio of unlabeled to labeled images in it: bounds far past any real batch that keep
/// a typo from allocating a worker's memory away, or spinning, on its first step.
const MAX_BATCH: u32 = 65_536;
const MAX_RATIO: u32 = 1_024;
/// The most RandAugment operations applied to one image.
const MAX_RANDAUGMENT_OPS: u32 = 16;

impl PseudoLabelPlan {
    /// `storage` when it is a local folder rather than an object store URL (`s3://...`,
    /// `file://...`).
    pub fn local_storage(&self) -> Option<&Path> {
        self.storage
            .as_deref()
            .filter(|storage| !storage.contains("://"))
            .map(Path::new)
    }

    /// Refuses a class-balance size without balancing (see [`Plan::check_unused`]; also what a
    /// run retried with new filter settings checks).
    pub fn check_unused(&self) -> Result<(), PlanError> {
        if self.per_class > 0 && !self.balance {
            return Err(invalid(
                "pseudo_labels.per_class",
                "sets the class balance, which pseudo_labels.balance = false turns off; remove one of them",
            ));
        }
        Ok(())
    }
}

/// The RandAugment operations whose effect does not depend on the magnitude.
const MAGNITUDE_FREE_OPS: &[&str] = &["identity", "auto-contrast", "equalize"];

/// Refuses a RandAugment `magnitude` or `op_list` with no operation to apply them to, and
/// operations at magnitude 0 (most of them then leave the image as it is) unless each one of
/// `op_list` ignores the magnitude.
fn check_randaugment_used(path: &str, randaugment: &RandAugmentPlan) -> Result<(), PlanError> {
    if randaugment.ops == 0 && (randaugment.magnitude != 0.0 || !randaugment.op_list.is_empty()) {
        return Err(invalid(
            format!("{path}.ops"),
            "is 0 (its default in a table that is given), so magnitude and op_list apply to no operation: set ops (e.g. 2)",
        ));
    }
    let magnitude_free = !randaugment.op_list.is_empty()
        && randaugment
            .op_list
            .iter()
            .all(|op| MAGNITUDE_FREE_OPS.contains(&op.as_str()));
    if randaugment.ops > 0 && randaugment.magnitude == 0.0 && !magnitude_free {
        return Err(invalid(
            format!("{path}.magnitude"),
            "is 0 (its default in a table that is given), where most operations leave the image as it is: set it (e.g. 5; ALGORITHMS.md uses 9 to 27)",
        ));
    }
    Ok(())
}

fn validate_randaugment(path: &str, randaugment: &RandAugmentPlan) -> Result<(), PlanError> {
    if randaugment.ops > MAX_RANDAUGMENT_OPS {
        return Err(invalid(
            format!("{path}.ops"),
            format!("must be <= {MAX_RANDAUGMENT_OPS}"),
        ));
    }
    if !(0.0..=30.0).contains(&randaugment.magnitude) {
        return Err(invalid(format!("{path}.magnitude"), "must be in [0, 30]"));
    }
    if !(0.0..=1.0).contains(&randaugment.cutout) {
        return Err(invalid(format!("{path}.cutout"), "must be in [0, 1]"));
    }
    for (index, op) in randaugment.op_list.iter().enumerate() {
        if !RANDAUGMENT_OPS.contains(&op.as_str()) {
            return Err(invalid(
                format!("{path}.op_list[{index}]"),
                format!(
                    "unknown operation `{op}`, expected one of: {}",
                    RANDAUGMENT_OPS.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The first key under `path` where `a` and `b` differ, depth first in key order.
fn difference(path: String, a: &toml::Value, b: &toml::Value) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (a, b) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter()
                .find_map(|key| match (a.get(key), b.get(key)) {
                    (Some(a), Some(b)) => difference(join(key), a, b),
                    (a, b) => {
                        let show = |v: Option<&toml::Value>| {
                            // Written out where set; left out at its default (`precision`,
                            // `mpl.feedback`) or where not given (`teacher.checkpoint`).
                            v.map_or("(not set: its default)".to_string(), |v| v.to_string())
                        };
                        Some(format!("{}: {} -> {}", join(key), show(a), show(b)))
                    }
                })
        }
        _ if a == b => None,
        _ => Some(format!("{path}: {a} -> {b}")),
    }
}

fn validate_mpl(mpl: &MplPlan) -> Result<(), PlanError> {
    let positive = |field: &str, value: f64| {
        if value > 0.0 && value.is_finite() {
            Ok(())
        } else {
            Err(invalid(format!("mpl.{field}"), "must be > 0"))
        }
    };
    if mpl.steps == 0 {
        return Err(invalid("mpl.steps", "must be >= 1"));
    }
    if !(1..=MAX_BATCH).contains(&mpl.batch_size) {
        return Err(invalid(
            "mpl.batch_size",
            format!("must be in [1, {MAX_BATCH}]"),
        ));
    }
    if !(1..=MAX_RATIO).contains(&mpl.mu) {
        return Err(invalid("mpl.mu", format!("must be in [1, {MAX_RATIO}]")));
    }
    positive("teacher_learning_rate", mpl.teacher_learning_rate)?;
    positive("student_learning_rate", mpl.student_learning_rate)?;
    positive("uda_temperature", mpl.uda_temperature)?;
    positive("finetune.learning_rate", mpl.finetune.learning_rate)?;
    for (field, value) in [
        ("weight_decay", mpl.weight_decay),
        ("lambda_u", mpl.lambda_u),
        ("mpl_weight", mpl.mpl_weight),
    ] {
        if !(value >= 0.0 && value.is_finite()) {
            return Err(invalid(format!("mpl.{field}"), "must be >= 0"));
        }
    }
    if !(0.0..1.0).contains(&mpl.momentum) {
        return Err(invalid("mpl.momentum", "must be in [0, 1)"));
    }
    if !(0.0..=1.0).contains(&mpl.uda_threshold) {
        return Err(invalid("mpl.uda_threshold", "must be in [0, 1]"));
    }
    if !(0.0..1.0).contains(&mpl.label_smoothing) {
        return Err(invalid("mpl.label_smoothing", "must be in [0, 1)"));
    }
    for (field, value) in [("baseline_decay", mpl.baseline_decay), ("ema", mpl.ema)] {
        if !(0.0..1.0).contains(&value) {
            return Err(invalid(format!("mpl.{field}"), "must be in [0, 1)"));
        }
    }
    if mpl.warmup_steps >= mpl.steps {
        return Err(invalid(
            "mpl.warmup_steps",
            format!("must be below mpl.steps ({})", mpl.steps),
        ));
    }
    if mpl.student_wait_steps + mpl.warmup_steps >= mpl.steps {
        return Err(invalid(
            "mpl.student_wait_steps",
            format!(
                "the student's wait plus its warmup ({} + {}) must be below mpl.steps ({})",
                mpl.student_wait_steps, mpl.warmup_steps, mpl.steps
            ),
        ));
    }
    if mpl.log_every == 0 {
        return Err(invalid("mpl.log_every", "must be >= 1"));
    }
    if mpl.finetune.steps > 0 && !(1..=MAX_BATCH).contains(&mpl.finetune.batch_size) {
        return Err(invalid(
            "mpl.finetune.batch_size",
            format!("must be in [1, {MAX_BATCH}]"),
        ));
    }
    validate_randaugment("mpl.randaugment", &mpl.randaugment)
}

/// Which of the two model roles a task concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Teacher,
    Student,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Teacher => "teacher",
            Role::Student => "student",
        }
    }
}

#[cfg(test)]
mod tests;
