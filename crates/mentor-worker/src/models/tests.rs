//! Parameter counts against torchvision, output shapes of every model, noise semantics.

use mentor_plan::{
    BitPlan, CnnPlan, DensenetPlan, EfficientnetPlan, ModelPlan, NoisePlan, Precision, ResnetPlan,
    RolePlan, Stem, WideResnetPlan,
};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::*;

fn config(model: ModelPlan, classes: i64, channels: i64, resolution: i64) -> ModelConfig {
    ModelConfig {
        model,
        classes,
        channels,
        resolution,
        dropout: 0.2,
        last_survival: 0.8,
        precision: Precision::Float32,
    }
}

fn parameters(model: ModelPlan, classes: i64, channels: i64) -> i64 {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = build(&vs.root(), &config(model, classes, channels, 224));
    parameter_count(&vs)
}

fn resnet(depth: u32, stem: Stem) -> ModelPlan {
    ModelPlan::Resnet(ResnetPlan {
        depth,
        width: 1,
        width_growth_per_round: 0,
        stem,
    })
}

fn efficientnet(preset: &str) -> ModelPlan {
    ModelPlan::Efficientnet(EfficientnetPlan {
        preset: Some(preset.into()),
        phi: None,
        phi_growth_per_round: 0.0,
        base_resolution: None,
    })
}

fn densenet(
    growth_rate: u32,
    block_config: Vec<u32>,
    num_init_features: u32,
    stem: Stem,
) -> ModelPlan {
    ModelPlan::Densenet(DensenetPlan {
        growth_rate,
        block_config,
        num_init_features,
        bn_size: 4,
        drop_rate: 0.0,
        stem,
        growth_rate_growth_per_round: 0,
    })
}

fn bit(depth: u32, width: u32, stem: Stem) -> ModelPlan {
    ModelPlan::Bit(BitPlan {
        depth,
        width,
        width_growth_per_round: 0,
        stem,
    })
}

fn wide_resnet(depth: u32, widen: u32) -> ModelPlan {
    ModelPlan::WideResnet(WideResnetPlan {
        depth,
        widen,
        widen_growth_per_round: 0,
    })
}

#[test]
fn parameter_counts_match_torchvision() {
    assert_eq!(
        parameters(
            densenet(32, vec![6, 12, 24, 16], 64, Stem::Imagenet),
            1000,
            3
        ),
        7_978_856
    );
    assert_eq!(parameters(efficientnet("b0"), 1000, 3), 5_288_548);
    assert_eq!(parameters(resnet(50, Stem::Imagenet), 1000, 3), 25_557_032);
    assert_eq!(parameters(resnet(18, Stem::Imagenet), 1000, 3), 11_689_512);
}

#[test]
fn every_model_gives_batch_by_classes() {
    let models = [
        (
            ModelPlan::Cnn(CnnPlan {
                width: 4,
                residual_blocks: 2,
                hidden: 8,
                width_growth_per_round: 0,
                batch_norm: true,
            }),
            28,
        ),
        (wide_resnet(10, 1), 32),
        (resnet(18, Stem::Small), 32),
        (resnet(50, Stem::Imagenet), 64),
        (bit(50, 1, Stem::Small), 32),
        (densenet(8, vec![2, 2], 16, Stem::Small), 28),
        (densenet(8, vec![2, 2, 2, 2], 16, Stem::Imagenet), 64),
        (efficientnet("b0"), 32),
        (efficientnet("b1"), 35),
    ];
    for (model, size) in models {
        for channels in [1, 3] {
            let name = model.kind_name();
            let vs = nn::VarStore::new(Device::Cpu);
            let built = build(&vs.root(), &config(model.clone(), 7, channels, size));
            let xs = Tensor::rand([2, channels, size, size], (Kind::Float, Device::Cpu));
            assert_eq!(
                built.forward_t(&xs, true).size(),
                vec![2, 7],
                "{name} train, {channels} channels"
            );
            assert_eq!(
                built.forward_t(&xs, false).size(),
                vec![2, 7],
                "{name} eval, {channels} channels"
            );
        }
    }
}

/// The finetuning's model (`without_noise`) trains without dropout anywhere: two forward
/// passes in train mode agree (batch norm in train mode normalises by the batch, the same
/// both times), where the noised model's differ.
#[test]
fn a_model_without_noise_has_no_dropout_left() {
    let noisy_densenet = match densenet(8, vec![2, 2], 16, Stem::Small) {
        ModelPlan::Densenet(plan) => ModelPlan::Densenet(DensenetPlan {
            drop_rate: 0.5,
            ..plan
        }),
        _ => unreachable!("densenet() makes a DenseNet"),
    };
    for model in [noisy_densenet, wide_resnet(10, 1)] {
        let xs = Tensor::rand([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        let twice = |config: &ModelConfig| {
            tch::manual_seed(0);
            let vs = nn::VarStore::new(Device::Cpu);
            let built = build(&vs.root(), config);
            let a = built.forward_t(&xs, true);
            let b = built.forward_t(&xs, true);
            a.allclose(&b, 1e-6, 1e-6, false)
        };
        let mut config = config(model, 10, 3, 32);
        assert!(
            !twice(&config),
            "the noised model {:?} has no noise",
            config.model
        );
        config.without_noise();
        assert!(twice(&config), "noise left in {:?}", config.model);
    }
}

#[test]
fn eval_mode_is_deterministic_despite_noise() {
    for model in [
        wide_resnet(10, 1),
        efficientnet("b0"),
        bit(50, 1, Stem::Small),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let built = build(&vs.root(), &config(model, 10, 3, 32));
        let xs = Tensor::rand([3, 3, 32, 32], (Kind::Float, Device::Cpu));
        let a = built.forward_t(&xs, false);
        let b = built.forward_t(&xs, false);
        assert!(a.allclose(&b, 1e-6, 1e-6, false));
    }
}

#[test]
fn bigger_efficientnets_have_more_parameters() {
    let b0 = parameters(efficientnet("b0"), 10, 3);
    let b1 = parameters(efficientnet("b1"), 10, 3);
    let b2 = parameters(efficientnet("b2"), 10, 3);
    assert!(b0 < b1 && b1 < b2, "{b0} {b1} {b2}");
}

#[test]
fn survival_follows_the_linear_rule() {
    let config = config(wide_resnet(10, 1), 10, 3, 32);
    assert!((config.survival(0, 4) - 0.95).abs() < 1e-12);
    assert!((config.survival(3, 4) - 0.8).abs() < 1e-12);
    let role = RolePlan {
        model: wide_resnet(10, 1),
        train: None,
        checkpoint: None,
        noise: NoisePlan::default(),
        precision: Precision::Float32,
    };
    let plain = ModelConfig::from_plan(&role, 1, 10, 3, 32);
    assert_eq!(plain.survival(3, 4), 1.0);
}

/// The same weights in bfloat16 precision: 32-bit logits within bfloat16 rounding of the 32-bit
/// model's (but not equal: the products did run in bfloat16), gradients for the 32-bit weights,
/// and autocast off again once the forward is done.
#[test]
fn a_bfloat16_model_runs_under_autocast_and_trains_its_float_weights() {
    let cnn = ModelPlan::Cnn(CnnPlan {
        width: 8,
        residual_blocks: 1,
        hidden: 16,
        width_growth_per_round: 0,
        batch_norm: true,
    });
    tch::manual_seed(3);
    let float_vs = nn::VarStore::new(Device::Cpu);
    let float = build(&float_vs.root(), &config(cnn.clone(), 10, 1, 28));
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mixed = build(
        &vs.root(),
        &ModelConfig {
            precision: Precision::Bfloat16,
            ..config(cnn, 10, 1, 28)
        },
    );
    vs.copy(&float_vs).expect("the same weights");
    let xs = Tensor::randn([16, 1, 28, 28], (Kind::Float, Device::Cpu));
    let reference = float.forward_t(&xs, false);
    let logits = mixed.forward_t(&xs, false);
    assert_eq!(logits.kind(), Kind::Float);
    assert!(!Autocast::is_enabled(Device::Cpu));
    let difference = (&logits - &reference).abs().max().double_value(&[]);
    let scale = reference.abs().max().double_value(&[]);
    assert!(difference > 0.0, "the bfloat16 model computed in 32 bits");
    assert!(difference < 0.05 * scale, "{difference} against {scale}");

    logits.sum(Kind::Float).backward();
    for (name, weight) in vs.variables() {
        if weight.requires_grad() {
            assert_eq!(weight.kind(), Kind::Float, "{name}");
            assert!(weight.grad().defined(), "{name} has no gradient");
        }
    }
}

#[test]
fn drop_path_is_identity_in_eval_and_unbiased_in_training() {
    let xs = Tensor::ones([20000, 3], (Kind::Float, Device::Cpu));
    assert!(drop_path(&xs, 0.7, false).equal(&xs));
    let trained = drop_path(&xs, 0.7, true);
    let mean = trained.mean(Kind::Float).double_value(&[]);
    assert!((mean - 1.0).abs() < 0.03, "{mean}");
    // Whole samples are dropped: each row is all zeros or all 1/0.7.
    let row_min = trained.amin(1, false);
    let row_max = trained.amax(1, false);
    assert!(row_min.equal(&row_max));
}

#[test]
fn channels_last_keeps_values_and_lays_channels_innermost() {
    for channels in [1, 3] {
        let xs = Tensor::rand([2, channels, 5, 6], (Kind::Float, Device::Cpu));
        let laid = channels_last(&xs);
        assert_eq!(laid.size(), xs.size());
        assert_eq!(
            laid.stride(),
            vec![30 * channels, 1, 6 * channels, channels]
        );
        assert!(laid.equal(&xs), "{channels} channels");
    }
}

/// Channels-last strides of a 4-D tensor of this size.
fn channels_last_strides(size: &[i64]) -> Vec<i64> {
    vec![size[1] * size[2] * size[3], 1, size[3] * size[1], size[1]]
}

/// Default (row-major) strides of a 4-D tensor of this size.
fn default_strides(size: &[i64]) -> Vec<i64> {
    vec![size[1] * size[2] * size[3], size[2] * size[3], size[3], 1]
}

#[test]
fn channels_last_models_compute_what_the_default_layout_does() {
    for (model, channels, size, grouped) in [
        (
            ModelPlan::Cnn(CnnPlan {
                width: 8,
                residual_blocks: 1,
                hidden: 16,
                width_growth_per_round: 0,
                batch_norm: true,
            }),
            1,
            28,
            false,
        ),
        (wide_resnet(10, 1), 3, 32, false),
        (efficientnet("b0"), 3, 32, true),
    ] {
        let name = model.kind_name();
        let vs = nn::VarStore::new(Device::Cpu);
        let wrapped = CpuChannelsLast(build_layers(&vs.root(), &config(model, 10, channels, size)));
        // Depthwise weights (one input channel per group, more than one output) are laid out
        // channels-last, every other weight keeps the default layout.
        let mut laid_out = Vec::new();
        for weight in vs.trainable_variables() {
            let s = weight.size();
            if s.len() == 4 && s[1] == 1 && s[0] > 1 && s[2] > 1 && grouped {
                assert_eq!(weight.stride(), channels_last_strides(&s), "{name}: {s:?}");
                assert!(weight.requires_grad(), "{name}: still a trainable variable");
                laid_out.push(weight);
            } else if s.len() == 4 {
                assert_eq!(weight.stride(), default_strides(&s), "{name}: {s:?}");
            }
        }
        assert_eq!(!laid_out.is_empty(), grouped, "{name}");
        let xs = Tensor::rand([4, channels, size, size], (Kind::Float, Device::Cpu));
        let actual = wrapped.forward_t(&xs, false);
        // The same variables in the default layout, on an input in the default layout. (A
        // depthwise weight's memory is the same in both layouts, so `contiguous()` would keep
        // its strides: copy into a fresh default-layout tensor.)
        for mut weight in laid_out {
            let size = weight.size();
            let mut plain = Tensor::empty(size.as_slice(), (weight.kind(), Device::Cpu));
            tch::no_grad(|| plain.copy_(&weight));
            weight.set_data(&plain);
            assert_eq!(weight.stride(), default_strides(&size));
        }
        let expected = wrapped.0.forward_t(&xs, false);
        assert!(
            actual.allclose(&expected, 1e-4, 1e-5, false),
            "{name}: max difference {}",
            (actual - expected).abs().max().double_value(&[])
        );
    }
}

/// The weight of EfficientNet's first depthwise convolution (stage 1 has no expansion).
fn first_depthwise_weight(vs: &nn::VarStore) -> Tensor {
    (vs.root() / "features" / "1" / "0" / "block" / "0" / "0")
        .get("weight")
        .expect("the first depthwise weight")
}

#[test]
fn channels_last_weights_train_and_round_trip_through_checkpoints() {
    let model_config = config(efficientnet("b0"), 10, 3, 32);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = build(&vs.root(), &model_config);
    let depthwise = || first_depthwise_weight(&vs);
    assert_eq!(
        depthwise().stride(),
        channels_last_strides(&depthwise().size())
    );
    let mut optimizer = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, 0.1)
    .expect("optimizer");
    let xs = Tensor::rand([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
    let before = depthwise().copy();
    for _ in 0..2 {
        let loss = net.forward_t(&xs, true).cross_entropy_for_logits(&labels);
        optimizer.backward_step(&loss);
    }
    assert!(
        !depthwise().equal(&before),
        "the optimizer updates the laid-out weight"
    );
    assert_eq!(
        depthwise().stride(),
        channels_last_strides(&depthwise().size())
    );

    // A depthwise weight with one input channel per group has the default layout's memory; a
    // channels-last variable with more channels does not, and checkpoints must take it too.
    let extra = channels_last(&Tensor::rand([2, 3, 4, 4], (Kind::Float, Device::Cpu)));
    assert!(!extra.is_contiguous());
    let _ = vs.root().add("extra", extra, false);

    let directory = std::env::temp_dir().join(format!("mentor-layout-{}", std::process::id()));
    let path = directory.join("model.safetensors");
    crate::tasks::save_checkpoint(&vs, &path).expect("save");
    let mut loaded = nn::VarStore::new(Device::Cpu);
    let _ = build(&loaded.root(), &model_config);
    let _ = loaded.root().zeros_no_train("extra", &[2, 3, 4, 4]);
    loaded.load(&path).expect("load");
    let saved = vs.variables();
    assert_eq!(loaded.variables().len(), saved.len());
    let loaded_depthwise = first_depthwise_weight(&loaded);
    assert_eq!(
        loaded_depthwise.stride(),
        channels_last_strides(&loaded_depthwise.size())
    );
    for (name, value) in loaded.variables() {
        assert!(value.equal(&saved[&name]), "{name} survives the round trip");
    }
    std::fs::remove_dir_all(&directory).expect("clean up");
}

/// Whether the model of `plan` computes on one `side`-pixel square image (libtorch refuses a
/// pooling window larger than its input: the op panics).
fn takes_side(plan: &ModelPlan, side: i64) -> bool {
    let plan = plan.clone();
    std::panic::catch_unwind(move || {
        let vs = nn::VarStore::new(Device::Cpu);
        let built = build(&vs.root(), &config(plan, 3, 1, side));
        let xs = Tensor::rand([1, 1, side, side], (Kind::Float, Device::Cpu));
        built.forward_t(&xs, false).size() == vec![1, 3]
    })
    .unwrap_or(false)
}

#[test]
fn the_plans_input_side_check_agrees_with_the_networks() {
    let cnn = ModelPlan::Cnn(CnnPlan {
        width: 2,
        residual_blocks: 0,
        hidden: 4,
        width_growth_per_round: 0,
        batch_norm: true,
    });
    let mut models = vec![cnn];
    for stem in [Stem::Imagenet, Stem::Small] {
        for blocks in 2..=4 {
            models.push(densenet(2, vec![1; blocks], 4, stem));
        }
    }
    for model in models {
        // Every side the check accepts computes; the largest it refuses does not (one panic
        // per model, printed by the test harness).
        let sides: Vec<u32> = (1..=40).collect();
        let refused: Vec<u32> = sides
            .iter()
            .copied()
            .filter(|&side| model.input_side_problem(side).is_some())
            .collect();
        for &side in sides.iter().filter(|side| !refused.contains(side)) {
            assert!(takes_side(&model, side.into()), "{model:?} at {side}");
        }
        if let Some(&largest) = refused.last() {
            assert!(
                !takes_side(&model, largest.into()),
                "{model:?} at {largest}"
            );
            // The check refuses a prefix of sides: smaller images only shrink further.
            assert_eq!(refused, (1..=largest).collect::<Vec<_>>(), "{model:?}");
        }
    }
    // The default DenseNet (ImageNet stem) cannot take Fashion-MNIST's 28 pixels; 32 it can.
    let default = densenet(32, vec![6, 12, 24, 16], 64, Stem::Imagenet);
    assert!(default.input_side_problem(28).is_some());
    assert!(default.input_side_problem(32).is_none());
}
