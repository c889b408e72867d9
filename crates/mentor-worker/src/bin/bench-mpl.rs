//! `bench-mpl`: the Meta Pseudo Labels step of the workers (`mpl_step`, then the student's EMA)
//! on one process, and the making of its batches (sampling, flips and shifts, RandAugment), timed
//! apart. `scripts/bench-mpl.sh` runs it and the same step in PyTorch (`benches/mpl_step.py`);
//! this prints one JSON line with the seconds per step and the settings the reference must use.
//! On a GPU (`--device cuda`) the data set, the models and the batches live on it, as in the
//! workers, and the clock is read after the device has finished.

use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use mentor_plan::{Plan, Role};
use mentor_worker::dataset::Dataset;
use mentor_worker::distributed::Group;
use mentor_worker::models::build;
use mentor_worker::mpl::{mpl_step, sgd, BatchMaker, Ema, Learner, MplBatch, MplConfig, MplState};
use mentor_worker::tasks::model_config;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tch::nn;

#[derive(Debug, Parser)]
struct Args {
    /// A Meta Pseudo Labels plan: its models, batch sizes, noise and losses are measured.
    #[arg(long, default_value = "deploy/plans/fashion-mnist-mpl.toml")]
    plan: std::path::PathBuf,
    /// Timed steps (after the warmup).
    #[arg(long, default_value_t = 100)]
    steps: u32,
    #[arg(long, default_value_t = 10)]
    warmup: u32,
    /// libtorch intra-op threads.
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On the CPU, keep freed memory for reuse as workers do (`false`: the allocator's default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    keep_freed_memory: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = mentor_worker::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    // Before libtorch starts its threads.
    let freed_memory = (device == tch::Device::Cpu && args.keep_freed_memory)
        .then(mentor_worker::memory::keep_freed_memory);
    tch::set_num_threads(args.threads);
    tch::manual_seed(0);
    let plan = Plan::load(&args.plan).with_context(|| args.plan.display().to_string())?;
    let mpl = plan
        .mpl
        .as_ref()
        .context("the plan is not a Meta Pseudo Labels plan (no [mpl] section)")?;
    let dataset = Dataset::load(&plan, device)?;
    let teacher_config = model_config(&plan, Role::Teacher, 1, &dataset);
    let student_config = model_config(&plan, Role::Student, 1, &dataset);
    let shapes = [
        dataset.channels,
        dataset.image_size,
        teacher_config.resolution,
        student_config.resolution,
    ];
    anyhow::ensure!(
        shapes == [1, 28, 28, 28],
        "the PyTorch reference reads Fashion-MNIST (1 x 28 x 28 images, models at 28 x 28); this plan has {} channel(s) of {} x {}, models at {} and {}",
        shapes[0],
        shapes[1],
        shapes[1],
        shapes[2],
        shapes[3]
    );
    // Refused before anything runs when the PyTorch reference cannot build the models.
    let cnn = |config: &mentor_worker::models::ModelConfig| match &config.model {
        mentor_plan::ModelPlan::Cnn(cnn) => Ok(serde_json::json!({
            "width": cnn.width,
            "hidden": cnn.hidden,
            "residual_blocks": cnn.residual_blocks,
            "batch_norm": cnn.batch_norm,
            "dropout": config.dropout,
            "last_survival": config.last_survival,
            "precision": config.precision.as_str(),
        })),
        _ => anyhow::bail!("the PyTorch reference has the `cnn` model only"),
    };
    // The reference implements the reference codebases' training-mode feedback only: a plan
    // with the other would compare unlike steps.
    if mpl.feedback != mentor_plan::MplFeedback::Train {
        anyhow::bail!(
            "the PyTorch reference measures `mpl.feedback = \"train\"` steps only; this plan sets another"
        );
    }
    let settings = serde_json::json!({
        "data": plan.data.dir,
        "labeled_per_class": plan.data.labeled_per_class,
        "seed": plan.seed,
        "classes": plan.data.classes,
        "batch_size": mpl.batch_size,
        "mu": mpl.mu,
        "teacher": cnn(&teacher_config)?,
        "student": cnn(&student_config)?,
        "teacher_learning_rate": mpl.teacher_learning_rate,
        "student_learning_rate": mpl.student_learning_rate,
        "momentum": mpl.momentum,
        "weight_decay": mpl.weight_decay,
        "label_smoothing": mpl.label_smoothing,
        "uda_threshold": mpl.uda_threshold,
        "uda_temperature": mpl.uda_temperature,
        "lambda_u": mpl.lambda_u,
        "uda_steps": mpl.uda_steps,
        "mpl_weight": mpl.mpl_weight,
        "mpl_sign": match mpl.mpl_sign {
            mentor_plan::MplSign::Theory => "theory",
            mentor_plan::MplSign::Reference => "reference",
        },
        "baseline_decay": mpl.baseline_decay,
        "ema": mpl.ema,
        "randaugment_ops": mpl.randaugment.ops,
        "randaugment_magnitude": mpl.randaugment.magnitude,
    });
    let teacher_vs = nn::VarStore::new(device);
    let teacher = build(&teacher_vs.root(), &teacher_config);
    let student_vs = nn::VarStore::new(device);
    let student = build(&student_vs.root(), &student_config);
    let mut ema_vs = nn::VarStore::new(device);
    let _ema = build(&ema_vs.root(), &student_config);
    ema_vs.copy(&student_vs)?;
    let mut averager = Ema::new(&ema_vs, &student_vs);
    let teacher_variables = teacher_vs.trainable_variables();
    let student_variables = student_vs.trainable_variables();
    let mut teacher_optimizer =
        sgd(&teacher_vs, mpl, mpl.teacher_learning_rate).map_err(anyhow::Error::msg)?;
    let mut student_optimizer =
        sgd(&student_vs, mpl, mpl.student_learning_rate).map_err(anyhow::Error::msg)?;
    let config = MplConfig::from_plan(mpl, plan.data.classes);
    let mut group = Group::single(1 << 20, device);
    let maker = BatchMaker::new(&plan, &dataset, 0, 1).map_err(anyhow::Error::msg)?;
    let mut sampler = StdRng::seed_from_u64(plan.seed);

    // The batches first, timed on their own; the steps then cycle through them.
    let total = (args.warmup + args.steps) as usize;
    let started = Instant::now();
    let batches: Vec<MplBatch> = (0..total)
        .map(|_| maker.draw(&dataset, &mut sampler))
        .collect();
    mentor_worker::synchronize(device);
    let batch_seconds = started.elapsed().as_secs_f64() / total as f64;

    let mut state = MplState::default();
    let mut timed = None;
    let mut last = None;
    for (index, batch) in batches.iter().enumerate() {
        if index == args.warmup as usize {
            mentor_worker::synchronize(device);
            timed = Some((Instant::now(), mentor_worker::memory::minor_faults()));
        }
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
            &mut group,
            batch,
            &config,
            &mut state,
            true,
        )?;
        if mpl.ema > 0.0 {
            averager.update(mpl.ema);
        }
        last = Some(stats);
    }
    mentor_worker::synchronize(device);
    let step_seconds = timed.map_or(0.0, |(t, _)| t.elapsed().as_secs_f64()) / args.steps as f64;
    // Pages the allocator mapped afresh, each one a fault: what keeping freed memory saves.
    let faults_per_step = match (
        timed.and_then(|(_, f)| f),
        mentor_worker::memory::minor_faults(),
    ) {
        (Some(before), Some(after)) => {
            Some(after.saturating_sub(before) as f64 / args.steps as f64)
        }
        _ => None,
    };
    let last = last.context("no step ran")?.read();
    println!(
        "{}",
        serde_json::json!({
            "impl": "mentor",
            "device": args.device,
            "threads": args.threads,
            "steps": args.steps,
            "step_seconds": step_seconds,
            "batch_seconds": batch_seconds,
            "final_h": last.h,
            "final_student_labeled_loss": last.student_labeled_loss,
            "freed_memory_kept": freed_memory == Some(mentor_worker::memory::FreedMemory::Kept),
            "minor_faults_per_step": faults_per_step,
            "settings": settings,
        })
    );
    Ok(())
}
