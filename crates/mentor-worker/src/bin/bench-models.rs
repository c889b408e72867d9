//! `bench-models`: training and inference throughput of the plan's architectures on random
//! data, printed as JSON lines. `scripts/bench-models.sh` runs it beside the PyTorch reference
//! (`benches/models.py`) with the same settings and prints the ratios.

use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use mentor_plan::{BitPlan, EfficientnetPlan, ModelPlan, ResnetPlan, Stem, WideResnetPlan};
use mentor_worker::models::{build, parameter_count, ModelConfig};
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

#[derive(Debug, Parser)]
struct Args {
    /// Comma-separated: wrn-28-2, resnet18, bit-r50x1, efficientnet-b0.
    #[arg(long, default_value = "wrn-28-2,resnet18,bit-r50x1,efficientnet-b0")]
    models: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 32)]
    batch: i64,
    #[arg(long, default_value_t = 32)]
    image_size: i64,
    #[arg(long, default_value_t = 3)]
    channels: i64,
    #[arg(long, default_value_t = 10)]
    classes: i64,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// libtorch intra-op threads (0 = default).
    #[arg(long, default_value_t = 0)]
    threads: i32,
}

/// The benchmark names, with the same layouts as the PyTorch reference (torchvision stems).
fn model_plan(name: &str) -> anyhow::Result<ModelPlan> {
    Ok(match name {
        "wrn-28-2" => ModelPlan::WideResnet(WideResnetPlan {
            depth: 28,
            widen: 2,
            widen_growth_per_round: 0,
        }),
        "resnet18" => ModelPlan::Resnet(ResnetPlan {
            depth: 18,
            width: 1,
            width_growth_per_round: 0,
            stem: Stem::Imagenet,
        }),
        "bit-r50x1" => ModelPlan::Bit(BitPlan {
            depth: 50,
            width: 1,
            width_growth_per_round: 0,
            stem: Stem::Imagenet,
        }),
        "efficientnet-b0" => ModelPlan::Efficientnet(EfficientnetPlan {
            preset: Some("b0".into()),
            phi: None,
            phi_growth_per_round: 0.0,
            base_resolution: None,
        }),
        other => anyhow::bail!("unknown model `{other}`"),
    })
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
    for name in args
        .models
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        let plan = model_plan(name)?;
        tch::manual_seed(0);
        let vs = nn::VarStore::new(device);
        let config = ModelConfig {
            model: plan,
            classes: args.classes,
            channels: args.channels,
            resolution: args.image_size,
            dropout: 0.0,
            last_survival: 1.0,
            precision: mentor_plan::Precision::Float32,
        };
        let model = build(&vs.root(), &config);
        let params = parameter_count(&vs);
        let mut optimizer = nn::Sgd {
            momentum: 0.9,
            dampening: 0.0,
            wd: 0.0,
            nesterov: true,
        }
        .build(&vs, 0.01)
        .context("optimizer")?;
        let images = Tensor::randn(
            [args.batch, args.channels, args.image_size, args.image_size],
            (Kind::Float, device),
        );
        let labels = Tensor::randint(args.classes, [args.batch], (Kind::Int64, device));
        let measure = |mode: &str, step: &mut dyn FnMut()| {
            for _ in 0..args.warmup {
                step();
            }
            mentor_worker::synchronize(device);
            let started = Instant::now();
            for _ in 0..args.iterations {
                step();
            }
            mentor_worker::synchronize(device);
            let seconds = started.elapsed().as_secs_f64();
            let rate = (args.batch as usize * args.iterations) as f64 / seconds;
            println!(
                "{}",
                serde_json::json!({
                    "impl": "mentor",
                    "model": name,
                    "mode": mode,
                    "images_per_second": rate,
                    "batch": args.batch,
                    "image_size": args.image_size,
                    "params": params,
                })
            );
        };
        measure("train", &mut || {
            let loss = model
                .forward_t(&images, true)
                .cross_entropy_for_logits(&labels);
            optimizer.backward_step(&loss);
        });
        measure("inference", &mut || {
            let _guard = tch::no_grad_guard();
            let _ = model.forward_t(&images, false);
        });
    }
    Ok(())
}
