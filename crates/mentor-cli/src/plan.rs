//! `mentor plan`: checks a plan and its data as a run would, and says what the run will do.
//!
//! The checks are the coordinator's and the workers' own: the plan's fields
//! ([`Plan::load`]), the IDX files the workers read, the labeled split of the seed and the
//! unlabeled source with its shards. Nothing is written and no process is started.

use std::path::Path;

use anyhow::Context;
use mentor_data::{ImageSet, Source, Split};
use mentor_plan::{Method, ModelPlan, NoisePlan, Plan, Precision, RolePlan, TrainPlan};

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

/// Reads and checks the plan at `path` and its data.
pub fn check(path: &Path) -> anyhow::Result<(Plan, DataSummary)> {
    let plan = Plan::load(path)?;
    let data = check_data(&plan).with_context(|| {
        format!(
            "the data of plan `{}` (data.dir `{}`)",
            path.display(),
            plan.data.dir.display()
        )
    })?;
    Ok((plan, data))
}

fn check_data(plan: &Plan) -> anyhow::Result<DataSummary> {
    // The workers load both sets whole: a file they would choke on fails here.
    let train = ImageSet::load(&plan.data.dir, "train")?;
    let test = ImageSet::load(&plan.data.dir, "t10k")?;
    if (test.rows, test.cols) != (train.rows, train.cols) {
        anyhow::bail!(
            "the test images are {}x{}, the training images {}x{}",
            test.rows,
            test.cols,
            train.rows,
            train.cols
        );
    }
    let split = Split::new(&train.labels, test.len(), &plan.data, plan.seed)?;
    let source = Source::open(&plan.data, &split.unlabeled)?;
    Ok(DataSummary {
        rows: train.rows,
        cols: train.cols,
        labeled: split.labeled.len(),
        unlabeled: source.known_examples(),
        shards: source.shards(plan.data.shard_size).len(),
        test: split.test_len,
    })
}

/// `59,000`.
fn thousands(value: u64) -> String {
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

/// Passes over `examples` that `images` drawn images make: `38.4`.
fn epochs(images: u64, examples: u64) -> String {
    let epochs = images as f64 / examples.max(1) as f64;
    if epochs >= 10.0 {
        format!("{epochs:.0}")
    } else {
        format!("{epochs:.1}")
    }
}

/// A number as a plan writes it: `0.05`, `3e-5`, `15`.
fn number(value: f64) -> String {
    if value != 0.0 && value.abs() < 1e-3 {
        format!("{value:e}")
    } else {
        format!("{value}")
    }
}

/// `cnn (width 32, residual_blocks 1, hidden 128, batch_norm true)`: the model's settings as
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
            other => format!("{key} {other}"),
        })
        .collect();
    if settings.is_empty() {
        model.kind_name().to_string()
    } else {
        format!("{} ({})", model.kind_name(), settings.join(", "))
    }
}

/// The noise of a role in training, or `no noise`.
fn noise(noise: &NoisePlan) -> String {
    let mut parts = Vec::new();
    if noise.dropout > 0.0 {
        parts.push(format!("dropout {}", number(noise.dropout)));
    }
    if noise.stochastic_depth_survival < 1.0 {
        parts.push(format!(
            "stochastic depth {}",
            number(noise.stochastic_depth_survival)
        ));
    }
    let augment = &noise.randaugment;
    if augment.ops > 0 {
        let ops = if augment.op_list.is_empty() {
            String::new()
        } else {
            format!(" of {}", augment.op_list.join(", "))
        };
        parts.push(format!(
            "RandAugment {} ops{ops} at magnitude {}",
            augment.ops,
            number(augment.magnitude)
        ));
    }
    if augment.cutout > 0.0 {
        parts.push(format!("cutout {}", number(augment.cutout)));
    }
    if parts.is_empty() {
        "no noise".to_string()
    } else {
        parts.join(", ")
    }
}

fn precision(role: &RolePlan) -> &'static str {
    match role.precision {
        Precision::Float32 => "",
        Precision::Bfloat16 => ", in bfloat16",
    }
}

/// `600 steps of 64 labeled (38 epochs), sgd at 0.05, cosine`.
fn schedule(train: &TrainPlan, labeled: u64, unlabeled: Option<u64>) -> String {
    let images = train.steps * u64::from(train.batch_size);
    let mut text = format!(
        "{} steps of {} labeled",
        thousands(train.steps),
        train.batch_size
    );
    if train.unlabeled_ratio > 0 {
        let pseudo = images * u64::from(train.unlabeled_ratio);
        text.push_str(&format!(
            " + {} pseudo-labeled",
            u64::from(train.batch_size) * u64::from(train.unlabeled_ratio)
        ));
        text.push_str(&format!(
            " ({} epochs of the labels",
            epochs(images, labeled)
        ));
        if let Some(unlabeled) = unlabeled {
            text.push_str(&format!(
                ", {} of the unlabeled images before filtering",
                epochs(pseudo, unlabeled)
            ));
        }
        text.push(')');
    } else {
        text.push_str(&format!(" ({} epochs)", epochs(images, labeled)));
    }
    let optimizer = serde_json_name(&train.optimizer);
    let schedule = serde_json_name(&train.schedule);
    text.push_str(&format!(
        ", {optimizer} at {}, {schedule}",
        number(train.learning_rate)
    ));
    if train.warmup_steps > 0 {
        text.push_str(&format!(" after {} warmup steps", train.warmup_steps));
    }
    text
}

/// The name a plan gives a unit enum variant (`sgd`, `cosine`).
fn serde_json_name<T: serde::Serialize>(value: &T) -> String {
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
        Method::NoisyStudent => format!(
            "Noisy Student, {} round{}",
            plan.rounds(),
            if plan.rounds() == 1 { "" } else { "s" }
        ),
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
        Some(count) => thousands(count),
        None => "uncounted".to_string(),
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
        Method::NoisyStudent => format!(
            " in {} shard{}",
            data.shards,
            if data.shards == 1 { "" } else { "s" }
        ),
        Method::MetaPseudoLabels => String::new(),
    };
    out.push_str(&format!(
        "          {} labeled ({} per class, {} classes), {unlabeled} unlabeled{source}{shards}, {} test images\n",
        thousands(labeled),
        plan.data.labeled_per_class,
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
    } else {
        format!("{} ranks train", workers.world_size)
    };
    out.push_str(&format!(
        "workers   the run starts when {} ha{} registered; {ranks} (collective {})\n",
        workers.min_workers,
        if workers.min_workers == 1 { "s" } else { "ve" },
        serde_json_name(&workers.collective)
    ));
    out
}

fn noisy_student(plan: &Plan, data: &DataSummary, out: &mut String) {
    let labeled = data.labeled as u64;
    let labels = &plan.pseudo_labels;
    let mode = serde_json_name(&labels.mode);
    let balance = if labels.balance {
        if labels.per_class > 0 {
            format!(", balanced to {} per class", labels.per_class)
        } else {
            ", class-balanced".to_string()
        }
    } else {
        String::new()
    };
    for round in 1..=plan.rounds() {
        let prefix = format!("round {round:<3}");
        if round == 1 {
            // Validation guarantees a teacher schedule for Noisy Student.
            if let Some(train) = &plan.teacher.train {
                out.push_str(&format!(
                    "{prefix} teacher  {}{}, {}: {}\n",
                    model(&plan.teacher.model.at_round(1)),
                    precision(&plan.teacher),
                    noise(&plan.teacher.noise),
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
            "          labels   {mode} at temperature {}, top {}, dropped below confidence {}{balance}: {} labeling task{}\n",
            number(labels.temperature),
            plan.top_k(),
            number(labels.min_confidence),
            data.shards,
            if data.shards == 1 { "" } else { "s" },
        ));
        if let Some(train) = &plan.student.train {
            out.push_str(&format!(
                "          student  {}{}, {}: {}\n",
                model(&plan.student.model.at_round(round)),
                precision(&plan.student),
                noise(&plan.student.noise),
                schedule(train, labeled, data.unlabeled)
            ));
        }
    }
}

fn meta_pseudo_labels(plan: &Plan, data: &DataSummary, out: &mut String) {
    let Some(mpl) = &plan.mpl else {
        return;
    };
    let labeled = data.labeled as u64;
    out.push_str(&format!(
        "teacher   {}{}, {}\n",
        model(&plan.teacher.model),
        precision(&plan.teacher),
        noise(&plan.teacher.noise)
    ));
    out.push_str(&format!(
        "student   {}{}, {}\n",
        model(&plan.student.model),
        precision(&plan.student),
        noise(&plan.student.noise)
    ));
    let images = mpl.steps * u64::from(mpl.batch_size);
    let unlabeled_images = images * u64::from(mpl.mu);
    let unlabeled_epochs = data
        .unlabeled
        .map(|count| {
            format!(
                ", {} of the unlabeled images",
                epochs(unlabeled_images, count)
            )
        })
        .unwrap_or_default();
    let strong = noise(&NoisePlan {
        dropout: 0.0,
        stochastic_depth_survival: 1.0,
        randaugment: mpl.randaugment.clone(),
    });
    out.push_str(&format!(
        "joint     {} steps of {} labeled + {} unlabeled, each a weak and a strong view ({} epochs of the labels{unlabeled_epochs}); strong view: {strong}\n",
        thousands(mpl.steps),
        mpl.batch_size,
        u64::from(mpl.batch_size) * u64::from(mpl.mu),
        epochs(images, labeled),
    ));
    let baseline = if mpl.baseline_decay > 0.0 {
        format!(", baseline decay {}", number(mpl.baseline_decay))
    } else {
        String::new()
    };
    let ema = if mpl.ema > 0.0 {
        format!("; EMA student at {}", number(mpl.ema))
    } else {
        String::new()
    };
    out.push_str(&format!(
        "          mpl_weight {}, sign {}{baseline}; UDA lambda_u {} over {} steps, threshold {}, temperature {}{ema}\n",
        number(mpl.mpl_weight),
        serde_json_name(&mpl.mpl_sign),
        number(mpl.lambda_u),
        thousands(mpl.uda_steps),
        number(mpl.uda_threshold),
        number(mpl.uda_temperature),
    ));
    let evaluations = if mpl.eval_every > 0 {
        format!("test evaluation every {} steps", thousands(mpl.eval_every))
    } else {
        "test evaluation at the end".to_string()
    };
    let saves = if mpl.checkpoint_every > 0 {
        format!("saved every {} steps", thousands(mpl.checkpoint_every))
    } else {
        "never saved before the end".to_string()
    };
    out.push_str(&format!("          {evaluations}, {saves}\n"));
    let finetune = &mpl.finetune;
    if finetune.steps > 0 {
        out.push_str(&format!(
            "finetune  {} steps of {} labeled ({} epochs) at {}\n",
            thousands(finetune.steps),
            finetune.batch_size,
            epochs(finetune.steps * u64::from(finetune.batch_size), labeled),
            number(finetune.learning_rate)
        ));
    } else {
        out.push_str("finetune  none\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
