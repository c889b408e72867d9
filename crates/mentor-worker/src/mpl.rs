//! The Meta Pseudo Labels step (ALGORITHMS.md section 2): teacher and student trained together,
//! one step each per batch, on one rank of a data-parallel [`Group`].
//!
//! The teacher sees `cat(x_l, x_uw, x_us)`; its UDA loss uses the weak view's sharpened
//! distribution on the strong view; ONE pseudo label `y_hat = argmax T(x_us)` is used both for
//! the student's step and in the teacher's MPL term, weighted by `h`, the change of the
//! student's loss on the labeled batch. `h` is computed on the **global** labeled batch (sums
//! all-reduced over ranks), and every loss is normalised by global batch sizes, so W ranks take
//! exactly the step one rank takes on the whole batch. [`train_mpl`] runs the whole schedule,
//! saving everything a step carries to the next every `mpl.checkpoint_every` steps so that a
//! stopped task resumes where it was (each step draws its batch and its randomness from seeds
//! of its own, so the resumed run is the run that did not stop).

use std::path::{Path, PathBuf};
use std::time::Instant;

use mentor_collective::{chunk_bounds, CollectiveError};
pub use mentor_plan::{MplFeedback, MplSign};
use mentor_plan::{MplPlan, Plan, Role, Schedule, TrainPlan};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

use crate::augment::{flip_and_shift, RandAugment};
use crate::dataset::{upload, Dataset};
use crate::distributed::{buffers, Group};
use crate::models::build;
use crate::optim::Sgd;
use crate::resume::{self, Loaded};
use crate::tasks::{
    collective_error, learning_rate, model_config, save_checkpoint, test_counts, BackgroundSaver,
    Outcome, Progress, TaskError,
};
use crate::window::Window;

/// Knobs of the step.
#[derive(Debug, Clone, PartialEq)]
pub struct MplConfig {
    pub classes: i64,
    pub label_smoothing: f64,
    pub uda_threshold: f64,
    pub uda_temperature: f64,
    pub lambda_u: f64,
    pub uda_steps: u64,
    pub mpl_weight: f64,
    pub sign: MplSign,
    /// Decay of the moving-average baseline subtracted from `h` (0 = no baseline).
    pub baseline_decay: f64,
    /// How the student's labeled losses before and after its step are measured.
    pub feedback: MplFeedback,
}

/// This rank's slice of one global batch, already augmented and normalised.
#[derive(Debug)]
pub struct MplBatch {
    pub labeled: Tensor,
    pub labels: Tensor,
    pub weak: Tensor,
    pub strong: Tensor,
    /// The labeled and strong views at the student's input resolution when it differs from
    /// the teacher's (`None`: the student sees `labeled` and `strong`).
    pub student_views: Option<(Tensor, Tensor)>,
    /// Sizes of the global batch (all ranks together).
    pub global_labeled: usize,
    pub global_unlabeled: usize,
}

/// What carries over from step to step.
#[derive(Debug)]
pub struct MplState {
    pub step: u64,
    /// The moving-average baseline of `h`: a one-element f64 tensor that moves to the models'
    /// device at the first step and is read back only when saved.
    baseline: Tensor,
}

impl Default for MplState {
    fn default() -> MplState {
        MplState {
            step: 0,
            baseline: Tensor::from(0f64),
        }
    }
}

impl MplState {
    pub fn baseline(&self) -> f64 {
        self.baseline.double_value(&[])
    }

    pub fn set_baseline(&mut self, baseline: f64) {
        self.baseline = Tensor::from(baseline);
    }
}

/// Global statistics of one step, the same on every rank.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MplStats {
    pub h: f64,
    pub mask_rate: f64,
    pub teacher_labeled_loss: f64,
    pub student_labeled_loss: f64,
    /// The UDA term of the teacher's loss: `lambda_u * ramp * consistency loss`.
    pub teacher_uda_term: f64,
    /// The size of the MPL term of the teacher's loss: `|mpl_weight * h| * CE(strong, pseudo)`
    /// (its sign follows h, whose mean the baseline keeps near 0).
    pub teacher_mpl_term: f64,
}

impl MplStats {
    /// From `[h, mask_rate, teacher_labeled_loss, student_labeled_loss, teacher_uda_term,
    /// teacher_mpl_term]`, each divided by `steps` (missing values are NaN).
    fn from_sums(values: &[f64], steps: u64) -> MplStats {
        let value = |index: usize| values.get(index).copied().unwrap_or(f64::NAN) / steps as f64;
        MplStats {
            h: value(0),
            mask_rate: value(1),
            teacher_labeled_loss: value(2),
            student_labeled_loss: value(3),
            teacher_uda_term: value(4),
            teacher_mpl_term: value(5),
        }
    }
}

/// [`MplStats`] of one step as a tensor `[h, mask_rate, teacher_labeled_loss,
/// student_labeled_loss, teacher_uda_term, teacher_mpl_term]` (f64) on the models' device: the
/// step never reads anything back from a GPU; the training loop sums them in a [`Window`] and
/// reads that when it reports.
#[derive(Debug)]
pub struct StepStats(Tensor);

impl StepStats {
    /// The values (waits for the device).
    pub fn read(&self) -> MplStats {
        MplStats::from_sums(&crate::window::read_f64(&self.0), 1)
    }
}

/// One side of the step: a model, its variables and its optimizer.
pub struct Learner<'a> {
    pub model: &'a dyn ModuleT,
    pub variables: &'a [Tensor],
    pub optimizer: &'a mut Sgd,
}

impl std::fmt::Debug for Learner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learner")
            .field("variables", &self.variables.len())
            .finish()
    }
}

fn smoothed(labels: &Tensor, classes: i64, smoothing: f64) -> Tensor {
    labels.one_hot(classes).to_kind(Kind::Float) * (1.0 - smoothing) + smoothing / classes as f64
}

/// Sum over rows of the cross-entropy against target distributions.
fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Tensor {
    -(targets * logits.log_softmax(-1, Kind::Float)).sum(Kind::Float)
}

/// One Meta Pseudo Labels step for teacher and student on this rank's slice; `student_learns`
/// is false while the student waits (its step is skipped, `h` is zero). Everything stays on
/// the models' device: `h` weighs the teacher's loss as a tensor.
pub fn mpl_step(
    teacher: &mut Learner<'_>,
    student: &mut Learner<'_>,
    group: &mut Group,
    batch: &MplBatch,
    config: &MplConfig,
    state: &mut MplState,
    student_learns: bool,
) -> Result<StepStats, CollectiveError> {
    let classes = config.classes;
    let labeled_rows = batch.labeled.size()[0];
    let unlabeled_rows = batch.weak.size()[0];
    let global_labeled = batch.global_labeled as f64;
    let global_unlabeled = batch.global_unlabeled as f64;

    // Teacher forward on all three views.
    let t_logits = teacher.model.forward_t(
        &Tensor::cat(&[&batch.labeled, &batch.weak, &batch.strong], 0),
        true,
    );
    let t_labeled = t_logits.narrow(0, 0, labeled_rows);
    let t_weak = t_logits.narrow(0, labeled_rows, unlabeled_rows);
    let t_strong = t_logits.narrow(0, labeled_rows + unlabeled_rows, unlabeled_rows);
    let t_loss_labeled = cross_entropy_sum(
        &t_labeled,
        &smoothed(&batch.labels, classes, config.label_smoothing),
    ) / global_labeled;
    let q = (t_weak.detach() / config.uda_temperature).softmax(-1, Kind::Float);
    let mask = q
        .amax(-1, false)
        .ge(config.uda_threshold)
        .to_kind(Kind::Float);
    let per_example =
        -(&q * t_strong.log_softmax(-1, Kind::Float)).sum_dim_intlist(-1, false, Kind::Float);
    let t_loss_uda = (per_example * &mask).sum(Kind::Float) / global_unlabeled;
    let pseudo = t_strong.detach().argmax(-1, false);
    let t_loss_mpl =
        cross_entropy_sum(&t_strong, &smoothed(&pseudo, classes, 0.0)) / global_unlabeled;

    // Student step on the pseudo label, with its labeled loss before and after.
    let (student_labeled, student_strong) = match &batch.student_views {
        Some((labeled, strong)) => (labeled, strong),
        None => (&batch.labeled, &batch.strong),
    };
    let s_logits = student
        .model
        .forward_t(&Tensor::cat(&[student_labeled, student_strong], 0), true);
    let s_labeled = s_logits.narrow(0, 0, labeled_rows);
    let s_strong = s_logits.narrow(0, labeled_rows, unlabeled_rows);
    let hard_labels = smoothed(&batch.labels, classes, 0.0);
    // The student's labeled loss in evaluation mode, for `feedback = "eval"`: measured after
    // the training forward (whose batch-norm running statistics it uses) and around the step.
    let eval_labeled_loss = || {
        tch::no_grad(|| {
            let logits = student.model.forward_t(student_labeled, false);
            cross_entropy_sum(&logits, &hard_labels)
        })
    };
    let s_old = match config.feedback {
        MplFeedback::Train => cross_entropy_sum(&s_labeled.detach(), &hard_labels),
        MplFeedback::Eval => eval_labeled_loss(),
    };
    let s_loss = cross_entropy_sum(
        &s_strong,
        &smoothed(&pseudo, classes, config.label_smoothing),
    ) / global_unlabeled;
    student.optimizer.zero_grad();
    s_loss.backward();
    group.all_reduce_gradients(student.variables)?;
    if student_learns {
        student.optimizer.step();
    }
    let s_new = match config.feedback {
        MplFeedback::Train => tch::no_grad(|| {
            let logits = student.model.forward_t(student_labeled, true);
            cross_entropy_sum(&logits, &hard_labels)
        }),
        MplFeedback::Eval => eval_labeled_loss(),
    };
    // This rank's part of: the student's labeled loss sums before and after its step, the
    // mask count, the teacher's labeled, UDA and MPL cross-entropy losses (already over the
    // global batch).
    let sums = Tensor::stack(
        &[
            s_old,
            s_new,
            mask.sum(Kind::Float),
            t_loss_labeled.detach(),
            t_loss_uda.detach(),
            t_loss_mpl.detach(),
        ],
        0,
    );
    // Not waited for: the stream runs the reduction before anything reads `sums`, and the
    // teacher's gradient all-reduce below waits (with its watchdog) in this same step.
    let mut sums = sums.to_kind(Kind::Float);
    group.all_reduce_sum(&mut sums)?;
    let sums = sums.to_kind(Kind::Double);
    let (s_old, s_new) = (sums.get(0) / global_labeled, sums.get(1) / global_labeled);
    let mut h = if !student_learns {
        s_old.zeros_like()
    } else {
        match config.sign {
            MplSign::Theory => &s_old - &s_new,
            MplSign::Reference => &s_new - &s_old,
        }
    };
    if config.baseline_decay > 0.0 {
        state.baseline =
            &state.baseline * config.baseline_decay + &h * (1.0 - config.baseline_decay);
        h -= &state.baseline;
    }

    // Teacher step: labeled loss + ramped UDA + h-weighted cross-entropy on the same pseudo label.
    let ramp = if config.uda_steps == 0 {
        1.0
    } else {
        (state.step as f64 / config.uda_steps as f64).min(1.0)
    };
    let t_loss = t_loss_labeled
        + t_loss_uda * (config.lambda_u * ramp)
        + t_loss_mpl * (&h * config.mpl_weight).to_kind(Kind::Float);
    teacher.optimizer.zero_grad();
    t_loss.backward();
    group.all_reduce_gradients(teacher.variables)?;
    teacher.optimizer.step();
    state.step += 1;
    let uda_term = sums.get(4) * (config.lambda_u * ramp);
    let mpl_term = (&h * config.mpl_weight).abs() * sums.get(5);
    Ok(StepStats(Tensor::stack(
        &[
            h,
            sums.get(2) / global_unlabeled,
            sums.get(3),
            s_new,
            uda_term,
            mpl_term,
        ],
        0,
    )))
}

impl MplConfig {
    pub fn from_plan(mpl: &MplPlan, classes: u32) -> MplConfig {
        MplConfig {
            classes: classes as i64,
            label_smoothing: mpl.label_smoothing,
            uda_threshold: mpl.uda_threshold,
            uda_temperature: mpl.uda_temperature,
            lambda_u: mpl.lambda_u,
            uda_steps: mpl.uda_steps,
            mpl_weight: mpl.mpl_weight,
            sign: mpl.mpl_sign,
            baseline_decay: mpl.baseline_decay,
            feedback: mpl.feedback,
        }
    }
}

/// A cosine schedule with warmup at `rate` over the MPL steps.
fn schedule(mpl: &MplPlan, rate: f64) -> TrainPlan {
    TrainPlan {
        steps: mpl.steps,
        learning_rate: rate,
        warmup_steps: mpl.warmup_steps,
        schedule: Schedule::Cosine,
        ..mpl.finetune_train_plan()
    }
}

/// The student's learning rate at `step`: its warmup and cosine start when it stops waiting
/// (`mpl.student_wait_steps`, during which it does not step).
pub(crate) fn student_learning_rate(mpl: &MplPlan, step: u64) -> f64 {
    let Some(learning) = step.checked_sub(mpl.student_wait_steps) else {
        return 0.0;
    };
    let plan = TrainPlan {
        steps: mpl.steps.saturating_sub(mpl.student_wait_steps),
        ..schedule(mpl, mpl.student_learning_rate)
    };
    learning_rate(&plan, learning)
}

/// Draws this rank's slice of the global batches of the joint training: labeled `batch_size`
/// and unlabeled `mu * batch_size` images sampled with replacement, flipped and shifted (the
/// weak views), the strong views the plan's RandAugment makes of the weak ones, at the
/// teacher's and the student's input resolutions.
#[derive(Debug)]
pub struct BatchMaker {
    labeled_batch: usize,
    unlabeled_batch: usize,
    labeled_range: (usize, usize),
    unlabeled_range: (usize, usize),
    /// Training-set positions of the unlabeled images.
    unlabeled: Tensor,
    strong: RandAugment,
    teacher_resolution: i64,
    student_resolution: i64,
}

impl BatchMaker {
    pub fn new(
        plan: &Plan,
        dataset: &Dataset,
        rank: usize,
        world_size: usize,
    ) -> Result<BatchMaker, String> {
        let mpl = plan.mpl.as_ref().ok_or("the plan has no [mpl] section")?;
        let labeled_batch = mpl.batch_size as usize;
        let unlabeled_batch = labeled_batch * mpl.mu as usize;
        if labeled_batch < world_size {
            return Err(format!(
                "mpl.batch_size ({labeled_batch}) is smaller than the group ({world_size} ranks)"
            ));
        }
        let unlabeled: Vec<i64> = dataset.split.unlabeled.iter().map(|&p| p as i64).collect();
        if unlabeled.is_empty() {
            return Err("Meta Pseudo Labels needs unlabeled images; the split has none".into());
        }
        Ok(BatchMaker {
            labeled_batch,
            unlabeled_batch,
            labeled_range: chunk_bounds(labeled_batch, world_size, rank),
            unlabeled_range: chunk_bounds(unlabeled_batch, world_size, rank),
            unlabeled: Tensor::from_slice(&unlabeled).to_device(dataset.device),
            strong: RandAugment::from_plan(&mpl.randaugment),
            teacher_resolution: model_config(plan, Role::Teacher, 1, dataset).resolution,
            student_resolution: model_config(plan, Role::Student, 1, dataset).resolution,
        })
    }

    /// The next batch: the global batch's picks come from `sampler` (the same on every rank),
    /// the augmentations from libtorch's generator.
    pub fn draw(&self, dataset: &Dataset, sampler: &mut StdRng) -> MplBatch {
        let device = dataset.device;
        let labeled_count = dataset.labeled.size()[0];
        let unlabeled_count = self.unlabeled.size()[0];
        let picks: Vec<i64> = (0..self.labeled_batch)
            .map(|_| sampler.gen_range(0..labeled_count))
            .collect();
        let rows: Vec<i64> = (0..self.unlabeled_batch)
            .map(|_| sampler.gen_range(0..unlabeled_count))
            .collect();
        let (labeled_start, labeled_end) = self.labeled_range;
        let (unlabeled_start, unlabeled_end) = self.unlabeled_range;
        let picked = upload(
            &[
                &picks[labeled_start..labeled_end],
                &rows[unlabeled_start..unlabeled_end],
            ]
            .concat(),
            device,
        );
        let picks = picked.narrow(0, 0, (labeled_end - labeled_start) as i64);
        let rows = picked.narrow(
            0,
            (labeled_end - labeled_start) as i64,
            (unlabeled_end - unlabeled_start) as i64,
        );
        let positions = dataset.labeled.index_select(0, &picks);
        let labels = dataset.train_labels.index_select(0, &positions);
        let weak_pixels =
            flip_and_shift(&dataset.train_batch(&self.unlabeled.index_select(0, &rows)));
        let labeled_pixels = flip_and_shift(&dataset.train_batch(&positions));
        let strong_pixels = self.strong.apply(&weak_pixels);
        let (teacher, student) = (self.teacher_resolution, self.student_resolution);
        MplBatch {
            labeled: dataset.model_input(&labeled_pixels, teacher),
            labels,
            strong: dataset.model_input(&strong_pixels, teacher),
            weak: dataset.model_input(&weak_pixels, teacher),
            student_views: (student != teacher).then(|| {
                (
                    dataset.model_input(&labeled_pixels, student),
                    dataset.model_input(&strong_pixels, student),
                )
            }),
            global_labeled: self.labeled_batch,
            global_unlabeled: self.unlabeled_batch,
        }
    }
}

/// An exponential moving average of a model in another of the same architecture: the pairs of
/// variables of the same name (buffers such as batch-norm statistics included), matched once.
#[derive(Debug)]
pub struct Ema {
    pairs: Vec<(Tensor, Tensor)>,
}

impl Ema {
    pub fn new(ema: &nn::VarStore, model: &nn::VarStore) -> Ema {
        let source = model.variables();
        let mut pairs: Vec<(String, Tensor, Tensor)> = ema
            .variables()
            .into_iter()
            .filter_map(|(name, target)| {
                let value = source.get(&name)?.shallow_clone();
                Some((name, target, value))
            })
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        Ema {
            pairs: pairs
                .into_iter()
                .map(|(_, target, value)| (target, value))
                .collect(),
        }
    }

    /// `ema = decay * ema + (1 - decay) * model`: one kernel a floating-point variable.
    pub fn update(&mut self, decay: f64) {
        tch::no_grad(|| {
            for (target, value) in &mut self.pairs {
                if target.is_floating_point() {
                    let _ = target.lerp_(value, 1.0 - decay);
                } else {
                    let mixed = &*target * decay + &*value * (1.0 - decay);
                    target.copy_(&mixed);
                }
            }
        });
    }
}

/// The SGD of either side of the joint training at `rate` (Nesterov momentum when momentum is
/// set, weight decay on weights only).
pub fn sgd(vs: &nn::VarStore, mpl: &MplPlan, rate: f64) -> Result<Sgd, String> {
    Sgd::new(vs, rate, mpl.momentum, mpl.weight_decay, mpl.momentum > 0.0)
}

/// The joint training's resume checkpoint, beside the teacher's output.
pub fn resume_path(teacher_output: &Path) -> PathBuf {
    teacher_output.with_file_name("mpl-joint.resume.safetensors")
}

/// What the joint training carries from one step to the next: the models (batch-norm
/// statistics included), the optimizers' momentum buffers, the step and the baseline.
struct Carried<'a> {
    stores: Vec<(&'static str, &'a nn::VarStore)>,
    optimizers: Vec<(&'static str, &'a mut Sgd)>,
}

impl<'a> Carried<'a> {
    fn new(
        teacher: &'a nn::VarStore,
        student: &'a nn::VarStore,
        ema: Option<&'a nn::VarStore>,
        teacher_optimizer: &'a mut Sgd,
        student_optimizer: &'a mut Sgd,
    ) -> Carried<'a> {
        let mut stores = vec![("teacher", teacher), ("student", student)];
        stores.extend(ema.map(|ema| ("ema", ema)));
        Carried {
            stores,
            optimizers: vec![
                ("teacher_momentum", teacher_optimizer),
                ("student_momentum", student_optimizer),
            ],
        }
    }

    /// The checkpoint of the state after `state.step` steps of the joint training `identity`:
    /// named tensors (the models' variables themselves, not copies).
    fn tensors(
        &self,
        state: &MplState,
        identity: &Identity,
        evaluation: Option<Evaluation>,
    ) -> Vec<(String, Tensor)> {
        let [high, low] = resume::halves(identity.fingerprint);
        let mut tensors = vec![(
            "meta".to_string(),
            Tensor::from_slice(&[
                state.step as f64,
                identity.steps as f64,
                state.baseline(),
                high,
                low,
            ]),
        )];
        if let Some(evaluation) = evaluation {
            tensors.push(("evaluation".to_string(), evaluation.to_tensor()));
        }
        tensors.push((
            "plan".to_string(),
            Tensor::from_slice(identity.plan_text.as_bytes()),
        ));
        for (prefix, vs) in &self.stores {
            for (name, value) in vs.variables() {
                tensors.push((format!("{prefix}/{name}"), value));
            }
        }
        for (prefix, optimizer) in &self.optimizers {
            for (index, buffer) in optimizer.buffers().iter().enumerate() {
                if let Some(buffer) = buffer {
                    tensors.push((format!("{prefix}/{index}"), buffer.shallow_clone()));
                }
            }
        }
        tensors
    }

    /// Loads the checkpoint at `path`, if there is one, into the models, the optimizers, `state`
    /// and `evaluation` (the last one before the save, if the checkpoint records it); nothing
    /// when it was saved by another joint training than `identity`.
    fn load(
        &mut self,
        path: &Path,
        state: &mut MplState,
        evaluation: &mut Option<Evaluation>,
        identity: &Identity,
    ) -> Result<Loaded, String> {
        let error = |reason: String| format!("resume checkpoint `{}`: {reason}", path.display());
        let Some((saved, meta)) = resume::read(path, 5, "step, length, baseline and fingerprint")?
        else {
            return Ok(Loaded::Nothing);
        };
        let fingerprint = resume::from_halves(meta[3], meta[4]);
        let plan_text = saved
            .get("plan")
            .and_then(|plan| Vec::<u8>::try_from(plan).ok())
            .and_then(|bytes| String::from_utf8(bytes).ok());
        if !identity.matches(meta[1], fingerprint, plan_text.as_deref()) {
            return Ok(Loaded::Foreign);
        }
        for (prefix, vs) in &self.stores {
            resume::copy_variables(vs, &saved, prefix, error)?;
        }
        for (prefix, optimizer) in &mut self.optimizers {
            for index in 0..optimizer.buffers().len() {
                if let Some(buffer) = saved.get(&format!("{prefix}/{index}")) {
                    optimizer.set_buffer(index, buffer).map_err(error)?;
                }
            }
        }
        state.step = meta[0] as u64;
        state.set_baseline(meta[2]);
        // Saved by builds since 2026-12-05 only.
        *evaluation = saved.get("evaluation").and_then(Evaluation::from_tensor);
        Ok(Loaded::Step(state.step))
    }
}

/// The joint training's last evaluation on the test set: reported with every progress report
/// until the next one, and saved with the resume checkpoint, so that a resumed training (or a
/// restarted coordinator) shows it before its next evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Evaluation {
    /// Steps done when it was made.
    step: u64,
    teacher_accuracy: f64,
    student_accuracy: f64,
}

impl Evaluation {
    fn metrics(self) -> [(String, f64); 3] {
        [
            ("teacher_test_accuracy".to_string(), self.teacher_accuracy),
            ("student_test_accuracy".to_string(), self.student_accuracy),
            ("evaluation_step".to_string(), self.step as f64),
        ]
    }

    fn to_tensor(self) -> Tensor {
        Tensor::from_slice(&[
            self.step as f64,
            self.teacher_accuracy,
            self.student_accuracy,
        ])
    }

    fn from_tensor(tensor: &Tensor) -> Option<Evaluation> {
        match Vec::<f64>::try_from(tensor).ok()?.as_slice() {
            &[step, teacher_accuracy, student_accuracy] => Some(Evaluation {
                step: step as u64,
                teacher_accuracy,
                student_accuracy,
            }),
            _ => None,
        }
    }
}

/// Which joint training a resume checkpoint belongs to: its length and a fingerprint of the
/// plan's settings that shape it. A save records the plan itself as well: a later build reads
/// it again and fingerprints it as it does its own plan, so that a setting added since (with a
/// default that keeps what the save did) does not set the save aside as another training's.
#[derive(Debug, Clone, PartialEq)]
struct Identity {
    steps: u64,
    fingerprint: u64,
    /// The fingerprint as saves made before the data's folder was left out of it have it.
    located: u64,
    /// The fingerprint as saves made before `workers.progress_timeout_seconds` have it (they
    /// record no plan): that setting, though left out as its section is, was written.
    before_progress_timeout: u64,
    /// The plan, as saves record it.
    plan_text: String,
}

impl Identity {
    /// FNV-1a of the plan without what does not change the joint training (its finetune,
    /// logging, evaluation and checkpoint intervals, the workers, the folder the data is read
    /// from: a run moved to another machine resumes), so that a checkpoint left by another run
    /// in the same directory is never taken for this one.
    fn of(plan: &Plan) -> Identity {
        let mut shaping = plan.clone();
        if let Some(mpl) = shaping.mpl.as_mut() {
            mpl.finetune = Default::default();
            mpl.eval_every = 0;
            mpl.log_every = 1;
            mpl.checkpoint_every = 1;
        }
        shaping.workers = Default::default();
        let hash = resume::fingerprint;
        let without_progress_timeout = |text: String| {
            text.lines()
                .filter(|line| !line.starts_with("progress_timeout_seconds = "))
                .map(|line| format!("{line}\n"))
                .collect::<String>()
        };
        let located = hash(&without_progress_timeout(shaping.to_toml_string()));
        shaping.data.dir = PathBuf::new();
        // Where the unlabeled images are, not what they are (a resumed run may read them from
        // another place; the coordinator compares their listing). Saves that record their plan
        // are compared through this same function on both sides.
        shaping.data.unlabeled.path = None;
        let text = shaping.to_toml_string();
        Identity {
            steps: plan.mpl.as_ref().map_or(0, |mpl| mpl.steps),
            fingerprint: hash(&text),
            located,
            before_progress_timeout: hash(&without_progress_timeout(text)),
            plan_text: plan.to_toml_string(),
        }
    }

    /// Whether a save of `steps` steps with `fingerprint`, recording `plan_text` (saves since
    /// 2026-12-05), belongs to this joint training.
    fn matches(&self, steps: f64, fingerprint: u64, plan_text: Option<&str>) -> bool {
        if steps != self.steps as f64 {
            return false;
        }
        match plan_text {
            // Read as recorded, unchecked: a setting this build's checks refuse may have been
            // valid when it was saved (and a resume may change it). A plan this build cannot
            // read (a later build's settings) is another training's.
            Some(text) => Plan::from_recorded_toml(text)
                .is_ok_and(|saved| Identity::of(&saved).fingerprint == self.fingerprint),
            None => [self.fingerprint, self.located, self.before_progress_timeout]
                .contains(&fingerprint),
        }
    }
}

/// The Meta Pseudo Labels schedule on this rank: `mpl.steps` steps of [`mpl_step`] over global
/// batches (labeled `batch_size`, unlabeled `mu * batch_size`), EMA of the student, test
/// accuracies every `eval_every` steps; rank 0 writes the teacher and the student (its EMA
/// when enabled).
pub fn train_mpl(
    plan: &Plan,
    dataset: &Dataset,
    teacher_output: &Path,
    student_output: &Path,
    group: &mut Group,
    progress: &mut dyn FnMut(Progress),
) -> Result<Outcome, TaskError> {
    let mpl = plan.mpl.as_ref().ok_or("the plan has no [mpl] section")?;
    let (rank, world_size) = (group.rank, group.world_size);
    let labeled_batch = mpl.batch_size as usize;
    let unlabeled_batch = labeled_batch * mpl.mu as usize;
    let seed = (plan.seed as i64)
        .wrapping_mul(1_000_003)
        .wrapping_add(4242);
    tch::manual_seed(seed);
    let device = dataset.device;
    let teacher_config = model_config(plan, Role::Teacher, 1, dataset);
    let student_config = model_config(plan, Role::Student, 1, dataset);
    let teacher_vs = nn::VarStore::new(device);
    let teacher = build(&teacher_vs.root(), &teacher_config);
    let student_vs = nn::VarStore::new(device);
    let student = build(&student_vs.root(), &student_config);
    let teacher_variables = teacher_vs.trainable_variables();
    let student_variables = student_vs.trainable_variables();
    group
        .broadcast_parameters(&teacher_variables)
        .map_err(collective_error)?;
    group
        .broadcast_parameters(&student_variables)
        .map_err(collective_error)?;
    let ema = if mpl.ema > 0.0 {
        let mut ema_vs = nn::VarStore::new(device);
        let ema_model = build(&ema_vs.root(), &student_config);
        ema_vs
            .copy(&student_vs)
            .map_err(|e| format!("failed to copy the student: {e}"))?;
        Some((ema_vs, ema_model))
    } else {
        None
    };
    let mut averager = ema
        .as_ref()
        .map(|(ema_vs, _)| Ema::new(ema_vs, &student_vs));
    let mut teacher_optimizer = sgd(&teacher_vs, mpl, mpl.teacher_learning_rate)?;
    let mut student_optimizer = sgd(&student_vs, mpl, mpl.student_learning_rate)?;
    let mut statistics = vec![buffers(&teacher_vs), buffers(&student_vs)];
    statistics.extend(ema.as_ref().map(|(vs, _)| buffers(vs)));
    let teacher_schedule = schedule(mpl, mpl.teacher_learning_rate);
    let config = MplConfig::from_plan(mpl, plan.data.classes);
    let batches = BatchMaker::new(plan, dataset, rank, world_size)?;
    let mut state = MplState::default();
    let checkpoint = resume_path(teacher_output);
    let identity = Identity::of(plan);
    let mut saver = BackgroundSaver::default();
    let mut evaluation: Option<Evaluation> = None;
    if mpl.checkpoint_every > 0 {
        let found = Carried::new(
            &teacher_vs,
            &student_vs,
            ema.as_ref().map(|(vs, _)| vs),
            &mut teacher_optimizer,
            &mut student_optimizer,
        )
        .load(&checkpoint, &mut state, &mut evaluation, &identity)
        .map_err(resume::damaged);
        state.step = resume::agree_on_resume(&checkpoint, group, found)?;
        if state.step > 0 {
            tracing::info!(
                step = state.step,
                total = mpl.steps,
                checkpoint = %checkpoint.display(),
                "meta pseudo labels resumes its joint training"
            );
        }
    }
    let first_step = state.step;
    // Sums of the statistics since the last report, on the device; read when reported.
    let mut window = Window::default();
    let mut window_started = Instant::now();
    let started = Instant::now();
    let mut last: Option<StepStats> = None;
    for step in first_step..mpl.steps {
        // Each step's batch and randomness come from seeds of its own: a resumed run draws
        // what the uninterrupted run would have drawn.
        let step_seed = seed.wrapping_add(104_729 * step as i64);
        let mut sampler = StdRng::seed_from_u64(step_seed as u64);
        tch::manual_seed(step_seed.wrapping_add(7919 * rank as i64));
        teacher_optimizer.set_lr(learning_rate(&teacher_schedule, step));
        student_optimizer.set_lr(student_learning_rate(mpl, step));
        let batch = batches.draw(dataset, &mut sampler);
        let stats = mpl_step(
            &mut Learner {
                model: teacher.as_ref(),
                variables: &teacher_variables,
                optimizer: &mut teacher_optimizer,
            },
            &mut Learner {
                model: student.as_ref(),
                variables: &student_variables,
                optimizer: &mut student_optimizer,
            },
            group,
            &batch,
            &config,
            &mut state,
            step >= mpl.student_wait_steps,
        )
        .map_err(collective_error)?;
        if let Some(averager) = averager.as_mut() {
            averager.update(mpl.ema);
        }
        window.add(&stats.0);
        last = Some(stats);
        let done = step + 1 == mpl.steps;
        let checkpointing =
            mpl.checkpoint_every > 0 && ((step + 1) % mpl.checkpoint_every == 0 || done);
        let evaluating = mpl.eval_every > 0 && ((step + 1) % mpl.eval_every == 0 || done);
        let reporting = (step + 1) % mpl.log_every == 0 || done;
        // The losses are read where a report, a save or an evaluation waits for the device
        // anyway; a diverged run stops before it overwrites its last good save.
        let means = if reporting || checkpointing || evaluating {
            let means = MplStats::from_sums(&window.read(), window.steps());
            if !(means.teacher_labeled_loss.is_finite() && means.student_labeled_loss.is_finite()) {
                return Err(format!(
                    "Meta Pseudo Labels diverged between steps {} and {}; lower the learning rates",
                    step + 1 - window.steps(),
                    step + 1
                )
                .into());
            }
            Some(means)
        } else {
            None
        };
        if checkpointing || evaluating || done {
            // Batch-norm statistics are local to each rank: what is saved or evaluated holds
            // their mean (linear in them, the EMA's follow), the same on every rank.
            for buffers in &statistics {
                group.average_buffers(buffers).map_err(collective_error)?;
            }
        }
        if evaluating {
            // Each rank evaluates its slice of the test set; the counts are summed.
            let batch_size = plan.pseudo_labels.batch_size as i64;
            let evaluated = match &ema {
                Some((_, ema_model)) => ema_model.as_ref(),
                None => student.as_ref(),
            };
            let total = dataset.test_images.size()[0];
            let (start, end) = chunk_bounds(total as usize, world_size, rank);
            let images = start as i64..end as i64;
            let (teacher_correct, _) = test_counts(
                teacher.as_ref(),
                &teacher_config,
                dataset,
                batch_size,
                images.clone(),
            );
            let (student_correct, _) =
                test_counts(evaluated, &student_config, dataset, batch_size, images);
            let mut counts = [teacher_correct, student_correct];
            group
                .all_reduce_scalars(&mut counts)
                .map_err(collective_error)?;
            let teacher_accuracy = counts[0] / total.max(1) as f64;
            let student_accuracy = counts[1] / total.max(1) as f64;
            // Reported with every later progress report until the next evaluation: the step
            // says which one they are.
            evaluation = Some(Evaluation {
                step: step + 1,
                teacher_accuracy,
                student_accuracy,
            });
            tracing::info!(
                step = step + 1,
                teacher_accuracy = format!("{teacher_accuracy:.4}"),
                student_accuracy = format!("{student_accuracy:.4}"),
                "meta pseudo labels evaluation"
            );
        }
        if rank == 0 && checkpointing {
            // Copied now, written while the training goes on; after the evaluation of the
            // same step, which it records.
            let tensors = Carried::new(
                &teacher_vs,
                &student_vs,
                ema.as_ref().map(|(vs, _)| vs),
                &mut teacher_optimizer,
                &mut student_optimizer,
            )
            .tensors(&state, &identity, evaluation);
            // A save that fails (a full disk, say) costs what it would have kept, not the
            // training (nor the other ranks, which would wait for this one in a collective).
            saver.save_or_warn(tensors, &checkpoint);
        }
        if let (true, Some(means)) = (reporting, means) {
            let steps = window.steps() as f64;
            window.clear();
            let seconds = window_started.elapsed().as_secs_f64().max(1e-9);
            let mut metrics = vec![
                ("h".to_string(), means.h),
                ("uda_mask_rate".to_string(), means.mask_rate),
                (
                    "teacher_labeled_loss".to_string(),
                    means.teacher_labeled_loss,
                ),
                (
                    "student_labeled_loss".to_string(),
                    means.student_labeled_loss,
                ),
                ("teacher_uda_term".to_string(), means.teacher_uda_term),
                ("teacher_mpl_term".to_string(), means.teacher_mpl_term),
            ];
            metrics.extend(
                evaluation
                    .iter()
                    .flat_map(|evaluation| evaluation.metrics()),
            );
            if first_step > 0 {
                metrics.push(("resumed_from_step".to_string(), first_step as f64));
            }
            tracing::info!(
                step = step + 1,
                total = mpl.steps,
                rank,
                h = format!("{:.5}", means.h),
                uda_mask_rate = format!("{:.3}", means.mask_rate),
                teacher_labeled_loss = format!("{:.4}", means.teacher_labeled_loss),
                student_labeled_loss = format!("{:.4}", means.student_labeled_loss),
                teacher_uda_term = format!("{:.4}", means.teacher_uda_term),
                teacher_mpl_term = format!("{:.5}", means.teacher_mpl_term),
                "meta pseudo labels"
            );
            progress(Progress {
                step: step + 1,
                total_steps: mpl.steps,
                loss: Some(means.teacher_labeled_loss),
                accuracy: evaluation.map(|evaluation| evaluation.student_accuracy),
                images_per_second: (steps * (labeled_batch + 2 * unlabeled_batch) as f64) / seconds,
                metrics,
            });
            window_started = Instant::now();
        }
    }
    saver.finish_or_warn();
    if rank == 0 {
        save_checkpoint(&teacher_vs, teacher_output)?;
        match &ema {
            Some((ema_vs, _)) => save_checkpoint(ema_vs, student_output)?,
            None => save_checkpoint(&student_vs, student_output)?,
        }
    }
    Ok(Outcome::Trained {
        checkpoint: PathBuf::from(student_output),
        // Not known when the attempt resumed from the save of its last step (nothing left to run).
        final_loss: last.map_or(f64::NAN, |stats| stats.read().student_labeled_loss),
        steps: mpl.steps,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests;
