//! Plan parsing and validation: the shipped plans parse, and each bad plan gets its message.

use super::*;

const DEMO: &str = include_str!("../../../deploy/plans/fashion-mnist-noisy-student.toml");
const TINY: &str = include_str!("../../../deploy/plans/tiny.toml");

fn error_of(text: &str) -> String {
    match Plan::from_toml_str(text) {
        Ok(_) => panic!("plan was accepted:\n{text}"),
        Err(error) => error.to_string(),
    }
}

/// The tiny plan with one line replaced (the line must exist).
fn tiny_with(old: &str, new: &str) -> String {
    assert!(TINY.contains(old), "tiny plan has no `{old}`");
    TINY.replacen(old, new, 1)
}

#[test]
fn shipped_plans_are_valid() {
    let demo = Plan::from_toml_str(DEMO).expect("demo plan");
    assert_eq!(demo.method, Method::NoisyStudent);
    assert_eq!(demo.rounds, 2);
    assert_eq!(demo.data.labeled_per_class, 100);
    assert_eq!(demo.student.noise.randaugment.ops, 2);
    let tiny = Plan::from_toml_str(TINY).expect("tiny plan");
    assert_eq!(tiny.pseudo_labels.top_k, 3);
    assert_eq!(tiny.student.model.width_at_round(1), 8);
    assert_eq!(tiny.student.model.width_at_round(3), 16);
}

#[test]
fn defaults_fill_missing_fields() {
    let plan = Plan::from_toml_str(TINY).expect("tiny plan");
    assert_eq!(plan.pseudo_labels.temperature, 1.0);
    assert_eq!(plan.pseudo_labels.mode, LabelMode::Soft);
    assert_eq!(plan.teacher.train.optimizer, Optimizer::Sgd);
    assert_eq!(plan.teacher.train.label_smoothing, 0.1);
    assert_eq!(plan.teacher.noise.stochastic_depth_survival, 1.0);
}

#[test]
fn plan_round_trips_through_toml() {
    let plan = Plan::from_toml_str(DEMO).expect("demo plan");
    let again = Plan::from_toml_str(&plan.to_toml_string()).expect("serialized plan");
    assert_eq!(plan, again);
}

#[test]
fn zero_steps_names_the_field() {
    let text = tiny_with(
        "steps = 30\nbatch_size = 32\nunlabeled_ratio",
        "steps = 0\nbatch_size = 32\nunlabeled_ratio",
    );
    assert_eq!(error_of(&text), "student.train.steps: must be >= 1");
}

#[test]
fn top_k_above_classes_is_refused() {
    let text = tiny_with("top_k = 3", "top_k = 11");
    assert_eq!(
        error_of(&text),
        "pseudo_labels.top_k: must be between 1 and data.classes (10)"
    );
}

#[test]
fn unknown_field_is_refused_with_its_name() {
    let text = tiny_with("top_k = 3", "top_k = 3\ntopk = 4");
    let message = error_of(&text);
    assert!(message.contains("unknown field `topk`"), "{message}");
}

#[test]
fn unknown_method_is_refused() {
    let text = tiny_with("method = \"noisy-student\"", "method = \"co-training\"");
    let message = error_of(&text);
    assert!(
        message.contains("unknown variant `co-training`"),
        "{message}"
    );
}

#[test]
fn wrong_version_is_refused() {
    let text = tiny_with("version = 1", "version = 7");
    assert_eq!(
        error_of(&text),
        "version: unsupported plan version 7, expected 1"
    );
}

#[test]
fn student_smaller_than_teacher_is_refused() {
    let text = tiny_with(
        "residual_blocks = 1\nwidth_growth_per_round",
        "residual_blocks = 0\nwidth_growth_per_round",
    );
    let text = text.replacen(
        "[teacher.model]\nkind = \"cnn\"\nwidth = 8",
        "[teacher.model]\nkind = \"cnn\"\nwidth = 8\nresidual_blocks = 2",
        1,
    );
    assert_eq!(
        error_of(&text),
        "student.model: the student must be at least as large as the teacher (width and residual_blocks)"
    );
}

#[test]
fn student_without_pseudo_labels_is_refused() {
    let text = tiny_with("unlabeled_ratio = 2", "unlabeled_ratio = 0");
    assert_eq!(
        error_of(&text),
        "student.train.unlabeled_ratio: must be >= 1: the student learns from pseudo-labeled images"
    );
}

#[test]
fn unknown_randaugment_op_is_refused_with_its_index() {
    let text = tiny_with(
        "randaugment = { ops = 2, magnitude = 9 }",
        "randaugment = { ops = 2, magnitude = 9, op_list = [\"rotate\", \"hue\"] }",
    );
    let message = error_of(&text);
    assert!(
        message.starts_with("student.noise.randaugment.op_list[1]: unknown operation `hue`"),
        "{message}"
    );
}

#[test]
fn dropout_out_of_range_is_refused() {
    let text = tiny_with("dropout = 0.5", "dropout = 1.5");
    assert_eq!(error_of(&text), "student.noise.dropout: must be in [0, 1)");
}

#[test]
fn missing_section_is_refused() {
    let start = TINY.find("[teacher.train]").expect("section");
    let end = TINY[start..].find("[student.model]").expect("next section") + start;
    let text = format!("{}{}", &TINY[..start], &TINY[end..]);
    let message = error_of(&text);
    assert!(message.contains("missing field `train`"), "{message}");
}

#[test]
fn warmup_longer_than_training_is_refused() {
    let text = tiny_with(
        "log_every = 10\n\n[student.model]",
        "log_every = 10\nwarmup_steps = 30\n\n[student.model]",
    );
    assert_eq!(
        error_of(&text),
        "teacher.train.warmup_steps: must be below teacher.train.steps (30)"
    );
}

#[test]
fn teacher_growth_is_refused() {
    let text = tiny_with(
        "hidden = 32\n\n[teacher.train]",
        "hidden = 32\nwidth_growth_per_round = 2\n\n[teacher.train]",
    );
    let message = error_of(&text);
    assert!(
        message.starts_with("teacher.model.width_growth_per_round:"),
        "{message}"
    );
}

#[test]
fn meta_pseudo_labels_is_refused_until_supported() {
    let text = tiny_with(
        "method = \"noisy-student\"",
        "method = \"meta-pseudo-labels\"",
    );
    let message = error_of(&text);
    assert!(
        message.starts_with("method: `meta-pseudo-labels` is not supported"),
        "{message}"
    );
}
