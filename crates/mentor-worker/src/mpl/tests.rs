//! The sign of `h` on a constructed case, an MPL step on 2 ranks equal to 1 rank, the EMA.

use std::collections::HashMap;
use std::sync::Mutex;

use mentor_collective::chunk_bounds;
use mentor_plan::{CnnPlan, ModelPlan};
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

use super::*;
use crate::distributed::on_ring;
use crate::models::{build, ModelConfig};
use crate::resume::ranks_agree_on_step;

fn config(mpl_weight: f64, sign: MplSign) -> MplConfig {
    MplConfig {
        classes: 2,
        label_smoothing: 0.0,
        uda_threshold: 0.99,
        uda_temperature: 0.7,
        lambda_u: 0.0,
        uda_steps: 0,
        mpl_weight,
        sign,
        baseline_decay: 0.0,
        feedback: MplFeedback::Train,
    }
}

/// One MPL step of two linear models (plain SGD at 0.5) on a group of one.
fn linear_step(
    teacher: (&nn::VarStore, &nn::Linear),
    student: (&nn::VarStore, &nn::Linear),
    batch: &MplBatch,
    config: &MplConfig,
) -> MplStats {
    let (teacher_model, student_model): (&dyn ModuleT, &dyn ModuleT) = (teacher.1, student.1);
    one_step(
        (teacher.0, teacher_model),
        (student.0, student_model),
        0.5,
        batch,
        config,
    )
}

/// One MPL step on a group of one: plain SGD, at 0.5 for the teacher and `student_rate` for
/// the student.
fn one_step(
    teacher: (&nn::VarStore, &dyn ModuleT),
    student: (&nn::VarStore, &dyn ModuleT),
    student_rate: f64,
    batch: &MplBatch,
    config: &MplConfig,
) -> MplStats {
    let mut teacher_optimizer = Sgd::new(teacher.0, 0.5, 0.0, 0.0, false).expect("optimizer");
    let mut student_optimizer =
        Sgd::new(student.0, student_rate, 0.0, 0.0, false).expect("optimizer");
    let teacher_variables = teacher.0.trainable_variables();
    let student_variables = student.0.trainable_variables();
    mpl_step(
        &mut Learner {
            model: teacher.1,
            variables: &teacher_variables,
            optimizer: &mut teacher_optimizer,
        },
        &mut Learner {
            model: student.1,
            variables: &student_variables,
            optimizer: &mut student_optimizer,
        },
        &mut Group::single(1 << 20, Device::Cpu),
        batch,
        config,
        &mut MplState::default(),
        true,
    )
    .expect("step")
    .read()
}

/// A linear teacher that predicts class 0 at x = (1, 0), a linear student that predicts class
/// 1 there; one MPL step where the labeled and the unlabeled image are both x with label 0.
/// Returns the step's statistics and the teacher's probability of class 0 at x after its step.
fn constructed_step(config: &MplConfig) -> (MplStats, f64) {
    let set = |linear: &nn::Linear, weights: [f32; 4]| {
        tch::no_grad(|| {
            let mut ws = linear.ws.shallow_clone();
            ws.copy_(&Tensor::from_slice(&weights).view([2, 2]));
            let mut bs = linear.bs.as_ref().expect("bias").shallow_clone();
            bs.copy_(&Tensor::zeros([2], (Kind::Float, Device::Cpu)));
        })
    };
    let teacher_vs = nn::VarStore::new(Device::Cpu);
    let teacher = nn::linear(teacher_vs.root(), 2, 2, Default::default());
    set(&teacher, [2.0, 0.0, 0.0, 0.0]);
    let student_vs = nn::VarStore::new(Device::Cpu);
    let student = nn::linear(student_vs.root(), 2, 2, Default::default());
    set(&student, [0.0, 0.0, 1.0, 0.0]);
    let x = Tensor::from_slice(&[1f32, 0.0]).view([1, 2]);
    let batch = MplBatch {
        labeled: x.shallow_clone(),
        labels: Tensor::from_slice(&[0i64]),
        weak: x.shallow_clone(),
        strong: x.shallow_clone(),
        student_views: None,
        global_labeled: 1,
        global_unlabeled: 1,
    };
    let stats = linear_step(
        (&teacher_vs, &teacher),
        (&student_vs, &student),
        &batch,
        config,
    );
    let probability = tch::no_grad(|| {
        teacher
            .forward(&x)
            .softmax(-1, Kind::Float)
            .double_value(&[0, 0])
    });
    (stats, probability)
}

#[test]
fn a_helpful_pseudo_label_gives_positive_h_and_the_teacher_raises_it() {
    let h = |(stats, probability): (MplStats, f64)| (stats.h, probability);
    let (h_theory, p_theory) = h(constructed_step(&config(1.0, MplSign::Theory)));
    let (h_none, p_uda_only) = h(constructed_step(&config(0.0, MplSign::Theory)));
    let (h_reference, p_reference) = h(constructed_step(&config(1.0, MplSign::Reference)));
    // A linear student has no dropout or batch norm: measured in evaluation mode, the same.
    let (h_eval, p_eval) = h(constructed_step(&MplConfig {
        feedback: MplFeedback::Eval,
        ..config(1.0, MplSign::Theory)
    }));
    assert_eq!((h_eval, p_eval), (h_theory, p_theory));
    assert!(h_theory > 0.0, "h = {h_theory}");
    assert_eq!(
        h_none, h_theory,
        "h does not depend on the teacher's MPL weight"
    );
    assert!(
        (h_reference + h_theory).abs() < 1e-12,
        "{h_reference} vs {h_theory}"
    );
    assert!(
        p_theory > p_uda_only,
        "theory {p_theory} vs UDA only {p_uda_only}"
    );
    assert!(
        p_reference < p_uda_only,
        "reference {p_reference} vs UDA only {p_uda_only}"
    );
}

/// Status reports the terms of the teacher's loss at the weights they have in it: the UDA
/// term `lambda_u * ramp * consistency loss`, and the MPL term's size `|mpl_weight * h| *
/// CE(teacher's strong view, pseudo label)`.
#[test]
fn the_teacher_loss_terms_are_reported_at_their_weights() {
    // The constructed case: the teacher's logits at x are (2, 0) on every view, so the pseudo
    // label is class 0; every image passes a threshold of 0.
    let logits = Tensor::from_slice(&[2f32, 0.0]).view([1, 2]);
    let cross_entropy = -logits.log_softmax(-1, Kind::Float).double_value(&[0, 0]);
    let q = (&logits / 0.7).softmax(-1, Kind::Float);
    let consistency = -(q * logits.log_softmax(-1, Kind::Float))
        .sum(Kind::Float)
        .double_value(&[]);
    let weighted = |mpl_weight: f64, lambda_u: f64| MplConfig {
        uda_threshold: 0.0,
        lambda_u,
        ..config(mpl_weight, MplSign::Theory)
    };
    let (once, _) = constructed_step(&weighted(1.0, 2.0));
    let (thrice, _) = constructed_step(&weighted(3.0, 0.5));
    assert!(once.h > 0.0, "h = {}", once.h);
    for (stats, mpl_weight, lambda_u) in [(&once, 1.0, 2.0), (&thrice, 3.0, 0.5)] {
        let expected_mpl = mpl_weight * stats.h.abs() * cross_entropy;
        assert!(
            (stats.teacher_mpl_term - expected_mpl).abs() < 1e-6,
            "MPL term {} vs {expected_mpl}",
            stats.teacher_mpl_term
        );
        let expected_uda = lambda_u * consistency;
        assert!(
            (stats.teacher_uda_term - expected_uda).abs() < 1e-6,
            "UDA term {} vs {expected_uda}",
            stats.teacher_uda_term
        );
    }
    let (none, _) = constructed_step(&weighted(0.0, 0.0));
    assert_eq!((none.teacher_mpl_term, none.teacher_uda_term), (0.0, 0.0));
}

/// A student whose input differs from the teacher's (as an EfficientNet student at a higher
/// resolution) learns from its own views: a 3-input linear student next to a 2-input teacher.
#[test]
fn the_student_gets_its_own_views_when_its_resolution_differs() {
    let teacher_vs = nn::VarStore::new(Device::Cpu);
    let teacher = nn::linear(teacher_vs.root(), 2, 2, Default::default());
    let student_vs = nn::VarStore::new(Device::Cpu);
    let student = nn::linear(student_vs.root(), 3, 2, Default::default());
    let x = Tensor::from_slice(&[1f32, 0.0, 0.5, -1.0]).view([2, 2]);
    let x_student = Tensor::from_slice(&[1f32, 0.0, 0.0, 0.5, -1.0, 0.0]).view([2, 3]);
    let batch = MplBatch {
        labeled: x.shallow_clone(),
        labels: Tensor::from_slice(&[0i64, 1]),
        weak: x.shallow_clone(),
        strong: x.shallow_clone(),
        student_views: Some((x_student.shallow_clone(), x_student.shallow_clone())),
        global_labeled: 2,
        global_unlabeled: 2,
    };
    let before = student.ws.copy();
    let stats = linear_step(
        (&teacher_vs, &teacher),
        (&student_vs, &student),
        &batch,
        &config(1.0, MplSign::Theory),
    );
    assert!(stats.student_labeled_loss.is_finite());
    assert!(
        !student.ws.allclose(&before, 1e-7, 1e-7, false),
        "the student did not learn"
    );
}

#[test]
fn the_students_warmup_and_cosine_start_after_its_wait() {
    let text = include_str!("../../../../deploy/plans/tiny-mpl.toml").replacen(
        "steps = 40",
        "steps = 40\nwarmup_steps = 4\nstudent_wait_steps = 10",
        1,
    );
    let plan = mentor_plan::Plan::from_toml_str(&text).expect("plan");
    let mpl = plan.mpl.as_ref().expect("mpl");
    let base = mpl.student_learning_rate;
    assert_eq!(student_learning_rate(mpl, 0), 0.0);
    assert_eq!(student_learning_rate(mpl, 9), 0.0);
    // The first step the student takes is the first step of its warmup.
    assert!((student_learning_rate(mpl, 10) - base / 4.0).abs() < 1e-12);
    assert!((student_learning_rate(mpl, 13) - base).abs() < 1e-12);
    // Cosine over the 26 steps after wait and warmup: half way at step 10 + 4 + 13.
    assert!((student_learning_rate(mpl, 27) - base / 2.0).abs() < 1e-12);
    assert!(student_learning_rate(mpl, 39) < 0.01 * base);
}

/// Teacher and student parameters after `steps` MPL steps on this rank's slice of a fixed global
/// batch; models start from the checkpoints at `teacher_init` and `student_init`.
fn train_slice(
    group: &mut Group,
    data: &(Tensor, Tensor, Tensor, Tensor),
    teacher_init: &std::path::Path,
    student_init: &std::path::Path,
    steps: usize,
    feedback: MplFeedback,
) -> Vec<f32> {
    let model_config = small_model();
    let mut teacher_vs = nn::VarStore::new(Device::Cpu);
    let teacher = build(&teacher_vs.root(), &model_config);
    teacher_vs.load(teacher_init).expect("teacher init");
    let mut student_vs = nn::VarStore::new(Device::Cpu);
    let student = build(&student_vs.root(), &model_config);
    student_vs.load(student_init).expect("student init");
    let mut teacher_optimizer = Sgd::new(&teacher_vs, 0.05, 0.9, 0.0, false).expect("optimizer");
    let mut student_optimizer = Sgd::new(&student_vs, 0.05, 0.9, 0.0, false).expect("optimizer");
    let (labeled, labels, weak, strong) = data;
    let world = group.world_size;
    let (l0, l1) = chunk_bounds(labeled.size()[0] as usize, world, group.rank);
    let (u0, u1) = chunk_bounds(weak.size()[0] as usize, world, group.rank);
    let batch = MplBatch {
        labeled: labeled.narrow(0, l0 as i64, (l1 - l0) as i64),
        labels: labels.narrow(0, l0 as i64, (l1 - l0) as i64),
        weak: weak.narrow(0, u0 as i64, (u1 - u0) as i64),
        strong: strong.narrow(0, u0 as i64, (u1 - u0) as i64),
        student_views: None,
        global_labeled: labeled.size()[0] as usize,
        global_unlabeled: weak.size()[0] as usize,
    };
    let mut config = config(1.0, MplSign::Theory);
    config.classes = 3;
    config.lambda_u = 1.0;
    config.uda_threshold = 0.0;
    config.label_smoothing = 0.1;
    config.baseline_decay = 0.9;
    config.feedback = feedback;
    let mut state = MplState::default();
    let teacher_variables = teacher_vs.trainable_variables();
    let student_variables = student_vs.trainable_variables();
    for _ in 0..steps {
        mpl_step(
            &mut Learner {
                model: teacher.as_ref(),
                variables: &teacher_variables,
                optimizer: &mut teacher_optimizer,
            },
            &mut Learner {
                model: student.as_ref(),
                variables: &student_variables,
                optimizer: &mut student_optimizer,
            },
            group,
            &batch,
            &config,
            &mut state,
            true,
        )
        .expect("step");
    }
    teacher_variables
        .iter()
        .chain(&student_variables)
        .flat_map(|t| Vec::<f32>::try_from(t.flatten(0, -1)).expect("values"))
        .collect()
}

/// A cnn without batch norm or dropout: ranks and a single process compute the same function.
fn small_model() -> ModelConfig {
    ModelConfig {
        model: ModelPlan::Cnn(CnnPlan {
            width: 4,
            residual_blocks: 1,
            hidden: 8,
            width_growth_per_round: 0,
            batch_norm: false,
        }),
        classes: 3,
        channels: 1,
        resolution: 8,
        dropout: 0.0,
        last_survival: 1.0,
        precision: mentor_plan::Precision::Float32,
    }
}

#[test]
fn an_mpl_step_on_two_ranks_equals_one_rank_with_the_same_global_batch() {
    for feedback in [MplFeedback::Train, MplFeedback::Eval] {
        two_ranks_equal_one_rank(feedback);
    }
}

fn two_ranks_equal_one_rank(feedback: MplFeedback) {
    let dir = tempfile::tempdir().expect("tempdir");
    tch::manual_seed(5);
    let (teacher_init, student_init) = (
        dir.path().join("teacher.safetensors"),
        dir.path().join("student.safetensors"),
    );
    for path in [&teacher_init, &student_init] {
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = build(&vs.root(), &small_model());
        vs.save(path).expect("save init");
    }
    let labeled = Tensor::randn([6, 1, 8, 8], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
    let weak = Tensor::randn([10, 1, 8, 8], (Kind::Float, Device::Cpu));
    let strong = weak.flip([3]) * 0.5;
    let data = (labeled, labels, weak, strong);

    let single = train_slice(
        &mut Group::single(1 << 20, Device::Cpu),
        &data,
        &teacher_init,
        &student_init,
        3,
        feedback,
    );

    let results = {
        let (teacher_init, student_init) = (teacher_init.clone(), student_init.clone());
        let data = Mutex::new((
            data.0.shallow_clone(),
            data.1.shallow_clone(),
            data.2.shallow_clone(),
            data.3.shallow_clone(),
        ));
        on_ring(2, move |group| {
            let data = {
                let data = data.lock().expect("data");
                (
                    data.0.shallow_clone(),
                    data.1.shallow_clone(),
                    data.2.shallow_clone(),
                    data.3.shallow_clone(),
                )
            };
            train_slice(group, &data, &teacher_init, &student_init, 3, feedback)
        })
    };
    assert_eq!(results[0], results[1], "ranks disagree");
    let largest = single
        .iter()
        .zip(&results[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let moved = single
        .iter()
        .zip(&train_slice(
            &mut Group::single(1 << 20, Device::Cpu),
            &data,
            &teacher_init,
            &student_init,
            0,
            feedback,
        ))
        .any(|(a, b)| a != b);
    assert!(moved, "training changed nothing");
    assert!(
        largest < 1e-5,
        "2 ranks differ from 1 rank by up to {largest}"
    );
}

/// A resume checkpoint is recognised by the settings that shape the joint training, not by
/// its logging, evaluation, finetune or workers.
#[test]
fn the_resume_identity_follows_the_joint_training_settings_only() {
    let tiny = include_str!("../../../../deploy/plans/tiny-mpl.toml");
    let identity = |text: &str| Identity::of(&Plan::from_toml_str(text).expect("plan"));
    let base = identity(tiny);
    for (from, to) in [
        ("eval_every = 20", "eval_every = 5"),
        ("log_every = 10", "log_every = 3\ncheckpoint_every = 7"),
        ("steps = 10, batch_size = 32", "steps = 99, batch_size = 32"),
        ("min_workers = 2", "min_workers = 1"),
    ] {
        assert!(tiny.contains(from), "tiny-mpl.toml has no `{from}`");
        let other = identity(&tiny.replacen(from, to, 1));
        assert_eq!(
            (other.steps, other.fingerprint),
            (base.steps, base.fingerprint),
            "{to}"
        );
        assert!(
            base.matches(other.steps as f64, 0, Some(&other.plan_text)),
            "{to}"
        );
    }
    for (from, to) in [
        ("seed = 1", "seed = 2"),
        ("mu = 2", "mu = 3"),
        (
            "width = 8\nhidden = 32\n\n[student.noise]",
            "width = 16\nhidden = 32\n\n[student.noise]",
        ),
    ] {
        assert!(tiny.contains(from), "tiny-mpl.toml has no `{from}`");
        let other = identity(&tiny.replacen(from, to, 1));
        assert_ne!(other.fingerprint, base.fingerprint, "{to}");
        assert!(
            !base.matches(other.steps as f64, 0, Some(&other.plan_text)),
            "{to}"
        );
    }
    let longer = identity(&tiny.replacen("steps = 40", "steps = 41", 1));
    assert_ne!(longer.steps, base.steps);
    assert!(!base.matches(longer.steps as f64, longer.fingerprint, None));
    // The data's folder is where the data is, not what it is: a run moved to a machine that
    // keeps it elsewhere resumes, and saves made before the folder was left out of the
    // fingerprint (theirs has it) are still recognised.
    let from = "dir = \"/usr/share/datasets/fashion-mnist\"";
    assert!(tiny.contains(from), "tiny-mpl.toml has no `{from}`");
    let moved = identity(&tiny.replacen(from, "dir = \"/elsewhere/fashion-mnist\"", 1));
    assert!(moved.matches(base.steps as f64, base.fingerprint, None));
    assert!(base.matches(base.steps as f64, base.located, None));
    let other_seed = identity(&tiny.replacen("seed = 1", "seed = 2", 1));
    assert!(!base.matches(base.steps as f64, other_seed.fingerprint, None));
    assert!(!base.matches(base.steps as f64, other_seed.located, None));
    // Saves made before workers.progress_timeout_seconds: their plans' text had no such line.
    assert!(base.matches(base.steps as f64, base.before_progress_timeout, None));
    assert!(!base.matches(base.steps as f64, other_seed.before_progress_timeout, None));

    // A save that records its plan is recognised by that plan read again, not by a
    // fingerprint of the text the build that saved it wrote: the plan as written by hand
    // (without the settings at their defaults, as a build that did not have them wrote it)
    // is the same training, whatever the fingerprint says; another plan is not, nor a text
    // this build cannot read.
    assert!(base.matches(base.steps as f64, 0, Some(tiny)));
    assert!(base.matches(base.steps as f64, 0, Some(&base.plan_text)));
    let seed_two = tiny.replacen("seed = 1", "seed = 2", 1);
    assert!(!base.matches(base.steps as f64, base.fingerprint, Some(&seed_two)));
    let unknown = format!("{tiny}\n[future]\nsetting = 1\n");
    assert!(!base.matches(base.steps as f64, base.fingerprint, Some(&unknown)));
    // A setting that does not shape the training, valid when saved, refused by this build's
    // checks: still this training.
    let refused_now = tiny.replacen(
        "heartbeat_timeout_seconds = 10",
        "heartbeat_timeout_seconds = 0",
        1,
    );
    assert!(Plan::from_toml_str(&refused_now).is_err(), "0 s is refused");
    assert!(base.matches(base.steps as f64, 0, Some(&refused_now)));
}

/// The ranks of a resumed joint training check that they resume from one step. 33,000 is a
/// step whose square f32 cannot hold, where a check through sums of squares failed.
#[test]
fn ranks_agree_on_a_resume_step_only_when_they_all_hold_it() {
    assert!(
        ranks_agree_on_step(&mut Group::single(1 << 20, Device::Cpu), Some(33_000))
            .expect("single")
    );
    for (steps, agree) in [
        ([Some(33_000), Some(33_000)], true),
        ([Some(45_000), Some(45_000)], true),
        ([Some(33_000), Some(33_001)], false),
        ([Some(33_000), None], false),
        ([None, Some(7)], false),
    ] {
        let answers = on_ring(2, move |group| {
            ranks_agree_on_step(group, steps[group.rank]).expect("collective")
        });
        assert_eq!(answers, [agree, agree], "{steps:?}");
    }
}

/// The EMA mixes every variable of the same name, batch-norm statistics included:
/// `ema = decay * ema + (1 - decay) * model`.
#[test]
fn the_ema_mixes_weights_and_batch_norm_statistics() {
    let mut config = small_model();
    if let ModelPlan::Cnn(cnn) = &mut config.model {
        cnn.batch_norm = true;
    }
    let (ema_vs, model_vs) = (
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
    );
    let (_ema, _model) = (
        build(&ema_vs.root(), &config),
        build(&model_vs.root(), &config),
    );
    for (_, mut variable) in model_vs.variables() {
        let _ = tch::no_grad(|| variable.fill_(3.0));
    }
    let before: HashMap<String, Tensor> = ema_vs
        .variables()
        .into_iter()
        .map(|(name, value)| (name, value.copy()))
        .collect();
    let mut averager = Ema::new(&ema_vs, &model_vs);
    averager.update(0.9);
    averager.update(0.9);
    let mut statistics = 0;
    for (name, value) in ema_vs.variables() {
        let expected = &before[&name] * 0.81 + 3.0 * (1.0 - 0.81);
        assert!(value.allclose(&expected, 1e-5, 1e-5, false), "{name}");
        statistics += name.contains("running") as usize;
    }
    assert!(
        statistics >= 2,
        "no batch-norm statistics among the variables"
    );
}

/// With the student's step at a learning rate of 0 (its weights do not move), the feedback
/// measured in evaluation mode is exactly 0; in training mode it is what the two forwards'
/// dropout draws and batch statistics make of it.
#[test]
fn eval_feedback_measures_the_step_alone() {
    let model_config = ModelConfig {
        dropout: 0.5,
        last_survival: 0.5,
        ..crate::optim::tests::small_cnn()
    };
    tch::manual_seed(11);
    let labeled = Tensor::randn([6, 1, 8, 8], (Kind::Float, Device::Cpu));
    let weak = Tensor::randn([12, 1, 8, 8], (Kind::Float, Device::Cpu));
    let batch = MplBatch {
        labeled: labeled.shallow_clone(),
        labels: Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]),
        strong: weak.flip([3]),
        weak,
        student_views: None,
        global_labeled: 6,
        global_unlabeled: 12,
    };
    let h = |feedback: MplFeedback| {
        let teacher_vs = nn::VarStore::new(Device::Cpu);
        let teacher = build(&teacher_vs.root(), &model_config);
        let student_vs = nn::VarStore::new(Device::Cpu);
        let student = build(&student_vs.root(), &model_config);
        let config = MplConfig {
            classes: 3,
            feedback,
            ..config(1.0, MplSign::Theory)
        };
        let teacher = (&teacher_vs, teacher.as_ref() as &dyn ModuleT);
        one_step(
            teacher,
            (&student_vs, student.as_ref()),
            0.0,
            &batch,
            &config,
        )
        .h
    };
    assert_eq!(h(MplFeedback::Eval), 0.0);
    let noise = h(MplFeedback::Train);
    assert!(noise.abs() > 1e-4, "h = {noise}");
}
