//! `predict`: a trained checkpoint at work. Evaluates it on the plan's test set, or classifies
//! the PNG/JPEG images of a folder, one JSON line per image.
//!
//! The model is the one the plan describes for `--role` at `--round` (a growing student is
//! larger in later rounds), fed as in training: images converted to the data set's channels
//! and size, normalised with its training set's mean and standard deviation.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mentor_data::{DecodeOptions, Source};
use mentor_plan::{DataPlan, Plan, Role, UnlabeledFormat, UnlabeledPlan};
use mentor_worker::dataset::{to_unit, Dataset};
use mentor_worker::tasks::{load_model, run_task, ModelSource, Outcome, TaskKind};
use serde_json::json;
use tch::Kind;

#[derive(Debug, Parser)]
#[command(
    group = clap::ArgGroup::new("run").required(true).multiple(false),
    version,
    about = "Evaluate a checkpoint on the test set, or classify a folder of images"
)]
struct Args {
    /// A run directory (the coordinator's --state-dir): its plan and its final student (the
    /// last round's finetuned student, else its student).
    #[arg(long, group = "run", conflicts_with_all = ["checkpoint", "role", "round"])]
    state_dir: Option<PathBuf>,
    /// The run's plan (its model, data set and classes).
    #[arg(long, group = "run", requires = "checkpoint")]
    plan: Option<PathBuf>,
    /// The checkpoint (`<state-dir>/checkpoints/round-N-student.safetensors`, or the
    /// `final_student_checkpoint` of `mentor status`).
    #[arg(long, requires = "plan")]
    checkpoint: Option<PathBuf>,
    /// Which model of the plan the checkpoint holds.
    #[arg(long, default_value = "student", value_parser = ["teacher", "student"])]
    role: String,
    /// The round whose model it is (a growing student is larger in later rounds; Meta Pseudo
    /// Labels has one round).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    round: u32,
    /// Classify the PNG/JPEG images under this folder (searched recursively, in path order)
    /// instead of evaluating on the test set.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Classes (with their probabilities) given per image.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    top: u32,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch intra-op threads (0 = libtorch's choice).
    #[arg(long, default_value_t = 0)]
    threads: i32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let device = mentor_worker::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let (plan, source) = match (&args.state_dir, &args.plan, &args.checkpoint) {
        (Some(dir), _, _) => final_student(dir)?,
        (None, Some(plan), Some(checkpoint)) => {
            let plan = Plan::load(plan)?;
            if args.round > plan.rounds() {
                anyhow::bail!(
                    "--round {}: the plan has {} round(s)",
                    args.round,
                    plan.rounds()
                );
            }
            let role = match args.role.as_str() {
                "teacher" => Role::Teacher,
                _ => Role::Student,
            };
            let source = ModelSource {
                checkpoint: checkpoint.clone(),
                role,
                model_round: args.round,
            };
            (plan, source)
        }
        _ => anyhow::bail!("give --state-dir, or --plan and --checkpoint"),
    };
    if !source.checkpoint.is_file() {
        anyhow::bail!("checkpoint `{}` not found", source.checkpoint.display());
    }
    let dataset = Dataset::load(&plan, device).context("the plan's data set")?;
    match &args.images {
        None => {
            let outcome = run_task(
                &plan,
                &dataset,
                &TaskKind::Evaluate { model: source },
                None,
                &mut |_| {},
            )
            .map_err(anyhow::Error::msg)?;
            let Outcome::Evaluated {
                accuracy,
                loss,
                examples,
            } = outcome
            else {
                anyhow::bail!("an evaluation gave {outcome:?}");
            };
            println!(
                "{}",
                json!({"accuracy": accuracy, "loss": loss, "examples": examples})
            );
        }
        Some(folder) => classify(&plan, &dataset, &source, folder, args.top)?,
    }
    Ok(())
}

/// The plan and final student of the run in `dir`, as its `state.json` records them.
fn final_student(dir: &std::path::Path) -> anyhow::Result<(Plan, ModelSource)> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "`{}`: is `{}` a run directory?",
            path.display(),
            dir.display()
        )
    })?;
    let state: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("`{}`", path.display()))?;
    let plan = Plan::from_toml_str(state["plan_toml"].as_str().unwrap_or_default())
        .with_context(|| format!("the plan recorded in `{}`", path.display()))?;
    let model = state["rounds"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find_map(|round| {
            [&round["finetuned"], &round["student"]]
                .into_iter()
                .find(|model| model.is_object())
        })
        .with_context(|| format!("the run in `{}` has no trained student yet", dir.display()))?;
    let recorded = PathBuf::from(model["checkpoint"].as_str().unwrap_or_default());
    // A run directory moved since: its checkpoints moved with it.
    let checkpoint = match recorded.file_name() {
        Some(name) if !recorded.is_file() => dir.join("checkpoints").join(name),
        _ => recorded,
    };
    let source = ModelSource {
        checkpoint,
        role: if model["role"] == "teacher" {
            Role::Teacher
        } else {
            Role::Student
        },
        model_round: model["model_round"].as_u64().unwrap_or(1) as u32,
    };
    Ok((plan, source))
}

/// One JSON line per image of `folder`: its path, the most probable class and probability,
/// and the `top` classes.
fn classify(
    plan: &Plan,
    dataset: &Dataset,
    source: &ModelSource,
    folder: &std::path::Path,
    top: u32,
) -> anyhow::Result<()> {
    let data = DataPlan {
        unlabeled: UnlabeledPlan {
            format: UnlabeledFormat::ImageFolder,
            path: Some(folder.to_path_buf()),
        },
        unlabeled_limit: 0,
        ..plan.data.clone()
    };
    let images = Source::open(&data, &[]).map_err(|error| match error {
        mentor_data::DataError::Unlabeled { path, reason } => {
            anyhow::anyhow!("--images `{}`: {reason}", path.display())
        }
        other => other.into(),
    })?;
    let Source::Folder { files } = &images else {
        anyhow::bail!("`{}` is not an image folder", folder.display());
    };
    let (_vs, model, config) = load_model(plan, dataset, source).map_err(anyhow::Error::msg)?;
    let _guard = tch::no_grad_guard();
    let options =
        DecodeOptions::from_plan(&plan.pseudo_labels, plan.pseudo_labels.batch_size as usize);
    let top = i64::from(top).min(i64::from(plan.data.classes));
    let mut out = std::io::stdout().lock();
    for batch in images.decode(0, images.units(), dataset.geometry(), options)? {
        let batch = batch?;
        let count = batch.example_ids.len();
        let pixels = dataset.pixels_tensor(&batch.pixels, count);
        let inputs = dataset.model_input(&to_unit(&pixels), config.resolution);
        let probabilities = model
            .forward_t(&inputs, false)
            .to_kind(Kind::Float)
            .softmax(-1, Kind::Float);
        let (values, indices) = probabilities.topk(top, -1, true, true);
        let values = Vec::<f32>::try_from(values.to_device(tch::Device::Cpu).flatten(0, -1))?;
        let indices = Vec::<i64>::try_from(indices.to_device(tch::Device::Cpu).flatten(0, -1))?;
        for (row, id) in batch.example_ids.iter().enumerate() {
            let at = row * top as usize;
            let classes: Vec<_> = (at..at + top as usize)
                .map(|i| json!({"class": indices[i], "probability": values[i]}))
                .collect();
            writeln!(
                out,
                "{}",
                json!({
                    "image": files[*id as usize].display().to_string(),
                    "class": indices[at],
                    "probability": values[at],
                    "top": classes,
                })
            )?;
        }
    }
    Ok(())
}
