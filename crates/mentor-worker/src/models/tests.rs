//! Parameter counts against torchvision, output shapes of every model, noise semantics.

use mentor_plan::{
    BitPlan, CnnPlan, DensenetPlan, EfficientnetPlan, ModelPlan, NoisePlan, ResnetPlan, Stem,
    WideResnetPlan,
};
use tch::nn;
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
    let noise = NoisePlan::default();
    let plain = ModelConfig::from_plan(&wide_resnet(10, 1), &noise, 1, 10, 3, 32);
    assert_eq!(plain.survival(3, 4), 1.0);
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

#[test]
fn channels_last_models_compute_what_the_default_layout_does() {
    for (model, channels, size) in [
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
        ),
        (wide_resnet(10, 1), 3, 32),
        (efficientnet("b0"), 3, 32),
    ] {
        let name = model.kind_name();
        let vs = nn::VarStore::new(Device::Cpu);
        let plain = build_layers(&vs.root(), &config(model, 10, channels, size));
        let wrapped = CpuChannelsLast(plain);
        let xs = Tensor::rand([4, channels, size, size], (Kind::Float, Device::Cpu));
        let expected = wrapped.0.forward_t(&xs, false);
        let actual = wrapped.forward_t(&xs, false);
        assert!(
            actual.allclose(&expected, 1e-4, 1e-5, false),
            "{name}: max difference {}",
            (actual - expected).abs().max().double_value(&[])
        );
    }
}
