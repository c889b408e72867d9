//! Data-parallel training across worker processes (TCP ring on CPU): two ranks end where one
//! worker with the same global batch ends, and a rank that dies fails its group without hangs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mentor_e2e::{
    start_coordinator, start_coordinator_on, start_worker, tiny_plan_with, try_status,
    wait_for_file, wait_for_or_explain, watch_run, workspace_root, Process,
};
use mentor_proto::coordinator::v1 as pb;

/// The tiny plan, one round, with a deterministic teacher: no batch norm, no augmentation,
/// no dropout, so that data-parallel ranks can match a single worker exactly.
fn deterministic_plan(world_size: u32, min_workers: u32, teacher_steps: u32) -> String {
    let tiny = std::fs::read_to_string(workspace_root().join("deploy/plans/tiny.toml"))
        .expect("tiny plan");
    let plan = tiny
        .replacen("rounds = 2", "rounds = 1", 1)
        .replacen("width_growth_per_round = 4\n", "", 1)
        .replacen(
            "min_workers = 2",
            &format!("min_workers = {min_workers}\nworld_size = {world_size}"),
            1,
        )
        .replacen(
            "[teacher.model]\nkind = \"cnn\"\nwidth = 8\nhidden = 32",
            "[teacher.model]\nkind = \"cnn\"\nwidth = 8\nhidden = 32\nbatch_norm = false",
            1,
        )
        .replacen(
            "[teacher.train]\nsteps = 30\nbatch_size = 32",
            &format!(
                "[teacher.train]\nsteps = {teacher_steps}\nbatch_size = 32\nflip_and_shift = false"
            ),
            1,
        );
    assert!(plan.contains("batch_norm = false") && plan.contains("flip_and_shift = false"));
    plan
}

struct Run {
    dir: tempfile::TempDir,
    coordinator: Process,
    address: String,
    runtime: tokio::runtime::Runtime,
}

impl Run {
    fn start(plan_text: &str) -> Run {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let plan = dir.path().join("plan.toml");
        std::fs::write(&plan, plan_text).expect("write plan");
        let state_dir = dir.path().join("run");
        let (coordinator, address) = start_coordinator(&plan, &state_dir);
        Run {
            dir,
            coordinator,
            address,
            runtime,
        }
    }

    fn worker(&self, name: &str) -> Process {
        start_worker(&self.address, self.dir.path().join(format!("{name}.log")))
    }

    fn status(&self) -> Option<pb::RunStatus> {
        try_status(&self.runtime, &self.address)
    }

    fn wait_finished(&mut self) -> pb::RunStatus {
        watch_run(
            &self.runtime,
            &self.address,
            &mut self.coordinator,
            Duration::from_secs(600),
            |_| {},
        )
    }

    fn teacher(&self) -> PathBuf {
        self.dir
            .path()
            .join("run/checkpoints/round-1-teacher.safetensors")
    }
}

fn read_checkpoint(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut named: Vec<(String, Vec<f32>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, values)
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

#[test]
fn two_ranks_end_with_the_parameters_of_one_worker() {
    let mut single = Run::start(&deterministic_plan(1, 1, 20));
    let _solo = single.worker("solo");
    let single_status = single.wait_finished();
    assert_eq!(single_status.status, "succeeded", "{}", single_status.error);

    let mut pair = Run::start(&deterministic_plan(2, 2, 20));
    let workers = [pair.worker("rank-a"), pair.worker("rank-b")];
    let pair_status = pair.wait_finished();
    assert_eq!(pair_status.status, "succeeded", "{}", pair_status.error);
    let logs: String = workers.iter().map(|w| w.log_text()).collect();
    assert_eq!(
        logs.matches("data-parallel group formed").count(),
        4,
        "teacher and student trained on 2 ranks:\n{logs}"
    );

    let one = read_checkpoint(&single.teacher());
    let two = read_checkpoint(&pair.teacher());
    assert_eq!(
        one.iter().map(|t| &t.0).collect::<Vec<_>>(),
        two.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    // Equal up to float rounding (the gradient summed in another order), amplified over 20
    // steps: within 1e-4 plus 0.1% of the value (a rank training on its half of the batch
    // alone, or a wrong normalisation, is off by percents).
    let mut largest = 0f32;
    let mut changed = false;
    let mut worst = String::new();
    for ((name, a), (_, b)) in one.iter().zip(&two) {
        for (x, y) in a.iter().zip(b) {
            let excess = (x - y).abs() / (1e-4 + 1e-3 * x.abs());
            if excess > largest {
                worst = format!("{name}: {x} against {y}");
            }
            largest = largest.max(excess);
        }
        changed |= a.iter().any(|v| *v != 0.0);
        assert_eq!(a.len(), b.len(), "{name}");
    }
    assert!(changed);
    assert!(
        largest <= 1.0,
        "parameters differ by up to {largest} times the rounding allowed ({worst})"
    );
}

#[test]
fn a_dead_rank_fails_its_group_and_the_task_reruns_without_it() {
    let mut run = Run::start(&deterministic_plan(0, 2, 3000));
    let mut doomed = run.worker("doomed");
    let survivor = run.worker("survivor");
    let logs = || {
        format!(
            "coordinator:\n{}\ndoomed:\n{}\nsurvivor:\n{}",
            run.coordinator.log_text(),
            doomed.log_text(),
            survivor.log_text()
        )
    };
    wait_for_or_explain(
        "both ranks to train",
        Duration::from_secs(120),
        || {
            let status = run.status()?;
            // A run that ends here (a group that never formed) says why instead of timing out.
            assert!(status.status != "failed", "{}\n{}", status.error, logs());
            let training = status
                .workers
                .iter()
                .filter(|w| w.task.starts_with("train teacher (rank") && w.step > 0)
                .count();
            (training == 2).then_some(())
        },
        logs,
    );
    doomed.child.kill().expect("kill a rank");
    let _ = doomed.child.wait();
    let status = run.wait_finished();
    assert_eq!(status.status, "succeeded", "{}", status.error);
    let survivor_log = survivor.log_text();
    assert!(
        survivor_log.contains("data-parallel group failed"),
        "{survivor_log}"
    );
    // The rerun formed a group of one, without waiting for the dead worker.
    let coordinator_log = run.coordinator.log_text();
    let reruns = coordinator_log
        .lines()
        .filter(|line| {
            line.contains("task assigned")
                && line.contains("kind=train teacher")
                && line.contains("world_size=1")
        })
        .count();
    assert_eq!(reruns, 1, "{coordinator_log}");
    // The dead rank cost the task a lost attempt, not one of its 3 failures.
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.dir.path().join("run/state.json")).expect("state.json"),
    )
    .expect("state");
    let teacher = saved["tasks"]
        .as_object()
        .expect("tasks")
        .values()
        .find(|task| task["world_size"] == 1 && task["attempts"].as_u64().is_some_and(|n| n > 1))
        .unwrap_or_else(|| panic!("no task ran again: {saved}"));
    assert_eq!(teacher["failures"], 0, "{teacher}");
    // The lost attempt got further than every attempt before it: not one of the losses in a row that
    // end a run (see `a_training_without_progress_is_given_up_after_the_progress_timeout`).
    assert_eq!(teacher["losses"], 0, "{teacher}");
    assert!(
        teacher["reached"]["best"]
            .as_u64()
            .is_some_and(|step| step > 0),
        "{teacher}"
    );
}

/// A rank that registered but never joins its group (a worker hung while loading its data
/// set) fails that attempt at the join timeout, naming the rank; the run then waits for workers
/// instead of forming a group it cannot fill (a plan's fixed `world_size` needs that many), and
/// goes on when another worker comes. The join timeout is the one of the run as resumed: a
/// worker that outlived a coordinator restart uses the timeout the restarted run set, not the
/// one it read when it started.
#[test]
fn a_group_whose_ranks_never_join_fails_naming_them() {
    let plan = |join_timeout: u32| {
        deterministic_plan(2, 1, 20).replacen(
            "world_size = 2",
            &format!("world_size = 2\njoin_timeout_seconds = {join_timeout}"),
            1,
        )
    };
    let mut run = Run::start(&plan(3600));
    let _first = run.worker("first");
    // One worker cannot be two ranks: the run starts and waits.
    let started = |run: &Run| {
        wait_for_or_explain(
            "the run to start with one worker",
            Duration::from_secs(180),
            || {
                let status = run.status()?;
                (status.phase == "train-teacher" && status.workers.len() == 1).then_some(())
            },
            String::new,
        )
    };
    started(&run);
    // The coordinator restarts on the same address with a 2-second join timeout; the worker
    // registers again and goes on.
    run.coordinator.child.kill().expect("kill the coordinator");
    let _ = run.coordinator.child.wait();
    let plan_path = run.dir.path().join("plan.toml");
    std::fs::write(&plan_path, plan(2)).expect("write plan");
    let listen = run.address.trim_start_matches("http://").to_string();
    run.coordinator = start_coordinator_on(&plan_path, &listen, &run.dir.path().join("run")).0;
    started(&run);
    // A worker registers and never asks for work: counted while it may still be loading, it
    // makes the group of two, which it never joins.
    let address = run.address.clone();
    run.runtime.block_on(async {
        let mut client = pb::worker_service_client::WorkerServiceClient::connect(address)
            .await
            .expect("connect");
        client
            .register(pb::RegisterRequest {
                hostname: "hung".into(),
                device: "cpu".into(),
                pid: 0,
                instance: String::new(),
                running: None,
                gpu: String::new(),
            })
            .await
            .expect("register");
    });
    let state = run.dir.path().join("run/state.json");
    let error = wait_for_or_explain(
        "the attempt to fail at the join timeout",
        Duration::from_secs(180),
        || {
            let saved: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&state).ok()?).ok()?;
            saved["tasks"].as_object()?.values().find_map(|task| {
                let error = task["last_error"].as_str()?;
                error.contains("did not join").then(|| error.to_string())
            })
        },
        String::new,
    );
    assert!(
        error.contains("ranks [1] of 2 did not join task") && error.ends_with("within 2s"),
        "{error}"
    );
    // The run does not fail on it: it waits for a second worker, and ends with one.
    std::thread::sleep(Duration::from_secs(6));
    let waiting = run.status().expect("status");
    assert_eq!(waiting.status, "running", "{}", waiting.error);
    let _second = run.worker("second");
    let status = run.wait_finished();
    assert_eq!(status.status, "succeeded", "{}", status.error);
}

/// Workers on separate hosts, emulated by loopback addresses: the coordinator listens on every
/// interface, each worker reaches it by `HOST:PORT` and listens for its ring neighbour on its
/// own `--advertise-host` only, so the group forms only if each rank is reached at the address
/// it advertised.
#[test]
fn ranks_on_separate_hosts_meet_at_their_advertised_addresses() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, deterministic_plan(2, 2, 20)).expect("write plan");
    let state_dir = dir.path().join("run");
    let (mut coordinator, written) =
        mentor_e2e::start_coordinator_on(&plan, "0.0.0.0:0", &state_dir);
    let port = written.rsplit(':').next().expect("port");
    assert_eq!(written, format!("http://0.0.0.0:{port}"));
    let reach = format!("127.0.0.1:{port}");
    let workers: Vec<Process> = ["127.0.0.2", "127.0.0.3"]
        .iter()
        .enumerate()
        .map(|(index, host)| {
            Process::start(
                &mentor_e2e::binary("worker"),
                &[
                    "--coordinator",
                    &reach,
                    "--threads",
                    "1",
                    "--advertise-host",
                    host,
                ],
                dir.path().join(format!("worker-{index}.log")),
            )
        })
        .collect();
    let status = watch_run(
        &runtime,
        &format!("http://{reach}"),
        &mut coordinator,
        Duration::from_secs(600),
        |_| {},
    );
    let logs: String = workers.iter().map(|w| w.log_text()).collect();
    assert_eq!(status.status, "succeeded", "{}\n{logs}", status.error);
    assert!(status.rounds[0].teacher_test_accuracy.is_some());
    // The ring went through the advertised addresses.
    let joined = logs
        .lines()
        .find(|line| line.contains("every rank joined"))
        .unwrap_or_else(|| panic!("no group formed:\n{logs}"));
    assert!(
        joined.contains("\"127.0.0.2:") && joined.contains("\"127.0.0.3:"),
        "{joined}"
    );
}

/// A two-rank training (teacher with batch norm, flips and shifts: per-rank statistics and
/// noise; Adam, whose moment estimates and step count the save carries) whose second rank is
/// killed after a save resumes from it once a replacement joins, and ends with exactly the
/// teacher of a two-rank run that was not interrupted.
#[test]
fn a_two_rank_training_resumes_from_its_save_exactly() {
    let plan = tiny_plan_with(&[
        (
            "[teacher.train]\n",
            "[teacher.train]\noptimizer = \"adam\"\nlearning_rate = 0.003\n",
        ),
        ("rounds = 2", "rounds = 1"),
        ("width_growth_per_round = 4\n", ""),
        ("min_workers = 2", "min_workers = 2\nworld_size = 2"),
        ("steps = 30", "steps = 400"),
        ("log_every = 10", "log_every = 10\ncheckpoint_every = 40"),
        (
            "heartbeat_timeout_seconds = 10",
            "heartbeat_timeout_seconds = 2",
        ),
    ]);
    let mut whole = Run::start(&plan);
    let _workers = [whole.worker("a"), whole.worker("b")];
    let status = whole.wait_finished();
    assert_eq!(status.status, "succeeded", "{}", status.error);

    let mut interrupted = Run::start(&plan);
    let first = interrupted.worker("a");
    let mut doomed = interrupted.worker("b");
    let save = interrupted
        .dir
        .path()
        .join("run/checkpoints/round-1-teacher.resume.safetensors");
    wait_for_file(&save);
    doomed.child.kill().expect("kill a rank");
    let _ = doomed.child.wait();
    let replacement = interrupted.worker("c");
    let status = interrupted.wait_finished();
    assert_eq!(status.status, "succeeded", "{}", status.error);
    let logs = format!("{}{}", first.log_text(), replacement.log_text());
    // Both ranks of the next attempt (more, should a worker be declared lost meanwhile).
    for worker in [&first, &replacement] {
        let log = worker.log_text();
        assert!(
            log.contains("the training resumes from its save"),
            "a rank did not resume:\n{logs}"
        );
    }
    assert!(
        std::fs::read(whole.teacher()).expect("teacher")
            == std::fs::read(interrupted.teacher()).expect("teacher"),
        "the resumed two-rank teacher differs from the uninterrupted one's"
    );
}
