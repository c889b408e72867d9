//! The state machine driven through whole runs with made-up task results.

use super::*;

const TINY: &str = include_str!("../../../../deploy/plans/tiny.toml");

fn new_run() -> RunState {
    let plan = Plan::from_toml_str(TINY).expect("tiny plan");
    // 1,500 unlabeled examples in shards of 400: 4 shards.
    RunState::new(
        "run".into(),
        &plan,
        mentor_data::shard_ranges(1500, plan.data.shard_size),
        1500,
        Path::new("/runs/tiny"),
    )
}

const TINY_MPL: &str = include_str!("../../../../deploy/plans/tiny-mpl.toml");

/// A new Meta Pseudo Labels run of `plan` (1,500 unlabeled examples).
fn new_mpl_run(plan: &Plan) -> RunState {
    RunState::new(
        "mpl".into(),
        plan,
        mentor_data::shard_ranges(1500, plan.data.shard_size),
        1500,
        Path::new("/runs/mpl"),
    )
}

/// The tiny MPL plan with its finetune's steps set to `steps`.
fn tiny_mpl_with_finetune_steps(steps: u64) -> Plan {
    let text = TINY_MPL.replacen(
        "finetune = { steps = 10,",
        &format!("finetune = {{ steps = {steps},"),
        1,
    );
    assert!(text.contains(&format!("finetune = {{ steps = {steps},")));
    Plan::from_toml_str(&text).expect("plan")
}

fn worker(name: &str) -> WorkerId {
    WorkerId(name.into())
}

/// Runs the pending tasks of the current phase on `w` the way a healthy worker would.
fn finish_pending(state: &mut RunState, w: &WorkerId, accuracy: f64) -> Vec<Effect> {
    let mut effects = Vec::new();
    let phase = state.phase;
    while state.phase == phase {
        let Some(task) = state.assign(w, "cpu", 1).map(|a| a.task) else {
            break;
        };
        let outcome = match &task.spec {
            TaskSpec::Train { output, .. }
            | TaskSpec::Finetune { output, .. }
            | TaskSpec::TrainMpl {
                student_output: output,
                ..
            } => TaskOutcome::Trained {
                checkpoint: output.clone(),
                final_loss: 0.5,
            },
            TaskSpec::Label {
                shard_index,
                start,
                end,
                ..
            } => TaskOutcome::Labeled(ShardRecord {
                index: *shard_index,
                key: format!("shard-{shard_index}"),
                examples: end - start,
                sha256: "00".into(),
                histogram: None,
                bytes: 10,
            }),
            TaskSpec::Evaluate { .. } => TaskOutcome::Evaluated {
                accuracy,
                loss: 0.3,
            },
        };
        effects.extend(state.complete(&task.id, w, task.attempts, outcome));
    }
    effects
}

#[test]
fn two_rounds_run_through_every_phase() {
    let mut state = new_run();
    let w = worker("w1");
    assert_eq!(state.phase, Phase::WaitingForWorkers);
    assert!(
        state.assign(&w, "cpu", 1).map(|a| a.task).is_none(),
        "no task before the run starts"
    );
    state.start();
    assert_eq!(state.phase, Phase::TrainTeacher);
    assert_eq!(state.latest_accuracy(), None, "nothing evaluated yet");

    let teacher = state
        .assign(&w, "cpu", 1)
        .map(|a| a.task)
        .expect("teacher task");
    assert!(matches!(
        teacher.spec,
        TaskSpec::Train {
            role: Role::Teacher,
            ..
        }
    ));
    state.complete(
        &teacher.id,
        &w,
        teacher.attempts,
        TaskOutcome::Trained {
            checkpoint: "/runs/tiny/checkpoints/round-1-teacher.safetensors".into(),
            final_loss: 1.0,
        },
    );
    assert_eq!(state.phase, Phase::Label);
    // One evaluation of the teacher plus four shards.
    assert_eq!(state.task_counts(), (1, 6));

    let effects = finish_pending(&mut state, &w, 0.70);
    assert_eq!(
        effects,
        vec![Effect::Filter {
            round: 1,
            selection: "/runs/tiny/selections/round-1.json".into()
        }]
    );
    assert_eq!(state.phase, Phase::Filter);
    let round = state.current_round();
    assert_eq!(round.teacher_test_accuracy, Some(0.70));
    assert_eq!(state.latest_accuracy(), Some(0.70));
    assert_eq!(round.examples, 1500);
    assert_eq!(
        round.shards.iter().map(|s| s.index).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert!(
        state.assign(&w, "cpu", 1).map(|a| a.task).is_none(),
        "nothing to do while the coordinator filters"
    );

    state.filter_done(1, 1200, "/runs/tiny/selections/round-1.json".into());
    assert_eq!(state.phase, Phase::TrainStudent);
    let student = state
        .assign(&w, "cpu", 1)
        .map(|a| a.task)
        .expect("student task");
    match &student.spec {
        TaskSpec::Train {
            role, selection, ..
        } => {
            assert_eq!(*role, Role::Student);
            assert!(selection.is_some());
        }
        other => panic!("unexpected {other:?}"),
    }
    state.complete(
        &student.id,
        &w,
        student.attempts,
        TaskOutcome::Trained {
            checkpoint: "/runs/tiny/checkpoints/round-1-student.safetensors".into(),
            final_loss: 1.0,
        },
    );
    assert_eq!(state.phase, Phase::EvaluateStudent);
    finish_pending(&mut state, &w, 0.75);

    // Round 2: the student is the teacher; no new teacher evaluation. Round 1's tasks (the
    // teacher's training and evaluation, four shards, the student's training and evaluation)
    // are no longer kept, but counted.
    assert_eq!(state.round, 2);
    assert_eq!(state.phase, Phase::Label);
    assert!(state.tasks.values().all(|task| task.round == 2));
    assert_eq!(state.past_rounds_tasks, 8);
    assert_eq!(state.task_counts(), (8, 12));
    let saved = serde_json::to_string(&state).expect("json");
    let (read, _) = RunState::from_saved(&saved, Path::new("/runs/tiny")).expect("read back");
    assert_eq!(read.task_counts(), (8, 12));
    let round_two = state.current_round();
    assert_eq!(round_two.teacher_test_accuracy, Some(0.75));
    let teacher_two = round_two.teacher.clone().expect("teacher");
    assert_eq!(teacher_two.role, Role::Student);
    assert_eq!(teacher_two.model_round, 1);
    let effects = finish_pending(&mut state, &w, 0.0);
    assert_eq!(effects.len(), 1);
    state.filter_done(2, 1300, "/runs/tiny/selections/round-2.json".into());
    assert!(
        finish_pending(&mut state, &w, 0.8).is_empty(),
        "student trained"
    );
    assert_eq!(state.phase, Phase::EvaluateStudent);
    let effects = finish_pending(&mut state, &w, 0.8);
    assert_eq!(effects, vec![Effect::Finished]);
    assert_eq!(state.outcome, RunOutcome::Succeeded);
    assert_eq!(state.rounds.len(), 2);
    assert_eq!(state.rounds[1].student_test_accuracy, Some(0.8));
    assert_eq!(state.latest_accuracy(), Some(0.8));
    // Round 2 before its student: its teacher's (round 1's student).
    state.rounds[1].student_test_accuracy = None;
    assert_eq!(state.latest_accuracy(), Some(0.75));
    state.rounds[1].teacher_test_accuracy = None;
    assert_eq!(state.latest_accuracy(), Some(0.75), "round 1's student");
    assert_eq!(state.rounds[1].kept, 1300);
    assert!(state.assign(&w, "cpu", 1).map(|a| a.task).is_none());
}

#[test]
fn a_given_teacher_is_evaluated_and_labels_at_once() {
    let mut state = new_run();
    state.teacher_checkpoint = Some("/models/teacher.safetensors".into());
    let w = worker("w1");
    state.start();
    assert_eq!(state.phase, Phase::Label);
    let given = ModelRef {
        checkpoint: "/models/teacher.safetensors".into(),
        role: Role::Teacher,
        model_round: 1,
    };
    assert_eq!(state.current_round().teacher, Some(given.clone()));
    // One evaluation of the given teacher plus four shards, each of that teacher; no training.
    assert_eq!(state.task_counts(), (0, 5));
    for task in state.tasks.values() {
        match &task.spec {
            TaskSpec::Evaluate { model } => assert_eq!(model, &given),
            TaskSpec::Label { teacher, .. } => assert_eq!(teacher, &given),
            other => panic!("unexpected {other:?}"),
        }
    }
    let effects = finish_pending(&mut state, &w, 0.85);
    assert_eq!(effects.len(), 1, "the filter follows the labeling");
    assert_eq!(state.current_round().teacher_test_accuracy, Some(0.85));
    state.filter_done(1, 1200, "/runs/tiny/selections/round-1.json".into());
    assert_eq!(state.phase, Phase::TrainStudent);
    // A state saved by a build without the field reads as a run that trains its teacher.
    let mut saved: serde_json::Value = serde_json::to_value(new_run()).expect("state as JSON");
    assert!(saved.get("teacher_checkpoint").is_none());
    saved["teacher_checkpoint"] = serde_json::Value::Null;
    let reread: RunState = serde_json::from_value(saved).expect("state");
    assert_eq!(reread.teacher_checkpoint, None);
}

/// A given teacher that moved (a run resumed on another machine) is named at its new place
/// everywhere, and the shard histograms still in memory (which `state.json` never holds) stay.
#[test]
fn a_moved_teacher_keeps_the_histograms_in_memory() {
    let mut state = new_run();
    let (old, new) = (
        "/models/teacher.safetensors",
        "/mnt/models/teacher.safetensors",
    );
    state.teacher_checkpoint = Some(old.into());
    state.start();
    let mut histogram = mentor_labels::Histogram::new(10, 0.3);
    histogram.add(3, 0.9);
    state.current_round_mut().shards.push(ShardRecord {
        index: 0,
        key: "round-1/shard-00000.safetensors".into(),
        examples: 1,
        sha256: "00".into(),
        bytes: 10,
        histogram: Some(histogram.clone()),
    });
    state
        .move_teacher_checkpoint(Path::new(old), Path::new(new))
        .expect("move");
    assert_eq!(
        state
            .current_round()
            .teacher
            .as_ref()
            .map(|t| t.checkpoint.clone()),
        Some(PathBuf::from(new))
    );
    assert_eq!(state.current_round().shards[0].histogram, Some(histogram));
}

#[test]
fn lost_worker_tasks_go_to_another_worker() {
    let mut state = new_run();
    state.start();
    let (a, b) = (worker("a"), worker("b"));
    let task = state.assign(&a, "cpu", 1).map(|a| a.task).expect("task");
    assert!(
        state.assign(&b, "cpu", 1).map(|a| a.task).is_none(),
        "only one task exists"
    );
    assert_eq!(state.worker_lost(&a), (vec![task.id.clone()], Vec::new()));
    let again = state
        .assign(&b, "cpu", 1)
        .map(|a| a.task)
        .expect("requeued");
    assert_eq!(again.id, task.id);
    assert_eq!(again.attempts, 2);
    // The lost worker's late answer is ignored.
    let late = state.complete(
        &task.id,
        &a,
        task.attempts,
        TaskOutcome::Trained {
            checkpoint: "x".into(),
            final_loss: 0.0,
        },
    );
    assert!(late.is_empty());
    assert_eq!(state.phase, Phase::TrainTeacher);
}

#[test]
fn a_task_failing_three_times_fails_the_run() {
    let mut state = new_run();
    state.start();
    let w = worker("w");
    for attempt in 1..=MAX_ATTEMPTS {
        let task = state.assign(&w, "cpu", 1).map(|a| a.task).expect("task");
        let effects = state.complete(
            &task.id,
            &w,
            task.attempts,
            TaskOutcome::Failed("out of memory".into()),
        );
        if attempt < MAX_ATTEMPTS {
            assert!(effects.is_empty());
            assert!(!state.is_finished());
        } else {
            assert_eq!(effects, vec![Effect::Finished]);
        }
    }
    match &state.outcome {
        RunOutcome::Failed(message) => assert!(
            message.contains("failed 3 times (on w), last error: out of memory"),
            "{message}"
        ),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn lost_attempts_do_not_count_as_failures_but_end_the_run_past_their_own_limit() {
    let mut state = new_run();
    state.start();
    let (a, b) = (worker("a"), worker("b"));
    // Two workers lost during the task (preempted, say), then two errors: the run goes on.
    for _ in 0..2 {
        state.assign(&a, "cpu", 1).expect("task");
        let (requeued, effects) = state.worker_lost(&a);
        assert_eq!((requeued.len(), effects), (1, Vec::new()));
    }
    for _ in 0..MAX_ATTEMPTS - 1 {
        let task = state.assign(&b, "cpu", 1).map(|a| a.task).expect("task");
        let failed = TaskOutcome::Failed("out of memory".into());
        assert!(state
            .complete(&task.id, &b, task.attempts, failed)
            .is_empty());
    }
    assert!(!state.is_finished(), "{:?}", state.outcome);
    // Losses have a limit of their own: a task that takes its worker down each time ends the
    // run instead of going round the queue for ever.
    let mut last = Vec::new();
    for _ in 2..MAX_LOSSES {
        let task = state.assign(&a, "cpu", 1).map(|a| a.task).expect("task");
        assert!(last.is_empty(), "the run ended early: {:?}", state.outcome);
        last = state
            .give_up_running(&task.id, |n| format!("lease of attempt {n} expired"))
            .expect("the task was running");
    }
    assert_eq!(last, vec![Effect::Finished]);
    match &state.outcome {
        RunOutcome::Failed(message) => assert!(
            message.contains(&format!(
                "lost {MAX_LOSSES} attempts in a row, none getting further than step 0, the \
                 last because the lease"
            )) && message.contains("(train teacher, round 1)"),
            "{message}"
        ),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn attempts_that_get_further_start_the_counts_of_lost_and_left_attempts_again() {
    let mut state = new_run();
    state.start();
    let a = worker("a");
    // A long training on preemptible machines: each attempt, stopped (SIGTERM) or lost, got
    // further than the ones before it (it resumes from its checkpoint): the run goes on well
    // past both limits.
    let mut step = 0;
    for n in 0..2 * (MAX_LEAVES + MAX_LOSSES) {
        let task = state.assign(&a, "cpu", 1).map(|a| a.task).expect("task");
        step += 500;
        state.report_progress(&task.id, task.attempts, step);
        // A late report of an earlier attempt changes nothing.
        state.report_progress(&task.id, task.attempts - 1, 1_000_000);
        // The last of them lost: the counts of leaves below start from 0.
        let (requeued, effects) = if n % 2 == 1 {
            state.worker_lost(&a)
        } else {
            state.worker_left(&a, "SIGTERM")
        };
        assert_eq!((requeued.len(), effects), (1, Vec::new()), "attempt {n}");
    }
    assert!(!state.is_finished(), "{:?}", state.outcome);
    let task_id = state.tasks.keys().next().cloned().expect("a task");
    assert_eq!(state.tasks[&task_id].reached.best, step);
    // From then on its attempts are stopped without getting past that step: the run fails at
    // the MAX_LEAVES-th, naming the step and why.
    for n in 1..=MAX_LEAVES {
        let task = state.assign(&a, "cpu", 1).map(|a| a.task).expect("task");
        state.report_progress(&task.id, task.attempts, step);
        let (_, effects) = state.worker_left(&a, "SIGTERM");
        assert_eq!(effects.is_empty(), n < MAX_LEAVES, "leave {n}");
    }
    match &state.outcome {
        RunOutcome::Failed(message) => assert!(
            message.contains(&format!(
                "its workers left {MAX_LEAVES} of its attempts in a row, none getting further \
                 than step {step}, the last because worker a left (SIGTERM)"
            )) && message.contains("evicted"),
            "{message}"
        ),
        other => panic!("unexpected {other:?}"),
    }

    // Losses count the same way, apart from leaves: 4 lost attempts, then one getting further
    // (lost too: the count starts again, without it), then 4 more lost without getting
    // further: the run goes on; the next ends it.
    let mut state = new_run();
    state.start();
    let lose = |state: &mut RunState, step: u64| {
        let task = state.assign(&a, "cpu", 1).map(|a| a.task).expect("task");
        state.report_progress(&task.id, task.attempts, step);
        state.worker_lost(&a).1
    };
    for _ in 1..MAX_LOSSES {
        assert!(lose(&mut state, 0).is_empty());
    }
    assert!(lose(&mut state, 100).is_empty());
    for _ in 1..MAX_LOSSES {
        assert!(lose(&mut state, 100).is_empty());
    }
    assert_eq!(lose(&mut state, 90), vec![Effect::Finished]);
}

#[test]
fn empty_selection_fails_the_run_with_advice() {
    let mut state = new_run();
    state.start();
    let w = worker("w");
    assert!(
        finish_pending(&mut state, &w, 0.5).is_empty(),
        "teacher trained"
    );
    let effects = finish_pending(&mut state, &w, 0.5);
    assert_eq!(effects.len(), 1);
    state.filter_done(1, 0, "/x".into());
    match &state.outcome {
        RunOutcome::Failed(message) => assert!(message.contains("min_confidence"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn restart_requeues_running_tasks_and_state_round_trips() {
    let mut state = new_run();
    state.start();
    let w = worker("w");
    state.assign(&w, "cpu", 1).map(|a| a.task).expect("task");
    let json = serde_json::to_string(&state).expect("serialize");
    let mut restored: RunState = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(restored, state);
    restored.requeue_running();
    let task = restored
        .assign(&worker("other"), "cpu", 1)
        .map(|a| a.task)
        .expect("requeued task");
    // The attempt abandoned with the old coordinator keeps its number: reports and metrics of
    // the two attempts stay apart.
    assert_eq!(task.attempts, 2);
    assert_eq!(task.losses, 0, "a restart is no loss of the task's");
}

/// A state saved by the version that recorded rank 0's process alone (`rank0_instance`,
/// `abandoned.instance`) resumes: the process is rank 0's.
#[test]
fn rank_0s_process_recorded_by_an_earlier_version_is_read() {
    let mut state = new_run();
    state.start();
    let task = state.assign(&worker("w"), "cpu", 1).expect("task").task.id;
    state.record_instance(&task, 0, "p-0");
    let mut json = serde_json::to_value(&state).expect("serialize");
    let record = &mut json["tasks"][&task.0];
    assert_eq!(record["instances"], serde_json::json!(["p-0"]));
    let record = record.as_object_mut().expect("record");
    record.remove("instances");
    record.insert("rank0_instance".into(), "p-0".into());
    let mut restored: RunState = serde_json::from_value(json).expect("deserialize");
    assert_eq!(restored, state);
    restored.requeue_running();
    let mut json = serde_json::to_value(&restored).expect("serialize");
    let abandoned = json["tasks"][&task.0]["abandoned"]
        .as_object_mut()
        .expect("abandoned");
    assert_eq!(abandoned["instances"], serde_json::json!(["p-0"]));
    abandoned.remove("instances");
    abandoned.insert("instance".into(), "p-0".into());
    let mut old: RunState = serde_json::from_value(json).expect("deserialize");
    assert_eq!(old, restored);
    assert!(old.readopt_rank(&task, 1, 0, "p-0", &worker("w2")));
}

#[test]
fn a_training_task_forms_a_group_of_ranks() {
    let mut state = new_run();
    state.start();
    let (a, b, c) = (worker("a"), worker("b"), worker("c"));
    let first = state.assign(&a, "cpu", 2).expect("rank 0");
    assert_eq!((first.rank, first.task.world_size), (0, 2));
    assert!(
        state.assign(&c, "cuda", 2).is_none(),
        "another device kind does not join"
    );
    let second = state.assign(&b, "cpu", 2).expect("rank 1");
    assert_eq!(second.rank, 1);
    assert_eq!(second.task.id, first.task.id);
    assert!(state.assign(&c, "cpu", 2).is_none(), "the group is full");

    // Rank 1's success does not finish the task; rank 0's does.
    let trained = |path: &str| TaskOutcome::Trained {
        checkpoint: path.into(),
        final_loss: 0.1,
    };
    assert!(state
        .complete(&first.task.id, &b, 1, trained("x"))
        .is_empty());
    assert_eq!(state.phase, Phase::TrainTeacher);
    state.complete(
        &first.task.id,
        &a,
        1,
        trained("/runs/tiny/checkpoints/round-1-teacher.safetensors"),
    );
    assert_eq!(state.phase, Phase::Label);
}

#[test]
fn a_group_whose_every_rank_reports_the_last_failure_fails_the_run_once_and_can_retry() {
    let mut state = new_run();
    state.start();
    let (a, b) = (worker("a"), worker("b"));
    for n in 1..=MAX_ATTEMPTS {
        let task = state.assign(&a, "cpu", 2).expect("rank 0").task;
        state.assign(&b, "cpu", 2).expect("rank 1");
        // Both ranks fail, rank 1 first (the collective broke under both).
        for rank in [&b, &a] {
            let failed = TaskOutcome::Failed(format!("attempt {n}: rank {} failed", rank.0));
            state.complete(&task.id, rank, task.attempts, failed);
        }
    }
    match &state.outcome {
        RunOutcome::Failed(message) => {
            assert!(message.contains("attempt 3: rank b failed"), "{message}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(state.failed_in, Some(Phase::TrainTeacher));
    state.retry_failed().expect("retry");
    assert_eq!(
        (state.phase, state.is_finished()),
        (Phase::TrainTeacher, false)
    );
    let again = state.assign(&a, "cpu", 1).expect("the task again").task;
    assert_eq!(
        (again.failures, again.state.clone()),
        (
            0,
            TaskState::Running {
                workers: vec![a.clone()]
            }
        )
    );
}

#[test]
fn a_failed_rank_fails_the_attempt_and_stale_reports_are_ignored() {
    let mut state = new_run();
    state.start();
    let (a, b) = (worker("a"), worker("b"));
    let task = state.assign(&a, "cpu", 2).expect("rank 0").task;
    state.assign(&b, "cpu", 2).expect("rank 1");
    state.complete(
        &task.id,
        &b,
        1,
        TaskOutcome::Failed("rank 0 did not answer".into()),
    );
    assert_eq!(state.tasks[&task.id].state, TaskState::Pending);
    // Rank 0's late report of the failed attempt changes nothing.
    let late = state.complete(
        &task.id,
        &a,
        1,
        TaskOutcome::Failed("rank 1 closed the connection".into()),
    );
    assert!(late.is_empty());
    // The second attempt is a new group, possibly smaller.
    let again = state.assign(&a, "cpu", 1).expect("second attempt");
    assert_eq!((again.task.attempts, again.task.world_size), (2, 1));
    assert!(
        state
            .complete(
                &task.id,
                &a,
                1,
                TaskOutcome::Trained {
                    checkpoint: "x".into(),
                    final_loss: 0.0
                }
            )
            .is_empty(),
        "a result of the first attempt does not finish the second"
    );
    assert_eq!(state.worker_lost(&a).0, vec![task.id.clone()]);
}

#[test]
fn meta_pseudo_labels_trains_evaluates_and_finetunes() {
    let plan = Plan::from_toml_str(TINY_MPL).expect("plan");
    let mut state = new_mpl_run(&plan);
    let w = worker("w");
    state.start();
    assert_eq!(state.phase, Phase::TrainMpl);
    assert!(finish_pending(&mut state, &w, 0.0).is_empty());
    assert_eq!(state.phase, Phase::EvaluateMpl);
    let round = state.current_round();
    assert_eq!(round.teacher.as_ref().map(|t| t.role), Some(Role::Teacher));
    assert_eq!(round.student.as_ref().map(|s| s.role), Some(Role::Student));
    assert!(finish_pending(&mut state, &w, 0.7).is_empty());
    assert_eq!(state.phase, Phase::Finetune);
    assert!(finish_pending(&mut state, &w, 0.0).is_empty());
    assert_eq!(state.phase, Phase::EvaluateFinetuned);
    assert_eq!(finish_pending(&mut state, &w, 0.75), vec![Effect::Finished]);
    assert_eq!(state.outcome, RunOutcome::Succeeded);
    let round = state.current_round();
    assert_eq!(
        (round.teacher_test_accuracy, round.student_test_accuracy),
        (Some(0.7), Some(0.7))
    );
    assert_eq!(round.finetuned_student_test_accuracy, Some(0.75));
}

#[test]
fn a_finished_meta_pseudo_labels_run_redoes_only_its_finetune() {
    let plan = Plan::from_toml_str(TINY_MPL).expect("plan");
    let mut state = new_mpl_run(&plan);
    let w = worker("w");
    state.start();
    finish_pending(&mut state, &w, 0.0);
    finish_pending(&mut state, &w, 0.7);
    finish_pending(&mut state, &w, 0.0);
    assert_eq!(finish_pending(&mut state, &w, 0.75), vec![Effect::Finished]);
    let trained = state.current_round().clone();
    let joint_tasks = state.tasks.len() - 2;

    let changed = tiny_mpl_with_finetune_steps(20);
    state.redo_finetune(&changed).expect("redo");
    assert_eq!(state.outcome, RunOutcome::Running);
    assert_eq!(state.phase, Phase::Finetune);
    assert_eq!(state.plan_toml, changed.to_toml_string());
    let round = state.current_round();
    assert_eq!(round.finetuned, None);
    assert_eq!(round.finetuned_student_test_accuracy, None);
    assert_eq!(
        (&round.teacher, &round.student, round.student_test_accuracy),
        (
            &trained.teacher,
            &trained.student,
            trained.student_test_accuracy
        )
    );
    // The old finetune and its evaluation are gone; one new finetune waits.
    assert_eq!(state.tasks.len(), joint_tasks + 1);
    let pending: Vec<_> = state
        .tasks
        .values()
        .filter(|task| task.state == TaskState::Pending)
        .collect();
    assert_eq!(pending.len(), 1);
    assert!(matches!(pending[0].spec, TaskSpec::Finetune { .. }));

    finish_pending(&mut state, &w, 0.0);
    assert_eq!(finish_pending(&mut state, &w, 0.8), vec![Effect::Finished]);
    assert_eq!(state.outcome, RunOutcome::Succeeded);
    assert_eq!(
        state.current_round().finetuned_student_test_accuracy,
        Some(0.8)
    );
    assert_eq!(state.current_round().teacher_test_accuracy, Some(0.7));
}

#[test]
fn a_finetune_cannot_be_redone_before_the_joint_training_or_for_noisy_student() {
    let plan = Plan::from_toml_str(TINY_MPL).expect("plan");
    let mut state = new_mpl_run(&plan);
    state.start();
    let w = worker("w");
    for _ in 0..MAX_ATTEMPTS {
        let task = state.assign(&w, "cpu", 1).map(|a| a.task).expect("task");
        assert!(matches!(task.spec, TaskSpec::TrainMpl { .. }));
        state.complete(
            &task.id,
            &w,
            task.attempts,
            TaskOutcome::Failed("out of memory".into()),
        );
    }
    assert!(matches!(state.outcome, RunOutcome::Failed(_)));
    let error = state.redo_finetune(&plan).expect_err("nothing to finetune");
    assert!(
        error.contains("ended before its teacher and student"),
        "{error}"
    );
    assert!(error.contains("out of memory"), "{error}");

    let mut noisy = new_run();
    let error = noisy.redo_finetune(&plan).expect_err("no finetune");
    assert!(error.contains("only a Meta Pseudo Labels run"), "{error}");
}

#[test]
fn a_finetune_is_redone_from_the_middle_of_one_or_before_one_begins() {
    let plan = Plan::from_toml_str(TINY_MPL).expect("plan");
    let changed = tiny_mpl_with_finetune_steps(20);
    let w = worker("w");

    // Before the finetune begins the run just takes the new one.
    let mut waiting = new_mpl_run(&plan);
    waiting.start();
    let before = waiting.tasks.clone();
    waiting.redo_finetune(&changed).expect("redo");
    assert_eq!((waiting.phase, &waiting.tasks), (Phase::TrainMpl, &before));
    assert_eq!(waiting.plan_toml, changed.to_toml_string());

    // Stopped while a worker was finetuning: one fresh finetune task, nothing running.
    let mut finetuning = new_mpl_run(&plan);
    finetuning.start();
    finish_pending(&mut finetuning, &w, 0.0);
    finish_pending(&mut finetuning, &w, 0.7);
    assert_eq!(finetuning.phase, Phase::Finetune);
    let running = finetuning.assign(&w, "cpu", 1).expect("finetune").task;
    finetuning.redo_finetune(&changed).expect("redo");
    assert_eq!(finetuning.phase, Phase::Finetune);
    let finetunes: Vec<_> = finetuning
        .tasks
        .values()
        .filter(|task| matches!(task.spec, TaskSpec::Finetune { .. }))
        .collect();
    assert_eq!(finetunes.len(), 1);
    assert_ne!(finetunes[0].id, running.id);
    assert_eq!(finetunes[0].state, TaskState::Pending);
    // The old attempt's late report is ignored.
    let late = finetuning.complete(
        &running.id,
        &w,
        running.attempts,
        TaskOutcome::Trained {
            checkpoint: "/runs/mpl/old.safetensors".into(),
            final_loss: 0.1,
        },
    );
    assert!(late.is_empty());
    assert_eq!(finetuning.current_round().finetuned, None);

    // No finetune steps: nothing to redo.
    let none = tiny_mpl_with_finetune_steps(0);
    let error = new_mpl_run(&plan)
        .redo_finetune(&none)
        .expect_err("no finetune");
    assert!(error.contains("mpl.finetune.steps is 0"), "{error}");
}

/// A worker that failed a task on its own leaves the next attempt to another worker when one
/// can take it (a broken node would otherwise fail every attempt within a second), and takes
/// it again when it is alone; the run's failure names the workers it failed on.
#[test]
fn a_task_a_worker_failed_goes_to_another_worker_when_one_can_take_it() {
    let mut state = new_run();
    state.start();
    let (a, b) = (worker("a"), worker("b"));
    let task = state.assign(&a, "cpu", 1).map(|a| a.task).expect("task");
    let failed = TaskOutcome::Failed("CUDA error: busy".into());
    assert!(state.complete(&task.id, &a, 1, failed.clone()).is_empty());
    assert_eq!(state.tasks[&task.id].failed_on, vec![a.clone()]);
    // Another worker is there: the broken node gets nothing (only the teacher task waits).
    let others = [(b.clone(), true)];
    assert!(state.assign_within(&a, "cpu", Some(1), &others).is_none());
    let retry = state
        .assign_within(&b, "cpu", Some(1), &[(a.clone(), true)])
        .expect("b takes it");
    assert_eq!(
        (retry.task.id.clone(), retry.task.attempts),
        (task.id.clone(), 2)
    );
    assert!(state.complete(&task.id, &b, 2, failed.clone()).is_empty());
    // Once every worker there failed it, any of them retries it (nobody would otherwise).
    let third = state
        .assign_within(&a, "cpu", Some(1), &others)
        .expect("a, b having failed it too");
    assert_eq!(third.task.attempts, 3);
    assert_eq!(
        state.complete(&task.id, &a, 3, failed),
        vec![Effect::Finished]
    );
    match &state.outcome {
        RunOutcome::Failed(message) => assert!(
            message.contains("failed 3 times (on a, b), last error: CUDA error: busy"),
            "{message}"
        ),
        other => panic!("unexpected {other:?}"),
    }
}

/// A rank whose group broke reports a group failure: a lost attempt, not a failure of the
/// task (a preempted peer must not use up the task's 3 failures). When the rank whose own error
/// broke the group reports it afterwards, the loss becomes that failure, with its error.
#[test]
fn a_group_failure_is_a_loss_until_the_rank_that_broke_it_reports_its_own_error() {
    let mut state = new_run();
    state.start();
    let (a, b) = (worker("a"), worker("b"));
    let task = state.assign(&a, "cpu", 2).map(|a| a.task).expect("rank 0");
    state.assign(&b, "cpu", 2).expect("rank 1");
    let broken = TaskOutcome::GroupFailed("the peer closed the ring".into());
    assert!(state.complete(&task.id, &a, 1, broken).is_empty());
    let record = &state.tasks[&task.id];
    assert_eq!((record.failures, record.losses), (0, 1));
    assert_eq!(record.state, TaskState::Pending);
    assert!(record.failed_on.is_empty());
    // b ran out of memory: its report, beaten by a's, names what happened.
    let own = TaskOutcome::Failed("out of memory".into());
    assert!(state.complete(&task.id, &b, 1, own.clone()).is_empty());
    let record = &state.tasks[&task.id];
    assert_eq!((record.failures, record.losses), (1, 0));
    assert_eq!(record.last_error.as_deref(), Some("out of memory"));
    assert_eq!(record.failed_on, vec![b.clone()]);
    // Counted once: the same report again changes nothing.
    assert!(state.complete(&task.id, &b, 1, own).is_empty());
    assert_eq!(state.tasks[&task.id].failures, 1);
    // Two group failures in a row, then the first one's culprit reports: that loss becomes its
    // failure, the second stays a loss.
    let c = worker("c");
    for (attempt, rank1) in [(2, &b), (3, &c)] {
        state.assign(&a, "cpu", 2).expect("rank 0");
        state.assign(rank1, "cpu", 2).expect("rank 1");
        let broken = TaskOutcome::GroupFailed("the peer closed the ring".into());
        assert!(state.complete(&task.id, &a, attempt, broken).is_empty());
    }
    let record = &state.tasks[&task.id];
    assert_eq!((record.failures, record.losses), (1, 2));
    // A saved state keeps both, and reads as an earlier version's one (the last alone) did.
    let json = serde_json::to_value(&state).expect("serialize");
    let losses = json["tasks"][&task.id.0]["group_losses"].clone();
    assert_eq!(losses.as_array().map(Vec::len), Some(2), "{losses}");
    let mut old = json.clone();
    let old_record = old["tasks"][&task.id.0].as_object_mut().expect("record");
    old_record.remove("group_losses");
    old_record.insert("group_loss".into(), losses[1].clone());
    let old: RunState = serde_json::from_value(old).expect("an earlier version's state");
    assert_eq!(old.tasks[&task.id].group_losses.len(), 1);
    let restored: RunState = serde_json::from_value(json).expect("deserialize");
    assert_eq!(restored, state);
    let own = TaskOutcome::Failed("out of memory".into());
    assert!(state.complete(&task.id, &b, 2, own).is_empty());
    let record = &state.tasks[&task.id];
    assert_eq!((record.failures, record.losses), (2, 1));
    assert_eq!(record.failed_on, vec![b.clone()]);
    // The rest of the test counts losses from none.
    state.tasks.get_mut(&task.id).expect("task").losses = 0;
    // Group failures alone end the run at the losses' limit, not the failures'.
    for loss in 1..=MAX_LOSSES {
        let task = state.assign(&a, "cpu", 2).map(|a| a.task).expect("rank 0");
        state.assign(&c, "cpu", 2).expect("rank 1");
        let broken = TaskOutcome::GroupFailed("the peer closed the ring".into());
        let effects = state.complete(&task.id, &a, task.attempts, broken);
        if loss < MAX_LOSSES {
            assert!(effects.is_empty(), "ended at loss {loss}");
        } else {
            assert_eq!(effects, vec![Effect::Finished]);
        }
    }
    assert!(
        state.tasks[&task.id].group_losses.len() <= MAX_LOSSES as usize,
        "the losses kept are bounded"
    );
}

/// A labeling task a GPU worker failed is left to a CPU worker, which may label though not
/// train; a training task is not (the CPU worker could never take it).
#[test]
fn a_failed_task_is_left_to_others_that_may_take_it() {
    let mut state = new_run();
    state.start();
    let (gpu, cpu) = (worker("gpu"), worker("cpu"));
    let teacher = state
        .assign_within(&gpu, "cuda", Some(1), &[(cpu.clone(), false)])
        .expect("teacher");
    let oom = TaskOutcome::Failed("CUDA out of memory".into());
    assert!(state
        .complete(&teacher.task.id, &gpu, 1, oom.clone())
        .is_empty());
    // The CPU worker may not train: the GPU worker retries the teacher.
    let retry = state
        .assign_within(&gpu, "cuda", Some(1), &[(cpu.clone(), false)])
        .expect("the GPU worker retries");
    assert_eq!(retry.task.id, teacher.task.id);
    state.complete(
        &teacher.task.id,
        &gpu,
        2,
        TaskOutcome::Trained {
            checkpoint: "teacher.safetensors".into(),
            final_loss: 0.5,
        },
    );
    // Labeling: the failed shard is left to the CPU worker.
    let shard = state
        .assign_within(&gpu, "cuda", Some(1), &[(cpu.clone(), false)])
        .expect("a labeling task");
    assert!(!shard.task.spec.is_training());
    assert!(state.complete(&shard.task.id, &gpu, 1, oom).is_empty());
    let next = state
        .assign_within(&gpu, "cuda", Some(1), &[(cpu.clone(), false)])
        .expect("another task");
    assert_ne!(next.task.id, shard.task.id);
    let taken = state
        .assign_within(&cpu, "cpu", None, &[(gpu.clone(), false)])
        .expect("the CPU worker labels");
    assert_eq!(taken.task.id, shard.task.id);
}

/// A result of the wrong kind (a worker's bug) fails the run without counting its task as
/// done: `--retry-failed` hands the task out again.
#[test]
fn a_mismatched_result_fails_the_run_and_its_task_runs_again_on_retry() {
    let mut state = new_run();
    state.start();
    let w = worker("w");
    let task = state.assign(&w, "cpu", 1).map(|a| a.task).expect("task");
    assert!(matches!(task.spec, TaskSpec::Train { .. }));
    let wrong = TaskOutcome::Evaluated {
        accuracy: 0.5,
        loss: 1.0,
    };
    assert_eq!(
        state.complete(&task.id, &w, task.attempts, wrong),
        vec![Effect::Finished]
    );
    match &state.outcome {
        RunOutcome::Failed(message) => assert!(message.contains("mismatched"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }
    state.retry_failed().expect("retry");
    let again = state
        .assign(&w, "cpu", 1)
        .map(|a| a.task)
        .expect("the task again");
    assert_eq!(again.id, task.id);
}
