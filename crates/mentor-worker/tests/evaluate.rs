//! The evaluate task on real Fashion-MNIST test images: it reports its progress as it goes (what
//! status shows, and where a worker told to stop an attempt stops it), and its accuracy is that
//! of the whole test set.

use mentor_plan::{Plan, Role};
use mentor_worker::dataset::Dataset;
use mentor_worker::models::build;
use mentor_worker::tasks::{model_config, run_task, ModelSource, Outcome, Progress, TaskKind};
use tch::{nn, Device};

const TINY: &str = include_str!("../../../deploy/plans/tiny.toml");

#[test]
fn an_evaluation_reports_progress_until_the_whole_test_set() {
    // Batches of 16: 500 test images take several reports.
    let text = TINY.replacen("[pseudo_labels]\n", "[pseudo_labels]\nbatch_size = 16\n", 1);
    let plan = Plan::from_toml_str(&text).expect("tiny plan");
    let dataset = Dataset::load(&plan, Device::Cpu).expect("Fashion-MNIST (dataset-fashion-mnist)");
    let total = dataset.test_images.size()[0] as u64;
    assert_eq!(total, 500);
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoint = dir.path().join("teacher.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = build(&vs.root(), &model_config(&plan, Role::Teacher, 1, &dataset));
    vs.save(&checkpoint).expect("save");
    let task = TaskKind::Evaluate {
        model: ModelSource {
            checkpoint,
            role: Role::Teacher,
            model_round: 1,
        },
    };

    let mut reports: Vec<Progress> = Vec::new();
    let outcome =
        run_task(&plan, &dataset, &task, None, &mut |p| reports.push(p)).expect("evaluate");
    let Outcome::Evaluated {
        accuracy, examples, ..
    } = outcome
    else {
        panic!("not evaluated: {outcome:?}")
    };
    assert_eq!(examples, total);
    assert!((0.0..=1.0).contains(&accuracy));
    let steps: Vec<u64> = reports.iter().map(|p| p.step).collect();
    assert_eq!(steps, [128, 256, 384, 500]);
    assert!(reports.iter().all(|p| p.total_steps == total));

    // A worker stops an attempt by unwinding out of a progress report: the evaluation ends
    // there, without its outcome.
    let mut seen = 0;
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_task(&plan, &dataset, &task, None, &mut |_| {
            seen += 1;
            std::panic::resume_unwind(Box::new("stop"));
        })
    }));
    assert!(stopped.is_err(), "the evaluation ran past its stop");
    assert_eq!(seen, 1);
}
