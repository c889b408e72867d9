//! Helpers of the end-to-end tests: locate the built binaries, start and stop real processes,
//! wait on conditions with deadlines (never fixed sleeps).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mentor_proto::coordinator::v1 as pb;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A binary of the workspace, built by `cargo build --bins` in the same profile as the tests.
pub fn binary(name: &str) -> PathBuf {
    let test_executable = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = test_executable
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --release --bins`)",
        path.display()
    );
    path
}

/// A child process killed when dropped, with its output in a log file.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Sends the signal `name` (`-STOP`, `-CONT`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let sent = std::process::Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {name}");
    }

    pub fn start(program: &Path, args: &[&str], log: PathBuf) -> Process {
        Process::start_in(program, args, log, Path::new("."))
    }

    /// [`Process::start`] in the working directory `dir`.
    pub fn start_in(program: &Path, args: &[&str], log: PathBuf, dir: &Path) -> Process {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(program)
            .current_dir(dir)
            .args(args)
            .stdout(Stdio::from(file.try_clone().expect("clone log")))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {}: {e}", program.display()));
        Process { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it returns `Some` or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, condition: impl FnMut() -> Option<T>) -> T {
    wait_for_or_explain(what, timeout, condition, String::new)
}

/// [`wait_for`], with what `explain` says (logs, say) in the message of a timeout.
pub fn wait_for_or_explain<T>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> Option<T>,
    explain: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            explain()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to 300 s) for `path` to exist, looking every 5 ms: a save a test stops a
/// training at as soon as it appears, while the training is still far from its end.
pub fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no `{}` after 300 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The run state a coordinator saved in `state_dir` (`state.json`), as JSON.
pub fn saved_state(state_dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(state_dir.join("state.json")).expect("state.json");
    serde_json::from_str(&text).expect("state.json is JSON")
}

/// A number unique within this process (log file names).
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

/// A free loopback port, as the coordinator's `--listen` takes it and as the URL workers are
/// given: for a coordinator restarted on the same address.
pub fn free_loopback_address() -> (String, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("address")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    (listen, url)
}

/// Starts a coordinator on a free loopback port; returns it and its address.
pub fn start_coordinator(plan: &Path, state_dir: &Path) -> (Process, String) {
    start_coordinator_on(plan, "127.0.0.1:0", state_dir)
}

/// Starts a coordinator listening on `listen` and waits for its address file.
pub fn start_coordinator_on(plan: &Path, listen: &str, state_dir: &Path) -> (Process, String) {
    start_coordinator_with(plan, listen, state_dir, &[])
}

/// Starts a coordinator listening on `listen` with `extra` arguments and waits for its address
/// file.
pub fn start_coordinator_with(
    plan: &Path,
    listen: &str,
    state_dir: &Path,
    extra: &[&str],
) -> (Process, String) {
    start_coordinator_in(plan, listen, state_dir, extra, Path::new("."))
}

/// [`start_coordinator_with`] in the working directory `dir`.
pub fn start_coordinator_in(
    plan: &Path,
    listen: &str,
    state_dir: &Path,
    extra: &[&str],
    dir: &Path,
) -> (Process, String) {
    let _ = std::fs::remove_file(state_dir.join("coordinator.addr"));
    let mut args = vec![
        "--plan",
        plan.to_str().expect("utf-8 path"),
        "--listen",
        listen,
        "--state-dir",
        state_dir.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let mut coordinator = Process::start_in(
        &binary("coordinator"),
        &args,
        state_dir.with_extension(format!("coordinator-{}.log", unique())),
        dir,
    );
    let address = wait_for(
        "the coordinator's address file",
        Duration::from_secs(60),
        || {
            assert!(
                coordinator.is_running(),
                "coordinator exited:\n{}",
                coordinator.log_text()
            );
            std::fs::read_to_string(state_dir.join("coordinator.addr"))
                .ok()
                .map(|text| text.trim().to_string())
                .filter(|text| !text.is_empty())
        },
    );
    (coordinator, address)
}

/// Starts a CPU worker with one libtorch thread.
pub fn start_worker(address: &str, log: PathBuf) -> Process {
    start_worker_in(address, log, Path::new("."))
}

/// [`start_worker`] in the working directory `dir`.
pub fn start_worker_in(address: &str, log: PathBuf, dir: &Path) -> Process {
    start_worker_with(address, log, dir, &[])
}

/// [`start_worker_in`] with `extra` arguments.
pub fn start_worker_with(address: &str, log: PathBuf, dir: &Path, extra: &[&str]) -> Process {
    let mut args = vec![
        "--coordinator",
        address,
        "--device",
        "cpu",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    Process::start_in(&binary("worker"), &args, log, dir)
}

/// The run's status, or `None` while the coordinator cannot be reached.
pub fn try_status(runtime: &tokio::runtime::Runtime, address: &str) -> Option<pb::RunStatus> {
    runtime.block_on(async {
        let mut client =
            pb::status_service_client::StatusServiceClient::connect(address.to_string())
                .await
                .ok()?;
        let reply = client.get_status(pb::GetStatusRequest {}).await.ok()?;
        Some(reply.into_inner())
    })
}

/// The run's status; panics when the coordinator does not answer.
pub fn status(runtime: &tokio::runtime::Runtime, address: &str) -> pb::RunStatus {
    try_status(runtime, address).expect("the coordinator answers status queries")
}

/// Polls the run's status until it is over, calling `observe` on every answer; fails if the
/// coordinator process exits first.
pub fn watch_run(
    runtime: &tokio::runtime::Runtime,
    address: &str,
    coordinator: &mut Process,
    timeout: Duration,
    mut observe: impl FnMut(&pb::RunStatus),
) -> pb::RunStatus {
    wait_for("the run to finish", timeout, || {
        assert!(
            coordinator.is_running(),
            "coordinator exited:\n{}",
            coordinator.log_text()
        );
        let current = try_status(runtime, address)?;
        observe(&current);
        (current.status != "running").then_some(current)
    })
}

/// Edits of the tiny plan for tests that start the run with one worker and then lose it.
pub const ONE_WORKER_SHORT_HEARTBEAT: [(&str, &str); 4] = [
    ("min_workers = 2", "min_workers = 1"),
    (
        "heartbeat_timeout_seconds = 10",
        "heartbeat_timeout_seconds = 2",
    ),
    ("rounds = 2", "rounds = 1"),
    // One round: the student's growth would apply to nothing (refused).
    ("width_growth_per_round = 4\n", ""),
];

/// `deploy/plans/tiny.toml` with each `(from, to)` applied once; an edit that matches nothing
/// fails the test (the plan changed under it).
pub fn tiny_plan_with(edits: &[(&str, &str)]) -> String {
    plan_with("tiny.toml", edits)
}

/// `deploy/plans/<file>` with each `(from, to)` applied once, as [`tiny_plan_with`].
pub fn plan_with(file: &str, edits: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(workspace_root().join("deploy/plans").join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    for (from, to) in edits {
        assert!(text.contains(from), "{file} has no `{from}`");
        text = text.replacen(from, to, 1);
    }
    text
}

/// Writes `plan_text` in `dir`, runs it with a coordinator and two workers until the run ends
/// (at most 10 minutes); returns the final status and the run directory.
pub fn run_on_two_workers(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    plan_text: &str,
) -> (pb::RunStatus, PathBuf) {
    let plan = dir.join("plan.toml");
    std::fs::write(&plan, plan_text).expect("write plan");
    let state_dir = dir.join("run");
    let (mut coordinator, address) = start_coordinator(&plan, &state_dir);
    let _workers = [
        start_worker(&address, dir.join("worker-1.log")),
        start_worker(&address, dir.join("worker-2.log")),
    ];
    let status = watch_run(
        runtime,
        &address,
        &mut coordinator,
        Duration::from_secs(600),
        |_| {},
    );
    (status, state_dir)
}
