//! The Meta Pseudo Labels step (ALGORITHMS.md section 2): teacher and student trained together,
//! one step each per batch, on one rank of a data-parallel [`Group`].
//!
//! The teacher sees `cat(x_l, x_uw, x_us)`; its UDA loss uses the weak view's sharpened
//! distribution on the strong view; ONE pseudo label `y_hat = argmax T(x_us)` is used both for
//! the student's step and in the teacher's MPL term, weighted by `h`, the change of the
//! student's loss on the labeled batch. `h` is computed on the **global** labeled batch (sums
//! all-reduced over ranks), and every loss is normalised by global batch sizes, so W ranks take
//! exactly the step one rank takes on the whole batch. Not wired into plans and the coordinator
//! yet: this is the building block of the `meta-pseudo-labels` method.

use mentor_collective::CollectiveError;
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

use crate::distributed::Group;

/// Which sign `h` takes (ALGORITHMS.md: "Decision (sign)").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MplSign {
    /// `h = s_old - s_new`: positive when the pseudo label helped the student.
    Theory,
    /// `h = s_new - s_old`, as both reference codebases compute it.
    Reference,
}

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
}

/// This rank's slice of one global batch, already augmented and normalised.
#[derive(Debug)]
pub struct MplBatch {
    pub labeled: Tensor,
    pub labels: Tensor,
    pub weak: Tensor,
    pub strong: Tensor,
    /// Sizes of the global batch (all ranks together).
    pub global_labeled: usize,
    pub global_unlabeled: usize,
}

/// What carries over from step to step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MplState {
    pub step: u64,
    pub baseline: f64,
}

/// Global statistics of one step, the same on every rank.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MplStats {
    pub h: f64,
    pub mask_rate: f64,
    pub teacher_labeled_loss: f64,
    pub student_labeled_loss: f64,
}

/// One side of the step: a model, its variables and its optimizer.
pub struct Learner<'a> {
    pub model: &'a dyn ModuleT,
    pub variables: &'a [Tensor],
    pub optimizer: &'a mut nn::Optimizer,
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
/// is false while the student waits (its step is skipped, `h` is zero).
pub fn mpl_step(
    teacher: &mut Learner<'_>,
    student: &mut Learner<'_>,
    group: &mut Group,
    batch: &MplBatch,
    config: &MplConfig,
    state: &mut MplState,
    student_learns: bool,
) -> Result<MplStats, CollectiveError> {
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

    // Student step on the pseudo label, with its labeled loss before and after.
    let s_logits = student
        .model
        .forward_t(&Tensor::cat(&[&batch.labeled, &batch.strong], 0), true);
    let s_labeled = s_logits.narrow(0, 0, labeled_rows);
    let s_strong = s_logits.narrow(0, labeled_rows, unlabeled_rows);
    let hard_labels = smoothed(&batch.labels, classes, 0.0);
    let s_old = cross_entropy_sum(&s_labeled.detach(), &hard_labels).double_value(&[]);
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
    let s_new = tch::no_grad(|| {
        let logits = student.model.forward_t(&batch.labeled, true);
        cross_entropy_sum(&logits, &hard_labels).double_value(&[])
    });
    let teacher_labeled_sum = t_loss_labeled.double_value(&[]);
    let mut sums = [
        s_old,
        s_new,
        mask.sum(Kind::Float).double_value(&[]),
        teacher_labeled_sum,
    ];
    group.all_reduce_scalars(&mut sums)?;
    let (s_old, s_new) = (sums[0] / global_labeled, sums[1] / global_labeled);
    let mut h = if !student_learns {
        0.0
    } else {
        match config.sign {
            MplSign::Theory => s_old - s_new,
            MplSign::Reference => s_new - s_old,
        }
    };
    if config.baseline_decay > 0.0 {
        state.baseline = config.baseline_decay * state.baseline + (1.0 - config.baseline_decay) * h;
        h -= state.baseline;
    }

    // Teacher step: labeled loss + ramped UDA + h-weighted cross-entropy on the same pseudo label.
    let ramp = if config.uda_steps == 0 {
        1.0
    } else {
        (state.step as f64 / config.uda_steps as f64).min(1.0)
    };
    let t_loss_mpl =
        cross_entropy_sum(&t_strong, &smoothed(&pseudo, classes, 0.0)) / global_unlabeled;
    let t_loss = t_loss_labeled
        + t_loss_uda * (config.lambda_u * ramp)
        + t_loss_mpl * (config.mpl_weight * h);
    teacher.optimizer.zero_grad();
    t_loss.backward();
    group.all_reduce_gradients(teacher.variables)?;
    teacher.optimizer.step();
    state.step += 1;
    Ok(MplStats {
        h,
        mask_rate: sums[2] / global_unlabeled,
        teacher_labeled_loss: sums[3],
        student_labeled_loss: s_new,
    })
}

#[cfg(test)]
mod tests;
