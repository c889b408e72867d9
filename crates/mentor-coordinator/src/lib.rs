//! The coordinator: owns a run, schedules its tasks over workers and answers status queries.
//!
//! [`state`] is the pure Noisy Student state machine; [`Coordinator`] wraps it with the worker
//! registry, the state store (a JSON snapshot in the run directory, rewritten atomically after
//! every change, so a restarted coordinator resumes) and the global filter step; [`service`]
//! exposes it over gRPC. This crate must not link libtorch: it never runs a model.

pub mod checkpoint;
pub mod filter;
pub mod lock;
pub mod metrics;
pub mod prometheus;
pub mod service;
pub mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mentor_labels::ShardStore;
use mentor_plan::Plan;

use crate::state::{Assignment, Effect, Phase, RunState, TaskId, TaskOutcome, TaskSpec, WorkerId};

/// How often workers are asked to send a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// A worker heard from within this long (3 heartbeat intervals) counts as present: it joins
/// new groups, and status calls it active rather than silent.
pub const HEARD_RECENTLY: Duration = Duration::from_secs(3);

/// After a training group fails, how long a new group waits for the failed group's ranks that
/// still heartbeat (they ask for work once their own collective has failed too): the first rank
/// to ask would otherwise form a group of one, and the run go on with one worker of many.
pub const GROUP_SETTLE: Duration = Duration::from_secs(10);

/// Errors a caller of the coordinator can act on.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("unknown worker `{0}`: register first")]
    UnknownWorker(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    // The cause follows as the source (anyhow prints the chain): not repeated here.
    #[error("the data set")]
    Data(#[from] mentor_data::DataError),
    #[error("the plan does not fit its data: {0}")]
    PlanData(mentor_plan::PlanError),
    #[error("the plan sets what would do nothing: {0}")]
    UnusedSetting(mentor_plan::PlanError),
    #[error("state directory `{dir}` holds a run of another plan (first difference, the run's -> this plan's: {difference}); use a new --state-dir or the same plan (a Meta Pseudo Labels run whose plan changed in [mpl.finetune] only can finetune again with --redo-finetune)")]
    PlanMismatch { dir: PathBuf, difference: String },
    #[error("cannot redo the finetune of the run in `{dir}`: {reason}")]
    RedoFinetune { dir: PathBuf, reason: String },
    #[error("cannot retry the run in `{dir}`: {reason}")]
    RetryFailed { dir: PathBuf, reason: String },
    #[error("run directory `{dir}` is in use by another coordinator{holder}: stop it first, or use another --state-dir")]
    RunInUse { dir: PathBuf, holder: String },
    #[error("state store `{path}`: {reason}")]
    StateStore { path: PathBuf, reason: String },
    #[error("the unlabeled images at `{path}` are not those the run began with (listing {then} then, {now} now): a file added, removed or renamed shifts the example ids its soft labels and selections name; restore them, or start a new run in another --state-dir")]
    UnlabeledChanged {
        path: PathBuf,
        then: String,
        now: String,
    },
    #[error("soft-label storage (pseudo_labels.storage): {reason}")]
    Storage { reason: String },
    #[error("teacher.checkpoint `{path}`: {reason}")]
    TeacherCheckpoint { path: PathBuf, reason: String },
}

/// How a run directory is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reopen {
    /// Resume the run saved there (or start one).
    Resume,
    /// `--redo-finetune`: finetune a Meta Pseudo Labels run's student again.
    RedoFinetune,
    /// `--retry-failed`: go on with a failed run from the phase it failed in.
    RetryFailed,
}

/// What the coordinator knows about one worker.
#[derive(Debug, Clone)]
pub struct WorkerEntry {
    pub id: WorkerId,
    pub hostname: String,
    /// The worker's process id on its host (0 when not told).
    pub pid: u32,
    pub device: String,
    /// Drawn by the worker process (empty when it does not say): who registers again.
    pub instance: String,
    /// The PCI bus id of its GPU, when it said (see [`Coordinator::gpu_taken`]).
    pub gpu: String,
    pub last_seen: Instant,
    pub alive: bool,
    /// Told to shut down because the run ended.
    pub exited: bool,
    /// Was in a training group that failed and has not been heard of since: left out of new
    /// groups until it shows signs of life.
    pub suspect: bool,
    /// When it was last suspected: a new group waits a little for a suspect that still
    /// heartbeats (see [`GROUP_SETTLE`]).
    pub suspected_at: Option<Instant>,
    /// When it registered, until it first asks for a task: it is loading its data set, and a
    /// training group counts it even when its heartbeats are late, for as long as a group
    /// waits for its ranks (`workers.join_timeout_seconds`) after its registration.
    pub loading_since: Option<Instant>,
    pub task: Option<TaskId>,
    pub progress: Progress,
    /// When the current task was given or last reported progress (its lease starts there).
    pub progress_at: Instant,
    /// The current task's first progress report (step, when): its pace since then gives the
    /// time left.
    pub progress_origin: Option<(u64, Instant)>,
}

impl WorkerEntry {
    /// Seconds until the current task reaches its last step at the pace it kept since its
    /// first progress report; `None` before two reports with different steps.
    pub fn seconds_left(&self) -> Option<f64> {
        let (first_step, first_at) = self.progress_origin?;
        let steps = self
            .progress
            .step
            .checked_sub(first_step)
            .filter(|&s| s > 0)?;
        let seconds = self
            .progress_at
            .saturating_duration_since(first_at)
            .as_secs_f64();
        (seconds > 0.0).then(|| {
            self.progress.total_steps.saturating_sub(self.progress.step) as f64 * seconds
                / steps as f64
        })
    }
}

/// The latest progress report of a task.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub images_per_second: f64,
    pub metrics: std::collections::HashMap<String, f64>,
}

/// What the coordinator makes of a progress report.
enum Verdict {
    /// The report is of the worker's current attempt: recorded.
    Record,
    /// A labeler past its lease, still working: not recorded, not stopped (the first commit
    /// of the shard wins).
    GoOn,
    /// The worker should stop the attempt, for this reason.
    Stop(String),
}

/// The answer to a worker asking for work.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskReply {
    Task(Box<Assignment>),
    RetryAfter(Duration),
    Shutdown,
}

/// Where the ranks of one attempt of a training task listen.
#[derive(Debug, Clone, Default)]
struct Rendezvous {
    addresses: Vec<Option<String>>,
    nccl_unique_id: Vec<u8>,
}

/// A rank joining the group of `attempt` of a training task.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupJoin {
    pub task: TaskId,
    pub attempt: u32,
    pub rank: u32,
    /// `host:port` of the rank's ring listener (empty for NCCL).
    pub address: String,
    /// Rank 0 of an NCCL group: the unique id.
    pub nccl_unique_id: Vec<u8>,
}

/// What a rank learns about its group.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupView {
    pub ready: bool,
    pub cancelled: bool,
    pub addresses: Vec<String>,
    pub nccl_unique_id: Vec<u8>,
    pub missing_ranks: Vec<u32>,
}

/// Checks that `plan` differs from the run's plan in `[mpl.finetune]` at most and rewinds the
/// run to its finetune (its checkpoints must still be there).
fn redo_finetune_of(state: &mut RunState, plan: &Plan, dir: &Path) -> Result<(), CoordinatorError> {
    let error = |reason: String| CoordinatorError::RedoFinetune {
        dir: dir.to_path_buf(),
        reason,
    };
    let recorded = recorded_plan(state)
        .map_err(|e| error(format!("the run's recorded plan does not parse: {e}")))?;
    let mut recorded = with_free_settings_of(recorded, plan, state.unlabeled_fingerprint.is_some());
    if let (Some(recorded), Some(mpl)) = (recorded.mpl.as_mut(), plan.mpl.as_ref()) {
        recorded.finetune = mpl.finetune.clone();
    }
    if let Some(difference) = recorded.first_difference(plan) {
        return Err(error(format!(
            "the plan differs from the run's in more than [mpl.finetune] (first difference, the run's -> this plan's: {difference})"
        )));
    }
    let previous = state.current_round().finetuned_student_test_accuracy;
    state.redo_finetune(plan).map_err(error)?;
    if let Some(student) = &state.current_round().student {
        if state.phase == Phase::Finetune && !student.checkpoint.exists() {
            return Err(error(format!(
                "the student checkpoint `{}` is missing",
                student.checkpoint.display()
            )));
        }
    }
    tracing::info!(
        run = %state.run_id,
        previous_finetuned_accuracy = ?previous,
        "redoing the finetune of the student"
    );
    Ok(())
}

/// The refusal of `--redo-finetune` or `--retry-failed` on a directory that holds no run.
fn no_saved_run(run_dir: &Path, how: Reopen) -> CoordinatorError {
    let (dir, reason) = (
        run_dir.to_path_buf(),
        "it holds no run (no state.json)".into(),
    );
    match how {
        Reopen::RedoFinetune => CoordinatorError::RedoFinetune { dir, reason },
        _ => CoordinatorError::RetryFailed { dir, reason },
    }
}

/// Checks that `plan` may open the run recorded in `state` the way `how` says, and makes the
/// state that run's (its plan the new one where they may differ; a finetune to redo or a failed
/// phase to retry set up). Nothing is written.
fn reopen(
    state: &mut RunState,
    plan: &Plan,
    how: Reopen,
    run_dir: &Path,
) -> Result<(), CoordinatorError> {
    if how == Reopen::RedoFinetune {
        redo_finetune_of(state, plan, run_dir)?;
    } else if state.plan_toml != plan.to_toml_string() {
        // The text may differ in form alone (a run recorded by an older version); the
        // settings decide.
        // `data.dir` says where the data is, not what it is: a run moved to another
        // machine reads the same files from wherever they are there.
        let difference = match recorded_plan(state) {
            Ok(recorded) => {
                let listing_recorded = state.unlabeled_fingerprint.is_some();
                let mut recorded = with_free_settings_of(recorded, plan, listing_recorded);
                // A run whose filter kept nothing is retried with other filter settings
                // (those its error advises): the filter runs again on the shards.
                if how == Reopen::RetryFailed && state.failed_in == Some(Phase::Filter) {
                    let (filter, wanted) = (&mut recorded.pseudo_labels, &plan.pseudo_labels);
                    filter.min_confidence = wanted.min_confidence;
                    filter.per_class = wanted.per_class;
                    filter.balance = wanted.balance;
                    // New filter settings, checked as a new run's are.
                    wanted
                        .check_unused()
                        .map_err(CoordinatorError::UnusedSetting)?;
                }
                recorded.first_difference(plan)
            }
            Err(e) => Some(format!("the recorded plan does not parse: {e}")),
        };
        if let Some(difference) = difference {
            return Err(CoordinatorError::PlanMismatch {
                dir: run_dir.to_path_buf(),
                difference,
            });
        }
        state.plan_toml = plan.to_toml_string();
    }
    if how == Reopen::RetryFailed {
        let failure = match &state.outcome {
            state::RunOutcome::Failed(message) => message.clone(),
            _ => String::new(),
        };
        state
            .retry_failed()
            .map_err(|reason| CoordinatorError::RetryFailed {
                dir: run_dir.to_path_buf(),
                reason,
            })?;
        tracing::info!(run = %state.run_id, %failure, phase = state.phase.as_str(), "retrying the failed run from the phase it failed in");
    }
    Ok(())
}

/// The plan `state` records, its local paths absolute: a run recorded with relative paths (by
/// an earlier build) read them where its coordinator runs, as they are read now.
fn recorded_plan(state: &RunState) -> Result<Plan, mentor_plan::PlanError> {
    Plan::from_recorded_toml(&state.plan_toml).and_then(Plan::with_absolute_paths)
}

/// The run's `recorded` plan with the settings a resumed run may change taken from `plan`
/// ([`Plan::with_free_settings_of`]), each place that moved logged.
fn with_free_settings_of(recorded: Plan, plan: &Plan, listing_recorded: bool) -> Plan {
    if recorded.data.dir != plan.data.dir {
        tracing::info!(from = %recorded.data.dir.display(), to = %plan.data.dir.display(), "the run reads its data from another folder");
    }
    let unlabeled = (&recorded.data.unlabeled.path, &plan.data.unlabeled.path);
    if let (true, Some(from), Some(to)) = (listing_recorded, unlabeled.0, unlabeled.1) {
        if from != to {
            tracing::info!(from = %from.display(), to = %to.display(), "the run reads its unlabeled images from another place");
        }
    }
    if let (Some(from), Some(to)) = (&recorded.teacher.checkpoint, &plan.teacher.checkpoint) {
        if from != to {
            tracing::info!(from = %from.display(), to = %to.display(), "the plan names the first teacher's checkpoint in another place");
        }
    }
    recorded.with_free_settings_of(plan, listing_recorded)
}

/// Where attempt `attempt` of a training task writes the checkpoint that goes to `output` once
/// the coordinator takes its result: `round-1-student.attempt-2.safetensors`.
pub fn attempt_output(output: &Path, attempt: u32) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    let extension = output
        .extension()
        .map(|extension| format!(".{}", extension.to_string_lossy()))
        .unwrap_or_default();
    output.with_file_name(format!("{stem}.attempt-{attempt}{extension}"))
}

/// The save a training in progress whose checkpoint goes to `output` resumes from
/// (`round-1-teacher.resume.safetensors`; the worker's `resume::resume_path`, which its
/// attempts share).
pub fn resume_save(output: &Path) -> PathBuf {
    output.with_extension("resume.safetensors")
}

/// Moves the checkpoints attempt `attempt` of a training task wrote into their places, and
/// removes the save the training resumed from (its model is in place now); the checkpoint its
/// result names (the student's).
fn publish_outputs(spec: &TaskSpec, attempt: u32) -> Result<Published, String> {
    let outputs = spec.outputs();
    let Some(named) = outputs.last() else {
        return Err("a result of training for a task that does not train".into());
    };
    for output in &outputs {
        let written = attempt_output(output, attempt);
        mentor_labels::durable::publish(&written, output).map_err(|e| {
            format!(
                "the checkpoint `{}` of attempt {attempt} cannot be moved to `{}`: {e}",
                written.display(),
                output.display()
            )
        })?;
    }
    Ok(Published {
        checkpoint: named.to_path_buf(),
        leftovers: leftovers_of(spec, attempt),
    })
}

/// What a training whose attempt `attempt` put its checkpoints in place left that is of no
/// use: earlier attempts' files, given up (best effort: an attempt still running somewhere may
/// leave its own later), its resume saves and the temporary files of writes that never ended.
fn leftovers_of(spec: &TaskSpec, attempt: u32) -> Vec<PathBuf> {
    let mut leftovers = Vec::new();
    for output in spec.outputs() {
        leftovers.extend((1..attempt).map(|earlier| attempt_output(output, earlier)));
        leftovers.push(resume_save(output));
        leftovers.extend(temporaries_of(output));
    }
    if let TaskSpec::TrainMpl { teacher_output, .. } = spec {
        // The joint training's save (the worker's `mpl::resume_path`).
        let joint = teacher_output.with_file_name("mpl-joint.resume.safetensors");
        leftovers.extend(temporaries_of(&joint));
        leftovers.push(joint);
    }
    leftovers
}

/// The temporary files of writes of `output` (`round-1-student.safetensors`) and of its
/// attempts' and resume saves that never ended (`round-1-student.attempt-2.<pid>-<n>.tmp.safetensors`:
/// a worker killed while it wrote one).
fn temporaries_of(output: &Path) -> Vec<PathBuf> {
    let (Some(folder), Some(stem)) = (output.parent(), output.file_stem()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", stem.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy())
                .is_some_and(|name| name.starts_with(&prefix) && name.ends_with(".tmp.safetensors"))
        })
        .collect()
}

/// A training's checkpoints put in place by [`publish_outputs`].
struct Published {
    /// The checkpoint the result names (the last output).
    checkpoint: PathBuf,
    /// What the training left that is of no use once the state records its result: earlier
    /// attempts' checkpoints and its resume saves. Removed only after that state is saved: a
    /// coordinator stopped before the save runs the task again, and it resumes from its save.
    leftovers: Vec<PathBuf>,
}

/// Rebases the paths the selection files of a run moved from `from` to `run_dir` record (the
/// soft-label store's root, when it lies in the run directory), as `RunState::from_saved` does
/// for the state.
fn rebase_selections(run_dir: &Path, from: &Path) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(run_dir.join("selections")) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let error = |reason: String| format!("selection `{}`: {reason}", path.display());
        let text = std::fs::read_to_string(&path).map_err(|e| error(e.to_string()))?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
        state::rebase(&mut value, from, run_dir);
        let json = serde_json::to_vec(&value).map_err(|e| error(e.to_string()))?;
        write_atomically(&path, &json).map_err(|e| error(e.to_string()))?;
    }
    Ok(())
}

/// The plan's `teacher.checkpoint`, made absolute (relative paths start where the coordinator
/// runs, as `data.dir` does), once it is known to be a safetensors file with tensors in it,
/// with the SHA-256 of its bytes. A run records the digest of the teacher it began with
/// (`began_with`): another file (a retrained teacher put in its place, or named by a plan
/// edited between two starts) would label the rest of its shards with another model than the
/// first ones, and is refused.
fn teacher_checkpoint(
    given: &Path,
    began_with: Option<&str>,
) -> Result<(PathBuf, String), CoordinatorError> {
    let refuse = |reason: String| CoordinatorError::TeacherCheckpoint {
        path: given.to_path_buf(),
        reason,
    };
    let path = std::path::absolute(given).map_err(|e| refuse(e.to_string()))?;
    let tensors = checkpoint::tensor_count(&path).map_err(refuse)?;
    let digest = mentor_labels::sha256_file(&path).map_err(|e| refuse(e.to_string()))?;
    if let Some(then) = began_with.filter(|then| **then != digest) {
        return Err(refuse(format!(
            "it is not the teacher this run began labeling with (its SHA-256 is {digest}, the run's teacher's {then}): one round's soft labels come from one teacher; give the run its teacher back, or start a new run (another --state-dir) with this one"
        )));
    }
    tracing::info!(checkpoint = %path.display(), tensors, sha256 = %digest, "the first teacher is read from a checkpoint, not trained");
    Ok((path, digest))
}

/// Before a failed run's filter or student training runs again (`--retry-failed`): the round's
/// shards that are gone from the store or are no longer what their labelers committed (a
/// partial copy of a moved run, a deleted object, a damaged disk; each would fail every attempt
/// that reads it), by index and key. Reads each of the round's shards once; changes nothing
/// (the run takes them back to labeling with [`RunState::relabel`], and removes them from the
/// store once nothing can refuse it).
fn damaged_shards(
    state: &RunState,
    store: &ShardStore,
) -> Result<Vec<(u32, String)>, CoordinatorError> {
    if !matches!(state.phase, Phase::Filter | Phase::TrainStudent) {
        return Ok(Vec::new());
    }
    let round = state.current_round();
    let total = round.shards.len();
    tracing::info!(
        round = round.round,
        shards = total,
        "checking the round's soft-label shards before the retry"
    );
    let mut damaged = Vec::new();
    for (n, shard) in round.shards.iter().enumerate() {
        let why = match store.get(&shard.key) {
            Ok(bytes) if mentor_labels::sha256_hex(&bytes) == shard.sha256 => None,
            Ok(_) => Some("its bytes are not those its labeler committed"),
            Err(mentor_labels::LabelError::NotFound { .. }) => Some("it is gone from the store"),
            Err(e) => {
                return Err(CoordinatorError::Storage {
                    reason: format!(
                        "checking shard `{}` before the retry: {e}",
                        store.location(&shard.key)
                    ),
                })
            }
        };
        if let Some(why) = why {
            tracing::warn!(shard = %store.location(&shard.key), why, "this shard is labeled again");
            damaged.push((shard.index, shard.key.clone()));
        }
        if (n + 1) % 1000 == 0 {
            tracing::info!(
                checked = n + 1,
                of = total,
                damaged = damaged.len(),
                "checking shards"
            );
        }
    }
    if !damaged.is_empty() {
        tracing::info!(
            damaged = damaged.len(),
            of = total,
            "the damaged shards are labeled again, then the round's filter runs again"
        );
    }
    Ok(damaged)
}

/// The key, at the soft-label store's root, that names the run whose labels it holds.
const STORE_OWNER: &str = "run.json";

/// Claims the soft-label store for the run `run_id`, or refuses a store another run holds:
/// shard keys and manifests are the same for every run (`round-N/shard-XXXXX`), so another
/// run's labels under the same prefix would pass for this one's (those of a given first teacher
/// in particular, which two runs may share).
///
/// `true` when this call made the claim (not an earlier start of the same run). A failed write
/// is tried again: a conditional write whose answer was lost may have been made, and the retry
/// then finds the run's own claim. The store is first checked to honour create-if-absent
/// writes, which the claim and every shard commit rely on.
fn claim_storage(store: &ShardStore, run_id: &str) -> Result<bool, CoordinatorError> {
    let error = |reason: String| CoordinatorError::Storage { reason };
    store
        .check_conditional_writes(&format!(".mentor-probe-{run_id}-{}", std::process::id()))
        .map_err(|e| error(e.to_string()))?;
    let claim = serde_json::json!({ "run_id": run_id }).to_string();
    let created = store
        .commit(STORE_OWNER, claim.as_bytes())
        .map_err(|e| error(e.to_string()))?;
    if created == mentor_labels::PutOutcome::Created {
        return Ok(true);
    }
    let owner = store.get(STORE_OWNER).map_err(|e| error(e.to_string()))?;
    let owner: serde_json::Value = serde_json::from_slice(&owner).unwrap_or_default();
    match owner["run_id"].as_str() {
        Some(owner) if owner == run_id => Ok(false),
        owner => Err(error(format!(
            "`{}` holds the soft labels of run {}: give this run a pseudo_labels.storage of its own (another prefix); if no run directory holds that run (a start that failed before saving its state), remove that run.json",
            store.location(STORE_OWNER),
            owner.unwrap_or("unknown (its run.json is unreadable)")
        ))),
    }
}

/// Writes `bytes` to `path` through a temporary file beside it, flushed, and a rename, so that
/// a reader (or a coordinator started again, after the machine went down too) sees the old file
/// or the new one, never half of one.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    mentor_labels::durable::write(path, &path.with_extension("tmp"), bytes)
}

/// `cpu` or `cuda` from a device name such as `cuda:3`.
pub fn device_kind(device: &str) -> &str {
    device.split(':').next().unwrap_or(device)
}

/// A run and its workers.
pub struct Coordinator {
    pub plan: Plan,
    pub state: RunState,
    pub workers: BTreeMap<WorkerId, WorkerEntry>,
    pub store: ShardStore,
    pub latest_loss: Option<f64>,
    pub latest_accuracy: Option<f64>,
    groups: HashMap<(TaskId, u32), Rendezvous>,
    /// The run directory's lock, held while the coordinator lives.
    lock: lock::RunLock,
    /// Every progress report and task result, appended to `<run_dir>/metrics.jsonl`.
    metrics: metrics::MetricsLog,
    /// The most ranks a training group may have: images in the plan's smallest global batch
    /// (each rank needs one).
    most_ranks: u32,
    /// A resumed run hands out no task until `workers.min_workers` have registered with this
    /// coordinator, as a new run waits for them before it starts: else the first worker back
    /// would train alone what the whole group trained.
    regathering: bool,
    /// Until when tasks a restart left running wait for their ranks to register again naming
    /// them, or their rank 0 to send its result again (they do at once; one that does not come
    /// is gone).
    abandoned_until: Option<Instant>,
    /// Why the last save of the run state failed (a full disk, a read-only or vanished run
    /// directory), and when; `None` while saves succeed. No task is handed out meanwhile: work
    /// whose assignment a restart could not know of would run twice, its ids and attempt
    /// numbers given again. (Labeling tasks alone may run so, under grouped saves: see
    /// [`Coordinator::persist_soon`].)
    save_error: Option<String>,
    /// When the last save failed: the service's saver tries again a second later.
    save_failed_at: Option<Instant>,
    /// Changes not saved yet (see [`Coordinator::persist_soon`]).
    unsaved: bool,
    /// When the last save ended, how long it took and how many bytes it wrote.
    last_save: Option<(Instant, Duration, usize)>,
    /// Saves made or tried (for `bench-scheduler`).
    saves: u64,
    /// Files of finished trainings to remove once the state that records them is saved (see
    /// [`Published::leftovers`]).
    leftovers: Vec<PathBuf>,
    /// States this large (bytes) or larger save labeling changes in groups (see
    /// [`Coordinator::persist_soon`]); [`GROUP_SAVES_FROM`] but in tests.
    group_saves_from: usize,
}

/// The size of a saved state (bytes) from which the assignments and results of labeling tasks
/// are saved in groups: some 3,500 tasks (compact JSON). Below it every change is saved as it
/// happens.
pub const GROUP_SAVES_FROM: usize = 1 << 20;

/// A save of a large state is followed by this many times its duration without one: saving
/// takes at most a fifth of the coordinator's time.
const SAVE_SPACING: u32 = 4;

/// How often the service saves changes left for a later save.
pub const SAVE_CHECK_INTERVAL: Duration = Duration::from_millis(50);

impl Coordinator {
    /// Opens the run of `plan` in `run_dir`, resuming the saved state when there is one.
    pub fn open(plan: Plan, run_dir: &Path) -> Result<Coordinator, CoordinatorError> {
        Coordinator::open_run(plan, run_dir, Reopen::Resume)
    }

    /// Opens the failed run of `plan` saved in `run_dir` to go on from where it failed (see
    /// [`RunState::retry_failed`]): for a failure whose cause is gone (a worker's GPU taken by
    /// another process, storage that was down, a damaged save removed).
    pub fn open_to_retry_failed(
        plan: Plan,
        run_dir: &Path,
    ) -> Result<Coordinator, CoordinatorError> {
        Coordinator::open_saved(plan, run_dir, Reopen::RetryFailed)
    }

    /// Opens the Meta Pseudo Labels run saved in `run_dir` to finetune its student again under
    /// `plan`, which may differ from the run's plan in `[mpl.finetune]` only: the hours of joint
    /// teacher-student training are kept (see [`RunState::redo_finetune`]).
    pub fn open_to_redo_finetune(
        plan: Plan,
        run_dir: &Path,
    ) -> Result<Coordinator, CoordinatorError> {
        let coordinator = Coordinator::open_saved(plan, run_dir, Reopen::RedoFinetune)?;
        // The finetune starts over: a save of an earlier one, interrupted, is not resumed.
        let finetuned = coordinator.state.paths.finetuned_checkpoint();
        mentor_labels::durable::remove_if_there(&resume_save(&finetuned));
        Ok(coordinator)
    }

    /// Opens the run saved in `run_dir` the way `how` says; refused when there is none.
    fn open_saved(
        plan: Plan,
        run_dir: &Path,
        how: Reopen,
    ) -> Result<Coordinator, CoordinatorError> {
        if !run_dir.join("state.json").exists() {
            return Err(no_saved_run(run_dir, how));
        }
        Coordinator::open_run(plan, run_dir, how)
    }

    /// What opening `run_dir` with `plan` the way `how` says would refuse about the run saved
    /// there (another plan, no finetune to redo, no failure to retry, an unreadable
    /// `state.json`, a first teacher other than the one it began labeling with), found without opening it: nothing is taken or written. A directory
    /// without a saved run is fine to resume (a new run starts there). For `mentor plan
    /// --state-dir`; the plan's own checks and its data's are not made here. Returns whether
    /// the run still needs the plan's `teacher.checkpoint` (see
    /// [`RunState::needs_given_teacher`]; a new run does).
    pub fn check_reopen(
        plan: &Plan,
        run_dir: &Path,
        how: Reopen,
    ) -> Result<bool, CoordinatorError> {
        let state_file = run_dir.join("state.json");
        if !state_file.exists() {
            return match how {
                Reopen::Resume => Ok(true),
                _ => Err(no_saved_run(run_dir, how)),
            };
        }
        let state_store_error = |reason: String| CoordinatorError::StateStore {
            path: state_file.clone(),
            reason,
        };
        let run_dir = run_dir
            .canonicalize()
            .map_err(|e| state_store_error(e.to_string()))?;
        let text =
            std::fs::read_to_string(&state_file).map_err(|e| state_store_error(e.to_string()))?;
        let (mut state, _) = RunState::from_saved(&text, &run_dir)
            .map_err(|e| state_store_error(format!("unreadable state.json: {e}")))?;
        // As the coordinator reads it.
        let plan = &plan
            .clone()
            .with_absolute_paths()
            .map_err(CoordinatorError::PlanData)?;
        reopen(&mut state, plan, how, &run_dir)?;
        let needed = state.needs_given_teacher();
        // The teacher a run began labeling with is the one it goes on with.
        if let (true, Some(given), Some(began_with)) = (
            needed,
            &plan.teacher.checkpoint,
            &state.teacher_checkpoint_sha256,
        ) {
            teacher_checkpoint(given, Some(began_with))?;
        }
        Ok(needed)
    }

    fn open_run(plan: Plan, run_dir: &Path, how: Reopen) -> Result<Coordinator, CoordinatorError> {
        let state_store_error = |reason: String| CoordinatorError::StateStore {
            path: run_dir.to_path_buf(),
            reason,
        };
        // The folders this start makes (the run directory, and its parents that are missing:
        // `runs/` of the default `runs/<name>`), deepest first.
        let created: Vec<PathBuf> = std::path::absolute(run_dir)
            .map(|absolute| {
                absolute
                    .ancestors()
                    .take_while(|folder| !folder.exists())
                    .map(Path::to_path_buf)
                    .collect()
            })
            .unwrap_or_default();
        std::fs::create_dir_all(run_dir).map_err(|e| state_store_error(e.to_string()))?;
        let run_dir = run_dir
            .canonicalize()
            .map_err(|e| state_store_error(e.to_string()))?;
        let lock = lock::RunLock::take(&run_dir)?;
        let opened = Coordinator::open_locked(plan, &run_dir, lock, how);
        if opened.is_err() && !created.is_empty() {
            // A run directory made for a run that could not start holds nothing worth keeping:
            // it goes, with the parents made for it (each removal fails, leaving things as they
            // are, if anything else is in it).
            let _ = std::fs::remove_file(run_dir.join(lock::FILE_NAME));
            let _ = std::fs::remove_dir(run_dir.join("pseudo-labels"));
            for folder in &created {
                let _ = std::fs::remove_dir(folder);
            }
        }
        opened
    }

    /// Opens the run in `run_dir` (canonical, held by `lock`).
    fn open_locked(
        plan: Plan,
        run_dir: &Path,
        lock: lock::RunLock,
        how: Reopen,
    ) -> Result<Coordinator, CoordinatorError> {
        let state_store_error = |reason: String| CoordinatorError::StateStore {
            path: run_dir.to_path_buf(),
            reason,
        };
        let run_dir = run_dir.to_path_buf();
        // Recorded and sent to workers as absolute paths: a worker started in another
        // directory, or on another machine, reads the same places.
        let plan = plan
            .with_absolute_paths()
            .map_err(CoordinatorError::PlanData)?;
        let state_file = run_dir.join("state.json");
        let resumed = state_file.exists();
        if !resumed {
            // Settings that would do nothing: refused for a new run (before the data is read),
            // while a run recorded by an earlier build with one resumes with its plan unchanged.
            plan.check_unused()
                .map_err(CoordinatorError::UnusedSetting)?;
        }
        let labels = mentor_data::load_train_labels(&plan.data.dir)?;
        let split = mentor_data::Split::new(&labels, 0, &plan.data, plan.split_seed())?;
        // A model that cannot take the images would fail its first task, after the wait for
        // workers: refused now.
        let side = mentor_data::check_idx_files(&plan.data, &labels)?;
        plan.check_image_side(side as u32)
            .map_err(CoordinatorError::PlanData)?;
        let storage = plan
            .pseudo_labels
            .storage
            .clone()
            .unwrap_or_else(|| run_dir.join("pseudo-labels").display().to_string());
        let store = ShardStore::open(&storage).map_err(|e| CoordinatorError::Storage {
            reason: e.to_string(),
        })?;
        let source = mentor_data::Source::open(&plan.data, &split.unlabeled)?;
        let fingerprint = source.fingerprint(&plan.data);
        // A resumed run's `teacher.checkpoint`, as its plan gave it, and its old directory when
        // it moved.
        let mut recorded_teacher = None;
        let mut moved_from = None;
        let mut state = if state_file.exists() {
            let text = std::fs::read_to_string(&state_file)
                .map_err(|e| state_store_error(e.to_string()))?;
            let (mut state, old_dir) = RunState::from_saved(&text, &run_dir)
                .map_err(|e| state_store_error(format!("unreadable state.json: {e}")))?;
            if let Some(old) = &old_dir {
                tracing::info!(from = %old.display(), to = %run_dir.display(), "the run directory moved since its last save: its recorded paths follow it");
            }
            moved_from = old_dir;
            recorded_teacher = Plan::from_recorded_toml(&state.plan_toml)
                .ok()
                .and_then(|recorded| recorded.teacher.checkpoint);
            reopen(&mut state, &plan, how, &run_dir)?;
            state.requeue_running();
            state.began_at_ms.get_or_insert_with(state::unix_ms);
            tracing::info!(run = %state.run_id, round = state.round, phase = state.phase.as_str(), "resuming run from the state store");
            state
        } else {
            let run_id = new_run_id(&plan.name);
            let shards = source.shards(plan.data.shard_size);
            tracing::info!(
                format = source.format().as_str(),
                units = source.units(),
                shards = shards.len(),
                "unlabeled data"
            );
            let examples = source.known_examples().unwrap_or(0);
            RunState::new(run_id, &plan, shards, examples, &run_dir)
        };
        match &state.unlabeled_fingerprint {
            Some(recorded) if !mentor_data::Source::same_fingerprint(recorded, &fingerprint) => {
                return Err(CoordinatorError::UnlabeledChanged {
                    path: plan.data.unlabeled_place(),
                    then: recorded.clone(),
                    now: fingerprint,
                });
            }
            // The same listing: kept in the form it was recorded in (workers and coordinators
            // of the version that recorded it compare it as it is).
            Some(_) => {}
            // A new run, or one recorded before runs kept it: from now on.
            None => state.unlabeled_fingerprint = Some(fingerprint),
        }
        // A retry relabels the shards damaged since the round read them (with the round's
        // teacher: the given one's file is checked below when that is it).
        let damaged = match how {
            Reopen::RetryFailed => damaged_shards(&state, &store)?,
            _ => Vec::new(),
        };
        let indices: Vec<u32> = damaged.iter().map(|(index, _)| *index).collect();
        state
            .relabel(&indices)
            .map_err(|reason| CoordinatorError::RetryFailed {
                dir: run_dir.clone(),
                reason,
            })?;
        if let Some(given) = &plan.teacher.checkpoint {
            // Checked while a task still needs it: a run past its first labeling does not.
            if state.needs_given_teacher() {
                // A resumed run keeps the file it resolved when it began (its tasks name it),
                // wherever the coordinator starts again, unless the plan now names the teacher
                // in another place (the run moved to a machine that keeps it elsewhere): its
                // tasks then read it from there.
                let began_with = state.teacher_checkpoint_sha256.clone();
                let began_with = began_with.as_deref();
                let (resolved, digest) = match state.teacher_checkpoint.clone() {
                    Some(recorded) if recorded_teacher.as_ref() == Some(given) => {
                        teacher_checkpoint(&recorded, began_with)?
                    }
                    Some(recorded) if recorded_teacher.is_some() => {
                        let (resolved, digest) = teacher_checkpoint(given, began_with)?;
                        state
                            .move_teacher_checkpoint(&recorded, &resolved)
                            .map_err(state_store_error)?;
                        (resolved, digest)
                    }
                    _ => teacher_checkpoint(given, began_with)?,
                };
                state.teacher_checkpoint = Some(resolved);
                // A run recorded before runs kept the digest: from now on.
                state.teacher_checkpoint_sha256 = Some(digest);
            }
        }
        let claimed = plan.method == mentor_plan::Method::NoisyStudent
            && claim_storage(&store, &state.run_id)?;
        // The selection files follow a moved directory once nothing can refuse the run any more
        // (a refused run leaves its directory as it was).
        if let Some(old) = &moved_from {
            rebase_selections(&run_dir, old).map_err(state_store_error)?;
        }
        // A state written before histograms had files of their own carries them: they move out,
        // once nothing can refuse the run (the next save leaves them out of `state.json`).
        for round in &mut state.rounds {
            for shard in &mut round.shards {
                filter::set_histogram_aside(&state.paths, round.round, shard);
            }
        }
        for (_, key) in &damaged {
            store.delete(key).map_err(|e| CoordinatorError::Storage {
                reason: format!("removing the damaged shard `{}`: {e}", store.location(key)),
            })?;
        }
        let plan_most_ranks = plan
            .training_batches()
            .iter()
            .map(|(_, batch)| *batch)
            .min()
            .unwrap_or(u32::MAX)
            .max(1);
        let abandoned_until = state
            .has_abandoned()
            .then(|| Instant::now() + Duration::from_secs(plan.workers.heartbeat_timeout_seconds));
        let regathering = resumed
            && !state.is_finished()
            && state.phase != Phase::WaitingForWorkers
            && plan.workers.min_workers > 0;
        // What status shows until the next evaluation; the latest loss comes with the next
        // progress report.
        let latest_accuracy = state.latest_accuracy();
        // What finished trainings left (a coordinator stopped between the save that recorded
        // one and the removal, or before a save that failed ever succeeded): it goes with the
        // first save.
        let leftovers: Vec<PathBuf> = state
            .tasks
            .values()
            .filter(|task| task.state == state::TaskState::Done && task.spec.is_training())
            .flat_map(|task| leftovers_of(&task.spec, task.attempts + 1))
            .collect();
        let mut coordinator = Coordinator {
            plan,
            state,
            workers: BTreeMap::new(),
            store,
            latest_loss: None,
            latest_accuracy,
            groups: HashMap::new(),
            metrics: metrics::MetricsLog::open(&run_dir),
            most_ranks: plan_most_ranks,
            lock,
            regathering,
            abandoned_until,
            save_error: None,
            save_failed_at: None,
            unsaved: false,
            last_save: None,
            saves: 0,
            leftovers,
            group_saves_from: GROUP_SAVES_FROM,
        };
        if let Err(error) = coordinator.persist() {
            // A claim for a run whose id was never saved would refuse every later start.
            if claimed && !resumed {
                if let Err(e) = coordinator.store.delete(STORE_OWNER) {
                    tracing::warn!(error = %e, "could not withdraw the claim on the soft-label store");
                }
            }
            return Err(error);
        }
        Ok(coordinator)
    }

    /// Tells where this coordinator listens: `coordinator.addr` (what `--coordinator` takes)
    /// and the run directory's lock (what a second coordinator is told).
    pub fn announce(&mut self, url: &str) -> Result<(), CoordinatorError> {
        let path = self.state.paths.run_dir.join("coordinator.addr");
        std::fs::write(&path, format!("{url}\n")).map_err(|e| CoordinatorError::StateStore {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.lock.record_address(url);
        // Workers can reach it from now on: the wait for the attempts a restart left running
        // counts from here, not from the state's loading.
        if self.abandoned_until.is_some() {
            let wait = Duration::from_secs(self.plan.workers.heartbeat_timeout_seconds);
            self.abandoned_until = Some(Instant::now() + wait);
        }
        Ok(())
    }

    /// Whether this resumed run waits for `workers.min_workers` to register before it hands
    /// out tasks again.
    pub fn regathering(&self) -> bool {
        self.regathering
    }

    /// The root of the soft-label store, as workers must see it.
    pub fn storage_root(&self) -> String {
        self.store.root().to_string()
    }

    /// Writes the state snapshot atomically; then removes what finished trainings left (see
    /// [`Published::leftovers`]).
    pub fn persist(&mut self) -> Result<(), CoordinatorError> {
        self.write_state()?;
        self.remove_leftovers();
        Ok(())
    }

    fn remove_leftovers(&mut self) {
        for leftover in std::mem::take(&mut self.leftovers) {
            mentor_labels::durable::remove_if_there(&leftover);
        }
    }

    /// Writes `state.json` whole, compact (a third smaller than indented, and as much faster
    /// to write: `jq . state.json` reads it); the bytes written.
    fn write_state(&self) -> Result<usize, CoordinatorError> {
        let path = self.state.paths.state_file();
        let error = |reason: String| CoordinatorError::StateStore {
            path: path.clone(),
            reason,
        };
        let json = serde_json::to_vec(&self.state).map_err(|e| error(e.to_string()))?;
        write_atomically(&path, &json).map_err(|e| error(e.to_string()))?;
        Ok(json.len())
    }

    /// Saves the state; a failure is logged once (until a save succeeds again) and holds the
    /// handing out of tasks (see [`Coordinator::save_error`]).
    fn persist_or_log(&mut self) {
        let began = Instant::now();
        let saved = self.write_state();
        let ended = Instant::now();
        self.saves += 1;
        match saved {
            Ok(bytes) => {
                self.unsaved = false;
                self.last_save = Some((ended, ended - began, bytes));
                self.remove_leftovers();
                if self.save_error.take().is_some() {
                    tracing::info!(run = %self.state.run_id, "the run state is saved again: tasks are handed out again");
                }
            }
            Err(error) => {
                if self.save_error.is_none() {
                    tracing::error!(run = %self.state.run_id, %error, "failed to save the run state: no task is handed out until it can be saved");
                }
                self.save_error = Some(error.to_string());
                self.save_failed_at = Some(ended);
            }
        }
    }

    /// Saves a labeling task's assignment or result: at once while the state is small, else
    /// with the changes after it, at most [`SAVE_SPACING`] times the last save's duration
    /// later ([`Coordinator::save_if_due`]). The whole state is rewritten at every save, and a
    /// round of a large data set has tens of thousands of labeling tasks: saved one change at
    /// a time, they would keep the coordinator busy writing. What a restart loses of them is
    /// safe to lose: a labeling task runs again, and finds its shard committed if it was (a
    /// lost assignment is handed out again under the same attempt number while its first
    /// labeler may still be at work: whichever commits the shard first wins, and the other
    /// finds it committed, the same labels of the same teacher).
    /// Every other change is saved at once, and saves those waiting with it.
    fn persist_soon(&mut self, now: Instant) {
        self.unsaved = true;
        if self.save_error.is_some() {
            if !self.save_failed_lately(now) {
                self.persist_or_log();
            }
        } else if self.save_due(now) {
            self.persist_or_log();
        }
    }

    fn save_due(&self, now: Instant) -> bool {
        match self.last_save {
            Some((at, took, bytes)) if bytes >= self.group_saves_from => {
                now.saturating_duration_since(at) >= took * SAVE_SPACING
            }
            _ => true,
        }
    }

    /// The size of a saved state (bytes) from which labeling's changes are saved in groups
    /// ([`GROUP_SAVES_FROM`] unless set; `usize::MAX`: every change saved at once, the
    /// reference of `bench-scheduler`).
    pub fn set_group_saves_from(&mut self, bytes: usize) {
        self.group_saves_from = bytes;
    }

    /// Saves made or tried by this coordinator since it opened the run (but its first and
    /// last).
    pub fn saves(&self) -> u64 {
        self.saves
    }

    /// Saves the changes [`Coordinator::persist_soon`] left for later, once due. The service
    /// calls it every [`SAVE_CHECK_INTERVAL`]; the coordinator's last save, as it exits,
    /// saves the rest.
    pub fn save_if_due(&mut self, now: Instant) {
        if self.unsaved && !self.save_failed_lately(now) && self.save_due(now) {
            self.persist_or_log();
        }
    }

    /// Whether the last save failed (a full disk) less than a second ago: it is tried again a
    /// second later, not at every call, each of which would rewrite the whole state under the
    /// coordinator's lock.
    fn save_failed_lately(&self, now: Instant) -> bool {
        self.save_error.is_some()
            && self
                .save_failed_at
                .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1))
    }

    /// Why the run hands out no task now, for status: the state cannot be saved, or training
    /// waits for workers (see [`Coordinator::training_wait`]).
    pub fn waiting(&self, now: Instant) -> Option<String> {
        match &self.save_error {
            Some(error) => Some(format!(
                "no task is handed out until the run state can be saved: {error}"
            )),
            None => self.training_wait(now),
        }
    }

    pub fn register(
        &mut self,
        hostname: String,
        device: String,
        pid: u32,
        now: Instant,
    ) -> WorkerId {
        self.register_instance(hostname, device, pid, String::new(), now)
    }

    /// Registers a worker process that drew `instance`: one still known alive under that
    /// instance sent its registration again (the reply was lost) and keeps its id, instead of
    /// leaving an entry no process answers for, which a group would count and wait for.
    pub fn register_instance(
        &mut self,
        hostname: String,
        device: String,
        pid: u32,
        instance: String,
        now: Instant,
    ) -> WorkerId {
        let known = self
            .workers
            .values_mut()
            .find(|worker| !instance.is_empty() && worker.instance == instance && worker.alive);
        if let Some(worker) = known {
            worker.last_seen = now;
            tracing::info!(worker = %worker.id, pid, "worker registered again with the same instance: it keeps its id");
            return worker.id.clone();
        }
        self.state.workers_registered += 1;
        let id = WorkerId(format!("w{}-{hostname}", self.state.workers_registered));
        tracing::info!(worker = %id, device = %device, pid, "worker registered");
        self.workers.insert(
            id.clone(),
            WorkerEntry {
                id: id.clone(),
                hostname,
                pid,
                device,
                instance,
                gpu: String::new(),
                last_seen: now,
                alive: true,
                exited: false,
                suspect: false,
                suspected_at: None,
                loading_since: Some(now),
                task: None,
                progress: Progress::default(),
                progress_at: now,
                progress_origin: None,
            },
        );
        let alive = self.workers.values().filter(|w| w.alive).count() as u32;
        if self.regathering && alive >= self.plan.workers.min_workers {
            tracing::info!(run = %self.state.run_id, workers = alive, phase = self.state.phase.as_str(), "enough workers registered again, resuming the run");
            self.regathering = false;
        }
        if alive >= self.plan.workers.min_workers
            && self.state.phase == state::Phase::WaitingForWorkers
        {
            tracing::info!(run = %self.state.run_id, workers = alive, "enough workers registered, starting the run");
            self.state.start();
        }
        self.persist_or_log();
        id
    }

    /// The live worker other than the process `instance` that trains on the GPU `gpu` (its PCI
    /// bus id) of `hostname`, when the plan's training groups are NCCL groups of several ranks:
    /// a second worker there is refused, since NCCL refuses two ranks on one GPU and every
    /// group of both would fail (a restarted worker whose first process is gone is taken once
    /// that one is declared lost, after the heartbeat timeout). Under the ring collective, or
    /// in groups of one, workers share a GPU (labeling side by side).
    pub fn gpu_taken(&self, hostname: &str, gpu: &str, instance: &str) -> Option<&WorkerEntry> {
        let workers = &self.plan.workers;
        let nccl_groups = matches!(
            workers.collective,
            mentor_plan::CollectiveKind::Auto | mentor_plan::CollectiveKind::Nccl
        ) && workers.world_size != 1;
        if gpu.is_empty() || !nccl_groups {
            return None;
        }
        self.workers.values().find(|w| {
            w.alive
                && !w.exited
                && w.hostname == hostname
                && w.gpu == gpu
                && (instance.is_empty() || w.instance != instance)
        })
    }

    /// Records the PCI bus id of worker `id`'s GPU.
    pub fn set_gpu(&mut self, id: &WorkerId, gpu: String) {
        if let Some(worker) = self.workers.get_mut(id) {
            worker.gpu = gpu;
        }
    }

    fn worker_mut(
        &mut self,
        id: &WorkerId,
        now: Instant,
    ) -> Result<&mut WorkerEntry, CoordinatorError> {
        match self.workers.get_mut(id) {
            Some(worker) if worker.alive => {
                worker.last_seen = now;
                worker.suspect = false;
                Ok(worker)
            }
            _ => Err(CoordinatorError::UnknownWorker(id.0.clone())),
        }
    }

    /// Whether the run is over and every worker has been told so or is gone: nothing is left
    /// for the coordinator to serve but status queries.
    pub fn released(&self) -> bool {
        self.state.is_finished()
            && self
                .workers
                .values()
                .all(|worker| worker.exited || !worker.alive)
    }

    /// A worker that registered again (the coordinator restarted, or had declared it lost)
    /// while it runs `attempt` of `task` as `rank`: taken back as that rank when the attempt is
    /// one a restart left running and no other has started since, so that its training goes
    /// on instead of starting over (a group's once all its ranks are back). `false` otherwise:
    /// the worker stops the attempt, whose result would be ignored.
    pub fn resume_running(
        &mut self,
        id: &WorkerId,
        task: &TaskId,
        attempt: u32,
        rank: u32,
        now: Instant,
    ) -> bool {
        let Some(worker) = self.workers.get(id).filter(|worker| worker.alive) else {
            return false;
        };
        // A registration sent again, its reply lost.
        let held = |record: &state::TaskRecord| {
            record.is_run_by(id, attempt) || record.is_back(id, attempt)
        };
        if self.state.tasks.get(task).is_some_and(held) {
            return true;
        }
        let instance = worker.instance.clone();
        if !self.state.readopt_rank(task, attempt, rank, &instance, id) {
            tracing::info!(run = %self.state.run_id, worker = %id, task = %task, attempt, rank, "a worker registered again with an attempt that is no longer its: it stops it");
            return false;
        }
        if let Some(worker) = self.workers.get_mut(id) {
            worker.task = Some(task.clone());
            worker.loading_since = None;
            worker.progress_at = now;
            worker.progress_origin = None;
        }
        let running = self
            .state
            .tasks
            .get(task)
            .is_some_and(|record| record.is_run_by(id, attempt));
        tracing::info!(run = %self.state.run_id, worker = %id, task = %task, attempt, rank, every_rank_back = running, "an attempt left running by a coordinator restart is taken back: it goes on");
        if !self.state.has_abandoned() {
            self.abandoned_until = None;
        }
        self.persist_or_log();
        true
    }

    /// A worker's heartbeat: it lives. It does not clear a suspicion (a rank of a failed group
    /// stays out of new groups until it asks for work or reports progress): the heartbeat
    /// comes from a thread of its own, which goes on while the task's thread hangs, in a
    /// group's setup say, where a new group would wait for it in vain.
    pub fn heartbeat(&mut self, id: &WorkerId, now: Instant) -> bool {
        match self.workers.get_mut(id) {
            Some(worker) if worker.exited => true,
            Some(worker) if worker.alive => {
                worker.last_seen = now;
                true
            }
            _ => false,
        }
    }

    /// A worker that stops on purpose (a signal): it is gone, and its task goes back to the
    /// queue at once without counting as a loss, where a worker that vanishes is noticed after
    /// the heartbeat timeout and loses its attempt.
    pub fn leave(&mut self, id: &WorkerId, reason: &str) {
        let Some(worker) = self.workers.get_mut(id).filter(|worker| worker.alive) else {
            return;
        };
        worker.alive = false;
        worker.exited = true;
        worker.task = None;
        // Its group's other ranks may be stuck in a collective with it, as after a group's
        // failure.
        let groups: Vec<(TaskId, u32, Vec<WorkerId>)> = self
            .state
            .tasks
            .values()
            .filter(|task| task.workers().contains(id))
            .map(|task| (task.id.clone(), task.attempts, task.workers().to_vec()))
            .collect();
        for (task, attempt, members) in groups {
            self.give_up_group(&task, attempt, &members, id, Instant::now());
        }
        let (requeued, effects) = self.state.worker_left(id, reason);
        self.log_effects(&effects);
        tracing::warn!(worker = %id, reason, requeued = requeued.len(), "worker left");
        self.persist_or_log();
    }

    pub fn get_task(&mut self, id: &WorkerId, now: Instant) -> Result<TaskReply, CoordinatorError> {
        let finished = self.state.is_finished();
        let worker = self.worker_mut(id, now)?;
        worker.loading_since = None;
        if finished {
            worker.exited = true;
            worker.alive = false;
            return Ok(TaskReply::Shutdown);
        }
        let (held, kind) = (worker.task.clone(), device_kind(&worker.device).to_string());
        if self.regathering {
            return Ok(TaskReply::RetryAfter(Duration::from_millis(200)));
        }
        if self.save_error.is_some() {
            if !self.save_failed_lately(now) {
                self.persist_or_log();
            }
            if self.save_error.is_some() {
                return Ok(TaskReply::RetryAfter(Duration::from_secs(1)));
            }
        }
        // A worker asks while it holds a task when the reply that gave it was lost (its retry
        // after a dropped connection): the same task again, not a second one beside it that
        // would leave the first running forever.
        if let Some(held) = held {
            if let Some(assignment) = self.state.assignment_held(&held, id) {
                tracing::info!(run = %self.state.run_id, worker = %id, task = %held, rank = assignment.rank, "task asked for again, given again");
                return Ok(TaskReply::Task(Box::new(assignment)));
            }
            // An attempt it was told to stop (it asks without reporting): over for it.
            if let Some(worker) = self.workers.get_mut(id) {
                worker.task = None;
            }
        }
        // No new group while the ranks of one that failed may still come (they count then),
        // and no CPU group while there can be a GPU one.
        let gpus_can_train =
            self.live_workers("cuda", now) > 0 && self.group_size("cuda", now).is_some();
        let group_size = if self.settling(&kind, now) || (kind == "cpu" && gpus_can_train) {
            None
        } else {
            self.group_size(&kind, now)
        };
        // Those that could take a task this worker failed: any worker that asks for work or is
        // still loading (for as long as a group would wait for it), not suspected; training
        // only for those of its device kind (a group's size and the GPU preference are the same
        // for them: a CPU worker beside GPU workers never trains).
        let loading_limit = Duration::from_secs(self.plan.workers.join_timeout_seconds);
        let others: Vec<(WorkerId, bool)> = self
            .workers
            .values()
            .filter(|w| {
                w.id != *id
                    && w.alive
                    && !w.exited
                    && !w.suspect
                    && w.loading_since
                        .is_none_or(|at| now.saturating_duration_since(at) <= loading_limit)
            })
            .map(|w| (w.id.clone(), device_kind(&w.device) == kind))
            .collect();
        if self.abandoned_until.is_some_and(|until| now >= until) {
            tracing::info!(run = %self.state.run_id, "attempts left running by the restart sent no result in time: their tasks run again");
            self.state.release_abandoned();
            self.abandoned_until = None;
        }
        match self.state.assign_within(id, &kind, group_size, &others) {
            Some(mut assignment) => {
                let task = &assignment.task;
                tracing::info!(
                    run = %self.state.run_id,
                    round = task.round,
                    worker = %id,
                    task = %task.id,
                    kind = %task.spec.describe(),
                    rank = assignment.rank,
                    world_size = task.world_size,
                    "task assigned"
                );
                let (task_id, rank) = (task.id.clone(), assignment.rank);
                let worker = self.worker_mut(id, now)?;
                worker.task = Some(task_id.clone());
                worker.progress = Progress::default();
                worker.progress_at = now;
                worker.progress_origin = None;
                let instance = worker.instance.clone();
                if !instance.is_empty() {
                    self.state.record_instance(&task_id, rank, &instance);
                    if let Some(record) = self.state.tasks.get(&task_id) {
                        assignment.task.instances = record.instances.clone();
                    }
                }
                if matches!(assignment.task.spec, TaskSpec::Label { .. }) {
                    self.persist_soon(now);
                } else {
                    self.persist_or_log();
                }
                if self.save_error.is_some() {
                    // Not handed out: a restart would not know of it.
                    self.state.unassign(&assignment, id);
                    if let Some(worker) = self.workers.get_mut(id) {
                        worker.task = None;
                    }
                    return Ok(TaskReply::RetryAfter(Duration::from_secs(1)));
                }
                Ok(TaskReply::Task(Box::new(assignment)))
            }
            None => Ok(TaskReply::RetryAfter(Duration::from_millis(200))),
        }
    }

    /// Ranks of a new training group: the plan's `world_size`, or every live worker of the
    /// device kind that is not suspected of being gone and either answered lately or is still
    /// starting (registered, loading its data set, not yet asking for work: it will join), but
    /// no longer than a group waits for a rank: a loader that hangs or died is then left out.
    /// `None` while a plan's fixed `world_size` has fewer such workers: the group would wait
    /// for a rank none can be, then fail at its join timeout. One rank with the `single`
    /// transport.
    fn group_size(&self, kind: &str, now: Instant) -> Option<u32> {
        if !self.trains_on(kind) {
            return None;
        }
        if self.plan.workers.collective == mentor_plan::CollectiveKind::Single {
            return Some(1);
        }
        let live = self.live_workers(kind, now);
        match self.plan.workers.world_size {
            0 => Some(live.max(1).min(self.most_ranks)),
            fixed if live >= fixed => Some(fixed),
            _ => None,
        }
    }

    /// Whether workers of the device kind `kind` may train under the plan's collective: NCCL
    /// trains on CUDA devices only (CPU workers label and evaluate).
    fn trains_on(&self, kind: &str) -> bool {
        self.plan.workers.collective != mentor_plan::CollectiveKind::Nccl || kind == "cuda"
    }

    /// Whether a rank of a training group of device kind `kind` that failed less than
    /// [`GROUP_SETTLE`] ago is suspected yet still heartbeats: it will ask for work once its
    /// own collective has failed, and a new group should count it.
    fn settling(&self, kind: &str, now: Instant) -> bool {
        self.workers.values().any(|w| {
            w.alive
                && w.suspect
                && device_kind(&w.device) == kind
                && now.saturating_duration_since(w.last_seen) <= HEARD_RECENTLY
                && w.suspected_at
                    .is_some_and(|at| now.saturating_duration_since(at) < GROUP_SETTLE)
        })
    }

    /// Why a pending training task cannot start now: no device kind has a group's worth of
    /// workers that can take part ([`Coordinator::group_size`] is `None` for each), as with a
    /// plan's fixed `world_size` larger than them. `None` when nothing waits so.
    pub fn training_wait(&self, now: Instant) -> Option<String> {
        let training_in = |wanted: fn(&state::TaskState) -> bool| {
            self.state
                .tasks
                .values()
                .any(|task| task.spec.is_training() && wanted(&task.state))
        };
        let waits = !self.state.is_finished()
            && training_in(|state| *state == state::TaskState::Pending)
            && !training_in(|state| matches!(state, state::TaskState::Running { .. }));
        let mut kinds: Vec<&str> = self
            .workers
            .values()
            .filter(|w| w.alive)
            .map(|w| device_kind(&w.device))
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        if !waits || kinds.is_empty() || kinds.iter().any(|k| self.group_size(k, now).is_some()) {
            return None;
        }
        if !kinds.iter().any(|kind| self.trains_on(kind)) {
            return Some(
                "training waits for a GPU worker: workers.collective = \"nccl\" trains on CUDA devices only (CPU workers label and evaluate); start workers with --device cuda, or set workers.collective = \"auto\" or \"ring\"".into(),
            );
        }
        let can = kinds
            .iter()
            .filter(|kind| self.trains_on(kind))
            .map(|kind| self.live_workers(kind, now))
            .max()
            .unwrap_or(0);
        let suspected = self
            .workers
            .values()
            .filter(|w| w.alive && w.suspect)
            .count();
        Some(format!(
            "training waits for {} workers of one device kind (workers.world_size); {can} can take part now{}",
            self.plan.workers.world_size,
            match suspected {
                0 => String::new(),
                n => format!(
                    ", {n} suspected (a rank of a failed group, a hung worker or a labeler whose lease expired, not asking for work since)"
                ),
            }
        ))
    }

    /// Live workers of the device kind `kind` that may take part in a new group (see
    /// [`Coordinator::group_size`]).
    fn live_workers(&self, kind: &str, now: Instant) -> u32 {
        let recent = HEARD_RECENTLY;
        let starting = Duration::from_secs(self.plan.workers.join_timeout_seconds);
        self.workers
            .values()
            .filter(|w| {
                w.alive
                    && !w.suspect
                    && device_kind(&w.device) == kind
                    && match w.loading_since {
                        Some(registered) => now.saturating_duration_since(registered) <= starting,
                        None => now.saturating_duration_since(w.last_seen) <= recent,
                    }
            })
            .count() as u32
    }

    /// A rank says where it listens (rank 0 of an NCCL group also gives the unique id).
    pub fn join_group(
        &mut self,
        id: &WorkerId,
        join: GroupJoin,
        now: Instant,
    ) -> Result<GroupView, CoordinatorError> {
        let GroupJoin {
            task,
            attempt,
            rank,
            address,
            nccl_unique_id,
        } = join;
        let task = &task;
        self.worker_mut(id, now)?;
        let Some(record) = self.state.tasks.get(task) else {
            return Err(CoordinatorError::InvalidRequest(format!(
                "unknown task `{task}`"
            )));
        };
        if !record.is_run_by(id, attempt) {
            return Ok(GroupView {
                cancelled: true,
                ..GroupView::default()
            });
        }
        if record.workers().get(rank as usize) != Some(id) {
            return Err(CoordinatorError::InvalidRequest(format!(
                "worker {id} is not rank {rank} of task {task}"
            )));
        }
        let members = record.workers().to_vec();
        let world_size = record.world_size as usize;
        let rendezvous = self
            .groups
            .entry((task.clone(), attempt))
            .or_insert_with(|| Rendezvous {
                addresses: vec![None; world_size],
                ..Rendezvous::default()
            });
        rendezvous.addresses[rank as usize] = Some(address);
        if rank == 0 && !nccl_unique_id.is_empty() {
            rendezvous.nccl_unique_id = nccl_unique_id;
        }
        // A ring address on loopback is reached from its own host alone: a group of ranks on
        // several hosts with one cannot form (its ranks would fail to connect after the join).
        // Once every rank has joined, such an attempt fails as that rank's own failure, naming
        // the flag (three in a row fail the run with it); the other ranks see it cancelled.
        // (Looked at once every rank has joined: copied then alone.)
        let joined = rendezvous
            .addresses
            .iter()
            .all(Option::is_some)
            .then(|| rendezvous.addresses.clone());
        if let Some((member, message)) =
            joined.and_then(|addresses| self.loopback_across_hosts(&members, &addresses))
        {
            tracing::warn!(task = %task, attempt, worker = %member, %message, "a group cannot form");
            self.complete(&member, task, attempt, TaskOutcome::Failed(message), now)?;
            return Ok(GroupView {
                cancelled: true,
                ..GroupView::default()
            });
        }
        tracing::info!(task = %task, attempt, rank, world_size, worker = %id, "rank joined");
        self.get_group(id, task, attempt, now)
    }

    /// The first member of a group whose ranks (`members`, on their hosts) are on several hosts
    /// that gave a ring address on loopback, with why the group cannot form.
    fn loopback_across_hosts(
        &self,
        members: &[WorkerId],
        addresses: &[Option<String>],
    ) -> Option<(WorkerId, String)> {
        let host_of = |member: &WorkerId| self.workers.get(member).map(|w| w.hostname.as_str());
        let hosts: BTreeSet<&str> = members.iter().filter_map(host_of).collect();
        if hosts.len() < 2 {
            return None;
        }
        members
            .iter()
            .zip(addresses)
            .enumerate()
            .find_map(|(rank, (member, address))| {
                let address = address.as_deref()?;
                let on_loopback = mentor_proto::is_loopback_host(mentor_proto::host_of(address));
                on_loopback.then(|| {
                    (
                        member.clone(),
                        format!(
                            "rank {rank} (worker {member} on host {}) gave the ring address {address}, on loopback, to a group on the hosts {}: start each worker with --advertise-host set to an address the other hosts reach it at",
                            host_of(member).unwrap_or("?"),
                            hosts.iter().copied().collect::<Vec<_>>().join(", ")
                        ),
                    )
                })
            })
    }

    /// The state of a group's rendezvous.
    pub fn get_group(
        &mut self,
        id: &WorkerId,
        task: &TaskId,
        attempt: u32,
        now: Instant,
    ) -> Result<GroupView, CoordinatorError> {
        self.worker_mut(id, now)?;
        let running = self
            .state
            .tasks
            .get(task)
            .is_some_and(|record| record.is_run_by(id, attempt));
        if !running {
            self.groups.remove(&(task.clone(), attempt));
            return Ok(GroupView {
                cancelled: true,
                ..GroupView::default()
            });
        }
        let world_size = self
            .state
            .tasks
            .get(task)
            .map(|t| t.world_size as usize)
            .unwrap_or(0);
        let Some(rendezvous) = self.groups.get(&(task.clone(), attempt)) else {
            return Ok(GroupView {
                missing_ranks: (0..world_size as u32).collect(),
                ..GroupView::default()
            });
        };
        let missing_ranks: Vec<u32> = rendezvous
            .addresses
            .iter()
            .enumerate()
            .filter(|(_, address)| address.is_none())
            .map(|(rank, _)| rank as u32)
            .collect();
        Ok(GroupView {
            ready: missing_ranks.is_empty(),
            cancelled: false,
            addresses: rendezvous
                .addresses
                .iter()
                .map(|a| a.clone().unwrap_or_default())
                .collect(),
            nccl_unique_id: rendezvous.nccl_unique_id.clone(),
            missing_ranks,
        })
    }

    /// Records a worker's progress on `attempt` of `task`. Answers `Some(reason)`, and records
    /// nothing, when the worker should stop that attempt (see [`Coordinator::verdict`]).
    pub fn progress(
        &mut self,
        id: &WorkerId,
        task: &TaskId,
        attempt: u32,
        progress: Progress,
        now: Instant,
    ) -> Result<Option<String>, CoordinatorError> {
        let verdict = self.verdict(id, task, attempt);
        let worker = self.worker_mut(id, now)?;
        match verdict {
            Verdict::Record => {}
            Verdict::GoOn => return Ok(None),
            Verdict::Stop(reason) => {
                // The worker stops the attempt and asks for a new task without reporting.
                if worker.task.as_ref() == Some(task) {
                    worker.task = None;
                }
                return Ok(Some(reason));
            }
        }
        // Every rank of a group reports the same global numbers: rank 0's are kept.
        if let Some(record) = self.state.tasks.get(task) {
            if record.workers().first() == Some(id) {
                self.metrics
                    .progress(&self.state.run_id, record, attempt, &id.0, &progress);
            }
        }
        self.state.report_progress(task, attempt, progress.step);
        let worker = self.worker_mut(id, now)?;
        worker.progress_origin.get_or_insert((progress.step, now));
        worker.progress_at = now;
        let loss = progress.loss;
        // Meta Pseudo Labels evaluates its student on the test set as it trains.
        let accuracy = progress.metrics.get("student_test_accuracy").copied();
        worker.progress = progress;
        self.latest_loss = loss.or(self.latest_loss);
        self.latest_accuracy = accuracy.or(self.latest_accuracy);
        Ok(None)
    }

    /// What a progress report of `worker` on `attempt` of `task` means: the worker's current
    /// attempt, or one it should stop (the run is over, the task is done, failed on another rank
    /// or went back to the queue). A labeler that lost its lease but is still making progress
    /// goes on: whoever commits the shard first wins; it is stopped once the shard is committed.
    fn verdict(&self, worker: &WorkerId, task: &TaskId, attempt: u32) -> Verdict {
        if self.state.is_finished() {
            return Verdict::Stop(format!("the run is over ({})", self.state.outcome.as_str()));
        }
        let Some(record) = self.state.tasks.get(task) else {
            return Verdict::Stop(format!("the run has no task {task}"));
        };
        if record.is_run_by(worker, attempt) {
            return Verdict::Record;
        }
        let why = record
            .last_error
            .as_ref()
            .map(|error| format!(": {error}"))
            .unwrap_or_default();
        match &record.state {
            state::TaskState::Done => Verdict::Stop(format!("task {task} is done")),
            _ if matches!(record.spec, TaskSpec::Label { .. }) => Verdict::GoOn,
            // A rank of an attempt a restart left running, back, while the others come back.
            state::TaskState::Pending if record.is_back(worker, attempt) => Verdict::GoOn,
            state::TaskState::Running { .. } => Verdict::Stop(format!(
                "task {task} now runs as attempt {}{why}",
                record.attempts
            )),
            state::TaskState::Pending => Verdict::Stop(format!(
                "attempt {attempt} of task {task} went back to the queue{why}"
            )),
        }
    }

    /// Records a task's result; returns the effects the caller must carry out.
    pub fn complete(
        &mut self,
        id: &WorkerId,
        task: &TaskId,
        attempt: u32,
        outcome: TaskOutcome,
        now: Instant,
    ) -> Result<Vec<Effect>, CoordinatorError> {
        let worker = self.worker_mut(id, now)?;
        worker.task = None;
        let instance = worker.instance.clone();
        // The result of an attempt a coordinator restart left running, sent again by its rank 0
        // under its new id: taken while no other attempt has started, and only with its files
        // (a restart between their publication and the save of the state that records it leaves
        // none: the task then runs again, nothing counted, from the resume save it left, which
        // is removed only after that save).
        // (The files are looked at only for a task a restart left running.)
        let left_with_its_files = |record: &state::TaskRecord| {
            record.abandoned.is_some()
                && record
                    .spec
                    .outputs()
                    .iter()
                    .all(|output| attempt_output(output, attempt).exists())
        };
        if !outcome.is_failure()
            && !instance.is_empty()
            && self.state.tasks.get(task).is_some_and(left_with_its_files)
            && self.state.readopt(task, id, attempt, &instance)
        {
            tracing::info!(run = %self.state.run_id, worker = %id, task = %task, attempt, "the result of an attempt left running by a coordinator restart is taken");
        }
        // A rank back of such an attempt that reports a failure: the attempt cannot go on as a
        // whole. (A success of a rank but rank 0 is not its end: rank 0's result may follow.)
        let back_here = |record: &state::TaskRecord| record.is_back(id, attempt);
        if outcome.is_failure() && self.state.tasks.get(task).is_some_and(back_here) {
            self.state.forget_back(id);
        }
        // The task's record when this is a report of its current attempt; stale ones are
        // ignored (and logged as such).
        let current = self
            .state
            .tasks
            .get(task)
            .filter(|record| record.is_run_by(id, attempt));
        // Rank 0's checkpoints of the current attempt go into place now, and only theirs: an
        // attempt given up that finishes late (a worker cut off from the network) wrote to
        // its own files and replaces nothing.
        let outcome = match (outcome, current) {
            (TaskOutcome::Trained { final_loss, .. }, Some(record))
                if record.workers().first() == Some(id) =>
            {
                match publish_outputs(&record.spec, attempt) {
                    Ok(published) => {
                        self.leftovers.extend(published.leftovers);
                        TaskOutcome::Trained {
                            checkpoint: published.checkpoint,
                            final_loss,
                        }
                    }
                    Err(error) => TaskOutcome::Failed(error),
                }
            }
            (outcome, _) => outcome,
        };
        // The result of the current attempt, once (from rank 0, or from the rank that failed).
        if let Some(record) = current {
            if outcome.is_failure() || record.workers().first() == Some(id) {
                self.metrics
                    .outcome(&self.state.run_id, record, attempt, &id.0, &outcome);
            }
        }
        let failed_group = match (&outcome, current) {
            (outcome, Some(record)) if outcome.is_failure() && record.world_size > 1 => {
                Some(record.workers().to_vec())
            }
            _ => None,
        };
        let current = current.is_some();
        if let Some(members) = failed_group {
            self.give_up_group(task, attempt, &members, id, now);
        }
        match &outcome {
            TaskOutcome::Failed(error) | TaskOutcome::GroupFailed(error) if !current => {
                tracing::info!(run = %self.state.run_id, worker = %id, task = %task, attempt, %error, "a report of an attempt given up is ignored, or counted as what broke its group")
            }
            TaskOutcome::Failed(error) => {
                tracing::warn!(run = %self.state.run_id, worker = %id, task = %task, %error, "task failed")
            }
            TaskOutcome::GroupFailed(error) => {
                tracing::warn!(run = %self.state.run_id, worker = %id, task = %task, %error, "a rank's group failed: the attempt is lost, the task goes back to the queue")
            }
            TaskOutcome::Evaluated { accuracy, .. } => {
                self.latest_accuracy = Some(*accuracy);
                tracing::info!(run = %self.state.run_id, worker = %id, task = %task, accuracy, "evaluation done")
            }
            _ => tracing::info!(run = %self.state.run_id, worker = %id, task = %task, "task done"),
        }
        let outcome = match outcome {
            TaskOutcome::Labeled(mut shard) if current => {
                let round = self.state.tasks.get(task).map_or(0, |record| record.round);
                filter::set_histogram_aside(&self.state.paths, round, &mut shard);
                TaskOutcome::Labeled(shard)
            }
            outcome => outcome,
        };
        let labeled = matches!(outcome, TaskOutcome::Labeled(_));
        let effects = self.state.complete(task, id, attempt, outcome);
        // An attempt that ended (done, or back in the queue) needs its rendezvous no more.
        if !self
            .state
            .tasks
            .get(task)
            .is_some_and(|record| record.is_run_by(id, attempt))
        {
            self.groups.remove(&(task.clone(), attempt));
        }
        self.log_effects(&effects);
        // A shard's result that changes nothing else (not the last of its round) may wait.
        if labeled && effects.is_empty() {
            self.persist_soon(now);
        } else {
            self.persist_or_log();
        }
        Ok(effects)
    }

    fn log_effects(&self, effects: &[Effect]) {
        for effect in effects {
            if *effect == Effect::Finished {
                tracing::info!(run = %self.state.run_id, status = self.state.outcome.as_str(), "run finished");
            }
        }
    }

    /// A group attempt that ended by `ended_by` (it failed or left): its other ranks may be gone
    /// or stuck in a collective with it, and are left out of new groups until they ask for
    /// work or report progress again; the attempt's rendezvous goes.
    fn give_up_group(
        &mut self,
        task: &TaskId,
        attempt: u32,
        members: &[WorkerId],
        ended_by: &WorkerId,
        now: Instant,
    ) {
        for member in members.iter().filter(|member| *member != ended_by) {
            if let Some(entry) = self.workers.get_mut(member) {
                entry.suspect = true;
                entry.suspected_at = Some(now);
            }
        }
        self.groups.remove(&(task.clone(), attempt));
    }

    /// Forgives the workers a stall of the coordinator's own (`stalled`: a slow disk under its
    /// lock, the process stopped, its machine paused): no heartbeat or progress report got in
    /// meanwhile, and the queued ones would race the reaper. Their silence and their tasks'
    /// leases are counted without it.
    pub fn pardon_stall(&mut self, stalled: Duration, now: Instant) {
        tracing::warn!(
            seconds = stalled.as_secs_f64(),
            "the coordinator stalled: workers' silence during the stall is not held against them"
        );
        for worker in self.workers.values_mut().filter(|w| w.alive) {
            worker.last_seen = (worker.last_seen + stalled).min(now);
            worker.progress_at = (worker.progress_at + stalled).min(now);
        }
    }

    /// Declares workers silent for longer than the plan allows dead; requeues their tasks.
    pub fn reap(&mut self, now: Instant) {
        let timeout = Duration::from_secs(self.plan.workers.heartbeat_timeout_seconds);
        let lost: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.alive && now.saturating_duration_since(w.last_seen) > timeout)
            .map(|w| w.id.clone())
            .collect();
        // What changed is saved once, after all of it (many workers may be lost at once, a
        // preemption): each save rewrites the whole state.
        let mut changed = false;
        for id in lost {
            if let Some(worker) = self.workers.get_mut(&id) {
                worker.alive = false;
                worker.task = None;
            }
            let (requeued, effects) = self.state.worker_lost(&id);
            tracing::warn!(worker = %id, requeued = requeued.len(), "worker lost");
            self.log_effects(&effects);
            changed = true;
        }
        // A labeler that is heard of but makes no progress loses its shard after the lease, and
        // is left out of new groups and of those a failed task waits for (its heartbeats come
        // from a thread of their own: a labeler stuck in a read or a decoder still sends them)
        // until it reports progress or asks for work again.
        let lease = Duration::from_secs(self.plan.pseudo_labels.lease_seconds);
        let expired: Vec<(WorkerId, TaskId)> = self
            .workers
            .values()
            .filter(|w| w.alive && now.saturating_duration_since(w.progress_at) > lease)
            .filter_map(|w| {
                let task = w.task.clone()?;
                let record = self.state.tasks.get(&task)?;
                matches!(record.spec, TaskSpec::Label { .. }).then_some((w.id.clone(), task))
            })
            .collect();
        for (id, task) in expired {
            if let Some(worker) = self.workers.get_mut(&id) {
                worker.task = None;
                // Not a rank of a failed group, which asks for work within seconds: no new
                // group waits for it (`suspected_at`).
                worker.suspect = true;
                worker.suspected_at = None;
            }
            let why = |attempt| format!("lease of attempt {attempt} expired without progress");
            if let Some(effects) = self.state.give_up_running(&task, why) {
                tracing::warn!(worker = %id, task = %task, lease_seconds = lease.as_secs(), "lease expired without progress, shard given to another labeler");
                self.log_effects(&effects);
                changed = true;
            }
        }
        changed |= self.give_up_stalled(now);
        if changed {
            self.persist_or_log();
        }
    }

    /// Gives up the training and evaluation attempts of workers that still heartbeat but
    /// reported no progress for `workers.progress_timeout_seconds` (a libtorch call that hangs,
    /// a deadlock: the task would hold its worker, and the run, for ever); the first report of
    /// an attempt may take `workers.join_timeout_seconds` longer (a group's ranks report
    /// nothing while they join). The task goes to another worker; the worker is left out of
    /// new groups until it asks for work or reports progress again. Whether it gave one up
    /// (the caller saves the state).
    fn give_up_stalled(&mut self, now: Instant) -> bool {
        let workers = &self.plan.workers;
        let seconds = workers.progress_timeout_seconds;
        if seconds == 0 {
            return false;
        }
        let join = Duration::from_secs(workers.join_timeout_seconds);
        let limit = Duration::from_secs(seconds);
        let stalled: Vec<(WorkerId, TaskId)> = self
            .workers
            .values()
            .filter(|w| {
                let allowed = limit
                    + if w.progress_origin.is_none() {
                        join
                    } else {
                        Duration::ZERO
                    };
                w.alive && now.saturating_duration_since(w.progress_at) > allowed
            })
            .filter_map(|w| {
                let task = w.task.clone()?;
                let record = self.state.tasks.get(&task)?;
                let labeling = matches!(record.spec, TaskSpec::Label { .. });
                (!labeling && record.workers().contains(&w.id)).then_some((w.id.clone(), task))
            })
            .collect();
        let mut changed = false;
        for (id, task) in stalled {
            // Another rank's stall may have given the attempt up already.
            let Some(record) = self
                .state
                .tasks
                .get(&task)
                .filter(|record| record.workers().contains(&id))
            else {
                continue;
            };
            let (attempt, members) = (record.attempts, record.workers().to_vec());
            if let Some(worker) = self.workers.get_mut(&id) {
                worker.task = None;
                worker.suspect = true;
                worker.suspected_at = Some(now);
            }
            self.give_up_group(&task, attempt, &members, &id, now);
            let why = |attempt| {
                format!("attempt {attempt} reported no progress for {seconds} s (workers.progress_timeout_seconds): a hung worker?")
            };
            if let Some(effects) = self.state.give_up_running(&task, why) {
                tracing::warn!(worker = %id, task = %task, attempt, progress_timeout_seconds = seconds, "no progress from the worker within the progress timeout: the attempt is given up, the task goes to another worker");
                self.log_effects(&effects);
                changed = true;
            }
        }
        changed
    }

    /// Applies the global filter's result.
    pub fn filter_finished(
        &mut self,
        round: u32,
        result: Result<(u64, PathBuf), String>,
    ) -> Vec<Effect> {
        let effects = match result {
            Ok((kept, selection)) => {
                tracing::info!(run = %self.state.run_id, round, kept, "filter and balance done");
                self.state.filter_done(round, kept, selection)
            }
            Err(message) => {
                tracing::error!(run = %self.state.run_id, round, error = %message, "filter and balance failed");
                self.state.filter_failed(format!(
                    "round {round}: filter and balance failed: {message}"
                ))
            }
        };
        self.log_effects(&effects);
        self.persist_or_log();
        effects
    }
}

/// `NAME-SECONDS-XXXX`: the plan's name, the Unix time and 16 bits of the clock's nanoseconds
/// and the process id, so that runs of one plan started in the same second differ.
fn new_run_id(name: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let salt = (now.subsec_nanos() ^ std::process::id().rotate_left(16)) & 0xffff;
    format!("{name}-{}-{salt:04x}", now.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../../../deploy/plans/tiny.toml");

    fn coordinator(dir: &Path) -> Coordinator {
        let plan = Plan::from_toml_str(TINY).expect("tiny plan");
        Coordinator::open(plan, dir).expect("open (needs dataset-fashion-mnist)")
    }

    fn join(task: &TaskId, rank: u32, address: &str) -> GroupJoin {
        GroupJoin {
            task: task.clone(),
            attempt: 1,
            rank,
            address: address.into(),
            nccl_unique_id: Vec::new(),
        }
    }

    /// The next label task `id` is given, after it evaluated what it was given before it.
    fn next_label_task(coordinator: &mut Coordinator, id: &WorkerId, now: Instant) -> Assignment {
        for _ in 0..10 {
            if let TaskReply::Task(assignment) = coordinator.get_task(id, now).expect("task") {
                if matches!(assignment.task.spec, TaskSpec::Label { .. }) {
                    return *assignment;
                }
                let evaluated = TaskOutcome::Evaluated {
                    accuracy: 0.5,
                    loss: 1.0,
                };
                let task = &assignment.task;
                coordinator
                    .complete(id, &task.id, task.attempts, evaluated, now)
                    .expect("complete");
            }
        }
        panic!("no label task")
    }

    /// The tiny plan, run by one worker.
    fn one_worker_plan() -> Plan {
        let mut plan = Plan::from_toml_str(TINY).expect("tiny plan");
        plan.workers.min_workers = 1;
        plan.workers.world_size = 1;
        plan
    }

    /// A coordinator of the tiny plan that runs its tasks on one worker, with that worker
    /// registered as "a" and given its first task (the round-1 teacher's training).
    fn one_worker_with_a_teacher_task(
        dir: &Path,
        start: Instant,
    ) -> (Coordinator, WorkerId, Assignment) {
        let mut coordinator = Coordinator::open(one_worker_plan(), dir).expect("open");
        let a = coordinator.register("a".into(), "cpu".into(), 0, start);
        let TaskReply::Task(teacher) = coordinator.get_task(&a, start).expect("task") else {
            panic!("no teacher task")
        };
        (coordinator, a, *teacher)
    }

    /// A coordinator of the tiny plan with workers "a" and "b" registered, and "a" given rank 0
    /// of the round-1 teacher's training.
    fn two_workers_with_a_teacher_task(
        dir: &Path,
        now: Instant,
    ) -> (Coordinator, WorkerId, WorkerId, Assignment) {
        let mut coordinator = coordinator(dir);
        let a = coordinator.register("a".into(), "cpu".into(), 0, now);
        let b = coordinator.register("b".into(), "cpu".into(), 0, now);
        let TaskReply::Task(first) = coordinator.get_task(&a, now).expect("task") else {
            panic!("no task for rank 0")
        };
        (coordinator, a, b, *first)
    }

    /// Reports `assignment` trained by `worker` at `now`, its checkpoints written.
    fn complete_trained(
        coordinator: &mut Coordinator,
        worker: &WorkerId,
        assignment: &Assignment,
        dir: &Path,
        now: Instant,
    ) {
        write_attempt_outputs(assignment);
        coordinator
            .complete(
                worker,
                &assignment.task.id,
                assignment.task.attempts,
                TaskOutcome::Trained {
                    checkpoint: dir.join("teacher.safetensors"),
                    final_loss: 0.1,
                },
                now,
            )
            .expect("complete");
    }

    /// A resume save of the training `assignment` (as its rank 0 would write): the training's
    /// output and the save's path.
    fn with_a_resume_save(assignment: &Assignment) -> (PathBuf, PathBuf) {
        let TaskSpec::Train { output, .. } = assignment.task.spec.clone() else {
            panic!("not a training task")
        };
        let save = resume_save(&output);
        std::fs::create_dir_all(save.parent().expect("parent")).expect("mkdir");
        std::fs::write(&save, "step 1000").expect("a resume save");
        (output, save)
    }

    /// Makes the run state in `dir` impossible to save (a directory where its file goes, the
    /// rename of a save fails) and returns its path: removing that directory ends it.
    fn unsavable_state(dir: &Path) -> PathBuf {
        let state_file = dir.join("state.json");
        std::fs::remove_file(&state_file).expect("remove the state");
        std::fs::create_dir(&state_file).expect("a directory in its place");
        state_file
    }

    /// Writes the checkpoints a training attempt writes (as a worker would).
    fn write_attempt_outputs(assignment: &Assignment) {
        for output in assignment.task.spec.outputs() {
            let written = attempt_output(output, assignment.task.attempts);
            std::fs::create_dir_all(written.parent().expect("parent")).expect("mkdir");
            std::fs::write(&written, format!("attempt {}", assignment.task.attempts))
                .expect("write the attempt's checkpoint");
        }
    }

    /// A one-worker run whose worker process `process-1` was given the teacher's training, then
    /// a coordinator restart: the new coordinator, the worker's id before it and its attempt.
    fn restarted_during_the_teacher(
        dir: &Path,
        start: Instant,
    ) -> (Coordinator, WorkerId, Assignment) {
        let mut coordinator = Coordinator::open(one_worker_plan(), dir).expect("open");
        let a =
            coordinator.register_instance("a".into(), "cpu".into(), 0, "process-1".into(), start);
        let TaskReply::Task(teacher) = coordinator.get_task(&a, start).expect("task") else {
            panic!("no teacher task")
        };
        drop(coordinator);
        let coordinator = Coordinator::open(one_worker_plan(), dir).expect("resume");
        (coordinator, a, *teacher)
    }

    /// A coordinator of the tiny plan whose round-1 teacher's training ran as a group of two
    /// (processes "p-a" and "p-b", ranks 0 and 1) when it was stopped, opened again on its
    /// directory; the task.
    fn restarted_during_a_group(dir: &Path, start: Instant) -> (Coordinator, TaskId) {
        let mut coordinator = coordinator(dir);
        let a = coordinator.register_instance("a".into(), "cpu".into(), 0, "p-a".into(), start);
        let b = coordinator.register_instance("b".into(), "cpu".into(), 0, "p-b".into(), start);
        let TaskReply::Task(first) = coordinator.get_task(&a, start).expect("task") else {
            panic!("no task for rank 0")
        };
        let TaskReply::Task(second) = coordinator.get_task(&b, start).expect("task") else {
            panic!("no task for rank 1")
        };
        let task = first.task.id.clone();
        assert_eq!((second.task.id.clone(), second.rank), (task.clone(), 1));
        assert_eq!(coordinator.state.tasks[&task].instances, ["p-a", "p-b"]);
        drop(coordinator);
        (self::coordinator(dir), task)
    }

    /// A restarted coordinator's status shows the run's latest evaluation from its state, not
    /// nothing until the next one.
    #[test]
    fn a_restarted_coordinator_shows_the_latest_test_accuracy_it_saved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut first = coordinator(dir.path());
        first.state.rounds[0].teacher_test_accuracy = Some(0.7);
        first.persist().expect("save");
        drop(first);
        let restarted = coordinator(dir.path());
        assert_eq!(crate::service::status_of(&restarted).latest_accuracy, 0.7);
    }

    /// A training that ended as the coordinator restarted: its worker process registers again
    /// and sends its result again under its new id. The result is taken (hours of training are
    /// not run again); another process's claim to it is not.
    #[test]
    fn a_result_sent_again_after_a_coordinator_restart_is_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = restarted_during_the_teacher(dir.path(), start);
        write_attempt_outputs(&teacher);
        let task = teacher.task.id.clone();
        let trained = || TaskOutcome::Trained {
            checkpoint: dir.path().join("teacher.safetensors"),
            final_loss: 0.1,
        };
        let stranger =
            coordinator.register_instance("a".into(), "cpu".into(), 0, "process-2".into(), start);
        coordinator
            .complete(&stranger, &task, 1, trained(), start)
            .expect("complete");
        assert_eq!(
            coordinator.state.tasks[&task].state,
            state::TaskState::Pending
        );
        // Another worker asking first does not start the task again while its result may come.
        assert!(matches!(
            coordinator.get_task(&stranger, start).expect("reply"),
            TaskReply::RetryAfter(_)
        ));
        let again =
            coordinator.register_instance("a".into(), "cpu".into(), 0, "process-1".into(), start);
        assert_ne!(again, a, "a new coordinator gives a new id");
        coordinator
            .complete(&again, &task, 1, trained(), start)
            .expect("complete");
        let record = &coordinator.state.tasks[&task];
        assert_eq!(
            (record.state.clone(), record.attempts),
            (state::TaskState::Done, 1)
        );
    }

    /// A task a restart left running whose result does not come (its worker died with the
    /// coordinator), or comes without its files (published before a save the restart lost),
    /// runs again once the wait is over, nothing counted against it.
    #[test]
    fn a_result_that_does_not_come_back_after_a_restart_is_run_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, _, teacher) = restarted_during_the_teacher(dir.path(), start);
        let task = teacher.task.id.clone();
        let again =
            coordinator.register_instance("a".into(), "cpu".into(), 0, "process-1".into(), start);
        // Its files are missing: not taken, not counted.
        let trained = TaskOutcome::Trained {
            checkpoint: dir.path().join("teacher.safetensors"),
            final_loss: 0.1,
        };
        coordinator
            .complete(&again, &task, 1, trained, start)
            .expect("complete");
        let record = &coordinator.state.tasks[&task];
        assert_eq!(
            (record.state.clone(), record.failures),
            (state::TaskState::Pending, 0)
        );
        let timeout = Duration::from_secs(coordinator.plan.workers.heartbeat_timeout_seconds);
        let later = Instant::now() + timeout + Duration::from_secs(1);
        let TaskReply::Task(retry) = coordinator.get_task(&again, later).expect("task") else {
            panic!("the task did not run again after the wait")
        };
        assert_eq!((retry.task.id.clone(), retry.task.attempts), (task, 2));
    }

    /// A training still running when the coordinator restarted: its worker registers again
    /// naming it and goes on with it (hours of training are not started over); its reports
    /// count and its result finishes the task as the same attempt. Another process naming it
    /// is refused.
    #[test]
    fn a_training_left_running_by_a_restart_goes_on_with_its_worker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, _, teacher) = restarted_during_the_teacher(dir.path(), start);
        let task = teacher.task.id.clone();
        let stranger =
            coordinator.register_instance("b".into(), "cpu".into(), 0, "process-2".into(), start);
        assert!(!coordinator.resume_running(&stranger, &task, 1, 0, start));
        let again =
            coordinator.register_instance("a".into(), "cpu".into(), 0, "process-1".into(), start);
        assert!(
            !coordinator.resume_running(&again, &task, 2, 0, start),
            "another attempt"
        );
        assert!(coordinator.resume_running(&again, &task, 1, 0, start));
        assert!(
            coordinator.resume_running(&again, &task, 1, 0, start),
            "a registration sent again keeps it"
        );
        let record = &coordinator.state.tasks[&task];
        assert_eq!(record.workers(), std::slice::from_ref(&again));
        assert_eq!(record.attempts, 1);
        assert_eq!(coordinator.workers[&again].task.as_ref(), Some(&task));
        // The wait for it is over: nothing else waits.
        assert_eq!(coordinator.abandoned_until, None);
        let progress = Progress {
            step: 7,
            ..Progress::default()
        };
        let verdict = coordinator
            .progress(&again, &task, 1, progress, start)
            .expect("progress");
        assert_eq!(verdict, None);
        assert_eq!(coordinator.workers[&again].progress.step, 7);
        // Saved as running by the process that took it back: a second restart leaves it
        // running again for the same process.
        let saved: state::RunState = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("state.json")).expect("state"),
        )
        .expect("saved state");
        assert_eq!(saved.tasks[&task].instances, ["process-1"]);
        complete_trained(&mut coordinator, &again, &teacher, dir.path(), start);
        let record = &coordinator.state.tasks[&task];
        assert_eq!(
            (record.state.clone(), record.attempts, record.losses),
            (state::TaskState::Done, 1, 0)
        );
    }

    /// A group's attempt left running by a restart: each rank registering again goes on (its
    /// reports are neither recorded nor refused) while the others come back, and nothing else
    /// starts the task; the attempt runs again, by rank, once every rank is back.
    #[test]
    fn a_group_left_running_by_a_restart_goes_on_once_every_rank_is_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, task) = restarted_during_a_group(dir.path(), start);
        let b2 = coordinator.register_instance("b".into(), "cpu".into(), 0, "p-b".into(), start);
        assert!(
            !coordinator.resume_running(&b2, &task, 1, 0, start),
            "rank 1's process is not rank 0"
        );
        assert!(coordinator.resume_running(&b2, &task, 1, 1, start));
        assert_eq!(
            coordinator.state.tasks[&task].state,
            state::TaskState::Pending
        );
        let report = |coordinator: &mut Coordinator, id: &WorkerId| {
            let progress = Progress {
                step: 3,
                ..Progress::default()
            };
            coordinator
                .progress(id, &task, 1, progress, start)
                .expect("progress")
        };
        assert_eq!(report(&mut coordinator, &b2), None, "rank 1 goes on");
        let c = coordinator.register_instance("c".into(), "cpu".into(), 0, "p-c".into(), start);
        assert!(matches!(
            coordinator.get_task(&c, start).expect("reply"),
            TaskReply::RetryAfter(_)
        ));
        let a2 = coordinator.register_instance("a".into(), "cpu".into(), 0, "p-a".into(), start);
        assert!(coordinator.resume_running(&a2, &task, 1, 0, start));
        let record = &coordinator.state.tasks[&task];
        assert_eq!(record.workers(), [a2.clone(), b2.clone()]);
        assert_eq!((record.attempts, record.world_size), (1, 2));
        assert_eq!(report(&mut coordinator, &a2), None);
        assert_eq!(coordinator.workers[&a2].progress.step, 3, "recorded");
    }

    /// A rank back of a group's attempt that then leaves (SIGTERM), is lost or reports a
    /// failure: the attempt cannot go on, and its task runs again at once instead of after
    /// the wait (or with a dead rank once the others are back).
    #[test]
    fn a_rank_back_that_goes_ends_the_wait_for_its_attempt() {
        for how in ["leaves", "is lost", "fails"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let start = Instant::now();
            let (mut coordinator, task) = restarted_during_a_group(dir.path(), start);
            let b2 =
                coordinator.register_instance("b".into(), "cpu".into(), 0, "p-b".into(), start);
            let c = coordinator.register_instance("c".into(), "cpu".into(), 0, "p-c".into(), start);
            let d = coordinator.register_instance("d".into(), "cpu".into(), 0, "p-d".into(), start);
            assert!(coordinator.resume_running(&b2, &task, 1, 1, start));
            // Past the heartbeat timeout for the rank that is lost (the others heartbeat).
            let timeout = coordinator.plan.workers.heartbeat_timeout_seconds;
            let now = start + Duration::from_secs(timeout + 1);
            coordinator.heartbeat(&c, now);
            coordinator.heartbeat(&d, now);
            if how != "is lost" {
                coordinator.heartbeat(&b2, now);
            }
            match how {
                "leaves" => coordinator.leave(&b2, "SIGTERM"),
                "is lost" => coordinator.reap(now),
                _ => {
                    let failed = TaskOutcome::GroupFailed("a peer closed the ring".into());
                    coordinator
                        .complete(&b2, &task, 1, failed, now)
                        .expect("complete");
                }
            }
            assert!(
                coordinator.state.tasks[&task].abandoned.is_none(),
                "{how}: still waited for"
            );
            let TaskReply::Task(retry) = coordinator.get_task(&c, now).expect("task") else {
                panic!("{how}: the task did not run again at once")
            };
            assert_eq!(
                (retry.task.id.clone(), retry.task.attempts),
                (task.clone(), 2),
                "{how}"
            );
            let a2 = coordinator.register_instance("a".into(), "cpu".into(), 0, "p-a".into(), now);
            assert!(!coordinator.resume_running(&a2, &task, 1, 0, now), "{how}");
        }
    }

    /// A rank that never comes back: once the wait is over the task runs again, and the rank
    /// that did come back is told to stop the attempt. A worker declared lost (no restart)
    /// that registers again naming its attempt is told to stop it too.
    #[test]
    fn ranks_back_alone_are_stopped_when_the_wait_for_the_others_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, task) = restarted_during_a_group(dir.path(), start);
        let b2 = coordinator.register_instance("b".into(), "cpu".into(), 0, "p-b".into(), start);
        let c = coordinator.register_instance("c".into(), "cpu".into(), 0, "p-c".into(), start);
        assert!(coordinator.resume_running(&b2, &task, 1, 1, start));
        let timeout = Duration::from_secs(coordinator.plan.workers.heartbeat_timeout_seconds);
        let later = start + timeout + Duration::from_secs(1);
        coordinator.heartbeat(&b2, later);
        let TaskReply::Task(retry) = coordinator.get_task(&c, later).expect("task") else {
            panic!("the task did not run again after the wait")
        };
        assert_eq!(
            (retry.task.id.clone(), retry.task.attempts),
            (task.clone(), 2)
        );
        let verdict = coordinator
            .progress(&b2, &task, 1, Progress::default(), later)
            .expect("progress");
        assert!(verdict.is_some_and(|reason| reason.contains("now runs as attempt 2")));

        // Declared lost, then back with its attempt: that attempt is over.
        let much_later = later + timeout + Duration::from_secs(1);
        coordinator.heartbeat(&b2, much_later);
        coordinator.reap(much_later);
        assert!(!coordinator.workers[&c].alive);
        let c2 =
            coordinator.register_instance("c".into(), "cpu".into(), 0, "p-c".into(), much_later);
        assert!(!coordinator.resume_running(&c2, &task, 2, 0, much_later));
    }

    /// A training whose worker heartbeats but reports no progress (a hung libtorch call) is
    /// given up after `workers.progress_timeout_seconds` (its first report allowed the join
    /// timeout more), as a lost attempt, and goes to another worker.
    #[test]
    fn a_training_without_progress_is_given_up_after_the_progress_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        let task = teacher.task.id.clone();
        let workers = &coordinator.plan.workers;
        let limit = Duration::from_secs(workers.progress_timeout_seconds);
        let join = Duration::from_secs(workers.join_timeout_seconds);
        assert_eq!(limit, Duration::from_secs(1800), "the default");
        let reap_at = |coordinator: &mut Coordinator, at: Instant| {
            coordinator.heartbeat(&a, at);
            coordinator.reap(at);
            coordinator.state.tasks[&task].state.clone()
        };
        let running = state::TaskState::Running {
            workers: vec![a.clone()],
        };
        // Before its first report it has the join timeout more.
        let first = start + limit + Duration::from_secs(1);
        assert_eq!(reap_at(&mut coordinator, first), running);
        let progress = Progress {
            step: 10,
            ..Progress::default()
        };
        coordinator
            .progress(&a, &task, 1, progress, first)
            .expect("progress");
        assert_eq!(reap_at(&mut coordinator, first + limit), running);
        let stalled = first + limit + Duration::from_secs(1);
        assert_eq!(
            reap_at(&mut coordinator, stalled),
            state::TaskState::Pending
        );
        let record = &coordinator.state.tasks[&task];
        // Lost, but further (step 10) than any attempt before it: not one of the losses in a row
        // that end a run.
        assert_eq!(
            (record.losses, record.failures, record.reached.best),
            (0, 0, 10)
        );
        let error = record.last_error.clone().unwrap_or_default();
        assert!(
            error.contains("no progress for 1800 s (workers.progress_timeout_seconds)"),
            "{error}"
        );
        assert_eq!(coordinator.workers[&a].task, None);
        // A stalled attempt never reported: given up at the limit plus the join timeout. (A new
        // group waits a few seconds for the suspect, which may still answer.)
        let asked = stalled + Duration::from_secs(11);
        let b = coordinator.register("b".into(), "cpu".into(), 0, asked);
        coordinator.heartbeat(&a, asked);
        let TaskReply::Task(retry) = coordinator.get_task(&b, asked).expect("task") else {
            panic!("the task did not go to another worker")
        };
        assert_eq!(retry.task.workers(), std::slice::from_ref(&b));
        assert_eq!(retry.task.attempts, 2);
        let late = asked + limit + join + Duration::from_secs(1);
        coordinator.heartbeat(&b, late - Duration::from_secs(2));
        assert_eq!(
            reap_at(&mut coordinator, late - Duration::from_secs(2)),
            retry.task.state
        );
        coordinator.heartbeat(&b, late);
        assert_eq!(reap_at(&mut coordinator, late), state::TaskState::Pending);
        // 0: never.
        let mut plan = one_worker_plan();
        plan.workers.progress_timeout_seconds = 0;
        let other = tempfile::tempdir().expect("tempdir");
        let mut coordinator = Coordinator::open(plan, other.path()).expect("open");
        let c = coordinator.register("c".into(), "cpu".into(), 0, start);
        let TaskReply::Task(teacher) = coordinator.get_task(&c, start).expect("task") else {
            panic!("no teacher task")
        };
        let much_later = start + Duration::from_secs(10 * 24 * 3600);
        coordinator.heartbeat(&c, much_later);
        coordinator.reap(much_later);
        assert!(coordinator.state.tasks[&teacher.task.id].is_run_by(&c, 1));
    }

    /// While the run state cannot be saved (a full disk, a run directory gone read-only) no
    /// task is handed out, and status says why; once a save succeeds, tasks are handed out
    /// again. A restart then knows every assignment made.
    #[test]
    fn no_task_is_handed_out_while_the_run_state_cannot_be_saved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let mut coordinator = Coordinator::open(one_worker_plan(), dir.path()).expect("open");
        let a = coordinator.register("a".into(), "cpu".into(), 0, start);
        // The assignment whose save fails is taken back.
        let state_file = unsavable_state(dir.path());
        assert!(matches!(
            coordinator.get_task(&a, start).expect("reply"),
            TaskReply::RetryAfter(_)
        ));
        assert_eq!(coordinator.workers[&a].task, None);
        assert!(coordinator
            .state
            .tasks
            .values()
            .all(|task| task.attempts == 0));
        // Asked again within a second: not tried again (each try rewrites the whole state).
        let tried = coordinator.saves;
        assert!(matches!(
            coordinator.get_task(&a, Instant::now()).expect("reply"),
            TaskReply::RetryAfter(_)
        ));
        assert_eq!(coordinator.saves, tried);
        let later = Instant::now() + Duration::from_secs(2);
        assert!(matches!(
            coordinator.get_task(&a, later).expect("reply"),
            TaskReply::RetryAfter(_)
        ));
        assert_eq!(coordinator.saves, tried + 1);
        let waiting = coordinator.waiting(start).unwrap_or_default();
        assert!(
            waiting.starts_with("no task is handed out until the run state can be saved: ")
                && waiting.contains("state.json"),
            "{waiting}"
        );
        assert!(coordinator
            .state
            .tasks
            .values()
            .all(|task| task.state == state::TaskState::Pending));
        std::fs::remove_dir(&state_file).expect("the directory goes");
        let later = Instant::now() + Duration::from_secs(2);
        let TaskReply::Task(teacher) = coordinator.get_task(&a, later).expect("task") else {
            panic!("no task once the state could be saved")
        };
        assert_eq!(coordinator.waiting(later), None);
        let saved: state::RunState =
            serde_json::from_str(&std::fs::read_to_string(&state_file).expect("state"))
                .expect("saved state");
        assert!(saved.tasks[&teacher.task.id].is_run_by(&a, 1));
    }

    #[test]
    fn only_the_current_attempt_puts_its_checkpoint_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, first) = one_worker_with_a_teacher_task(dir.path(), start);
        let TaskSpec::Train { output, .. } = first.task.spec.clone() else {
            panic!("not a training task")
        };
        // The attempt is given up (its worker lost); the next one runs on another worker.
        coordinator.state.worker_lost(&a);
        let b = coordinator.register("b".into(), "cpu".into(), 0, start);
        let TaskReply::Task(second) = coordinator.get_task(&b, start).expect("task") else {
            panic!("no second attempt")
        };
        assert_eq!(second.task.attempts, first.task.attempts + 1);
        complete_trained(&mut coordinator, &b, &second, dir.path(), start);
        assert_eq!(
            std::fs::read_to_string(&output).expect("in place"),
            format!("attempt {}", second.task.attempts)
        );
        // The first attempt finishes late, cut off: its file replaces nothing.
        write_attempt_outputs(&first);
        let late = TaskOutcome::Trained {
            checkpoint: attempt_output(&output, first.task.attempts),
            final_loss: 0.1,
        };
        let _ = coordinator.complete(&a, &first.task.id, first.task.attempts, late, start);
        assert_eq!(
            std::fs::read_to_string(&output).expect("in place"),
            format!("attempt {}", second.task.attempts)
        );
        assert_eq!(
            coordinator
                .state
                .current_round()
                .teacher
                .as_ref()
                .map(|m| &m.checkpoint),
            Some(&output)
        );
    }

    /// A training still running keeps its resume save across a coordinator restart (what a
    /// start removes is only what finished trainings left).
    #[test]
    fn a_running_trainings_resume_save_outlives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (coordinator, _, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        let (_, save) = with_a_resume_save(&teacher);
        drop(coordinator);
        let _again = Coordinator::open(one_worker_plan(), dir.path()).expect("reopen");
        assert!(save.exists(), "a running training's save went");
    }

    /// A coordinator stopped after the save that recorded a training's result but before it
    /// removed what the training left: the next start removes it.
    #[test]
    fn a_finished_trainings_leftovers_go_at_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        let (output, save) = with_a_resume_save(&teacher);
        // The result recorded, the leftovers not removed yet.
        let state_file = unsavable_state(dir.path());
        complete_trained(&mut coordinator, &a, &teacher, dir.path(), start);
        std::fs::remove_dir(&state_file).expect("the directory goes");
        coordinator
            .write_state()
            .expect("the save that records the result");
        drop(coordinator);
        assert!(save.exists());
        let _again = Coordinator::open(one_worker_plan(), dir.path()).expect("reopen");
        assert!(
            !save.exists(),
            "the finished training's save is left behind"
        );
        assert!(output.exists(), "its checkpoint went");
    }

    /// Workers lost together (a preemption) are saved in one rewrite of the state, not one
    /// each.
    #[test]
    fn workers_lost_together_are_saved_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let mut coordinator = coordinator(dir.path());
        let ids: Vec<WorkerId> = ["a", "b", "c"]
            .iter()
            .map(|host| coordinator.register(host.to_string(), "cpu".into(), 0, start))
            .collect();
        let saves = coordinator.saves;
        let timeout = Duration::from_secs(coordinator.plan.workers.heartbeat_timeout_seconds);
        coordinator.reap(start + timeout * 2);
        assert!(ids.iter().all(|id| !coordinator.workers[id].alive));
        assert_eq!(coordinator.saves, saves + 1);
        // Nothing changed: nothing saved.
        coordinator.reap(start + timeout * 3);
        assert_eq!(coordinator.saves, saves + 1);
    }

    /// A training's resume save is removed only once the state that records its result is
    /// saved: a coordinator stopped before that save runs the task again from its save.
    #[test]
    fn a_trainings_resume_save_outlives_its_result_until_the_state_records_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        let (output, save) = with_a_resume_save(&teacher);
        // Writes that never ended (a worker killed while it saved), and another training's.
        let folder = save.parent().expect("parent");
        let stale = [
            folder.join("round-1-teacher.attempt-1.4242-0000beef.tmp.safetensors"),
            folder.join("round-1-teacher.resume.4242-0000cafe.tmp.safetensors"),
        ];
        let other = folder.join("round-1-student.resume.4242-0000f00d.tmp.safetensors");
        for path in stale.iter().chain([&other]) {
            std::fs::write(path, "half a save").expect("a temporary file");
        }
        let state_file = unsavable_state(dir.path());
        complete_trained(&mut coordinator, &a, &teacher, dir.path(), start);
        assert!(coordinator.save_error.is_some());
        assert_eq!(
            std::fs::read_to_string(&output).expect("in place"),
            "attempt 1"
        );
        assert!(
            save.exists(),
            "the save went before the state recorded the result"
        );
        // Once the state is saved, the save goes.
        std::fs::remove_dir(&state_file).expect("the directory goes");
        coordinator.persist_or_log();
        assert!(coordinator.save_error.is_none());
        assert!(!save.exists(), "the save is left behind");
        assert!(
            stale.iter().all(|path| !path.exists()),
            "temporary files are left behind"
        );
        assert!(other.exists(), "another training's file went");
        assert_eq!(saved_task_state(dir.path(), &teacher.task.id), "done");
    }

    #[test]
    fn a_result_whose_checkpoint_is_missing_fails_its_attempt_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        let claimed = TaskOutcome::Trained {
            checkpoint: dir.path().join("nowhere.safetensors"),
            final_loss: 0.1,
        };
        coordinator
            .complete(&a, &teacher.task.id, teacher.task.attempts, claimed, start)
            .expect("complete");
        let record = &coordinator.state.tasks[&teacher.task.id];
        assert_eq!(record.failures, 1);
        let error = record.last_error.clone().unwrap_or_default();
        assert!(
            error.contains(".attempt-1.safetensors") && error.contains("cannot be moved"),
            "{error}"
        );
    }

    #[test]
    fn status_gives_the_time_left_at_the_task_pace_and_the_latest_test_accuracy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        let report = |step: u64, metrics: &[(&str, f64)]| Progress {
            step,
            total_steps: 100,
            loss: Some(1.0),
            accuracy: None,
            images_per_second: 10.0,
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        let worker_status =
            |coordinator: &Coordinator| crate::service::status_of(coordinator).workers[0].clone();
        // One report (step 10 after 5 s of start-up) says nothing about the pace yet.
        let first = start + Duration::from_secs(5);
        let held = |assignment: &Assignment| (assignment.task.id.clone(), assignment.task.attempts);
        let (task, attempt) = held(&teacher);
        let stop = coordinator
            .progress(&a, &task, attempt, report(10, &[]), first)
            .expect("progress");
        assert_eq!(stop, None, "the worker holds its attempt");
        assert_eq!(worker_status(&coordinator).seconds_left, None);
        assert!(crate::service::status_of(&coordinator)
            .latest_accuracy
            .is_nan());
        // 20 steps in 10 s: the 70 left take 35 s.
        let second = first + Duration::from_secs(10);
        coordinator
            .progress(
                &a,
                &task,
                attempt,
                report(30, &[("student_test_accuracy", 0.75)]),
                second,
            )
            .expect("progress");
        assert_eq!(worker_status(&coordinator).seconds_left, Some(35.0));
        assert_eq!(
            crate::service::status_of(&coordinator).latest_accuracy,
            0.75
        );

        complete_trained(&mut coordinator, &a, &teacher, dir.path(), second);
        // Between tasks there is no time left to tell; the next task starts its own pace.
        assert_eq!(worker_status(&coordinator).seconds_left, None);
        let TaskReply::Task(next) = coordinator.get_task(&a, second).expect("task") else {
            panic!("no next task")
        };
        let (task, attempt) = held(&next);
        coordinator
            .progress(
                &a,
                &task,
                attempt,
                report(50, &[]),
                second + Duration::from_secs(1),
            )
            .expect("progress");
        assert_eq!(worker_status(&coordinator).seconds_left, None);
    }

    /// A safetensors checkpoint of one float tensor `w` whose last byte is `last`: checkpoints
    /// with different `last` are other teachers of the same shape.
    fn tiny_checkpoint(last: u8) -> Vec<u8> {
        let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[0, 0, 0, last]);
        file
    }

    /// The state as `state.json` holds it now: the state of task `task`.
    fn saved_task_state(dir: &Path, task: &TaskId) -> String {
        let text = std::fs::read_to_string(dir.join("state.json")).expect("state");
        let saved: serde_json::Value = serde_json::from_str(&text).expect("json");
        saved["tasks"][&task.0]["state"]["state"]
            .as_str()
            .expect("a task state")
            .to_string()
    }

    /// A large state saves labeling's assignments and results in groups, at most a few times
    /// the duration of a save apart; anything else at once. What a restart loses of them
    /// runs again.
    #[test]
    fn a_large_states_labeling_changes_are_saved_in_groups() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Instants before the coordinator's saves: no save is due until the clock moves on.
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        coordinator.group_saves_from = 0;
        assert_eq!(saved_task_state(dir.path(), &teacher.task.id), "running");
        complete_trained(&mut coordinator, &a, &teacher, dir.path(), start);
        assert_eq!(saved_task_state(dir.path(), &teacher.task.id), "done");

        let first = next_label_task(&mut coordinator, &a, start);
        let task = first.task.id.clone();
        assert_eq!(
            saved_task_state(dir.path(), &task),
            "pending",
            "saved with the next save"
        );
        coordinator.save_if_due(start);
        assert_eq!(
            saved_task_state(dir.path(), &task),
            "pending",
            "not due yet"
        );
        let later = Instant::now() + Duration::from_secs(60);
        coordinator.save_if_due(later);
        assert_eq!(saved_task_state(dir.path(), &task), "running");

        // A result waits for the next save too; a restart before it runs the task again.
        let shard = crate::state::ShardRecord {
            index: 0,
            key: mentor_labels::shard_key(1, 0),
            examples: 1,
            sha256: "00".into(),
            bytes: 1,
            histogram: None,
        };
        // (At an instant before the last save: none is due.)
        let effects = coordinator
            .complete(&a, &task, 1, TaskOutcome::Labeled(shard), start)
            .expect("complete");
        assert!(effects.is_empty(), "{effects:?}");
        assert_eq!(coordinator.state.tasks[&task].state, state::TaskState::Done);
        assert_eq!(saved_task_state(dir.path(), &task), "running");
        drop(coordinator);
        let mut reopened = Coordinator::open(one_worker_plan(), dir.path()).expect("reopen");
        assert_eq!(
            reopened.state.tasks[&task].state,
            state::TaskState::Pending,
            "a result a restart lost: the task runs again"
        );
        let b = reopened.register("b".into(), "cpu".into(), 0, later);
        let again = next_label_task(&mut reopened, &b, later);
        assert_eq!(again.task.id, task);
        assert_eq!(again.task.attempts, 2);
        // A small state (the default threshold) saves every change at once.
        assert_eq!(saved_task_state(dir.path(), &task), "running");
    }

    /// The service saves what waits for a save by itself, within a second.
    #[test]
    fn the_service_saves_grouped_changes_by_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        coordinator.set_group_saves_from(0);
        complete_trained(&mut coordinator, &a, &teacher, dir.path(), start);
        let task = next_label_task(&mut coordinator, &a, start).task.id;
        assert_eq!(
            saved_task_state(dir.path(), &task),
            "pending",
            "a save waits"
        );

        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let shared: service::Shared = std::sync::Arc::new(std::sync::Mutex::new(coordinator));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = runtime.spawn({
            let shared = shared.clone();
            async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                service::serve(listener, shared, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while saved_task_state(dir.path(), &task) != "running" {
            assert!(
                Instant::now() < deadline,
                "the service never saved the change"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = stop.send(());
        runtime
            .block_on(server)
            .expect("the server task")
            .expect("serve");
    }

    #[test]
    fn a_labeler_without_progress_loses_its_shard_when_the_lease_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        let lease = Duration::from_secs(coordinator.plan.pseudo_labels.lease_seconds);
        complete_trained(&mut coordinator, &a, &teacher, dir.path(), start);
        let slow = next_label_task(&mut coordinator, &a, start);
        let task = slow.task.id.clone();

        // Heard of (heartbeats) and reporting progress: the lease holds.
        let halfway = start + lease / 2;
        coordinator.heartbeat(&a, halfway);
        let stop = coordinator
            .progress(&a, &task, 1, Progress::default(), halfway)
            .expect("progress");
        assert_eq!(stop, None, "the labeler holds its lease");
        let later = halfway + lease - Duration::from_secs(1);
        coordinator.heartbeat(&a, later);
        coordinator.reap(later);
        assert_eq!(coordinator.state.tasks[&task].attempts, 1);
        assert!(coordinator.state.tasks[&task].is_run_by(&a, 1));

        // Heard of but silent on progress past the lease: the shard goes to another labeler.
        let expired = halfway + lease + Duration::from_secs(1);
        coordinator.heartbeat(&a, expired);
        assert_eq!(coordinator.live_workers("cpu", expired), 1);
        coordinator.reap(expired);
        assert!(coordinator.workers[&a].alive, "a slow labeler is not dead");
        assert_eq!(
            coordinator.state.tasks[&task].state,
            crate::state::TaskState::Pending
        );
        // A labeler stuck for good would still heartbeat: until it is heard of otherwise, no
        // group counts on it.
        assert!(coordinator.workers[&a].suspect);
        coordinator.heartbeat(&a, expired);
        assert_eq!(coordinator.live_workers("cpu", expired), 0);
        let b = coordinator.register("b".into(), "cpu".into(), 0, expired);
        let mut retry = next_label_task(&mut coordinator, &b, expired);
        while retry.task.id != task {
            retry = next_label_task(&mut coordinator, &b, expired);
        }
        assert_eq!(retry.task.attempts, 2);

        // The slow labeler still making progress goes on (whoever commits the shard first
        // wins), but its reports no longer count as the task's progress.
        let report = |step| Progress {
            step,
            ..Progress::default()
        };
        for (worker, attempt, step) in [(&a, 1, 7), (&b, 2, 3)] {
            let stop = coordinator
                .progress(worker, &task, attempt, report(step), expired)
                .expect("progress");
            assert_eq!(stop, None, "{worker} is not stopped");
        }
        assert_eq!(coordinator.workers[&a].progress.step, 0);
        assert_eq!(coordinator.workers[&b].progress.step, 3);
        assert!(
            !coordinator.workers[&a].suspect,
            "a labeler that reports is not stuck"
        );

        // The slow labeler's late result belongs to attempt 1 and changes nothing.
        let shards_before = coordinator.state.current_round().shards.len();
        let late_shard = crate::state::ShardRecord {
            index: 0,
            key: "late".into(),
            examples: 1,
            sha256: "00".into(),
            bytes: 1,
            histogram: None,
        };
        let late = TaskOutcome::Labeled(late_shard.clone());
        coordinator
            .complete(&a, &task, 1, late, expired)
            .expect("late result");
        assert_eq!(
            coordinator.state.current_round().shards.len(),
            shards_before
        );
        assert!(coordinator.state.tasks[&task].is_run_by(&b, 2));

        // Once the shard is committed, the slow labeler is told to stop.
        let shard = crate::state::ShardRecord {
            key: "b".into(),
            ..late_shard
        };
        coordinator
            .complete(&b, &task, 2, TaskOutcome::Labeled(shard), expired)
            .expect("result");
        let stop = coordinator
            .progress(&a, &task, 1, report(8), expired)
            .expect("progress")
            .expect("the slow labeler is told to stop");
        assert!(stop.contains("is done"), "{stop}");
    }

    #[test]
    fn a_worker_is_told_to_stop_an_attempt_that_went_back_to_the_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        let task = teacher.task.id.clone();
        let stop = coordinator
            .progress(&a, &task, 1, Progress::default(), start)
            .expect("progress");
        assert_eq!(stop, None, "the worker holds attempt 1");

        // Attempt 1 fails (another rank of its group, say): the task goes back to the queue.
        coordinator
            .complete(
                &a,
                &task,
                1,
                TaskOutcome::Failed("out of memory".into()),
                start,
            )
            .expect("complete");
        let stop = coordinator
            .progress(&a, &task, 1, Progress::default(), start)
            .expect("progress")
            .expect("told to stop");
        assert!(
            stop.contains("went back to the queue") && stop.contains("out of memory"),
            "{stop}"
        );
        let TaskReply::Task(retry) = coordinator.get_task(&a, start).expect("task") else {
            panic!("no retry")
        };
        assert_eq!(
            (retry.task.id.clone(), retry.task.attempts),
            (task.clone(), 2)
        );
        let stop = coordinator
            .progress(&a, &task, 1, Progress::default(), start)
            .expect("progress")
            .expect("told to stop");
        assert!(stop.contains("now runs as attempt 2"), "{stop}");
        assert_eq!(
            coordinator
                .progress(&a, &task, 2, Progress::default(), start)
                .expect("progress"),
            None
        );

        // A restarted coordinator puts the task back in the queue without counting a loss,
        // and does not know the worker: its reports are refused (it registers again), and the
        // ids it hands out are new, so no worker of the old coordinator passes for a new one.
        drop(coordinator);
        let mut restarted = Coordinator::open(one_worker_plan(), dir.path()).expect("reopen");
        assert!(matches!(
            restarted.progress(&a, &task, 2, Progress::default(), start),
            Err(CoordinatorError::UnknownWorker(_))
        ));
        let b = restarted.register("a".into(), "cpu".into(), 0, start);
        assert_ne!(b, a, "a worker id was reused after the restart");
    }

    #[test]
    fn a_run_directory_moved_between_saves_resumes_from_its_new_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gpu_machine = dir.path().join("gpu-machine");
        std::fs::create_dir(&gpu_machine).expect("mkdir");
        let gpu_machine = gpu_machine.canonicalize().expect("canonicalize");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(&gpu_machine, start);
        complete_trained(&mut coordinator, &a, &teacher, &gpu_machine, start);
        drop(coordinator);

        // A selection file records the soft-label store's root, in the run directory.
        let selection = gpu_machine.join("selections/round-1.json");
        std::fs::create_dir_all(selection.parent().expect("parent")).expect("mkdir");
        let storage = gpu_machine.join("pseudo-labels").display().to_string();
        std::fs::write(
            &selection,
            serde_json::json!({ "storage": storage }).to_string(),
        )
        .expect("write a selection");
        let laptop = dir.path().join("laptop");
        std::fs::rename(&gpu_machine, &laptop).expect("move the run directory");
        let laptop = laptop.canonicalize().expect("canonicalize");
        // A refused open leaves the moved directory as it was.
        let mut other = one_worker_plan();
        other.seed += 1;
        assert!(Coordinator::open(other, &laptop).is_err());
        let untouched =
            std::fs::read_to_string(laptop.join("selections/round-1.json")).expect("selection");
        assert!(untouched.contains(&storage), "{untouched}");
        // The laptop keeps the data set in another folder (the same files).
        let mut plan = one_worker_plan();
        let data = dir.path().join("data");
        std::os::unix::fs::symlink(&plan.data.dir, &data).expect("link the data");
        plan.data.dir = data.clone();
        let mut moved = Coordinator::open(plan, &laptop).expect("reopen the moved run");
        let recorded = Plan::from_toml_str(&moved.state.plan_toml).expect("recorded plan");
        assert_eq!(recorded.data.dir, data);
        let b = moved.register("b".into(), "cpu".into(), 0, start);
        // The pseudo-labelling reads the teacher the run trained, in its new place.
        let label = next_label_task(&mut moved, &b, start);
        let TaskSpec::Label { teacher, .. } = &label.task.spec else {
            unreachable!("a label task")
        };
        assert_eq!(
            teacher.checkpoint,
            laptop.join("checkpoints/round-1-teacher.safetensors")
        );
        let saved = std::fs::read_to_string(laptop.join("state.json")).expect("state");
        let old = gpu_machine.display().to_string();
        assert!(!saved.contains(&old), "{old} is still recorded: {saved}");
        let selection =
            std::fs::read_to_string(laptop.join("selections/round-1.json")).expect("selection");
        let selection: serde_json::Value = serde_json::from_str(&selection).expect("json");
        assert_eq!(
            selection["storage"],
            laptop.join("pseudo-labels").display().to_string()
        );

        // Any other change of the plan is refused, naming it.
        drop(moved);
        let mut other = one_worker_plan();
        other.seed += 1;
        match Coordinator::open(other, &laptop) {
            Err(CoordinatorError::PlanMismatch { difference, .. }) => {
                assert!(difference.starts_with("seed:"), "{difference}")
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a run of another seed was resumed"),
        }
    }

    /// A soft-label store the plan names inside the run directory (recorded absolute) moves
    /// with it: the plan naming its new place resumes the run, for `mentor plan --state-dir`
    /// too.
    #[test]
    fn a_store_inside_a_moved_run_directory_moves_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonicalize");
        let (gpu_machine, laptop) = (root.join("gpu-machine"), root.join("laptop"));
        let with_store = |run_dir: &Path| {
            let mut plan = one_worker_plan();
            plan.pseudo_labels.storage = Some(run_dir.join("labels").display().to_string());
            plan
        };
        drop(Coordinator::open(with_store(&gpu_machine), &gpu_machine).expect("open"));
        std::fs::rename(&gpu_machine, &laptop).expect("move the run directory");
        Coordinator::check_reopen(&with_store(&laptop), &laptop, Reopen::Resume)
            .expect("mentor plan --state-dir");
        let moved = Coordinator::open(with_store(&laptop), &laptop).expect("reopen");
        let recorded = Plan::from_toml_str(&moved.state.plan_toml).expect("recorded plan");
        assert_eq!(
            recorded.pseudo_labels.storage,
            Some(laptop.join("labels").display().to_string())
        );
        // A store elsewhere than the run directory stays where it was: another is refused.
        drop(moved);
        let mut elsewhere = one_worker_plan();
        elsewhere.pseudo_labels.storage = Some(root.join("other").display().to_string());
        assert!(matches!(
            Coordinator::open(elsewhere, &laptop),
            Err(CoordinatorError::PlanMismatch { .. })
        ));
    }

    #[test]
    fn a_moved_run_reads_its_given_teacher_where_the_plan_now_names_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonicalize");
        let (gpu_machine, laptop) = (root.join("gpu-machine"), root.join("laptop"));
        std::fs::create_dir_all(gpu_machine.join("run")).expect("mkdir");
        std::fs::create_dir_all(gpu_machine.join("models")).expect("mkdir");
        // The teacher's file lies outside the run directory: moving the run does not move it.
        let file = tiny_checkpoint(0);
        let gpu_teacher = gpu_machine.join("models/teacher.safetensors");
        std::fs::write(&gpu_teacher, &file).expect("write the teacher");
        let given = |checkpoint: &Path| {
            let mut plan = one_worker_plan();
            plan.teacher.train = None;
            plan.teacher.checkpoint = Some(checkpoint.to_path_buf());
            plan
        };
        let label_teacher = |coordinator: &mut Coordinator, name: &str| {
            let worker = coordinator.register(name.into(), "cpu".into(), 0, Instant::now());
            let label = next_label_task(coordinator, &worker, Instant::now());
            let TaskSpec::Label {
                teacher,
                teacher_was,
                ..
            } = label.task.spec
            else {
                unreachable!("a label task")
            };
            (teacher.checkpoint, teacher_was)
        };
        let mut coordinator =
            Coordinator::open(given(&gpu_teacher), &gpu_machine.join("run")).expect("open");
        assert_eq!(
            label_teacher(&mut coordinator, "a"),
            (gpu_teacher.clone(), vec![])
        );
        drop(coordinator);

        std::fs::rename(&gpu_machine, &laptop).expect("move the machine's files");
        let (run, laptop_teacher) = (
            laptop.join("run"),
            laptop.join("models/teacher.safetensors"),
        );
        // The plan still names the teacher where it was: refused, naming that file.
        match Coordinator::open(given(&gpu_teacher), &run) {
            Err(CoordinatorError::TeacherCheckpoint { path, .. }) => assert_eq!(path, gpu_teacher),
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a run whose teacher is gone was resumed"),
        }
        // The plan names it where it is now: the run's tasks read it there (and take a shard
        // committed before the move, which names the old place, for this teacher's).
        let mut moved = Coordinator::open(given(&laptop_teacher), &run).expect("reopen");
        assert_eq!(
            label_teacher(&mut moved, "b"),
            (laptop_teacher.clone(), vec![gpu_teacher.clone()])
        );
        let recorded = moved.state.teacher_checkpoint.clone();
        assert_eq!(recorded, Some(laptop_teacher.clone()));
        drop(moved);

        // Another teacher (retrained, say) in the place of the one the run began with, or
        // named by the plan: refused, naming the file, before anything changes.
        let saved = std::fs::read(run.join("state.json")).expect("state");
        let other_teacher = tiny_checkpoint(1);
        let elsewhere = laptop.join("models/retrained.safetensors");
        std::fs::write(&elsewhere, &other_teacher).expect("write");
        std::fs::write(&laptop_teacher, &other_teacher).expect("overwrite");
        for checkpoint in [&laptop_teacher, &elsewhere] {
            for check in [true, false] {
                let refused = if check {
                    Coordinator::check_reopen(&given(checkpoint), &run, Reopen::Resume).map(|_| ())
                } else {
                    Coordinator::open(given(checkpoint), &run).map(|_| ())
                };
                match refused {
                    Err(CoordinatorError::TeacherCheckpoint { path, reason }) => {
                        assert_eq!(&path, checkpoint);
                        assert!(
                            reason.contains("not the teacher this run began"),
                            "{reason}"
                        );
                    }
                    Err(e) => panic!("refused for another reason: {e}"),
                    Ok(()) => panic!("a run went on with another teacher"),
                }
            }
        }
        assert_eq!(std::fs::read(run.join("state.json")).expect("state"), saved);
        // Its own teacher back (a copy, anywhere): the run goes on.
        std::fs::write(&elsewhere, &file).expect("write");
        Coordinator::open(given(&elsewhere), &run).expect("the same teacher elsewhere");

        // A plan that trains its first teacher is another run.
        match Coordinator::open(one_worker_plan(), &run) {
            Err(CoordinatorError::PlanMismatch { difference, .. }) => {
                assert!(difference.starts_with("teacher."), "{difference}")
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a run of another first teacher was resumed"),
        }
    }

    #[test]
    fn a_failed_run_goes_on_from_where_it_failed_with_retry_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        complete_trained(&mut coordinator, &a, &teacher, dir.path(), start);
        // A labeling task fails every time (the storage is down, say): the run fails.
        let label = next_label_task(&mut coordinator, &a, start);
        let mut attempt = label.clone();
        for n in 1..=state::MAX_ATTEMPTS {
            if n > 1 {
                let TaskReply::Task(again) = coordinator.get_task(&a, start).expect("task") else {
                    panic!("no retry")
                };
                attempt = *again;
            }
            let failed = TaskOutcome::Failed("storage unreachable".into());
            coordinator
                .complete(&a, &attempt.task.id, attempt.task.attempts, failed, start)
                .expect("complete");
        }
        assert!(coordinator.state.is_finished());
        drop(coordinator);

        // Opened as it is, the run stays failed; a run that did not fail is not retried.
        let reopened = Coordinator::open(one_worker_plan(), dir.path()).expect("reopen");
        assert!(reopened.state.is_finished());
        drop(reopened);
        let elsewhere = tempfile::tempdir().expect("tempdir");
        match Coordinator::open_to_retry_failed(one_worker_plan(), elsewhere.path()) {
            Err(CoordinatorError::RetryFailed { reason, .. }) => {
                assert!(reason.contains("no state.json"), "{reason}")
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("an empty directory was retried"),
        }

        // Retried: the labeling goes on with its retries back, and the trained teacher is kept.
        let mut retried =
            Coordinator::open_to_retry_failed(one_worker_plan(), dir.path()).expect("retry");
        assert!(!retried.state.is_finished());
        assert_eq!(retried.state.phase, Phase::Label);
        assert!(retried.state.current_round().teacher.is_some());
        let b = retried.register("b".into(), "cpu".into(), 0, start);
        let again = next_label_task(&mut retried, &b, start);
        assert_eq!(again.task.id, label.task.id);
        assert_eq!(retried.state.tasks[&again.task.id].failures, 0);
        drop(retried);
        match Coordinator::open_to_retry_failed(one_worker_plan(), dir.path()) {
            Err(CoordinatorError::RetryFailed { reason, .. }) => {
                assert!(
                    reason.contains("it has not failed (it was still running when last saved"),
                    "{reason}"
                )
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a running run was retried"),
        }
    }

    /// A run that failed reading its round's shards (its student training, here) is retried
    /// with the shards gone or altered since labeled again and the others kept; the filter then
    /// runs again and makes one student training.
    #[test]
    fn a_retry_labels_again_the_shards_gone_or_altered_since_they_were_labeled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        complete_trained(&mut coordinator, &a, &teacher, dir.path(), start);
        label_every_shard(&mut coordinator, &a, start);
        let (kept, _) = filter_now(&coordinator);
        let selection = coordinator.state.paths.selection(1);
        coordinator.filter_finished(1, Ok((kept, selection)));
        assert_eq!(coordinator.state.phase, Phase::TrainStudent);
        let student_tasks = |coordinator: &Coordinator| -> Vec<TaskId> {
            coordinator
                .state
                .tasks
                .values()
                .filter(|task| {
                    matches!(
                        task.spec,
                        TaskSpec::Train {
                            role: mentor_plan::Role::Student,
                            ..
                        }
                    )
                })
                .map(|task| task.id.clone())
                .collect()
        };
        for _ in 0..state::MAX_ATTEMPTS {
            let TaskReply::Task(student) = coordinator.get_task(&a, start).expect("task") else {
                panic!("no student training")
            };
            let failed = TaskOutcome::Failed(
                "shard `round-1/shard-00001.safetensors` fails its checksum".into(),
            );
            coordinator
                .complete(&a, &student.task.id, student.task.attempts, failed, start)
                .expect("complete");
        }
        assert!(coordinator.state.is_finished());
        let labeled = coordinator.state.current_round().shards.clone();
        assert_eq!(labeled.len(), 4);
        drop(coordinator);

        // Shard 1 altered, shard 2 gone.
        let file = |index: u32| {
            dir.path()
                .join("pseudo-labels")
                .join(mentor_labels::shard_key(1, index))
        };
        let mut altered = std::fs::read(file(1)).expect("shard 1");
        *altered.last_mut().expect("bytes") ^= 1;
        std::fs::write(file(1), &altered).expect("alter shard 1");
        std::fs::remove_file(file(2)).expect("remove shard 2");

        let mut retried =
            Coordinator::open_to_retry_failed(one_worker_plan(), dir.path()).expect("retry");
        assert_eq!(retried.state.phase, Phase::Label);
        let kept_shards: Vec<u32> = retried
            .state
            .current_round()
            .shards
            .iter()
            .map(|shard| shard.index)
            .collect();
        assert_eq!(kept_shards, [0, 3]);
        assert!(!file(1).exists(), "the altered shard is removed");
        assert!(student_tasks(&retried).is_empty());
        let pending: Vec<u32> = retried
            .state
            .tasks
            .values()
            .filter(|task| task.state == state::TaskState::Pending)
            .map(|task| match task.spec {
                TaskSpec::Label { shard_index, .. } => shard_index,
                _ => panic!("{:?} is pending", task.spec),
            })
            .collect();
        assert_eq!(pending, [1, 2]);
        // What was kept is as it was.
        assert_eq!(retried.state.current_round().shards[1], labeled[3]);

        let b = retried.register("b".into(), "cpu".into(), 0, start);
        label_every_shard(&mut retried, &b, start);
        assert_eq!(retried.state.phase, Phase::Filter);
        assert_eq!(retried.state.current_round().shards.len(), 4);
        let (kept_again, _) = filter_now(&retried);
        assert_eq!(kept_again, kept, "the same labels, the same selection");
        let selection = retried.state.paths.selection(1);
        retried.filter_finished(1, Ok((kept_again, selection)));
        assert_eq!(retried.state.phase, Phase::TrainStudent);
        assert_eq!(student_tasks(&retried).len(), 1);
    }

    /// Relabeling a given teacher's round reads the teacher the run began with: another file
    /// in its place refuses the retry, which then changes nothing (the damaged shard stays
    /// where it was until a retry can go on).
    #[test]
    fn a_retry_relabels_with_the_given_teacher_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (run, teacher) = (
            dir.path().join("run"),
            dir.path().join("teacher.safetensors"),
        );
        let file = tiny_checkpoint(0);
        std::fs::write(&teacher, &file).expect("teacher");
        let mut plan = one_worker_plan();
        plan.teacher.train = None;
        plan.teacher.checkpoint = Some(teacher.clone());
        let start = Instant::now();
        let mut coordinator = Coordinator::open(plan.clone(), &run).expect("open");
        let a = coordinator.register("a".into(), "cpu".into(), 0, start);
        label_every_shard(&mut coordinator, &a, start);
        coordinator.filter_finished(1, Err("the store went away".into()));
        assert!(coordinator.state.is_finished());
        assert_eq!(coordinator.state.failed_in, Some(Phase::Filter));
        drop(coordinator);
        let shard = run
            .join("pseudo-labels")
            .join(mentor_labels::shard_key(1, 2));
        let mut altered = std::fs::read(&shard).expect("shard 2");
        *altered.last_mut().expect("bytes") ^= 1;
        std::fs::write(&shard, &altered).expect("alter shard 2");

        let other = tiny_checkpoint(1);
        std::fs::write(&teacher, &other).expect("another teacher in its place");
        let saved = std::fs::read(run.join("state.json")).expect("state");
        match Coordinator::open_to_retry_failed(plan.clone(), &run) {
            Err(CoordinatorError::TeacherCheckpoint { reason, .. }) => {
                assert!(
                    reason.contains("not the teacher this run began"),
                    "{reason}"
                )
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("relabeled with another teacher"),
        }
        assert_eq!(std::fs::read(run.join("state.json")).expect("state"), saved);
        assert!(shard.exists(), "a refused retry removed a shard");

        std::fs::write(&teacher, &file).expect("its teacher back");
        let retried = Coordinator::open_to_retry_failed(plan, &run).expect("retry");
        assert_eq!(retried.state.phase, Phase::Label);
        assert_eq!(retried.state.current_round().shards.len(), 3);
        assert!(!shard.exists(), "the damaged shard is removed");
    }

    #[test]
    fn a_worker_asking_again_while_holding_a_task_gets_the_same_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        // The reply was lost and the worker asks again: the same attempt, not a wait forever.
        let TaskReply::Task(again) = coordinator.get_task(&a, start).expect("task") else {
            panic!("no task the second time")
        };
        assert_eq!(*again, teacher);
        complete_trained(&mut coordinator, &a, &teacher, dir.path(), start);
        // A labeler asking again keeps its shard, and no second shard runs beside it.
        let label = next_label_task(&mut coordinator, &a, start);
        let TaskReply::Task(again) = coordinator.get_task(&a, start).expect("task") else {
            panic!("no task the second time")
        };
        assert_eq!(*again, label);
        let running = coordinator
            .state
            .tasks
            .values()
            .filter(|task| matches!(task.state, state::TaskState::Running { .. }))
            .count();
        assert_eq!(running, 1);
        // Once its result is in, the next request is a new assignment (here the failed
        // shard's next attempt).
        let failed = TaskOutcome::Failed("storage unreachable".into());
        coordinator
            .complete(&a, &label.task.id, label.task.attempts, failed, start)
            .expect("complete");
        let TaskReply::Task(next) = coordinator.get_task(&a, start).expect("task") else {
            panic!("no task after the result")
        };
        assert_eq!(next.task.attempts, label.task.attempts + 1);
    }

    #[test]
    fn a_registration_sent_again_keeps_the_workers_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut coordinator = coordinator(dir.path());
        let now = Instant::now();
        let register = |coordinator: &mut Coordinator, instance: &str| {
            coordinator.register_instance("h".into(), "cpu".into(), 7, instance.into(), now)
        };
        let first = register(&mut coordinator, "0123");
        // The reply was lost and the same process asks again: no second entry to wait for.
        assert_eq!(register(&mut coordinator, "0123"), first);
        assert_eq!(coordinator.workers.len(), 1);
        assert_eq!(coordinator.state.phase, Phase::WaitingForWorkers);
        // Another process, or one that does not say: a worker of its own.
        let other = register(&mut coordinator, "4567");
        assert_ne!(other, first);
        let unnamed = register(&mut coordinator, "");
        assert_ne!(register(&mut coordinator, ""), unnamed);
        assert_eq!(coordinator.workers.len(), 4);
    }

    #[test]
    fn a_worker_that_leaves_gives_its_task_back_without_a_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        coordinator.leave(&a, "SIGTERM");
        let record = &coordinator.state.tasks[&teacher.task.id];
        assert_eq!(record.state, state::TaskState::Pending);
        assert_eq!((record.losses, record.failures, record.leaves), (0, 0, 1));
        assert!(coordinator.workers[&a].exited);
        assert!(
            coordinator.get_task(&a, start).is_err(),
            "a worker that left is gone"
        );
        let mut b = coordinator.register("b".into(), "cpu".into(), 0, start);
        let TaskReply::Task(again) = coordinator.get_task(&b, start).expect("task") else {
            panic!("the task was not given again")
        };
        assert_eq!(
            (again.task.id.clone(), again.task.attempts),
            (teacher.task.id.clone(), teacher.task.attempts + 1)
        );
        // Its progress reports say how far it got: leaving past where the attempts before it
        // got starts the count of leaves again (a long training, preempted again and again,
        // goes on), and one not getting further counts.
        let mut attempt = again;
        for (step, leaves) in [(40, 0), (40, 1)] {
            let progress = Progress {
                step,
                total_steps: 100,
                ..Progress::default()
            };
            let stop = coordinator
                .progress(&b, &attempt.task.id, attempt.task.attempts, progress, start)
                .expect("progress");
            assert_eq!(stop, None);
            coordinator.leave(&b, "SIGTERM");
            let record = &coordinator.state.tasks[&teacher.task.id];
            assert_eq!((record.leaves, record.reached.best), (leaves, 40));
            b = coordinator.register(format!("b{step}{leaves}"), "cpu".into(), 0, start);
            let TaskReply::Task(next) = coordinator.get_task(&b, start).expect("task") else {
                panic!("the task was not given again")
            };
            attempt = next;
        }
    }

    #[test]
    fn a_soft_label_store_serves_one_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = dir.path().join("labels");
        let with_store = || {
            let mut plan = one_worker_plan();
            plan.pseudo_labels.storage = Some(shared.display().to_string());
            plan
        };
        let first = Coordinator::open(with_store(), &dir.path().join("first")).expect("open");
        let run_id = first.state.run_id.clone();
        drop(first);
        // The same run opens it again; another run is refused, naming the first.
        drop(Coordinator::open(with_store(), &dir.path().join("first")).expect("reopen"));
        match Coordinator::open(with_store(), &dir.path().join("second")) {
            Err(CoordinatorError::Storage { reason }) => assert!(
                reason.contains(&format!("holds the soft labels of run {run_id}"))
                    && reason.contains("pseudo_labels.storage of its own")
                    && reason.contains("remove that run.json"),
                "{reason}"
            ),
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("two runs share a soft-label store"),
        }
        assert!(
            !dir.path().join("second").exists(),
            "the refused run left its directory"
        );
    }

    #[test]
    fn a_resumed_run_waits_for_min_workers_before_it_forms_a_group_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (before, ..) = two_workers_with_a_teacher_task(dir.path(), start);
        drop(before);
        // The coordinator started again: the first worker back gets no task of its own.
        let mut resumed = coordinator(dir.path());
        let a = resumed.register("a".into(), "cpu".into(), 0, start);
        assert!(matches!(
            resumed.get_task(&a, start).expect("reply"),
            TaskReply::RetryAfter(_)
        ));
        let status = service::status_of(&resumed);
        assert_eq!(status.phase, "waiting-for-workers");
        let b = resumed.register("b".into(), "cpu".into(), 0, start);
        let TaskReply::Task(first) = resumed.get_task(&a, start).expect("task") else {
            panic!("no task once both are back")
        };
        assert_eq!((first.rank, first.task.world_size), (0, 2));
        assert_eq!(service::status_of(&resumed).phase, "train-teacher");
        let TaskReply::Task(second) = resumed.get_task(&b, start).expect("task") else {
            panic!("no rank 1")
        };
        assert_eq!((second.task.id, second.rank), (first.task.id, 1));
        drop(resumed);
        // A machine lost for good: the plan may ask for fewer workers when the run resumes.
        let mut fewer = Plan::from_toml_str(TINY).expect("tiny plan");
        fewer.workers.min_workers = 1;
        let mut resumed = Coordinator::open(fewer, dir.path()).expect("resumed with fewer");
        let a = resumed.register("a".into(), "cpu".into(), 0, start);
        assert!(matches!(
            resumed.get_task(&a, start).expect("reply"),
            TaskReply::Task(_)
        ));
    }

    #[test]
    fn a_run_recorded_with_a_setting_this_version_refuses_resumes_under_a_valid_plan() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(coordinator(dir.path()));
        // An earlier version took a heartbeat timeout of one second, which a resume may change.
        let state_file = dir.path().join("state.json");
        let text = std::fs::read_to_string(&state_file).expect("state");
        let edited = text.replacen(
            "heartbeat_timeout_seconds = 10",
            "heartbeat_timeout_seconds = 1",
            1,
        );
        assert_ne!(edited, text);
        std::fs::write(&state_file, edited).expect("write state");
        let reopened = coordinator(dir.path());
        assert!(reopened
            .state
            .plan_toml
            .contains("heartbeat_timeout_seconds = 10"));
    }

    #[test]
    fn a_runs_elapsed_time_outlives_its_coordinator_and_stops_when_it_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (coordinator, _, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        std::thread::sleep(Duration::from_millis(50));
        let running = service::status_of(&coordinator).elapsed_seconds;
        assert!(running >= 0.05, "{running}");
        drop(coordinator);
        let reopened = Coordinator::open(one_worker_plan(), dir.path()).expect("reopen");
        assert!(service::status_of(&reopened).elapsed_seconds >= running);
        drop(reopened);
        let mut coordinator = Coordinator::open(one_worker_plan(), dir.path()).expect("reopen");
        let a2 = coordinator.register("a".into(), "cpu".into(), 0, start);
        let TaskReply::Task(again) = coordinator.get_task(&a2, start).expect("task") else {
            panic!("no task")
        };
        assert_eq!(again.task.id, teacher.task.id);
        let failed = TaskOutcome::Failed("out of memory".into());
        for _ in 0..state::MAX_ATTEMPTS {
            let TaskReply::Task(attempt) = coordinator.get_task(&a2, start).expect("task") else {
                panic!("no attempt")
            };
            coordinator
                .complete(
                    &a2,
                    &attempt.task.id,
                    attempt.task.attempts,
                    failed.clone(),
                    start,
                )
                .expect("complete");
        }
        assert!(coordinator.state.is_finished());
        let ended = service::status_of(&coordinator).elapsed_seconds;
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(service::status_of(&coordinator).elapsed_seconds, ended);
        drop(coordinator);
        let saved = service::saved_status(dir.path()).expect("saved status");
        assert_eq!(saved.elapsed_seconds, ended);
    }

    #[test]
    fn a_fixed_group_starts_once_enough_workers_can_fill_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut plan = one_worker_plan();
        plan.workers.world_size = 2;
        let mut coordinator = Coordinator::open(plan, dir.path()).expect("open");
        let now = Instant::now();
        let a = coordinator.register("a".into(), "cpu".into(), 0, now);
        // One worker cannot be two ranks: it waits instead of failing at the join timeout,
        // and status says why.
        assert!(matches!(
            coordinator.get_task(&a, now).expect("reply"),
            TaskReply::RetryAfter(_)
        ));
        assert_eq!(
            service::status_of(&coordinator).waiting,
            "training waits for 2 workers of one device kind (workers.world_size); 1 can take part now"
        );
        let b = coordinator.register("b".into(), "cpu".into(), 0, now);
        let TaskReply::Task(first) = coordinator.get_task(&a, now).expect("task") else {
            panic!("no task once two are there")
        };
        assert_eq!((first.rank, first.task.world_size), (0, 2));
        assert_eq!(service::status_of(&coordinator).waiting, "");
        let TaskReply::Task(second) = coordinator.get_task(&b, now).expect("task") else {
            panic!("no rank 1")
        };
        assert_eq!(second.rank, 1);
    }

    /// When a rank of three dies, the first survivor to ask does not form a group of one: the
    /// next group waits for the other survivor (still heartbeating) and has two ranks.
    #[test]
    fn the_survivors_of_a_failed_group_train_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let mut coordinator = coordinator(dir.path());
        let [a, b, c] =
            ["a", "b", "c"].map(|host| coordinator.register(host.into(), "cpu".into(), 0, now));
        let mut ranks = Vec::new();
        for worker in [&a, &b, &c] {
            let TaskReply::Task(assignment) = coordinator.get_task(worker, now).expect("task")
            else {
                panic!("no rank for {worker}")
            };
            ranks.push(assignment);
        }
        assert_eq!(ranks[0].task.world_size, 3);
        // c is killed: a's collective fails first.
        let broken = TaskOutcome::GroupFailed("the peer closed the ring".into());
        let task = ranks[0].task.id.clone();
        coordinator
            .complete(&a, &task, 1, broken, now)
            .expect("complete");
        let soon = now + Duration::from_millis(200);
        assert!(coordinator.heartbeat(&b, soon));
        assert!(
            matches!(
                coordinator.get_task(&a, soon).expect("reply"),
                TaskReply::RetryAfter(_)
            ),
            "a formed a group while b, still heartbeating, had not asked yet"
        );
        // b's collective fails too; it asks. c, dead, has not been heard of for seconds.
        let later = now + HEARD_RECENTLY + Duration::from_secs(1);
        assert!(coordinator.heartbeat(&a, later));
        let TaskReply::Task(retry) = coordinator.get_task(&b, later).expect("task") else {
            panic!("no retry")
        };
        assert_eq!(retry.task.id, task);
        assert_eq!(retry.task.world_size, 2, "the survivors train together");
    }

    /// A stall of the coordinator's own (its lock held by a slow disk, the process stopped)
    /// longer than the heartbeat timeout does not make its workers lost.
    #[test]
    fn a_stall_of_the_coordinator_is_not_held_against_its_workers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let mut coordinator = coordinator(dir.path());
        let a = coordinator.register("a".into(), "cpu".into(), 0, now);
        let timeout = Duration::from_secs(coordinator.plan.workers.heartbeat_timeout_seconds);
        let stalled = timeout + Duration::from_secs(5);
        let after = now + stalled + HEARTBEAT_INTERVAL;
        coordinator.pardon_stall(stalled, after);
        coordinator.reap(after);
        assert!(
            coordinator.workers[&a].alive,
            "lost to the coordinator's stall"
        );
        // Silence past the timeout without a stall is still loss.
        coordinator.reap(after + timeout + HEARTBEAT_INTERVAL * 2);
        assert!(!coordinator.workers[&a].alive);
    }

    /// A setting that would do nothing is refused for a new run, while a run recorded with it
    /// (by a build that accepted it) resumes with its plan unchanged.
    #[test]
    fn settings_that_do_nothing_refuse_new_runs_only() {
        let text = TINY.replacen("top_k = 3", "top_k = 3\nbalance = false\nper_class = 50", 1);
        let unused = Plan::from_toml_str(&text).expect("a valid plan");
        let fresh = tempfile::tempdir().expect("tempdir");
        let error = Coordinator::open(unused.clone(), fresh.path())
            .err()
            .expect("a new run refused");
        assert!(
            error.to_string().contains("pseudo_labels.per_class"),
            "{error}"
        );

        // A run recorded with that plan.
        let dir = tempfile::tempdir().expect("tempdir");
        drop(coordinator(dir.path()));
        let state_file = dir.path().join("state.json");
        let mut saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state_file).expect("state")).expect("json");
        saved["plan_toml"] = serde_json::Value::String(unused.to_toml_string());
        std::fs::write(&state_file, saved.to_string()).expect("write state");
        Coordinator::open(unused, dir.path()).expect("the recorded run resumes");
    }

    /// A GPU worker whose teacher training failed (out of memory, say) beside a CPU worker that
    /// may not train while GPUs can: the GPU worker retries it (the CPU worker could not), the
    /// run does not wait for ever.
    #[test]
    fn a_task_failed_on_a_gpu_is_retried_when_no_other_gpu_worker_can_take_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let mut coordinator = coordinator(dir.path());
        let cpu = coordinator.register("cpu-node".into(), "cpu".into(), 0, now);
        let gpu = coordinator.register("gpu-node".into(), "cuda:0".into(), 0, now);
        let _ = coordinator.get_task(&cpu, now).expect("reply");
        let TaskReply::Task(first) = coordinator.get_task(&gpu, now).expect("task") else {
            panic!("the GPU worker got no task")
        };
        let oom = TaskOutcome::Failed("CUDA out of memory".into());
        coordinator
            .complete(&gpu, &first.task.id, 1, oom, now)
            .expect("complete");
        let mut retried = None;
        for _ in 0..20 {
            for worker in [&cpu, &gpu] {
                if let TaskReply::Task(assignment) =
                    coordinator.get_task(worker, now).expect("reply")
                {
                    retried.get_or_insert((worker.clone(), assignment.task.attempts));
                }
            }
        }
        assert_eq!(retried, Some((gpu, 2)), "nobody retried the task");
    }

    /// A CPU worker (a GPU node whose driver broke, say) does not take a training task while
    /// GPU workers can train it.
    #[test]
    fn training_goes_to_gpus_when_there_are_gpu_workers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let mut coordinator = coordinator(dir.path());
        let cpu = coordinator.register("cpu-node".into(), "cpu".into(), 0, now);
        let gpu = coordinator.register("gpu-node".into(), "cuda:0".into(), 0, now);
        assert!(matches!(
            coordinator.get_task(&cpu, now).expect("reply"),
            TaskReply::RetryAfter(_)
        ));
        let TaskReply::Task(assignment) = coordinator.get_task(&gpu, now).expect("task") else {
            panic!("the GPU worker got no task")
        };
        assert!(assignment.task.spec.is_training());
        assert_eq!(assignment.task.device_kind, "cuda");
    }

    #[test]
    fn a_rank_still_in_a_failed_groups_attempt_is_not_counted_for_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let (mut coordinator, a, b, first) = two_workers_with_a_teacher_task(dir.path(), now);
        let TaskReply::Task(second) = coordinator.get_task(&b, now).expect("task") else {
            panic!("no rank 1")
        };
        assert_eq!((first.task.world_size, second.rank), (2, 1));
        // Rank 0's join fails; rank 1 hangs in the group's setup, heartbeating.
        let failed = TaskOutcome::GroupFailed("ranks [1] of 2 did not join".into());
        coordinator
            .complete(&a, &first.task.id, first.task.attempts, failed, now)
            .expect("complete");
        assert!(coordinator.heartbeat(&b, now));
        let shown = service::status_of(&coordinator);
        let hung = shown
            .workers
            .iter()
            .find(|w| w.worker_id == b.0)
            .expect("b");
        assert_eq!(hung.state, "suspected");
        // The next group waits a while for the failed group's ranks that still heartbeat...
        assert!(matches!(
            coordinator.get_task(&a, now).expect("reply"),
            TaskReply::RetryAfter(_)
        ));
        // ...then goes on without them.
        let later = now + GROUP_SETTLE;
        assert!(coordinator.heartbeat(&b, later));
        let TaskReply::Task(retry) = coordinator.get_task(&a, later).expect("task") else {
            panic!("no retry")
        };
        assert_eq!(retry.task.world_size, 1, "the hung rank was counted");
        // A group's failure is a lost attempt, not a failure of the task.
        let record = &coordinator.state.tasks[&first.task.id];
        assert_eq!((record.failures, record.losses), (0, 1));
    }

    #[test]
    fn ranks_told_to_stop_form_the_next_group_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let (mut coordinator, a, b, first) = two_workers_with_a_teacher_task(dir.path(), now);
        let TaskReply::Task(_) = coordinator.get_task(&b, now).expect("task") else {
            panic!("no rank 1")
        };
        // The attempt is given up (a worker lost and back, say): both ranks are told to stop
        // and ask for work without reporting.
        coordinator.state.worker_lost(&a);
        let TaskReply::Task(retry) = coordinator.get_task(&a, now).expect("task") else {
            panic!("no retry")
        };
        assert_eq!(retry.task.id, first.task.id);
        assert_eq!(retry.task.world_size, 2, "the ranks were not counted");
    }

    #[test]
    fn the_single_transport_trains_on_one_rank_whatever_the_workers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut plan = Plan::from_toml_str(TINY).expect("tiny plan");
        plan.workers.collective = mentor_plan::CollectiveKind::Single;
        let mut coordinator = Coordinator::open(plan, dir.path()).expect("open");
        let now = Instant::now();
        let a = coordinator.register("a".into(), "cpu".into(), 0, now);
        coordinator.register("b".into(), "cpu".into(), 0, now);
        let TaskReply::Task(first) = coordinator.get_task(&a, now).expect("task") else {
            panic!("no task")
        };
        assert_eq!(first.task.world_size, 1);
    }

    #[test]
    fn a_group_has_no_more_ranks_than_the_smallest_batch_has_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut plan = Plan::from_toml_str(TINY).expect("tiny plan");
        if let Some(train) = plan.teacher.train.as_mut() {
            train.batch_size = 2;
        }
        let mut coordinator = Coordinator::open(plan, dir.path()).expect("open");
        let now = Instant::now();
        let workers: Vec<WorkerId> = ["a", "b", "c"]
            .iter()
            .map(|name| coordinator.register((*name).into(), "cpu".into(), 0, now))
            .collect();
        let TaskReply::Task(first) = coordinator.get_task(&workers[0], now).expect("task") else {
            panic!("no task for rank 0")
        };
        assert_eq!((first.rank, first.task.world_size), (0, 2));
    }

    #[test]
    fn a_group_of_all_workers_counts_one_still_loading_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut coordinator = coordinator(dir.path());
        let start = Instant::now();
        let slow = coordinator.register("slow".into(), "cpu".into(), 0, start);
        let fast = coordinator.register("fast".into(), "cpu".into(), 0, start);
        // "fast" asks for work long after both registered; "slow" is still loading its data
        // set and has sent nothing since: it is not gone, the group waits for it.
        let later = start + HEARTBEAT_INTERVAL * 10;
        let TaskReply::Task(first) = coordinator.get_task(&fast, later).expect("task") else {
            panic!("no task for rank 0")
        };
        assert_eq!((first.rank, first.task.world_size), (0, 2));
        let TaskReply::Task(second) = coordinator.get_task(&slow, later).expect("task") else {
            panic!("no task for rank 1")
        };
        assert_eq!((second.rank, second.task.id), (1, first.task.id));
    }

    #[test]
    fn a_worker_that_never_asks_for_work_is_left_out_after_the_join_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut coordinator = coordinator(dir.path());
        let start = Instant::now();
        let hung = coordinator.register("hung".into(), "cpu".into(), 0, start);
        let fast = coordinator.register("fast".into(), "cpu".into(), 0, start);
        let timeout = Duration::from_secs(coordinator.plan.workers.join_timeout_seconds);
        let later = start + timeout + HEARTBEAT_INTERVAL;
        // "hung" still heartbeats (its process lives) but has not asked for work since.
        assert!(coordinator.heartbeat(&hung, later));
        let TaskReply::Task(first) = coordinator.get_task(&fast, later).expect("task") else {
            panic!("no task")
        };
        assert_eq!((first.rank, first.task.world_size), (0, 1));
    }

    /// Under `workers.collective = "nccl"` a CPU worker trains in no group (it labels and
    /// evaluates): with no GPU worker, training waits and status says why.
    #[test]
    fn cpu_workers_do_not_train_under_nccl_and_status_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let mut plan = one_worker_plan();
        plan.workers.collective = mentor_plan::CollectiveKind::Nccl;
        let mut coordinator = Coordinator::open(plan, dir.path()).expect("open");
        let a = coordinator.register("a".into(), "cpu".into(), 0, now);
        assert!(matches!(
            coordinator.get_task(&a, now).expect("reply"),
            TaskReply::RetryAfter(_)
        ));
        let waiting = coordinator.waiting(now).unwrap_or_default();
        assert!(
            waiting.starts_with("training waits for a GPU worker: workers.collective = \"nccl\""),
            "{waiting}"
        );
        // A GPU worker trains; then the CPU worker labels.
        let g = coordinator.register("g".into(), "cuda:0".into(), 0, now);
        let TaskReply::Task(teacher) = coordinator.get_task(&g, now).expect("reply") else {
            panic!("no training for the GPU worker")
        };
        assert!(teacher.task.spec.is_training());
        complete_trained(&mut coordinator, &g, &teacher, dir.path(), now);
        let label = next_label_task(&mut coordinator, &a, now);
        assert!(matches!(label.task.spec, TaskSpec::Label { .. }));
    }

    /// A group's rendezvous goes once its attempt ends well (as when it fails): a run of many
    /// trainings keeps none.
    #[test]
    fn a_finished_groups_rendezvous_is_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let (mut coordinator, a, b, first) = two_workers_with_a_teacher_task(dir.path(), now);
        let task = first.task.id.clone();
        let TaskReply::Task(second) = coordinator.get_task(&b, now).expect("task") else {
            panic!("no task for rank 1")
        };
        coordinator
            .join_group(&a, join(&task, 0, "10.0.0.1:1000"), now)
            .expect("join");
        coordinator
            .join_group(&b, join(&task, 1, "10.0.0.2:1000"), now)
            .expect("join");
        assert_eq!(coordinator.groups.len(), 1);
        complete_trained(&mut coordinator, &b, &second, dir.path(), now);
        assert_eq!(
            coordinator.groups.len(),
            1,
            "rank 0 has not ended the attempt"
        );
        complete_trained(&mut coordinator, &a, &first, dir.path(), now);
        assert!(coordinator.groups.is_empty());
    }

    /// A group on several hosts given a ring address on loopback cannot form: once every rank
    /// joined, the attempt fails as that rank's own failure, naming it and --advertise-host,
    /// whichever rank joined first; the other rank sees the attempt cancelled.
    #[test]
    fn a_loopback_ring_address_in_a_group_over_hosts_fails_its_rank() {
        for loopback_rank in [0u32, 1] {
            let dir = tempfile::tempdir().expect("tempdir");
            let now = Instant::now();
            let (mut coordinator, a, b, _) = two_workers_with_a_teacher_task(dir.path(), now);
            let TaskReply::Task(second) = coordinator.get_task(&b, now).expect("task") else {
                panic!("no task for rank 1")
            };
            let task = second.task.id.clone();
            let address = |rank: u32| {
                if rank == loopback_rank {
                    "127.0.0.1:1000"
                } else {
                    "10.0.0.9:1000"
                }
            };
            let first = coordinator
                .join_group(&a, join(&task, 0, address(0)), now)
                .expect("join");
            assert!(!first.ready && !first.cancelled);
            let last = coordinator
                .join_group(&b, join(&task, 1, address(1)), now)
                .expect("join");
            assert!(last.cancelled, "{last:?}");
            let record = &coordinator.state.tasks[&task];
            assert_eq!(record.failures, 1);
            let blamed = if loopback_rank == 0 { &a } else { &b };
            let error = record.last_error.clone().unwrap_or_default();
            assert!(
                error.contains(&format!("rank {loopback_rank} (worker {blamed} on host"))
                    && error.contains("127.0.0.1:1000, on loopback")
                    && error.contains("--advertise-host"),
                "{error}"
            );
            assert!(coordinator.groups.is_empty());
        }
    }

    #[test]
    fn a_training_group_forms_through_the_rendezvous() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let (mut coordinator, a, b, first) = two_workers_with_a_teacher_task(dir.path(), now);
        // Two live CPU workers: the teacher's training task gets two ranks.
        assert_eq!((first.rank, first.task.world_size), (0, 2));
        let task = first.task.id.clone();
        let view = coordinator
            .join_group(&a, join(&task, 0, "10.0.0.1:1000"), now)
            .expect("join");
        assert!(!view.ready);
        assert_eq!(view.missing_ranks, vec![1]);
        let TaskReply::Task(second) = coordinator.get_task(&b, now).expect("task") else {
            panic!("no task for rank 1")
        };
        assert_eq!(second.rank, 1);
        let error = coordinator
            .join_group(&b, join(&task, 0, "x"), now)
            .expect_err("wrong rank");
        assert!(error.to_string().contains("is not rank 0"), "{error}");
        let view = coordinator
            .join_group(&b, join(&task, 1, "node-b:1001"), now)
            .expect("join");
        assert!(view.ready);
        assert_eq!(
            view.addresses,
            vec!["10.0.0.1:1000".to_string(), "node-b:1001".to_string()]
        );

        // Rank 1 fails: the attempt is over for rank 0, and rank 0 is suspected until heard of.
        coordinator
            .complete(
                &b,
                &task,
                1,
                TaskOutcome::Failed("rank 0 did not answer".into()),
                now,
            )
            .expect("complete");
        assert!(coordinator.workers[&a].suspect);
        // Status no longer shows rank 0 on the failed attempt (the task went back to the queue).
        let shown = crate::service::status_of(&coordinator);
        let rank_0 = shown
            .workers
            .iter()
            .find(|w| w.worker_id == a.0)
            .expect("rank 0 in status");
        assert_eq!((rank_0.task_id.as_str(), rank_0.step), ("", 0));
        assert!(
            coordinator
                .get_group(&a, &task, 1, now)
                .expect("group")
                .cancelled
        );
        assert!(
            !coordinator.workers[&a].suspect,
            "rank 0 was heard of again"
        );
    }

    #[test]
    fn the_metrics_file_keeps_rank_0s_reports_and_each_attempts_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        let (mut coordinator, a, b, first) = two_workers_with_a_teacher_task(dir.path(), now);
        let TaskReply::Task(_) = coordinator.get_task(&b, now).expect("task") else {
            panic!("no task for rank 1")
        };
        let task = first.task.id.clone();
        let report = |step: u64, loss: f64, metrics: &[(&str, f64)]| Progress {
            step,
            total_steps: 100,
            loss: Some(loss),
            accuracy: None,
            images_per_second: 50.0,
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        for (worker, step) in [(&b, 10), (&a, 10), (&b, 20), (&a, 20)] {
            let metrics = [("h", 0.25), ("uda_mask_rate", f64::NAN)];
            let stop = coordinator
                .progress(worker, &task, 1, report(step, 1.5, &metrics), now)
                .expect("progress");
            assert_eq!(stop, None);
        }
        coordinator
            .complete(
                &b,
                &task,
                1,
                TaskOutcome::Failed("out of memory".into()),
                now,
            )
            .expect("complete");
        // Rank 0's attempt is over: its late report is not kept.
        let stop = coordinator
            .progress(&a, &task, 1, report(30, 1.0, &[]), now)
            .expect("progress");
        assert!(stop.is_some());

        let path = dir.path().join(metrics::FILE_NAME);
        let rows = |path: &Path| -> Vec<serde_json::Value> {
            std::fs::read_to_string(path)
                .expect("metrics file")
                .lines()
                .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
                .collect()
        };
        let written = rows(&path);
        let summary: Vec<(String, String, Option<u64>)> = written
            .iter()
            .map(|row| {
                (
                    row["event"].as_str().expect("event").to_string(),
                    row["worker"].as_str().expect("worker").to_string(),
                    row["step"].as_u64(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("progress".to_string(), a.0.clone(), Some(10)),
                ("progress".to_string(), a.0.clone(), Some(20)),
                ("failed".to_string(), b.0.clone(), None),
            ]
        );
        let progress = &written[1];
        assert_eq!(progress["run_id"], coordinator.state.run_id.as_str());
        assert_eq!(progress["task"], task.0.as_str());
        assert_eq!(progress["kind"], "train teacher");
        assert_eq!(
            (progress["round"].as_u64(), progress["attempt"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(progress["world_size"], 2);
        assert_eq!(progress["loss"], 1.5);
        assert_eq!(progress["images_per_second"], 50.0);
        assert_eq!(progress["metrics"]["h"], 0.25);
        assert!(
            progress["metrics"]["uda_mask_rate"].is_null(),
            "NaN is written as null"
        );
        assert!(progress["time"].as_f64().expect("time") > 1.7e9);
        assert_eq!(written[2]["error"], "out of memory");

        // A restarted coordinator goes on after the lines already there, ending a line cut
        // short first.
        drop(coordinator);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("metrics file");
        std::io::Write::write_all(&mut file, b"{\"event\": \"progr").expect("half a line");
        let mut coordinator = self::coordinator(dir.path());
        let c = coordinator.register("c".into(), "cpu".into(), 0, now);
        coordinator.register("d".into(), "cpu".into(), 0, now);
        let TaskReply::Task(again) = coordinator.get_task(&c, now).expect("task") else {
            panic!("no task")
        };
        coordinator
            .progress(
                &c,
                &again.task.id,
                again.task.attempts,
                report(5, 2.0, &[]),
                now,
            )
            .expect("progress");
        let text = std::fs::read_to_string(&path).expect("metrics file");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[3], "{\"event\": \"progr");
        let last: serde_json::Value = serde_json::from_str(lines[4]).expect("a whole line");
        assert_eq!(last["worker"], c.0.as_str());
    }

    #[test]
    fn a_second_coordinator_on_the_same_run_directory_is_refused_while_the_first_lives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut first = coordinator(dir.path());
        // Held, not yet listening: no address to ask.
        assert_eq!(
            lock::RunLock::holder(dir.path()).expect("lock"),
            lock::Holder::Starting
        );
        first
            .announce("http://127.0.0.1:4242")
            .expect("announce the address");
        assert_eq!(
            lock::RunLock::holder(dir.path()).expect("lock"),
            lock::Holder::Listening("http://127.0.0.1:4242".to_string())
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("coordinator.addr")).expect("address file"),
            "http://127.0.0.1:4242\n"
        );
        let held = lock::RunLock::check_free(dir.path())
            .expect_err("the check sees the held lock")
            .to_string();
        assert!(held.contains("is in use by another coordinator"), "{held}");
        let plan = Plan::from_toml_str(TINY).expect("tiny plan");
        let error = Coordinator::open(plan.clone(), dir.path())
            .err()
            .expect("refused while the first coordinator holds the directory")
            .to_string();
        let pid = std::process::id();
        assert!(
            error.contains("is in use by another coordinator")
                && error.contains(&format!("pid {pid}"))
                && error.contains("listening at http://127.0.0.1:4242"),
            "{error}"
        );
        let state = std::fs::read_to_string(dir.path().join("state.json")).expect("state");
        drop(first);
        lock::RunLock::check_free(dir.path()).expect("free once the first one is gone");
        assert_eq!(
            lock::RunLock::holder(dir.path()).expect("lock"),
            lock::Holder::None
        );
        // The first one's state is untouched by the refused one, and the directory is free again.
        let again = Coordinator::open(plan, dir.path()).expect("the directory is free again");
        assert_eq!(serde_json::to_string(&again.state).expect("json"), state);
    }

    #[test]
    fn status_names_each_process_and_calls_a_worker_not_heard_from_silent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut coordinator = coordinator(dir.path());
        let now = Instant::now();
        let earlier = now.checked_sub(Duration::from_secs(5)).expect("5 s ago");
        coordinator.register("a".into(), "cpu".into(), 4242, now);
        coordinator.register("b".into(), "cpu".into(), 77, earlier);
        let status = crate::service::status_of(&coordinator);
        assert_eq!(status.min_workers, 2);
        let shown: Vec<(u32, &str)> = status
            .workers
            .iter()
            .map(|w| (w.pid, w.state.as_str()))
            .collect();
        assert_eq!(shown, vec![(4242, "active"), (77, "silent")]);
        assert!(status.workers[1].seconds_since_heard >= 5.0);
    }

    #[test]
    fn a_run_that_cannot_start_leaves_no_directory_it_made() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut plan = Plan::from_toml_str(TINY).expect("tiny plan");
        plan.data.dir = dir.path().join("no-data-here");
        let fresh = dir.path().join("runs/fresh");
        let error = Coordinator::open(plan.clone(), &fresh)
            .err()
            .expect("no data set");
        assert!(matches!(error, CoordinatorError::Data(_)), "{error}");
        assert!(!fresh.exists(), "the run directory it made is left behind");
        // A directory that was there before stays, with what it holds.
        let existing = dir.path().join("existing");
        std::fs::create_dir_all(&existing).expect("dir");
        std::fs::write(existing.join("notes.txt"), "mine").expect("file");
        Coordinator::open(plan, &existing)
            .err()
            .expect("no data set");
        assert_eq!(
            std::fs::read_to_string(existing.join("notes.txt")).expect("kept"),
            "mine"
        );
    }

    /// Labels every shard of the one-worker tiny run's first round as a labeler does: the shard
    /// committed to the store, its histogram reported.
    fn label_every_shard(coordinator: &mut Coordinator, a: &WorkerId, now: Instant) {
        let plan = coordinator.plan.clone();
        let (classes, min_confidence) = (
            plan.data.classes as usize,
            plan.pseudo_labels.min_confidence as f32,
        );
        while coordinator.state.phase == Phase::Label {
            let assignment = next_label_task(coordinator, a, now);
            let TaskSpec::Label {
                shard_index,
                start,
                end,
                ..
            } = assignment.task.spec
            else {
                unreachable!()
            };
            let top_k = plan.top_k() as usize;
            let rows = (start..end).map(|id| id as i64).collect::<Vec<_>>();
            let class_ids = rows
                .iter()
                .flat_map(|&id| (0..top_k).map(move |k| ((id as usize + k) % classes) as u16))
                .collect();
            let probs = rows
                .iter()
                .flat_map(|&id| {
                    let top = 0.4 + (id % 60) as f32 / 100.0;
                    (0..top_k).map(move |k| if k == 0 { top } else { (1.0 - top) / 4.0 })
                })
                .collect();
            let labels =
                mentor_labels::SoftLabels::new(top_k, rows, class_ids, probs).expect("labels");
            let header = mentor_labels::ShardHeader {
                round: 1,
                teacher_checkpoint: "teacher".into(),
                temperature: plan.pseudo_labels.temperature,
                classes: plan.data.classes,
            };
            let bytes = mentor_labels::encode_shard(&header, &labels).expect("encode");
            let key = mentor_labels::shard_key(1, shard_index);
            coordinator
                .store
                .put(&key, &bytes)
                .expect("commit the shard");
            let shard = state::ShardRecord {
                index: shard_index,
                key,
                examples: labels.len() as u64,
                sha256: mentor_labels::sha256_hex(&bytes),
                bytes: bytes.len() as u64,
                histogram: Some(mentor_labels::shard_histogram(
                    &labels,
                    classes,
                    min_confidence,
                )),
            };
            coordinator
                .complete(
                    a,
                    &assignment.task.id,
                    assignment.task.attempts,
                    TaskOutcome::Labeled(shard),
                    now,
                )
                .expect("complete");
        }
        assert_eq!(coordinator.state.phase, Phase::Filter);
    }

    /// Runs the round's filter as the service does; the examples kept and the selection file.
    fn filter_now(coordinator: &Coordinator) -> (u64, Vec<u8>) {
        let path = coordinator.state.paths.selection(1);
        let kept = filter::filter_round(
            &coordinator.plan,
            coordinator.state.current_round(),
            &coordinator.state.paths,
            &coordinator.store,
            &path,
        )
        .expect("filter");
        (kept, std::fs::read(&path).expect("selection"))
    }

    /// `state.json`, rewritten at every change of a run, carries no shard's histogram: each is
    /// written once to a file of its own, which the filter reads; one missing or damaged is
    /// counted again from its shard, to the same selection; a state written before (histograms
    /// inside) gives them their files when the run resumes.
    #[test]
    fn shard_histograms_live_in_files_of_their_own_not_in_the_state_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let (mut coordinator, a, teacher) = one_worker_with_a_teacher_task(dir.path(), start);
        complete_trained(&mut coordinator, &a, &teacher, dir.path(), start);
        label_every_shard(&mut coordinator, &a, start);
        let paths = coordinator.state.paths.clone();
        let store = coordinator.store.clone();
        let shards = coordinator.state.current_round().shards.clone();
        assert_eq!(shards.len(), 4, "the tiny plan's shards");
        let state_file = std::fs::read_to_string(paths.state_file()).expect("state");
        assert!(
            !state_file.contains("histogram") && !state_file.contains("nonzero"),
            "the state file carries histograms"
        );
        for shard in &shards {
            assert_eq!(shard.histogram, None, "kept in memory: {shard:?}");
            assert!(paths.histogram(1, shard.index).exists(), "{shard:?}");
        }

        // The filter from the histogram files, no label read (the shards' files are damaged
        // meanwhile); the manifest lists each shard's histogram, the selection (every student
        // reads it) none.
        let committed: Vec<Vec<u8>> = shards
            .iter()
            .map(|shard| store.get(&shard.key).expect("shard"))
            .collect();
        for shard in &shards {
            store.put(&shard.key, b"not a shard").expect("damage");
        }
        let (kept, selection) = filter_now(&coordinator);
        for (shard, bytes) in shards.iter().zip(&committed) {
            store.put(&shard.key, bytes).expect("restore");
        }
        assert!(kept > 0);
        let manifest_key = mentor_labels::manifest_key(1);
        let manifest = mentor_labels::Manifest::from_json(
            &manifest_key,
            &coordinator.store.get(&manifest_key).expect("manifest"),
        )
        .expect("manifest");
        for shard in &manifest.shards {
            let histogram = shard.histogram.as_ref().expect("the shard's histogram");
            assert_eq!(histogram.total(), shard.examples, "{}", shard.key);
        }
        let file = mentor_labels::SelectionFile::from_json("selection", &selection).expect("read");
        assert!(file.shards.iter().all(|shard| shard.histogram.is_none()));

        // One histogram file damaged, one of another shard's labels, one gone: after a restart
        // the filter counts those shards again and decides the same.
        drop(coordinator);
        std::fs::write(paths.histogram(1, 0), b"{ cut short").expect("damage");
        std::fs::copy(paths.histogram(1, 2), paths.histogram(1, 1)).expect("swap");
        std::fs::remove_file(paths.histogram(1, 3)).expect("remove");
        let coordinator = Coordinator::open(one_worker_plan(), dir.path()).expect("resume");
        assert_eq!(filter_now(&coordinator), (kept, selection.clone()));

        // A state file of an earlier version, histograms inside and no histogram files.
        drop(coordinator);
        let mut old: serde_json::Value = serde_json::from_str(&state_file).expect("json");
        let plan = one_worker_plan();
        for (i, shard) in shards.iter().enumerate() {
            let (_, labels) =
                mentor_labels::read_shard(&store, &shard.key, Some(&shard.sha256)).expect("read");
            let histogram = mentor_labels::shard_histogram(
                &labels,
                plan.data.classes as usize,
                plan.pseudo_labels.min_confidence as f32,
            );
            old["rounds"][0]["shards"][i]["histogram"] =
                serde_json::to_value(&histogram).expect("histogram");
        }
        std::fs::remove_dir_all(dir.path().join("histograms")).expect("remove");
        std::fs::write(paths.state_file(), serde_json::to_vec(&old).expect("json")).expect("write");
        let coordinator = Coordinator::open(one_worker_plan(), dir.path()).expect("resume");
        for shard in &shards {
            assert!(paths.histogram(1, shard.index).exists(), "{shard:?}");
        }
        let state_file = std::fs::read_to_string(paths.state_file()).expect("state");
        assert!(
            !state_file.contains("histogram"),
            "the old histograms stayed"
        );
        assert_eq!(filter_now(&coordinator), (kept, selection));
    }
}
