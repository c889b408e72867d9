//! `coordinator`: runs one plan, schedules its tasks over workers, answers status queries.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mentor_coordinator::state::RunOutcome;
use mentor_coordinator::{lock, service, Coordinator};
use mentor_plan::Plan;

/// Schedules Noisy Student or Meta Pseudo Labels rounds over gRPC workers and answers status
/// queries.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The plan (TOML) to run; it is validated before anything starts.
    #[arg(long)]
    plan: PathBuf,
    /// Address for workers and status queries, IP:PORT or HOSTNAME:PORT (port 0 picks a free
    /// port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// Run directory: state store, checkpoints, selections, soft labels (default `runs/<name>`).
    /// A directory holding a run of the same plan resumes it.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Finetune the student of the finished (or interrupted) Meta Pseudo Labels run in
    /// --state-dir again, under a plan that may differ from the run's in `[mpl.finetune]` only;
    /// the jointly trained teacher and student are kept.
    #[arg(long, conflicts_with = "retry_failed")]
    redo_finetune: bool,
    /// Go on with the failed run in --state-dir from the phase it failed in, under the same
    /// plan, once the cause of the failure is dealt with: the phase's unfinished tasks get their
    /// retries again; what the run finished is kept.
    #[arg(long)]
    retry_failed: bool,
    /// Exit once the run has ended and its workers have been told to exit: with status 0 if
    /// it succeeded, 1 if it failed (for batch schedulers, whose job ends with its process).
    /// Without it the coordinator goes on answering status queries until stopped.
    #[arg(long)]
    exit_when_done: bool,
    /// With --exit-when-done: go on answering status queries (and /metrics) this long after
    /// the run ended and its workers were told, so that a watcher or a Prometheus scrape sees
    /// the outcome before the coordinator is gone.
    #[arg(long, env = "MENTOR_LINGER_SECONDS", default_value_t = DEFAULT_LINGER_SECONDS)]
    linger_seconds: u64,
    /// Also serve the run's status to Prometheus: `GET /metrics` at this IP:PORT or
    /// HOSTNAME:PORT (port 0 picks a free port; the address is logged).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = mentor_telemetry::LOG_FORMATS)]
    log_format: String,
}

/// `--linger-seconds` when not given.
const DEFAULT_LINGER_SECONDS: u64 = 30;

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}

/// Exit status of a run that ended failed (with --exit-when-done).
const RUN_FAILED: i32 = 1;
/// Exit status of a coordinator that could not start or serve (a refused plan, missing data, a
/// run directory in use, an address that cannot be used), or was stopped before its run
/// ended with --exit-when-done.
const NOT_SERVED: i32 = 2;

fn main() {
    let code = match serve_run() {
        Ok(Ended::Serving | Ended::Succeeded) => 0,
        Ok(Ended::Failed(message)) => {
            eprintln!("Error: the run failed: {message}");
            RUN_FAILED
        }
        Err(error) => {
            eprintln!("Error: {error:?}");
            NOT_SERVED
        }
    };
    std::process::exit(code);
}

/// Why listening on `address`, given by `flag`, failed; for an address in the wrong form, the
/// form it takes.
fn listen_error(address: &str, flag: &str, error: &std::io::Error) -> anyhow::Error {
    let hint = if error.kind() == std::io::ErrorKind::InvalidInput {
        format!(" ({flag} takes IP:PORT or HOSTNAME:PORT)")
    } else {
        format!(" ({flag})")
    };
    anyhow::anyhow!("failed to listen on `{address}`: {error}{hint}")
}

/// How the coordinator ended.
enum Ended {
    /// Stopped by a signal without --exit-when-done.
    Serving,
    Succeeded,
    Failed(String),
}

#[tokio::main]
async fn serve_run() -> anyhow::Result<Ended> {
    let args = Args::parse();
    mentor_telemetry::init(&args.log_format);
    let plan = Plan::load(&args.plan)?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&plan.name));
    // A run directory held by another coordinator is refused first (that one's port may be
    // the one asked for); then listening comes before the run directory is touched: an
    // address that cannot be used leaves nothing behind.
    lock::RunLock::check_free(&state_dir)?;
    let listener = tokio::net::TcpListener::bind(args.listen.as_str())
        .await
        .map_err(|error| listen_error(&args.listen, "--listen", &error))?;
    let metrics_listener = match &args.metrics_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address.as_str())
                .await
                .map_err(|error| listen_error(address, "--metrics-listen", &error))?,
        ),
        None => None,
    };
    let mut coordinator = tokio::task::block_in_place(|| {
        if args.redo_finetune {
            Coordinator::open_to_redo_finetune(plan, &state_dir)
        } else if args.retry_failed {
            Coordinator::open_to_retry_failed(plan, &state_dir)
        } else {
            Coordinator::open(plan, &state_dir)
        }
    })
    .with_context(|| {
        format!(
            "failed to open the run of plan `{}` in `{}`",
            args.plan.display(),
            state_dir.display()
        )
    })?;
    let run_dir = coordinator.state.paths.run_dir.clone();
    let address = listener.local_addr()?;
    coordinator.announce(&format!("http://{address}"))?;
    tracing::info!(
        run = %coordinator.state.run_id,
        %address,
        run_dir = %run_dir.display(),
        min_workers = coordinator.plan.workers.min_workers,
        "coordinator listening"
    );
    let heartbeat_timeout = coordinator.plan.workers.heartbeat_timeout_seconds;
    let shared = Arc::new(Mutex::new(coordinator));
    if let Some(listener) = metrics_listener {
        let address = listener.local_addr()?;
        tracing::info!(url = %format!("http://{address}/metrics"), "serving the run's status to Prometheus");
        tokio::spawn(mentor_coordinator::prometheus::serve(
            listener,
            shared.clone(),
        ));
    }
    let exit_when_done = args.exit_when_done;
    let linger = Duration::from_secs(args.linger_seconds);
    if !exit_when_done && args.linger_seconds != DEFAULT_LINGER_SECONDS {
        tracing::warn!(
            linger_seconds = args.linger_seconds,
            "--linger-seconds has no effect without --exit-when-done: the coordinator serves until stopped"
        );
    }
    let shutdown = {
        let shared = shared.clone();
        async move {
            if !exit_when_done {
                return shutdown_signal().await;
            }
            // A busy worker learns of the end within its next progress report or heartbeat
            // timeout; one that stays neither is not waited for past twice that.
            let grace = Duration::from_secs(2 * heartbeat_timeout + 10);
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = service::run_ended(shared, grace) => {
                    tracing::info!(
                        linger_seconds = linger.as_secs(),
                        "the run has ended and its workers were told: exiting after the linger (--exit-when-done)"
                    );
                    tokio::select! {
                        _ = shutdown_signal() => {}
                        _ = tokio::time::sleep(linger) => {}
                    }
                }
            }
        }
    };
    let served = service::serve(listener, shared.clone(), shutdown).await;
    let mut coordinator = shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // A save that failed while serving (a full disk) was logged, and labeling's changes may
    // wait for a save (grouped saves): the last one must hold, or the directory would say the
    // run is still going (and a restart would redo finished work). Made before a server error
    // is reported too.
    let saved = coordinator
        .persist()
        .context("the run's final state could not be saved");
    served.context("gRPC server failed")?;
    saved?;
    if !exit_when_done {
        return Ok(Ended::Serving);
    }
    match &coordinator.state.outcome {
        RunOutcome::Succeeded => Ok(Ended::Succeeded),
        RunOutcome::Failed(message) => Ok(Ended::Failed(message.clone())),
        // A scheduler must not take a stopped run for a finished one.
        RunOutcome::Running => anyhow::bail!(
            "stopped before the run ended; starting the coordinator again on `{}` resumes it",
            coordinator.state.paths.run_dir.display()
        ),
    }
}
