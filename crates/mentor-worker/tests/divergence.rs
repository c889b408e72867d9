//! Training that diverges stops with an error that says so and names the steps (the losses are
//! read when a step reports, saves or evaluates, not at every step), and saves nothing it
//! computed after the divergence.

use mentor_plan::{Plan, Role};
use mentor_worker::dataset::Dataset;
use mentor_worker::mpl::resume_path;
use mentor_worker::tasks::{run_task, TaskKind};
use tch::Device;

const TINY: &str = include_str!("../../../deploy/plans/tiny.toml");
const TINY_MPL: &str = include_str!("../../../deploy/plans/tiny-mpl.toml");

#[test]
fn a_diverging_teacher_stops_naming_the_steps_before_saving() {
    let text = TINY.replacen(
        "[teacher.train]\n",
        "[teacher.train]\nlearning_rate = 1e30\n",
        1,
    );
    let plan = Plan::from_toml_str(&text).expect("tiny plan with a huge learning rate");
    let dataset = Dataset::load(&plan, Device::Cpu).expect("Fashion-MNIST (dataset-fashion-mnist)");
    let dir = tempfile::tempdir().expect("tempdir");
    let output = dir.path().join("teacher.safetensors");
    let task = TaskKind::Train {
        role: Role::Teacher,
        round: 1,
        output: output.clone(),
        selection: None,
    };
    let error = run_task(&plan, &dataset, &task, None, &mut |_| {})
        .expect_err("a learning rate of 1e30 must diverge")
        .to_string();
    // The tiny plan reports every 10 steps.
    assert!(
        error.contains("teacher training diverged between steps 0 and 10"),
        "{error}"
    );
    assert!(error.contains("lower its learning rate"), "{error}");
    assert!(!output.exists(), "a diverged teacher was saved");
}

#[test]
fn a_diverging_joint_training_stops_naming_the_steps_before_saving() {
    let text = TINY_MPL.replacen(
        "[mpl]\n",
        "[mpl]\nteacher_learning_rate = 1e30\nstudent_learning_rate = 1e30\ncheckpoint_every = 5\n",
        1,
    );
    let plan = Plan::from_toml_str(&text).expect("tiny plan with huge learning rates");
    let dataset = Dataset::load(&plan, Device::Cpu).expect("Fashion-MNIST (dataset-fashion-mnist)");
    let dir = tempfile::tempdir().expect("tempdir");
    let teacher_output = dir.path().join("teacher.safetensors");
    let task = TaskKind::TrainMpl {
        teacher_output: teacher_output.clone(),
        student_output: dir.path().join("student.safetensors"),
    };
    let error = run_task(&plan, &dataset, &task, None, &mut |_| {})
        .expect_err("learning rates of 1e30 must diverge")
        .to_string();
    assert!(
        error.contains("Meta Pseudo Labels diverged between steps 0 and 5"),
        "{error}"
    );
    assert!(error.contains("lower the learning rates"), "{error}");
    assert!(
        !resume_path(&teacher_output).exists(),
        "a diverged state was saved"
    );
    assert!(!teacher_output.exists(), "a diverged teacher was saved");
}
