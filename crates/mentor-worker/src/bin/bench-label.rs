//! `bench-label`: the pseudo-label service's throughput on a folder of PNG/JPEG images, against a
//! bare in-process forward of the same model on the same images already decoded in memory, plus
//! the bytes per example of the soft labels and the student's read throughput of them. Prints
//! one JSON line; `scripts/bench-label.sh` runs it beside the PyTorch reference
//! (`benches/label_pytorch.py`) and prints the ratios.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use mentor_data::DecodeOptions;
use mentor_labels::{ManifestShard, Rule, Selection, SelectionFile};
use mentor_plan::{ModelPlan, Plan, Role, UnlabeledFormat, UnlabeledPlan, WideResnetPlan};
use mentor_worker::dataset::{to_unit, Dataset};
use mentor_worker::models::build;
use mentor_worker::tasks::{
    model_config, read_selection, run_task, ModelSource, Outcome, TaskKind,
};
use tch::nn;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Parser)]
struct Args {
    /// Plan giving the data set (for the labeled geometry and statistics) and label settings.
    #[arg(long, default_value = "deploy/plans/fashion-mnist-noisy-student.toml")]
    plan: PathBuf,
    /// Overrides the plan's `data.dir` (the IDX files).
    #[arg(long)]
    data: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Folder of PNG/JPEG images to label.
    #[arg(long)]
    images: PathBuf,
    /// `wrn-28-2`, or `plan` for the plan's teacher.
    #[arg(long, default_value = "wrn-28-2")]
    model: String,
    #[arg(long, default_value_t = 256)]
    batch_size: u32,
    /// Decode threads (0 = one per core, leaving one).
    #[arg(long, default_value_t = 0)]
    decode_threads: u32,
    /// libtorch intra-op threads (0 = default).
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// How many times the student's read goes over the shard.
    #[arg(long, default_value_t = 20)]
    read_repeats: usize,
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
    let work = tempfile::tempdir().context("temporary directory")?;
    let storage = work.path().join("labels").display().to_string();
    let mut plan = Plan::load(&args.plan)?;
    if let Some(data) = &args.data {
        plan.data.dir = data.clone();
    }
    plan.data.unlabeled = UnlabeledPlan {
        format: UnlabeledFormat::ImageFolder,
        path: Some(args.images.clone()),
    };
    plan.data.unlabeled_limit = 0;
    plan.pseudo_labels.batch_size = args.batch_size;
    plan.pseudo_labels.decode_threads = args.decode_threads;
    if args.model == "wrn-28-2" {
        plan.teacher.model = ModelPlan::WideResnet(WideResnetPlan {
            depth: 28,
            widen: 2,
            widen_growth_per_round: 0,
        });
    } else if args.model != "plan" {
        anyhow::bail!("unknown model `{}`", args.model);
    }
    let dataset = Dataset::load(&plan, device)?;
    let examples = dataset.unlabeled.units();

    // A teacher checkpoint (random weights: throughput does not depend on them).
    tch::manual_seed(0);
    let config = model_config(&plan, Role::Teacher, 1, &dataset);
    let vs = nn::VarStore::new(device);
    let model = build(&vs.root(), &config);
    let checkpoint = work.path().join("teacher.safetensors");
    vs.save(&checkpoint).context("save the teacher")?;

    // Bare forward: the same images already decoded and in memory, no I/O, no writing.
    let decode = DecodeOptions {
        batch_size: args.batch_size as usize,
        threads: mentor_data::decode_threads(0),
        prefetch: 4,
        skip_undecodable: false,
    };
    let mut pixels = Vec::new();
    for batch in dataset
        .unlabeled
        .decode(0, examples, dataset.geometry(), decode)?
    {
        pixels.extend(batch?.pixels);
    }
    let all = dataset.pixels_tensor(&pixels, examples as usize);
    let top_k = plan.top_k() as i64;
    let bare = |images: &Tensor| {
        let _guard = tch::no_grad_guard();
        let logits = model.forward_t(
            &dataset.model_input(&to_unit(images), config.resolution),
            false,
        );
        let (values, indices) = logits.softmax(-1, Kind::Float).topk(top_k, -1, true, true);
        (
            values.to_device(Device::Cpu),
            indices.to_device(Device::Cpu),
        )
    };
    let _ = bare(&all.narrow(0, 0, (args.batch_size as i64).min(examples as i64)));
    let started = Instant::now();
    let mut offset = 0i64;
    while offset < examples as i64 {
        let len = (args.batch_size as i64).min(examples as i64 - offset);
        let _ = tch::autocast(
            plan.pseudo_labels.mixed_precision && device.is_cuda(),
            || bare(&all.narrow(0, offset, len)),
        );
        offset += len;
    }
    let bare_rate = examples as f64 / started.elapsed().as_secs_f64();

    // The service: the worker's label task (decode pipeline, inference, shard, commit).
    let task = TaskKind::Label {
        teacher: ModelSource {
            checkpoint: checkpoint.clone(),
            role: Role::Teacher,
            model_round: 1,
        },
        round: 1,
        shard_index: 0,
        start: 0,
        end: examples,
        storage: storage.clone(),
        previous_teachers: Vec::new(),
    };
    let started = Instant::now();
    let outcome =
        run_task(&plan, &dataset, &task, None, &mut |_| {}).map_err(anyhow::Error::msg)?;
    let service_rate = examples as f64 / started.elapsed().as_secs_f64();
    let Outcome::Labeled {
        key, sha256, bytes, ..
    } = outcome
    else {
        anyhow::bail!("the label task did not label");
    };

    // The student's read: a selection keeping everything once, over the shard `read_repeats`
    // times.
    let keep_all = Selection {
        seed: 0,
        rules: (0..plan.data.classes)
            .map(|_| Rule {
                threshold: 0.0,
                ratio: 1.0,
                kept: 1,
            })
            .collect(),
    };
    let file = SelectionFile {
        format_version: mentor_labels::FORMAT_VERSION,
        round: 1,
        storage,
        top_k: plan.top_k(),
        classes: plan.data.classes,
        selection: keep_all,
        shards: (0..args.read_repeats)
            .map(|index| ManifestShard {
                index: index as u32,
                key: key.clone(),
                examples,
                sha256: sha256.clone(),
                bytes,
                histogram: None,
            })
            .collect(),
    };
    let selection_path = work.path().join("selection.json");
    std::fs::write(&selection_path, file.to_json())?;
    let started = Instant::now();
    let read = read_selection(&selection_path, mentor_data::decode_threads(0))
        .map_err(anyhow::Error::msg)?;
    let read_rate = read.len() as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        read.len() as u64 == examples * args.read_repeats as u64,
        "the student read {} rows, expected {}",
        read.len(),
        examples * args.read_repeats as u64
    );

    println!(
        "{}",
        serde_json::json!({
            "impl": "mentor",
            "model": args.model,
            "device": args.device,
            "examples": examples,
            "batch_size": args.batch_size,
            "top_k": top_k,
            "bare_forward_images_per_second": bare_rate,
            "service_images_per_second": service_rate,
            "bytes_per_example": bytes as f64 / examples as f64,
            "student_read_examples_per_second": read_rate,
        })
    );
    Ok(())
}
