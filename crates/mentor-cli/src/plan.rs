//! `mentor plan`: checks a plan and its data as a run would, and says what the run will do.
//!
//! The checks are the coordinator's and the workers' own: the plan's fields
//! ([`Plan::load`]), the IDX files the workers read, the labeled split of the seed, a given
//! teacher checkpoint (that it is safetensors) and the
//! unlabeled source with its shards. Nothing is written and no process is started.

use std::path::Path;

use anyhow::Context;
use mentor_data::PlanData;
use mentor_plan::{
    LabelMode, Method, ModelPlan, MplFeedback, NoisePlan, Optimizer, Plan, Precision,
    RandAugmentPlan, RolePlan, TrainPlan,
};

/// What the data of a plan holds, as the run will see it.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSummary {
    /// Side of the images (rows x columns).
    pub rows: usize,
    pub cols: usize,
    pub labeled: usize,
    /// Unlabeled examples; `None` where they are counted only when labeled (WebDataset tars).
    pub unlabeled: Option<u64>,
    /// Pseudo-label shards (labeling tasks per round).
    pub shards: usize,
    pub test: usize,
}

/// Reads and checks the plan at `path` and its data; for a `new_run`, also refuses settings that
/// would do nothing (a recorded run resumes with its plan as it was). Its `teacher.checkpoint`
/// is checked by [`check_teacher`], while a run needs it.
pub fn check(path: &Path, new_run: bool) -> anyhow::Result<(Plan, DataSummary)> {
    let plan = Plan::load(path)?;
    if new_run {
        plan.check_unused()
            .with_context(|| format!("plan `{}` (for a new run)", path.display()))?;
    }
    let data =
        check_data(&plan).with_context(|| format!("the data of plan `{}`", path.display()))?;
    check_storage(&plan).with_context(|| format!("plan `{}`", path.display()))?;
    Ok((plan, data))
}

/// The plan's `teacher.checkpoint`, when it gives one, is a checkpoint file.
pub fn check_teacher(path: &Path, plan: &Plan) -> anyhow::Result<()> {
    if let Some(checkpoint) = &plan.teacher.checkpoint {
        // What the coordinator checks when the run starts; that the tensors fit teacher.model
        // shows when a worker loads them (the first task: the teacher's evaluation).
        mentor_coordinator::checkpoint::tensor_count(checkpoint).map_err(|reason| {
            anyhow::anyhow!(
                "plan `{}`: teacher.checkpoint `{}`: {reason}",
                path.display(),
                checkpoint.display()
            )
        })?;
    }
    Ok(())
}

fn check_data(plan: &Plan) -> anyhow::Result<DataSummary> {
    // The workers load both sets whole: a file they would choke on fails here.
    let data = PlanData::load(&plan.data, plan.split_seed())?;
    plan.check_image_side(data.train.rows as u32)?;
    Ok(DataSummary {
        rows: data.train.rows,
        cols: data.train.cols,
        labeled: data.split.labeled.len(),
        unlabeled: data.unlabeled.known_examples(),
        shards: data.unlabeled.shards(plan.data.shard_size).len(),
        test: data.split.test_len,
    })
}

/// A local `pseudo_labels.storage` must be a directory the run can create: its nearest
/// existing ancestor is a directory this user may write in. (An object store is reached when
/// the run starts.)
fn check_storage(plan: &Plan) -> anyhow::Result<()> {
    let Some(location) = plan.pseudo_labels.local_storage() else {
        return Ok(());
    };
    let mut path = location;
    loop {
        match std::fs::metadata(path) {
            Ok(metadata) if metadata.is_dir() => {
                anyhow::ensure!(
                    writable(path),
                    "pseudo_labels.storage `{}`: `{}` is not writable by this user",
                    location.display(),
                    path.display()
                );
                return Ok(());
            }
            Ok(_) => anyhow::bail!(
                "pseudo_labels.storage `{}`: `{}` is not a directory",
                location.display(),
                path.display()
            ),
            Err(_) => match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => path = parent,
                // A relative path is created in the working directory.
                Some(_) => path = Path::new("."),
                None => return Ok(()),
            },
        }
    }
}

/// `59,000`.
pub(crate) fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Passes over `examples` that `images` drawn images make: `38`, `4.9`, `0.05`, `1,920`.
fn epochs(images: u64, examples: u64) -> String {
    let epochs = images as f64 / examples.max(1) as f64;
    if epochs >= 10.0 {
        thousands(epochs.round() as u64)
    } else if epochs >= 0.1 {
        format!("{epochs:.1}")
    } else {
        format!("{epochs:.2}")
    }
}

/// `1 op`, `2 ops`, `1,000 steps`.
fn count(value: u64, noun: &str) -> String {
    format!(
        "{} {noun}{}",
        thousands(value),
        if value == 1 { "" } else { "s" }
    )
}

/// A number as a plan writes it: `0.05`, `3e-5`, `15`.
fn number(value: f64) -> String {
    if value != 0.0 && value.abs() < 1e-3 {
        format!("{value:e}")
    } else {
        format!("{value}")
    }
}

/// `cnn (batch_norm true, hidden 128, residual_blocks 1, width 32)`: the model's settings as
/// the plan names them, its growth already applied.
fn model(model: &ModelPlan) -> String {
    let Ok(toml::Value::Table(table)) = toml::Value::try_from(model) else {
        return model.kind_name().to_string();
    };
    let settings: Vec<String> = table
        .iter()
        .filter(|(key, _)| *key != "kind" && !key.ends_with("_growth_per_round"))
        .map(|(key, value)| match value {
            toml::Value::String(text) => format!("{key} {text}"),
            toml::Value::Float(float) => format!("{key} {}", number(*float)),
            other => format!("{key} {other}"),
        })
        .collect();
    if settings.is_empty() {
        model.kind_name().to_string()
    } else {
        format!("{} ({})", model.kind_name(), settings.join(", "))
    }
}

/// The model and, where it differs from the data's, the side of the images it is fed.
fn model_at(model_plan: &ModelPlan, data: &DataSummary) -> String {
    let resolution = model_plan.input_resolution(data.rows as u32) as usize;
    if resolution == data.rows && data.rows == data.cols {
        model(model_plan)
    } else {
        format!("{} on {resolution}x{resolution} inputs", model(model_plan))
    }
}

/// The noise of a role in training (of `model`: stochastic depth needs residual blocks), or
/// `no noise`.
fn noise(noise: &NoisePlan, model: &ModelPlan) -> String {
    let mut parts = Vec::new();
    if noise.dropout > 0.0 {
        parts.push(format!("dropout {}", number(noise.dropout)));
    }
    if noise.stochastic_depth_survival < 1.0 && model.has_residual_blocks() {
        parts.push(format!(
            "stochastic depth (the last block survives with probability {})",
            number(noise.stochastic_depth_survival)
        ));
    }
    parts.extend(augmentation(&noise.randaugment));
    if parts.is_empty() {
        "no noise".to_string()
    } else {
        parts.join(", ")
    }
}

/// RandAugment and cutout, as parts of a list.
fn augmentation(augment: &RandAugmentPlan) -> Vec<String> {
    let mut parts = Vec::new();
    if augment.ops > 0 {
        // The data sets are IDX (one channel): `color` changes nothing there.
        let among = if augment.op_list.is_empty() {
            String::new()
        } else if augment.op_list.iter().any(|op| op == "color") {
            format!(
                " among {} (color does nothing on 1-channel images)",
                augment.op_list.join(", ")
            )
        } else {
            format!(" among {}", augment.op_list.join(", "))
        };
        parts.push(format!(
            "RandAugment {}{among} at magnitude {}",
            count(u64::from(augment.ops), "op"),
            number(augment.magnitude)
        ));
    }
    if augment.cutout > 0.0 {
        parts.push(format!("cutout {} of the side", number(augment.cutout)));
    }
    parts
}

fn precision(role: &RolePlan) -> &'static str {
    match role.precision {
        Precision::Float32 => "",
        Precision::Bfloat16 => ", in bfloat16",
    }
}

/// `600 steps of 64 labeled (38 epochs), sgd at 0.05, cosine after 50 warmup steps`.
/// `pseudo` is what the pseudo-labeled images are drawn from: how many, and its name.
fn schedule(train: &TrainPlan, labeled: u64, pseudo: Option<(u64, String)>) -> String {
    let images = train.steps * u64::from(train.batch_size);
    let mut text = format!(
        "{} of {} labeled",
        count(train.steps, "step"),
        thousands(u64::from(train.batch_size))
    );
    match pseudo {
        Some((examples, what)) if train.unlabeled_ratio > 0 => {
            let per_step = u64::from(train.batch_size) * u64::from(train.unlabeled_ratio);
            text.push_str(&format!(
                " + {} pseudo-labeled ({} epochs of the labels, {} of {what})",
                thousands(per_step),
                epochs(images, labeled),
                epochs(train.steps * per_step, examples)
            ));
        }
        _ => text.push_str(&format!(" ({} epochs)", epochs(images, labeled))),
    }
    let momentum = match train.optimizer {
        Optimizer::Sgd if train.momentum > 0.0 => {
            format!("Nesterov momentum {}, ", number(train.momentum))
        }
        Optimizer::Sgd => "no momentum, ".to_string(),
        Optimizer::Adam => String::new(),
    };
    text.push_str(&format!(
        ", {} at {} ({momentum}weight decay {}), {}",
        plan_name(&train.optimizer),
        number(train.learning_rate),
        number(train.weight_decay),
        plan_name(&train.schedule)
    ));
    if train.warmup_steps > 0 {
        text.push_str(&format!(
            " after {}",
            count(train.warmup_steps, "warmup step")
        ));
    }
    if train.label_smoothing > 0.0 {
        text.push_str(&format!(
            ", label smoothing {}",
            number(train.label_smoothing)
        ));
    }
    if !train.flip_and_shift {
        text.push_str(", no flips or shifts");
    }
    text.push_str(&format!(
        "; progress every {}",
        count(train.log_every, "step")
    ));
    if train.checkpoint_every == 0 {
        text.push_str(", no resume checkpoint (a stopped training starts over)");
    } else if train.checkpoint_every < train.steps {
        text.push_str(&format!(
            ", resume checkpoint every {}",
            count(train.checkpoint_every, "step")
        ));
    }
    text
}

/// The name a plan gives a unit enum variant (`sgd`, `cosine`).
fn plan_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "?".to_string(),
    }
}

/// What the run of `plan` will do, over `data`.
pub fn describe(plan: &Plan, data: &DataSummary) -> String {
    let labeled = data.labeled as u64;
    let mut out = String::new();
    let method = match plan.method {
        Method::NoisyStudent => format!("Noisy Student, {}", count(plan.rounds().into(), "round")),
        Method::MetaPseudoLabels => "Meta Pseudo Labels".to_string(),
    };
    out.push_str(&format!(
        "plan {}: {method}, seed {}\n",
        plan.name, plan.seed
    ));
    out.push_str(&format!(
        "data      {} ({}x{} images)\n",
        plan.data.dir.display(),
        data.rows,
        data.cols
    ));
    let unlabeled = match data.unlabeled {
        Some(examples) => thousands(examples),
        None => "uncounted (counted as they are labeled)".to_string(),
    };
    let source = match plan.data.unlabeled.path.as_ref() {
        Some(path) => format!(
            " from {} ({})",
            path.display(),
            plan.data.unlabeled.format.as_str()
        ),
        None => String::new(),
    };
    // Meta Pseudo Labels draws its unlabeled batches from the whole set: no shards.
    let shards = match plan.method {
        Method::NoisyStudent => format!(" in {}", count(data.shards as u64, "shard")),
        Method::MetaPseudoLabels => String::new(),
    };
    out.push_str(&format!(
        "          {} labeled ({} per class drawn with seed {}, {} classes), {unlabeled} unlabeled{source}{shards}, {} test images\n",
        thousands(labeled),
        thousands(plan.data.labeled_per_class.into()),
        plan.split_seed(),
        plan.data.classes,
        thousands(data.test as u64),
    ));
    match plan.method {
        Method::NoisyStudent => noisy_student(plan, data, &mut out),
        Method::MetaPseudoLabels => meta_pseudo_labels(plan, data, &mut out),
    }
    let workers = &plan.workers;
    let ranks = if workers.world_size == 0 {
        "every live worker of a device kind trains".to_string()
    } else if workers.world_size > workers.min_workers {
        format!(
            "{} train, so training waits for {} workers",
            count(workers.world_size.into(), "rank"),
            workers.world_size
        )
    } else {
        format!("{} train", count(workers.world_size.into(), "rank"))
    };
    out.push_str(&format!(
        "workers   the run starts when {} ha{} registered; {ranks} (collective {})\n",
        workers.min_workers,
        if workers.min_workers == 1 { "s" } else { "ve" },
        plan_name(&workers.collective)
    ));
    out
}

fn noisy_student(plan: &Plan, data: &DataSummary, out: &mut String) {
    let labeled = data.labeled as u64;
    let labels = &plan.pseudo_labels;
    let targets = match labels.mode {
        LabelMode::Soft => format!(
            "soft at temperature {}, top {}",
            number(labels.temperature),
            plan.top_k()
        ),
        LabelMode::Hard => "hard (the teacher's argmax, smoothed like the labels)".to_string(),
    };
    let balance = match (labels.balance, labels.per_class) {
        (false, _) => String::new(),
        (true, 0) => ", class-balanced".to_string(),
        (true, per_class) => format!(", balanced to {} per class", thousands(per_class)),
    };
    // What the student's pseudo-labeled images are drawn from.
    let pseudo = match (labels.balance, labels.per_class, data.unlabeled) {
        (true, per_class, _) if per_class > 0 => Some((
            per_class * u64::from(plan.data.classes),
            "the balanced selection".to_string(),
        )),
        (_, _, Some(examples)) => Some((examples, "the unlabeled images before filtering".into())),
        _ => None,
    };
    for round in 1..=plan.rounds() {
        let prefix = format!("round {round:<3}");
        if round == 1 {
            let teacher = plan.teacher.model.at_round(1);
            // Validation guarantees a teacher schedule or checkpoint for Noisy Student.
            if let Some(checkpoint) = &plan.teacher.checkpoint {
                out.push_str(&format!(
                    "{prefix} teacher  {}{}, read from `{}` (not trained)\n",
                    model_at(&teacher, data),
                    precision(&plan.teacher),
                    checkpoint.display()
                ));
            } else if let Some(train) = &plan.teacher.train {
                out.push_str(&format!(
                    "{prefix} teacher  {}{}, {}: {}\n",
                    model_at(&teacher, data),
                    precision(&plan.teacher),
                    noise(&plan.teacher.noise, &teacher),
                    schedule(train, labeled, None)
                ));
            }
        } else {
            out.push_str(&format!(
                "{prefix} teacher  round {}'s student\n",
                round - 1
            ));
        }
        out.push_str(&format!(
            "          labels   {targets}, dropped below confidence {}{balance}: {}\n",
            number(labels.min_confidence),
            count(data.shards as u64, "labeling task"),
        ));
        if let Some(train) = &plan.student.train {
            let student = plan.student.model.at_round(round);
            out.push_str(&format!(
                "          student  {}{}, {}: {}\n",
                model_at(&student, data),
                precision(&plan.student),
                noise(&plan.student.noise, &student),
                schedule(train, labeled, pseudo.clone())
            ));
        }
    }
}

fn meta_pseudo_labels(plan: &Plan, data: &DataSummary, out: &mut String) {
    let Some(mpl) = &plan.mpl else {
        return;
    };
    let labeled = data.labeled as u64;
    for (name, role) in [("teacher", &plan.teacher), ("student", &plan.student)] {
        out.push_str(&format!(
            "{name}   {}{}, {}\n",
            model_at(&role.model, data),
            precision(role),
            noise(&role.noise, &role.model)
        ));
    }
    let images = mpl.steps * u64::from(mpl.batch_size);
    let unlabeled_per_step = u64::from(mpl.batch_size) * u64::from(mpl.mu);
    let unlabeled_epochs = data
        .unlabeled
        .map(|examples| {
            format!(
                ", {} of the unlabeled images",
                epochs(mpl.steps * unlabeled_per_step, examples)
            )
        })
        .unwrap_or_default();
    let strong = augmentation(&mpl.randaugment);
    let strong = if strong.is_empty() {
        "the weak one".to_string()
    } else {
        strong.join(", ")
    };
    out.push_str(&format!(
        "joint     {} of {} labeled + {} unlabeled, each in a weak (flip and shift) and a strong view ({} epochs of the labels{unlabeled_epochs}); strong view: {strong}\n",
        count(mpl.steps, "step"),
        thousands(mpl.batch_size.into()),
        thousands(unlabeled_per_step),
        epochs(images, labeled),
    ));
    let wait = if mpl.student_wait_steps > 0 {
        format!(" after waiting {}", count(mpl.student_wait_steps, "step"))
    } else {
        String::new()
    };
    let warmup = if mpl.warmup_steps > 0 {
        format!("{}, then ", count(mpl.warmup_steps, "warmup step"))
    } else {
        String::new()
    };
    out.push_str(&format!(
        "          SGD with Nesterov momentum {}, weight decay {}: teacher at {}, student at {}{wait}; {warmup}cosine; label smoothing {}\n",
        number(mpl.momentum),
        number(mpl.weight_decay),
        number(mpl.teacher_learning_rate),
        number(mpl.student_learning_rate),
        number(mpl.label_smoothing),
    ));
    let feedback = if mpl.mpl_weight == 0.0 {
        "mpl_weight 0: a UDA-only teacher, no feedback from the student".to_string()
    } else {
        let baseline = if mpl.baseline_decay > 0.0 {
            format!(", baseline decay {}", number(mpl.baseline_decay))
        } else {
            String::new()
        };
        let measured = match mpl.feedback {
            MplFeedback::Train => "in training mode",
            MplFeedback::Eval => "in evaluation mode around the step",
        };
        format!(
            "mpl_weight {}, sign {}{baseline}, the student's losses measured {measured}",
            number(mpl.mpl_weight),
            plan_name(&mpl.mpl_sign)
        )
    };
    let ramp = if mpl.uda_steps > 0 {
        format!("ramped up over {}", count(mpl.uda_steps, "step"))
    } else {
        "no ramp".to_string()
    };
    let ema = if mpl.ema > 0.0 {
        format!("; EMA student at {}", number(mpl.ema))
    } else {
        String::new()
    };
    out.push_str(&format!(
        "          {feedback}; UDA lambda_u {} ({ramp}), threshold {}, temperature {}{ema}\n",
        number(mpl.lambda_u),
        number(mpl.uda_threshold),
        number(mpl.uda_temperature),
    ));
    let evaluations = if mpl.eval_every > 0 {
        format!("test evaluation every {}", count(mpl.eval_every, "step"))
    } else {
        "test evaluation at the end".to_string()
    };
    let saves = if mpl.checkpoint_every > 0 {
        format!(
            "resume checkpoint every {}",
            count(mpl.checkpoint_every, "step")
        )
    } else {
        "no resume checkpoint (a stopped joint training starts over)".to_string()
    };
    out.push_str(&format!("          {evaluations}, {saves}\n"));
    let finetune = &mpl.finetune;
    if finetune.steps > 0 {
        out.push_str(&format!(
            "finetune  {} of {} labeled ({} epochs) at {}\n",
            count(finetune.steps, "step"),
            thousands(finetune.batch_size.into()),
            epochs(finetune.steps * u64::from(finetune.batch_size), labeled),
            number(finetune.learning_rate)
        ));
    } else {
        out.push_str("finetune  none\n");
    }
}

/// Whether this process may create entries in the directory `dir` (`access(2)`: the user's
/// own permissions, and a read-only file system).
#[allow(unsafe_code)]
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_with(edits: &[(&str, &str)]) -> Plan {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/plans/tiny.toml");
        let mut text = std::fs::read_to_string(path).expect("tiny plan");
        for (from, to) in edits {
            assert!(text.contains(from), "tiny plan has no `{from}`");
            text = text.replacen(from, to, 1);
        }
        Plan::from_toml_str(&text).expect("plan")
    }

    #[test]
    fn a_description_says_what_waits_and_what_does_nothing() {
        let data = DataSummary {
            rows: 28,
            cols: 28,
            labeled: 100,
            unlabeled: Some(1_500),
            shards: 4,
            test: 500,
        };
        let plan = tiny_with(&[
            ("min_workers = 2", "min_workers = 1\nworld_size = 2"),
            (
                "randaugment = { ops = 2, magnitude = 9 }",
                "randaugment = { ops = 2, magnitude = 9, op_list = [\"color\", \"rotate\"] }",
            ),
        ]);
        let text = describe(&plan, &data);
        assert!(
            text.contains("2 ranks train, so training waits for 2 workers"),
            "{text}"
        );
        assert!(
            text.contains("among color, rotate (color does nothing on 1-channel images)"),
            "{text}"
        );
        // Balanced to a number per class: the pseudo labels are drawn from that pool.
        let plan = tiny_with(&[("top_k = 3", "top_k = 3\nper_class = 100")]);
        let text = describe(&plan, &data);
        assert!(text.contains("balanced to 100 per class"), "{text}");
        assert!(text.contains("1.9 of the balanced selection"), "{text}");
        // A given teacher is read, not trained.
        let plan = tiny_with(&[
            (
                "[teacher.model]",
                "[teacher]\ncheckpoint = \"runs/a/teacher.safetensors\"\n\n[teacher.model]",
            ),
            (
                "[teacher.train]\nsteps = 30\nbatch_size = 32\nlog_every = 10\n",
                "",
            ),
        ]);
        let text = describe(&plan, &data);
        assert!(
            text.contains(
                "round 1   teacher  cnn (batch_norm true, hidden 32, residual_blocks 0, width 8), read from `runs/a/teacher.safetensors` (not trained)\n"
            ),
            "{text}"
        );
        // Resume saves: said when a training makes some, and when it makes none.
        let plan = tiny_with(&[
            ("steps = 30", "steps = 3000"),
            ("log_every = 10", "log_every = 10\ncheckpoint_every = 0"),
        ]);
        let text = describe(&plan, &data);
        assert!(
            text.contains(
                "progress every 10 steps, no resume checkpoint (a stopped training starts over)"
            ),
            "{text}"
        );
        let plan = tiny_with(&[("steps = 30", "steps = 3000")]);
        let text = describe(&plan, &data);
        assert!(
            text.contains("progress every 10 steps, resume checkpoint every 1,000 steps\n"),
            "{text}"
        );
        assert!(!text.contains("no resume checkpoint"), "{text}");
    }

    #[test]
    fn numbers_read_as_a_plan_writes_them() {
        assert_eq!(thousands(59_000), "59,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(number(0.05), "0.05");
        assert_eq!(number(3e-5), "3e-5");
        assert_eq!(number(15.0), "15");
        assert_eq!(epochs(38_400, 1_000), "38");
        assert_eq!(epochs(1_920, 1_000), "1.9");
        assert_eq!(epochs(1_920_000, 1_000), "1,920");
        assert_eq!(epochs(50, 1_000), "0.05");
        assert_eq!(count(1, "op"), "1 op");
        assert_eq!(count(1_000, "step"), "1,000 steps");
    }
}
