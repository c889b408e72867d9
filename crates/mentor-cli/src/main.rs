//! `mentor`: the user's command line. `mentor status` asks a coordinator how its run is going;
//! `mentor plan` checks a plan and its data before a run and says what the run will do.
//!
//! Talks to the coordinator's status service only; it never links libtorch.

mod labels;
mod plan;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mentor_coordinator::{Coordinator, Reopen};
use mentor_proto::coordinator::v1 as pb;
use pb::status_service_client::StatusServiceClient;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Self-training orchestrator: check plans, query and follow runs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Shows the run, round, phase, workers and accuracies of a coordinator's run.
    ///
    /// Ask the coordinator at --coordinator, or name the run directory with --state-dir: its
    /// coordinator is asked when one serves it, else the status saved in its state.json is
    /// shown (an unfinished run is then `stopped`).
    ///
    /// Exit status: 0 while running or succeeded, 1 if the run failed, 2 if the coordinator
    /// cannot be reached (or --state-dir holds no run), 3 if the run is stopped.
    #[command(group = clap::ArgGroup::new("run").required(true).multiple(false))]
    Status {
        /// The coordinator's address, HOST:PORT or http://HOST:PORT (what the coordinator
        /// writes to <state-dir>/coordinator.addr).
        #[arg(long, value_parser = mentor_proto::coordinator_url, group = "run")]
        coordinator: Option<String>,
        /// The run directory (the coordinator's --state-dir).
        #[arg(long, group = "run")]
        state_dir: Option<PathBuf>,
        /// Print one JSON object (with --watch: one per line) instead of text.
        #[arg(long)]
        json: bool,
        /// Keep printing until the run ends.
        #[arg(long)]
        watch: bool,
        /// Seconds between two refreshes with --watch (at least 0.1).
        #[arg(long, default_value_t = 2.0, value_parser = parse_interval, requires = "watch")]
        interval: f64,
    },
    /// Checks a plan and its data as a run would, and says what the run will do.
    ///
    /// The plan's fields, the data set's files, the labeled split of its seed and the unlabeled
    /// images with their shards are checked; nothing is written and nothing is started. Exit
    /// status: 0 if a run would start, 1 if the plan or its data is refused (the message names
    /// the field or file).
    Plan {
        /// The plan file (TOML).
        plan: PathBuf,
        /// Print the plan with every default written out (what the run records) instead.
        #[arg(long)]
        resolved: bool,
        /// The run directory the plan is for: a run recorded there is checked as the
        /// coordinator would resume it (the plan must be the run's, up to the settings a
        /// resumed run may change), and settings that would do nothing (refused for a new run)
        /// pass.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Check the plan as the coordinator's --redo-finetune takes it (with --state-dir).
        #[arg(long, requires = "state_dir", conflicts_with = "retry_failed")]
        redo_finetune: bool,
        /// Check the plan as the coordinator's --retry-failed takes it (with --state-dir).
        #[arg(long, requires = "state_dir")]
        retry_failed: bool,
    },
    /// Shows what a Noisy Student round's soft labels hold, class by class.
    ///
    /// For each class: the examples whose top class it is, their share, their mean top-class
    /// probability and how many reach pseudo_labels.min_confidence; once the round's filter has
    /// run, its threshold for the class, how many times each example above it is used, and how
    /// many are above it. Read from the run directory (live or not): the labelers' histograms
    /// and the round's selection file. Exit status: 0, or 2 when the directory holds no run or
    /// the round no soft labels.
    Labels {
        /// The run directory (the coordinator's --state-dir).
        #[arg(long)]
        state_dir: PathBuf,
        /// The round (default: the latest with soft labels).
        #[arg(long)]
        round: Option<u32>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A refresh interval: a number of seconds from 0.1 to a day.
fn parse_interval(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if (0.1..=86_400.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!("{text} seconds: must be from 0.1 to 86400 (a day)"))
    }
}

fn number(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

/// The `--json` shape: stable field names for scripts.
fn status_json(status: &pb::RunStatus) -> Value {
    json!({
        "run_id": status.run_id,
        "name": status.name,
        "status": status.status,
        "method": status.method,
        "round": status.round,
        "total_rounds": status.total_rounds,
        "phase": status.phase,
        "error": if status.error.is_empty() { Value::Null } else { json!(status.error) },
        "elapsed_seconds": number(status.elapsed_seconds),
        "tasks": { "done": status.tasks_done, "total": status.tasks_total },
        "latest_loss": number(status.latest_loss),
        "latest_accuracy": number(status.latest_accuracy),
        // The final student's (final_student_checkpoint's): finetuned when the method
        // finetunes, else the last round's; null until that model is evaluated.
        "final_student_test_accuracy": status.final_student_test_accuracy.map_or(Value::Null, number),
        "final_student_checkpoint": if status.final_student_checkpoint.is_empty() {
            Value::Null
        } else {
            json!(status.final_student_checkpoint)
        },
        "run_dir": status.run_dir,
        "min_workers": status.min_workers,
        "waiting": if status.waiting.is_empty() { Value::Null } else { json!(status.waiting) },
        "rounds": status.rounds.iter().map(|round| json!({
            "round": round.round,
            "teacher_test_accuracy": round.teacher_test_accuracy,
            "student_test_accuracy": round.student_test_accuracy,
            "finetuned_student_test_accuracy": round.finetuned_student_test_accuracy,
            "pseudo_labels": {
                "shards": round.shards,
                "shards_done": round.shards_done,
                "examples": round.examples,
                "kept": round.kept,
            },
        })).collect::<Vec<_>>(),
        "workers": status.workers.iter().map(|worker| json!({
            "id": worker.worker_id,
            "device": worker.device,
            "host": worker.hostname,
            "pid": worker.pid,
            "gpu": if worker.gpu.is_empty() { Value::Null } else { json!(worker.gpu) },
            "seconds_since_heard": number(worker.seconds_since_heard),
            "seconds_since_progress": number(worker.seconds_since_progress),
            "alive": worker.alive,
            "state": worker.state,
            "task": if worker.task_id.is_empty() { Value::Null } else { json!(worker.task) },
            "task_id": if worker.task_id.is_empty() { Value::Null } else { json!(worker.task_id) },
            "step": worker.step,
            "total_steps": worker.total_steps,
            "loss": number(worker.loss),
            "images_per_second": number(worker.images_per_second),
            "seconds_left": worker.seconds_left,
            "metrics": worker.metrics,
        })).collect::<Vec<_>>(),
    })
}

fn percent(value: Option<f64>) -> String {
    value
        .map(|v| format!("{:.2}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// `42s`, `7m05s`, `1h52m`.
fn duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

fn status_text(status: &pb::RunStatus) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "run {} ({}, {})  status: {}  round {}/{}  phase: {}  tasks {}/{}{}\n",
        status.run_id,
        status.name,
        status.method,
        status.status,
        status.round,
        status.total_rounds,
        status.phase,
        status.tasks_done,
        status.tasks_total,
        if status.elapsed_seconds.is_finite() {
            format!("  elapsed {}", duration(status.elapsed_seconds))
        } else {
            String::new()
        }
    ));
    if !status.error.is_empty() {
        out.push_str(&format!("error: {}\n", status.error));
    }
    if status.status == "failed" {
        out.push_str(
            "(once its cause is dealt with, the coordinator started again on the run directory \
             with --retry-failed goes on from where the run failed)\n",
        );
    }
    if status.phase == "waiting-for-workers" && status.status == "running" {
        let registered = status.workers.iter().filter(|w| w.alive).count();
        out.push_str(&format!(
            "waiting for workers: {registered} of {} registered (workers.min_workers)\n",
            status.min_workers
        ));
    }
    if !status.waiting.is_empty() && status.status == "running" {
        out.push_str(&format!("waiting: {}\n", status.waiting));
    }
    if !status.run_dir.is_empty() {
        out.push_str(&format!("run directory: {}\n", status.run_dir));
    }
    if !status.final_student_checkpoint.is_empty() {
        out.push_str(&format!(
            "final student: {}\n",
            status.final_student_checkpoint
        ));
    }
    let loss = if status.latest_loss.is_finite() {
        format!("{:.4}", status.latest_loss)
    } else {
        "-".into()
    };
    let accuracy = status
        .latest_accuracy
        .is_finite()
        .then_some(status.latest_accuracy);
    out.push_str(&format!(
        "latest loss {loss}  latest test accuracy {}\n",
        percent(accuracy)
    ));
    // Noisy Student rounds pseudo-label; a Meta Pseudo Labels round finetunes its student.
    let mpl = status.method == "meta-pseudo-labels";
    out.push_str(if mpl {
        "round  teacher acc  student acc  finetuned\n"
    } else {
        "round  teacher acc  student acc  shards  examples    kept\n"
    });
    for round in &status.rounds {
        let method_columns = if mpl {
            format!("{:>9}", percent(round.finetuned_student_test_accuracy))
        } else {
            format!(
                "{:>6}  {:>8}  {:>6}",
                format!("{}/{}", round.shards_done, round.shards),
                round.examples,
                round.kept
            )
        };
        out.push_str(&format!(
            "{:>5}  {:>11}  {:>11}  {method_columns}\n",
            round.round,
            percent(round.teacher_test_accuracy),
            percent(round.student_test_accuracy),
        ));
    }
    for worker in &status.workers {
        let task = if worker.task_id.is_empty() {
            "idle".to_string()
        } else {
            let mut task = format!("{} [{}]", worker.task, worker.task_id);
            if worker.total_steps > 0 {
                task.push_str(&format!(" {}/{}", worker.step, worker.total_steps));
            }
            if worker.loss.is_finite() {
                task.push_str(&format!(" loss {:.4}", worker.loss));
            }
            if worker.images_per_second > 0.0 {
                task.push_str(&format!(" {:.0} img/s", worker.images_per_second));
            }
            if let Some(seconds) = worker.seconds_left {
                task.push_str(&format!(" {} left", duration(seconds)));
            }
            if worker.seconds_since_progress >= STALL_SECONDS {
                // Whole minutes: `--watch` prints the text again when it changes.
                let minutes = (worker.seconds_since_progress / 60.0).floor();
                task.push_str(&format!(" (no progress for {minutes:.0}m)"));
            }
            let mut metrics: Vec<_> = worker.metrics.iter().collect();
            metrics.sort_by(|a, b| a.0.cmp(b.0));
            for (name, value) in metrics {
                if name.ends_with("_step") {
                    task.push_str(&format!(" {name} {value:.0}"));
                } else {
                    task.push_str(&format!(" {name} {value:.4}"));
                }
            }
            task
        };
        // Seconds are left out of the text, which `--watch` prints again only when it changes.
        let state = if worker.state == "active" || worker.state.is_empty() {
            String::new()
        } else {
            format!(" ({})", worker.state)
        };
        let pid = if worker.pid > 0 {
            format!(" pid {}", worker.pid)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "worker {} {}{pid}{state}: {}\n",
            worker.worker_id, worker.device, task
        ));
    }
    out
}

/// A task without progress for this long says so in the text: tasks report every few seconds
/// to a minute; one silent for minutes may hang (in a collective's setup, say) while its
/// worker still heartbeats.
const STALL_SECONDS: f64 = 300.0;

/// What `mentor status` asks.
enum Target {
    Coordinator(String),
    RunDir(PathBuf),
}

/// A status and where it came from: the coordinator's address, or `None` for a run directory's
/// saved state.
struct Answer {
    status: pb::RunStatus,
    coordinator: Option<String>,
}

/// Why no status came back: a message for the user (and `--json`'s answer); `transient` when
/// waiting may mend it (a coordinator starting on the run directory), which `--watch` does.
struct NoAnswer {
    message: String,
    transient: bool,
    /// No run where one was named (a run directory that is missing or holds none), rather
    /// than a coordinator that does not answer.
    no_run: bool,
}

impl NoAnswer {
    fn new(message: String) -> NoAnswer {
        NoAnswer {
            message,
            transient: false,
            no_run: false,
        }
    }

    fn no_run(message: String) -> NoAnswer {
        NoAnswer {
            no_run: true,
            ..NoAnswer::new(message)
        }
    }
}

/// How long a status query may take: a coordinator answers in milliseconds.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

async fn ask(url: &str, connect_timeout: Duration) -> Result<pb::RunStatus, NoAnswer> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|error| NoAnswer::new(format!("`{url}`: {error}")))?
        .connect_timeout(connect_timeout)
        .timeout(QUERY_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|error| {
        NoAnswer::new(format!(
            "cannot reach the coordinator at {url}: {}",
            error_chain(&error)
        ))
    })?;
    StatusServiceClient::new(channel)
        .get_status(pb::GetStatusRequest {})
        .await
        .map(|response| response.into_inner())
        .map_err(|error| {
            NoAnswer::new(format!(
                "status query to {url} failed: {}",
                error_chain(&error)
            ))
        })
}

/// Asks the coordinator at `url` about the run in `dir`: an answer about another run
/// directory (an old address, a port reused) is none. `locked`: the coordinator holds `dir`'s
/// lock, so it serves this very directory, maybe seen under another path (a container's bind
/// mount, another host's mount point): the run it names must be the one `dir` records.
async fn ask_about(
    url: &str,
    dir: &std::path::Path,
    connect_timeout: Duration,
    locked: bool,
) -> Result<Answer, NoAnswer> {
    let status = ask(url, connect_timeout).await?;
    let recorded_run = || {
        std::fs::read_to_string(dir.join("state.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .is_some_and(|state| state["run_id"] == status.run_id.as_str())
    };
    let same = if status.run_dir.is_empty() {
        // A build that did not say its run directory: the run it names must be this one's.
        recorded_run()
    } else {
        std::path::Path::new(&status.run_dir).canonicalize().ok() == dir.canonicalize().ok()
            || (locked && recorded_run())
    };
    if !same {
        return Err(NoAnswer::new(format!(
            "the coordinator at {url} serves the run directory `{}`, not `{}`",
            status.run_dir,
            dir.display()
        )));
    }
    Ok(Answer {
        status,
        coordinator: Some(url.to_string()),
    })
}

/// The whole chain: tonic's "transport error" alone hides the cause. Some links repeat their
/// source's text; each message is printed once.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain: Vec<String> = Vec::new();
    let mut link: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = link {
        let text = error.to_string();
        if chain.last() != Some(&text) {
            chain.push(text);
        }
        link = error.source();
    }
    chain.join(": ")
}

async fn answer(target: &Target) -> Result<Answer, NoAnswer> {
    match target {
        Target::Coordinator(url) => Ok(Answer {
            status: ask(url, QUERY_TIMEOUT).await?,
            coordinator: Some(url.clone()),
        }),
        Target::RunDir(dir) => answer_for(dir).await,
    }
}

/// The status of the run in `dir`: its coordinator's, or the one saved in its `state.json`.
async fn answer_for(dir: &std::path::Path) -> Result<Answer, NoAnswer> {
    use mentor_coordinator::lock::{Holder, RunLock};
    if !dir.is_dir() {
        return Err(NoAnswer::no_run(format!(
            "`{}`: {}",
            dir.display(),
            if dir.exists() {
                "not a directory"
            } else {
                "no such directory"
            }
        )));
    }
    let saved = || {
        mentor_coordinator::service::saved_status(dir)
            .map(|status| Answer {
                status,
                coordinator: None,
            })
            .map_err(|error| {
                if dir.join("state.json").exists() {
                    NoAnswer::new(error.to_string())
                } else {
                    NoAnswer::no_run(error.to_string())
                }
            })
    };
    match RunLock::holder(dir).map_err(|error| NoAnswer::new(error.to_string()))? {
        // Held: the holder says where it listens once it does.
        Holder::Listening(url) => {
            ask_about(&url, dir, QUERY_TIMEOUT, true)
                .await
                .map_err(|error| NoAnswer {
                    transient: true,
                    ..error
                })
        }
        Holder::Starting => Err(NoAnswer {
            message: format!(
                "a coordinator holds `{}` and is starting: it does not listen yet",
                dir.display()
            ),
            transient: true,
            no_run: false,
        }),
        // Not held: a coordinator of a build without the lock may still serve the directory
        // at the address it wrote.
        Holder::None => {
            let written = std::fs::read_to_string(dir.join("coordinator.addr"))
                .ok()
                .and_then(|text| mentor_proto::coordinator_url(text.trim()).ok());
            match written {
                Some(url) => match ask_about(&url, dir, Duration::from_secs(2), false).await {
                    Ok(answer) => Ok(answer),
                    Err(_) => saved(),
                },
                None => saved(),
            }
        }
    }
}

/// How long `--watch` waits for a coordinator, given by its address, that answered before and
/// stopped answering (restarted on the same address, say).
const WATCH_OUTAGE: Duration = Duration::from_secs(600);

async fn status(target: Target, as_json: bool, watch: bool, interval: f64) -> anyhow::Result<i32> {
    let mut last_printed = String::new();
    // Since when a coordinator that answered before does not (`--coordinator` only: a run
    // directory says itself whether one is starting).
    let mut answered = false;
    let mut silent_since: Option<std::time::Instant> = None;
    // The run the coordinator answered for (its id and directory), to read how it ended once
    // the coordinator is gone.
    let mut last_run: Option<(String, std::path::PathBuf)> = None;
    loop {
        let outcome = match answer(&target).await {
            Ok(answer) => {
                answered = true;
                silent_since = None;
                if !answer.status.run_dir.is_empty() {
                    last_run = Some((
                        answer.status.run_id.clone(),
                        answer.status.run_dir.clone().into(),
                    ));
                }
                Ok(answer)
            }
            // A coordinator that ended with its run (--exit-when-done) is gone: its run
            // directory, where this machine sees it, says how the run ended.
            Err(error) => match ended_in(last_run.as_ref()) {
                Some(status) => Ok(Answer {
                    status,
                    coordinator: None,
                }),
                None => Err(error),
            },
        };
        let Answer {
            status,
            coordinator,
        } = match outcome {
            Ok(answer) => answer,
            Err(NoAnswer {
                message,
                transient,
                no_run,
            }) => {
                let restarting = answered
                    && matches!(target, Target::Coordinator(_))
                    && silent_since
                        .get_or_insert_with(std::time::Instant::now)
                        .elapsed()
                        < WATCH_OUTAGE;
                if watch && (transient || restarting) {
                    // A coordinator starting on the run directory: it will answer.
                    if message != last_printed {
                        eprintln!("waiting: {message}");
                        last_printed = message;
                    }
                    tokio::time::sleep(Duration::from_secs_f64(interval)).await;
                    continue;
                }
                eprintln!("error: {message}");
                if as_json {
                    // Scripts reading stdout get an answer too.
                    let status = if no_run { "no-run" } else { "unreachable" };
                    emit(&format!(
                        "{}\n",
                        json!({"status": status, "error": message})
                    ));
                }
                return Ok(2);
            }
        };
        let (text, comparable) = if as_json {
            let mut value = status_json(&status);
            if let Some(object) = value.as_object_mut() {
                object.insert("coordinator".into(), json!(coordinator));
            }
            let text = if watch {
                serde_json::to_string(&value)?
            } else {
                serde_json::to_string_pretty(&value)?
            };
            (text, json_without_clock(value))
        } else {
            let mut text = status_text(&status);
            if coordinator.is_none() {
                text.push_str(&saved_note(&status));
            }
            let comparable = text_without_clock(&text);
            (text, comparable)
        };
        // A stopped run may be resumed: --watch waits for it.
        let finished = status.status == "succeeded" || status.status == "failed";
        if !watch {
            emit(&format!("{text}\n"));
        } else if std::io::stdout().is_terminal() && !as_json {
            emit(&format!("\x1b[2J\x1b[H{text}"));
        } else if comparable != last_printed || finished {
            emit(&format!("{text}\n"));
        }
        last_printed = comparable;
        if !watch || finished {
            return Ok(match status.status.as_str() {
                "failed" => 1,
                mentor_coordinator::service::STOPPED => 3,
                _ => 0,
            });
        }
        tokio::time::sleep(Duration::from_secs_f64(interval)).await;
    }
}

/// Exit status after the reader of the output went away: 128 + SIGPIPE, as a Unix tool
/// killed by the signal reports it.
const CLOSED_OUTPUT: i32 = 141;

/// Writes `text` to standard output; a reader that went away (`mentor status --watch | head`)
/// ends the command quietly with [`CLOSED_OUTPUT`], as with any Unix tool, not with a panic.
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(CLOSED_OUTPUT);
        }
        eprintln!("error: writing the output failed: {error}");
        std::process::exit(2);
    }
}

/// The saved status of the run `(id, directory)`, if its directory is readable here, holds
/// that run (not another run's directory of the same path on this machine) and says it ended.
fn ended_in(run: Option<&(String, std::path::PathBuf)>) -> Option<pb::RunStatus> {
    let (run_id, dir) = run?;
    let status = mentor_coordinator::service::saved_status(dir).ok()?;
    let ended = status.status == "succeeded" || status.status == "failed";
    (ended && status.run_id == *run_id).then_some(status)
}

/// Says that the status was read from the run directory, not asked of a coordinator.
fn saved_note(status: &pb::RunStatus) -> String {
    if status.status == mentor_coordinator::service::STOPPED {
        format!(
            "no coordinator serves this run: this is the status saved in {}/state.json; start the coordinator on that directory with the same plan to resume it\n",
            status.run_dir
        )
    } else {
        format!(
            "the status saved in {}/state.json (no coordinator serves the run)\n",
            status.run_dir
        )
    }
}

/// The text without its elapsed time, so that --watch prints only real changes.
/// A status object as compared between polls of `--json --watch`: without what changes with
/// the clock alone (the elapsed time, how long ago each worker was heard from).
fn json_without_clock(mut value: Value) -> String {
    if let Some(object) = value.as_object_mut() {
        object.remove("elapsed_seconds");
        if let Some(Value::Array(workers)) = object.get_mut("workers") {
            for worker in workers.iter_mut().filter_map(Value::as_object_mut) {
                worker.remove("seconds_since_heard");
                worker.remove("seconds_since_progress");
            }
        }
    }
    value.to_string()
}

fn text_without_clock(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("elapsed") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `mentor plan`: 0 when the plan and its data would start a run (or reopen the one in
/// `state_dir` the way `how` says), 1 when refused.
fn check_plan(
    path: &std::path::Path,
    resolved: bool,
    state_dir: Option<&std::path::Path>,
    how: Reopen,
) -> anyhow::Result<i32> {
    let resumes = state_dir.is_some_and(|dir| dir.join("state.json").exists());
    // (--redo-finetune or --retry-failed on a directory without a run: refused for that below.)
    let new_run = !resumes && how == Reopen::Resume;
    let checked = plan::check(path, new_run).and_then(|(plan, data)| {
        let teacher_needed = match state_dir {
            Some(dir) => Coordinator::check_reopen(&plan, dir, how)
                .with_context(|| format!("plan `{}` for {}", path.display(), dir.display()))?,
            None => true,
        };
        // A run past its first labeling no longer reads the first teacher's file.
        if teacher_needed {
            plan::check_teacher(path, &plan)?;
        }
        Ok((plan, data))
    });
    match checked {
        Ok((plan, data)) => {
            if resolved {
                emit(&plan.to_toml_string());
            } else {
                emit(&plan::describe(&plan, &data));
            }
            Ok(0)
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            Ok(1)
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Status {
            coordinator,
            state_dir,
            json,
            watch,
            interval,
        } => {
            let target = match (coordinator, state_dir) {
                (Some(url), _) => Target::Coordinator(url),
                (None, Some(dir)) => Target::RunDir(dir),
                (None, None) => unreachable!("clap requires one of them"),
            };
            status(target, json, watch, interval).await
        }
        Command::Plan {
            plan,
            resolved,
            state_dir,
            redo_finetune,
            retry_failed,
        } => {
            let how = match (redo_finetune, retry_failed) {
                (true, _) => Reopen::RedoFinetune,
                (_, true) => Reopen::RetryFailed,
                _ => Reopen::Resume,
            };
            check_plan(&plan, resolved, state_dir.as_deref(), how)
        }
        Command::Labels {
            state_dir,
            round,
            json,
        } => labels::labels(&state_dir, round, json),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_bounded_and_named() {
        assert_eq!(parse_interval("2"), Ok(2.0));
        for bad in ["0.01", "1e20", "inf", "NaN"] {
            let error = parse_interval(bad).expect_err(bad);
            assert!(error.contains("from 0.1 to 86400"), "{error}");
        }
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn a_json_watch_compares_statuses_without_the_clock() {
        let status = |step, heard| pb::RunStatus {
            status: "running".into(),
            elapsed_seconds: heard * 10.0,
            workers: vec![pb::WorkerStatus {
                worker_id: "w1".into(),
                step,
                seconds_since_heard: heard,
                ..Default::default()
            }],
            ..Default::default()
        };
        let compared = |step, heard| json_without_clock(status_json(&status(step, heard)));
        assert_eq!(compared(100, 0.5), compared(100, 2.5));
        assert_ne!(compared(100, 0.5), compared(150, 0.5));
    }

    #[test]
    fn durations_read_as_seconds_minutes_or_hours() {
        assert_eq!(duration(42.4), "42s");
        assert_eq!(duration(425.0), "7m05s");
        assert_eq!(duration(6720.0), "1h52m");
        assert_eq!(duration(-3.0), "0s");
    }

    #[test]
    fn a_busy_worker_shows_its_time_left_and_an_idle_one_does_not() {
        let worker = |task_id: &str, seconds_left| pb::WorkerStatus {
            worker_id: format!("w-{task_id}"),
            task_id: task_id.into(),
            task: "train teacher".into(),
            step: 100,
            total_steps: 400,
            seconds_left,
            ..Default::default()
        };
        let status = pb::RunStatus {
            workers: vec![worker("r1-t0001", Some(125.0)), worker("", None)],
            ..Default::default()
        };
        let text = status_text(&status);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("worker")).collect();
        assert!(
            lines[0].contains("100/400") && lines[0].ends_with("2m05s left"),
            "{text}"
        );
        assert!(lines[1].ends_with("idle"), "{text}");
        // A task that heartbeats and makes no progress for minutes says so.
        let stalled = pb::RunStatus {
            workers: vec![pb::WorkerStatus {
                seconds_since_progress: 725.0,
                ..worker("r1-t0001", None)
            }],
            ..Default::default()
        };
        let text = status_text(&stalled);
        assert!(text.ends_with("(no progress for 12m)\n"), "{text}");
        let busy = pb::RunStatus {
            workers: vec![pb::WorkerStatus {
                seconds_since_progress: 30.0,
                ..worker("r1-t0001", None)
            }],
            ..Default::default()
        };
        assert!(!status_text(&busy).contains("no progress"));
    }

    #[test]
    fn a_waiting_run_says_how_many_workers_it_waits_for_and_names_each_process() {
        let worker = |id: &str, pid, alive, state: &str| pb::WorkerStatus {
            worker_id: id.into(),
            device: "cpu".into(),
            pid,
            alive,
            state: state.into(),
            ..Default::default()
        };
        let status = pb::RunStatus {
            status: "running".into(),
            phase: "waiting-for-workers".into(),
            min_workers: 3,
            workers: vec![
                worker("w1-a", 4242, true, "active"),
                worker("w2-a", 4343, true, "silent"),
                worker("w3-b", 77, false, "lost"),
            ],
            ..Default::default()
        };
        let text = status_text(&status);
        assert!(
            text.contains("waiting for workers: 2 of 3 registered (workers.min_workers)"),
            "{text}"
        );
        assert!(text.contains("worker w1-a cpu pid 4242: idle"), "{text}");
        // A stopped run waits for nobody.
        let stopped = status_text(&pb::RunStatus {
            status: "stopped".into(),
            ..status.clone()
        });
        assert!(!stopped.contains("waiting for workers"), "{stopped}");
        // A failed run says how to go on with it.
        let failed = status_text(&pb::RunStatus {
            status: "failed".into(),
            error: "task r1-t0001 failed 3 times".into(),
            ..status.clone()
        });
        assert!(
            failed.contains("error: task r1-t0001 failed 3 times\n(once its cause")
                && failed.contains("with --retry-failed goes on"),
            "{failed}"
        );
        assert!(!text.contains("--retry-failed"), "{text}");
        assert!(
            text.contains("worker w2-a cpu pid 4343 (silent): idle"),
            "{text}"
        );
        assert!(
            text.contains("worker w3-b cpu pid 77 (lost): idle"),
            "{text}"
        );
        let json = status_json(&status);
        assert_eq!(json["min_workers"], 3);
        assert_eq!(json["workers"][0]["pid"], 4242);
    }

    #[test]
    fn each_method_shows_the_round_columns_it_has() {
        let round = pb::RoundStatus {
            round: 1,
            teacher_test_accuracy: Some(0.8),
            student_test_accuracy: Some(0.85),
            finetuned_student_test_accuracy: Some(0.86),
            shards: 8,
            shards_done: 8,
            examples: 59000,
            kept: 58000,
        };
        let status = |method: &str| pb::RunStatus {
            method: method.into(),
            rounds: vec![round],
            ..Default::default()
        };
        let table = |text: String| -> Vec<String> {
            text.lines()
                .skip_while(|l| !l.starts_with("round "))
                .take(2)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        };
        assert_eq!(
            table(status_text(&status("meta-pseudo-labels"))),
            [
                "round teacher acc student acc finetuned",
                "1 80.00% 85.00% 86.00%"
            ]
        );
        assert_eq!(
            table(status_text(&status("noisy-student"))),
            [
                "round teacher acc student acc shards examples kept",
                "1 80.00% 85.00% 8/8 59000 58000"
            ]
        );
    }
}
