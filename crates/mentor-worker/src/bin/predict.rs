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
    name = "predict",
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
    /// Classify this PNG/JPEG image, or those under this folder (searched recursively, in
    /// path order, hidden files and folders skipped), instead of evaluating on the test set.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Classes (with their probabilities) given per image.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    top: u32,
    /// Where this machine keeps the plan's data set (its `data.dir`), if elsewhere.
    #[arg(long)]
    data: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch intra-op threads (0 = libtorch's choice).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=4096))]
    threads: i32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = mentor_worker::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    if device == tch::Device::Cpu {
        // As the workers do, before libtorch starts its threads.
        mentor_worker::memory::keep_freed_memory();
    }
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let (mut plan, source, note) = match (&args.state_dir, &args.plan, &args.checkpoint) {
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
            (plan, source, String::new())
        }
        _ => anyhow::bail!("give --state-dir, or --plan and --checkpoint"),
    };
    if let Some(data) = &args.data {
        plan.data.dir = data.clone();
    }
    // Only the IDX files are read: the training set's statistics and the test images. The
    // unlabeled images the run was given need not be on this machine, and no split is needed
    // (none labeled: the whole training set stands as unlabeled, which is never decoded).
    plan.data.unlabeled = UnlabeledPlan::default();
    plan.data.labeled_per_class = 0;
    if !source.checkpoint.is_file() {
        anyhow::bail!("checkpoint `{}` not found", source.checkpoint.display());
    }
    eprintln!(
        "predict: the {} of round {} of plan {}: {}{note}",
        source.role.as_str(),
        source.model_round,
        plan.name,
        source.checkpoint.display()
    );
    let dataset = Dataset::load(&plan, device).with_context(|| {
        format!(
            "the plan's data set, data.dir `{}` (give --data where this machine keeps it)",
            plan.data.dir.display()
        )
    })?;
    let model = json!({
        "checkpoint": source.checkpoint.display().to_string(),
        "role": source.role.as_str(),
        "round": source.model_round,
    });
    match &args.images {
        None => {
            let outcome = run_task(
                &plan,
                &dataset,
                &TaskKind::Evaluate {
                    model: source.clone(),
                },
                None,
                &mut |_| {},
            )
            .map_err(|error| {
                // The hint is for a checkpoint that did not load, not for any failure.
                let hint = if error.to_string().contains("checkpoint") {
                    LOAD_HINT
                } else {
                    ""
                };
                anyhow::anyhow!("{error}{hint}")
            })?;
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
                json!({"accuracy": accuracy, "loss": loss, "examples": examples, "model": model})
            );
        }
        Some(folder) => classify(&plan, &dataset, &source, folder, args.top)?,
    }
    Ok(())
}

/// Said after a checkpoint that does not load.
const LOAD_HINT: &str =
    " (a checkpoint loads into the model the plan describes for its --role and --round)";

/// The plan and final student of the run in `dir`, as its `state.json` records them, and a
/// note for an unfinished run.
fn final_student(dir: &std::path::Path) -> anyhow::Result<(Plan, ModelSource, String)> {
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
    // Read, not validated: a run recorded by another version keeps its model.
    let plan: Plan = toml::from_str(state["plan_toml"].as_str().unwrap_or_default())
        .with_context(|| format!("the plan recorded in `{}`", path.display()))?;
    let rounds = state["rounds"].as_array().cloned().unwrap_or_default();
    let (round, model) = rounds
        .iter()
        .rev()
        .find_map(|round| {
            [&round["finetuned"], &round["student"]]
                .into_iter()
                .find(|model| model.is_object())
                .map(|model| (round["round"].as_u64().unwrap_or(0), model.clone()))
        })
        .with_context(|| format!("the run in `{}` has no trained student yet", dir.display()))?;
    let recorded = PathBuf::from(model["checkpoint"].as_str().unwrap_or_default());
    // The directory's own checkpoint: a directory moved or copied since keeps its models in
    // its `checkpoints/`.
    let checkpoint = match recorded
        .file_name()
        .map(|name| dir.join("checkpoints").join(name))
    {
        Some(own) if own.is_file() => own,
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
    let status = state["outcome"]["status"].as_str().unwrap_or("running");
    let last = rounds.len() as u64;
    let note = if status == "succeeded" {
        String::new()
    } else {
        format!(" (the run is {status}, in round {last}: this is round {round}'s)")
    };
    Ok((plan, source, note))
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
    let images = if folder.is_file() {
        Source::Folder {
            files: vec![folder.to_path_buf()],
        }
    } else {
        Source::open(&data, &[]).map_err(images_error)?
    };
    let Source::Folder { files } = &images else {
        anyhow::bail!("`{}` is not an image folder", folder.display());
    };
    let (_vs, model, config) =
        load_model(plan, dataset, source).map_err(|error| anyhow::anyhow!("{error}{LOAD_HINT}"))?;
    let _guard = tch::no_grad_guard();
    let options =
        DecodeOptions::from_plan(&plan.pseudo_labels, plan.pseudo_labels.batch_size as usize);
    let top = i64::from(top).min(i64::from(plan.data.classes));
    let mut out = std::io::stdout().lock();
    for batch in images
        .decode(0, images.units(), dataset.geometry(), options)
        .map_err(images_error)?
    {
        let batch = batch.map_err(images_error)?;
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

/// An error of the `--images` files, named as such (the decode pipeline speaks of unlabeled
/// data, its usual work).
fn images_error(error: mentor_data::DataError) -> anyhow::Error {
    match error {
        mentor_data::DataError::Unlabeled { path, reason } => {
            anyhow::anyhow!("--images: `{}`: {reason}", path.display())
        }
        mentor_data::DataError::Read { path, error } => {
            anyhow::anyhow!("--images: cannot read `{}`: {error}", path.display())
        }
        other => anyhow::anyhow!("--images: {other}"),
    }
}
