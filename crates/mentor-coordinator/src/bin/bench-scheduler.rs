//! How many labeling tasks the coordinator hands out and takes back a second when a round has
//! tens of thousands of shards, with labeling's changes saved in groups (what it does) against
//! saving `state.json` at every change (the reference, measured in the same run).
//!
//! The plan is `deploy/plans/tiny.toml` over all of Fashion-MNIST's unlabeled images cut into
//! shards of `--shard-size` images, its first teacher given as a checkpoint, so that the run
//! starts at its labeling. Workers ask for tasks and send results in turn through the
//! coordinator's own calls (the gRPC layer and the workers' inference are left out: this
//! measures the scheduler and its saves).
//!
//! `cargo run --release -p mentor-coordinator --bin bench-scheduler -- [--shard-size 2]
//! [--tasks 5000] [--reference-tasks 300] [--workers 8] [--data DIR]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use mentor_coordinator::state::{ShardRecord, TaskOutcome, TaskSpec};
use mentor_coordinator::{Coordinator, TaskReply};
use mentor_plan::Plan;

#[derive(Parser)]
#[command(
    about = "Labeling tasks a second at tens of thousands of shards: grouped saves against a save per change"
)]
struct Args {
    /// Unlabeled images per shard (59,900 images: 29,950 shards of 2).
    #[arg(long, default_value_t = 2)]
    shard_size: u64,
    /// Labeling tasks (an assignment and a result each) measured with grouped saves.
    #[arg(long, default_value_t = 5000)]
    tasks: usize,
    /// Labeling tasks measured saving at every change (each save rewrites the whole state:
    /// fewer, for the same rate).
    #[arg(long, default_value_t = 300)]
    reference_tasks: usize,
    /// Workers asking in turn.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// The Fashion-MNIST folder.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data: PathBuf,
}

/// A folder of its own under the system's temporary folder, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> anyhow::Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!("bench-scheduler-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| path.display().to_string())?;
        Ok(ScratchDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Measured {
    seconds: f64,
    tasks: usize,
    saves: u64,
    state_bytes: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = ScratchDir::new()?;
    let teacher = dir.path().join("teacher.safetensors");
    // A checkpoint's header is all the coordinator reads of it.
    let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0; 4]);
    std::fs::write(&teacher, &file)?;
    let plan = plan(&args, &teacher)?;

    let grouped = measure(&plan, &dir.path().join("grouped"), &args, args.tasks, None)?;
    let each = measure(
        &plan,
        &dir.path().join("each"),
        &args,
        args.reference_tasks,
        Some(usize::MAX),
    )?;
    println!(
        "{} shards, state.json {:.1} MB, {} workers; labeling tasks (an assignment and a result each):",
        shards_of(&plan),
        grouped.state_bytes as f64 / 1e6,
        args.workers
    );
    let rate = |m: &Measured| m.tasks as f64 / m.seconds;
    println!(
        "grouped saves (mentor): {:>10.1} tasks/s   {} tasks, {:.3} s, {} saves",
        rate(&grouped),
        grouped.tasks,
        grouped.seconds,
        grouped.saves
    );
    println!(
        "a save per change:      {:>10.1} tasks/s   {} tasks, {:.3} s, {} saves",
        rate(&each),
        each.tasks,
        each.seconds,
        each.saves
    );
    println!(
        "ratio (grouped / a save per change): {:.1}",
        rate(&grouped) / rate(&each)
    );
    Ok(())
}

fn plan(args: &Args, teacher: &Path) -> anyhow::Result<Plan> {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/plans/tiny.toml");
    let text = std::fs::read_to_string(&tiny).with_context(|| tiny.display().to_string())?;
    let mut value: toml::Table = toml::from_str(&text)?;
    let data = value
        .get_mut("data")
        .and_then(|d| d.as_table_mut())
        .context("[data]")?;
    data.insert("dir".into(), args.data.display().to_string().into());
    data.remove("unlabeled_limit");
    data.insert("shard_size".into(), (args.shard_size as i64).into());
    let teacher_table = value
        .get_mut("teacher")
        .and_then(|t| t.as_table_mut())
        .context("[teacher]")?;
    teacher_table.remove("train");
    teacher_table.insert("checkpoint".into(), teacher.display().to_string().into());
    let workers = value
        .entry("workers")
        .or_insert_with(|| toml::Table::new().into())
        .as_table_mut()
        .context("[workers]")?;
    workers.insert("min_workers".into(), 1.into());
    Ok(Plan::from_toml_str(&toml::to_string(&value)?)?)
}

fn shards_of(plan: &Plan) -> u64 {
    59_900u64.div_ceil(plan.data.shard_size)
}

/// Runs `tasks` labeling tasks through a coordinator of `plan` in `run_dir`; the
/// threshold of grouped saves `group_saves_from` (`None`: the coordinator's own).
fn measure(
    plan: &Plan,
    run_dir: &Path,
    args: &Args,
    tasks: usize,
    group_saves_from: Option<usize>,
) -> anyhow::Result<Measured> {
    let mut coordinator = Coordinator::open(plan.clone(), run_dir)?;
    if let Some(bytes) = group_saves_from {
        coordinator.set_group_saves_from(bytes);
    }
    let now = Instant::now();
    let workers: Vec<_> = (0..args.workers)
        .map(|i| coordinator.register(format!("host{i}"), "cpu".into(), i as u32, now))
        .collect();
    let mut done = 0;
    let mut began = None;
    let mut turn = 0;
    let saves_before = coordinator.saves();
    while done < tasks {
        let worker = &workers[turn % workers.len()];
        turn += 1;
        let now = Instant::now();
        let assignment = match coordinator.get_task(worker, now)? {
            TaskReply::Task(assignment) => assignment,
            TaskReply::RetryAfter(_) => continue,
            TaskReply::Shutdown => bail!("the run ended"),
        };
        let task = &assignment.task;
        let outcome = match &task.spec {
            TaskSpec::Label { shard_index, .. } => {
                began.get_or_insert(now);
                done += 1;
                TaskOutcome::Labeled(ShardRecord {
                    index: *shard_index,
                    key: mentor_labels::shard_key(1, *shard_index),
                    examples: plan.data.shard_size,
                    sha256: "00".into(),
                    bytes: 1,
                    histogram: None,
                })
            }
            // The given teacher's evaluation, before its labeling.
            _ => TaskOutcome::Evaluated {
                accuracy: 0.5,
                loss: 1.0,
            },
        };
        coordinator.complete(worker, &task.id, task.attempts, outcome, Instant::now())?;
        // The service's saver (every 50 ms) would save no sooner than this: a save is due
        // at most once a spacing.
        coordinator.save_if_due(Instant::now());
    }
    let seconds = began.map_or(Duration::ZERO, |b| b.elapsed()).as_secs_f64();
    let saves = coordinator.saves() - saves_before;
    coordinator.persist()?;
    let state_bytes = std::fs::metadata(run_dir.join("state.json"))?.len();
    Ok(Measured {
        seconds,
        tasks: done,
        saves,
        state_bytes,
    })
}
