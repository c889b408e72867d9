//! What `deploy/` gives cluster schedulers, run for real on this machine: `deploy/node.sh` on
//! two "nodes" (coordinator and workers as real processes on loopback), the Slurm batch script
//! under stand-ins for `srun` and `scontrol`, and the Kubernetes manifests' commands through
//! `node.sh --dry-run`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use mentor_e2e::{binary, tiny_plan_with, try_status, wait_for, workspace_root, Process};

fn bin_dir() -> PathBuf {
    binary("worker")
        .parent()
        .expect("the binaries' folder")
        .to_path_buf()
}

fn node_sh() -> PathBuf {
    workspace_root().join("deploy/node.sh")
}

/// A port free on loopback now (the coordinator binds it a moment later).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// Cores as `nproc` counts them (what node.sh divides among its workers).
fn nproc() -> String {
    let output = Command::new("nproc").output().expect("nproc");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `mentor status --json --state-dir DIR`: the run's saved status once its coordinator is gone.
fn saved_status(dir: &Path) -> serde_json::Value {
    let output = Command::new(binary("mentor"))
        .args(["status", "--json", "--state-dir"])
        .arg(dir)
        .output()
        .expect("mentor status");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON status ({e}): {}", text(&output)))
}

fn wait_exit(process: &mut Process, what: &str) -> i32 {
    let status = wait_for(what, Duration::from_secs(300), || {
        process.child.try_wait().expect("try_wait")
    });
    status.code().unwrap_or(-1)
}

#[test]
fn node_scripts_on_two_nodes_run_a_plan_and_end_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, tiny_plan_with(&[])).expect("write plan");
    let state_dir = dir.path().join("run");
    let coordinator = format!("127.0.0.1:{}", free_port());
    let bin = bin_dir();
    let common = [
        "--workers",
        "1",
        "--advertise-host",
        "127.0.0.1",
        "--bin-dir",
        bin.to_str().expect("utf-8"),
    ];
    let mut first_args = vec![
        "--coordinator",
        coordinator.as_str(),
        "--plan",
        plan.to_str().expect("utf-8"),
        "--state-dir",
        state_dir.to_str().expect("utf-8"),
    ];
    first_args.extend(common);
    // What each node would start.
    let dry = Command::new(node_sh())
        .args(&first_args)
        .arg("--dry-run")
        .output()
        .expect("node.sh --dry-run");
    assert!(dry.status.success(), "{}", text(&dry));
    let lines: Vec<String> = String::from_utf8_lossy(&dry.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let port = coordinator.rsplit(':').next().expect("port");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("{}/coordinator --plan ", bin.display()))
            && lines[0].contains(&format!("--listen 0.0.0.0:{port} --state-dir "))
            && lines[0].ends_with("--exit-when-done"),
        "{lines:?}"
    );
    // --retry-failed goes to the coordinator (a node without it starts its workers as ever).
    let retry = Command::new(node_sh())
        .args(&first_args)
        .args(["--retry-failed", "--dry-run"])
        .output()
        .expect("node.sh --dry-run");
    assert!(retry.status.success(), "{}", text(&retry));
    let retry = String::from_utf8_lossy(&retry.stdout).into_owned();
    assert!(
        retry
            .lines()
            .next()
            .is_some_and(|line| line.ends_with("--exit-when-done --retry-failed")),
        "{retry}"
    );
    // So do --retry-failed and --metrics-port, the coordinator's options, which a node without
    // --plan ignores (a Slurm job gives every node the same options).
    let workers_only = Command::new(node_sh())
        .args(["--coordinator", coordinator.as_str()])
        .args(common)
        .args(["--retry-failed", "--metrics-port", "9100", "--dry-run"])
        .output()
        .expect("node.sh --dry-run");
    assert!(workers_only.status.success(), "{}", text(&workers_only));
    assert!(
        String::from_utf8_lossy(&workers_only.stderr)
            .contains("--metrics-port is the coordinator's: ignored on this node"),
        "{}",
        text(&workers_only)
    );
    assert_eq!(
        String::from_utf8_lossy(&workers_only.stdout).trim_end(),
        lines[1],
        "a node without --plan starts its workers alone"
    );
    assert_eq!(
        lines[1],
        format!(
            "{}/worker --coordinator {coordinator} --device cpu --threads {} --advertise-host 127.0.0.1",
            bin.display(),
            nproc()
        )
    );

    // The coordinator lingers 10 s after the end (MENTOR_LINGER_SECONDS, --linger-seconds).
    let node_sh_text = node_sh().display().to_string();
    let mut lingering = vec!["MENTOR_LINGER_SECONDS=10", node_sh_text.as_str()];
    lingering.extend(first_args.iter().copied());
    let mut first = Process::start(Path::new("env"), &lingering, dir.path().join("node-0.log"));
    let mut second_args = vec!["--coordinator", coordinator.as_str()];
    second_args.extend(common);
    let mut second = Process::start(&node_sh(), &second_args, dir.path().join("node-1.log"));
    let second_code = wait_exit(&mut second, "the other node to end with the run");
    // Its workers gone, the coordinator still answers with the outcome, then ends.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let answered = try_status(&runtime, &format!("http://{coordinator}"));
    let first_code = wait_exit(&mut first, "the coordinator's node to end with the run");
    assert_eq!(
        answered.map(|status| status.status).as_deref(),
        Some("succeeded"),
        "{}",
        first.log_text()
    );
    let logs = format!(
        "node 0:\n{}\nnode 1:\n{}",
        first.log_text(),
        second.log_text()
    );
    assert_eq!(first_code, 0, "{logs}");
    assert_eq!(second_code, 0, "{logs}");
    // Every process's lines come out prefixed with its name.
    assert!(
        first.log_text().contains("[coordinator] ") && first.log_text().contains("[worker-0] "),
        "{logs}"
    );
    let status = saved_status(&state_dir);
    assert_eq!(status["status"], "succeeded", "{status}\n{logs}");
    assert_eq!(status["rounds"].as_array().map(Vec::len), Some(2));

    // A run that fails ends its coordinator's node with status 1.
    let failing = dir.path().join("failing.toml");
    std::fs::write(
        &failing,
        tiny_plan_with(&[
            (
                "min_confidence = 0.1",
                "min_confidence = 0.5\ntemperature = 100.0",
            ),
            ("min_workers = 2", "min_workers = 1"),
            // Long enough for the watcher below to see it running.
            (
                "[teacher.train]\nsteps = 30",
                "[teacher.train]\nsteps = 600",
            ),
        ]),
    )
    .expect("write plan");
    let failing_dir = dir.path().join("failing-run");
    let coordinator = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--coordinator",
        coordinator.as_str(),
        "--plan",
        failing.to_str().expect("utf-8"),
        "--state-dir",
        failing_dir.to_str().expect("utf-8"),
    ];
    args.extend(common);
    let mut no_linger = vec!["MENTOR_LINGER_SECONDS=0", node_sh_text.as_str()];
    no_linger.extend(args.iter().copied());
    let mut node = Process::start(Path::new("env"), &no_linger, dir.path().join("failing.log"));
    // A watcher that asks every 20 s finds the coordinator gone (no linger) at its next
    // question; the run directory tells it how the run ended.
    wait_for(
        "the coordinator to listen",
        Duration::from_secs(120),
        || try_status(&runtime, &format!("http://{coordinator}")),
    );
    let mut watcher = Process::start(
        &binary("mentor"),
        &[
            "status",
            "--coordinator",
            coordinator.as_str(),
            "--watch",
            "--json",
            "--interval",
            "20",
        ],
        dir.path().join("watcher.log"),
    );
    let code = wait_exit(&mut node, "the node of a failing run to end");
    assert_eq!(code, 1, "{}", node.log_text());
    let watched = wait_exit(&mut watcher, "the watcher to end with the run");
    assert_eq!(watched, 1, "{}", watcher.log_text());
    assert!(
        watcher
            .log_text()
            .lines()
            .last()
            .is_some_and(|line| line.contains("\"status\":\"failed\"")),
        "{}",
        watcher.log_text()
    );
    assert!(
        node.log_text()
            .contains("the run failed: round 1: no pseudo-labeled example passed the filter"),
        "{}",
        node.log_text()
    );
    assert_eq!(saved_status(&failing_dir)["status"], "failed");
}

#[test]
fn node_sh_refuses_what_it_cannot_start() {
    let refused = |args: &[&str], env: &[(&str, &str)]| {
        let output = Command::new(node_sh())
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("node.sh");
        assert_eq!(output.status.code(), Some(2), "{}", text(&output));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let bin = bin_dir();
    let bin = bin.to_str().expect("utf-8");
    assert!(refused(&["--workers", "1"], &[]).contains("--coordinator HOST:PORT is required"));
    assert!(refused(&["--coordinator", "host-only"], &[]).contains("expected HOST:PORT"));
    assert!(refused(
        &["--coordinator", "h:1", "--plan", "/no/such/plan.toml"],
        &[]
    )
    .contains("plan file /no/such/plan.toml not found"));
    let plan = workspace_root().join("deploy/plans/tiny.toml");
    assert!(refused(
        &[
            "--coordinator",
            "h:1",
            "--plan",
            plan.to_str().expect("utf-8")
        ],
        &[]
    )
    .contains("--plan needs --state-dir"));
    assert!(refused(
        &["--coordinator", "h:1", "--gpus", "all", "--bin-dir", bin],
        &[("CUDA_VISIBLE_DEVICES", "")]
    )
    .contains("this machine shows no GPU"));
    assert!(refused(
        &["--coordinator", "h:1", "--gpus", "2", "--bin-dir", bin],
        &[("CUDA_VISIBLE_DEVICES", "4")]
    )
    .contains("--gpus 2: this machine shows 1 GPU(s)"));
    assert!(refused(
        &["--coordinator", "h:1", "--gpus", "1", "--workers", "1"],
        &[]
    )
    .contains("not both"));
    assert!(refused(&["--coordinator", "h:1", "--workers", "0"], &[])
        .contains("no worker and no coordinator"));
    assert!(
        refused(&["--coordinator", "h:1", "--bin-dir", "/nowhere"], &[])
            .contains("--bin-dir /nowhere has no worker")
    );
    assert!(refused(&["--coordinator"], &[]).contains("--coordinator needs a value"));
    assert!(refused(&["--coordinator", "h:1", "--threads", "0"], &[])
        .contains("--threads takes a positive number"));
    assert!(refused(
        &["--coordinator", "h:1", "--device", "cuda", "--bin-dir", bin],
        &[("CUDA_VISIBLE_DEVICES", "")]
    )
    .contains("--device cuda: this machine shows no GPU"));
    assert!(refused(
        &[
            "--coordinator",
            "h:1",
            "--workers",
            "2",
            "--device",
            "cuda",
            "--bin-dir",
            bin
        ],
        &[("CUDA_VISIBLE_DEVICES", "4")]
    )
    .contains("--workers 2 --device cuda: this machine shows 1 GPU(s)"));
    // A machine whose `hostname` has no -I (busybox, inetutils): loopback, not a silent exit.
    let tools = tempfile::tempdir().expect("tempdir");
    let hostname = tools.path().join("hostname");
    std::fs::write(
        &hostname,
        "#!/bin/sh\necho 'hostname: invalid option -- I' >&2\nexit 1\n",
    )
    .expect("write");
    std::fs::set_permissions(
        &hostname,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let path = format!(
        "{}:{}",
        tools.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new(node_sh())
        .args([
            "--coordinator",
            "h:1",
            "--workers",
            "1",
            "--bin-dir",
            bin,
            "--dry-run",
        ])
        .env("PATH", path)
        .output()
        .expect("node.sh");
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("--advertise-host 127.0.0.1"),
        "{}",
        text(&output)
    );
    // A folder with a space in its name is one word to the shell.
    let spaced = tempfile::tempdir().expect("tempdir");
    let spaced_bin = spaced.path().join("bin dir");
    std::fs::create_dir_all(&spaced_bin).expect("mkdir");
    std::fs::copy(binary("worker"), spaced_bin.join("worker")).expect("copy");
    let output = Command::new(node_sh())
        .args(["--coordinator", "h:1", "--workers", "1", "--bin-dir"])
        .arg(&spaced_bin)
        .args(["--advertise-host", "127.0.0.1", "--dry-run"])
        .output()
        .expect("node.sh");
    let line = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        line.contains("bin\\ dir/worker --coordinator h:1"),
        "{line}"
    );
    let version = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} --version",
            line.split(" --coordinator").next().expect("binary")
        ))
        .output()
        .expect("bash");
    assert!(version.status.success(), "{}", text(&version));
    // GPUs as the scheduler hands them out: one worker per visible device, renumbered from 0.
    let output = Command::new(node_sh())
        .args(["--coordinator", "h:1", "--gpus", "all", "--bin-dir", bin])
        .args(["--advertise-host", "10.0.0.7", "--dry-run"])
        .env("CUDA_VISIBLE_DEVICES", "3,5")
        .output()
        .expect("node.sh");
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!(
            "{bin}/worker --coordinator h:1 --device cuda:0 --threads {threads} --advertise-host 10.0.0.7\n\
             {bin}/worker --coordinator h:1 --device cuda:1 --threads {threads} --advertise-host 10.0.0.7\n",
            threads = (nproc().parse::<u32>().expect("nproc") / 2).max(1)
        )
    );
}

#[test]
fn the_slurm_batch_script_runs_a_plan_over_the_job_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, tiny_plan_with(&[])).expect("write plan");
    let state_dir = dir.path().join("run");
    let fake_slurm = workspace_root().join("tests/fake-slurm");
    let path = format!(
        "{}:{}",
        fake_slurm.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let port = free_port().to_string();
    let output = Command::new("bash")
        .arg(workspace_root().join("deploy/slurm/mentor.sbatch"))
        .arg(&plan)
        .arg(&state_dir)
        .args(["--workers", "1", "--device", "cpu", "--advertise-host"])
        .args(["127.0.0.1", "--bin-dir"])
        .arg(bin_dir())
        .current_dir(workspace_root())
        .env("PATH", path)
        .env("SLURM_JOB_ID", "7")
        .env("SLURM_JOB_NUM_NODES", "2")
        .env("SLURM_JOB_NODELIST", "127.0.0.1,127.0.0.1")
        .env("SLURM_SUBMIT_DIR", workspace_root())
        .env("MENTOR_PORT", &port)
        .env("MENTOR_LINGER_SECONDS", "0")
        .output()
        .expect("run the batch script");
    let log = text(&output);
    assert!(output.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "job 7: coordinator on 127.0.0.1:{port}, 2 node(s)"
        )),
        "{log}"
    );
    // One coordinator, two workers: one per node.
    assert_eq!(
        log.matches("[node] started coordinator").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("[node] started worker-0").count(), 2, "{log}");
    let status = saved_status(&state_dir);
    assert_eq!(status["status"], "succeeded", "{status}\n{log}");
}

/// The manifests as data (PyYAML, which scripts/setup.sh installs in the project's Python).
fn manifests(file: &str) -> Vec<serde_json::Value> {
    let path = workspace_root().join("deploy/kubernetes").join(file);
    let output = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(&path)
        .output()
        .expect("python3 (scripts/test.sh puts the project's venv first on PATH)");
    assert!(output.status.success(), "{}: {}", file, text(&output));
    serde_json::from_slice(&output.stdout).expect("JSON")
}

fn of_kind<'a>(documents: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The container's command line with the pod's environment filled in.
fn container_args(job: &serde_json::Value) -> (Vec<String>, &serde_json::Value) {
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"], serde_json::json!(["node.sh"]));
    let args = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string").replace("$(POD_IP)", "10.0.0.7"))
        .collect();
    (args, container)
}

#[test]
fn the_kubernetes_manifests_start_what_they_say() {
    let coordinator = manifests("coordinator.yaml");
    let workers = manifests("workers.yaml");
    let storage = manifests("storage.yaml");
    let kustomization = manifests("kustomization.yaml");
    let service = of_kind(&coordinator, "Service");
    let job = of_kind(&coordinator, "Job");
    let worker_job = of_kind(&workers, "Job");
    let claim = of_kind(&storage, "PersistentVolumeClaim");

    // The names the pieces find each other by agree.
    let service_port = &service["spec"]["ports"][0]["port"];
    let address = format!(
        "{}:{}",
        service["metadata"]["name"].as_str().expect("name"),
        service_port
    );
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/name"],
        job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    );
    let claim_name = &claim["metadata"]["name"];
    for job in [job, worker_job] {
        let volumes = job["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes");
        assert!(
            volumes
                .iter()
                .any(|v| &v["persistentVolumeClaim"]["claimName"] == claim_name),
            "{job}"
        );
    }
    let generated = &kustomization[0]["configMapGenerator"][0];
    assert_eq!(
        job["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"],
        generated["name"]
    );
    assert_eq!(generated["files"], serde_json::json!(["plan.toml"]));
    assert_eq!(
        worker_job["spec"]["parallelism"],
        worker_job["spec"]["completions"]
    );
    // The coordinator is ready when its gRPC port listens, alive while it answers status
    // queries (its probes run here against a real coordinator, below).
    let coordinator_container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        coordinator_container["readinessProbe"]["tcpSocket"]["port"],
        service["spec"]["ports"][0]["targetPort"]
    );
    let probe_command = |probe: &str| -> Vec<String> {
        coordinator_container[probe]["exec"]["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{probe}: {coordinator_container}"))
            .iter()
            .map(|part| part.as_str().expect("a string").to_string())
            .collect()
    };
    let liveness = probe_command("livenessProbe");
    assert_eq!(probe_command("startupProbe"), liveness);
    assert!(
        liveness[2].contains(&format!("--coordinator 127.0.0.1:{}", service_port)),
        "{liveness:?}"
    );
    // Both pods run as the image's unprivileged user, which owns nothing it should not write.
    let dockerfile = std::fs::read_to_string(workspace_root().join("deploy/docker/Dockerfile"))
        .expect("the Dockerfile");
    let image_user = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("USER "))
        .next_back()
        .expect("the image names its user");
    let (uid, gid) = image_user.split_once(':').expect("USER uid:gid");
    for job in [job, worker_job] {
        let pod = &job["spec"]["template"]["spec"];
        let security = &pod["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{pod}");
        assert_eq!(security["runAsUser"].to_string(), uid, "{pod}");
        assert_eq!(security["runAsGroup"].to_string(), gid, "{pod}");
        assert_eq!(security["fsGroup"].to_string(), gid, "{pod}");
        assert_eq!(
            security["seccompProfile"]["type"], "RuntimeDefault",
            "{pod}"
        );
        let container = &pod["containers"][0]["securityContext"];
        assert_eq!(container["allowPrivilegeEscalation"], false, "{pod}");
        assert_eq!(
            container["capabilities"]["drop"],
            serde_json::json!(["ALL"])
        );
    }
    assert_ne!(uid, "0", "the image runs as root");
    // Worker pods are not best-effort, their shared memory is bounded, and they may land on
    // GPU nodes tainted for GPU pods.
    let worker_spec = &worker_job["spec"]["template"]["spec"];
    let requests = &worker_spec["containers"][0]["resources"]["requests"];
    assert!(
        requests["cpu"].is_string() && requests["memory"].is_string(),
        "{requests}"
    );
    let shm = worker_spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["emptyDir"]["medium"] == "Memory")
        .expect("a shared-memory volume");
    assert!(shm["emptyDir"]["sizeLimit"].is_string(), "{shm}");
    assert!(
        worker_spec["tolerations"]
            .as_array()
            .expect("tolerations")
            .iter()
            .any(|t| t["key"] == "nvidia.com/gpu"),
        "{worker_spec}"
    );

    // Each container's command line, as node.sh reads it (the pod's paths mapped to this
    // checkout's): the coordinator alone in its pod, one GPU worker per worker pod.
    let plan = workspace_root().join("deploy/kubernetes/plan.toml");
    let bin = bin_dir();
    let dry_run = |args: Vec<String>| {
        let args: Vec<String> = args
            .into_iter()
            .map(|a| {
                if a == "/etc/mentor/plan.toml" {
                    plan.display().to_string()
                } else {
                    a
                }
            })
            .collect();
        let output = Command::new(node_sh())
            .args(&args)
            .arg("--bin-dir")
            .arg(&bin)
            .arg("--dry-run")
            .env("CUDA_VISIBLE_DEVICES", "0")
            .output()
            .expect("node.sh");
        assert!(output.status.success(), "{args:?}: {}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let (args, container) = container_args(job);
    assert_eq!(container["ports"][0]["containerPort"], *service_port);
    assert!(args
        .windows(2)
        .any(|w| w[0] == "--coordinator" && w[1] == address));
    let started = dry_run(args);
    assert_eq!(started.lines().count(), 1, "{started}");
    assert!(
        started.contains(&format!(
            "/coordinator --plan {} --listen 0.0.0.0:{service_port} --state-dir /runs/",
            plan.display()
        )) && started
            .trim_end()
            .ends_with("--exit-when-done --metrics-listen 0.0.0.0:9090"),
        "{started}"
    );
    let (args, container) = container_args(worker_job);
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], 1);
    let started = dry_run(args);
    assert_eq!(
        started,
        format!(
            "{}/worker --coordinator {address} --connect-timeout-seconds 600 --device cuda:0 --threads 4 --advertise-host 10.0.0.7\n",
            bin.display()
        )
    );

    // The probe, as the pod runs it (its `mentor` the one built here): alive while a
    // coordinator answers on the port, not once none does.
    let probe = |port: u16| {
        let script = liveness[2].replace(
            &format!("127.0.0.1:{service_port}"),
            &format!("127.0.0.1:{port}"),
        );
        Command::new(&liveness[0])
            .arg(&liveness[1])
            .arg(script)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .status()
            .expect("the probe")
            .success()
    };
    let port = free_port();
    let state_dir = tempfile::tempdir().expect("tempdir");
    let tiny = workspace_root().join("deploy/plans/tiny.toml");
    let mut live = Process::start(
        &binary("coordinator"),
        &[
            "--plan",
            tiny.to_str().expect("utf-8"),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
            state_dir.path().to_str().expect("utf-8"),
        ],
        state_dir.path().join("coordinator.log"),
    );
    wait_for("the coordinator to listen", Duration::from_secs(60), || {
        state_dir
            .path()
            .join("coordinator.addr")
            .exists()
            .then_some(())
    });
    assert!(probe(port), "the probe fails a live coordinator");
    live.child.kill().expect("kill");
    let _ = live.child.wait();
    assert!(!probe(port), "the probe passes with no coordinator");

    // The deployment's plan is the demo plan (comments aside), and passes `mentor plan`.
    let parse = |path: &Path| {
        let text = std::fs::read_to_string(path).expect("plan");
        mentor_plan::Plan::from_toml_str(&text).expect("plan parses")
    };
    assert_eq!(
        parse(&plan),
        parse(&workspace_root().join("deploy/plans/fashion-mnist-noisy-student.toml"))
    );
    let output = Command::new(binary("mentor"))
        .arg("plan")
        .arg(&plan)
        .output()
        .expect("mentor plan");
    assert!(output.status.success(), "{}", text(&output));

    // kubectl, where there is one, renders the whole of it.
    if let Ok(output) = Command::new("kubectl")
        .args(["kustomize"])
        .arg(workspace_root().join("deploy/kubernetes"))
        .output()
    {
        assert!(output.status.success(), "{}", text(&output));
        let rendered = String::from_utf8_lossy(&output.stdout);
        assert!(
            rendered.contains("kind: ConfigMap")
                && rendered.contains("image: registry.example.com/mentor:latest"),
            "{rendered}"
        );
    }
}

/// `GET PATH` on `address`: the status line and the body.
fn http_get(address: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers and body");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// With --exit-when-done, a coordinator stopped before its run ends must not look successful
/// to a scheduler: status 2, saying how to resume. Meanwhile it serves its status to
/// Prometheus (--metrics-listen).
#[test]
fn a_coordinator_stopped_before_its_run_ends_exits_with_status_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("run");
    let plan = workspace_root().join("deploy/plans/tiny.toml");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut coordinator = Process::start(
        &binary("coordinator"),
        &[
            "--plan",
            plan.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state_dir.to_str().expect("utf-8"),
            "--exit-when-done",
            "--metrics-listen",
            &metrics,
        ],
        dir.path().join("coordinator.log"),
    );
    wait_for("the coordinator to listen", Duration::from_secs(60), || {
        state_dir.join("coordinator.addr").exists().then_some(())
    });
    let (line, body) = http_get(&metrics, "/metrics");
    assert_eq!(line, "HTTP/1.1 200 OK", "{body}");
    assert!(
        body.contains("name=\"tiny\",method=\"noisy-student\",status=\"running\",phase=\"waiting-for-workers\"} 1")
            && body.lines().any(|l| l == "mentor_workers_required 2")
            && body.lines().any(|l| l == "mentor_workers{state=\"active\"} 0"),
        "{body}"
    );
    let (line, _) = http_get(&metrics, "/elsewhere");
    assert_eq!(line, "HTTP/1.1 404 Not Found");
    assert!(
        coordinator
            .log_text()
            .contains(&format!("http://{metrics}/metrics")),
        "{}",
        coordinator.log_text()
    );
    let killed = Command::new("kill")
        .args(["-TERM", &coordinator.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let code = wait_exit(&mut coordinator, "the coordinator to stop");
    let log = coordinator.log_text();
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("stopped before the run ended; starting the coordinator again on"),
        "{log}"
    );
}
