//! `worker`: registers with a coordinator, runs its tasks on a dedicated libtorch thread,
//! streams progress and reports results.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use mentor_collective::nccl::NcclLibrary;
use mentor_plan::{CollectiveKind, Plan, Role};
use mentor_proto::coordinator::v1 as pb;
use mentor_worker::cpu::CpuBfloat16;
use mentor_worker::dataset::Dataset;
use mentor_worker::distributed::{GroupJoin, GroupSetup};
use mentor_worker::memory::FreedMemory;
use mentor_worker::tasks::{run_task, ModelSource, Outcome, Progress, TaskError, TaskKind};
use pb::worker_service_client::WorkerServiceClient;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tonic::transport::Channel;
use tonic::Code;

/// Runs training, evaluation and pseudo-labelling tasks for a coordinator.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The coordinator's address, HOST:PORT or http://HOST:PORT (what the coordinator
    /// writes to <state-dir>/coordinator.addr).
    #[arg(long, value_parser = mentor_proto::coordinator_url)]
    coordinator: String,
    /// Device to run models on: `cpu`, `cuda` (`cuda:0`) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch intra-op threads (0 = libtorch's default).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=4096))]
    threads: i32,
    /// Give up if the coordinator cannot be reached for this long (at most a week).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    connect_timeout_seconds: u64,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = mentor_telemetry::LOG_FORMATS)]
    log_format: String,
    /// Host or IP other workers reach this one at (TCP ring of data-parallel groups).
    #[arg(long, default_value = "127.0.0.1")]
    advertise_host: String,
    /// On the CPU, keep the memory libtorch frees for reuse instead of returning it to the
    /// system (about 30% more images a second in a Meta Pseudo Labels training, for some 30%
    /// more peak memory); `false` leaves the C
    /// allocator as it is. Malloc settings in GLIBC_TUNABLES or MALLOC_* variables take
    /// precedence.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    keep_freed_memory: bool,
}

/// A task for the libtorch thread, with the channels it answers on.
struct Job {
    task: TaskKind,
    group: Option<GroupJoin>,
    progress: mpsc::UnboundedSender<Progress>,
    /// Set when the coordinator no longer counts this attempt as the worker's: the task stops
    /// at its next progress report.
    stop: Arc<AtomicBool>,
    done: oneshot::Sender<Result<Outcome, TaskError>>,
}

/// The unwinding payload that stops a task at a progress report (see [`Job::stop`]). Its
/// tensors, files and collective are dropped on the way out.
struct Stopped;

/// Whether this worker lists the unlabeled images as the coordinator did (an empty
/// `fingerprint`: a coordinator that does not say).
fn same_listing(plan: &Plan, dataset: &Dataset, fingerprint: &str) -> bool {
    let here = dataset.unlabeled.fingerprint(&plan.data);
    fingerprint.is_empty() || mentor_data::Source::same_fingerprint(fingerprint, &here)
}

/// Starts the thread that owns libtorch: it loads the data set once and runs jobs in order.
fn spawn_torch_thread(
    plan: Plan,
    device: tch::Device,
    threads: i32,
    unlabeled_fingerprint: String,
) -> anyhow::Result<std_mpsc::Sender<Job>> {
    let (sender, receiver) = std_mpsc::channel::<Job>();
    let (ready_sender, ready_receiver) = std_mpsc::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("libtorch".into())
        .spawn(move || {
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let dataset = match Dataset::load(&plan, device) {
                Ok(dataset) if !same_listing(&plan, &dataset, &unlabeled_fingerprint) => {
                    let _ = ready_sender.send(Err(format!(
                        "the unlabeled images at {} are not those the coordinator listed (listing {} here, {unlabeled_fingerprint} there): files added, removed or renamed since the run began, or another copy; example ids would name other images",
                        plan.data.unlabeled_place().display(),
                        dataset.unlabeled.fingerprint(&plan.data),
                    )));
                    return;
                }
                Ok(dataset) => {
                    let _ = ready_sender.send(Ok(()));
                    dataset
                }
                Err(error) => {
                    let _ = ready_sender.send(Err(error.to_string()));
                    return;
                }
            };
            for job in receiver {
                let progress = job.progress;
                let stop = job.stop;
                let task = job.task;
                let group = job.group;
                let result = mentor_worker::run_isolated(|| {
                    let mut report = |p: Progress| {
                        let _ = progress.send(p);
                        if stop.load(Ordering::Acquire) {
                            // Not a panic: no hook runs, nothing is printed.
                            std::panic::resume_unwind(Box::new(Stopped));
                        }
                    };
                    run_task(&plan, &dataset, &task, group, &mut report)
                })
                .unwrap_or_else(|panic| {
                    if panic.is::<Stopped>() {
                        return Err("stopped: the attempt is no longer this worker's".into());
                    }
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    // The status gets libtorch's message; the log keeps its C++ trace too.
                    tracing::error!(panic = %message, "the task panicked");
                    Err(TaskError::Own(format!(
                        "libtorch error: {}",
                        mentor_worker::libtorch_message(&message)
                    )))
                });
                let _ = job.done.send(result);
            }
        })
        .context("failed to start the libtorch thread")?;
    ready_receiver
        .recv()
        .context("the libtorch thread stopped while loading data")?
        .map_err(|e| anyhow::anyhow!("failed to load the data set: {e}"))?;
    Ok(sender)
}

fn role_from_proto(value: i32) -> anyhow::Result<Role> {
    match pb::ModelRole::try_from(value) {
        Ok(pb::ModelRole::Teacher) => Ok(Role::Teacher),
        Ok(pb::ModelRole::Student) => Ok(Role::Student),
        _ => anyhow::bail!("task names an unknown model role {value}"),
    }
}

fn task_from_proto(task: &pb::Task) -> anyhow::Result<TaskKind> {
    use pb::task::Kind;
    Ok(match task.kind.as_ref().context("task has no kind")? {
        Kind::Train(train) => match pb::TrainMode::try_from(train.mode) {
            Ok(pb::TrainMode::NoisyStudent) => TaskKind::Train {
                role: role_from_proto(train.role)?,
                round: task.round,
                output: PathBuf::from(&train.output_checkpoint),
                selection: (!train.selection_path.is_empty())
                    .then(|| PathBuf::from(&train.selection_path)),
            },
            Ok(pb::TrainMode::MetaPseudoLabels) => TaskKind::TrainMpl {
                teacher_output: PathBuf::from(&train.teacher_output),
                student_output: PathBuf::from(&train.output_checkpoint),
            },
            Ok(pb::TrainMode::Finetune) => TaskKind::Finetune {
                init: PathBuf::from(&train.init_checkpoint),
                output: PathBuf::from(&train.output_checkpoint),
            },
            Err(_) => anyhow::bail!("task names an unknown training mode {}", train.mode),
        },
        Kind::Evaluate(evaluate) => TaskKind::Evaluate {
            model: ModelSource {
                checkpoint: PathBuf::from(&evaluate.checkpoint),
                role: role_from_proto(evaluate.role)?,
                model_round: evaluate.model_round,
            },
        },
        Kind::Label(label) => TaskKind::Label {
            teacher: ModelSource {
                checkpoint: PathBuf::from(&label.teacher_checkpoint),
                role: role_from_proto(label.teacher_role)?,
                model_round: label.teacher_round,
            },
            round: task.round,
            shard_index: label.shard_index,
            start: label.start,
            end: label.end,
            storage: label.storage.clone(),
            previous_teachers: label.previous_teacher_checkpoints.clone(),
        },
    })
}

fn outcome_to_proto(result: Result<Outcome, TaskError>) -> pb::task_result::Outcome {
    use pb::task_result::Outcome as Proto;
    match result {
        Ok(Outcome::Trained {
            checkpoint,
            final_loss,
            steps,
            seconds,
        }) => Proto::Train(pb::TrainOutcome {
            checkpoint: checkpoint.display().to_string(),
            final_loss,
            steps,
            seconds,
        }),
        Ok(Outcome::Evaluated {
            accuracy,
            loss,
            examples,
        }) => Proto::Evaluate(pb::EvaluateOutcome {
            accuracy,
            loss,
            examples,
        }),
        Ok(Outcome::Labeled {
            key,
            examples,
            sha256,
            bytes,
            seconds,
            histogram,
        }) => Proto::Label(pb::LabelOutcome {
            shard_path: key,
            examples,
            sha256,
            bytes,
            seconds,
            histogram_bins: histogram.bins,
            histogram_passing: histogram.passing,
            min_confidence: histogram.min_confidence as f64,
            histogram_undecodable: histogram.undecodable,
        }),
        Err(error) => Proto::Error(error.to_string()),
    }
}

/// Ends the process at once with `code`, without the exit handlers `std::process::exit` runs:
/// libtorch's static destructors, run while the libtorch thread is in a task, kill the process
/// with a signal instead of the exit status a signal's handler promises.
#[allow(unsafe_code)]
fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` takes any status and does not return; skipping destructors and atexit
    // handlers is its point (nothing of this process needs flushing but the log, written
    // line by line).
    unsafe { libc::_exit(code) }
}

/// Waits for SIGTERM or Ctrl-C: the signal's name and the exit status a shell gives it.
async fn stopping_signal() -> (&'static str, i32) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(terminate) => terminate,
            Err(error) => {
                tracing::warn!(%error, "SIGTERM cannot be handled; Ctrl-C still can");
                let _ = tokio::signal::ctrl_c().await;
                return ("SIGINT", 130);
            }
        };
    tokio::select! {
        _ = terminate.recv() => ("SIGTERM", 143),
        _ = tokio::signal::ctrl_c() => ("SIGINT", 130),
    }
}

/// How long one call to the coordinator may take: every call is answered at once (the
/// rendezvous is polled), so a call that takes longer meets a coordinator that hangs or a
/// connection that died without a word, and is handled as an outage.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The PCI bus id of a CUDA device's GPU, for the coordinator to refuse a second worker on it;
/// empty for the CPU or when the CUDA runtime cannot tell.
fn gpu_of(device: tch::Device) -> String {
    let tch::Device::Cuda(index) = device else {
        return String::new();
    };
    match mentor_collective::cuda::pci_bus_id(index) {
        Ok(id) => id,
        Err(error) => {
            tracing::warn!(%error, "the GPU's PCI bus id is unknown: the coordinator cannot tell whether another worker uses this GPU");
            String::new()
        }
    }
}

/// Whether a failed call met the coordinator's absence (down, restarting, unreachable, too
/// slow), not its refusal: the call is worth trying again.
fn transient(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => true,
        // A connection closed under a call (a coordinator stopping) reads as an HTTP/2 error.
        Code::Internal => status.message().contains("h2 protocol error"),
        _ => false,
    }
}

async fn connect(address: &str, timeout: Duration) -> anyhow::Result<WorkerServiceClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(address.to_string())
        .with_context(|| format!("`{address}` is not a coordinator address"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        // A coordinator whose machine vanished is noticed in seconds, not after the minutes
        // of TCP retries a silent connection takes.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(Duration::from_secs(30)));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(WorkerServiceClient::new(channel)),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, "coordinator not reachable yet, retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!("failed to reach the coordinator at {address} within {timeout:?}")
                })
            }
        }
    }
}

/// The worker's link to the coordinator. It rides out coordinator restarts: while the
/// coordinator is unreachable calls are retried (up to the outage limit), and a coordinator
/// that no longer knows this worker (it restarted) gets a new registration.
struct Session {
    client: WorkerServiceClient<Channel>,
    registration: pb::RegisterRequest,
    worker_id: watch::Sender<String>,
    plan_toml: String,
    /// The coordinator's listing of the unlabeled images at the first registration (see
    /// `same_listing`): a coordinator met again must have the same one.
    unlabeled_fingerprint: String,
    outage_limit: Duration,
    /// The attempt whose work this worker runs, set by [`execute`] while the work goes on: a
    /// registration sent again names it, so that a restarted coordinator takes it back (once
    /// the work ended, its result is sent as such, taken only with its files).
    running: Option<pb::RunningAttempt>,
    /// Woken when a heartbeat finds this worker unknown to the coordinator.
    unknown: Arc<Notify>,
}

impl Session {
    fn id(&self) -> String {
        self.worker_id.borrow().clone()
    }

    /// Decides what to do after a failed call: `Ok` means try again.
    async fn recover(
        &mut self,
        status: tonic::Status,
        outage: &mut Option<Instant>,
        what: &str,
    ) -> anyhow::Result<()> {
        let limit = self.outage_limit;
        self.recover_within(status, outage, what, limit).await
    }

    /// [`Session::recover`], giving up after an outage of `limit`.
    async fn recover_within(
        &mut self,
        status: tonic::Status,
        outage: &mut Option<Instant>,
        what: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        match status.code() {
            Code::NotFound => {
                tracing::warn!(worker = %self.id(), "the coordinator no longer knows this worker (restarted?), registering again");
                self.register_again().await.map(drop)
            }
            _ if transient(&status) => {
                let started = *outage.get_or_insert_with(|| {
                    tracing::warn!(%status, "the coordinator is unreachable, retrying");
                    Instant::now()
                });
                if started.elapsed() > limit {
                    anyhow::bail!(
                        "failed to {what}: the coordinator was unreachable for {limit:?} ({status})"
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(())
            }
            _ => anyhow::bail!(
                "failed to {what}: the coordinator refused ({:?}): {}",
                status.code(),
                status.message()
            ),
        }
    }

    /// The coordinator no longer knows this worker (it restarted, or declared the worker lost)
    /// while it `what`: it registers again at once (a resumed run counts it), and the attempt
    /// of `task` is over; the error to report for it.
    async fn forgotten(&mut self, task: &str, what: &str) -> anyhow::Result<String> {
        tracing::warn!(worker = %self.id(), task, "the coordinator no longer knows this worker (restarted?), registering again");
        self.register_again().await?;
        Ok(format!(
            "this worker was unknown to the coordinator when it {what}"
        ))
    }

    /// Registers again under a new id, naming the attempt this worker runs, if any: whether
    /// the coordinator took that attempt back (the worker goes on with it) or not (it stops
    /// it: its result would be ignored).
    async fn register_again(&mut self) -> anyhow::Result<bool> {
        let mut outage = None;
        let registration = pb::RegisterRequest {
            running: self.running.clone(),
            ..self.registration.clone()
        };
        loop {
            match self.client.register(registration.clone()).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    // A resumed run may have changed where its data is and how it spreads
                    // over its workers; this worker goes on with what it loaded.
                    let same_run = match (
                        Plan::from_toml_str(&self.plan_toml),
                        Plan::from_toml_str(&reply.plan_toml),
                    ) {
                        (Ok(mine), Ok(now)) => mine.same_run_as(&now),
                        _ => false,
                    };
                    if reply.plan_toml != self.plan_toml && !same_run {
                        anyhow::bail!(
                            "the coordinator now runs another plan (run {}); this worker stops",
                            reply.run_id
                        );
                    }
                    let (then, now) = (&self.unlabeled_fingerprint, &reply.unlabeled_fingerprint);
                    let same = mentor_data::Source::same_fingerprint(then, now);
                    if !then.is_empty() && !now.is_empty() && !same {
                        anyhow::bail!(
                            "the coordinator now lists other unlabeled images (listing {now}, this worker's {then}; run {}): this worker's example ids would name other images; it stops",
                            reply.run_id
                        );
                    }
                    match &self.running {
                        Some(running) if reply.running_kept => {
                            tracing::info!(worker = %reply.worker_id, run = %reply.run_id, task = %running.task_id, attempt = running.attempt, "registered again; the coordinator took this worker's attempt back, it goes on")
                        }
                        _ => {
                            tracing::info!(worker = %reply.worker_id, run = %reply.run_id, "registered again")
                        }
                    }
                    self.worker_id.send_replace(reply.worker_id);
                    return Ok(reply.running_kept);
                }
                Err(status) if status.code() == Code::NotFound => {
                    anyhow::bail!("registration refused: {status}")
                }
                Err(status) => {
                    Box::pin(self.recover(status, &mut outage, "register again")).await?
                }
            }
        }
    }

    async fn get_task(&mut self) -> anyhow::Result<Option<pb::get_task_response::Reply>> {
        let mut outage = None;
        loop {
            let request = pb::GetTaskRequest {
                worker_id: self.id(),
            };
            match self.client.get_task(request).await {
                Ok(reply) => return Ok(reply.into_inner().reply),
                Err(status) => {
                    self.recover(status, &mut outage, "ask the coordinator for a task")
                        .await?
                }
            }
        }
    }

    async fn complete_task(
        &mut self,
        task_id: &str,
        attempt: u32,
        outcome: pb::task_result::Outcome,
        group_failure: bool,
    ) -> anyhow::Result<()> {
        let mut outage = None;
        loop {
            let result = pb::TaskResult {
                attempt,
                worker_id: self.id(),
                task_id: task_id.to_string(),
                outcome: Some(outcome.clone()),
                group_failure,
            };
            match self.client.complete_task(result).await {
                Ok(_) => return Ok(()),
                // The work is done: a coordinator restarting takes its result for longer than
                // the connection timeout, at least RESULT_OUTAGE_LIMIT (a worker gone, the task
                // would run again).
                Err(status) => {
                    let limit = self.outage_limit.max(RESULT_OUTAGE_LIMIT);
                    self.recover_within(status, &mut outage, "report a task result", limit)
                        .await?
                }
            }
        }
    }
}

/// How long a worker keeps sending a finished task's result to a coordinator it cannot reach,
/// at least (`--connect-timeout-seconds` when longer).
const RESULT_OUTAGE_LIMIT: Duration = Duration::from_secs(600);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = mentor_worker::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    // Before any thread starts: the allocator's settings hold for the threads made after them.
    let freed_memory = (device == tch::Device::Cpu && args.keep_freed_memory)
        .then(mentor_worker::memory::keep_freed_memory);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(args, device, freed_memory))
}

async fn run(
    args: Args,
    device: tch::Device,
    freed_memory: Option<FreedMemory>,
) -> anyhow::Result<()> {
    mentor_telemetry::init(&args.log_format);
    match freed_memory {
        Some(FreedMemory::Kept) => tracing::debug!("freed memory is kept for reuse"),
        Some(FreedMemory::LeftToEnvironment) => {
            tracing::info!("the allocator follows the malloc settings of the environment")
        }
        Some(FreedMemory::Refused) => tracing::info!(
            "the C library refused to keep freed memory for reuse: training runs as it allocates"
        ),
        None => {}
    }
    let outage_limit = Duration::from_secs(args.connect_timeout_seconds);
    let mut client = connect(&args.coordinator, outage_limit).await?;
    let on_loopback = mentor_proto::is_loopback_host;
    if on_loopback(&args.advertise_host) && !on_loopback(mentor_proto::host_of(&args.coordinator)) {
        tracing::warn!(advertise_host = %args.advertise_host, coordinator = %args.coordinator, "the coordinator is on another host, and this worker's ring address is on loopback: ranks on other hosts cannot reach it in a data-parallel group; set --advertise-host to an address they reach it at");
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let registration = pb::RegisterRequest {
        hostname,
        device: args.device.clone(),
        pid: std::process::id(),
        instance: format!("{:016x}", rand::random::<u64>()),
        running: None,
        gpu: gpu_of(device),
    };
    let deadline = Instant::now() + outage_limit;
    let reply = loop {
        match client.register(registration.clone()).await {
            Ok(reply) => break reply.into_inner(),
            // The same instance registers again if the coordinator took the first one.
            Err(status) if transient(&status) && Instant::now() < deadline => {
                tracing::debug!(%status, "registration failed, retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            // Another worker holds this GPU: this one's own first process, crashed and not yet
            // declared lost (the coordinator's heartbeat timeout), or a second worker started
            // on it by mistake, which waits and then stops with the coordinator's reason.
            Err(status) if status.code() == Code::AlreadyExists && Instant::now() < deadline => {
                tracing::warn!(reason = %status.message(), "the coordinator counts another worker on this GPU: registering again in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            // Refused (the coordinator says why) or unreachable past the deadline.
            Err(status) if transient(&status) => {
                return Err(status).context("registration with the coordinator failed");
            }
            Err(status) => {
                anyhow::bail!("the coordinator refused this worker: {}", status.message());
            }
        }
    };
    let plan = Plan::from_toml_str(&reply.plan_toml)
        .context("the coordinator sent a plan this worker cannot read")?;
    tracing::info!(worker = %reply.worker_id, run = %reply.run_id, device = %args.device, "registered");
    let bfloat16_roles = [Role::Teacher, Role::Student]
        .into_iter()
        .any(|role| !plan.role(role).precision.is_float32());
    if device == tch::Device::Cpu && bfloat16_roles {
        if let Some(warning) = CpuBfloat16::of_this_machine().and_then(CpuBfloat16::warning) {
            tracing::warn!(worker = %reply.worker_id, "{warning}");
        }
    }

    let (worker_id, worker_id_updates) = watch::channel(reply.worker_id.clone());
    let unknown = Arc::new(Notify::new());
    let mut session = Session {
        client: client.clone(),
        registration,
        worker_id,
        plan_toml: reply.plan_toml,
        unlabeled_fingerprint: reply.unlabeled_fingerprint.clone(),
        outage_limit,
        running: None,
        unknown: unknown.clone(),
    };

    // A worker stopped on purpose (SIGTERM from a scheduler or a preempted node, Ctrl-C) says
    // so before it exits: its task goes back to the queue at once, not after the heartbeat
    // timeout, and does not count as a lost attempt.
    {
        let mut client = client.clone();
        let worker_id = worker_id_updates.clone();
        tokio::spawn(async move {
            let (signal, code) = stopping_signal().await;
            tracing::warn!(
                signal,
                "stopping: telling the coordinator this worker leaves"
            );
            let leave = client.leave(pb::LeaveRequest {
                worker_id: worker_id.borrow().clone(),
                reason: signal.to_string(),
            });
            match tokio::time::timeout(Duration::from_secs(3), leave).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    tracing::warn!(%status, "the coordinator did not take the leave")
                }
                Err(_) => tracing::warn!("the coordinator did not answer the leave within 3 s"),
            }
            exit_now(code);
        });
    }

    // Heartbeats start before the data set loads (which can take longer than the coordinator
    // waits for a sign of life) and run beside task execution; they follow re-registrations.
    // One the coordinator does not know (it restarted) wakes a running task's loop, which
    // registers again at once, naming its attempt (an idle worker finds out at its next ask).
    let heartbeat = {
        let mut client = client.clone();
        let interval = Duration::from_millis(reply.heartbeat_interval_ms.max(100));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            // After a stall (a call held up by an outage), one heartbeat, not a burst.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let worker_id = worker_id_updates.borrow().clone();
                let request = pb::HeartbeatRequest {
                    worker_id: worker_id.clone(),
                };
                match client.heartbeat(request).await {
                    Ok(reply) if !reply.get_ref().known => unknown.notify_waiters(),
                    Ok(_) => {}
                    Err(status) => {
                        tracing::debug!(worker = %worker_id, %status, "heartbeat failed")
                    }
                }
            }
        })
    };

    let torch = match tokio::task::block_in_place(|| {
        spawn_torch_thread(
            plan.clone(),
            device,
            args.threads,
            reply.unlabeled_fingerprint.clone(),
        )
    }) {
        Ok(torch) => torch,
        Err(error) => {
            heartbeat.abort();
            return Err(error);
        }
    };
    let context = TaskContext {
        plan,
        device,
        advertise_host: args.advertise_host.clone(),
    };
    let result = task_loop(&mut session, &context, &torch).await;
    heartbeat.abort();
    result
}

/// What the task loop needs besides the session.
struct TaskContext {
    plan: Plan,
    device: tch::Device,
    advertise_host: String,
}

async fn task_loop(
    session: &mut Session,
    context: &TaskContext,
    torch: &std_mpsc::Sender<Job>,
) -> anyhow::Result<()> {
    loop {
        let task = match session.get_task().await? {
            Some(pb::get_task_response::Reply::Task(task)) => task,
            Some(pb::get_task_response::Reply::RetryAfterMs(wait)) => {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
            Some(pb::get_task_response::Reply::Shutdown(_)) => {
                tracing::info!(worker = %session.id(), "the run is over, exiting");
                return Ok(());
            }
            None => anyhow::bail!("the coordinator sent an empty task reply"),
        };
        tracing::info!(worker = %session.id(), task = %task.task_id, round = task.round, attempt = task.attempt, "task received");
        let result = match task_from_proto(&task) {
            Ok(kind) => match rendezvous(session, context, &task).await? {
                Ok(group) => match execute(session, &task, torch, kind, group).await? {
                    Run::Finished(result) => result,
                    Run::Stopped => {
                        // Its result would be ignored: the task went back to the queue.
                        continue;
                    }
                },
                Err(error) => Err(error),
            },
            Err(error) => Err(TaskError::Own(error.to_string())),
        };
        let group_failure = result.as_ref().is_err_and(TaskError::is_group_failure);
        if let Err(message) = &result {
            tracing::error!(worker = %session.id(), task = %task.task_id, error = %message, "task failed");
        }
        session
            .complete_task(
                &task.task_id,
                task.attempt,
                outcome_to_proto(result),
                group_failure,
            )
            .await?;
    }
}

/// The transport a training group of `world_size` ranks uses on `device`.
fn choose_collective(
    plan: &Plan,
    device: tch::Device,
    world_size: u32,
) -> Result<CollectiveKind, String> {
    let cuda = matches!(device, tch::Device::Cuda(_));
    match plan.workers.collective {
        CollectiveKind::Auto if world_size == 1 => Ok(CollectiveKind::Single),
        CollectiveKind::Auto if cuda => Ok(CollectiveKind::Nccl),
        CollectiveKind::Auto => Ok(CollectiveKind::Ring),
        CollectiveKind::Single if world_size > 1 => Err(format!(
            "workers.collective `single` cannot serve {world_size} ranks"
        )),
        CollectiveKind::Nccl if !cuda => {
            Err("workers.collective `nccl` needs CUDA devices; this worker runs on cpu".into())
        }
        CollectiveKind::Ring if world_size == 1 => Ok(CollectiveKind::Single),
        other => Ok(other),
    }
}

/// Joins the data-parallel group of a training task through the coordinator: says where this
/// rank listens (rank 0 of an NCCL group also makes the unique id), then waits until every
/// rank has joined, up to `workers.join_timeout_seconds`.
async fn rendezvous(
    session: &mut Session,
    context: &TaskContext,
    task: &pb::Task,
) -> anyhow::Result<Result<Option<GroupJoin>, TaskError>> {
    let Some(pb::task::Kind::Train(train)) = &task.kind else {
        return Ok(Ok(None));
    };
    let (rank, world_size) = (train.rank, train.world_size.max(1));
    let collective = match choose_collective(&context.plan, context.device, world_size) {
        Ok(kind) => kind,
        Err(error) => return Ok(Err(TaskError::Own(error))),
    };
    if collective == CollectiveKind::Single {
        return Ok(Ok(None));
    }
    // The coordinator sends the run's timeouts with the task (a resumed run may have changed
    // them since this worker read the plan); one that does not, the plan's.
    let workers = &context.plan.workers;
    let or_plan = |sent: u64, planned: u64| if sent > 0 { sent } else { planned };
    let join_seconds = or_plan(train.join_timeout_seconds, workers.join_timeout_seconds);
    let collective_timeout = Duration::from_secs(or_plan(
        train.collective_timeout_seconds,
        workers.collective_timeout_seconds,
    ));
    let join_timeout = Duration::from_secs(join_seconds);
    let (listener, address, unique_id) = match collective {
        CollectiveKind::Ring => {
            let bind_host = if context.advertise_host.parse::<std::net::IpAddr>().is_ok() {
                context.advertise_host.as_str()
            } else {
                "0.0.0.0"
            };
            let listener = match std::net::TcpListener::bind((bind_host, 0)) {
                Ok(listener) => listener,
                Err(error) => {
                    return Ok(Err(TaskError::Own(format!(
                        "failed to open the ring listener on {bind_host}: {error}"
                    ))))
                }
            };
            let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
            (
                Some(listener),
                format!("{}:{port}", context.advertise_host),
                Vec::new(),
            )
        }
        _ if rank == 0 => match NcclLibrary::load().and_then(|library| library.unique_id()) {
            Ok(id) => (None, String::new(), id.to_bytes()),
            Err(error) => return Ok(Err(TaskError::Own(error.to_string()))),
        },
        _ => (None, String::new(), Vec::new()),
    };
    let request = pb::JoinGroupRequest {
        worker_id: session.id(),
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        rank,
        address,
        nccl_unique_id: unique_id,
    };
    // A coordinator that restarts or is briefly unreachable between the task and the join is
    // waited for, as for any other call; one that no longer knows this worker gave the attempt
    // up: this worker registers again, and its report of the attempt is ignored.
    let mut outage = None;
    let mut status = loop {
        match session.client.join_group(request.clone()).await {
            Ok(reply) => break reply.into_inner(),
            Err(status) if status.code() == Code::NotFound => {
                let what = format!("joined the group of task {}", task.task_id);
                return Ok(Err(TaskError::Own(
                    session.forgotten(&task.task_id, &what).await?,
                )));
            }
            Err(status) => {
                let what = format!("join the group of task {}", task.task_id);
                session.recover(status, &mut outage, &what).await?
            }
        }
    };
    let deadline = tokio::time::Instant::now() + join_timeout;
    loop {
        if status.cancelled {
            // Another rank's report ended the attempt: this rank did nothing wrong.
            return Ok(Err(TaskError::Group(
                "the coordinator gave this attempt of the task up (its log says why)".into(),
            )));
        }
        let nccl_ready = collective != CollectiveKind::Nccl || status.nccl_unique_id.len() == 128;
        if status.ready && nccl_ready {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let seconds = join_seconds;
            return Ok(Err(TaskError::Group(if status.missing_ranks.is_empty() {
                // Every rank joined; rank 0's NCCL id never came (its NCCL failed to load?).
                format!(
                    "every rank joined task {} but rank 0's NCCL unique id did not arrive within {seconds}s (see rank 0's log)",
                    task.task_id
                )
            } else {
                format!(
                    "ranks {:?} of {world_size} did not join task {} within {seconds}s",
                    status.missing_ranks, task.task_id
                )
            })));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let request = pb::GetGroupRequest {
            worker_id: session.id(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
        };
        status = match session.client.get_group(request).await {
            Ok(reply) => reply.into_inner(),
            // The coordinator restarted (or declared this worker lost): the attempt is over;
            // registering again at once lets a resumed run count this worker.
            Err(error) if error.code() == Code::NotFound => {
                let what = format!("waited for the group of task {}", task.task_id);
                return Ok(Err(TaskError::Own(
                    session.forgotten(&task.task_id, &what).await?,
                )));
            }
            Err(error) if transient(&error) => {
                tracing::warn!(%error, "group status query failed, retrying");
                continue;
            }
            Err(error) => {
                return Ok(Err(TaskError::Own(format!(
                    "the coordinator refused this worker's wait for the group of task {}: {error}",
                    task.task_id
                ))));
            }
        };
    }
    tracing::info!(task = %task.task_id, rank, world_size, collective = ?collective, addresses = ?status.addresses, "every rank joined");
    let setup = match listener {
        Some(listener) => GroupSetup::Ring {
            listener,
            addresses: status.addresses,
            group: format!("{}/{}", task.task_id, task.attempt),
            timeout: collective_timeout,
            setup_timeout: join_timeout,
        },
        None => GroupSetup::Nccl {
            unique_id: status.nccl_unique_id,
            setup_timeout: join_timeout,
        },
    };
    Ok(Ok(Some(GroupJoin {
        rank: rank as usize,
        world_size: world_size as usize,
        setup,
        collective_timeout,
    })))
}

/// How a task run on the libtorch thread ended.
enum Run {
    /// It ran to its end (or failed); the result goes to the coordinator.
    Finished(Result<Outcome, TaskError>),
    /// The coordinator no longer counted the attempt as this worker's, so it was stopped at a
    /// progress report or a registration.
    Stopped,
}

/// Runs a task on the libtorch thread, forwarding its progress to the coordinator, and stops it
/// when the coordinator answers a report saying the attempt is no longer this worker's.
async fn execute(
    session: &mut Session,
    assignment: &pb::Task,
    torch: &std_mpsc::Sender<Job>,
    task: TaskKind,
    group: Option<GroupJoin>,
) -> anyhow::Result<Run> {
    let (progress_sender, mut progress_receiver) = mpsc::unbounded_channel();
    let (done_sender, mut done_receiver) = oneshot::channel();
    let stop = Arc::new(AtomicBool::new(false));
    // A labeler goes on whatever happened to its attempt: whoever commits the shard first wins,
    // and a re-run finds the shard committed. The coordinator tells it to stop once it is.
    let labeling = matches!(task, TaskKind::Label { .. });
    torch
        .send(Job {
            task,
            group,
            progress: progress_sender,
            stop: stop.clone(),
            done: done_sender,
        })
        .map_err(|_| anyhow::anyhow!("the libtorch thread has stopped"))?;
    let task_id = assignment.task_id.as_str();
    // From here on a registration sent again names this attempt (a restarted coordinator
    // takes it back), until the task ends.
    session.running = Some(pb::RunningAttempt {
        task_id: task_id.to_string(),
        attempt: assignment.attempt,
        rank: match &assignment.kind {
            Some(pb::task::Kind::Train(train)) => train.rank,
            _ => 0,
        },
    });
    let unknown = session.unknown.clone();
    loop {
        // Reports first: the libtorch thread sends a task's last report before its result, and
        // the coordinator must get it (the last evaluation, a line of metrics.jsonl) first.
        tokio::select! {
            biased;
            Some(progress) = progress_receiver.recv() => {
                if stop.load(Ordering::Acquire) {
                    continue;
                }
                let report = pb::ProgressReport {
                    worker_id: session.id(),
                    task_id: task_id.to_string(),
                    attempt: assignment.attempt,
                    step: progress.step,
                    total_steps: progress.total_steps,
                    loss: progress.loss.unwrap_or(f64::NAN),
                    accuracy: progress.accuracy.unwrap_or(f64::NAN),
                    images_per_second: progress.images_per_second,
                    metrics: progress.metrics.into_iter().collect(),
                };
                // Best effort: a lost report is replaced by the next one.
                match session.client.report_progress(report).await {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        if reply.stop {
                            tracing::warn!(worker = %session.id(), task = %task_id, attempt = assignment.attempt, reason = %reply.reason, "the attempt is no longer this worker's; stopping it");
                            stop.store(true, Ordering::Release);
                        }
                    }
                    Err(status) if status.code() == Code::NotFound => {
                        go_on_or_stop(session, task_id, assignment.attempt, labeling, &stop).await?;
                    }
                    Err(status) => tracing::warn!(%status, "progress report failed"),
                }
            }
            _ = unknown.notified() => {
                go_on_or_stop(session, task_id, assignment.attempt, labeling, &stop).await?;
            }
            result = &mut done_receiver => {
                let result = result.map_err(|_| anyhow::anyhow!("the libtorch thread stopped during a task"))?;
                session.running = None;
                // A task that ended before it saw the stop reports its result anyway (the
                // coordinator ignores it if the attempt is not the worker's).
                return Ok(match result {
                    Err(_) if stop.load(Ordering::Acquire) => Run::Stopped,
                    result => Run::Finished(result),
                });
            }
        }
    }
}

/// The coordinator no longer knows this worker (it restarted, or declared the worker lost)
/// while it runs `attempt` of `task`: it registers again naming the attempt, and goes on with
/// it if the coordinator took it back, or stops it (a labeler goes on anyway: whoever commits
/// the shard first wins).
async fn go_on_or_stop(
    session: &mut Session,
    task: &str,
    attempt: u32,
    labeling: bool,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    if stop.load(Ordering::Acquire) {
        return Ok(());
    }
    tracing::warn!(worker = %session.id(), task, attempt, "the coordinator no longer knows this worker (restarted, or declared it lost); registering again");
    if !session.register_again().await? && !labeling {
        tracing::warn!(worker = %session.id(), task, attempt, "the coordinator has put this worker's task back in the queue; stopping this attempt");
        stop.store(true, Ordering::Release);
    }
    Ok(())
}
