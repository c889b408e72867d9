//! Plan parsing and validation: the shipped plans parse, and each bad plan gets its message.

use super::*;

const DEMO: &str = include_str!("../../../deploy/plans/fashion-mnist-noisy-student.toml");
const TINY: &str = include_str!("../../../deploy/plans/tiny.toml");
const TINY_MPL: &str = include_str!("../../../deploy/plans/tiny-mpl.toml");

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

/// The tiny Meta Pseudo Labels plan with one line replaced (the line must exist).
fn tiny_mpl_with(old: &str, new: &str) -> String {
    assert!(TINY_MPL.contains(old), "tiny-mpl plan has no `{old}`");
    TINY_MPL.replacen(old, new, 1)
}

#[test]
fn shipped_plans_are_valid() {
    // As a new run checks them too: no setting that would do nothing.
    for text in [
        DEMO,
        TINY,
        include_str!("../../../deploy/plans/fashion-mnist-mpl-distill.toml"),
    ] {
        let plan = Plan::from_toml_str(text).expect("plan");
        plan.check_unused().expect("no unused setting");
    }
    let demo = Plan::from_toml_str(DEMO).expect("demo plan");
    assert_eq!(demo.method, Method::NoisyStudent);
    assert_eq!(demo.rounds(), 2);
    assert_eq!(demo.data.labeled_per_class, 100);
    assert_eq!(demo.student.noise.randaugment.ops, 2);
    let tiny = Plan::from_toml_str(TINY).expect("tiny plan");
    assert_eq!(tiny.top_k(), 3);
    let width = |round| match tiny.student.model.at_round(round) {
        ModelPlan::Cnn(cnn) => cnn.width,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(width(1), 8);
    assert_eq!(width(3), 16);
}

#[test]
fn defaults_fill_missing_fields() {
    let plan = Plan::from_toml_str(TINY).expect("tiny plan");
    assert_eq!(plan.pseudo_labels.temperature, 1.0);
    assert_eq!(plan.pseudo_labels.mode, LabelMode::Soft);
    let train = plan.teacher.train.as_ref().expect("teacher.train");
    assert_eq!(train.optimizer, Optimizer::Sgd);
    assert_eq!(train.label_smoothing, 0.1);
    assert_eq!(plan.teacher.noise.stochastic_depth_survival, 1.0);
}

#[test]
fn plan_round_trips_through_toml() {
    let plan = Plan::from_toml_str(DEMO).expect("demo plan");
    let again = Plan::from_toml_str(&plan.to_toml_string()).expect("serialized plan");
    assert_eq!(plan, again);
}

#[test]
fn precision_is_read_per_role_and_left_out_of_the_toml_at_its_default() {
    let plan = Plan::from_toml_str(TINY).expect("tiny plan");
    assert_eq!(plan.teacher.precision, Precision::Float32);
    // Plans written before the field keep their serialization (MPL resume fingerprints).
    let toml = plan.to_toml_string();
    assert!(
        !toml.lines().any(|line| line.starts_with("precision")),
        "{toml}"
    );

    let mixed = tiny_with(
        "[teacher.model]",
        "[teacher]\nprecision = \"bfloat16\"\n\n[teacher.model]",
    );
    let plan = Plan::from_toml_str(&mixed).expect("bfloat16 teacher");
    assert_eq!(plan.teacher.precision, Precision::Bfloat16);
    assert_eq!(plan.student.precision, Precision::Float32);
    let again = Plan::from_toml_str(&plan.to_toml_string()).expect("serialized plan");
    assert_eq!(again, plan);

    let error = error_of(&tiny_with(
        "[teacher.model]",
        "[teacher]\nprecision = \"float16\"\n\n[teacher.model]",
    ));
    assert!(
        error.contains("float16") && error.contains("bfloat16"),
        "{error}"
    );
}

#[test]
fn zero_steps_names_the_field() {
    let text = tiny_with(
        "steps = 30\nbatch_size = 32\nunlabeled_ratio",
        "steps = 0\nbatch_size = 32\nunlabeled_ratio",
    );
    assert_eq!(error_of(&text), "student.train.steps: must be >= 1, not 0");
    // Values that would allocate a worker's memory away, or loop for ever, are refused.
    assert_eq!(
        error_of(&tiny_with(
            "top_k = 3",
            "top_k = 3\nprefetch_batches = 1000000000"
        )),
        "pseudo_labels.prefetch_batches: must be in [1, 1024], not 1000000000"
    );
    assert_eq!(
        error_of(&tiny_with(
            "top_k = 3",
            "top_k = 3\nbatch_size = 1000000000"
        )),
        "pseudo_labels.batch_size: must be in [1, 65536], not 1000000000"
    );
    assert_eq!(
        error_of(&tiny_with("rounds = 2", "rounds = 4000000000")),
        "rounds: must be in [1, 1000], not 4000000000"
    );
}

#[test]
fn timeouts_past_ten_years_are_refused_with_their_field() {
    // Deadlines are computed from these (now + timeout, twice the heartbeat timeout): a value
    // near i64::MAX (the largest TOML integer) would overflow them, so the plan refuses it naming the field.
    let workers = |line: &str| {
        // The tiny plan sets the heartbeat timeout already: drop its line first.
        let text = TINY.replacen("heartbeat_timeout_seconds = 10\n", "", 1);
        text.replacen("[workers]\n", &format!("[workers]\n{line}\n"), 1)
    };
    for field in [
        "heartbeat_timeout_seconds",
        "collective_timeout_seconds",
        "join_timeout_seconds",
        "progress_timeout_seconds",
    ] {
        assert_eq!(
            error_of(&workers(&format!("{field} = 9223372036854775807"))),
            format!(
                "workers.{field}: must be in [1, 315360000] (ten years), not 9223372036854775807"
            )
        );
        if field == "progress_timeout_seconds" {
            Plan::from_toml_str(&workers(&format!("{field} = 0"))).expect("0: never");
        } else {
            assert!(error_of(&workers(&format!("{field} = 0")))
                .starts_with(&format!("workers.{field}: must be in [1, 315360000]")));
        }
        Plan::from_toml_str(&workers(&format!("{field} = 315360000")))
            .expect("ten years are allowed");
    }
    assert_eq!(
        error_of(&tiny_with(
            "top_k = 3",
            "top_k = 3\nlease_seconds = 315360001"
        )),
        "pseudo_labels.lease_seconds: must be in [1, 315360000] (ten years), not 315360001"
    );
    // A heartbeat timeout of one heartbeat's interval loses a worker for a late heartbeat.
    assert_eq!(
        error_of(&workers("heartbeat_timeout_seconds = 1")),
        "workers.heartbeat_timeout_seconds: must be >= 2 (workers heartbeat every second), not 1"
    );
    Plan::from_toml_str(&workers("heartbeat_timeout_seconds = 2")).expect("two seconds");
}

#[test]
fn a_name_that_cannot_be_a_run_directory_is_refused() {
    for (name, reason) in [
        ("", "name: must not be empty"),
        ("..", "name: must not start with `.`"),
        (".", "name: must not start with `.`"),
        (".hidden", "name: must not start with `.`"),
        (
            "runs/../x",
            "name: may only hold ASCII letters, digits, `-`, `_` and `.`",
        ),
    ] {
        let text = tiny_with("name = \"tiny\"", &format!("name = \"{name}\""));
        assert_eq!(error_of(&text), reason, "name {name:?}");
    }
    let text = tiny_with("name = \"tiny\"", "name = \"tiny.v2_a-b\"");
    assert_eq!(
        Plan::from_toml_str(&text).expect("plan").name,
        "tiny.v2_a-b"
    );
}

#[test]
fn top_k_above_classes_is_refused() {
    let text = tiny_with("top_k = 3", "top_k = 11");
    assert_eq!(
        error_of(&text),
        "pseudo_labels.top_k: must be between 1 and data.classes (10), not 11"
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
    let text = text
        .replacen(
            "[teacher.model]\nkind = \"cnn\"\nwidth = 8",
            "[teacher.model]\nkind = \"cnn\"\nwidth = 8\nresidual_blocks = 2",
            1,
        )
        .replacen("stochastic_depth_survival = 0.8\n", "", 1);
    assert_eq!(
        error_of(&text),
        "student.model.residual_blocks: 0 is below the teacher's 2: the student must be at least as large as the teacher"
    );
}

#[test]
fn student_without_pseudo_labels_is_refused() {
    let text = tiny_with("unlabeled_ratio = 2", "unlabeled_ratio = 0");
    assert_eq!(
        error_of(&text),
        "student.train.unlabeled_ratio: required, from 1 to 1024 (0 or left out): the student learns from pseudo-labeled images"
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
fn randaugment_cutout_is_read_and_checked() {
    let text = tiny_with(
        "randaugment = { ops = 2, magnitude = 9 }",
        "randaugment = { ops = 2, magnitude = 9, cutout = 0.5 }",
    );
    let plan = Plan::from_toml_str(&text).expect("valid plan");
    assert_eq!(plan.student.noise.randaugment.cutout, 0.5);
    let text = tiny_with(
        "randaugment = { ops = 2, magnitude = 9 }",
        "randaugment = { ops = 2, magnitude = 9, cutout = 1.5 }",
    );
    assert_eq!(
        error_of(&text),
        "student.noise.randaugment.cutout: must be in [0, 1], not 1.5"
    );
}

#[test]
fn dropout_out_of_range_is_refused() {
    let text = tiny_with("dropout = 0.5", "dropout = 1.5");
    assert_eq!(
        error_of(&text),
        "student.noise.dropout: must be in [0, 1), not 1.5"
    );
}

#[test]
fn missing_section_is_refused() {
    let start = TINY.find("[teacher.train]").expect("section");
    let end = TINY[start..].find("[student.model]").expect("next section") + start;
    let text = format!("{}{}", &TINY[..start], &TINY[end..]);
    let message = error_of(&text);
    assert_eq!(
        message,
        "teacher.train: required for method = \"noisy-student\" (or teacher.checkpoint, the first teacher's weights from a file)"
    );
}

/// The tiny plan with its first teacher read from `path` instead of trained.
fn tiny_with_teacher_checkpoint(path: &str) -> String {
    let start = TINY.find("[teacher.train]").expect("section");
    let end = TINY[start..].find("[student.model]").expect("next section") + start;
    let text = format!("{}{}", &TINY[..start], &TINY[end..]);
    text.replacen(
        "[teacher.model]",
        &format!("[teacher]\ncheckpoint = \"{path}\"\n\n[teacher.model]"),
        1,
    )
}

#[test]
fn a_teacher_checkpoint_replaces_the_teacher_training() {
    let plan = Plan::from_toml_str(&tiny_with_teacher_checkpoint("runs/a/teacher.safetensors"))
        .expect("plan with a teacher checkpoint");
    assert_eq!(
        plan.teacher.checkpoint.as_deref(),
        Some(Path::new("runs/a/teacher.safetensors"))
    );
    assert!(plan.teacher.train.is_none());
    let again = Plan::from_toml_str(&plan.to_toml_string()).expect("serialized plan");
    assert_eq!(plan, again);
    // A plan without one serializes as before: runs recorded earlier keep their identity.
    let tiny = Plan::from_toml_str(TINY).expect("tiny plan");
    assert!(!tiny.to_toml_string().contains("checkpoint"));
}

#[test]
fn a_teacher_checkpoint_is_refused_where_it_cannot_apply() {
    let both = tiny_with(
        "[teacher.model]",
        "[teacher]\ncheckpoint = \"teacher.safetensors\"\n\n[teacher.model]",
    );
    assert_eq!(
        error_of(&both),
        "teacher.train: not used when teacher.checkpoint gives the first teacher; remove one of them"
    );
    assert_eq!(
        error_of(&tiny_with_teacher_checkpoint("")),
        "teacher.checkpoint: must not be empty"
    );
    let student = tiny_with(
        "[student.model]",
        "[student]\ncheckpoint = \"student.safetensors\"\n\n[student.model]",
    );
    assert_eq!(
        error_of(&student),
        "student.checkpoint: only the teacher starts from a checkpoint; each student trains from scratch"
    );
    let mpl = TINY_MPL.replacen(
        "[teacher.model]",
        "[teacher]\ncheckpoint = \"teacher.safetensors\"\n\n[teacher.model]",
        1,
    );
    assert_eq!(
        error_of(&mpl),
        "teacher.checkpoint: not used by Meta Pseudo Labels, whose teacher and student start together from scratch; remove it"
    );
}

#[test]
fn warmup_longer_than_training_is_refused() {
    let text = tiny_with(
        "log_every = 10\n\n[student.model]",
        "log_every = 10\nwarmup_steps = 30\n\n[student.model]",
    );
    assert_eq!(
        error_of(&text),
        "teacher.train.warmup_steps: must be below teacher.train.steps (30), not 30"
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
        message.starts_with("teacher.model: only students grow"),
        "{message}"
    );
}

#[test]
fn meta_pseudo_labels_needs_its_section() {
    let text = tiny_with(
        "method = \"noisy-student\"",
        "method = \"meta-pseudo-labels\"",
    );
    assert_eq!(
        error_of(&text),
        "mpl: required when method = \"meta-pseudo-labels\""
    );
}

#[test]
fn shipped_mpl_plans_are_valid() {
    for text in [
        include_str!("../../../deploy/plans/fashion-mnist-mpl.toml"),
        include_str!("../../../deploy/plans/fashion-mnist-mpl-gpu.toml"),
        include_str!("../../../deploy/plans/fashion-mnist-mpl-long.toml"),
        include_str!("../../../deploy/plans/fashion-mnist-mpl-30k.toml"),
        include_str!("../../../deploy/plans/fashion-mnist-mpl-30k-mu7.toml"),
        include_str!("../../../deploy/plans/fashion-mnist-mpl-45k-mu7.toml"),
        include_str!("../../../deploy/plans/fashion-mnist-mpl-45k.toml"),
        include_str!("../../../deploy/plans/fashion-mnist-mpl-bf16.toml"),
        include_str!("../../../deploy/plans/fashion-mnist-mpl-30k-mu7-w10.toml"),
        include_str!("../../../deploy/plans/fashion-mnist-mpl-30k-mu7-w10-eval.toml"),
        TINY_MPL,
    ] {
        let plan = Plan::from_toml_str(text).expect("mpl plan");
        assert_eq!(plan.method, Method::MetaPseudoLabels);
        assert!(plan.mpl.is_some());
        plan.check_unused().expect("no unused setting");
    }
    let bad = tiny_mpl_with("mpl_sign = \"theory\"", "mpl_sign = \"sideways\"");
    assert!(error_of(&bad).contains("unknown variant `sideways`"));
    // The feedback's measure: training mode unless told, and left out of the written plan
    // then (plans and resume saves of older runs keep their identity).
    let default = Plan::from_toml_str(TINY_MPL).expect("tiny mpl");
    let mpl = default.mpl.as_ref().expect("mpl");
    assert_eq!(mpl.feedback, MplFeedback::Train);
    assert!(!default.to_toml_string().contains("feedback"));
    let eval = Plan::from_toml_str(&tiny_mpl_with(
        "mpl_sign = \"theory\"",
        "mpl_sign = \"theory\"\nfeedback = \"eval\"",
    ))
    .expect("eval feedback");
    assert_eq!(eval.mpl.as_ref().expect("mpl").feedback, MplFeedback::Eval);
    assert!(eval.to_toml_string().contains("feedback = \"eval\""));
    let bad = tiny_mpl_with("mpl_sign = \"theory\"", "feedback = \"both\"");
    assert!(
        error_of(&bad).contains("unknown variant `both`"),
        "{}",
        error_of(&bad)
    );
    let bad = tiny_mpl_with(
        "steps = 40",
        "steps = 40\nwarmup_steps = 10\nstudent_wait_steps = 30",
    );
    assert_eq!(
        error_of(&bad),
        "mpl.student_wait_steps: the student's wait plus its warmup (30 + 10) must be below mpl.steps (40)"
    );
    let bad = tiny_mpl_with("rounds = 1", "rounds = 2");
    assert_eq!(
        error_of(&bad),
        "rounds: Meta Pseudo Labels runs one round; set rounds = 1"
    );
}

/// A plan whose student is `model` (TOML body of `[student.model]`), teacher unchanged.
/// The tiny plan with another student model, without stochastic depth (models without
/// residual blocks refuse it).
fn tiny_with_student_model(model: &str) -> String {
    let start = TINY.find("[student.model]").expect("section");
    let end = TINY[start..].find("[student.train]").expect("next section") + start;
    format!(
        "{}[student.model]\n{model}\n\n{}",
        &TINY[..start],
        &TINY[end..]
    )
    .replacen("stochastic_depth_survival = 0.8\n", "", 1)
}

/// A rule broken names the value the plan gave; sizes past any real batch are refused before a
/// worker allocates them.
#[test]
fn a_broken_rule_names_the_value_given() {
    let message = error_of(&tiny_with(
        "learning_rate = 0.02",
        "learning_rate = 0.02\nmomentum = 1.5",
    ));
    assert!(
        message.contains("student.train.momentum: must be in [0, 1), not 1.5"),
        "{message}"
    );
    let message = error_of(&tiny_mpl_with("mu = 2", "mu = 100000"));
    assert!(
        message.contains("mpl.mu: must be in [1, 1024], not 100000"),
        "{message}"
    );
    let message = error_of(&tiny_mpl_with(
        "[mpl]",
        "[mpl.randaugment]\nops = 100000\n\n[mpl]",
    ));
    assert!(
        message.contains("ops: must be <= 16, not 100000"),
        "{message}"
    );
}

/// Settings that would do nothing where they are set are refused, naming them, rather than
/// ignored: stochastic depth on a model without residual blocks, RandAugment settings without
/// operations, a class-balance size without balancing, noise for a teacher that is not trained,
/// finetune settings without finetune steps, growth without a second round.
#[test]
fn settings_that_would_do_nothing_are_refused() {
    // Refused for new runs; a recorded plan with one still reads (it resumes unchanged).
    let error_of = |text: &str| match Plan::from_toml_str(text)
        .expect("a valid plan")
        .check_unused()
    {
        Ok(()) => panic!("accepted:\n{text}"),
        Err(error) => error.to_string(),
    };
    // The tiny plan's teacher is a cnn without residual blocks.
    let message = error_of(&tiny_with(
        "[student.model]",
        "[teacher.noise]\nstochastic_depth_survival = 0.8\n\n[student.model]",
    ));
    assert!(
        message.starts_with(
            "teacher.noise.stochastic_depth_survival: teacher.model has no residual blocks"
        ),
        "{message}"
    );
    let message = error_of(&tiny_with(
        "[student.model]",
        "[teacher.noise]\nrandaugment = { magnitude = 5 }\n\n[student.model]",
    ));
    assert!(
        message.starts_with("teacher.noise.randaugment.ops: is 0"),
        "{message}"
    );
    let message = error_of(&tiny_with(
        "top_k = 3",
        "top_k = 3\nbalance = false\nper_class = 100",
    ));
    assert!(message.starts_with("pseudo_labels.per_class:"), "{message}");
    let message = error_of(&format!(
        "{}\n[teacher.noise]\ndropout = 0.5\n",
        tiny_with_teacher_checkpoint("teacher.safetensors")
    ));
    assert!(message.starts_with("teacher.noise: not used"), "{message}");
    // A finetune table without steps (no finetune), growth in a plan of one round.
    let message = error_of(&tiny_mpl_with(
        "finetune = { steps = 10, batch_size = 32, learning_rate = 0.01 }",
        "finetune = { batch_size = 32, learning_rate = 0.01 }",
    ));
    assert!(message.starts_with("mpl.finetune.steps: is 0"), "{message}");
    let message = error_of(&tiny_with("rounds = 2", "rounds = 1"));
    assert!(
        message
            .starts_with("student.model.width_growth_per_round: grows the student from round 2 on"),
        "{message}"
    );
}

/// A wrong value inside a model table names its field (serde's derived tagged enums lose it).
#[test]
fn a_wrong_model_value_names_its_field() {
    let message = error_of(&tiny_with_student_model("kind = \"cnn\"\nwidth = -1"));
    assert!(
        message.contains("width") && message.contains("student.model"),
        "{message}"
    );
    let message = error_of(&tiny_with_student_model("kind = \"cnn\"\nwidht = 8"));
    assert!(message.contains("widht"), "{message}");
    let message = error_of(&tiny_with_student_model("kind = \"cnnn\""));
    assert!(
        message.contains("cnnn") && message.contains("wide-resnet"),
        "{message}"
    );
    let message = error_of(&tiny_with_student_model("width = 8"));
    assert!(message.contains("kind"), "{message}");
    // A role's setting written after its model's header is told where it goes.
    let message = error_of(&tiny_with_student_model(
        "kind = \"cnn\"\nprecision = \"bfloat16\"",
    ));
    assert!(
        message.contains("`precision` is a setting of the role")
            && message.contains("student.model"),
        "{message}"
    );
    let message = error_of(&tiny_with_student_model(
        "kind = \"efficientnet\"\npreset = \"b01\"",
    ));
    assert!(message.contains("b01"), "{message}");
}

#[test]
fn every_model_kind_parses() {
    for model in [
        "kind = \"wide-resnet\"\ndepth = 28\nwiden = 2",
        "kind = \"resnet\"\ndepth = 50\nstem = \"small\"",
        "kind = \"bit\"\ndepth = 101\nwidth = 3",
        "kind = \"densenet\"\ngrowth_rate = 12\nblock_config = [6, 12, 24, 16]\nnum_init_features = 24",
        "kind = \"efficientnet\"\npreset = \"b0\"\nphi_growth_per_round = 1",
        "kind = \"efficientnet\"\nphi = 0.5",
    ] {
        let plan = Plan::from_toml_str(&tiny_with_student_model(model)).unwrap_or_else(|e| panic!("{model}: {e}"));
        assert!(plan.student.model.kind_name().len() > 2);
    }
}

#[test]
fn bad_model_knobs_name_their_field() {
    let cases = [
        ("kind = \"wide-resnet\"\ndepth = 27", "student.model.depth: must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...)"),
        ("kind = \"resnet\"\ndepth = 20", "student.model.depth: must be one of 18, 34, 50, 101, 152"),
        ("kind = \"bit\"\ndepth = 50\nwidth = 5", "student.model.width: must be between 1 and 4 (BiT-R50x1 to x4)"),
        ("kind = \"efficientnet\"\npreset = \"b9\"", "student.model.preset: unknown preset `b9`, expected b0 to b7"),
        ("kind = \"efficientnet\"\npreset = \"b0\"\nphi = 1.0", "student.model.phi: give either `preset` or `phi`, not both"),
        ("kind = \"efficientnet\"\npreset = \"b7\"\nphi_growth_per_round = 1", "student.model.phi_growth_per_round: grows past b7 by round 2; use `phi` for larger models"),
        ("kind = \"bit\"\ndepth = 50\nwidth = 4\nwidth_growth_per_round = 1", "student.model.width_growth_per_round: makes round 2's width 5, past 4"),
        ("kind = \"efficientnet\"\nphi = 9.5\nphi_growth_per_round = 1", "student.model.phi_growth_per_round: makes round 2's phi 10.5, past 10"),
        ("kind = \"cnn\"\nwidth = 8\nwidth_growth_per_round = 4294967295", "student.model.width_growth_per_round: makes round 2's width overflow"),
        ("kind = \"densenet\"\nblock_config = []", "student.model.block_config: must list at least one block, each with >= 1 layer"),
        ("kind = \"densenet\"\nbn_size = 0", "student.model.bn_size: must be >= 1"),
        ("kind = \"densenet\"\nnum_init_features = 0", "student.model.num_init_features: must be >= 1"),
        ("kind = \"transformer\"", "unknown variant `transformer`"),
    ];
    for (model, expected) in cases {
        let message = error_of(&tiny_with_student_model(model));
        assert!(message.contains(expected), "{model}: {message}");
    }
}

#[test]
fn efficientnet_grows_by_preset_and_by_phi() {
    let plan = Plan::from_toml_str(&tiny_with_student_model(
        "kind = \"efficientnet\"\npreset = \"b0\"\nphi_growth_per_round = 1",
    ))
    .expect("plan");
    let round_two = plan.student.model.at_round(2);
    match &round_two {
        ModelPlan::Efficientnet(e) => assert_eq!(e.preset.as_deref(), Some("b1")),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(round_two.input_resolution(28), 30);
    assert_eq!(round_two.input_resolution(224), 240);
    assert_eq!(
        round_two.at_least_as_large_as(&plan.student.model.at_round(1)),
        Some(true)
    );
    let free = ModelPlan::Efficientnet(EfficientnetPlan {
        preset: None,
        phi: Some(1.0),
        phi_growth_per_round: 0.0,
        base_resolution: Some(224),
    });
    let scaling = match &free {
        ModelPlan::Efficientnet(e) => e.scaling(),
        other => panic!("unexpected {other:?}"),
    };
    assert!((scaling.depth - 1.2).abs() < 1e-12 && (scaling.width - 1.1).abs() < 1e-12);
    assert_eq!(free.input_resolution(28), 258);
    // Half a step a round from b6: b7 at round 3, then phi 7.5 and phi 8 (there is no b8: it
    // must not read as no preset, which is b0).
    let halves = ModelPlan::Efficientnet(EfficientnetPlan {
        preset: Some("b6".into()),
        phi: None,
        phi_growth_per_round: 0.5,
        base_resolution: None,
    });
    let grown = |round| match halves.at_round(round) {
        ModelPlan::Efficientnet(e) => (e.preset, e.phi),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(grown(3), (Some("b7".to_string()), None));
    assert_eq!(grown(4), (None, Some(7.5)));
    assert_eq!(grown(5), (None, Some(8.0)));
}

#[test]
fn rounds_and_top_k_default_by_method_and_classes() {
    let mpl = Plan::from_toml_str(&tiny_mpl_with("rounds = 1\n", "")).expect("mpl plan");
    assert_eq!(mpl.rounds, None);
    assert_eq!(mpl.rounds(), 1);
    let noisy = Plan::from_toml_str(&tiny_with("rounds = 2\n", "")).expect("noisy plan");
    assert_eq!(noisy.rounds(), 2);
    let five = tiny_with("top_k = 3\n", "").replacen("[data]\n", "[data]\nclasses = 5\n", 1);
    assert_eq!(Plan::from_toml_str(&five).expect("5 classes").top_k(), 5);
    let ten = tiny_with("top_k = 3\n", "");
    assert_eq!(Plan::from_toml_str(&ten).expect("10 classes").top_k(), 10);
}

#[test]
fn mpl_fields_name_themselves() {
    let with = |old: &str, new: &str| error_of(&tiny_mpl_with(old, new));
    assert_eq!(
        with("mu = 2", "mu = 0"),
        "mpl.mu: must be in [1, 1024], not 0"
    );
    assert_eq!(
        with("mu = 2", "mu = 2\nlambda_u = -1.0"),
        "mpl.lambda_u: must be >= 0, not -1.0"
    );
    assert_eq!(
        with("mu = 2", "mu = 2\nmpl_weight = nan"),
        "mpl.mpl_weight: must be >= 0, not nan"
    );
    assert_eq!(
        with(
            "[student.noise]",
            "[teacher.train]\nsteps = 5\nbatch_size = 4\n\n[student.noise]"
        ),
        "teacher.train: not used by Meta Pseudo Labels, whose schedule is [mpl]; remove it"
    );
    assert_eq!(
        with("dropout = 0.2", "dropout = 0.2\nrandaugment = { ops = 2, magnitude = 5 }"),
        "student.noise.randaugment: not used by Meta Pseudo Labels, whose strong view is mpl.randaugment; remove it"
    );
    let labels = |table: &str| {
        error_of(&format!(
            "{}\n[pseudo_labels]\n{table}\n",
            tiny_mpl_with("", "")
        ))
    };
    assert_eq!(
        labels("min_confidence = 0.5"),
        "pseudo_labels.min_confidence: not used by Meta Pseudo Labels, which writes no pseudo \
         labels (of [pseudo_labels] only batch_size, its evaluation batch, applies); remove it"
    );
    assert_eq!(
        labels("batch_size = 64\nstorage = \"s3://bucket/labels\""),
        "pseudo_labels.storage: not used by Meta Pseudo Labels, which writes no pseudo \
         labels (of [pseudo_labels] only batch_size, its evaluation batch, applies); remove it"
    );
    assert_eq!(
        labels("top_k = 3"),
        "pseudo_labels.top_k: not used by Meta Pseudo Labels, which writes no pseudo \
         labels (of [pseudo_labels] only batch_size, its evaluation batch, applies); remove it"
    );
    // At its default (what `mentor plan --resolved` writes) it passes.
    Plan::from_toml_str(&format!(
        "{}\n[pseudo_labels]\ntop_k = 10\n",
        tiny_mpl_with("", "")
    ))
    .expect("top_k at its default");
    let evaluation_batch = format!(
        "{}\n[pseudo_labels]\nbatch_size = 64\n",
        tiny_mpl_with("", "")
    );
    let plan = Plan::from_toml_str(&evaluation_batch).expect("the evaluation batch applies");
    assert_eq!(plan.pseudo_labels.batch_size, 64);
    assert_eq!(
        error_of(&tiny_mpl_with("[data]\n", "[data]\nshard_size = 100\n")),
        "data.shard_size: not used by Meta Pseudo Labels, which writes no pseudo-label shards; remove it"
    );
}

#[test]
fn batch_smaller_than_a_fixed_group_is_refused() {
    let group = |text: &str| text.replacen("[workers]\n", "[workers]\nworld_size = 4\n", 1);
    let small_finetune = tiny_mpl_with(
        "batch_size = 32, learning_rate",
        "batch_size = 2, learning_rate",
    );
    assert!(
        Plan::from_toml_str(&small_finetune).is_ok(),
        "no fixed group: decided at run time"
    );
    assert_eq!(
        error_of(&group(&small_finetune)),
        "mpl.finetune.batch_size: 2 is smaller than workers.world_size (4): each rank needs at least one image"
    );
    assert!(Plan::from_toml_str(&group(TINY_MPL)).is_ok());
}

#[test]
fn defaults_serialize_written_out_and_differences_are_named() {
    let written = Plan::from_toml_str(TINY_MPL).expect("plan");
    let defaulted = Plan::from_toml_str(&tiny_mpl_with("rounds = 1\n", "")).expect("plan");
    // A run recorded with `rounds = 1` written out resumes under the plan that leaves it out.
    assert_eq!(written.to_toml_string(), defaulted.to_toml_string());
    assert!(written.to_toml_string().contains("rounds = 1"));
    assert!(written.to_toml_string().contains("top_k = 10"));
    // Workers read the plan as the coordinator writes it, `top_k` filled in.
    Plan::from_toml_str(&written.to_toml_string()).expect("the written plan is valid");
    assert_eq!(written.first_difference(&defaulted), None);
    let other = Plan::from_toml_str(&tiny_mpl_with("mu = 2", "mu = 3")).expect("plan");
    assert_eq!(
        written.first_difference(&other).as_deref(),
        Some("mpl.mu: 2 -> 3")
    );
    let data = Plan::from_toml_str(&tiny_mpl_with("test_limit = 500\n", "")).expect("plan");
    assert_eq!(
        written.first_difference(&data).as_deref(),
        Some("data.test_limit: 500 -> 0")
    );
    // Another plan altogether is named as such, before the differences that follow from it.
    let noisy_student = Plan::from_toml_str(TINY).expect("plan");
    assert_eq!(
        written.first_difference(&noisy_student).as_deref(),
        Some("method: meta-pseudo-labels -> noisy-student (another plan altogether)")
    );
    let renamed =
        Plan::from_toml_str(&TINY_MPL.replacen("name = \"tiny-mpl\"", "name = \"other\"", 1))
            .expect("plan");
    assert_eq!(
        written.first_difference(&renamed).as_deref(),
        Some("name: \"tiny-mpl\" -> \"other\" (another plan altogether)")
    );
}

#[test]
fn a_resumed_run_may_change_where_its_data_is_and_how_many_workers_it_waits_for() {
    let recorded = Plan::from_toml_str(TINY).expect("plan");
    let moved = Plan::from_toml_str(&tiny_with(
        "min_workers = 2",
        "min_workers = 1\nworld_size = 1\njoin_timeout_seconds = 5",
    ))
    .expect("plan");
    let mut moved = moved;
    moved.data.dir = "/elsewhere/fashion-mnist".into();
    moved.workers.heartbeat_timeout_seconds = 60;
    moved.workers.collective_timeout_seconds = 600;
    moved.workers.progress_timeout_seconds = 0;
    moved.pseudo_labels.lease_seconds = 600;
    assert!(recorded.same_run_as(&moved));
    // What it computes, or how its ranks move gradients, may not.
    let mut transport = moved.clone();
    transport.workers.collective = CollectiveKind::Ring;
    assert!(!recorded.same_run_as(&transport));
    assert_eq!(
        recorded
            .clone()
            .with_free_settings_of(&transport, true)
            .first_difference(&transport)
            .as_deref(),
        Some("workers.collective: \"auto\" -> \"ring\"")
    );
    let stricter = Plan::from_toml_str(&tiny_with("min_confidence = 0.1", "min_confidence = 0.2"))
        .expect("plan");
    assert!(!recorded.same_run_as(&stricter));
}

#[test]
fn a_model_that_cannot_take_the_images_names_its_role_and_round() {
    let dense = Plan::from_toml_str(&tiny_with_student_model(
        "kind = \"densenet\"\nblock_config = [1, 1, 1, 1]",
    ))
    .expect("plan");
    assert_eq!(
        dense
            .check_image_side(28)
            .expect_err("28 pixels")
            .to_string(),
        "student.model: round 1: densenet on 28x28 inputs: its features are 1x1 at transition 3 \
         of 3, whose 2x2 average pool needs at least 2x2; stem = \"small\" keeps the full side \
         (for 28-32 pixel images)"
    );
    dense.check_image_side(32).expect("32 pixels");
    let small = Plan::from_toml_str(&tiny_with_student_model(
        "kind = \"densenet\"\nblock_config = [1, 1, 1, 1]\nstem = \"small\"",
    ))
    .expect("plan");
    small
        .check_image_side(28)
        .expect("the small stem keeps 28 pixels");
    let tiny = Plan::from_toml_str(TINY).expect("tiny");
    tiny.check_image_side(28).expect("the tiny plan's cnns");
    assert_eq!(
        tiny.check_image_side(3).expect_err("3 pixels").to_string(),
        "teacher.model: cnn on 3x3 inputs: its two 2x2 max pools need at least 4x4"
    );
}

#[test]
fn the_labeled_split_follows_the_seed_unless_split_seed_fixes_it() {
    let plain = Plan::from_toml_str(TINY).expect("plan");
    assert_eq!((plain.seed, plain.split_seed()), (1, 1));
    // Naming the default is no change: a run recorded without it resumes under it.
    let named = Plan::from_toml_str(&tiny_with(
        "labeled_per_class = 10",
        "labeled_per_class = 10\nsplit_seed = 1",
    ))
    .expect("plan");
    assert_eq!(plain.first_difference(&named), None);
    // And it serializes as before the field existed: what workers receive, and what a Meta
    // Pseudo Labels save's fingerprint hashes.
    assert_eq!(plain.to_toml_string(), named.to_toml_string());
    assert!(!named.to_toml_string().contains("split_seed"));
    // Another training seed on the same labeled subset.
    let reseeded = Plan::from_toml_str(
        &tiny_with(
            "labeled_per_class = 10",
            "labeled_per_class = 10\nsplit_seed = 1",
        )
        .replacen("seed = 1", "seed = 2", 1),
    )
    .expect("plan");
    assert_eq!((reseeded.seed, reseeded.split_seed()), (2, 1));
    assert_eq!(
        plain.first_difference(&reseeded).as_deref(),
        Some("seed: 1 -> 2")
    );
    // Another subset is another run.
    let resplit = Plan::from_toml_str(&tiny_with(
        "labeled_per_class = 10",
        "labeled_per_class = 10\nsplit_seed = 0",
    ))
    .expect("plan");
    assert_eq!(
        plain.first_difference(&resplit).as_deref(),
        Some("data.split_seed: 1 -> 0")
    );
    assert!(!plain.same_run_as(&resplit));
    let written = Plan::from_toml_str(&resplit.to_toml_string()).expect("the written plan");
    assert_eq!(written.split_seed(), 0);
    assert_eq!(
        reseeded.split_seed(),
        Plan::from_toml_str(&reseeded.to_toml_string())
            .expect("plan")
            .split_seed()
    );
}

#[test]
fn stores_that_cannot_serve_a_run_are_refused() {
    for (storage, refusal) in [
        (
            "memory:///",
            "pseudo_labels.storage: `memory://` would give each process a store of its own",
        ),
        (
            "https://host/labels",
            "pseudo_labels.storage: an HTTP store cannot write a shard exactly once",
        ),
    ] {
        let plan = tiny_with(
            "[pseudo_labels]",
            &format!("[pseudo_labels]\nstorage = \"{storage}\""),
        );
        assert!(error_of(&plan).contains(refusal), "{}", error_of(&plan));
    }
}

/// Local paths are made absolute where the plan is read; a store URL and the teacher's
/// checkpoint keep their form.
#[test]
fn local_paths_are_made_absolute_where_the_plan_is_read() {
    let text = tiny_with(
        "dir = \"/usr/share/datasets/fashion-mnist\"",
        "dir = \"data\"\nunlabeled = { format = \"image-folder\", path = \"images\" }",
    )
    .replace(
        "[pseudo_labels]\n",
        "[pseudo_labels]\nstorage = \"labels\"\n",
    );
    let here = std::env::current_dir().expect("current dir");
    let plan = Plan::from_toml_str(&text)
        .expect("plan")
        .with_absolute_paths()
        .expect("absolute");
    assert_eq!(plan.data.dir, here.join("data"));
    assert_eq!(plan.data.unlabeled.path, Some(here.join("images")));
    assert_eq!(
        plan.pseudo_labels.storage,
        Some(here.join("labels").display().to_string())
    );
    // Already absolute: unchanged, as is a URL.
    assert_eq!(plan.clone().with_absolute_paths().expect("again"), plan);
    let text = text.replace("storage = \"labels\"", "storage = \"s3://bucket/labels\"");
    let plan = Plan::from_toml_str(&text)
        .expect("plan")
        .with_absolute_paths()
        .expect("absolute");
    assert_eq!(
        plan.pseudo_labels.storage.as_deref(),
        Some("s3://bucket/labels")
    );
}

/// Operations at magnitude 0 mostly leave the image as it is: refused for a new run, naming
/// the field, unless every listed operation ignores the magnitude.
#[test]
fn randaugment_operations_at_magnitude_zero_are_refused() {
    let check = |text: &str| {
        Plan::from_toml_str(text)
            .expect("a valid plan")
            .check_unused()
            .map_err(|e| e.to_string())
    };
    let text = tiny_with(
        "randaugment = { ops = 2, magnitude = 9 }",
        "randaugment = { ops = 2 }",
    );
    let error = check(&text).expect_err("magnitude 0");
    assert!(
        error.starts_with("student.noise.randaugment.magnitude: is 0"),
        "{error}"
    );
    let text = tiny_mpl_with("[mpl]\n", "[mpl]\nrandaugment = { ops = 1 }\n");
    let error = check(&text).expect_err("magnitude 0");
    assert!(
        error.starts_with("mpl.randaugment.magnitude: is 0"),
        "{error}"
    );
    let text = tiny_with(
        "randaugment = { ops = 2, magnitude = 9 }",
        "randaugment = { ops = 1, op_list = [\"auto-contrast\", \"equalize\"] }",
    );
    check(&text).expect("operations that ignore the magnitude");
}

/// WebDataset shards are the tar files: a shard size would do nothing.
#[test]
fn a_shard_size_for_webdataset_is_refused() {
    let text = tiny_with(
        "dir = \"/usr/share/datasets/fashion-mnist\"",
        "dir = \"/usr/share/datasets/fashion-mnist\"\nunlabeled = { format = \"webdataset\", path = \"shards\" }",
    )
    .replace("unlabeled_limit = 1500\n", "");
    let error = Plan::from_toml_str(&text)
        .expect("a valid plan")
        .check_unused()
        .expect_err("shard_size with webdataset");
    assert!(
        error
            .to_string()
            .starts_with("data.shard_size: not used with format `webdataset`"),
        "{error}"
    );
}
