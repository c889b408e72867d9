//! The three kinds of work a worker does: train a model, evaluate a checkpoint on the test set,
//! and pseudo-label one unlabeled shard with a clean teacher.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mentor_data::DecodeOptions;
use mentor_labels::{
    encode_shard, shard_histogram, Histogram, PutOutcome, SelectionFile, ShardHeader, ShardStore,
    SoftLabels,
};
use mentor_plan::{LabelMode, Optimizer, Plan, RandAugmentPlan, Role, Schedule, TrainPlan};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

use mentor_collective::chunk_bounds;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::augment::{flip_and_shift, RandAugment};
use crate::dataset::{to_unit, upload, Dataset};
use crate::distributed::{buffers, Group, GroupJoin};
use crate::models::{build, Model, ModelConfig};
use crate::optim::{Adam, Sgd, TrainOptimizer};
use crate::resume;
use crate::window::Window;

/// A model checkpoint and the plan section (role, round) that built it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    pub checkpoint: PathBuf,
    pub role: Role,
    pub model_round: u32,
}

/// Work handed to the libtorch thread.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskKind {
    Train {
        role: Role,
        round: u32,
        output: PathBuf,
        selection: Option<PathBuf>,
    },
    /// Meta Pseudo Labels: teacher and student trained together.
    TrainMpl {
        teacher_output: PathBuf,
        student_output: PathBuf,
    },
    /// The MPL student finetuned on labeled images.
    Finetune {
        init: PathBuf,
        output: PathBuf,
    },
    Evaluate {
        model: ModelSource,
    },
    Label {
        teacher: ModelSource,
        round: u32,
        shard_index: u32,
        start: u64,
        end: u64,
        /// Soft-label store root: a local directory or an object store URL.
        storage: String,
        /// Where the same teacher was named before: a shard committed under one of these is
        /// this teacher's.
        previous_teachers: Vec<String>,
    },
}

/// What a finished task produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Trained {
        checkpoint: PathBuf,
        final_loss: f64,
        steps: u64,
        seconds: f64,
    },
    Evaluated {
        accuracy: f64,
        loss: f64,
        examples: u64,
    },
    Labeled {
        key: String,
        examples: u64,
        sha256: String,
        bytes: u64,
        seconds: f64,
        histogram: Histogram,
    },
}

/// A progress report of a running task.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub images_per_second: f64,
    /// Method-specific measurements (Meta Pseudo Labels: h, UDA mask rate, ...).
    pub metrics: Vec<(String, f64)>,
}

/// Runs one task; errors are messages for the coordinator.
pub fn run_task(
    plan: &Plan,
    dataset: &Dataset,
    task: &TaskKind,
    group: Option<GroupJoin>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Outcome, TaskError> {
    let form_group = |group: Option<GroupJoin>| -> Result<Group, TaskError> {
        let bucket_bytes = (plan.workers.bucket_size_mb * 1024.0 * 1024.0) as usize;
        let group = match group {
            Some(join) => Group::form(
                join.rank,
                join.world_size,
                bucket_bytes,
                join.setup,
                dataset.device,
                join.collective_timeout,
            )
            .map_err(collective_error)?,
            None => Group::single(bucket_bytes, dataset.device),
        };
        if group.world_size > 1 {
            tracing::info!(
                rank = group.rank,
                world_size = group.world_size,
                "data-parallel group formed"
            );
        }
        Ok(group)
    };
    match task {
        TaskKind::Train {
            role,
            round,
            output,
            selection,
        } => {
            let setup = TrainSetup::for_role(plan, dataset, *role, *round)?;
            let mut group = form_group(group)?;
            train(
                plan,
                dataset,
                &setup,
                output,
                selection.as_deref(),
                &mut group,
                progress,
            )
        }
        TaskKind::Finetune { init, output } => {
            let setup = TrainSetup::finetune(plan, dataset, init)?;
            let mut group = form_group(group)?;
            train(plan, dataset, &setup, output, None, &mut group, progress)
        }
        TaskKind::TrainMpl {
            teacher_output,
            student_output,
        } => {
            let mut group = form_group(group)?;
            crate::mpl::train_mpl(
                plan,
                dataset,
                teacher_output,
                student_output,
                &mut group,
                progress,
            )
        }
        TaskKind::Evaluate { model } => Ok(evaluate(plan, dataset, model, progress)?),
        TaskKind::Label {
            teacher,
            round,
            shard_index,
            start,
            end,
            storage,
            previous_teachers,
        } => label(
            plan,
            dataset,
            teacher,
            *round,
            *shard_index,
            (*start, *end),
            storage,
            previous_teachers,
            progress,
        )
        .map_err(TaskError::from),
    }
}

pub fn model_config(plan: &Plan, role: Role, model_round: u32, dataset: &Dataset) -> ModelConfig {
    let role_plan = plan.role(role);
    ModelConfig::from_plan(
        role_plan,
        model_round,
        plan.data.classes,
        dataset.channels,
        dataset.image_size,
    )
}

/// Loads a checkpoint into the model its plan section describes.
pub fn load_model(
    plan: &Plan,
    dataset: &Dataset,
    source: &ModelSource,
) -> Result<(nn::VarStore, Model, ModelConfig), String> {
    let mut vs = nn::VarStore::new(dataset.device);
    let config = model_config(plan, source.role, source.model_round, dataset);
    let model = build(&vs.root(), &config);
    load_exactly(&mut vs, &source.checkpoint).map_err(|e| {
        format!(
            "failed to load checkpoint `{}` into {}.model: {e}",
            source.checkpoint.display(),
            source.role.as_str()
        )
    })?;
    Ok((vs, model, config))
}

/// Loads `path` into `vs` when it holds exactly `vs`'s variables, each of its shape. libtorch
/// alone would ignore tensors the model has no place for (a checkpoint of another model would
/// load as a part of it) and broadcast a tensor of another shape into a variable.
pub(crate) fn load_exactly(vs: &mut nn::VarStore, path: &Path) -> Result<(), String> {
    let saved: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| crate::libtorch_message(&e.to_string()))?
        .into_iter()
        .collect();
    let variables = vs.variables();
    let mut missing: Vec<&String> = variables
        .keys()
        .filter(|name| !saved.contains_key(*name))
        .collect();
    let mut extra: Vec<&String> = saved
        .keys()
        .filter(|name| !variables.contains_key(*name))
        .collect();
    missing.sort();
    extra.sort();
    let listed = |names: &[&String]| {
        let shown: Vec<&str> = names.iter().take(3).map(|name| name.as_str()).collect();
        let more = names.len().saturating_sub(3);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        format!("`{}`{more}", shown.join("`, `"))
    };
    if !missing.is_empty() || !extra.is_empty() {
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("it lacks the model's {}", listed(&missing)));
        }
        if !extra.is_empty() {
            problems.push(format!(
                "it holds {}, which the model does not have",
                listed(&extra)
            ));
        }
        return Err(format!(
            "{}: the checkpoint is of another model than the plan describes",
            problems.join("; ")
        ));
    }
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    for name in names {
        let (file, model) = (saved[name].size(), variables[name].size());
        if file != model {
            return Err(format!(
                "`{name}` is {file:?} in the checkpoint but {model:?} in the model: the checkpoint is of another model than the plan describes"
            ));
        }
    }
    // The tensors already read are copied in, converted to the model's kind: a checkpoint
    // exported in half precision (or double) gives a model of the kind the plan runs, whose
    // forward takes the 32-bit images it is given.
    tch::no_grad(|| {
        for (name, mut variable) in variables {
            let saved = &saved[&name];
            variable
                .f_copy_(&saved.to_device(variable.device()))
                .map_err(|e| format!("`{name}`: {}", crate::libtorch_message(&e.to_string())))?;
        }
        Ok(())
    })
}

/// Learning rate at `step`: linear warmup, then cosine decay or constant.
pub fn learning_rate(train: &TrainPlan, step: u64) -> f64 {
    let base = train.learning_rate;
    if step < train.warmup_steps {
        return base * (step + 1) as f64 / train.warmup_steps as f64;
    }
    match train.schedule {
        Schedule::Constant => base,
        Schedule::Cosine => {
            let progress = (step - train.warmup_steps) as f64
                / (train.steps - train.warmup_steps).max(1) as f64;
            base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

pub(crate) fn smoothed_one_hot(labels: &Tensor, classes: i64, smoothing: f64) -> Tensor {
    labels.one_hot(classes).to_kind(Kind::Float) * (1.0 - smoothing) + smoothing / classes as f64
}

/// Pseudo-labeled training examples: their images (u8, on the device), which image each row
/// uses, and each row's targets as the shard keeps them, `top_k` classes and their weights: the
/// dense distributions are made a batch at a time ([rows, classes] floats would take 5 GB for
/// an ImageNet round's 1.3 million rows of 1,000 classes).
pub(crate) struct PseudoLabeled {
    images: Tensor,
    rows: Tensor,
    targets: SparseTargets,
}

/// Targets of a pseudo-labeled row: the classes of its top `k` ([rows, k] i64) and, for soft
/// labels, their probabilities renormalised over those `k` ([rows, k] f32); hard labels are the
/// first class, one-hot with label smoothing.
struct SparseTargets {
    class_ids: Tensor,
    weights: Option<Tensor>,
    classes: i64,
    smoothing: f64,
}

impl SparseTargets {
    /// The targets of rows whose top `k` classes are `class_ids` ([rows, k]) with
    /// probabilities `probs` (soft labels; `None`: hard ones), renormalised over those `k` (top-k
    /// truncation leaves mass out).
    fn new(class_ids: Tensor, probs: Option<Tensor>, classes: i64, smoothing: f64) -> Self {
        let weights = probs.map(|probs| {
            &probs
                / probs
                    .sum_dim_intlist(-1, true, Kind::Float)
                    .clamp_min(1e-12)
        });
        SparseTargets {
            class_ids,
            weights,
            classes,
            smoothing,
        }
    }

    /// Dense target distributions ([picks, classes]) of rows `picks`.
    fn dense(&self, picks: &Tensor) -> Tensor {
        let class_ids = self.class_ids.index_select(0, picks);
        match &self.weights {
            Some(weights) => Tensor::zeros(
                [class_ids.size()[0], self.classes],
                (Kind::Float, class_ids.device()),
            )
            .scatter(1, &class_ids, &weights.index_select(0, picks)),
            None => smoothed_one_hot(&class_ids.select(1, 0), self.classes, self.smoothing),
        }
    }
}

impl PseudoLabeled {
    pub(crate) fn len(&self) -> i64 {
        self.targets.class_ids.size()[0]
    }

    /// Target distributions ([picks, classes]) of `picks` (row numbers).
    pub(crate) fn targets(&self, picks: &Tensor) -> Tensor {
        self.targets.dense(picks)
    }

    /// Images of `picks` (row numbers) as floats in [0, 1].
    pub(crate) fn images(&self, picks: &Tensor) -> Tensor {
        to_unit(
            &self
                .images
                .index_select(0, &self.rows.index_select(0, picks)),
        )
    }
}

/// Reads the soft labels a selection file points at, keeps and repeats rows by its rule (shards
/// read in parallel, each checked), and brings in the images of the kept examples.
pub fn read_selection(path: &Path, threads: usize) -> Result<SoftLabels, String> {
    let name = path.display().to_string();
    let bytes =
        std::fs::read(path).map_err(|e| format!("failed to read selection `{name}`: {e}"))?;
    let file = SelectionFile::from_json(&name, &bytes).map_err(|e| e.to_string())?;
    let store = ShardStore::open(&file.storage).map_err(|e| e.to_string())?;
    // Each thread reads a contiguous run of shards, so joining in order keeps shard order.
    let per_thread = file.shards.len().div_ceil(threads.max(1)).max(1);
    let parts: Vec<Result<Vec<SoftLabels>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = file
            .shards
            .chunks(per_thread)
            .map(|shards| {
                let (store, selection) = (&store, &file.selection);
                scope.spawn(move || {
                    shards
                        .iter()
                        .map(|shard| {
                            let (_, labels) =
                                mentor_labels::read_shard(store, &shard.key, Some(&shard.sha256))
                                    .map_err(|e| e.to_string())?;
                            if labels.len() as u64 != shard.examples {
                                return Err(format!(
                                    "shard `{}` has {} examples, the selection says {}",
                                    store.location(&shard.key),
                                    labels.len(),
                                    shard.examples
                                ));
                            }
                            Ok(mentor_labels::select_rows(&labels, selection))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err("a shard reader panicked".into()))
            })
            .collect()
    });
    let mut selected = SoftLabels::empty(file.top_k as usize);
    for labels in parts
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
    {
        selected.example_ids.extend(labels.example_ids);
        selected.class_ids.extend(labels.class_ids);
        selected.probs.extend(labels.probs);
    }
    Ok(selected)
}

fn load_selection(
    plan: &Plan,
    dataset: &Dataset,
    path: &Path,
    smoothing: f64,
) -> Result<PseudoLabeled, String> {
    let labels = read_selection(
        path,
        mentor_data::decode_threads(plan.pseudo_labels.decode_threads),
    )?;
    if labels.is_empty() {
        return Err(format!("selection `{}` keeps no example", path.display()));
    }
    let rows = labels.len() as i64;
    let k = labels.top_k as i64;
    let classes = plan.data.classes as i64;
    let device = dataset.device;
    let class_ids: Vec<i64> = labels.class_ids.iter().map(|&c| c as i64).collect();
    let class_ids = Tensor::from_slice(&class_ids)
        .view([rows, k])
        .to_device(device);
    let probs = match plan.pseudo_labels.mode {
        LabelMode::Soft => {
            let probs: Vec<f32> = labels.probs.iter().map(|p| p.to_f32()).collect();
            Some(Tensor::from_slice(&probs).view([rows, k]).to_device(device))
        }
        LabelMode::Hard => None,
    };
    let targets = SparseTargets::new(class_ids, probs, classes, smoothing);
    if dataset.unlabeled.format() == mentor_plan::UnlabeledFormat::Idx {
        // Example ids are training-set positions: the images are already on the device.
        return Ok(PseudoLabeled {
            images: dataset.train_images.shallow_clone(),
            rows: Tensor::from_slice(&labels.example_ids).to_device(device),
            targets,
        });
    }
    // Other sources: decode each kept example once, then point every row at its image.
    let options = DecodeOptions::from_plan(&plan.pseudo_labels, 1024);
    let mut ids: Vec<i64> = Vec::new();
    let mut pixels: Vec<u8> = Vec::new();
    for batch in dataset
        .unlabeled
        .decode_ids(&labels.example_ids, dataset.geometry(), options)
        .map_err(|e| e.to_string())?
    {
        let batch = batch.map_err(|e| e.to_string())?;
        ids.extend(batch.example_ids);
        pixels.extend(batch.pixels);
    }
    let image_rows: Vec<i64> = labels
        .example_ids
        .iter()
        .map(|id| {
            ids.binary_search(id)
                .map(|row| row as i64)
                .map_err(|_| format!("example {id} of the selection was not decoded"))
        })
        .collect::<Result<_, _>>()?;
    Ok(PseudoLabeled {
        images: dataset.pixels_tensor(&pixels, ids.len()),
        rows: Tensor::from_slice(&image_rows).to_device(device),
        targets,
    })
}

/// Saves the variables atomically (a temporary file renamed into place).
pub(crate) fn save_checkpoint(vs: &nn::VarStore, output: &Path) -> Result<(), String> {
    write_safetensors_atomically(vs.variables(), output)
}

/// Writes checkpoints on a thread of its own: the caller hands over the tensors, which are
/// copied to host memory at once, and goes on training while the copy reaches the disk. Rank 0
/// of a group saving in its loop would otherwise hold every other rank in the next collective
/// for as long as the disk takes (a save of several gigabytes to slow storage outlasts
/// `workers.collective_timeout_seconds`). One save at a time: the next waits for the previous
/// one, [`BackgroundSaver::finish`] for the last, and either reports its error; dropped (a task
/// stopped), it waits for the write it started.
#[derive(Default)]
pub(crate) struct BackgroundSaver {
    pending: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl BackgroundSaver {
    /// Copies `tensors` (as they are now) and writes them to `output` in the background, after
    /// the previous save ended; its error, if any, is returned here.
    pub(crate) fn save(
        &mut self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        output: &Path,
    ) -> Result<(), String> {
        self.finish()?;
        let copies: Vec<(String, Tensor)> = tch::no_grad(|| {
            tensors
                .into_iter()
                .map(|(name, tensor)| (name, host_copy(&tensor)))
                .collect()
        });
        let output = output.to_path_buf();
        let writer = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || write_safetensors_atomically(copies, &output))
            .map_err(|e| format!("failed to start the checkpoint writer: {e}"))?;
        self.pending = Some(writer);
        Ok(())
    }

    /// As [`BackgroundSaver::save`], for saves a task can do without (a training's resume
    /// save): the previous save's error, or this one's failing to start, is logged, and this
    /// save is made all the same.
    pub(crate) fn save_or_warn(
        &mut self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        output: &Path,
    ) {
        self.finish_or_warn();
        if let Err(error) = self.save(tensors, output) {
            tracing::warn!(%error, "a save failed; the task goes on");
        }
    }

    /// Waits for the save in progress, if any, and logs its error.
    pub(crate) fn finish_or_warn(&mut self) {
        if let Err(error) = self.finish() {
            tracing::warn!(%error, "a save failed; the task goes on");
        }
    }

    /// Waits for the save in progress, if any; its error.
    pub(crate) fn finish(&mut self) -> Result<(), String> {
        match self.pending.take() {
            None => Ok(()),
            Some(writer) => writer
                .join()
                .unwrap_or_else(|_| Err("the checkpoint writer panicked".into())),
        }
    }
}

impl Drop for BackgroundSaver {
    fn drop(&mut self) {
        if let Err(error) = self.finish() {
            tracing::warn!(%error, "a checkpoint written in the background failed");
        }
    }
}

/// A copy of `tensor` in host memory that later changes to `tensor` do not reach.
fn host_copy(tensor: &Tensor) -> Tensor {
    let on_host = match tensor.device() {
        tch::Device::Cpu => tensor.copy(),
        _ => tensor.to_device(tch::Device::Cpu),
    };
    on_host.detach().contiguous()
}

/// Writes named tensors to `output` as safetensors, atomically and durably (a temporary file,
/// flushed, renamed into place), creating its directory.
pub(crate) fn write_safetensors_atomically(
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    output: &Path,
) -> Result<(), String> {
    if let Some(parent) = output.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("failed to create `{}`: {e}", parent.display()))?;
    }
    // Unique to this write: two processes may share a process id (containers on one shared
    // file system), and an attempt given up may still be writing beside the next one.
    let temporary = output.with_extension(format!(
        "{}-{:08x}.tmp.safetensors",
        std::process::id(),
        rand::random::<u32>()
    ));
    // safetensors refuses tensors that are not contiguous (a channels-last variable with more
    // than one input channel, which no model has today: `models::conv2d` lays out only
    // depthwise weights, whose memory is contiguous); write contiguous copies.
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(name, value)| (name, value.contiguous()))
        .collect();
    // A checkpoint that fails half-written (a full disk, most likely) is removed: it would keep
    // the disk full for the task's next attempt.
    let cleanup = |error: String| {
        mentor_labels::durable::remove_if_there(&temporary);
        error
    };
    Tensor::write_safetensors(&tensors, &temporary).map_err(|e| {
        cleanup(format!(
            "failed to write checkpoint `{}`: {e}",
            temporary.display()
        ))
    })?;
    mentor_labels::durable::publish(&temporary, output).map_err(|e| {
        cleanup(format!(
            "failed to move checkpoint to `{}`: {e}",
            output.display()
        ))
    })
}

/// Sum over rows of the cross-entropy against target distributions.
fn soft_cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Tensor {
    -(targets * logits.log_softmax(-1, Kind::Float)).sum(Kind::Float)
}

/// Why a task failed, as the coordinator is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The task's own error on this rank (its data, its device, its checkpoint): it counts
    /// against the task and the worker.
    #[error("{0}")]
    Own(String),
    /// The rank's group failed because of another rank (a collective, the group's setup or its
    /// join): the coordinator counts the attempt as lost, not as a failure of the task (see
    /// `TaskResult.group_failure`).
    #[error("data-parallel group failed: {0}")]
    Group(String),
}

impl TaskError {
    /// Whether the error is its group's failure rather than the rank's own.
    pub fn is_group_failure(&self) -> bool {
        matches!(self, TaskError::Group(_))
    }
}

impl From<String> for TaskError {
    fn from(message: String) -> TaskError {
        TaskError::Own(message)
    }
}

impl From<&str> for TaskError {
    fn from(message: &str) -> TaskError {
        TaskError::Own(message.to_string())
    }
}

/// A collective's error as a task's: the group's failure when another rank is the likely
/// cause, else this rank's own (its device, its setup), which counts against the task and the
/// worker.
pub(crate) fn collective_error(error: mentor_collective::CollectiveError) -> TaskError {
    if error.is_peer_failure() {
        TaskError::Group(error.to_string())
    } else {
        TaskError::Own(format!(
            "data-parallel training failed on this rank: {error}"
        ))
    }
}

/// What one training task trains: a role's model from scratch, or a finetuning from a
/// checkpoint.
#[derive(Debug, Clone)]
struct TrainSetup {
    /// `teacher`, `student` or `finetune`, for messages and logs.
    name: &'static str,
    round: u32,
    train_plan: TrainPlan,
    model: ModelConfig,
    randaugment: RandAugmentPlan,
    init: Option<PathBuf>,
    seed_offset: i64,
}

impl TrainSetup {
    /// A Noisy Student role (teacher or student) of `round`.
    fn for_role(
        plan: &Plan,
        dataset: &Dataset,
        role: Role,
        round: u32,
    ) -> Result<TrainSetup, String> {
        let role_plan = plan.role(role);
        Ok(TrainSetup {
            name: role.as_str(),
            round,
            train_plan: role_plan
                .train
                .clone()
                .ok_or_else(|| format!("the plan has no {}.train section", role.as_str()))?,
            model: model_config(plan, role, round, dataset),
            randaugment: role_plan.noise.randaugment.clone(),
            init: None,
            seed_offset: role as i64,
        })
    }

    /// The finetuning of the Meta Pseudo Labels student: labeled images only, no noise.
    fn finetune(plan: &Plan, dataset: &Dataset, init: &Path) -> Result<TrainSetup, String> {
        let mpl = plan.mpl.as_ref().ok_or("the plan has no [mpl] section")?;
        let mut model = model_config(plan, Role::Student, 1, dataset);
        model.without_noise();
        Ok(TrainSetup {
            name: "finetune",
            round: 1,
            train_plan: mpl.finetune_train_plan(),
            model,
            randaugment: RandAugmentPlan::default(),
            init: Some(init.to_path_buf()),
            seed_offset: 17,
        })
    }
}

/// Trains a model as rank `group.rank` of a data-parallel group (DDP semantics: one
/// global batch per step, each rank a disjoint slice, gradients summed over ranks with the
/// loss normalised by the global batch; rank 0 writes the checkpoint).
fn train(
    plan: &Plan,
    dataset: &Dataset,
    setup: &TrainSetup,
    output: &Path,
    selection: Option<&Path>,
    group: &mut Group,
    progress: &mut dyn FnMut(Progress),
) -> Result<Outcome, TaskError> {
    let train_plan = &setup.train_plan;
    let (name, round) = (setup.name, setup.round);
    // Wrapping: any u64 seed is valid; the usual ones give the same numbers as plain arithmetic.
    let seed = (plan.seed as i64)
        .wrapping_mul(1_000_003)
        .wrapping_add(round as i64 * 101 + setup.seed_offset);
    let (rank, world_size) = (group.rank, group.world_size);
    let labeled_batch = train_plan.batch_size as usize;
    let unlabeled_batch = labeled_batch * train_plan.unlabeled_ratio as usize;
    if labeled_batch < world_size {
        let field = match name {
            "finetune" => "mpl.finetune".to_string(),
            role => format!("{role}.train"),
        };
        return Err(format!(
            "{field}.batch_size ({labeled_batch}) is smaller than the group ({world_size} ranks)"
        )
        .into());
    }
    tch::manual_seed(seed);
    let classes = plan.data.classes as i64;
    let mut vs = nn::VarStore::new(dataset.device);
    let config = setup.model.clone();
    let model = build(&vs.root(), &config);
    if let Some(init) = &setup.init {
        load_exactly(&mut vs, init)
            .map_err(|e| format!("failed to load checkpoint `{}`: {e}", init.display()))?;
    }
    // The pseudo labels are read before the first collective, and the ranks then meet, each
    // saying whether its reading failed, under the time a task may go without progress
    // (`workers.progress_timeout_seconds`; the collective timeout where that is 0): ranks that
    // read at different speeds (a cold disk, a slower node) would otherwise fail the first
    // collective at its timeout, and a rank whose reading failed would leave the others
    // waiting out the meeting's.
    let pseudo =
        match selection {
            Some(path) => {
                let read = load_selection(plan, dataset, path, train_plan.label_smoothing);
                let limit = match plan.workers.progress_timeout_seconds {
                    0 => plan.workers.collective_timeout_seconds,
                    seconds => seconds,
                };
                let mut failed = [f64::from(u8::from(read.is_err()))];
                group
                    .meet_within(&mut failed, Duration::from_secs(limit))
                    .map_err(collective_error)?;
                match read {
                    Err(error) => return Err(error.into()),
                    Ok(_) if failed[0] > 0.0 => return Err(TaskError::Group(
                        "another rank failed to read the round's pseudo labels (its log says why)"
                            .into(),
                    )),
                    Ok(pseudo) => Some(pseudo),
                }
            }
            None => None,
        };
    let variables = vs.trainable_variables();
    group
        .broadcast_parameters(&variables)
        .map_err(collective_error)?;
    let mut optimizer = match train_plan.optimizer {
        Optimizer::Sgd => TrainOptimizer::Sgd(Sgd::new(
            &vs,
            train_plan.learning_rate,
            train_plan.momentum,
            train_plan.weight_decay,
            train_plan.momentum > 0.0,
        )?),
        Optimizer::Adam => TrainOptimizer::Adam(Adam::new(
            &vs,
            train_plan.learning_rate,
            train_plan.weight_decay,
        )?),
    };
    let resume_path = resume::resume_path(output);
    let identity = match train_plan.checkpoint_every {
        0 => None,
        _ => Some(training_identity(plan, setup, selection)),
    };
    let first_step = match &identity {
        Some(identity) => resume_training(&resume_path, &vs, &mut optimizer, identity, group)?,
        None => 0,
    };
    let identity = identity.and_then(Result::ok);
    if first_step > 0 {
        tracing::info!(
            role = name,
            round,
            rank,
            step = first_step,
            total = train_plan.steps,
            checkpoint = %resume_path.display(),
            "the training resumes from its save"
        );
    }
    let mut saver = BackgroundSaver::default();
    let randaugment = RandAugment::from_plan(&setup.randaugment);
    let augment = |images: Tensor| -> Tensor {
        let images = if train_plan.flip_and_shift {
            flip_and_shift(&images)
        } else {
            images
        };
        dataset.model_input(&randaugment.apply(&images), config.resolution)
    };
    let (labeled_start, labeled_end) = chunk_bounds(labeled_batch, world_size, rank);
    let (unlabeled_start, unlabeled_end) = chunk_bounds(unlabeled_batch, world_size, rank);
    let labeled_count = dataset.labeled.size()[0];
    let device = dataset.device;
    let global_batch = labeled_batch as f64;
    let started = Instant::now();
    let mut window_started = Instant::now();
    // Loss and correct labeled predictions (this rank's share) since the last report.
    let mut window = Window::default();
    let images_per_step =
        (labeled_batch + if pseudo.is_some() { unlabeled_batch } else { 0 }) as f64;
    let mut last_loss = f64::NAN;
    for step in first_step..train_plan.steps {
        // Each step's batch (the same on every rank: `sampler`) and noise (per rank) come from
        // seeds of its own: a resumed training draws what the one that did not stop drew.
        let step_seed = seed.wrapping_add(104_729i64.wrapping_mul(step as i64));
        let mut sampler = StdRng::seed_from_u64(step_seed as u64);
        tch::manual_seed(step_seed.wrapping_add(7919 * rank as i64));
        optimizer.set_lr(learning_rate(train_plan, step));
        let picks: Vec<i64> = (0..labeled_batch)
            .map(|_| sampler.gen_range(0..labeled_count))
            .collect();
        let picks = upload(&picks[labeled_start..labeled_end], device);
        let positions = dataset.labeled.index_select(0, &picks);
        let labels = dataset.train_labels.index_select(0, &positions);
        let labeled_images = augment(dataset.train_batch(&positions));
        let labeled_targets = smoothed_one_hot(&labels, classes, train_plan.label_smoothing);
        let labeled_rows = (labeled_end - labeled_start) as i64;
        let (loss, logits_labeled) = match &pseudo {
            None => {
                let logits = model.forward_t(&labeled_images, true);
                (
                    soft_cross_entropy_sum(&logits, &labeled_targets) / global_batch,
                    logits,
                )
            }
            Some(pseudo) => {
                let count = pseudo.len();
                let rows: Vec<i64> = (0..unlabeled_batch)
                    .map(|_| sampler.gen_range(0..count))
                    .collect();
                let rows = upload(&rows[unlabeled_start..unlabeled_end], device);
                let unlabeled_images = augment(pseudo.images(&rows));
                let targets = pseudo.targets(&rows);
                let logits =
                    model.forward_t(&Tensor::cat(&[&labeled_images, &unlabeled_images], 0), true);
                let labeled_logits = logits.narrow(0, 0, labeled_rows);
                let unlabeled_logits =
                    logits.narrow(0, labeled_rows, (unlabeled_end - unlabeled_start) as i64);
                // CE(labeled) + ratio * mean CE(unlabeled), over the global batch.
                let loss = (soft_cross_entropy_sum(&labeled_logits, &labeled_targets)
                    + soft_cross_entropy_sum(&unlabeled_logits, &targets))
                    / global_batch;
                (loss, labeled_logits)
            }
        };
        optimizer.zero_grad();
        loss.backward();
        group
            .all_reduce_gradients(&variables)
            .map_err(collective_error)?;
        optimizer.step();
        window.add(&Tensor::stack(
            &[
                loss.detach(),
                logits_labeled
                    .argmax(-1, false)
                    .eq_tensor(&labels)
                    .to_kind(Kind::Float)
                    .sum(Kind::Float),
            ],
            0,
        ));
        if window.steps() == train_plan.log_every || step + 1 == train_plan.steps {
            let steps_in_window = window.steps();
            let mut sums = window.read();
            window.clear();
            group
                .all_reduce_scalars(&mut sums)
                .map_err(collective_error)?;
            if !sums[0].is_finite() {
                return Err(format!(
                    "{name} training diverged between steps {} and {} (mean loss {}); lower its learning rate",
                    step + 1 - steps_in_window,
                    step + 1,
                    sums[0] / steps_in_window as f64
                )
                .into());
            }
            last_loss = sums[0] / steps_in_window as f64;
            let seconds = window_started.elapsed().as_secs_f64().max(1e-9);
            let report = Progress {
                step: step + 1,
                total_steps: train_plan.steps,
                loss: Some(last_loss),
                accuracy: Some(sums[1] / (steps_in_window * labeled_batch as u64) as f64),
                images_per_second: steps_in_window as f64 * images_per_step / seconds,
                // Status says when an attempt went on from a save.
                metrics: match first_step {
                    0 => Vec::new(),
                    step => vec![("resumed_from_step".to_string(), step as f64)],
                },
            };
            tracing::info!(
                role = name,
                round,
                rank,
                world_size,
                step = report.step,
                total = report.total_steps,
                loss = format!("{last_loss:.4}"),
                labeled_accuracy = format!("{:.3}", report.accuracy.unwrap_or(f64::NAN)),
                images_per_second = format!("{:.0}", report.images_per_second),
                "training"
            );
            progress(report);
            window_started = Instant::now();
        }
        if let Some(identity) = &identity {
            if (step + 1) % train_plan.checkpoint_every == 0 && step + 1 < train_plan.steps {
                // What is saved holds the mean of the ranks' batch-norm statistics, which every
                // rank then goes on from, resumed or not.
                group
                    .average_buffers(&buffers(&vs))
                    .map_err(collective_error)?;
                // A save that fails (a full disk, say) costs what it would have kept, not the
                // training: it goes on, and says so (and the next save is tried all the same).
                if rank == 0 {
                    let tensors = resume::tensors(&vs, &optimizer, identity, step + 1);
                    saver.save_or_warn(tensors, &resume_path);
                }
            }
        }
    }
    // Each rank's batch-norm statistics saw its own slice of every batch: the saved model holds
    // their mean, the statistics of the global batches.
    group
        .average_buffers(&buffers(&vs))
        .map_err(collective_error)?;
    if rank == 0 {
        saver.finish_or_warn();
        // The coordinator removes the resume save once it takes this model: until then a
        // next attempt (this one's result lost) resumes from it.
        save_checkpoint(&vs, output)?;
    }
    Ok(Outcome::Trained {
        checkpoint: output.to_path_buf(),
        final_loss: last_loss,
        steps: train_plan.steps,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The identity of the training `setup` (see [`resume::Identity`]): the plan (in TOML, as the
/// run records it) without what a resumed run may change (the workers, the lease, where the
/// data and the given teacher are) or what does not shape a training (how often it reports
/// and saves), which training of the run it is (role or finetune, round), and the digests of
/// the checkpoint it starts from and of the pseudo labels it learns from (their selection file
/// but the store's place, which a moved run rewrites: `pseudo_labels.storage` is left out too).
fn training_identity(
    plan: &Plan,
    setup: &TrainSetup,
    selection: Option<&Path>,
) -> Result<resume::Identity, String> {
    let mut shaping = plan.clone();
    shaping.workers = Default::default();
    shaping.pseudo_labels.lease_seconds = Default::default();
    shaping.data.dir = PathBuf::new();
    shaping.data.unlabeled.path = None;
    shaping.teacher.checkpoint = None;
    for role in [&mut shaping.teacher, &mut shaping.student] {
        if let Some(train) = role.train.as_mut() {
            train.log_every = 1;
            train.checkpoint_every = 1;
        }
    }
    if let Some(mpl) = shaping.mpl.as_mut() {
        mpl.log_every = 1;
        mpl.eval_every = 0;
        mpl.checkpoint_every = 1;
    }
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| format!("failed to read `{}`: {e}", path.display()))
    };
    let init = match &setup.init {
        Some(path) => mentor_labels::sha256_file(path)
            .map_err(|e| format!("failed to read `{}`: {e}", path.display()))?,
        None => String::new(),
    };
    let pseudo_labels = match selection {
        Some(path) => {
            let mut value: serde_json::Value = serde_json::from_slice(&read(path)?)
                .map_err(|e| format!("selection `{}`: {e}", path.display()))?;
            if let Some(fields) = value.as_object_mut() {
                fields.remove("storage");
            }
            value.to_string()
        }
        None => String::new(),
    };
    let text = |shaping: &Plan| {
        format!(
            "{} round {}\n{}\ninit {init}\nselection {pseudo_labels}",
            setup.name,
            setup.round,
            shaping.to_toml_string()
        )
    };
    // Saves of builds before 2026-12-06 counted the store's place in.
    let earlier = text(&shaping);
    shaping.pseudo_labels.storage = None;
    Ok(resume::Identity::new(setup.train_plan.steps, &text(&shaping)).or_earlier(&earlier))
}

/// Loads the resume save at `path` into the model and the optimizer when it is this training's
/// (`identity`) and every rank of the group reads the same step: the step to go on from (0 when
/// there is no save; another training's is set aside).
fn resume_training(
    path: &Path,
    vs: &nn::VarStore,
    optimizer: &mut TrainOptimizer,
    identity: &Result<resume::Identity, String>,
    group: &mut Group,
) -> Result<u64, TaskError> {
    // What the training reads to know itself (see `training_identity`), then the save.
    let found = identity
        .clone()
        .and_then(|identity| resume::load(path, vs, optimizer, &identity).map_err(resume::damaged));
    resume::agree_on_resume(path, group, found)
}

/// Accuracy and mean cross-entropy of a model on the plan's test images (eval mode, no noise),
/// with a progress report every few batches (status shows it; the coordinator can stop it).
fn evaluate(
    plan: &Plan,
    dataset: &Dataset,
    source: &ModelSource,
    progress: &mut dyn FnMut(Progress),
) -> Result<Outcome, String> {
    let (_vs, model, config) = load_model(plan, dataset, source)?;
    let batch = (plan.pseudo_labels.batch_size as i64).max(1);
    let total = dataset.test_images.size()[0];
    let started = Instant::now();
    let (mut correct, mut loss, mut done) = (0.0, 0.0, 0i64);
    while done < total {
        let end = (done + EVALUATION_REPORT_BATCHES * batch).min(total);
        let (more_correct, more_loss) =
            test_counts(model.as_ref(), &config, dataset, batch, done..end);
        correct += more_correct;
        loss += more_loss;
        done = end;
        progress(Progress {
            step: done as u64,
            total_steps: total as u64,
            images_per_second: done as f64 / started.elapsed().as_secs_f64().max(1e-9),
            ..Default::default()
        });
    }
    let accuracy = correct / total.max(1) as f64;
    tracing::info!(
        role = source.role.as_str(),
        model_round = source.model_round,
        accuracy = format!("{accuracy:.4}"),
        "evaluated on the test set"
    );
    Ok(Outcome::Evaluated {
        accuracy,
        loss: loss / total.max(1) as f64,
        examples: total as u64,
    })
}

/// Batches an evaluation runs between two progress reports.
const EVALUATION_REPORT_BATCHES: i64 = 8;

/// Correct predictions and summed cross-entropy of a model on the test images `images` (eval
/// mode, no noise): the part of an evaluation one rank of a group does.
pub(crate) fn test_counts(
    model: &dyn ModuleT,
    config: &ModelConfig,
    dataset: &Dataset,
    batch: i64,
    images: std::ops::Range<i64>,
) -> (f64, f64) {
    let _guard = tch::no_grad_guard();
    let mut correct = 0.0;
    let mut loss = 0.0;
    let mut start = images.start;
    while start < images.end {
        let len = batch.max(1).min(images.end - start);
        let inputs = dataset.model_input(
            &to_unit(&dataset.test_images.narrow(0, start, len)),
            config.resolution,
        );
        let labels = dataset.test_labels.narrow(0, start, len);
        let logits = model.forward_t(&inputs, false);
        correct += logits
            .argmax(-1, false)
            .eq_tensor(&labels)
            .to_kind(Kind::Float)
            .sum(Kind::Float)
            .double_value(&[]);
        loss += logits.cross_entropy_for_logits(&labels).double_value(&[]) * len as f64;
        start += len;
    }
    (correct, loss)
}

/// Teacher inference over the unlabeled shard `[start, end)` (in units of the source), committed
/// as one soft-label shard. Images are decoded on CPU threads ahead of inference.
#[allow(clippy::too_many_arguments)]
fn label(
    plan: &Plan,
    dataset: &Dataset,
    teacher: &ModelSource,
    round: u32,
    shard_index: u32,
    (start, end): (u64, u64),
    storage: &str,
    previous_teachers: &[String],
    progress: &mut dyn FnMut(Progress),
) -> Result<Outcome, String> {
    let started = Instant::now();
    let store = ShardStore::open(storage).map_err(|e| e.to_string())?;
    let key = mentor_labels::shard_key(round, shard_index);
    let header = ShardHeader {
        round,
        teacher_checkpoint: teacher.checkpoint.display().to_string(),
        temperature: plan.pseudo_labels.temperature,
        classes: plan.data.classes,
    };
    // A shard committed by an earlier attempt is verified and reported, never written twice.
    // A store that cannot say (S3 answers 403 to a missing key without s3:ListBucket) is
    // labeled for: the exactly-once commit below finds a shard that exists.
    match store.exists(&key) {
        Ok(true) => return existing_shard(plan, &store, &key, &header, previous_teachers, started),
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(%error, key, "could not tell whether the shard exists; labeling it")
        }
    }
    let (_vs, model, config) = load_model(plan, dataset, teacher)?;
    let _guard = tch::no_grad_guard();
    let labels = {
        let plan_labels = &plan.pseudo_labels;
        // An image that does not decode (one truncated file among a million) is labeled NaN,
        // which no filter keeps, instead of failing the shard: removing the file would shift
        // every later id, which a run under way refuses.
        let options = DecodeOptions {
            skip_undecodable: true,
            ..DecodeOptions::from_plan(plan_labels, plan_labels.batch_size as usize)
        };
        let mut undecodable = 0usize;
        let batches = dataset
            .unlabeled
            .decode(start, end, dataset.geometry(), options)
            .map_err(|e| format!("shard {shard_index}: {e}"))?;
        let autocast = plan_labels.mixed_precision && dataset.device.is_cuda();
        let top_k = plan.top_k() as i64;
        let expected = dataset
            .unlabeled
            .known_examples()
            .map(|_| end - start)
            .unwrap_or(0);
        let mut ids: Vec<i64> = Vec::new();
        let mut class_ids: Vec<u16> = Vec::new();
        let mut probs: Vec<f32> = Vec::new();
        for batch in batches {
            let batch = batch.map_err(|e| format!("shard {shard_index}: {e}"))?;
            let count = batch.example_ids.len();
            let pixels = dataset.pixels_tensor(&batch.pixels, count);
            let images = dataset.model_input(&to_unit(&pixels), config.resolution);
            let logits = {
                let _autocast = autocast.then(|| crate::models::Autocast::float16(dataset.device));
                model.forward_t(&images, false)
            };
            let distribution =
                (logits.to_kind(Kind::Float) / plan_labels.temperature).softmax(-1, Kind::Float);
            let (values, indices) = distribution.topk(top_k, -1, true, true);
            let mut values =
                Vec::<f32>::try_from(values.to_device(tch::Device::Cpu).flatten(0, -1))
                    .map_err(|e| e.to_string())?;
            let indices = Vec::<i64>::try_from(indices.to_device(tch::Device::Cpu).flatten(0, -1))
                .map_err(|e| e.to_string())?;
            for (row, why) in &batch.undecodable {
                tracing::warn!(
                    shard = shard_index,
                    example_id = batch.example_ids[*row],
                    "labeled NaN (never selected): {why}"
                );
                let k = top_k as usize;
                values[row * k..(row + 1) * k].fill(f32::NAN);
                undecodable += 1;
            }
            probs.extend(values);
            class_ids.extend(indices.into_iter().map(|c| c as u16));
            ids.extend(batch.example_ids);
            progress(Progress {
                step: ids.len() as u64,
                total_steps: expected.max(ids.len() as u64),
                loss: None,
                accuracy: None,
                images_per_second: ids.len() as f64 / started.elapsed().as_secs_f64().max(1e-9),
                metrics: Vec::new(),
            });
        }
        if undecodable > 0 {
            tracing::warn!(shard = shard_index, undecodable, "images that did not decode were labeled NaN: the student never trains on them (a file of an image folder replaced in place under the same name is labeled by the next round; a repaired tar counts in a new run only)");
        }
        if expected > 0 && ids.len() as u64 != expected {
            return Err(format!(
                "shard {shard_index}: {} of its {expected} images were labeled (a decoding thread ended early?); nothing was committed",
                ids.len()
            ));
        }
        SoftLabels::new(top_k as usize, ids, class_ids, probs).map_err(|e| e.to_string())?
    };
    let histogram = shard_histogram(
        &labels,
        plan.data.classes as usize,
        plan.pseudo_labels.min_confidence as f32,
    );
    let bytes = encode_shard(&header, &labels).map_err(|e| e.to_string())?;
    match store.commit(&key, &bytes).map_err(|e| e.to_string())? {
        PutOutcome::Created => {
            tracing::info!(round, shard = shard_index, examples = labels.len(), location = %store.location(&key), "shard committed");
            Ok(Outcome::Labeled {
                key,
                examples: labels.len() as u64,
                sha256: mentor_labels::sha256_hex(&bytes),
                bytes: bytes.len() as u64,
                seconds: started.elapsed().as_secs_f64(),
                histogram,
            })
        }
        PutOutcome::AlreadyExists => {
            existing_shard(plan, &store, &key, &header, previous_teachers, started)
        }
    }
}

/// Whether a committed shard's `header` is the one a label task `expected`: the same round,
/// temperature and classes, and the same teacher. The shard of a run whose directory moved
/// since it was labelled (soft labels kept in the run directory, `storage`'s parent) names its
/// teacher by the old path: the teacher's place in the run directory decides then; a given
/// teacher the plan now names in another place was named by one of `previous_teachers`.
fn same_labels(
    header: &ShardHeader,
    expected: &ShardHeader,
    storage: &str,
    previous_teachers: &[String],
) -> bool {
    let teacher_aside = ShardHeader {
        teacher_checkpoint: expected.teacher_checkpoint.clone(),
        ..header.clone()
    };
    if teacher_aside != *expected {
        return false;
    }
    if header.teacher_checkpoint == expected.teacher_checkpoint
        || previous_teachers.contains(&header.teacher_checkpoint)
    {
        return true;
    }
    let Some(run_dir) = Path::new(storage).parent() else {
        return false;
    };
    Path::new(&expected.teacher_checkpoint)
        .strip_prefix(run_dir)
        .is_ok_and(|in_run| Path::new(&header.teacher_checkpoint).ends_with(in_run))
}

/// Reports a shard another attempt committed, after checking it is whole and is this round's
/// labels of this teacher.
fn existing_shard(
    plan: &Plan,
    store: &ShardStore,
    key: &str,
    expected: &ShardHeader,
    previous_teachers: &[String],
    started: Instant,
) -> Result<Outcome, String> {
    let bytes = store.get(key).map_err(|e| e.to_string())?;
    let (header, labels) = mentor_labels::decode_shard(key, &bytes).map_err(|e| {
        format!(
            "{e}; it is at `{}`: remove it and the shard is labelled again (by this task's next attempt, or after `coordinator --retry-failed`)",
            store.location(key)
        )
    })?;
    if !same_labels(&header, expected, store.root(), previous_teachers) {
        return Err(format!(
            "`{}` already exists but holds the labels of teacher `{}` (round {}, temperature {}), not of `{}` (round {}, temperature {}): use another pseudo_labels.storage or remove it",
            store.location(key),
            header.teacher_checkpoint,
            header.round,
            header.temperature,
            expected.teacher_checkpoint,
            expected.round,
            expected.temperature
        ));
    }
    tracing::info!(shard = key, "shard already committed, reusing it");
    Ok(Outcome::Labeled {
        key: key.to_string(),
        examples: labels.len() as u64,
        sha256: mentor_labels::sha256_hex(&bytes),
        bytes: bytes.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        histogram: shard_histogram(
            &labels,
            plan.data.classes as usize,
            plan.pseudo_labels.min_confidence as f32,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a group of two, each rank resumes from the same save; one rank that cannot read its
    /// save fails with its own error and the other with its group's (no rank is left waiting
    /// in a collective); ranks that see different saves both fail; another training's save is
    /// set aside by rank 0 and both start from step 0.
    #[test]
    fn the_ranks_of_a_group_resume_together_or_fail_together() {
        use crate::distributed::on_ring;
        use crate::optim::tests::small_cnn;
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = resume::Identity::new(100, "a training");
        // A save after 40 steps of `identity`.
        let good = dir.path().join("good.resume.safetensors");
        {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let _model = build(&vs.root(), &small_cnn());
            let optimizer =
                TrainOptimizer::Sgd(Sgd::new(&vs, 0.1, 0.9, 0.0, true).expect("optimizer"));
            write_safetensors_atomically(resume::tensors(&vs, &optimizer, &identity, 40), &good)
                .expect("save");
        }
        let damaged = dir.path().join("damaged.resume.safetensors");
        std::fs::write(&damaged, b"not a save").expect("write");
        let none = dir.path().join("none.resume.safetensors");
        let foreign = dir.path().join("foreign.resume.safetensors");
        std::fs::copy(&good, &foreign).expect("copy");
        let run = |paths: [PathBuf; 2], identity: resume::Identity| {
            on_ring(2, move |group| {
                let vs = nn::VarStore::new(tch::Device::Cpu);
                let _model = build(&vs.root(), &small_cnn());
                let mut optimizer =
                    TrainOptimizer::Sgd(Sgd::new(&vs, 0.1, 0.9, 0.0, true).expect("optimizer"));
                let path = &paths[group.rank];
                resume_training(path, &vs, &mut optimizer, &Ok(identity.clone()), group)
            })
        };
        let same = [good.clone(), good.clone()];
        assert_eq!(run(same, identity.clone()), vec![Ok(40), Ok(40)]);

        let answers = run([none.clone(), damaged.clone()], identity.clone());
        let own = answers[1].clone().expect_err("the damaged save's rank");
        let TaskError::Own(own) = own else {
            panic!("the damaged save's rank failed as its group: {own}")
        };
        assert!(
            own.contains("damaged.resume.safetensors") && own.contains("move it away"),
            "{own}"
        );
        let peer = answers[0].clone().expect_err("the other rank");
        assert!(peer.is_group_failure(), "{peer}");

        let answers = run([good.clone(), none.clone()], identity.clone());
        for answer in answers {
            let error = answer.expect_err("ranks at different steps");
            assert!(!error.is_group_failure(), "{error}");
            assert!(error.to_string().contains("shared file system"), "{error}");
        }

        let other = resume::Identity::new(100, "another training");
        let both = [foreign.clone(), foreign.clone()];
        assert_eq!(run(both, other), vec![Ok(0), Ok(0)]);
        assert!(!foreign.exists());
        assert!(dir
            .path()
            .join("foreign.resume.other-1.safetensors")
            .exists());
    }

    /// A checkpoint that cannot be put in its place leaves no half of itself behind, and what
    /// was there stays.
    #[test]
    fn a_checkpoint_that_cannot_be_published_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("student.safetensors");
        std::fs::create_dir(&output).expect("a directory in the way");
        let tensors = [(
            "w".to_string(),
            Tensor::ones([4], (Kind::Float, tch::Device::Cpu)),
        )];
        let error = write_safetensors_atomically(tensors, &output).expect_err("in the way");
        assert!(error.contains("failed to move checkpoint"), "{error}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("student.safetensors")]);
        assert!(output.is_dir());
    }

    /// A batch's targets made from the kept top-k are the dense distributions: soft ones are
    /// the renormalised probabilities at their classes, hard ones the smoothed one-hot of the
    /// first class.
    #[test]
    fn sparse_targets_make_the_dense_distributions_of_a_batch() {
        let class_ids = Tensor::from_slice(&[2i64, 0, 1, 3, 3, 2]).view([3, 2]);
        // Top-2 of a distribution: their mass is renormalised (0.6 + 0.2 -> 0.75 + 0.25).
        let probs = Tensor::from_slice(&[0.6f32, 0.2, 0.25, 0.25, 0.9, 0.1]).view([3, 2]);
        let soft = SparseTargets::new(class_ids.shallow_clone(), Some(probs), 4, 0.0);
        let picks = Tensor::from_slice(&[2i64, 0]);
        let dense = Vec::<f32>::try_from(soft.dense(&picks).flatten(0, -1)).expect("floats");
        let expected = [0.0f32, 0.0, 0.1, 0.9, 0.25, 0.0, 0.75, 0.0];
        for (got, want) in dense.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{dense:?}");
        }

        let hard = SparseTargets::new(class_ids, None, 4, 0.2);
        let dense = Vec::<f32>::try_from(hard.dense(&picks).flatten(0, -1)).expect("floats");
        let expected = [0.05f32, 0.05, 0.05, 0.85, 0.05, 0.05, 0.85, 0.05];
        for (got, want) in dense.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{dense:?}");
        }
    }

    fn cnn(width: u32, residual_blocks: u32) -> ModelConfig {
        ModelConfig {
            model: mentor_plan::ModelPlan::Cnn(mentor_plan::CnnPlan {
                width,
                residual_blocks,
                hidden: 16,
                width_growth_per_round: 0,
                batch_norm: true,
            }),
            classes: 10,
            channels: 1,
            resolution: 28,
            dropout: 0.0,
            last_survival: 1.0,
            precision: mentor_plan::Precision::Float32,
        }
    }

    #[test]
    fn a_checkpoint_loads_only_into_the_model_it_was_saved_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        let saved_vs = nn::VarStore::new(tch::Device::Cpu);
        let saved = build(&saved_vs.root(), &cnn(8, 1));
        save_checkpoint(&saved_vs, &path).expect("save");
        let images = Tensor::rand([4, 1, 28, 28], (Kind::Float, tch::Device::Cpu));
        let expected = saved.forward_t(&images, false);

        let mut same_vs = nn::VarStore::new(tch::Device::Cpu);
        let same = build(&same_vs.root(), &cnn(8, 1));
        load_exactly(&mut same_vs, &path).expect("the same model loads");
        assert!(same.forward_t(&images, false).equal(&expected));

        // Without the residual block libtorch would load the rest and run another model.
        let mut fewer_vs = nn::VarStore::new(tch::Device::Cpu);
        let _fewer = build(&fewer_vs.root(), &cnn(8, 0));
        let error = load_exactly(&mut fewer_vs, &path).expect_err("a smaller model");
        assert!(
            error.starts_with("it holds `") && error.contains("which the model does not have"),
            "{error}"
        );
        let mut more_vs = nn::VarStore::new(tch::Device::Cpu);
        let _more = build(&more_vs.root(), &cnn(8, 2));
        let error = load_exactly(&mut more_vs, &path).expect_err("a larger model");
        assert!(error.starts_with("it lacks the model's `"), "{error}");
        let mut wider_vs = nn::VarStore::new(tch::Device::Cpu);
        let _wider = build(&wider_vs.root(), &cnn(16, 1));
        let error = load_exactly(&mut wider_vs, &path).expect_err("a wider model");
        assert!(
            error.contains("in the checkpoint but") && error.contains("in the model"),
            "{error}"
        );
        let missing = load_exactly(&mut same_vs, &dir.path().join("missing.safetensors"));
        assert!(missing.is_err());
    }

    #[test]
    fn a_background_save_writes_the_tensors_as_they_were_when_handed_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resume.safetensors");
        let mut weights = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let mut saver = BackgroundSaver::default();
        saver
            .save([("w".to_string(), weights.shallow_clone())], &path)
            .expect("save");
        // The training goes on and changes the variable while the save is written.
        let _ = weights.fill_(7.0);
        saver.finish().expect("the save ends well");
        let saved = Tensor::read_safetensors(&path).expect("read back");
        assert_eq!(saved.len(), 1);
        assert_eq!(
            Vec::<f32>::try_from(&saved[0].1).expect("values"),
            [1.0, 2.0, 3.0]
        );
        // A save that fails says so at the next save (or at the end).
        let blocked = dir.path().join("a-file");
        std::fs::write(&blocked, b"not a directory").expect("write");
        saver
            .save(
                [("w".to_string(), weights)],
                &blocked.join("resume.safetensors"),
            )
            .expect("handed over");
        let error = saver.finish().expect_err("no directory to write in");
        assert!(error.contains("a-file"), "{error}");
    }

    #[test]
    fn a_half_precision_checkpoint_loads_into_the_plans_32_bit_model() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("exported.safetensors");
        let mut saved_vs = nn::VarStore::new(tch::Device::Cpu);
        let _saved = build(&saved_vs.root(), &cnn(8, 1));
        saved_vs.half();
        save_checkpoint(&saved_vs, &path).expect("save");
        let mut loaded_vs = nn::VarStore::new(tch::Device::Cpu);
        let loaded = build(&loaded_vs.root(), &cnn(8, 1));
        load_exactly(&mut loaded_vs, &path).expect("a half checkpoint loads");
        for (name, variable) in loaded_vs.variables() {
            assert_eq!(variable.kind(), Kind::Float, "`{name}`");
            let exported = &saved_vs.variables()[&name];
            assert!(variable.equal(&exported.to_kind(Kind::Float)), "`{name}`");
        }
        let images = Tensor::rand([2, 1, 28, 28], (Kind::Float, tch::Device::Cpu));
        let logits = loaded.forward_t(&images, false);
        assert_eq!(logits.size(), [2, 10]);
    }

    fn header(teacher: &str) -> ShardHeader {
        ShardHeader {
            round: 1,
            teacher_checkpoint: teacher.into(),
            temperature: 1.0,
            classes: 10,
        }
    }

    #[test]
    fn a_damaged_committed_shard_is_refused_naming_its_place_and_the_remedy() {
        let plan =
            Plan::from_toml_str(include_str!("../../../deploy/plans/tiny.toml")).expect("plan");
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().join("pseudo-labels");
        let store = ShardStore::open(&storage.display().to_string()).expect("store");
        let expected = header("/run/checkpoints/round-1-teacher.safetensors");
        let labels = SoftLabels::new(1, vec![0, 1], vec![3, 4], vec![0.9, 0.8]).expect("labels");
        let whole = encode_shard(&expected, &labels).expect("encode");
        let key = mentor_labels::shard_key(1, 0);
        // What a machine that went down mid-commit may leave: the name over a cut-short file.
        store
            .put_if_absent(&key, &whole[..whole.len() / 2])
            .expect("put");
        let error = existing_shard(&plan, &store, &key, &expected, &[], Instant::now())
            .expect_err("a damaged shard is refused");
        assert!(
            error.contains(&store.location(&key)) && error.contains("remove it"),
            "{error}"
        );
        // The whole shard, committed in its place, is reported.
        std::fs::remove_file(storage.join(&key)).expect("remove the damaged shard");
        store.put_if_absent(&key, &whole).expect("put");
        let reported = existing_shard(&plan, &store, &key, &expected, &[], Instant::now());
        assert!(
            matches!(reported, Ok(Outcome::Labeled { examples: 2, .. })),
            "{reported:?}"
        );
    }

    #[test]
    fn a_shard_of_a_moved_run_keeps_its_teacher_by_its_place_in_the_run() {
        let expected = header("/laptop/run/checkpoints/round-1-teacher.safetensors");
        let in_run = "/laptop/run/pseudo-labels";
        assert!(same_labels(&expected, &expected, in_run, &[]));
        // Labelled before the run directory moved from /gpu-machine/run.
        let moved = header("/gpu-machine/run/checkpoints/round-1-teacher.safetensors");
        assert!(same_labels(&moved, &expected, in_run, &[]));
        // Another teacher, round or temperature is refused, and so is any other path when the
        // soft labels live outside the run directory (a store shared between runs).
        let other = header("/gpu-machine/run/checkpoints/round-2-teacher.safetensors");
        assert!(!same_labels(&other, &expected, in_run, &[]));
        let round_2 = ShardHeader {
            round: 2,
            ..moved.clone()
        };
        assert!(!same_labels(&round_2, &expected, in_run, &[]));
        let hotter = ShardHeader {
            temperature: 2.0,
            ..expected.clone()
        };
        assert!(!same_labels(&hotter, &expected, in_run, &[]));
        assert!(!same_labels(&moved, &expected, "/shared/labels", &[]));
        assert!(!same_labels(&moved, &expected, "s3://bucket/labels", &[]));
        // A given teacher the plan now names in another place: its old place is accepted, and
        // only it.
        let given = header("/models/teacher.safetensors");
        let before = header("/old-disk/teacher.safetensors");
        let previous = ["/old-disk/teacher.safetensors".to_string()];
        assert!(same_labels(&before, &given, "/shared/labels", &previous));
        assert!(!same_labels(&before, &given, "/shared/labels", &[]));
        let unrelated = header("/elsewhere/teacher.safetensors");
        assert!(!same_labels(
            &unrelated,
            &given,
            "/shared/labels",
            &previous
        ));
    }
}
