//! The gRPC edge: converts protocol messages into domain calls on [`Coordinator`] and back.
//!
//! Nothing below this module sees a tonic or prost type. The coordinator lock is a plain mutex
//! that is never held across an `.await`; the global filter runs on a blocking thread.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mentor_plan::{Role, WorkersPlan};
use mentor_proto::coordinator::v1 as pb;
use pb::status_service_server::{StatusService, StatusServiceServer};
use pb::worker_service_server::{WorkerService, WorkerServiceServer};
use tonic::{Request, Response, Status};

use crate::state::{
    Assignment, Effect, ModelRef, ShardRecord, TaskId, TaskOutcome, TaskSpec, WorkerId,
};
use crate::{Coordinator, CoordinatorError, Progress, TaskReply, HEARTBEAT_INTERVAL};

/// The coordinator shared by both services and the background loops.
pub type Shared = Arc<Mutex<Coordinator>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Coordinator> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The one place where coordinator errors become gRPC status codes.
fn to_status(error: CoordinatorError) -> Status {
    match error {
        CoordinatorError::UnknownWorker(_) => Status::not_found(error.to_string()),
        CoordinatorError::InvalidRequest(_) => Status::invalid_argument(error.to_string()),
        _ => Status::internal(error.to_string()),
    }
}

fn role_to_proto(role: Role) -> i32 {
    match role {
        Role::Teacher => pb::ModelRole::Teacher as i32,
        Role::Student => pb::ModelRole::Student as i32,
    }
}

fn task_to_proto(assignment: &Assignment, storage: &str, workers: &WorkersPlan) -> pb::Task {
    let task = &assignment.task;
    let path = |p: &std::path::Path| p.display().to_string();
    // Training writes to files of its attempt; the coordinator moves them into place when it
    // takes the attempt's result (`publish_outputs`).
    let attempt_file = |p: &std::path::Path| path(&crate::attempt_output(p, task.attempts));
    // Every training task carries the group timeouts of the run as it is now.
    let train = pb::TrainTask {
        world_size: task.world_size,
        rank: assignment.rank,
        join_timeout_seconds: workers.join_timeout_seconds,
        collective_timeout_seconds: workers.collective_timeout_seconds,
        ..pb::TrainTask::default()
    };
    let kind = match &task.spec {
        TaskSpec::Train {
            role,
            output,
            selection,
        } => pb::task::Kind::Train(pb::TrainTask {
            role: role_to_proto(*role),
            output_checkpoint: attempt_file(output),
            selection_path: selection.as_deref().map(path).unwrap_or_default(),
            ..train
        }),
        TaskSpec::TrainMpl {
            teacher_output,
            student_output,
        } => pb::task::Kind::Train(pb::TrainTask {
            role: role_to_proto(Role::Student),
            output_checkpoint: attempt_file(student_output),
            teacher_output: attempt_file(teacher_output),
            mode: pb::TrainMode::MetaPseudoLabels as i32,
            ..train.clone()
        }),
        TaskSpec::Finetune { init, output } => pb::task::Kind::Train(pb::TrainTask {
            role: role_to_proto(Role::Student),
            output_checkpoint: attempt_file(output),
            init_checkpoint: path(init),
            mode: pb::TrainMode::Finetune as i32,
            ..train.clone()
        }),
        TaskSpec::Label {
            teacher,
            shard_index,
            start,
            end,
            teacher_was,
        } => pb::task::Kind::Label(pb::LabelTask {
            teacher_checkpoint: path(&teacher.checkpoint),
            teacher_role: role_to_proto(teacher.role),
            teacher_round: teacher.model_round,
            shard_index: *shard_index,
            start: *start,
            end: *end,
            storage: storage.to_string(),
            previous_teacher_checkpoints: teacher_was.iter().map(|was| path(was)).collect(),
        }),
        TaskSpec::Evaluate {
            model:
                ModelRef {
                    checkpoint,
                    role,
                    model_round,
                },
        } => pb::task::Kind::Evaluate(pb::EvaluateTask {
            checkpoint: path(checkpoint),
            role: role_to_proto(*role),
            model_round: *model_round,
        }),
    };
    pb::Task {
        task_id: task.id.0.clone(),
        round: task.round,
        attempt: task.attempts,
        kind: Some(kind),
    }
}

fn outcome_from_proto(
    outcome: Option<pb::task_result::Outcome>,
    group_failure: bool,
) -> Result<TaskOutcome, CoordinatorError> {
    use pb::task_result::Outcome;
    match outcome {
        Some(Outcome::Train(train)) => Ok(TaskOutcome::Trained {
            checkpoint: train.checkpoint.into(),
            final_loss: train.final_loss,
        }),
        Some(Outcome::Label(label)) => {
            let classes = label.histogram_passing.len();
            let histogram = (classes > 0).then_some(mentor_labels::Histogram {
                classes,
                bins: label.histogram_bins,
                passing: label.histogram_passing,
                min_confidence: label.min_confidence as f32,
                undecodable: label.histogram_undecodable,
            });
            if let Some(histogram) = &histogram {
                if histogram.bins.len() != classes * mentor_labels::CONFIDENCE_BINS {
                    return Err(CoordinatorError::InvalidRequest(format!(
                        "label histogram has {} bins for {classes} classes",
                        histogram.bins.len()
                    )));
                }
            }
            Ok(TaskOutcome::Labeled(ShardRecord {
                index: 0,
                key: label.shard_path,
                examples: label.examples,
                sha256: label.sha256,
                bytes: label.bytes,
                histogram,
            }))
        }
        Some(Outcome::Evaluate(eval)) => Ok(TaskOutcome::Evaluated {
            accuracy: eval.accuracy,
            loss: eval.loss,
        }),
        Some(Outcome::Error(error)) if group_failure => Ok(TaskOutcome::GroupFailed(error)),
        Some(Outcome::Error(error)) => Ok(TaskOutcome::Failed(error)),
        None => Err(CoordinatorError::InvalidRequest(
            "task result has no outcome".into(),
        )),
    }
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

/// Carries out effects that need I/O (the global filter) off the async threads.
fn spawn_effects(shared: &Shared, effects: Vec<Effect>) {
    for effect in effects {
        if let Effect::Filter { round, selection } = effect {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || {
                let (plan, record, paths, store) = {
                    let coordinator = lock(&shared);
                    (
                        coordinator.plan.clone(),
                        coordinator.state.current_round().clone(),
                        coordinator.state.paths.clone(),
                        coordinator.store.clone(),
                    )
                };
                let result = with_retries(&FILTER_RETRY_WAITS, round, || {
                    crate::filter::filter_round(&plan, &record, &paths, &store, &selection)
                })
                .map(|kept| (kept, selection));
                let more = lock(&shared).filter_finished(round, result);
                spawn_effects(&shared, more);
            });
        }
    }
}

/// The waits before the filter's second and third tries: an object store or a network file
/// system that fails a write for a moment does not fail a run that labeled for hours. (Short
/// enough for a coordinator stopped meanwhile to end within a scheduler's grace period.)
const FILTER_RETRY_WAITS: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(10)];

/// `step` (round `round`'s filter), tried again after each of `waits` while it fails; the last
/// error otherwise.
fn with_retries<T>(
    waits: &[Duration],
    round: u32,
    mut step: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let mut waits = waits.iter();
    loop {
        match step() {
            Ok(value) => return Ok(value),
            Err(error) => match waits.next() {
                Some(wait) => {
                    tracing::warn!(round, %error, retry_in_seconds = wait.as_secs_f64(), "the filter failed: it runs again");
                    std::thread::sleep(*wait);
                }
                None => return Err(error),
            },
        }
    }
}

/// Resumes an interrupted filter step after a restart.
pub fn resume_effects(shared: &Shared) {
    let effects = {
        let coordinator = lock(shared);
        let state = &coordinator.state;
        if state.phase == crate::state::Phase::Filter && !state.is_finished() {
            vec![Effect::Filter {
                round: state.round,
                selection: state.paths.selection(state.round),
            }]
        } else {
            Vec::new()
        }
    };
    spawn_effects(shared, effects);
}

/// The worker-facing service.
pub struct WorkerApi {
    shared: Shared,
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let request = request.into_inner();
        if request.device.is_empty() {
            return Err(Status::invalid_argument("device must not be empty"));
        }
        let mut coordinator = lock(&self.shared);
        let now = Instant::now();
        if let Some(other) =
            coordinator.gpu_taken(&request.hostname, &request.gpu, &request.instance)
        {
            return Err(Status::already_exists(format!(
                "the GPU {} of host {} ({}) is worker {}'s already (process {}, {}): one worker a GPU (NCCL refuses two ranks on one GPU); give this worker another --device, or stop the other",
                request.gpu, request.hostname, request.device, other.id, other.pid, other.device
            )));
        }
        let gpu = request.gpu;
        let id = coordinator.register_instance(
            request.hostname,
            request.device,
            request.pid,
            request.instance,
            now,
        );
        coordinator.set_gpu(&id, gpu);
        let running_kept = request.running.is_some_and(|running| {
            let task = TaskId(running.task_id);
            coordinator.resume_running(&id, &task, running.attempt, running.rank, now)
        });
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id.0,
            run_id: coordinator.state.run_id.clone(),
            plan_toml: coordinator.state.plan_toml.clone(),
            run_dir: coordinator.state.paths.run_dir.display().to_string(),
            heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
            unlabeled_fingerprint: coordinator
                .state
                .unlabeled_fingerprint
                .clone()
                .unwrap_or_default(),
            running_kept,
        }))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::Ack>, Status> {
        let request = request.into_inner();
        let reason = match request.reason.is_empty() {
            true => "no reason given",
            false => &request.reason,
        };
        lock(&self.shared).leave(&WorkerId(request.worker_id), reason);
        Ok(Response::new(pb::Ack {}))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let id = WorkerId(request.into_inner().worker_id);
        let known = lock(&self.shared).heartbeat(&id, Instant::now());
        Ok(Response::new(pb::HeartbeatResponse { known }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let id = WorkerId(request.into_inner().worker_id);
        let mut coordinator = lock(&self.shared);
        let reply = coordinator
            .get_task(&id, Instant::now())
            .map_err(to_status)?;
        let reply = match reply {
            TaskReply::Task(task) => pb::get_task_response::Reply::Task(task_to_proto(
                &task,
                &coordinator.storage_root(),
                &coordinator.plan.workers,
            )),
            TaskReply::RetryAfter(wait) => {
                pb::get_task_response::Reply::RetryAfterMs(wait.as_millis() as u64)
            }
            TaskReply::Shutdown => pb::get_task_response::Reply::Shutdown(true),
        };
        Ok(Response::new(pb::GetTaskResponse { reply: Some(reply) }))
    }

    async fn report_progress(
        &self,
        request: Request<pb::ProgressReport>,
    ) -> Result<Response<pb::ProgressReply>, Status> {
        let report = request.into_inner();
        let progress = Progress {
            step: report.step,
            total_steps: report.total_steps,
            loss: finite(report.loss),
            accuracy: finite(report.accuracy),
            images_per_second: report.images_per_second,
            metrics: report.metrics,
        };
        let stop = lock(&self.shared)
            .progress(
                &WorkerId(report.worker_id),
                &TaskId(report.task_id),
                report.attempt,
                progress,
                Instant::now(),
            )
            .map_err(to_status)?;
        Ok(Response::new(pb::ProgressReply {
            stop: stop.is_some(),
            reason: stop.unwrap_or_default(),
        }))
    }

    async fn complete_task(
        &self,
        request: Request<pb::TaskResult>,
    ) -> Result<Response<pb::Ack>, Status> {
        let result = request.into_inner();
        let mut outcome =
            outcome_from_proto(result.outcome, result.group_failure).map_err(to_status)?;
        let task_id = TaskId(result.task_id);
        let effects = {
            let mut coordinator = lock(&self.shared);
            if let TaskOutcome::Labeled(shard) = &mut outcome {
                match coordinator.state.tasks.get(&task_id).map(|t| &t.spec) {
                    Some(TaskSpec::Label { shard_index, .. }) => shard.index = *shard_index,
                    Some(_) => {
                        return Err(Status::invalid_argument(format!(
                            "task `{task_id}` is not a labeling task"
                        )))
                    }
                    // A late result of a finished round's task (a labeler whose lease ran out
                    // reporting after its round ended; the round's tasks are no longer kept):
                    // its shard was labeled by another, and the result changes nothing.
                    None => {
                        tracing::info!(worker = %result.worker_id, task = %task_id, attempt = result.attempt, "a labeling result for a task of a finished round is ignored");
                        return Ok(Response::new(pb::Ack {}));
                    }
                }
            }
            coordinator
                .complete(
                    &WorkerId(result.worker_id),
                    &task_id,
                    result.attempt,
                    outcome,
                    Instant::now(),
                )
                .map_err(to_status)?
        };
        spawn_effects(&self.shared, effects);
        Ok(Response::new(pb::Ack {}))
    }

    async fn join_group(
        &self,
        request: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::GroupStatus>, Status> {
        let request = request.into_inner();
        let view = lock(&self.shared)
            .join_group(
                &WorkerId(request.worker_id),
                crate::GroupJoin {
                    task: TaskId(request.task_id),
                    attempt: request.attempt,
                    rank: request.rank,
                    address: request.address,
                    nccl_unique_id: request.nccl_unique_id,
                },
                Instant::now(),
            )
            .map_err(to_status)?;
        Ok(Response::new(group_to_proto(view)))
    }

    async fn get_group(
        &self,
        request: Request<pb::GetGroupRequest>,
    ) -> Result<Response<pb::GroupStatus>, Status> {
        let request = request.into_inner();
        let view = lock(&self.shared)
            .get_group(
                &WorkerId(request.worker_id),
                &TaskId(request.task_id),
                request.attempt,
                Instant::now(),
            )
            .map_err(to_status)?;
        Ok(Response::new(group_to_proto(view)))
    }
}

fn group_to_proto(view: crate::GroupView) -> pb::GroupStatus {
    pb::GroupStatus {
        ready: view.ready,
        cancelled: view.cancelled,
        addresses: view.addresses,
        nccl_unique_id: view.nccl_unique_id,
        missing_ranks: view.missing_ranks,
    }
}

/// The user-facing status service.
pub struct StatusApi {
    shared: Shared,
}

/// Builds the status message from the coordinator.
pub fn status_of(coordinator: &Coordinator) -> pb::RunStatus {
    let state = &coordinator.state;
    let workers = coordinator
        .workers
        .values()
        .map(|worker| {
            // The worker's task while the worker is one of its current attempt's (a rank of a
            // failed group that has not been heard of since keeps it until then).
            let task = worker
                .task
                .as_ref()
                .and_then(|id| state.tasks.get(id))
                .filter(|t| t.workers().contains(&worker.id));
            let progress = match task {
                Some(_) => worker.progress.clone(),
                None => crate::Progress::default(),
            };
            let silent = worker.last_seen.elapsed();
            pb::WorkerStatus {
                worker_id: worker.id.0.clone(),
                device: worker.device.clone(),
                hostname: worker.hostname.clone(),
                alive: worker.alive,
                task_id: task.map(|t| t.id.0.clone()).unwrap_or_default(),
                task: task
                    .map(|t| match t.workers().iter().position(|w| *w == worker.id) {
                        Some(rank) if t.world_size > 1 => {
                            format!("{} (rank {rank}/{})", t.spec.describe(), t.world_size)
                        }
                        _ => t.spec.describe(),
                    })
                    .unwrap_or_default(),
                step: progress.step,
                total_steps: progress.total_steps,
                loss: progress.loss.unwrap_or(f64::NAN),
                images_per_second: progress.images_per_second,
                seconds_left: task.and(worker.seconds_left()),
                pid: worker.pid,
                gpu: worker.gpu.clone(),
                seconds_since_heard: silent.as_secs_f64(),
                seconds_since_progress: task
                    .map_or(0.0, |_| worker.progress_at.elapsed().as_secs_f64()),
                state: if worker.alive && silent > crate::HEARD_RECENTLY {
                    "silent"
                } else if worker.alive && worker.suspect {
                    "suspected"
                } else if worker.alive {
                    "active"
                } else if worker.exited {
                    "exited"
                } else {
                    "lost"
                }
                .to_string(),
                metrics: progress.metrics,
            }
        })
        .collect();
    let mut status = pb::RunStatus {
        workers,
        latest_loss: coordinator.latest_loss.unwrap_or(f64::NAN),
        latest_accuracy: coordinator.latest_accuracy.unwrap_or(f64::NAN),
        elapsed_seconds: state.elapsed_seconds(),
        ..run_status(
            state,
            &coordinator.plan.name,
            coordinator.plan.method.as_str(),
            coordinator.plan.workers.min_workers,
        )
    };
    if coordinator.regathering() {
        status.phase = crate::state::Phase::WaitingForWorkers.as_str().to_string();
    }
    status.waiting = coordinator
        .waiting(std::time::Instant::now())
        .unwrap_or_default();
    status
}

/// What the run's state says, without the live parts (workers, latest loss and accuracy, the
/// coordinator's elapsed time: empty or NaN).
fn run_status(
    state: &crate::state::RunState,
    name: &str,
    method: &str,
    min_workers: u32,
) -> pb::RunStatus {
    let (tasks_done, tasks_total) = state.task_counts();
    let rounds = state
        .rounds
        .iter()
        .map(|round| pb::RoundStatus {
            round: round.round,
            teacher_test_accuracy: round.teacher_test_accuracy,
            student_test_accuracy: round.student_test_accuracy,
            shards: round.shards_total,
            examples: round.examples,
            kept: round.kept,
            shards_done: round.shards.len() as u32,
            finetuned_student_test_accuracy: round.finetuned_student_test_accuracy,
        })
        .collect();
    pb::RunStatus {
        run_id: state.run_id.clone(),
        name: name.to_string(),
        method: method.to_string(),
        status: state.outcome.as_str().to_string(),
        round: state.round,
        total_rounds: state.total_rounds,
        phase: state.phase.as_str().to_string(),
        error: match &state.outcome {
            crate::state::RunOutcome::Failed(message) => message.clone(),
            _ => String::new(),
        },
        workers: Vec::new(),
        rounds,
        latest_loss: f64::NAN,
        latest_accuracy: f64::NAN,
        elapsed_seconds: f64::NAN,
        tasks_done,
        tasks_total,
        run_dir: state.paths.run_dir.display().to_string(),
        min_workers,
        waiting: String::new(),
        final_student_checkpoint: state
            .rounds
            .last()
            .and_then(|round| round.finetuned.as_ref().or(round.student.as_ref()))
            .map(|model| model.checkpoint.display().to_string())
            .unwrap_or_default(),
        // The same model's accuracy, by the same rule.
        final_student_test_accuracy: state.rounds.last().and_then(|round| {
            match (&round.finetuned, &round.student) {
                (Some(_), _) => round.finetuned_student_test_accuracy,
                (None, Some(_)) => round.student_test_accuracy,
                (None, None) => None,
            }
        }),
    }
}

/// The status a run directory's `state.json` records, for when no coordinator serves it: the
/// status of an unfinished run is [`STOPPED`] (its coordinator is gone; starting one on the
/// directory resumes it). Paths follow a directory moved since its last save.
pub fn saved_status(run_dir: &std::path::Path) -> Result<pb::RunStatus, CoordinatorError> {
    let path = run_dir.join("state.json");
    let store_error = |reason: String| CoordinatorError::StateStore {
        path: path.clone(),
        reason,
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(store_error(
                "no run here (no state.json; is it the run directory a coordinator was given as --state-dir?)".into(),
            ))
        }
        Err(e) => return Err(store_error(e.to_string())),
    };
    let run_dir = run_dir
        .canonicalize()
        .map_err(|e| store_error(e.to_string()))?;
    let (state, _) = crate::state::RunState::from_saved(&text, &run_dir)
        .map_err(|e| store_error(format!("unreadable: {e}")))?;
    // Read, not validated: a plan recorded by another version (whose checks differ) still
    // names its run.
    let plan: toml::Table = toml::from_str(&state.plan_toml).unwrap_or_default();
    let text = |key: &str| {
        plan.get(key)
            .and_then(toml::Value::as_str)
            .unwrap_or_default()
    };
    let min_workers = plan
        .get("workers")
        .and_then(|workers| workers.get("min_workers"))
        .and_then(toml::Value::as_integer)
        .unwrap_or(1);
    let mut status = run_status(
        &state,
        text("name"),
        text("method"),
        u32::try_from(min_workers).unwrap_or(1),
    );
    if state.outcome == crate::state::RunOutcome::Running {
        status.status = STOPPED.to_string();
    } else if state.ended_at_ms.is_some() {
        status.elapsed_seconds = state.elapsed_seconds();
    }
    Ok(status)
}

/// The status of an unfinished run that no coordinator serves.
pub const STOPPED: &str = "stopped";

#[tonic::async_trait]
impl StatusService for StatusApi {
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::RunStatus>, Status> {
        Ok(Response::new(status_of(&lock(&self.shared))))
    }
}

/// Resolves once the run has ended and its workers have been told (each asks for a task and is
/// told to exit) or are gone; at the latest `grace` after the end, for a worker that neither
/// asks nor goes silent.
pub async fn run_ended(shared: Shared, grace: std::time::Duration) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(200));
    let mut ended_at = None;
    loop {
        ticks.tick().await;
        let coordinator = lock(&shared);
        if !coordinator.state.is_finished() {
            continue;
        }
        let ended = *ended_at.get_or_insert_with(Instant::now);
        if coordinator.released() || ended.elapsed() >= grace {
            return;
        }
    }
}

/// A reaper tick this much later than due means the coordinator stalled (see
/// [`Coordinator::pardon_stall`]); lock contention delays it by milliseconds.
const STALL: Duration = Duration::from_secs(1);

/// How long the coordinator stalled when the reaper, due one interval after its tick at
/// `last`, runs at `now`; `None` for a tick on time (or late by less than [`STALL`]).
fn stalled_for(last: Instant, now: Instant) -> Option<Duration> {
    let late = now
        .saturating_duration_since(last)
        .saturating_sub(HEARTBEAT_INTERVAL);
    (late > STALL).then_some(late)
}

/// Serves both services on `listener` until `shutdown` resolves; also runs the worker reaper.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let reaper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(HEARTBEAT_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = Instant::now();
            loop {
                ticks.tick().await;
                let mut coordinator = lock(&shared);
                // Read once the lock is held: a stall under it (or of the whole process)
                // shows as a late tick.
                let now = Instant::now();
                if let Some(stalled) = stalled_for(last, now) {
                    coordinator.pardon_stall(stalled, now);
                }
                coordinator.reap(now);
                last = now;
            }
        })
    };
    let saver = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(crate::SAVE_CHECK_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                lock(&shared).save_if_due(Instant::now());
            }
        })
    };
    resume_effects(&shared);
    let result = tonic::transport::Server::builder()
        .add_service(WorkerServiceServer::new(WorkerApi {
            shared: shared.clone(),
        }))
        .add_service(StatusServiceServer::new(StatusApi { shared }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    reaper.abort();
    saver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// A labeling result for a task the run no longer has (a finished round's, sent late by a
    /// labeler whose lease ran out) is acknowledged and changes nothing: an error would stop the
    /// worker. A result naming a task that is not a labeling task is refused.
    #[test]
    fn a_late_labeling_result_of_a_finished_round_is_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plan =
            mentor_plan::Plan::from_toml_str(include_str!("../../../deploy/plans/tiny.toml"))
                .expect("tiny plan");
        let mut coordinator = Coordinator::open(plan, dir.path()).expect("open");
        for host in ["a", "b"] {
            coordinator.register(host.into(), "cpu".into(), 0, Instant::now());
        }
        let saved = std::fs::read(dir.path().join("state.json")).expect("state");
        let api = WorkerApi {
            shared: Arc::new(Mutex::new(coordinator)),
        };
        let result = |task: &str| pb::TaskResult {
            worker_id: "w1-somewhere".into(),
            task_id: task.into(),
            attempt: 2,
            outcome: Some(pb::task_result::Outcome::Label(pb::LabelOutcome {
                shard_path: "round-1/shard-00003.safetensors".into(),
                examples: 100,
                sha256: "00".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime
            .block_on(api.complete_task(Request::new(result("r1-t0099"))))
            .expect("acknowledged");
        assert_eq!(
            std::fs::read(dir.path().join("state.json")).expect("state"),
            saved
        );
        let teacher = {
            let coordinator = lock(&api.shared);
            let task = coordinator
                .state
                .tasks
                .keys()
                .next()
                .expect("a task")
                .clone();
            task
        };
        let refused = runtime
            .block_on(api.complete_task(Request::new(result(&teacher.0))))
            .expect_err("not a labeling task");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_failed_filter_runs_again_before_it_fails_the_run() {
        let waits = [Duration::ZERO; 2];
        let mut tries = 0;
        let passed = with_retries(&waits, 1, || {
            tries += 1;
            if tries < 3 {
                Err(format!("the store is away ({tries})"))
            } else {
                Ok(tries)
            }
        });
        assert_eq!(passed, Ok(3));
        let mut tries = 0;
        let failed: Result<(), String> = with_retries(&waits, 1, || {
            tries += 1;
            Err(format!("the store is away ({tries})"))
        });
        assert_eq!(failed, Err("the store is away (3)".to_string()));
    }

    #[test]
    fn a_reaper_tick_seconds_late_is_a_stall() {
        let last = Instant::now();
        let on_time = last + HEARTBEAT_INTERVAL + Duration::from_millis(30);
        assert_eq!(stalled_for(last, on_time), None);
        let stopped = last + HEARTBEAT_INTERVAL + Duration::from_secs(40);
        assert_eq!(stalled_for(last, stopped), Some(Duration::from_secs(40)));
    }

    use crate::state::{ModelRef, RunState};

    /// The final student's accuracy is that of the final student's checkpoint: while a
    /// finetuned student waits for its evaluation, none (not the unfinetuned student's).
    #[test]
    fn the_final_accuracy_is_the_final_checkpoints() {
        let plan =
            mentor_plan::Plan::from_toml_str(include_str!("../../../deploy/plans/tiny-mpl.toml"))
                .expect("plan");
        let mut state = RunState::new("r".into(), &plan, Vec::new(), 0, Path::new("/runs/r"));
        let model = |name: &str| ModelRef {
            checkpoint: PathBuf::from(name),
            role: Role::Student,
            model_round: 1,
        };
        let status = |state: &RunState| run_status(state, "tiny", "meta-pseudo-labels", 1);
        assert_eq!(status(&state).final_student_test_accuracy, None);
        let round = &mut state.rounds[0];
        round.student = Some(model("student.safetensors"));
        round.student_test_accuracy = Some(0.8);
        assert_eq!(status(&state).final_student_test_accuracy, Some(0.8));
        let round = &mut state.rounds[0];
        round.finetuned = Some(model("finetuned.safetensors"));
        let waiting = status(&state);
        assert_eq!(waiting.final_student_checkpoint, "finetuned.safetensors");
        assert_eq!(waiting.final_student_test_accuracy, None);
        state.rounds[0].finetuned_student_test_accuracy = Some(0.82);
        assert_eq!(status(&state).final_student_test_accuracy, Some(0.82));
    }
}
