//! The label task on real Fashion-MNIST images: a shard is committed once, a label job started
//! again reuses it without labeling, and a shard of another teacher is refused by name.

use mentor_plan::{Plan, Role};
use mentor_worker::dataset::Dataset;
use mentor_worker::models::build;
use mentor_worker::tasks::{model_config, run_task, ModelSource, Outcome, TaskKind};
use tch::{nn, Device};

const TINY: &str = include_str!("../../../deploy/plans/tiny.toml");

fn label_task(checkpoint: &std::path::Path, storage: &str) -> TaskKind {
    TaskKind::Label {
        teacher: ModelSource {
            checkpoint: checkpoint.to_path_buf(),
            role: Role::Teacher,
            model_round: 1,
        },
        round: 1,
        shard_index: 1,
        start: 400,
        end: 800,
        storage: storage.to_string(),
        previous_teachers: Vec::new(),
    }
}

#[test]
fn a_committed_shard_is_reused_and_another_teachers_is_refused() {
    let plan = Plan::from_toml_str(TINY).expect("tiny plan");
    let dataset = Dataset::load(&plan, Device::Cpu).expect("Fashion-MNIST (dataset-fashion-mnist)");
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoint = dir.path().join("teacher.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = build(&vs.root(), &model_config(&plan, Role::Teacher, 1, &dataset));
    vs.save(&checkpoint).expect("save");
    let storage = dir.path().join("labels").display().to_string();

    let mut reports = 0;
    let first = run_task(
        &plan,
        &dataset,
        &label_task(&checkpoint, &storage),
        None,
        &mut |_| reports += 1,
    )
    .expect("label");
    let Outcome::Labeled {
        examples,
        sha256,
        histogram,
        ..
    } = first
    else {
        panic!("not labeled: {first:?}")
    };
    assert_eq!(examples, 400);
    assert_eq!(histogram.total(), 400);
    assert!(reports > 0, "no progress reported");

    // Started again: the committed shard is verified and reported, no inference runs.
    let mut reports_again = 0;
    let again = run_task(
        &plan,
        &dataset,
        &label_task(&checkpoint, &storage),
        None,
        &mut |_| reports_again += 1,
    )
    .expect("reuse");
    let Outcome::Labeled {
        sha256: reused,
        histogram: reused_histogram,
        ..
    } = again
    else {
        panic!("not labeled")
    };
    assert_eq!(reused, sha256);
    assert_eq!(reused_histogram, histogram);
    assert_eq!(reports_again, 0, "the shard was labeled again");

    // The same shard key under another teacher: refused, naming the shard.
    let other = dir.path().join("other-teacher.safetensors");
    std::fs::copy(&checkpoint, &other).expect("copy");
    let error = run_task(
        &plan,
        &dataset,
        &label_task(&other, &storage),
        None,
        &mut |_| {},
    )
    .expect_err("stale shard")
    .to_string();
    assert!(error.contains("round-1/shard-00001.safetensors"), "{error}");
    assert!(error.contains("holds the labels of teacher"), "{error}");
}
