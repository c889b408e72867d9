//! The Noisy Student run as plain data and the pure functions that move it forward.
//!
//! No I/O here: the service applies what these functions decide (assign a task, run the global
//! filter) and feeds results back. Phases of round `r`:
//! `TrainTeacher` (round 1 only) -> `Label` (every shard, plus the teacher's test evaluation in
//! round 1) -> `Filter` (the coordinator's own global step) -> `TrainStudent` ->
//! `EvaluateStudent` -> the student becomes the teacher of round `r + 1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mentor_plan::{Method, Plan, Role};
use serde::{Deserialize, Serialize};

/// A task fails the run once it has failed this many times (attempts given up because a worker
/// was lost do not count: see [`MAX_LOSSES`]).
pub const MAX_ATTEMPTS: u32 = 3;

/// A task fails the run once this many of its attempts in a row were given up, without getting
/// further than the attempts before them (see [`Reached`]), because a worker was lost or its
/// lease ran out: a task that kills its worker process (out of memory, say) would otherwise go
/// back to the queue forever.
pub const MAX_LOSSES: u32 = 5;

/// A task fails the run once its workers left (stopped by SIGTERM or Ctrl-C) this many of its
/// attempts in a row without getting further than the attempts before them (see [`Reached`]):
/// a task whose memory gets its pods evicted (Kubernetes evicts with SIGTERM) would otherwise
/// go back to the queue for ever, while a long training on preemptible machines, stopped again
/// and again, gets further at each attempt and goes on.
pub const MAX_LEAVES: u32 = 20;

/// Identifies a task within a run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub String);

/// Identifies a registered worker process.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkerId(pub String);

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    WaitingForWorkers,
    TrainTeacher,
    Label,
    Filter,
    TrainStudent,
    EvaluateStudent,
    /// Meta Pseudo Labels: teacher and student trained together.
    TrainMpl,
    /// Meta Pseudo Labels: both models evaluated on the test set.
    EvaluateMpl,
    /// Meta Pseudo Labels: the student finetuned on labeled images.
    Finetune,
    EvaluateFinetuned,
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::WaitingForWorkers => "waiting-for-workers",
            Phase::TrainTeacher => "train-teacher",
            Phase::Label => "pseudo-label",
            Phase::Filter => "filter-and-balance",
            Phase::TrainStudent => "train-student",
            Phase::EvaluateStudent => "evaluate-student",
            Phase::TrainMpl => "train-meta-pseudo-labels",
            Phase::EvaluateMpl => "evaluate-teacher-and-student",
            Phase::Finetune => "finetune-student",
            Phase::EvaluateFinetuned => "evaluate-finetuned-student",
            Phase::Done => "done",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "status", content = "error")]
pub enum RunOutcome {
    Running,
    Succeeded,
    Failed(String),
}

impl RunOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunOutcome::Running => "running",
            RunOutcome::Succeeded => "succeeded",
            RunOutcome::Failed(_) => "failed",
        }
    }
}

/// A model checkpoint and the plan section that built it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub checkpoint: PathBuf,
    pub role: Role,
    /// Round whose model settings (student growth) the checkpoint follows.
    pub model_round: u32,
}

/// What a task asks a worker to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum TaskSpec {
    Train {
        role: Role,
        output: PathBuf,
        selection: Option<PathBuf>,
    },
    Label {
        teacher: ModelRef,
        shard_index: u32,
        start: u64,
        end: u64,
        /// Where the same teacher was named before (see [`RunState::move_teacher_checkpoint`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        teacher_was: Vec<PathBuf>,
    },
    Evaluate {
        model: ModelRef,
    },
    /// Meta Pseudo Labels: teacher and student trained together.
    TrainMpl {
        teacher_output: PathBuf,
        student_output: PathBuf,
    },
    /// The MPL student finetuned on labeled images.
    Finetune {
        init: PathBuf,
        output: PathBuf,
    },
}

impl TaskSpec {
    /// Whether the task trains (and so runs on a data-parallel group).
    pub fn is_training(&self) -> bool {
        matches!(
            self,
            TaskSpec::Train { .. } | TaskSpec::TrainMpl { .. } | TaskSpec::Finetune { .. }
        )
    }

    /// The checkpoints a training task writes (the student's last); none for other tasks.
    pub fn outputs(&self) -> Vec<&PathBuf> {
        match self {
            TaskSpec::Train { output, .. } | TaskSpec::Finetune { output, .. } => vec![output],
            TaskSpec::TrainMpl {
                teacher_output,
                student_output,
            } => vec![teacher_output, student_output],
            _ => Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            TaskSpec::TrainMpl { .. } => "train teacher and student (MPL)".to_string(),
            TaskSpec::Finetune { .. } => "finetune student".to_string(),
            TaskSpec::Train { role, .. } => format!("train {}", role.as_str()),
            TaskSpec::Label { shard_index, .. } => format!("pseudo-label shard {shard_index}"),
            TaskSpec::Evaluate { model } => format!("evaluate {}", model.role.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum TaskState {
    Pending,
    /// Assigned; `workers[r]` is rank r (one worker unless the task trains a group).
    Running {
        workers: Vec<WorkerId>,
    },
    Done,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub round: u32,
    pub spec: TaskSpec,
    pub state: TaskState,
    /// Attempts so far; the current attempt's number while running.
    pub attempts: u32,
    /// Attempts that ended in an error the task reported (the run fails at [`MAX_ATTEMPTS`]).
    #[serde(default)]
    pub failures: u32,
    /// Attempts given up because a worker was lost or the lease ran out (the run fails at
    /// [`MAX_LOSSES`]).
    #[serde(default)]
    pub losses: u32,
    /// Attempts given up because a worker left on purpose (the run fails at [`MAX_LEAVES`]).
    #[serde(default)]
    pub leaves: u32,
    /// How far the current attempt and the earlier ones got: an attempt given up further than
    /// all before it starts the counts of lost and left attempts again.
    #[serde(default)]
    pub reached: Reached,
    pub last_error: Option<String>,
    /// Ranks of the current attempt (1 for tasks that do not train).
    #[serde(default)]
    pub world_size: u32,
    /// Device kind (`cpu`, `cuda`) of the current attempt's group.
    #[serde(default)]
    pub device_kind: String,
    /// Workers that reported an error of their own for this task: another worker takes its
    /// next attempt when one can (a node with a broken mount or a GPU held by another process
    /// would otherwise fail all of a task's attempts within a second, healthy workers idle).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_on: Vec<WorkerId>,
    /// The attempts given up because their group failed (see [`TaskOutcome::GroupFailed`]),
    /// with their members, the latest [`MAX_LOSSES`]: one of them reporting an error of its own
    /// afterwards (the rank whose failure broke the group, its report beaten by its peers',
    /// possibly after the next attempt's group failed as well) turns that loss into the failure
    /// it was, with that error. Recorded by earlier versions for the last attempt alone.
    #[serde(
        default,
        alias = "group_loss",
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub group_losses: Vec<GroupLoss>,
    /// The processes (`instance`) of the current attempt's ranks, by rank, where they said
    /// which (empty where one did not). Recorded by earlier versions for rank 0 alone.
    #[serde(
        default,
        alias = "rank0_instance",
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub instances: Vec<String>,
    /// The attempt a coordinator restart left running, with its ranks' processes: while no
    /// other attempt has started, those processes, registering again, are taken back as its
    /// ranks (its training goes on), and its rank 0's result, sent again under the id it
    /// registers with next, is taken (a training that ended as the coordinator restarted is
    /// not run again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<Abandoned>,
}

/// An attempt left running when the coordinator stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Abandoned {
    pub attempt: u32,
    /// Its ranks' processes, by rank (earlier versions recorded rank 0's alone).
    #[serde(alias = "instance", deserialize_with = "one_or_many")]
    pub instances: Vec<String>,
    /// The workers its ranks registered again as, by rank, so far (this coordinator's ids: a
    /// restart forgets them, and the ranks register again).
    #[serde(skip)]
    pub back: Vec<Option<WorkerId>>,
}

impl Abandoned {
    /// Whether `worker` is one of its ranks, back and waiting for the others.
    pub fn is_back(&self, worker: &WorkerId) -> bool {
        self.back.iter().flatten().any(|back| back == worker)
    }
}

/// A list of strings, or the one string earlier versions recorded in its place.
fn one_or_many<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// How far a task's attempts got, in the steps of their progress reports (a training's global
/// step, which a resumed attempt goes on from; a labeler's images): the current attempt's
/// furthest report and the furthest of the attempts given up before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Reached {
    /// The attempt `step` is of.
    pub attempt: u32,
    pub step: u64,
    /// The furthest step of the attempts given up so far.
    pub best: u64,
}

impl Reached {
    /// Takes a progress report of `attempt`.
    pub fn report(&mut self, attempt: u32, step: u64) {
        if self.attempt != attempt {
            *self = Reached {
                attempt,
                step,
                best: self.best,
            };
        } else {
            self.step = self.step.max(step);
        }
    }

    /// Called as `attempt` is given up: whether it got further than every attempt before it
    /// (which it then becomes the measure of).
    pub fn got_further(&mut self, attempt: u32) -> bool {
        let further = self.attempt == attempt && self.step > self.best;
        if further {
            self.best = self.step;
        }
        further
    }
}

/// An attempt of a training group given up because the group failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupLoss {
    pub attempt: u32,
    pub members: Vec<WorkerId>,
}

impl TaskRecord {
    /// The workers of the current attempt, by rank.
    pub fn workers(&self) -> &[WorkerId] {
        match &self.state {
            TaskState::Running { workers } => workers,
            _ => &[],
        }
    }

    /// Back to the queue with its failures, losses and leaves forgotten (a run retried after
    /// it failed: what failed it is taken to be fixed). How far its attempts got is kept.
    pub fn requeue_afresh(&mut self) {
        self.state = TaskState::Pending;
        self.failures = 0;
        self.losses = 0;
        self.leaves = 0;
        self.failed_on.clear();
        self.group_losses.clear();
    }

    /// Whether `worker` runs the current attempt `attempt` of this task.
    pub fn is_run_by(&self, worker: &WorkerId, attempt: u32) -> bool {
        self.attempts == attempt && self.workers().contains(worker)
    }

    /// Whether `worker` is a rank back of `attempt`, the attempt a restart left running, and
    /// waits for the others (see [`RunState::readopt_rank`]).
    pub fn is_back(&self, worker: &WorkerId, attempt: u32) -> bool {
        self.abandoned
            .as_ref()
            .is_some_and(|left| left.attempt == attempt && left.is_back(worker))
    }
}

/// A task given to a worker, with its rank in the task's group.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub task: TaskRecord,
    pub rank: u32,
}

/// A committed pseudo-label shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub index: u32,
    pub key: String,
    pub examples: u64,
    pub sha256: String,
    pub bytes: u64,
    /// Top-class confidence counts the labeler took of the shard (what the filter adds up),
    /// until they are written to their own file ([`RunPaths::histogram`]). Never written to
    /// `state.json`, which is rewritten whole at every change of the run: with a thousand
    /// classes a shard's histogram is some 100 KB of compact JSON (0.6 MB as `state.json` is
    /// written, indented), rewritten thousands of times a round if it stayed there. (States
    /// written before read back with them.)
    #[serde(default, skip_serializing)]
    pub histogram: Option<mentor_labels::Histogram>,
}

/// What a finished task reports.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutcome {
    Trained {
        checkpoint: PathBuf,
        final_loss: f64,
    },
    Labeled(ShardRecord),
    Evaluated {
        accuracy: f64,
        loss: f64,
    },
    /// An error of the task itself on the reporting worker (counts toward [`MAX_ATTEMPTS`]).
    Failed(String),
    /// A rank's collective or join failed: the group broke, most often because a peer died
    /// (killed, preempted) or failed on its own. The attempt counts as lost, as a dead worker's
    /// does ([`MAX_LOSSES`]), not as a failure of the task.
    GroupFailed(String),
}

impl TaskOutcome {
    /// Whether the attempt ended in an error, of its own or of its group.
    pub fn is_failure(&self) -> bool {
        matches!(self, TaskOutcome::Failed(_) | TaskOutcome::GroupFailed(_))
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub teacher: Option<ModelRef>,
    pub teacher_test_accuracy: Option<f64>,
    pub student: Option<ModelRef>,
    pub student_test_accuracy: Option<f64>,
    pub shards_total: u32,
    pub shards: Vec<ShardRecord>,
    pub examples: u64,
    pub kept: u64,
    pub selection: Option<PathBuf>,
    /// Meta Pseudo Labels: the finetuned student.
    #[serde(default)]
    pub finetuned: Option<ModelRef>,
    #[serde(default)]
    pub finetuned_student_test_accuracy: Option<f64>,
}

/// What the caller must do after a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write the manifest of `round`, filter and balance globally, write the selection to
    /// `selection`, then call [`RunState::filter_done`].
    Filter { round: u32, selection: PathBuf },
    /// The run ended (succeeded or failed).
    Finished,
}

/// Where a run keeps its files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPaths {
    pub run_dir: PathBuf,
}

impl RunPaths {
    pub fn checkpoint(&self, round: u32, role: Role) -> PathBuf {
        self.run_dir
            .join("checkpoints")
            .join(format!("round-{round}-{}.safetensors", role.as_str()))
    }

    /// Meta Pseudo Labels: the finetuned student.
    pub fn finetuned_checkpoint(&self) -> PathBuf {
        self.run_dir
            .join("checkpoints")
            .join("round-1-student-finetuned.safetensors")
    }

    pub fn selection(&self, round: u32) -> PathBuf {
        self.run_dir
            .join("selections")
            .join(format!("round-{round}.json"))
    }

    pub fn state_file(&self) -> PathBuf {
        self.run_dir.join("state.json")
    }

    /// The confidence histogram a labeler reported for shard `index` of `round`, kept out of
    /// `state.json` (see [`ShardRecord::histogram`]).
    pub fn histogram(&self, round: u32, index: u32) -> PathBuf {
        self.run_dir
            .join("histograms")
            .join(format!("round-{round}"))
            .join(format!("shard-{index:05}.json"))
    }
}

/// The whole state of a run; serialized to the state store after every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub run_id: String,
    pub plan_toml: String,
    pub outcome: RunOutcome,
    pub round: u32,
    pub total_rounds: u32,
    pub phase: Phase,
    pub rounds: Vec<RoundRecord>,
    pub tasks: BTreeMap<TaskId, TaskRecord>,
    /// Unlabeled shard ranges `[start, end)`, in units of the source (examples, or tar files).
    pub shard_ranges: Vec<(u64, u64)>,
    pub unlabeled_examples: u64,
    pub paths: RunPaths,
    next_task: u64,
    #[serde(default = "default_method")]
    pub method: Method,
    /// Meta Pseudo Labels: whether the student is finetuned.
    #[serde(default)]
    pub finetune: bool,
    /// Workers registered so far, across restarts of the coordinator: worker ids are never
    /// reused, so a worker of an earlier coordinator cannot pass for one of this one.
    #[serde(default)]
    pub workers_registered: u64,
    /// Tasks of finished rounds, all done, no longer kept (see [`RunState::promote`]): counted
    /// in [`RunState::task_counts`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub past_rounds_tasks: u32,
    /// Noisy Student: the first teacher, read from this file (the plan's `teacher.checkpoint`,
    /// made absolute) instead of trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_checkpoint: Option<PathBuf>,
    /// The SHA-256 of that file's bytes when the run began labeling with it: a resumed run
    /// refuses another teacher, wherever its file now lies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_checkpoint_sha256: Option<String>,
    /// The phase a failed run was in when it failed (where `--retry-failed` takes it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_in: Option<Phase>,
    /// The listing the unlabeled example ids are positions in (`Source::fingerprint`): a
    /// resumed run whose images changed is refused, and workers check theirs against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlabeled_fingerprint: Option<String>,
    /// When the run began and when it ended, in milliseconds since the Unix epoch (a run
    /// recorded before runs kept it begins when a coordinator opens it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub began_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
}

fn default_method() -> Method {
    Method::NoisyStudent
}

/// `path` taken from under `from` to the same place under `to`; `None` when it is not at or
/// under `from` (whole components only: `/runs/a` does not take `/runs/ab` along).
fn rebased(path: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    let rest = path.strip_prefix(from).ok()?;
    Some(if rest.as_os_str().is_empty() {
        to.to_path_buf()
    } else {
        to.join(rest)
    })
}

/// Rewrites every string of `value` that is a path at or under `from` to the same path under
/// `to` (see [`rebased`]).
pub fn rebase(value: &mut serde_json::Value, from: &Path, to: &Path) {
    match value {
        serde_json::Value::String(text) => {
            if let Some(moved) = rebased(Path::new(text.as_str()), from, to) {
                *text = moved.display().to_string();
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|item| rebase(item, from, to)),
        serde_json::Value::Object(fields) => fields
            .values_mut()
            .for_each(|field| rebase(field, from, to)),
        _ => {}
    }
}

impl RunState {
    /// The state saved in `text` (a `state.json`), opened in `run_dir`. A run directory may have
    /// been moved or copied since it was saved (from a GPU machine to a laptop, say): every
    /// recorded path under the old directory is then taken to the same place under `run_dir`,
    /// so that the run goes on with its own files; so is a local soft-label store its plan
    /// records there (`pseudo_labels.storage = "run/labels"`, recorded absolute). Returns the
    /// old directory when it moved.
    pub fn from_saved(text: &str, run_dir: &Path) -> Result<(RunState, Option<PathBuf>), String> {
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let recorded = value
            .pointer("/paths/run_dir")
            .and_then(|dir| dir.as_str())
            .map(PathBuf::from)
            .ok_or("it records no run directory (paths.run_dir)")?;
        let moved = recorded != run_dir;
        if moved {
            rebase(&mut value, &recorded, run_dir);
        }
        let mut state: RunState = serde_json::from_value(value).map_err(|e| e.to_string())?;
        if moved {
            state.rebase_plan_storage(&recorded, run_dir);
        }
        Ok((state, moved.then_some(recorded)))
    }

    /// Takes a local soft-label store the recorded plan names under `from` to `to` (the plan's
    /// text is not a path: [`rebase`] leaves it as it is).
    fn rebase_plan_storage(&mut self, from: &Path, to: &Path) {
        let Ok(mut plan) = Plan::from_recorded_toml(&self.plan_toml) else {
            return;
        };
        let moved = plan
            .pseudo_labels
            .local_storage()
            .and_then(|storage| rebased(storage, from, to));
        if let Some(storage) = moved {
            plan.pseudo_labels.storage = Some(storage.display().to_string());
            self.plan_toml = plan.to_toml_string();
        }
    }

    /// Whether a task still to run labels with the first teacher a plan gives
    /// (`teacher.checkpoint`): until the first labeling is done.
    pub fn needs_given_teacher(&self) -> bool {
        self.round == 1 && matches!(self.phase, Phase::WaitingForWorkers | Phase::Label)
    }

    /// Takes every reference to the first teacher's file `from` (the state's, its round's and
    /// its tasks') to `to`: the plan names the same teacher in another place, as after a run
    /// moved to a machine that keeps its models elsewhere.
    /// Its labeling tasks keep the old place too: a shard committed before the move (whose
    /// result the coordinator never recorded) names the teacher there.
    pub fn move_teacher_checkpoint(&mut self, from: &Path, to: &Path) -> Result<(), String> {
        // Histograms still in memory (a state of an earlier version, a file that could not be
        // written) are not serialized: set aside around the round trip.
        let histograms: Vec<Vec<_>> = self
            .rounds
            .iter_mut()
            .map(|round| {
                round
                    .shards
                    .iter_mut()
                    .map(|s| s.histogram.take())
                    .collect()
            })
            .collect();
        let mut value = serde_json::to_value(&*self).map_err(|e| e.to_string())?;
        rebase(&mut value, from, to);
        *self = serde_json::from_value(value).map_err(|e| e.to_string())?;
        for (round, kept) in self.rounds.iter_mut().zip(histograms) {
            for (shard, histogram) in round.shards.iter_mut().zip(kept) {
                shard.histogram = histogram;
            }
        }
        for task in self.tasks.values_mut() {
            if let TaskSpec::Label {
                teacher,
                teacher_was,
                ..
            } = &mut task.spec
            {
                if teacher.checkpoint == to && !teacher_was.iter().any(|was| was == from) {
                    teacher_was.push(from.to_path_buf());
                }
            }
        }
        Ok(())
    }

    /// A new run; `shard_ranges` cut the unlabeled source, whose size is `unlabeled_examples`
    /// when known before labeling (0 otherwise).
    pub fn new(
        run_id: String,
        plan: &Plan,
        shard_ranges: Vec<(u64, u64)>,
        unlabeled_examples: u64,
        run_dir: &Path,
    ) -> RunState {
        RunState {
            run_id,
            plan_toml: plan.to_toml_string(),
            outcome: RunOutcome::Running,
            round: 1,
            total_rounds: plan.rounds(),
            phase: Phase::WaitingForWorkers,
            rounds: vec![RoundRecord {
                round: 1,
                ..RoundRecord::default()
            }],
            tasks: BTreeMap::new(),
            shard_ranges,
            unlabeled_examples,
            paths: RunPaths {
                run_dir: run_dir.to_path_buf(),
            },
            next_task: 0,
            workers_registered: 0,
            past_rounds_tasks: 0,
            method: plan.method,
            finetune: plan.mpl.as_ref().is_some_and(|mpl| mpl.finetune.steps > 0),
            teacher_checkpoint: plan.teacher.checkpoint.clone(),
            teacher_checkpoint_sha256: None,
            failed_in: None,
            unlabeled_fingerprint: None,
            began_at_ms: Some(unix_ms()),
            ended_at_ms: None,
        }
    }

    /// Seconds from the run's beginning to its end, or to now while it runs.
    pub fn elapsed_seconds(&self) -> f64 {
        let end = self.ended_at_ms.unwrap_or_else(unix_ms);
        self.began_at_ms
            .map_or(0.0, |began| end.saturating_sub(began) as f64 / 1000.0)
    }

    pub fn is_finished(&self) -> bool {
        self.outcome != RunOutcome::Running
    }

    pub fn current_round(&self) -> &RoundRecord {
        &self.rounds[self.rounds.len() - 1]
    }

    /// The test accuracy of the run's latest evaluation of a whole model: the last round's
    /// finetuned student, student or teacher, whichever it has got to (a round evaluates them
    /// in the reverse order), else the round's before.
    pub fn latest_accuracy(&self) -> Option<f64> {
        self.rounds.iter().rev().find_map(|round| {
            round
                .finetuned_student_test_accuracy
                .or(round.student_test_accuracy)
                .or(round.teacher_test_accuracy)
        })
    }

    fn current_round_mut(&mut self) -> &mut RoundRecord {
        let last = self.rounds.len() - 1;
        &mut self.rounds[last]
    }

    fn add_task(&mut self, spec: TaskSpec) {
        self.next_task += 1;
        let id = TaskId(format!("r{}-t{:04}", self.round, self.next_task));
        self.tasks.insert(
            id.clone(),
            TaskRecord {
                id,
                round: self.round,
                spec,
                state: TaskState::Pending,
                attempts: 0,
                failures: 0,
                losses: 0,
                leaves: 0,
                reached: Reached::default(),
                last_error: None,
                world_size: 0,
                device_kind: String::new(),
                failed_on: Vec::new(),
                group_losses: Vec::new(),
                instances: Vec::new(),
                abandoned: None,
            },
        );
    }

    /// Starts the run once enough workers are there.
    pub fn start(&mut self) {
        if self.phase != Phase::WaitingForWorkers {
            return;
        }
        if self.method == Method::MetaPseudoLabels {
            self.phase = Phase::TrainMpl;
            let teacher_output = self.paths.checkpoint(1, Role::Teacher);
            let student_output = self.paths.checkpoint(1, Role::Student);
            self.add_task(TaskSpec::TrainMpl {
                teacher_output,
                student_output,
            });
            return;
        }
        if let Some(checkpoint) = self.teacher_checkpoint.clone() {
            // The first teacher is given: evaluated (its accuracy is round 1's teacher's) and
            // put to labeling at once.
            let teacher = ModelRef {
                checkpoint,
                role: Role::Teacher,
                model_round: 1,
            };
            self.start_labeling(teacher, true);
            return;
        }
        self.phase = Phase::TrainTeacher;
        let output = self.paths.checkpoint(1, Role::Teacher);
        self.add_task(TaskSpec::Train {
            role: Role::Teacher,
            output,
            selection: None,
        });
    }

    /// Gives `worker` (of `device_kind`) a rank in a training group that is still forming, or
    /// the oldest pending task. A training task's group gets `group_size` ranks.
    pub fn assign(
        &mut self,
        worker: &WorkerId,
        device_kind: &str,
        group_size: u32,
    ) -> Option<Assignment> {
        self.assign_within(worker, device_kind, Some(group_size), &[])
    }

    /// [`RunState::assign`], where `None` for the group size means that no new training group
    /// can be filled now: `worker` may join a group that is forming or take a task of one rank.
    /// A pending task `worker` failed on its own is left to the `others` that could take it
    /// (the workers that may ask for work besides it, each with whether it may train: a
    /// training task is left only to those) while one of them has not failed it too; `worker`
    /// may still join a group another worker starts. A task a coordinator restart left running
    /// waits for its result until [`RunState::release_abandoned`].
    pub fn assign_within(
        &mut self,
        worker: &WorkerId,
        device_kind: &str,
        group_size: Option<u32>,
        others: &[(WorkerId, bool)],
    ) -> Option<Assignment> {
        if self.is_finished() {
            return None;
        }
        let forming = self.tasks.values_mut().find(|task| {
            matches!(&task.state, TaskState::Running { workers }
                if (workers.len() as u32) < task.world_size && task.device_kind == device_kind && !workers.contains(worker))
        });
        if let Some(task) = forming {
            if let TaskState::Running { workers } = &mut task.state {
                workers.push(worker.clone());
                let rank = workers.len() as u32 - 1;
                return Some(Assignment {
                    task: task.clone(),
                    rank,
                });
            }
        }
        let task = self.tasks.values_mut().find(|task| {
            let training = task.spec.is_training();
            let left_to_others = task.failed_on.contains(worker)
                && others.iter().any(|(other, may_train)| {
                    (*may_train || !training) && !task.failed_on.contains(other)
                });
            task.state == TaskState::Pending
                && (group_size.is_some() || !training)
                && !left_to_others
                && task.abandoned.is_none()
        })?;
        task.world_size = match (task.spec.is_training(), group_size) {
            (true, Some(size)) => size.max(1),
            _ => 1,
        };
        task.device_kind = device_kind.to_string();
        task.state = TaskState::Running {
            workers: vec![worker.clone()],
        };
        task.attempts += 1;
        task.instances.clear();
        task.abandoned = None;
        Some(Assignment {
            task: task.clone(),
            rank: 0,
        })
    }

    /// The assignment `worker` holds in the running attempt of `task`, if it still does.
    pub fn assignment_held(&self, task: &TaskId, worker: &WorkerId) -> Option<Assignment> {
        let record = self.tasks.get(task)?;
        let rank = record.workers().iter().position(|held| held == worker)?;
        Some(Assignment {
            task: record.clone(),
            rank: rank as u32,
        })
    }

    /// Puts every task `worker` takes part in back in the queue (the worker is gone); a
    /// training group loses its attempt as a whole. Returns the requeued tasks and the effects:
    /// the run fails when a task has lost [`MAX_LOSSES`] attempts.
    pub fn worker_lost(&mut self, worker: &WorkerId) -> (Vec<TaskId>, Vec<Effect>) {
        self.forget_back(worker);
        let mut requeued = Vec::new();
        let mut given_up = None;
        for task in self.tasks.values_mut() {
            if task.workers().contains(worker) {
                let reason = format!("worker {worker} was lost");
                if let Some(message) = Self::lose_attempt(task, reason) {
                    given_up.get_or_insert(message);
                }
                requeued.push(task.id.clone());
            }
        }
        let effects = match given_up {
            Some(message) if !self.is_finished() => self.fail(message),
            _ => Vec::new(),
        };
        (requeued, effects)
    }

    /// Puts every task `worker` takes part in back in the queue because it left on purpose
    /// (stopped by a signal): the attempt is given up without counting as a loss or a failure,
    /// but as a leave. Returns the requeued tasks and the effects: the run fails when a task's
    /// workers left [`MAX_LEAVES`] of its attempts in a row without getting further.
    pub fn worker_left(&mut self, worker: &WorkerId, reason: &str) -> (Vec<TaskId>, Vec<Effect>) {
        self.forget_back(worker);
        let mut requeued = Vec::new();
        let mut given_up = None;
        for task in self.tasks.values_mut() {
            if task.workers().contains(worker) {
                task.state = TaskState::Pending;
                if !Self::count_from_further(task) {
                    task.leaves += 1;
                }
                if task.leaves >= MAX_LEAVES {
                    given_up.get_or_insert(format!(
                        "task {} ({}, round {}): its workers left {} of its attempts in a row, \
                         none getting further than step {}, the last because worker {worker} \
                         left ({reason}); pods evicted for the task's memory (Kubernetes stops \
                         them with SIGTERM) end this way: see the workers' logs and the \
                         cluster's events",
                        task.id,
                        task.spec.describe(),
                        task.round,
                        task.leaves,
                        task.reached.best
                    ));
                }
                task.last_error = Some(format!("worker {worker} left ({reason})"));
                requeued.push(task.id.clone());
            }
        }
        let effects = match given_up {
            Some(message) if !self.is_finished() => self.fail(message),
            _ => Vec::new(),
        };
        (requeued, effects)
    }

    /// Starts the task's counts of lost and left attempts again if its running attempt, about
    /// to be given up, got further than every attempt before it (which it then does not count
    /// in); whether it did.
    fn count_from_further(task: &mut TaskRecord) -> bool {
        let further = task.reached.got_further(task.attempts);
        if further {
            task.losses = 0;
            task.leaves = 0;
        }
        further
    }

    /// Takes a progress report of the current attempt of `task` (see [`Reached`]); one of
    /// another attempt changes nothing.
    pub fn report_progress(&mut self, task: &TaskId, attempt: u32, step: u64) {
        if let Some(task) = self.tasks.get_mut(task) {
            if task.attempts == attempt && matches!(task.state, TaskState::Running { .. }) {
                task.reached.report(attempt, step);
            }
        }
    }

    /// Gives up the running attempt of `task` as lost (a labeler's lease ran out, a training
    /// reported no progress in time), `why` saying so of its attempt number; the late worker's
    /// result, if it ever comes, belongs to an old attempt and is ignored. None when the task
    /// was not running; else the effects (the run fails when the task has lost
    /// [`MAX_LOSSES`] attempts).
    pub fn give_up_running(
        &mut self,
        task_id: &TaskId,
        why: impl FnOnce(u32) -> String,
    ) -> Option<Vec<Effect>> {
        let task = self
            .tasks
            .get_mut(task_id)
            .filter(|task| matches!(task.state, TaskState::Running { .. }))?;
        let reason = why(task.attempts);
        Some(match Self::lose_attempt(task, reason) {
            Some(message) if !self.is_finished() => self.fail(message),
            _ => Vec::new(),
        })
    }

    /// Counts an error of its own that `worker` reported for `task` (already back in the queue,
    /// or running again): the run fails at the task's [`MAX_ATTEMPTS`]th.
    fn count_failure(&mut self, task_id: &TaskId, worker: &WorkerId, error: &str) -> Vec<Effect> {
        let finished = self.is_finished();
        let Some(task) = self.tasks.get_mut(task_id) else {
            return Vec::new();
        };
        task.last_error = Some(error.to_string());
        task.failures += 1;
        if !task.failed_on.contains(worker) {
            task.failed_on.push(worker.clone());
        }
        if task.failures < MAX_ATTEMPTS || finished {
            return Vec::new();
        }
        let workers: Vec<&str> = task.failed_on.iter().map(|w| w.0.as_str()).collect();
        let message = format!(
            "task {} ({}, round {}) failed {} times (on {}), last error: {error}",
            task.id,
            task.spec.describe(),
            task.round,
            task.failures,
            workers.join(", ")
        );
        self.fail(message)
    }

    /// Puts `task` back in the queue after its attempt was given up for `reason`; returns the
    /// run's failure message when that was its last loss allowed.
    fn lose_attempt(task: &mut TaskRecord, reason: String) -> Option<String> {
        task.state = TaskState::Pending;
        if !Self::count_from_further(task) {
            task.losses += 1;
        }
        let message = (task.losses >= MAX_LOSSES).then(|| {
            format!(
                "task {} ({}, round {}) lost {} attempts in a row, none getting further than \
                 step {}, the last because the {reason}; a task that ends its worker process \
                 (killed for lack of memory, say) ends this way: see the workers' logs and the \
                 system's",
                task.id,
                task.spec.describe(),
                task.round,
                task.losses,
                task.reached.best
            )
        });
        task.last_error = Some(reason);
        message
    }

    /// Meta Pseudo Labels: takes `plan`, which differs from the run's at most in
    /// `[mpl.finetune]`, and finetunes the jointly trained student again under it. A finished or
    /// finetuning run goes back to its finetune phase (the finetuned student and its accuracy are
    /// dropped, teacher and student are kept); a run whose finetune has not begun just takes the
    /// new finetune. Errors say why the finetune cannot be redone.
    pub fn redo_finetune(&mut self, plan: &Plan) -> Result<(), String> {
        if self.method != Method::MetaPseudoLabels {
            return Err(format!(
                "only a Meta Pseudo Labels run has a finetune; this one is {}",
                self.method.as_str()
            ));
        }
        if plan.mpl.as_ref().is_none_or(|mpl| mpl.finetune.steps == 0) {
            return Err("the plan's mpl.finetune.steps is 0: there is no finetune to run".into());
        }
        self.plan_toml = plan.to_toml_string();
        self.finetune = true;
        let begun = matches!(
            self.phase,
            Phase::Finetune | Phase::EvaluateFinetuned | Phase::Done
        );
        if !begun {
            return Ok(());
        }
        let round = self.current_round();
        if round.student.is_none()
            || round.teacher_test_accuracy.is_none()
            || round.student_test_accuracy.is_none()
        {
            let reason = match &self.outcome {
                RunOutcome::Failed(message) => format!(": {message}"),
                _ => String::new(),
            };
            return Err(format!(
                "the run ended before its teacher and student were trained and evaluated{reason}"
            ));
        }
        let finetuned = self.paths.finetuned_checkpoint();
        self.tasks.retain(|_, task| match &task.spec {
            TaskSpec::Finetune { .. } => false,
            TaskSpec::Evaluate { model } => model.checkpoint != finetuned,
            _ => true,
        });
        let round = self.current_round_mut();
        round.finetuned = None;
        round.finetuned_student_test_accuracy = None;
        self.outcome = RunOutcome::Running;
        self.ended_at_ms = None;
        self.phase = Phase::EvaluateMpl;
        let effects = self.advance();
        debug_assert!(effects.is_empty() && self.phase == Phase::Finetune);
        Ok(())
    }

    /// Takes a failed run back to the phase it failed in, once its cause is dealt with: the
    /// phase's unfinished tasks go back to the queue with their failures and losses forgotten
    /// (a failed filter runs again); everything finished stays. Errors say why it cannot.
    pub fn retry_failed(&mut self) -> Result<(), String> {
        if !matches!(self.outcome, RunOutcome::Failed(_)) {
            let what = match self.outcome {
                RunOutcome::Succeeded => "it succeeded",
                _ => "it was still running when last saved: resume it without --retry-failed",
            };
            return Err(format!("it has not failed ({what})"));
        }
        let phase = self.failed_in.filter(|phase| *phase != Phase::Done).ok_or(
            "it failed under a version of the coordinator that did not record where; run it again in a new --state-dir",
        )?;
        for task in self.tasks.values_mut() {
            if task.state != TaskState::Done {
                task.requeue_afresh();
            }
        }
        self.outcome = RunOutcome::Running;
        self.ended_at_ms = None;
        self.phase = phase;
        self.failed_in = None;
        Ok(())
    }

    /// Takes the current round back to its labeling for the shards `damaged` (gone from the
    /// store or altered since they were labeled), after [`RunState::retry_failed`] of a run
    /// that failed in the round's filter or student training (which read them): their labeling
    /// tasks run again, the round's student training task goes (the filter makes it again) and
    /// the round's other shards stay.
    pub fn relabel(&mut self, damaged: &[u32]) -> Result<(), String> {
        if damaged.is_empty() {
            return Ok(());
        }
        if !matches!(self.phase, Phase::Filter | Phase::TrainStudent) {
            return Err(format!(
                "shards are labeled again only before the round's filter or student training, not in phase {}",
                self.phase.as_str()
            ));
        }
        let round = self.round;
        for task in self.tasks.values_mut() {
            if let TaskSpec::Label { shard_index, .. } = &task.spec {
                if task.round == round && damaged.contains(shard_index) {
                    task.requeue_afresh();
                    task.abandoned = None;
                }
            }
        }
        self.tasks.retain(|_, task| {
            !(task.round == round
                && matches!(
                    task.spec,
                    TaskSpec::Train {
                        role: Role::Student,
                        ..
                    }
                ))
        });
        let record = self.current_round_mut();
        record
            .shards
            .retain(|shard| !damaged.contains(&shard.index));
        record.examples = record.shards.iter().map(|shard| shard.examples).sum();
        record.kept = 0;
        record.selection = None;
        self.phase = Phase::Label;
        Ok(())
    }

    /// Requeues every running task (after a coordinator restart). The attempt abandoned keeps
    /// its number, the next one is numbered after it, and neither counts as a failure or a loss.
    pub fn requeue_running(&mut self) {
        for task in self.tasks.values_mut() {
            if matches!(task.state, TaskState::Running { .. }) {
                task.state = TaskState::Pending;
                let instances = std::mem::take(&mut task.instances);
                task.abandoned = instances
                    .first()
                    .is_some_and(|rank0| !rank0.is_empty())
                    .then(|| Abandoned {
                        attempt: task.attempts,
                        instances,
                        back: Vec::new(),
                    });
            }
        }
    }

    /// Whether a task waits for the result of an attempt a coordinator restart left running.
    pub fn has_abandoned(&self) -> bool {
        self.tasks.values().any(|task| task.abandoned.is_some())
    }

    /// Gives up waiting for the results of attempts a coordinator restart left running: their
    /// tasks get new attempts.
    pub fn release_abandoned(&mut self) {
        for task in self.tasks.values_mut() {
            task.abandoned = None;
        }
    }

    /// Takes `worker` (the process `instance`) back as rank 0 of `attempt` of `task`, the
    /// attempt a coordinator restart left running, to take its result, while no other attempt
    /// has started; `false` when that is not the case.
    pub fn readopt(
        &mut self,
        task_id: &TaskId,
        worker: &WorkerId,
        attempt: u32,
        instance: &str,
    ) -> bool {
        let Some(task) = self.tasks.get_mut(task_id) else {
            return false;
        };
        let left = task.abandoned.as_ref().is_some_and(|left| {
            left.attempt == attempt && left.instances.first().map(String::as_str) == Some(instance)
        });
        if !left || task.state != TaskState::Pending || task.attempts != attempt {
            return false;
        }
        task.state = TaskState::Running {
            workers: vec![worker.clone()],
        };
        task.abandoned = None;
        task.instances = vec![instance.to_string()];
        true
    }

    /// Takes `worker` (the process `instance`, registering again) back as `rank` of `attempt`
    /// of `task`, the attempt a coordinator restart left running, while no other attempt has
    /// started: `false` when that is not the case. The attempt runs again once all its ranks
    /// are back; until then those back go on training (a group's ranks train among
    /// themselves) and wait.
    pub fn readopt_rank(
        &mut self,
        task_id: &TaskId,
        attempt: u32,
        rank: u32,
        instance: &str,
        worker: &WorkerId,
    ) -> bool {
        let Some(task) = self.tasks.get_mut(task_id) else {
            return false;
        };
        if task.state != TaskState::Pending || task.attempts != attempt {
            return false;
        }
        let Some(left) = task.abandoned.as_mut() else {
            return false;
        };
        let rank = rank as usize;
        let named = left.instances.get(rank).map(String::as_str);
        if left.attempt != attempt || instance.is_empty() || named != Some(instance) {
            return false;
        }
        left.back.resize(left.instances.len(), None);
        left.back[rank] = Some(worker.clone());
        if left.back.iter().all(Option::is_some)
            && left.back.len() == task.world_size.max(1) as usize
        {
            let workers = left.back.drain(..).flatten().collect();
            task.instances = std::mem::take(&mut left.instances);
            task.abandoned = None;
            task.state = TaskState::Running { workers };
        }
        true
    }

    /// `worker` was a rank back of an attempt a restart left running, and is gone or done with
    /// it (lost, left, reported its end): that attempt cannot go on, its task waits no more (the
    /// other ranks back are told to stop at their next report).
    pub fn forget_back(&mut self, worker: &WorkerId) {
        for task in self.tasks.values_mut() {
            if task
                .abandoned
                .as_ref()
                .is_some_and(|left| left.is_back(worker))
            {
                task.abandoned = None;
            }
        }
    }

    /// Undoes [`RunState::assign_within`]'s `assignment` of `worker` (its save failed: a
    /// restart would not know of it). The attempt number is given again next time.
    pub fn unassign(&mut self, assignment: &Assignment, worker: &WorkerId) {
        let Some(task) = self.tasks.get_mut(&assignment.task.id) else {
            return;
        };
        if !task.is_run_by(worker, assignment.task.attempts) {
            return;
        }
        if assignment.rank == 0 {
            task.state = TaskState::Pending;
            task.attempts -= 1;
            task.instances.clear();
        } else if let TaskState::Running { workers } = &mut task.state {
            workers.retain(|member| member != worker);
            task.instances.truncate(assignment.rank as usize);
        }
    }

    /// Records that rank `rank` of the current attempt of `task` runs in the process
    /// `instance`.
    pub fn record_instance(&mut self, task_id: &TaskId, rank: u32, instance: &str) {
        if let Some(task) = self.tasks.get_mut(task_id) {
            let rank = rank as usize;
            if task.instances.len() <= rank {
                task.instances.resize(rank + 1, String::new());
            }
            task.instances[rank] = instance.to_string();
        }
    }

    /// Records the outcome a rank reports for `attempt` of a task and advances the run when its
    /// phase is complete. A failure of any rank fails the attempt; success is rank 0's to report.
    pub fn complete(
        &mut self,
        task_id: &TaskId,
        worker: &WorkerId,
        attempt: u32,
        outcome: TaskOutcome,
    ) -> Vec<Effect> {
        let Some(task) = self.tasks.get_mut(task_id) else {
            return Vec::new();
        };
        if !task.is_run_by(worker, attempt) {
            // The error of its own of a member of a group attempt given up as the group's
            // failure: what broke the group, reported after its peers' reports.
            let broke_the_group = task.state != TaskState::Done
                && task
                    .group_losses
                    .iter()
                    .any(|loss| loss.attempt == attempt && loss.members.contains(worker));
            if let (true, TaskOutcome::Failed(error)) = (broke_the_group, &outcome) {
                task.group_losses.retain(|loss| loss.attempt != attempt);
                task.losses = task.losses.saturating_sub(1);
                return self.count_failure(task_id, worker, error);
            }
            // A late result of an attempt that was given up or reassigned: ignore it.
            return Vec::new();
        }
        let is_rank_zero = task.workers().first() == Some(worker);
        if !is_rank_zero && !outcome.is_failure() {
            return Vec::new();
        }
        match &outcome {
            TaskOutcome::Failed(error) => {
                task.state = TaskState::Pending;
                return self.count_failure(task_id, worker, error);
            }
            TaskOutcome::GroupFailed(error) => {
                let members = task.workers().to_vec();
                // The workers say "data-parallel group failed: ...", which the run's failure
                // at the losses' limit reads after "the last because the".
                let given_up = Self::lose_attempt(task, error.clone());
                task.group_losses.push(GroupLoss { attempt, members });
                if task.group_losses.len() > MAX_LOSSES as usize {
                    task.group_losses.remove(0);
                }
                return match given_up {
                    Some(message) if !self.is_finished() => self.fail(message),
                    _ => Vec::new(),
                };
            }
            _ => {}
        }
        let spec = task.spec.clone();
        let phase = self.phase;
        let round = self.current_round_mut();
        match (spec, outcome) {
            (TaskSpec::Train { role, .. }, TaskOutcome::Trained { checkpoint, .. }) => {
                let model = ModelRef {
                    checkpoint,
                    role,
                    model_round: round.round,
                };
                match role {
                    Role::Teacher => round.teacher = Some(model),
                    Role::Student => round.student = Some(model),
                }
            }
            (TaskSpec::Label { .. }, TaskOutcome::Labeled(shard)) => {
                round.examples += shard.examples;
                round.shards.push(shard);
                round.shards.sort_by_key(|shard| shard.index);
            }
            (
                TaskSpec::TrainMpl {
                    teacher_output,
                    student_output,
                },
                TaskOutcome::Trained { .. },
            ) => {
                round.teacher = Some(ModelRef {
                    checkpoint: teacher_output,
                    role: Role::Teacher,
                    model_round: round.round,
                });
                round.student = Some(ModelRef {
                    checkpoint: student_output,
                    role: Role::Student,
                    model_round: round.round,
                });
            }
            (TaskSpec::Finetune { output, .. }, TaskOutcome::Trained { .. }) => {
                round.finetuned = Some(ModelRef {
                    checkpoint: output,
                    role: Role::Student,
                    model_round: round.round,
                });
            }
            (TaskSpec::Evaluate { .. }, TaskOutcome::Evaluated { accuracy, .. })
                if phase == Phase::EvaluateFinetuned =>
            {
                round.finetuned_student_test_accuracy = Some(accuracy);
            }
            (TaskSpec::Evaluate { model }, TaskOutcome::Evaluated { accuracy, .. }) => {
                match model.role {
                    Role::Teacher => round.teacher_test_accuracy = Some(accuracy),
                    Role::Student => round.student_test_accuracy = Some(accuracy),
                }
            }
            (spec, outcome) => {
                // Not done: a retry of the failed run (`--retry-failed`) runs it again.
                let message = format!(
                    "task {task_id} ({}) returned a mismatched result: {outcome:?}",
                    spec.describe()
                );
                return self.fail(message);
            }
        }
        if let Some(task) = self.tasks.get_mut(task_id) {
            task.state = TaskState::Done;
        }
        self.advance()
    }

    /// Ends the run as failed with `message`; a run already ended keeps its outcome (the other
    /// ranks of a group report the failure that ended it too).
    fn fail(&mut self, message: String) -> Vec<Effect> {
        if self.is_finished() {
            return Vec::new();
        }
        self.outcome = RunOutcome::Failed(message);
        self.failed_in = Some(self.phase);
        self.phase = Phase::Done;
        self.ended_at_ms = Some(unix_ms());
        vec![Effect::Finished]
    }

    fn phase_tasks_done(&self) -> bool {
        self.tasks
            .values()
            .filter(|task| task.round == self.round)
            .all(|task| task.state == TaskState::Done)
    }

    /// Moves to the next phase when every task of this round is done.
    fn advance(&mut self) -> Vec<Effect> {
        if !self.phase_tasks_done() {
            return Vec::new();
        }
        match self.phase {
            Phase::TrainTeacher => {
                let Some(teacher) = self.current_round().teacher.clone() else {
                    return self.fail("teacher training finished without a checkpoint".into());
                };
                self.start_labeling(teacher, true);
                Vec::new()
            }
            Phase::Label => {
                let round = self.round;
                self.phase = Phase::Filter;
                vec![Effect::Filter {
                    round,
                    selection: self.paths.selection(round),
                }]
            }
            Phase::TrainStudent => {
                let Some(student) = self.current_round().student.clone() else {
                    return self.fail("student training finished without a checkpoint".into());
                };
                self.phase = Phase::EvaluateStudent;
                self.add_task(TaskSpec::Evaluate { model: student });
                Vec::new()
            }
            Phase::EvaluateStudent => self.promote(),
            Phase::TrainMpl => {
                let record = self.current_round().clone();
                let (Some(teacher), Some(student)) = (record.teacher, record.student) else {
                    return self
                        .fail("meta pseudo labels training finished without checkpoints".into());
                };
                self.phase = Phase::EvaluateMpl;
                self.add_task(TaskSpec::Evaluate { model: teacher });
                self.add_task(TaskSpec::Evaluate { model: student });
                Vec::new()
            }
            Phase::EvaluateMpl => {
                let Some(student) = self.current_round().student.clone() else {
                    return self.fail("meta pseudo labels evaluation without a student".into());
                };
                if !self.finetune {
                    return self.succeed();
                }
                self.phase = Phase::Finetune;
                let output = self.paths.finetuned_checkpoint();
                self.add_task(TaskSpec::Finetune {
                    init: student.checkpoint,
                    output,
                });
                Vec::new()
            }
            Phase::Finetune => {
                let Some(finetuned) = self.current_round().finetuned.clone() else {
                    return self.fail("finetuning finished without a checkpoint".into());
                };
                self.phase = Phase::EvaluateFinetuned;
                self.add_task(TaskSpec::Evaluate { model: finetuned });
                Vec::new()
            }
            Phase::EvaluateFinetuned => self.succeed(),
            Phase::WaitingForWorkers | Phase::Filter | Phase::Done => Vec::new(),
        }
    }

    fn start_labeling(&mut self, teacher: ModelRef, evaluate_teacher: bool) {
        self.phase = Phase::Label;
        let ranges = self.shard_ranges.clone();
        let round = self.current_round_mut();
        round.teacher = Some(teacher.clone());
        round.shards_total = ranges.len() as u32;
        if evaluate_teacher {
            self.add_task(TaskSpec::Evaluate {
                model: teacher.clone(),
            });
        }
        for (index, (start, end)) in ranges.into_iter().enumerate() {
            self.add_task(TaskSpec::Label {
                teacher: teacher.clone(),
                shard_index: index as u32,
                start,
                end,
                teacher_was: Vec::new(),
            });
        }
    }

    /// Records the global filter's result and starts the student's training.
    pub fn filter_done(&mut self, round: u32, kept: u64, selection: PathBuf) -> Vec<Effect> {
        if self.phase != Phase::Filter || round != self.round {
            return Vec::new();
        }
        if kept == 0 {
            return self.fail(format!(
                "round {round}: no pseudo-labeled example passed the filter: lower pseudo_labels.min_confidence (or, with fewer unlabeled examples than classes, set pseudo_labels.per_class or balance = false) and run the coordinator again with --retry-failed: the filter runs again on the soft labels made"
            ));
        }
        let output = self.paths.checkpoint(round, Role::Student);
        let record = self.current_round_mut();
        record.kept = kept;
        record.selection = Some(selection.clone());
        self.phase = Phase::TrainStudent;
        self.add_task(TaskSpec::Train {
            role: Role::Student,
            output,
            selection: Some(selection),
        });
        Vec::new()
    }

    /// The filter could not run (corrupt shard, I/O error): the run fails with that reason.
    pub fn filter_failed(&mut self, message: String) -> Vec<Effect> {
        self.fail(message)
    }

    fn succeed(&mut self) -> Vec<Effect> {
        self.outcome = RunOutcome::Succeeded;
        self.phase = Phase::Done;
        self.ended_at_ms = Some(unix_ms());
        vec![Effect::Finished]
    }

    /// The student of this round becomes the teacher of the next one, or the run ends.
    fn promote(&mut self) -> Vec<Effect> {
        let finished = self.current_round().clone();
        if self.round >= self.total_rounds {
            return self.succeed();
        }
        let Some(student) = finished.student.clone() else {
            return self.fail("round ended without a student".into());
        };
        self.round += 1;
        self.rounds.push(RoundRecord {
            round: self.round,
            teacher_test_accuracy: finished.student_test_accuracy,
            ..RoundRecord::default()
        });
        // The finished round's tasks, all done, go: its record keeps what it made, and
        // `state.json`, rewritten at every change, would otherwise grow by a round's tasks
        // (tens of thousands on a large data set) at every round.
        let kept = self.tasks.len();
        self.tasks.retain(|_, task| task.round > finished.round);
        self.past_rounds_tasks += (kept - self.tasks.len()) as u32;
        self.start_labeling(student, false);
        Vec::new()
    }

    /// Tasks of the whole run: (done, total).
    pub fn task_counts(&self) -> (u32, u32) {
        let done = self
            .tasks
            .values()
            .filter(|task| task.state == TaskState::Done)
            .count();
        let past = self.past_rounds_tasks;
        (done as u32 + past, self.tasks.len() as u32 + past)
    }
}

fn is_zero(count: &u32) -> bool {
    *count == 0
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
