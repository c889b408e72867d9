//! `bench-ddp`: one rank of a data-parallel training benchmark on Fashion-MNIST, through the
//! worker's own training path (`run_task`) and TCP ring. Start `--world-size` copies with
//! ranks 0..W (`scripts/bench-ddp.sh` does); rank 0 prints img/s as a JSON line.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mentor_plan::{Plan, Role};
use mentor_worker::dataset::Dataset;
use mentor_worker::distributed::{GroupJoin, GroupSetup};
use mentor_worker::tasks::{run_task, Outcome, TaskKind};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 0)]
    rank: usize,
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// Rank r listens on 127.0.0.1:(base_port + r).
    #[arg(long, default_value_t = 29600)]
    base_port: u16,
    /// Global batch per step.
    #[arg(long, default_value_t = 256)]
    batch: u32,
    #[arg(long, default_value_t = 200)]
    steps: u32,
    #[arg(long, default_value_t = 1)]
    threads: i32,
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // As the workers do on the CPU, before libtorch starts its threads.
    mentor_worker::memory::keep_freed_memory();
    tch::set_num_threads(args.threads);
    let plan_text = format!(
        r#"
version = 1
name = "bench-ddp"
method = "noisy-student"
rounds = 1
[data]
dir = "{data}"
# Almost every image: a run needs some unlabeled ones, and the benchmark trains the teacher.
labeled_per_class = 5990
[teacher.model]
kind = "cnn"
width = 32
hidden = 128
[teacher.train]
steps = {steps}
batch_size = {batch}
flip_and_shift = false
log_every = 1000000
[student.model]
kind = "cnn"
[student.train]
steps = 1
batch_size = 1
unlabeled_ratio = 1
"#,
        data = args.data,
        steps = args.steps,
        batch = args.batch
    );
    let plan = Plan::from_toml_str(&plan_text).context("benchmark plan")?;
    let dataset = Dataset::load(&plan, tch::Device::Cpu)?;
    let group = (args.world_size > 1).then(|| -> anyhow::Result<GroupJoin> {
        let addresses: Vec<String> = (0..args.world_size)
            .map(|r| format!("127.0.0.1:{}", args.base_port + r as u16))
            .collect();
        Ok(GroupJoin {
            rank: args.rank,
            world_size: args.world_size,
            setup: GroupSetup::Ring {
                listener: TcpListener::bind(&addresses[args.rank])?,
                addresses,
                group: "bench".into(),
                timeout: Duration::from_secs(60),
                setup_timeout: Duration::from_secs(60),
            },
            collective_timeout: Duration::from_secs(60),
        })
    });
    let group = group.transpose()?;
    let output = std::env::temp_dir().join(format!("bench-ddp-{}.safetensors", std::process::id()));
    let task = TaskKind::Train {
        role: Role::Teacher,
        round: 1,
        output: output.clone(),
        selection: None,
    };
    let outcome =
        run_task(&plan, &dataset, &task, group, &mut |_| {}).map_err(anyhow::Error::msg)?;
    let _ = std::fs::remove_file(&output);
    if let (
        0,
        Outcome::Trained {
            seconds,
            final_loss,
            ..
        },
    ) = (args.rank, outcome)
    {
        let images = (args.batch as u64 * args.steps as u64) as f64;
        println!(
            "{}",
            serde_json::json!({
                "impl": "mentor",
                "world_size": args.world_size,
                "batch": args.batch,
                "steps": args.steps,
                "seconds": seconds,
                "images_per_second": images / seconds,
                "final_loss": final_loss,
            })
        );
    }
    Ok(())
}
