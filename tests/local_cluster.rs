//! A real coordinator and two real worker processes on loopback run the tiny plan on real
//! Fashion-MNIST images; the run must succeed and leave complete, valid soft-label shards.

use std::path::Path;
use std::time::Duration;

use mentor_e2e::{
    binary, free_loopback_address, plan_with, run_on_two_workers, saved_state, start_coordinator,
    start_coordinator_in, start_coordinator_on, start_coordinator_with, start_worker,
    start_worker_in, start_worker_with, status, tiny_plan_with, try_status, wait_for,
    wait_for_file, wait_for_or_explain, watch_run, workspace_root, Process,
    ONE_WORKER_SHORT_HEARTBEAT,
};
use mentor_labels::{read_round, ShardStore};

#[test]
fn tiny_plan_runs_two_rounds_on_two_worker_processes() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("run");
    // The plan's data and soft-label store are named relative to where the coordinator runs;
    // the workers run elsewhere (as on other machines) and are sent absolute paths.
    let tiny = tiny_plan_with(&[]);
    std::os::unix::fs::symlink(plan_data_dir(&tiny), dir.path().join("data")).expect("symlink");
    let plan = dir.path().join("tiny.toml");
    let relative = tiny_plan_with(&[
        (
            "dir = \"/usr/share/datasets/fashion-mnist\"",
            "dir = \"data\"",
        ),
        (
            "[pseudo_labels]\n",
            "[pseudo_labels]\nstorage = \"run/pseudo-labels\"\n",
        ),
    ]);
    std::fs::write(&plan, relative).expect("write plan");
    let (mut coordinator, address) =
        start_coordinator_in(&plan, "127.0.0.1:0", &state_dir, &[], dir.path());
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("elsewhere");
    // The second worker is given the address as the coordinator's --listen takes it, without
    // `http://`.
    let bare_address = address.strip_prefix("http://").expect("an http:// address");
    let mut workers = vec![
        start_worker_in(&address, dir.path().join("worker-1.log"), &elsewhere),
        start_worker_in(bare_address, dir.path().join("worker-2.log"), &elsewhere),
    ];

    let mut seen_workers_busy = 0;
    let final_status = watch_run(
        &runtime,
        &address,
        &mut coordinator,
        Duration::from_secs(600),
        |current| {
            seen_workers_busy = seen_workers_busy.max(
                current
                    .workers
                    .iter()
                    .filter(|w| !w.task_id.is_empty())
                    .count(),
            );
        },
    );
    let logs: String = workers.iter().map(|w| w.log_text()).collect();
    assert_eq!(
        final_status.status,
        "succeeded",
        "run failed: {}\ncoordinator log:\n{}\nworker logs:\n{logs}",
        final_status.error,
        coordinator.log_text()
    );
    assert_eq!(final_status.method, "noisy-student");
    assert_eq!(final_status.workers.len(), 2);
    // The run records the absolute paths it sent.
    let recorded = saved_state(&state_dir)["plan_toml"]
        .as_str()
        .expect("plan_toml")
        .to_string();
    let absolute = |path: &str| dir.path().join(path).display().to_string();
    assert!(
        recorded.contains(&format!("dir = \"{}\"", absolute("data")))
            && recorded.contains(&format!("storage = \"{}\"", absolute("run/pseudo-labels"))),
        "{recorded}"
    );
    // The same plan, relative paths and all, is this run's for `mentor plan --state-dir` (what
    // `local-cluster.sh` asks before it resumes a run).
    let output = std::process::Command::new(binary("mentor"))
        .current_dir(dir.path())
        .args(["plan", "tiny.toml", "--state-dir", "run"])
        .output()
        .expect("mentor plan");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        seen_workers_busy, 2,
        "labeling tasks were never spread over both workers"
    );

    // Both rounds measured, pseudo labels counted.
    assert_eq!(final_status.rounds.len(), 2);
    for round in &final_status.rounds {
        let teacher = round.teacher_test_accuracy.expect("teacher accuracy");
        let student = round.student_test_accuracy.expect("student accuracy");
        assert!((0.0..=1.0).contains(&teacher) && (0.0..=1.0).contains(&student));
        assert_eq!(round.shards, 4);
        assert_eq!(round.shards_done, 4);
        assert_eq!(round.examples, 1500);
        assert!(round.kept > 0);
    }
    // A trained teacher beats chance (10 classes) on real images.
    assert!(final_status.rounds[0].teacher_test_accuracy.unwrap_or(0.0) > 0.3);
    // The teacher of round 2 is the student of round 1.
    assert_eq!(
        final_status.rounds[1].teacher_test_accuracy,
        final_status.rounds[0].student_test_accuracy
    );

    // Workers exit by themselves once the run is over.
    for worker in &mut workers {
        wait_for("a worker to exit", Duration::from_secs(30), || {
            (!worker.is_running()).then_some(())
        });
    }

    // Shards and manifests are complete and valid; no temporary file is left behind.
    let store =
        ShardStore::open(&state_dir.join("pseudo-labels").display().to_string()).expect("store");
    for round in 1..=2u32 {
        let (manifest, shards) = read_round(&store, round).expect("manifest and shards read back");
        assert_eq!(manifest.shards.len(), 4);
        assert_eq!(manifest.examples, 1500);
        assert_eq!(manifest.top_k, 3);
        let mut ids: Vec<i64> = shards.iter().flat_map(|s| s.example_ids.clone()).collect();
        assert_eq!(ids.len(), 1500);
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 1500, "an example was labeled twice");
        for shard in &shards {
            assert_eq!(shard.top_k, 3);
            for row in 0..shard.len() {
                let probs: Vec<f32> = shard.probs[row * 3..row * 3 + 3]
                    .iter()
                    .map(|p| p.to_f32())
                    .collect();
                assert!(
                    probs.windows(2).all(|w| w[0] >= w[1]),
                    "top-k not sorted: {probs:?}"
                );
                assert!(probs.iter().sum::<f32>() <= 1.01);
            }
        }
        let entries: Vec<String> =
            std::fs::read_dir(state_dir.join(format!("pseudo-labels/round-{round}")))
                .expect("round dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
        assert!(
            entries.iter().all(|name| !name.starts_with('.')),
            "temporary files left: {entries:?}"
        );
        assert!(state_dir
            .join(format!("checkpoints/round-{round}-student.safetensors"))
            .exists());

        // `mentor labels` counts what the shards hold, class by class, and gives what the
        // filter kept.
        let output = std::process::Command::new(binary("mentor"))
            .args([
                "labels",
                "--round",
                &round.to_string(),
                "--json",
                "--state-dir",
            ])
            .arg(&state_dir)
            .output()
            .expect("mentor labels");
        assert!(output.status.success(), "{output:?}");
        let summary: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("one JSON object");
        let (mut top1, mut passing) = (vec![0u64; 10], vec![0u64; 10]);
        for shard in &shards {
            for row in 0..shard.len() {
                let class = shard.class_ids[row * 3] as usize;
                top1[class] += 1;
                passing[class] += u64::from(shard.probs[row * 3].to_f32() >= 0.1);
            }
        }
        let column = |name: &str| -> Vec<u64> {
            summary["classes"]
                .as_array()
                .expect("classes")
                .iter()
                .map(|class| class[name].as_u64().expect(name))
                .collect()
        };
        assert_eq!(column("top1"), top1, "{summary}");
        assert_eq!(column("passing"), passing, "{summary}");
        assert_eq!(summary["examples"], 1500);
        assert_eq!(summary["shards_labeled"], 4);
        assert_eq!(summary["filtered"], true);
        assert_eq!(
            summary["kept"].as_u64(),
            Some(final_status.rounds[round as usize - 1].kept)
        );
        let text = std::process::Command::new(binary("mentor"))
            .args(["labels", "--round", &round.to_string(), "--state-dir"])
            .arg(&state_dir)
            .output()
            .expect("mentor labels");
        let text = String::from_utf8_lossy(&text.stdout).into_owned();
        assert!(
            text.starts_with(&format!(
                "round {round}: 4 of 4 shards labeled, 1,500 examples"
            )) && text.contains("threshold"),
            "{text}"
        );
    }
    assert!(state_dir
        .join("checkpoints/round-1-teacher.safetensors")
        .exists());
    // No third round; a Meta Pseudo Labels run writes no labels (below).
    let output = std::process::Command::new(binary("mentor"))
        .args(["labels", "--round", "3", "--state-dir"])
        .arg(&state_dir)
        .output()
        .expect("mentor labels");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("has no round 3 yet"),
        "{output:?}"
    );
    assert!(store.exists("round-2/manifest.json").expect("exists"));

    // The format opens in one line of Python, as the README shows.
    let python = std::env::var("MENTOR_PYTHON").unwrap_or_else(|_| "python3".into());
    let shard = state_dir.join("pseudo-labels/round-1/shard-00000.safetensors");
    let output = std::process::Command::new(&python)
        .args([
            "-c",
            "import sys; from safetensors.numpy import load_file; d = load_file(sys.argv[1]); \
             print(d['example_id'].shape[0], d['probs'].dtype, d['class_ids'].shape[1])",
            shard.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run python (scripts/test.sh puts the project's venv first on PATH)");
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "400 float16 3"
    );

    // The final student at work: `predict` evaluates it as the run did, and classifies the same
    // test images written as PNG files the same way.
    let student = state_dir.join("checkpoints/round-2-student.safetensors");
    let predict = |extra: &[&str]| {
        let output = std::process::Command::new(binary("predict"))
            .current_dir(dir.path())
            .args(["--plan", plan.to_str().expect("utf-8"), "--round", "2"])
            .arg("--checkpoint")
            .arg(&student)
            .args(extra)
            .output()
            .expect("run predict");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "predict failed: {stderr}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let evaluated: serde_json::Value =
        serde_json::from_str(&predict(&[])).expect("one JSON object");
    // Named by its run directory, the final student is the last round's.
    assert_eq!(predict_run_dir(&state_dir), evaluated);
    let run_accuracy = final_status.rounds[1]
        .student_test_accuracy
        .expect("student accuracy");
    assert_eq!(evaluated["examples"], 500);
    assert!(
        (evaluated["accuracy"].as_f64().expect("accuracy") - run_accuracy).abs() < 1e-9,
        "{evaluated} against the run's {run_accuracy}"
    );
    let test = mentor_data::ImageSet::load(Path::new("/usr/share/datasets/fashion-mnist"), "t10k")
        .expect("test set");
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("nested")).expect("images");
    for index in 0..500 {
        let pixels = test.pixels[index * 784..(index + 1) * 784].to_vec();
        // A nested folder too: searched recursively, in path order.
        let folder = if index < 250 { "a" } else { "nested/b" };
        std::fs::create_dir_all(images.join(folder)).expect("folder");
        image::GrayImage::from_raw(28, 28, pixels)
            .expect("28x28")
            .save(images.join(folder).join(format!("{index:05}.png")))
            .expect("png");
    }
    let lines = predict(&["--images", images.to_str().expect("utf-8"), "--top", "3"]);
    let predictions: Vec<serde_json::Value> = lines
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(predictions.len(), 500);
    let mut correct = 0;
    for (index, prediction) in predictions.iter().enumerate() {
        assert!(
            prediction["image"]
                .as_str()
                .is_some_and(|path| path.ends_with(&format!("{index:05}.png"))),
            "{prediction}"
        );
        let top = prediction["top"].as_array().expect("top");
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["class"], prediction["class"]);
        let probabilities: Vec<f64> = top
            .iter()
            .map(|entry| entry["probability"].as_f64().expect("probability"))
            .collect();
        assert!(probabilities.windows(2).all(|pair| pair[0] >= pair[1]));
        if prediction["class"] == test.labels[index] {
            correct += 1;
        }
    }
    // The same pixels through the same model: at most a near-tie flips.
    assert!(
        (f64::from(correct) / 500.0 - run_accuracy).abs() <= 1.0 / 500.0,
        "{correct} of 500 against the run's {run_accuracy}"
    );
    // One file is a folder of one.
    let one = predict(&[
        "--images",
        images.join("a/00000.png").to_str().expect("utf-8"),
    ]);
    assert_eq!(one.lines().count(), 1, "{one}");
    // An image that does not decode is named, as one of --images.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).expect("bad");
    std::fs::write(bad.join("broken.png"), b"not a png").expect("write");
    let output = std::process::Command::new(binary("predict"))
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--images")
        .arg(&bad)
        .output()
        .expect("run predict");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("--images: `") && stderr.contains("broken.png"),
        "{stderr}"
    );
    // A copy of the run directory evaluates its own checkpoint.
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(copy.join("checkpoints")).expect("copy");
    std::fs::copy(state_dir.join("state.json"), copy.join("state.json")).expect("state");
    std::fs::copy(
        &student,
        copy.join("checkpoints/round-2-student.safetensors"),
    )
    .expect("checkpoint");
    let copied = predict_run_dir(&copy);
    assert_eq!(copied["accuracy"], evaluated["accuracy"]);
    assert_eq!(
        copied["model"]["checkpoint"],
        copy.join("checkpoints/round-2-student.safetensors")
            .display()
            .to_string()
    );

    // Round 1's student as the given teacher (`teacher.checkpoint`) of a new one-round run:
    // evaluated as the first run evaluated it, put to labeling, and never trained.
    let round_one_student = state_dir.join("checkpoints/round-1-student.safetensors");
    let given_teacher = |model: &str| {
        tiny_plan_with(&[
            ("rounds = 2", "rounds = 1"),
            ("width_growth_per_round = 4\n", ""),
            (
                "[teacher.model]\nkind = \"cnn\"\nwidth = 8\nhidden = 32\n\n[teacher.train]\nsteps = 30\nbatch_size = 32\nlog_every = 10\n",
                &format!(
                    "[teacher]\ncheckpoint = \"{}\"\n\n[teacher.model]\n{model}\n",
                    round_one_student.display()
                ),
            ),
        ])
    };
    let given = dir.path().join("given");
    std::fs::create_dir_all(&given).expect("given");
    let plan_text = given_teacher("kind = \"cnn\"\nwidth = 8\nhidden = 32\nresidual_blocks = 1");
    let (given_status, given_run) = run_on_two_workers(&runtime, &given, &plan_text);
    assert_eq!(
        given_status.status, "succeeded",
        "run failed: {}",
        given_status.error
    );
    assert_eq!(given_status.rounds.len(), 1);
    assert_eq!(
        given_status.rounds[0].teacher_test_accuracy,
        final_status.rounds[0].student_test_accuracy
    );
    assert!(given_status.rounds[0].student_test_accuracy.is_some());
    assert!(given_status.rounds[0].kept > 0);
    assert!(!given_run
        .join("checkpoints/round-1-teacher.safetensors")
        .exists());
    assert!(given_run
        .join("checkpoints/round-1-student.safetensors")
        .exists());
    let (_, saved) = status_of_run_dir(&given_run);
    assert_eq!(
        saved["rounds"][0]["teacher_test_accuracy"].as_f64(),
        final_status.rounds[0].student_test_accuracy
    );

    // A teacher.model that does not describe the checkpoint fails the run naming the file.
    let wrong = dir.path().join("wrong");
    std::fs::create_dir_all(&wrong).expect("wrong");
    let plan_text = given_teacher("kind = \"cnn\"\nwidth = 8\nhidden = 32");
    let (wrong_status, _) = run_on_two_workers(&runtime, &wrong, &plan_text);
    assert_eq!(wrong_status.status, "failed");
    assert!(
        wrong_status.error.contains("failed to load checkpoint")
            && wrong_status.error.contains("round-1-student.safetensors"),
        "{}",
        wrong_status.error
    );
    // A missing file is refused before anything starts, by the coordinator and `mentor plan`.
    let missing = dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        plan_text.replace("round-1-student.safetensors", "round-9-student.safetensors"),
    )
    .expect("write plan");
    let missing_run = dir.path().join("missing-run");
    let stderr = refused_open(&missing, &missing_run, &[]);
    assert!(
        stderr.contains("teacher.checkpoint `")
            && stderr.contains("round-9-student.safetensors`: no such file"),
        "{stderr}"
    );
    assert!(!missing_run.exists(), "a refused run leaves no directory");
    let output = std::process::Command::new(binary("mentor"))
        .arg("plan")
        .arg(&missing)
        .output()
        .expect("run mentor plan");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("round-9-student.safetensors`: no such file"),
        "{stderr}"
    );
}

/// `predict --state-dir DIR`: the evaluation of the run's final student.
fn predict_run_dir(dir: &Path) -> serde_json::Value {
    let output = std::process::Command::new(binary("predict"))
        .arg("--state-dir")
        .arg(dir)
        .output()
        .expect("run predict");
    assert!(
        output.status.success(),
        "predict failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

#[test]
fn bad_plan_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tiny = std::fs::read_to_string(workspace_root().join("deploy/plans/tiny.toml"))
        .expect("tiny plan");
    let plan = dir.path().join("bad.toml");
    std::fs::write(&plan, tiny.replacen("top_k = 3", "top_k = 0", 1)).expect("write plan");
    let state_dir = dir.path().join("run");
    let output = std::process::Command::new(binary("coordinator"))
        .args([
            "--plan",
            plan.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(&state_dir)
        .output()
        .expect("run coordinator");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("pseudo_labels.top_k: must be between 1 and data.classes (10)"),
        "{stderr}"
    );
    // The file is named once, the field after it.
    assert_eq!(stderr.matches("bad.toml").count(), 1, "{stderr}");
    assert!(
        !state_dir.exists(),
        "a refused plan must not create its run directory"
    );
}

/// `local-cluster.sh` refuses workers that could not run the plan, before anything starts:
/// fewer than `workers.min_workers` or a fixed `workers.world_size` (the run would wait for
/// ever), several on one GPU under an NCCL collective, a device or a count it cannot read.
#[test]
fn local_cluster_refuses_workers_that_cannot_run_the_plan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("run");
    let plan = workspace_root().join("deploy/plans/tiny.toml");
    let refused = |extra: &[&str]| -> String {
        let output = run_local_cluster_sh(&plan, &state_dir, extra);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        stderr
    };
    // tiny.toml waits for 2 workers.
    let stderr = refused(&["--workers", "1"]);
    assert!(
        stderr.contains("workers.min_workers = 2")
            && stderr.contains("--workers 1 would wait for ever"),
        "{stderr}"
    );
    let stderr = refused(&["--workers", "2", "--device", "cuda:0"]);
    assert!(
        stderr.contains("2 workers on the one GPU cuda:0 cannot form an NCCL group"),
        "{stderr}"
    );
    // A fixed group of 3 waits for a third worker that never comes.
    let three = dir.path().join("three.toml");
    let text = std::fs::read_to_string(&plan).expect("plan");
    let text = text.replacen("min_workers = 2", "min_workers = 2\nworld_size = 3", 1);
    std::fs::write(&three, text).expect("write plan");
    let output = run_local_cluster_sh(&three, &state_dir, &["--workers", "2"]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("workers.world_size = 3")
            && stderr.contains("--workers 2 would wait for ever"),
        "{stderr}"
    );
    assert!(refused(&["--device", "gpu"]).contains("--device must be cpu, cuda or cuda:N, not gpu"));
    assert!(refused(&["--workers", "two"]).contains("--workers must be a positive number, not two"));
    assert!(refused(&["--threads", "0"]).contains("--threads must be a positive number, not 0"));
    assert!(
        !state_dir.exists(),
        "a refused start must not create its run directory"
    );
}

#[test]
fn a_model_that_cannot_take_the_images_is_refused_before_the_run_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("densenet.toml");
    // The default DenseNet stem shrinks Fashion-MNIST's 28 pixels to 1 before its last pool:
    // refused at once, not after the wait for workers and three failed attempts.
    let text = tiny_plan_with(&[(
        "[teacher.model]\nkind = \"cnn\"\nwidth = 8\nhidden = 32\n",
        "[teacher.model]\nkind = \"densenet\"\ngrowth_rate = 4\nnum_init_features = 8\n",
    )]);
    std::fs::write(&plan, text).expect("write plan");
    // The run directory's missing parents are made for it, and go with it.
    let state_dir = dir.path().join("runs/densenet/run");
    let stderr = refused_open(&plan, &state_dir, &[]);
    assert!(
        stderr.contains("the plan does not fit its data: teacher.model: densenet on 28x28 inputs")
            && stderr.contains("stem = \"small\""),
        "{stderr}"
    );
    assert!(
        !dir.path().join("runs").exists(),
        "a refused run leaves no directory"
    );
}

#[test]
fn status_command_reports_an_unreachable_coordinator() {
    let output = std::process::Command::new(binary("mentor"))
        .args(["status", "--coordinator", "http://127.0.0.1:9", "--json"])
        .output()
        .expect("run mentor");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the coordinator at http://127.0.0.1:9"),
        "{stderr}"
    );
    // The cause, not tonic's bare "transport error".
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
    // With --json, stdout says so too.
    let answer: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("a JSON answer on stdout");
    assert_eq!(answer["status"], "unreachable");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot reach the coordinator at http://127.0.0.1:9")),
        "{answer}"
    );

    let output = std::process::Command::new(binary("mentor"))
        .args(["status", "--coordinator", "http://127.0.0.1:9", "--watch"])
        .args(["--interval", "inf"])
        .output()
        .expect("run mentor");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--interval") && stderr.contains("must be from 0.1 to 86400"),
        "{stderr}"
    );
    // An interval without --watch would do nothing.
    let output = std::process::Command::new(binary("mentor"))
        .args([
            "status",
            "--coordinator",
            "http://127.0.0.1:9",
            "--interval",
            "5",
        ])
        .output()
        .expect("run mentor");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--watch"), "{stderr}");

    // A run directory that holds no run is not an unreachable coordinator.
    let dir = tempfile::tempdir().expect("tempdir");
    for state_dir in [dir.path().to_path_buf(), dir.path().join("missing")] {
        let output = std::process::Command::new(binary("mentor"))
            .args(["status", "--json", "--state-dir"])
            .arg(&state_dir)
            .output()
            .expect("run mentor");
        assert_eq!(output.status.code(), Some(2));
        let answer: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("a JSON answer on stdout");
        assert_eq!(answer["status"], "no-run", "{answer}");
    }
}

/// A second live worker on a GPU of a host (its PCI bus id, which the workers send) is refused
/// at registration, naming the first, when the plan trains in NCCL groups (the tiny plan's
/// `auto` collective on GPUs): NCCL would fail every group of both. The same process
/// registering again, another GPU or another host passes; so does a second worker under a
/// plan whose groups are of one rank.
#[test]
fn a_second_worker_on_one_gpu_is_refused() {
    use mentor_proto::coordinator::v1 as pb;
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = workspace_root().join("deploy/plans/tiny.toml");
    let (_coordinator, address) = start_coordinator(&plan, &dir.path().join("run"));
    let client_address = address.clone();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = pb::worker_service_client::WorkerServiceClient::connect(address)
            .await
            .expect("connect");
        let request = |host: &str, gpu: &str, instance: &str| pb::RegisterRequest {
            hostname: host.into(),
            device: "cuda:0".into(),
            pid: 7,
            instance: instance.into(),
            running: None,
            gpu: gpu.into(),
        };
        let first = client
            .register(request("node-1", "0000:3B:00.0", "first"))
            .await
            .expect("the first worker on the GPU")
            .into_inner()
            .worker_id;
        let refused = client
            .register(request("node-1", "0000:3B:00.0", "second"))
            .await
            .expect_err("a second worker on the same GPU");
        assert_eq!(refused.code(), tonic::Code::AlreadyExists);
        assert!(
            refused
                .message()
                .contains(&format!("is worker {first}'s already"))
                && refused.message().contains("0000:3B:00.0"),
            "{refused}"
        );
        let again = client
            .register(request("node-1", "0000:3B:00.0", "first"))
            .await
            .expect("the same process again");
        assert_eq!(again.into_inner().worker_id, first);
        // Status names the GPU.
        let mut status = pb::status_service_client::StatusServiceClient::new(
            tonic::transport::Channel::from_shared(client_address.clone())
                .expect("address")
                .connect()
                .await
                .expect("connect"),
        );
        let workers = status
            .get_status(pb::GetStatusRequest::default())
            .await
            .expect("status")
            .into_inner()
            .workers;
        assert_eq!(workers.len(), 1);
        assert_eq!(workers[0].gpu, "0000:3B:00.0");
        for (host, gpu, instance) in [
            ("node-1", "0000:5E:00.0", "third"),
            ("node-2", "0000:3B:00.0", "fourth"),
            ("node-1", "", "fifth"),
        ] {
            client
                .register(request(host, gpu, instance))
                .await
                .unwrap_or_else(|e| panic!("{host} {gpu:?}: {e}"));
        }
    });

    let single = dir.path().join("single.toml");
    std::fs::write(
        &single,
        plan_with("tiny.toml", &[("[workers]", "[workers]\nworld_size = 1")]),
    )
    .expect("write plan");
    let (_coordinator, address) = start_coordinator(&single, &dir.path().join("single"));
    runtime.block_on(async {
        let mut client = pb::worker_service_client::WorkerServiceClient::connect(address)
            .await
            .expect("connect");
        for instance in ["first", "second"] {
            client
                .register(pb::RegisterRequest {
                    hostname: "node-1".into(),
                    device: "cuda:0".into(),
                    pid: 7,
                    instance: instance.into(),
                    running: None,
                    gpu: "0000:3B:00.0".into(),
                })
                .await
                .expect("workers side by side on one GPU, in groups of one");
        }
    });
}

/// Addresses the binaries cannot use are refused at once, naming what is wrong, before
/// anything is written.
#[test]
fn malformed_addresses_are_refused_at_once() {
    let run = |program: &str, args: &[&str]| {
        let output = std::process::Command::new(binary(program))
            .args(args)
            .output()
            .expect("run the binary");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    for program in ["mentor", "worker"] {
        let prefix: &[&str] = if program == "mentor" {
            &["status"]
        } else {
            &[]
        };
        for (address, reason) in [
            ("https://127.0.0.1:9", "scheme `https` is not supported"),
            ("http://127.0.0.1:9/status", "unexpected path `/status`"),
        ] {
            let started = std::time::Instant::now();
            let (code, stderr) = run(program, &[prefix, &["--coordinator", address]].concat());
            assert_eq!(code, Some(2), "{program} {address}: {stderr}");
            assert!(
                stderr.contains("--coordinator") && stderr.contains(reason),
                "{program} {address}: {stderr}"
            );
            // Refused, not retried for the connect timeout.
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{program} {address}"
            );
        }
    }
    // Without `http://` the address is read as HOST:PORT.
    let (code, stderr) = run("mentor", &["status", "--coordinator", "127.0.0.1:9"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot reach the coordinator at http://127.0.0.1:9"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("run");
    let plan = workspace_root().join("deploy/plans/tiny.toml");
    // An address that cannot be used is refused before the run directory is touched, with the
    // form the flag takes (a port alone, a Prometheus habit, too).
    for (flag, address) in [
        ("--listen", "127.0.0.1:not-a-port"),
        ("--metrics-listen", "9090"),
    ] {
        let (code, stderr) = run(
            "coordinator",
            &[
                "--plan",
                plan.to_str().expect("utf-8 path"),
                flag,
                address,
                "--state-dir",
                state_dir.to_str().expect("utf-8 path"),
            ],
        );
        assert_ne!(code, Some(0), "{stderr}");
        assert!(
            stderr.contains(&format!("failed to listen on `{address}`"))
                && stderr.contains(&format!("{flag} takes IP:PORT")),
            "{stderr}"
        );
        assert!(
            !state_dir.exists(),
            "a refused {flag} created the run directory"
        );
    }
}

/// A worker frozen in the middle of its task (SIGSTOP: a node that hangs, a paused VM): the
/// coordinator declares it lost after the heartbeat timeout, gives the task to another worker,
/// and the run still succeeds; the frozen worker, woken, stops the attempt that is no longer
/// its.
#[test]
fn a_frozen_worker_loses_its_task_and_stops_it_when_it_wakes() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    // One worker starts the run; the teacher trains long enough to be frozen mid-task (a
    // SIGSTOP, as a node that hangs or a VM paused): it goes silent.
    let mut edits = ONE_WORKER_SHORT_HEARTBEAT.to_vec();
    edits.push((
        "[teacher.train]\nsteps = 30",
        "[teacher.train]\nsteps = 2000",
    ));
    let plan_text = tiny_plan_with(&edits);
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, &plan_text).expect("write plan");
    let state_dir = dir.path().join("run");
    let (mut coordinator, address) = start_coordinator(&plan, &state_dir);

    let doomed = start_worker(&address, dir.path().join("doomed.log"));
    let doomed_id = wait_for(
        "the first worker to train",
        Duration::from_secs(120),
        || {
            let current = status(&runtime, &address);
            current
                .workers
                .iter()
                // Two progress reports in: the time left is known.
                .find(|w| {
                    w.task == "train teacher"
                        && w.step > 0
                        && w.seconds_left.is_some_and(|s| s > 0.0)
                })
                .map(|w| w.worker_id.clone())
        },
    );
    doomed.signal("-STOP");

    let lost = wait_for(
        "the coordinator to declare the worker lost",
        Duration::from_secs(30),
        || {
            let current = status(&runtime, &address);
            let lost = current
                .workers
                .iter()
                .any(|w| w.worker_id == doomed_id && w.state == "lost");
            lost.then_some(current)
        },
    );
    assert_eq!(lost.status, "running");
    assert_eq!(lost.tasks_done, 0);

    // A new worker picks the requeued task up and the run completes.
    let _replacement = start_worker(&address, dir.path().join("replacement.log"));
    wait_for(
        "the replacement to train the teacher",
        Duration::from_secs(120),
        || {
            let current = status(&runtime, &address);
            current
                .workers
                .iter()
                .any(|w| w.worker_id != doomed_id && w.task == "train teacher" && w.step > 0)
                .then_some(())
        },
    );
    // The frozen worker wakes: its heartbeat finds it unknown, it registers again naming its
    // attempt, which is no longer its, and stops it (its result would be ignored).
    doomed.signal("-CONT");
    let final_status = watch_run(
        &runtime,
        &address,
        &mut coordinator,
        Duration::from_secs(300),
        |_| {},
    );
    assert_eq!(final_status.status, "succeeded", "{}", final_status.error);
    assert_eq!(final_status.rounds.len(), 1);
    assert!(final_status.rounds[0].student_test_accuracy.is_some());
    let log = coordinator.log_text();
    assert!(log.contains("worker lost"), "{log}");
    assert!(
        log.contains("a worker registered again with an attempt that is no longer its"),
        "{log}"
    );
    let woken = doomed.log_text();
    assert!(
        woken.contains(
            "the coordinator has put this worker's task back in the queue; stopping this attempt"
        ),
        "{woken}"
    );
}

/// The coordinator killed mid-run and started again on the same state directory resumes the
/// run: finished work is kept, workers re-register by themselves, the run succeeds.
#[test]
fn a_restarted_coordinator_resumes_the_run() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let tiny = std::fs::read_to_string(workspace_root().join("deploy/plans/tiny.toml"))
        .expect("tiny plan");
    let plan_text = tiny
        .replacen("rounds = 2", "rounds = 1", 1)
        .replacen("width_growth_per_round = 4\n", "", 1)
        .replacen(
            "steps = 30\nbatch_size = 32\nunlabeled_ratio",
            "steps = 1500\nbatch_size = 32\nunlabeled_ratio",
            1,
        );
    assert_ne!(plan_text, tiny);
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, &plan_text).expect("write plan");
    let state_dir = dir.path().join("run");
    let (listen, address) = free_loopback_address();
    let (mut coordinator, _) = start_coordinator_on(&plan, &listen, &state_dir);
    let workers = [
        start_worker(&address, dir.path().join("worker-1.log")),
        start_worker(&address, dir.path().join("worker-2.log")),
    ];
    let before = wait_for(
        "the student to be training",
        Duration::from_secs(300),
        || {
            assert!(
                coordinator.is_running(),
                "coordinator exited:\n{}",
                coordinator.log_text()
            );
            let current = try_status(&runtime, &address)?;
            let training = current
                .workers
                .iter()
                .any(|w| w.task.starts_with("train student") && w.step > 0);
            training.then_some(current)
        },
    );
    assert!(before.rounds[0].teacher_test_accuracy.is_some());
    // A watch by address rides out the restart on the same address.
    let mut watcher = Process::start(
        &binary("mentor"),
        &[
            "status",
            "--coordinator",
            &address,
            "--watch",
            "--interval",
            "0.2",
        ],
        dir.path().join("watch.log"),
    );
    // A second coordinator on the live run directory is refused, naming the first.
    let stderr = refused_open(&plan, &state_dir, &[]);
    assert!(
        stderr.contains("is in use by another coordinator")
            && stderr.contains(&format!("pid {}", coordinator.child.id()))
            && stderr.contains(&format!("listening at {address}")),
        "{stderr}"
    );
    // Asked for the first one's port too, it is refused for the directory, not the port.
    let same_port = std::process::Command::new(binary("coordinator"))
        .args(["--plan", plan.to_str().expect("utf-8"), "--listen", &listen])
        .arg("--state-dir")
        .arg(&state_dir)
        .output()
        .expect("coordinator");
    let stderr = String::from_utf8_lossy(&same_port.stderr);
    assert!(!same_port.status.success(), "{stderr}");
    assert!(
        stderr.contains("is in use by another coordinator"),
        "{stderr}"
    );
    assert!(coordinator.is_running(), "the first coordinator goes on");
    // Named by its run directory, the run is asked of the coordinator serving it.
    let (code, live) = status_of_run_dir(&state_dir);
    assert_eq!(code, Some(0), "{live}");
    assert_eq!(live["coordinator"], address.as_str(), "{live}");
    assert_eq!(live["status"], "running");
    assert!(!live["workers"].as_array().expect("workers").is_empty());
    // A copy of the run directory whose address file names that coordinator (an address
    // left behind, a port reused) is not answered for by it: its saved state is.
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).expect("copy");
    std::fs::copy(state_dir.join("state.json"), copy.join("state.json")).expect("state");
    std::fs::write(copy.join("coordinator.addr"), format!("{address}\n")).expect("address");
    let (code, copied) = status_of_run_dir(&copy);
    assert_eq!(code, Some(3), "{copied}");
    assert_eq!(copied["coordinator"], serde_json::Value::Null);
    // The same directory under another path (a container's bind mount, emulated by a hard
    // link of its lock file, which shares the lock): its coordinator answers for it.
    let alias = dir.path().join("alias");
    std::fs::create_dir(&alias).expect("alias");
    std::fs::hard_link(
        state_dir.join("coordinator.lock"),
        alias.join("coordinator.lock"),
    )
    .expect("link the lock");
    std::fs::copy(state_dir.join("state.json"), alias.join("state.json")).expect("state");
    let (code, aliased) = status_of_run_dir(&alias);
    assert_eq!(code, Some(0), "{aliased}");
    assert_eq!(aliased["coordinator"], address.as_str(), "{aliased}");
    // The workers are frozen while no coordinator serves, so that the student's training is
    // still running when the next one does (on a fast machine it could end meanwhile).
    for worker in &workers {
        worker.signal("-STOP");
    }
    coordinator.child.kill().expect("kill the coordinator");
    let _ = coordinator.child.wait();
    // With its coordinator gone, the saved state answers: the run is stopped, what it had
    // done is there.
    let (code, stopped) = status_of_run_dir(&state_dir);
    assert_eq!(code, Some(3), "{stopped}");
    assert_eq!(stopped["status"], "stopped");
    assert_eq!(stopped["coordinator"], serde_json::Value::Null);
    assert_eq!(stopped["run_id"], before.run_id.as_str());
    assert_eq!(
        stopped["rounds"][0]["teacher_test_accuracy"].as_f64(),
        before.rounds[0].teacher_test_accuracy
    );
    assert!(stopped["workers"].as_array().expect("workers").is_empty());
    let text = std::process::Command::new(binary("mentor"))
        .args(["status", "--state-dir"])
        .arg(&state_dir)
        .output()
        .expect("mentor status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("status: stopped") && text.contains("no coordinator serves this run"),
        "{text}"
    );

    let (mut restarted, _) = start_coordinator_on(&plan, &listen, &state_dir);
    for worker in &workers {
        worker.signal("-CONT");
    }
    let final_status = wait_for(
        "the resumed run to finish",
        Duration::from_secs(300),
        || {
            assert!(
                restarted.is_running(),
                "restarted coordinator exited:\n{}",
                restarted.log_text()
            );
            let current = try_status(&runtime, &address)?;
            (current.status != "running").then_some(current)
        },
    );
    assert_eq!(final_status.status, "succeeded", "{}", final_status.error);
    assert_eq!(
        final_status.run_id, before.run_id,
        "the restarted coordinator started a new run"
    );
    assert_eq!(
        final_status.rounds[0].teacher_test_accuracy,
        before.rounds[0].teacher_test_accuracy
    );
    assert_eq!(final_status.rounds[0].shards_done, 4);
    assert!(final_status.rounds[0].student_test_accuracy.is_some());
    assert!(restarted
        .log_text()
        .contains("resuming run from the state store"));
    let watched = wait_for(
        "the watch to end with the run",
        Duration::from_secs(30),
        || watcher.child.try_wait().expect("wait"),
    );
    assert!(watched.success(), "{}", watcher.log_text());
    assert!(
        watcher.log_text().contains("status: succeeded"),
        "{}",
        watcher.log_text()
    );
    restarted.child.kill().expect("stop the coordinator");
    let _ = restarted.child.wait();
    let (code, saved) = status_of_run_dir(&state_dir);
    assert_eq!(code, Some(0), "{saved}");
    assert_eq!(saved["status"], "succeeded");
    assert_eq!(
        saved["final_student_test_accuracy"].as_f64(),
        final_status.rounds[0].student_test_accuracy
    );
    // The student's training went on through the restart: its workers registered again
    // naming their attempt, the restarted coordinator took it back, and it finished as the
    // attempt it was (a restart costs no training).
    let logs: Vec<String> = workers.iter().map(|w| w.log_text()).collect();
    let went_on = |log: &String| {
        log.split_once("the coordinator took this worker's attempt back")
            .is_some_and(|(_, after)| {
                after.contains("role=\"student\"") && after.contains("training")
            })
    };
    assert!(
        logs.iter().any(went_on),
        "no worker went on training with its attempt:\n{}",
        logs.join("\n")
    );
    assert!(
        !logs.iter().any(|log| log.contains("stopping this attempt")),
        "a worker stopped its attempt:\n{}",
        logs.join("\n")
    );
    let state = saved_state(&state_dir);
    let student = state["tasks"]
        .as_object()
        .expect("tasks")
        .values()
        .find(|task| task["spec"]["kind"] == "train" && task["spec"]["role"] == "student")
        .unwrap_or_else(|| panic!("no student training in {state}"));
    assert_eq!(
        (student["attempts"].as_u64(), student["losses"].as_u64()),
        (Some(1), Some(0)),
        "{student}"
    );
}

/// `mentor status --state-dir DIR --json`: its exit status and answer.
fn status_of_run_dir(dir: &std::path::Path) -> (Option<i32>, serde_json::Value) {
    let output = std::process::Command::new(binary("mentor"))
        .args(["status", "--json", "--state-dir"])
        .arg(dir)
        .output()
        .expect("mentor status");
    let answer = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON answer ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), answer)
}

/// Two Noisy Student rounds whose student grows (EfficientNet-B0, then B1 at its larger input
/// resolution) complete on real processes.
#[test]
fn a_growing_efficientnet_student_runs_two_rounds() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let tiny = std::fs::read_to_string(workspace_root().join("deploy/plans/tiny.toml"))
        .expect("tiny plan");
    let start = tiny.find("[student.model]").expect("student model");
    let end = tiny[start..]
        .find("[student.train]")
        .expect("student train")
        + start;
    let plan_text = format!(
        "{}[student.model]\nkind = \"efficientnet\"\npreset = \"b0\"\nphi_growth_per_round = 1\n\n{}",
        &tiny[..start],
        &tiny[end..]
    )
    .replacen("steps = 30\nbatch_size = 32\nunlabeled_ratio", "steps = 10\nbatch_size = 16\nunlabeled_ratio", 1);
    let (final_status, state_dir) = run_on_two_workers(&runtime, dir.path(), &plan_text);
    assert_eq!(final_status.status, "succeeded", "{}", final_status.error);
    assert_eq!(final_status.rounds.len(), 2);
    assert!(final_status
        .rounds
        .iter()
        .all(|r| r.student_test_accuracy.is_some()));
    // The round-2 student is bigger than the round-1 student.
    let size = |round: u32| {
        std::fs::metadata(state_dir.join(format!("checkpoints/round-{round}-student.safetensors")))
            .expect("student checkpoint")
            .len()
    };
    assert!(
        size(2) > size(1),
        "round 2 student ({}) is not larger than round 1's ({})",
        size(2),
        size(1)
    );
}

/// How [`long_tiny_mpl_run`] is interrupted once the joint training has saved itself.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// Never.
    Not,
    /// Its worker is killed; a replacement joins the same coordinator.
    Worker,
    /// The coordinator is killed and started again; the worker goes on.
    Coordinator,
    /// The coordinator and the worker are killed, the run directory is moved and the data set
    /// is read from another folder (a link to the same files); both start again there.
    EverythingAndMove,
}

/// What [`long_tiny_mpl_run`] ended with.
struct MplRun {
    /// The teacher, student and finetuned student checkpoints.
    checkpoints: Vec<Vec<u8>>,
    /// The log of the worker that finished the run when it was interrupted.
    log: String,
    /// The run directory (where it ended).
    state_dir: std::path::PathBuf,
    /// The joint training's save as it was when the run was interrupted.
    save_at_stop: Option<Vec<u8>>,
}

/// A 400-step tiny Meta Pseudo Labels run (resume checkpoint every 40 steps, evaluation every
/// 20) on one worker in `dir`, interrupted as `stop` says.
fn long_tiny_mpl_run(dir: &std::path::Path, stop: Stop) -> MplRun {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let edits = [
        ("steps = 40", "steps = 400"),
        ("log_every = 10", "log_every = 10\ncheckpoint_every = 40"),
        ("min_workers = 2", "min_workers = 1"),
        (
            "heartbeat_timeout_seconds = 10",
            "heartbeat_timeout_seconds = 2",
        ),
    ];
    let text = plan_with("tiny-mpl.toml", &edits);
    std::fs::create_dir_all(dir).expect("run directory");
    let plan = dir.join("plan.toml");
    std::fs::write(&plan, &text).expect("write plan");
    let mut state_dir = dir.join("run");
    let (mut coordinator, mut address) = start_coordinator(&plan, &state_dir);
    let mut first = start_worker(&address, dir.join("first.log"));
    let mut replacement = None;
    let mut save_at_stop = None;
    let checkpoint = state_dir.join("checkpoints/mpl-joint.resume.safetensors");
    if stop != Stop::Not {
        wait_for_file(&checkpoint);
        if stop == Stop::Coordinator {
            // Frozen while no coordinator serves, so that it is still training when the next
            // one does.
            first.signal("-STOP");
            coordinator.child.kill().expect("kill the coordinator");
            let _ = coordinator.child.wait();
            let listen = address.trim_start_matches("http://").to_string();
            (coordinator, _) = start_coordinator_on(&plan, &listen, &state_dir);
            first.signal("-CONT");
        } else {
            first.child.kill().expect("kill the worker");
            let _ = first.child.wait();
            save_at_stop = Some(std::fs::read(&checkpoint).expect("the save"));
            if stop == Stop::EverythingAndMove {
                coordinator.child.kill().expect("kill the coordinator");
                let _ = coordinator.child.wait();
                let moved = dir.join("moved-run");
                std::fs::rename(&state_dir, &moved).expect("move the run directory");
                state_dir = moved;
                let data = dir.join("data-elsewhere");
                let original = plan_data_dir(&text);
                std::os::unix::fs::symlink(&original, &data).expect("link the data set");
                let moved_plan = dir.join("plan-elsewhere.toml");
                let moved_text = text.replacen(
                    &format!("dir = \"{}\"", original.display()),
                    &format!("dir = \"{}\"", data.display()),
                    1,
                );
                assert_ne!(moved_text, text, "the plan's data.dir did not change");
                std::fs::write(&moved_plan, moved_text).expect("write plan");
                (coordinator, address) = start_coordinator(&moved_plan, &state_dir);
            }
            replacement = Some(start_worker(&address, dir.join("replacement.log")));
        }
    }
    let final_status = watch_run(
        &runtime,
        &address,
        &mut coordinator,
        Duration::from_secs(600),
        |_| {},
    );
    assert_eq!(final_status.status, "succeeded", "{}", final_status.error);
    // The coordinator removed the joint training's save when it took the models.
    assert!(
        !state_dir
            .join("checkpoints/mpl-joint.resume.safetensors")
            .exists(),
        "the joint training's save outlived it"
    );
    let checkpoints = [
        "round-1-teacher",
        "round-1-student",
        "round-1-student-finetuned",
    ]
    .iter()
    .map(|name| {
        std::fs::read(state_dir.join(format!("checkpoints/{name}.safetensors"))).expect(name)
    })
    .collect();
    // The log of the worker that finished the run after the interruption.
    let log = match (replacement, stop) {
        (Some(worker), _) => worker.log_text(),
        (None, Stop::Coordinator) => first.log_text(),
        (None, _) => String::new(),
    };
    MplRun {
        checkpoints,
        log,
        state_dir,
        save_at_stop,
    }
}

/// The folder a plan's text names in its `[data] dir` line.
fn plan_data_dir(text: &str) -> std::path::PathBuf {
    let line = text
        .lines()
        .find(|line| line.starts_with("dir = "))
        .expect("a dir line");
    line.trim_start_matches("dir = ").trim_matches('"').into()
}

/// The step the joint training resumed from, as the log of the worker that resumed it says.
fn resumed_step(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|line| line.contains("meta pseudo labels resumes its joint training"))
        .unwrap_or_else(|| panic!("the joint training did not resume:\n{log}"));
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("step="))
        .and_then(|step| step.parse().ok())
        .unwrap_or_else(|| panic!("no step in `{line}`"))
}

/// A Meta Pseudo Labels joint training interrupted after a save resumes from it, not from
/// step 0, and ends with exactly the teacher, student and finetuned student of a run that was
/// never interrupted: when its worker is killed, and when the whole run is stopped, its
/// directory moved and its data read from another folder (a run carried to another machine).
/// A save of another joint training is set aside.
#[test]
fn an_interrupted_mpl_joint_training_resumes_from_its_checkpoint_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uninterrupted = long_tiny_mpl_run(&dir.path().join("whole"), Stop::Not).checkpoints;
    // A restarted coordinator takes the joint training back from its worker, which trained on
    // meanwhile: it neither stops nor resumes from its save, and ends with the same models.
    let MplRun {
        checkpoints: went_on,
        log,
        ..
    } = long_tiny_mpl_run(&dir.path().join("restarted"), Stop::Coordinator);
    let mut foreign = None;
    assert!(
        log.contains("the coordinator took this worker's attempt back")
            && !log.contains("resumes its joint training")
            && !log.contains("stopping this attempt"),
        "{log}"
    );
    assert!(
        went_on == uninterrupted,
        "the run whose coordinator restarted ends with other models"
    );
    for (stop, name) in [
        (Stop::Worker, "killed worker"),
        (Stop::EverythingAndMove, "moved run"),
    ] {
        let MplRun {
            checkpoints: resumed,
            log,
            state_dir,
            save_at_stop,
        } = long_tiny_mpl_run(&dir.path().join(name.replace(' ', "-")), stop);
        foreign = foreign.or(save_at_stop);
        let step = resumed_step(&log);
        assert!(
            (40..400).contains(&step) && step.is_multiple_of(40),
            "{name}: resumed at step {step}"
        );
        // The resumed attempt's first report, 10 steps on, carries the evaluation made at the
        // step of the save (before it, and saved with it), not nothing until its next one.
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(state_dir.join("metrics.jsonl"))
            .expect("metrics.jsonl")
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect();
        let first_resumed = rows
            .iter()
            .find(|row| row["event"] == "progress" && row["attempt"] == 2)
            .unwrap_or_else(|| panic!("{name}: no report of the resumed attempt"));
        assert_eq!(
            (
                first_resumed["step"].as_u64(),
                first_resumed["metrics"]["evaluation_step"].as_f64()
            ),
            (Some(step + 10), Some(step as f64)),
            "{name}: {first_resumed}"
        );
        assert!(
            first_resumed["metrics"]["student_test_accuracy"].is_number(),
            "{name}: {first_resumed}"
        );
        assert_eq!(
            first_resumed["metrics"]["resumed_from_step"].as_f64(),
            Some(step as f64),
            "{name}: {first_resumed}"
        );
        for (model, (a, b)) in ["teacher", "student", "finetuned student"]
            .iter()
            .zip(uninterrupted.iter().zip(&resumed))
        {
            assert!(
                a == b,
                "{name}: the resumed run's {model} differs from the uninterrupted run's"
            );
        }
    }

    // The save of another joint training (the 400-step one) left in a new run's directory is
    // neither resumed nor overwritten: it is set aside.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let saved = "checkpoints/mpl-joint.resume.safetensors";
    let foreign = foreign.expect("a save of the 400-step joint training");
    let other = dir.path().join("other");
    std::fs::create_dir_all(other.join("run/checkpoints")).expect("mkdir");
    std::fs::write(other.join("run").join(saved), &foreign).expect("leave the save there");
    let (status, state_dir) =
        run_on_two_workers(&runtime, &other, &plan_with("tiny-mpl.toml", &[]));
    assert_eq!(status.status, "succeeded", "{}", status.error);
    let aside = std::fs::read(state_dir.join("checkpoints/mpl-joint.resume.other-1.safetensors"))
        .expect("the other joint training's save, set aside");
    assert!(aside == foreign, "the other joint training's save changed");
}

/// A one-round tiny Noisy Student run on one worker in `dir` whose teacher and student train
/// 400 steps each with a save every 40; with `interrupt` (a role and a file), its worker is
/// killed once that role's training has saved itself, the save is copied to the file, and a
/// replacement joins. Returns the teacher and student checkpoints, the replacement's log and
/// the run directory.
fn long_tiny_noisy_student_run(
    dir: &std::path::Path,
    plan_edits: &[(&str, &str)],
    interrupt: Option<(&str, &std::path::Path)>,
) -> (Vec<Vec<u8>>, String, std::path::PathBuf) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut edits = vec![
        ("rounds = 2", "rounds = 1"),
        ("width_growth_per_round = 4\n", ""),
        ("steps = 30", "steps = 400"),
        ("steps = 30", "steps = 400"),
        ("log_every = 10", "log_every = 10\ncheckpoint_every = 40"),
        (
            "learning_rate = 0.02\nlog_every = 10",
            "learning_rate = 0.02\nlog_every = 10\ncheckpoint_every = 40",
        ),
        ("min_workers = 2", "min_workers = 1"),
        (
            "heartbeat_timeout_seconds = 10",
            "heartbeat_timeout_seconds = 2",
        ),
    ];
    edits.extend_from_slice(plan_edits);
    std::fs::create_dir_all(dir).expect("run directory");
    let plan = dir.join("plan.toml");
    std::fs::write(&plan, tiny_plan_with(&edits)).expect("write plan");
    let state_dir = dir.join("run");
    let (mut coordinator, address) = start_coordinator(&plan, &state_dir);
    let mut first = start_worker(&address, dir.join("first.log"));
    let mut replacement = None;
    if let Some((role, snapshot)) = interrupt {
        let save = state_dir.join(format!("checkpoints/round-1-{role}.resume.safetensors"));
        wait_for_file(&save);
        first.child.kill().expect("kill the worker");
        let _ = first.child.wait();
        std::fs::copy(&save, snapshot).expect("copy the save");
        replacement = Some(start_worker(&address, dir.join("replacement.log")));
    }
    let status = watch_run(
        &runtime,
        &address,
        &mut coordinator,
        Duration::from_secs(600),
        |_| {},
    );
    assert_eq!(status.status, "succeeded", "{}", status.error);
    for role in ["teacher", "student"] {
        let save = state_dir.join(format!("checkpoints/round-1-{role}.resume.safetensors"));
        assert!(!save.exists(), "the {role}'s save outlived its training");
    }
    let checkpoints = ["round-1-teacher", "round-1-student"]
        .iter()
        .map(|name| {
            std::fs::read(state_dir.join(format!("checkpoints/{name}.safetensors"))).expect(name)
        })
        .collect();
    let log = replacement
        .map(|worker| worker.log_text())
        .unwrap_or_default();
    (checkpoints, log, state_dir)
}

/// A Noisy Student training whose worker is killed, the teacher's or the student's (which
/// learns from pseudo labels), resumes from its last save, not from step 0, and ends with
/// exactly the models of a run that was never interrupted; the save of another training
/// (another teacher learning rate) left in a run's directory is set aside, neither resumed nor
/// overwritten.
#[test]
fn an_interrupted_noisy_student_training_resumes_from_its_save_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (uninterrupted, _, _) = long_tiny_noisy_student_run(&dir.path().join("whole"), &[], None);
    let snapshot = dir.path().join("teacher-save.safetensors");
    for role in ["teacher", "student"] {
        let copy = dir.path().join(format!("{role}-save.safetensors"));
        let (resumed, log, _) = long_tiny_noisy_student_run(
            &dir.path().join(format!("killed-{role}")),
            &[],
            Some((role, &copy)),
        );
        let line = log
            .lines()
            .find(|line| line.contains("the training resumes from its save"))
            .unwrap_or_else(|| panic!("the {role}'s training did not resume:\n{log}"));
        let step: u64 = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("step="))
            .and_then(|step| step.parse().ok())
            .unwrap_or_else(|| panic!("no step in `{line}`"));
        assert!(
            (40..400).contains(&step)
                && step.is_multiple_of(40)
                && line.contains(&format!("role=\"{role}\"")),
            "resumed at step {step}: {line}"
        );
        // The resumed attempt's reports say so (status shows them), its first 10 steps on.
        let rows: Vec<serde_json::Value> =
            std::fs::read_to_string(dir.path().join(format!("killed-{role}/run/metrics.jsonl")))
                .expect("metrics.jsonl")
                .lines()
                .map(|line| serde_json::from_str(line).expect("a JSON line"))
                .collect();
        let resumed_report = rows
            .iter()
            .find(|row| {
                row["event"] == "progress"
                    && row["kind"].as_str().is_some_and(|kind| kind.contains(role))
                    && row["metrics"]["resumed_from_step"].is_number()
            })
            .unwrap_or_else(|| panic!("no report of the resumed {role} training"));
        assert_eq!(
            (
                resumed_report["step"].as_u64(),
                resumed_report["metrics"]["resumed_from_step"].as_f64()
            ),
            (Some(step + 10), Some(step as f64)),
            "{resumed_report}"
        );
        for (model, (a, b)) in ["teacher", "student"]
            .iter()
            .zip(uninterrupted.iter().zip(&resumed))
        {
            assert!(
                a == b,
                "killed {role}: the resumed run's {model} differs from the uninterrupted run's"
            );
        }
    }

    // Another training's save at the teacher's place is set aside, unchanged.
    let other = dir.path().join("other");
    let checkpoints = other.join("run/checkpoints");
    std::fs::create_dir_all(&checkpoints).expect("mkdir");
    std::fs::copy(
        &snapshot,
        checkpoints.join("round-1-teacher.resume.safetensors"),
    )
    .expect("leave the save there");
    let (_, _, state_dir) = long_tiny_noisy_student_run(
        &other,
        &[(
            "[teacher.train]\n",
            "[teacher.train]\nlearning_rate = 0.03\n",
        )],
        None,
    );
    let aside =
        std::fs::read(state_dir.join("checkpoints/round-1-teacher.resume.other-1.safetensors"))
            .expect("the other training's save, set aside");
    assert!(
        aside == std::fs::read(&snapshot).expect("snapshot"),
        "the other training's save changed"
    );
}

/// `scripts/local-cluster.sh --plan plan --state-dir state_dir` with the built binaries and
/// `extra` options, run to its end.
fn run_local_cluster_sh(plan: &Path, state_dir: &Path, extra: &[&str]) -> std::process::Output {
    let bin_dir = binary("coordinator")
        .parent()
        .expect("binaries have a directory")
        .to_path_buf();
    std::process::Command::new(workspace_root().join("scripts/local-cluster.sh"))
        .arg("--plan")
        .arg(plan)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("local-cluster.sh runs")
}

/// A worker that exits before the run can start (a GPU that is not there, say) leaves fewer
/// than `workers.min_workers`: `local-cluster.sh` says so and stops, instead of waiting for
/// ever.
#[test]
fn local_cluster_stops_when_workers_exit_before_the_run_can_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    for name in ["coordinator", "mentor"] {
        std::os::unix::fs::symlink(binary(name), bin.join(name)).expect("link");
    }
    // The first worker started exits at once; the others are the real one.
    let worker = bin.join("worker");
    std::fs::write(
        &worker,
        format!(
            "#!/bin/sh\nif mkdir '{}' 2>/dev/null; then echo 'worker: cuda:7 is not there' >&2; exit 1; fi\nexec '{}' \"$@\"\n",
            dir.path().join("first").display(),
            binary("worker").display()
        ),
    )
    .expect("worker script");
    let mut permissions = std::fs::metadata(&worker).expect("metadata").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&worker, permissions).expect("chmod");
    // Under a time limit: a regression would otherwise hang the suite.
    let output = std::process::Command::new("timeout")
        .arg("300")
        .arg(workspace_root().join("scripts/local-cluster.sh"))
        .arg("--plan")
        .arg(workspace_root().join("deploy/plans/tiny.toml"))
        .arg("--state-dir")
        .arg(dir.path().join("run"))
        .arg("--bin-dir")
        .arg(&bin)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("local-cluster.sh runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1 worker(s) exited before the run could start; the 1 left are fewer than workers.min_workers = 2")
            && stderr.contains("cuda:7 is not there"),
        "{stderr}"
    );
}

/// Runs `scripts/local-cluster.sh --plan plan --state-dir state_dir` with the built binaries and
/// `extra` options to its end; returns its exit code, its standard error and the final status
/// it saved (`status.json`).
fn local_cluster_sh(
    plan: &Path,
    state_dir: &Path,
    extra: &[&str],
) -> (Option<i32>, String, serde_json::Value) {
    let output = run_local_cluster_sh(plan, state_dir, extra);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let saved = std::fs::read_to_string(state_dir.join("status.json"))
        .unwrap_or_else(|e| panic!("no status.json ({e}): {stderr}"));
    let saved = serde_json::from_str(&saved).expect("status.json parses");
    (output.status.code(), stderr, saved)
}

/// A damaged joint-training save fails a Meta Pseudo Labels run, naming the file and what to
/// do; once it is moved away, `local-cluster.sh --retry-failed` on the same directory goes on
/// from where the run failed and ends it.
#[test]
fn a_failed_run_goes_on_with_retry_failed_once_its_cause_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, plan_with("tiny-mpl.toml", &[])).expect("write plan");
    let state_dir = dir.path().join("run");
    let save = state_dir.join("checkpoints/mpl-joint.resume.safetensors");
    std::fs::create_dir_all(save.parent().expect("parent")).expect("mkdir");
    std::fs::write(&save, b"damaged").expect("a damaged save");
    let (code, stderr, saved) = local_cluster_sh(&plan, &state_dir, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    let error = saved["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("mpl-joint.resume.safetensors") && error.contains("move it away"),
        "{saved}"
    );
    assert!(
        stderr.contains("the same command with --retry-failed (in place of --redo-finetune, if it had one) --state-dir"),
        "{stderr}"
    );

    std::fs::remove_file(&save).expect("move the damaged save away");
    let (code, stderr, saved) = local_cluster_sh(&plan, &state_dir, &["--retry-failed"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(saved["status"], "succeeded", "{saved}");
    assert!(saved["final_student_test_accuracy"].is_f64(), "{saved}");
}

/// A confidence threshold no pseudo label reaches fails the run at the filter, naming the
/// setting, before any student trains on an empty selection. Run through
/// `scripts/local-cluster.sh`: a failed run ends it with 1, its final status printed and saved.
/// The threshold lowered as the error advises, `--retry-failed` filters the same soft labels
/// again and ends the run.
#[test]
fn a_threshold_no_pseudo_label_reaches_fails_the_run_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    // At temperature 100 every soft label is close to uniform (top probability about 0.1).
    let text = tiny_plan_with(&[(
        "min_confidence = 0.1",
        "min_confidence = 0.5\ntemperature = 100.0",
    )]);
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, text).expect("write plan");
    let state_dir = dir.path().join("run");
    let (code, stderr, saved) = local_cluster_sh(&plan, &state_dir, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("[local-cluster] run failed"), "{stderr}");
    assert_eq!(saved["status"], "failed");
    let error = saved["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(
            "no pseudo-labeled example passed the filter: lower pseudo_labels.min_confidence"
        ),
        "{saved}"
    );
    assert!(!state_dir
        .join("checkpoints/round-1-student.safetensors")
        .exists());
    assert!(error.contains("--retry-failed"), "{saved}");
    // `mentor labels`, what the next threshold is chosen from, says the filter ran and kept
    // nothing, with each class's threshold.
    let labels = |extra: &[&str]| {
        let output = std::process::Command::new(binary("mentor"))
            .args(["labels", "--state-dir"])
            .arg(&state_dir)
            .args(extra)
            .output()
            .expect("mentor labels");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let text = labels(&[]);
    assert!(
        text.contains("threshold") && text.contains("the filter kept nothing"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&labels(&["--json"])).expect("json");
    assert_eq!(
        (&json["filtered"], &json["kept"]),
        (&true.into(), &0.into())
    );
    assert!(json["classes"][0]["threshold"].is_f64(), "{json}");

    let lowered = tiny_plan_with(&[(
        "min_confidence = 0.1",
        "min_confidence = 0.05\ntemperature = 100.0",
    )]);
    std::fs::write(&plan, lowered).expect("write the lowered plan");
    let (code, stderr, saved) = local_cluster_sh(&plan, &state_dir, &["--retry-failed"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(saved["status"], "succeeded", "{saved}");
    assert!(
        saved["rounds"][0]["pseudo_labels"]["kept"].as_u64() > Some(0),
        "{saved}"
    );
    // A store that is not where the run recorded it is named, not made anew.
    let store = state_dir.join("pseudo-labels");
    std::fs::rename(&store, dir.path().join("moved-away")).expect("move the store away");
    let output = std::process::Command::new(binary("mentor"))
        .args(["labels", "--state-dir"])
        .arg(&state_dir)
        .output()
        .expect("mentor labels");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is not there"),
        "{output:?}"
    );
    assert!(!store.exists(), "mentor labels made the store");
}

/// Meta Pseudo Labels on two worker processes (one data-parallel group): teacher and student
/// trained together with h and the UDA mask rate visible in status, both evaluated, the student
/// finetuned and evaluated again.
#[test]
fn a_tiny_meta_pseudo_labels_run_trains_evaluates_and_finetunes() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("run");
    let plan = workspace_root().join("deploy/plans/tiny-mpl.toml");
    let (mut coordinator, address) = start_coordinator(&plan, &state_dir);
    let workers = [
        start_worker(&address, dir.path().join("worker-1.log")),
        start_worker(&address, dir.path().join("worker-2.log")),
    ];
    let mut saw_metrics = false;
    let final_status = watch_run(
        &runtime,
        &address,
        &mut coordinator,
        Duration::from_secs(600),
        |current| {
            saw_metrics |= current.workers.iter().any(|w| {
                ["h", "uda_mask_rate", "teacher_uda_term", "teacher_mpl_term"]
                    .iter()
                    .all(|key| w.metrics.contains_key(*key))
            });
        },
    );
    assert_eq!(final_status.status, "succeeded", "{}", final_status.error);
    assert_eq!(final_status.method, "meta-pseudo-labels");
    assert!(
        saw_metrics,
        "status never showed h, the UDA mask rate and the teacher's UDA and MPL terms"
    );
    assert_eq!(final_status.rounds.len(), 1);
    let round = &final_status.rounds[0];
    for accuracy in [
        round.teacher_test_accuracy,
        round.student_test_accuracy,
        round.finetuned_student_test_accuracy,
    ] {
        let accuracy = accuracy.expect("accuracy measured");
        assert!((0.0..=1.0).contains(&accuracy));
    }
    // Named by its run directory, the final student is the finetuned one.
    assert_eq!(
        predict_run_dir(&state_dir)["accuracy"].as_f64(),
        round.finetuned_student_test_accuracy
    );
    // The two ranks evaluate halves of the test set and log the group's accuracy; at the last
    // step it is that of the saved models (batch-norm statistics averaged over the ranks), which
    // the evaluate tasks measured again on the whole test set.
    let evaluations: Vec<Vec<String>> = workers
        .iter()
        .map(|worker| {
            worker
                .log_text()
                .lines()
                .filter(|line| line.contains("meta pseudo labels evaluation"))
                .map(|line| line[line.find("step=").expect("step")..].to_string())
                .collect()
        })
        .collect();
    assert_eq!(evaluations[0].len(), 2, "{evaluations:?}");
    assert_eq!(
        evaluations[0], evaluations[1],
        "the ranks' evaluations differ"
    );
    let last = format!(
        "step=40 teacher_accuracy=\"{:.4}\" student_accuracy=\"{:.4}\"",
        round.teacher_test_accuracy.expect("teacher"),
        round.student_test_accuracy.expect("student")
    );
    assert_eq!(evaluations[0][1], last);

    // metrics.jsonl keeps every progress report of the joint training (rank 0's alone) and the
    // end of each task, with its result.
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(state_dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
        .collect();
    let joint: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|row| {
            row["event"] == "progress" && row["kind"] == "train teacher and student (MPL)"
        })
        .collect();
    let steps: Vec<u64> = joint
        .iter()
        .map(|row| row["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, vec![10, 20, 30, 40], "one line per report of rank 0");
    for row in &joint {
        assert_eq!(row["run_id"], final_status.run_id.as_str());
        assert_eq!(row["world_size"], 2);
        for key in [
            "h",
            "uda_mask_rate",
            "teacher_labeled_loss",
            "student_labeled_loss",
        ] {
            assert!(row["metrics"][key].is_number(), "{key} missing: {row}");
        }
    }
    // The evaluations at steps 20 and 40, each named by its step on the reports that carry it.
    let evaluated: Vec<(u64, Option<u64>)> = joint
        .iter()
        .map(|row| {
            let step = row["metrics"]["evaluation_step"].as_f64().map(|s| s as u64);
            (row["step"].as_u64().expect("step"), step)
        })
        .collect();
    assert_eq!(
        evaluated,
        vec![(10, None), (20, Some(20)), (30, Some(20)), (40, Some(40))]
    );
    assert_eq!(
        format!(
            "{:.4}",
            joint[3]["metrics"]["student_test_accuracy"]
                .as_f64()
                .expect("accuracy")
        ),
        format!("{:.4}", round.student_test_accuracy.expect("student"))
    );
    let ended: Vec<(String, Option<f64>)> = rows
        .iter()
        .filter(|row| row["event"] != "progress")
        .map(|row| {
            assert_eq!(row["event"], "done", "{row}");
            (
                row["kind"].as_str().expect("kind").to_string(),
                row["test_accuracy"].as_f64(),
            )
        })
        .collect();
    for kind in ["train teacher and student (MPL)", "finetune student"] {
        assert_eq!(
            ended.iter().filter(|(k, _)| k == kind).count(),
            1,
            "{kind}: {ended:?}"
        );
    }
    let measured: Vec<f64> = ended.iter().filter_map(|(_, accuracy)| *accuracy).collect();
    for accuracy in [
        round.teacher_test_accuracy,
        round.student_test_accuracy,
        round.finetuned_student_test_accuracy,
    ] {
        let accuracy = accuracy.expect("accuracy");
        assert!(
            measured.contains(&accuracy),
            "{accuracy} not among {measured:?}"
        );
    }

    for name in [
        "round-1-teacher",
        "round-1-student",
        "round-1-student-finetuned",
    ] {
        assert!(
            state_dir
                .join(format!("checkpoints/{name}.safetensors"))
                .exists(),
            "{name}"
        );
    }
    let output = std::process::Command::new(mentor_e2e::binary("mentor"))
        .args(["status", "--coordinator", &address, "--json"])
        .output()
        .expect("mentor status");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(
        json["final_student_test_accuracy"],
        serde_json::json!(round.finetuned_student_test_accuracy)
    );
    // Where the run and its final student are.
    let run_dir = state_dir.canonicalize().expect("run dir");
    assert_eq!(json["run_dir"], run_dir.to_str().expect("utf-8"));
    assert_eq!(
        json["final_student_checkpoint"],
        run_dir
            .join("checkpoints/round-1-student-finetuned.safetensors")
            .to_str()
            .expect("utf-8")
    );
    drop(coordinator);

    // A changed [mpl.finetune] finetunes the student again and keeps the joint training.
    let checkpoint = |name: &str| {
        std::fs::read(state_dir.join(format!("checkpoints/{name}.safetensors"))).expect(name)
    };
    let (teacher, student, finetuned) = (
        checkpoint("round-1-teacher"),
        checkpoint("round-1-student"),
        checkpoint("round-1-student-finetuned"),
    );
    let text = std::fs::read_to_string(&plan).expect("plan");
    let old_finetune = "finetune = { steps = 10, batch_size = 32, learning_rate = 0.01 }";
    assert!(
        text.contains(old_finetune),
        "tiny-mpl.toml changed its finetune"
    );
    let changed = dir.path().join("changed-finetune.toml");
    std::fs::write(
        &changed,
        text.replacen(
            old_finetune,
            "finetune = { steps = 20, batch_size = 16, learning_rate = 0.003 }",
            1,
        ),
    )
    .expect("write plan");
    let stderr = refused_open(&changed, &state_dir, &[]);
    assert!(stderr.contains("--redo-finetune"), "{stderr}");
    assert!(
        stderr.contains("mpl.finetune.batch_size: 32 -> 16"),
        "the refusal names what changed: {stderr}"
    );
    // A plan changed beyond its finetune is refused even with the flag.
    let longer = dir.path().join("changed-steps.toml");
    std::fs::write(&longer, text.replacen("steps = 40", "steps = 41", 1)).expect("write plan");
    let stderr = refused_open(&longer, &state_dir, &["--redo-finetune"]);
    assert!(stderr.contains("more than [mpl.finetune]"), "{stderr}");
    assert!(stderr.contains("mpl.steps: 40 -> 41"), "{stderr}");

    let (mut again, address) =
        start_coordinator_with(&changed, "127.0.0.1:0", &state_dir, &["--redo-finetune"]);
    let _workers = [
        start_worker(&address, dir.path().join("worker-3.log")),
        start_worker(&address, dir.path().join("worker-4.log")),
    ];
    let redone = watch_run(
        &runtime,
        &address,
        &mut again,
        Duration::from_secs(300),
        |_| {},
    );
    assert_eq!(redone.status, "succeeded", "{}", redone.error);
    assert_eq!(redone.run_id, final_status.run_id);
    let redone_round = &redone.rounds[0];
    assert_eq!(
        redone_round.teacher_test_accuracy,
        round.teacher_test_accuracy
    );
    assert_eq!(
        redone_round.student_test_accuracy,
        round.student_test_accuracy
    );
    assert!(redone_round.finetuned_student_test_accuracy.is_some());
    assert_eq!(checkpoint("round-1-teacher"), teacher);
    assert_eq!(checkpoint("round-1-student"), student);
    assert_ne!(checkpoint("round-1-student-finetuned"), finetuned);
    assert!(again.log_text().contains("redoing the finetune"));
    // The joint training ran once; the old finetune and its evaluation were replaced.
    let state = saved_state(&state_dir);
    let kinds: Vec<&str> = state["tasks"]
        .as_object()
        .expect("tasks")
        .values()
        .map(|task| task["spec"]["kind"].as_str().expect("kind"))
        .collect();
    let recorded = state["plan_toml"].as_str().expect("plan_toml");
    assert!(
        recorded.contains("[mpl.finetune]\nsteps = 20\nbatch_size = 16\n"),
        "the run does not record the new finetune:\n{recorded}"
    );
    let count = |kind: &str| kinds.iter().filter(|k| **k == kind).count();
    assert_eq!(
        (count("train-mpl"), count("finetune"), count("evaluate")),
        (1, 1, 3),
        "{kinds:?}"
    );
}

/// Starts a coordinator on `plan` and `state_dir` that must refuse to open the run; returns its
/// stderr.
fn refused_open(plan: &std::path::Path, state_dir: &std::path::Path, extra: &[&str]) -> String {
    let refused = std::process::Command::new(binary("coordinator"))
        .args(["--plan", plan.to_str().expect("utf-8")])
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state_dir)
        .args(extra)
        .output()
        .expect("coordinator");
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "{stderr}");
    stderr
}

/// Writes `tars` WebDataset shards of `per_tar` real Fashion-MNIST training images (PNG, with
/// their `.cls`), taken from the end of the training set.
/// `broken`: the (tar, sample) whose image is no image (a truncated download).
fn write_webdataset(
    dir: &std::path::Path,
    tars: usize,
    per_tar: usize,
    broken: Option<(usize, usize)>,
) {
    let train = mentor_data::ImageSet::load(
        std::path::Path::new("/usr/share/datasets/fashion-mnist"),
        "train",
    )
    .expect("Fashion-MNIST (dataset-fashion-mnist)");
    std::fs::create_dir_all(dir).expect("dir");
    for tar_index in 0..tars {
        let mut builder = tar::Builder::new(Vec::new());
        for sample in 0..per_tar {
            let position = train.len() - 1 - (tar_index * per_tar + sample);
            let size = train.image_size();
            let pixels = train.pixels[position * size..(position + 1) * size].to_vec();
            let image = image::GrayImage::from_raw(28, 28, pixels).expect("28x28");
            let mut png = std::io::Cursor::new(Vec::new());
            image
                .write_to(&mut png, image::ImageFormat::Png)
                .expect("png");
            let png = match broken == Some((tar_index, sample)) {
                true => b"\x89PNG cut short".to_vec(),
                false => png.into_inner(),
            };
            for (name, bytes) in [
                (format!("{sample:06}.png"), png),
                (
                    format!("{sample:06}.cls"),
                    train.labels[position].to_string().into_bytes(),
                ),
            ] {
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                builder
                    .append_data(&mut header, name, bytes.as_slice())
                    .expect("append");
            }
        }
        std::fs::write(
            dir.join(format!("shard-{tar_index:03}.tar")),
            builder.into_inner().expect("tar"),
        )
        .expect("write tar");
    }
}

/// Unlabeled images from WebDataset tars: a labeler killed in the middle of the label job loses
/// its shard to another one; every example ends up labeled exactly once, the student trains on
/// images decoded from the tars, and the shards go through a `file://` storage URL.
#[test]
fn webdataset_labeling_survives_a_killed_labeler_without_loss_or_duplicates() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    // Labeling takes about half a millisecond per example on one CPU core: 8,000 examples keep
    // the label job running for seconds, a window the 100 ms status polls cannot miss.
    let (tars, per_tar) = (8usize, 1000usize);
    let tar_dir = dir.path().join("unlabeled");
    // One image does not decode: labeled NaN, never selected, not a failed shard.
    write_webdataset(&tar_dir, tars, per_tar, Some((0, 5)));
    let storage = format!("file://{}/labels", dir.path().display());
    let unlabeled = format!(
        "[data.unlabeled]\nformat = \"webdataset\"\npath = \"{}\"\n\n[teacher.model]",
        tar_dir.display()
    );
    let labels =
        format!("[pseudo_labels]\nstorage = \"{storage}\"\nbatch_size = 2\ndecode_threads = 1");
    let mut edits = ONE_WORKER_SHORT_HEARTBEAT.to_vec();
    edits.extend([
        ("unlabeled_limit = 1500\n", ""),
        (
            "shard_size = 400          # 4 shards, the last one short\n",
            "",
        ),
        ("[teacher.model]", unlabeled.as_str()),
        ("[pseudo_labels]", labels.as_str()),
    ]);
    let plan_text = tiny_plan_with(&edits);
    assert!(
        plan_text.contains("webdataset") && plan_text.contains("file://"),
        "{plan_text}"
    );
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, &plan_text).expect("write plan");
    let state_dir = dir.path().join("run");
    let (mut coordinator, address) = start_coordinator(&plan, &state_dir);

    let mut doomed = start_worker(&address, dir.path().join("doomed.log"));
    let doomed_id = wait_for("the worker to label", Duration::from_secs(120), || {
        assert!(doomed.is_running(), "worker exited:\n{}", doomed.log_text());
        let current = status(&runtime, &address);
        assert_ne!(current.status, "failed", "{}", current.error);
        let round = current.rounds.first()?;
        assert!(
            round.shards == 0 || round.shards_done < round.shards,
            "the label job ended before a labeler could be killed: make it longer"
        );
        let labeling = current
            .workers
            .iter()
            .find(|w| w.task.starts_with("pseudo-label") && w.step > 0)?;
        (round.shards_done < round.shards).then(|| labeling.worker_id.clone())
    });
    doomed.child.kill().expect("kill the labeler");
    let _ = doomed.child.wait();
    let killed_at = status(&runtime, &address);
    let done_at_kill = killed_at.rounds[0].shards_done;
    assert!(
        done_at_kill < tars as u32,
        "the kill came after the label job"
    );

    let replacement = start_worker(&address, dir.path().join("replacement.log"));
    let final_status = watch_run(
        &runtime,
        &address,
        &mut coordinator,
        Duration::from_secs(300),
        |_| {},
    );
    assert_eq!(
        final_status.status,
        "succeeded",
        "{}\n{}",
        final_status.error,
        coordinator.log_text()
    );
    let log = coordinator.log_text();
    assert!(log.contains("worker lost"), "{log}");
    assert!(log.contains(&doomed_id), "{log}");
    let round = &final_status.rounds[0];
    assert_eq!(round.shards, tars as u32);
    assert_eq!(round.examples, (tars * per_tar) as u64);
    assert!(round.student_test_accuracy.is_some());

    // Nothing lost, nothing duplicated: each tar sample labeled exactly once.
    let store = ShardStore::open(&storage).expect("store");
    let (manifest, shards) = read_round(&store, 1).expect("manifest and shards");
    assert_eq!(manifest.shards.len(), tars);
    assert!(manifest.shards.iter().all(|s| s.histogram.is_some()));
    let mut ids: Vec<i64> = shards.iter().flat_map(|s| s.example_ids.clone()).collect();
    ids.sort_unstable();
    let expected: Vec<i64> = (0..tars as i64)
        .flat_map(|t| (0..per_tar as i64).map(move |i| (t << 32) | i))
        .collect();
    assert_eq!(ids, expected);
    for shard in &shards {
        for (row, id) in shard.example_ids.iter().enumerate() {
            let (_, confidence) = shard.top(row);
            assert_eq!(confidence.is_nan(), *id == 5, "example {id}: {confidence}");
        }
    }
    let logs = format!("{}{}", doomed.log_text(), replacement.log_text());
    assert!(
        logs.contains("labeled NaN (never selected)") && logs.contains("shard-000.tar:000005.png"),
        "{logs}"
    );
    let leftovers: Vec<String> = std::fs::read_dir(dir.path().join("labels/round-1"))
        .expect("round dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.') || name.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // The manifest counts the image that did not decode apart, and `mentor labels` (reading
    // a store given by URL) says so.
    assert_eq!(
        manifest
            .shards
            .iter()
            .filter_map(|s| s.histogram.as_ref())
            .map(|h| h.undecodable)
            .sum::<u64>(),
        1
    );
    let output = std::process::Command::new(binary("mentor"))
        .args(["labels", "--json", "--state-dir"])
        .arg(&state_dir)
        .output()
        .expect("mentor labels");
    assert!(output.status.success(), "{output:?}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(summary["undecodable"], 1, "{summary}");
    let top1: u64 = summary["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .map(|class| class["top1"].as_u64().expect("top1"))
        .sum();
    assert_eq!(top1, (tars * per_tar) as u64 - 1);

    // The selection points at those shards and the student trained on it.
    let selection: serde_json::Value = serde_json::from_slice(
        &std::fs::read(state_dir.join("selections/round-1.json")).expect("selection file"),
    )
    .expect("selection JSON");
    assert_eq!(selection["storage"], storage.as_str());
    assert_eq!(selection["shards"].as_array().map(|s| s.len()), Some(tars));
}

/// Example ids are positions in the listing of the unlabeled images: a tar added after the run
/// began would shift them. A worker that lists other files than the coordinator refuses to
/// work, and a coordinator resuming the run refuses it, naming the folder; with the folder
/// restored, the run opens again, and moved elsewhere with the plan naming the new place too.
#[test]
fn a_changed_unlabeled_listing_is_refused_by_workers_and_on_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tar_dir = dir.path().join("unlabeled");
    write_webdataset(&tar_dir, 2, 20, None);
    let unlabeled = format!(
        "[data.unlabeled]\nformat = \"webdataset\"\npath = \"{}\"\n\n[teacher.model]",
        tar_dir.display()
    );
    let mut edits = ONE_WORKER_SHORT_HEARTBEAT.to_vec();
    edits.extend([
        ("unlabeled_limit = 1500\n", ""),
        (
            "shard_size = 400          # 4 shards, the last one short\n",
            "",
        ),
        ("[teacher.model]", unlabeled.as_str()),
    ]);
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, tiny_plan_with(&edits)).expect("write plan");
    let state_dir = dir.path().join("run");
    let (coordinator, address) = start_coordinator(&plan, &state_dir);

    // A third tar, in the middle of the listing, after the coordinator listed two.
    let first = tar_dir.join("shard-000.tar");
    let added = tar_dir.join("shard-000a.tar");
    std::fs::copy(&first, &added).expect("copy tar");
    let mut worker = start_worker(&address, dir.path().join("worker.log"));
    let code = wait_for_or_explain(
        "the worker to refuse the listing",
        Duration::from_secs(120),
        || worker.child.try_wait().expect("wait").map(|s| s.code()),
        || std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default(),
    );
    let log = worker.log_text();
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains("are not those the coordinator listed")
            && log.contains(&tar_dir.display().to_string()),
        "{log}"
    );
    drop(coordinator);

    let stderr = refused_open(&plan, &state_dir, &[]);
    assert!(
        stderr.contains(&format!(
            "the unlabeled images at `{}` are not those the run began with",
            tar_dir.display()
        )) && stderr.contains("webdataset:2:")
            && stderr.contains("webdataset:3:"),
        "{stderr}"
    );
    // Restored: the same run opens again.
    std::fs::remove_file(&added).expect("remove tar");
    let (mut again, _) = start_coordinator(&plan, &state_dir);
    assert!(again.is_running(), "{}", again.log_text());
    assert!(
        again.log_text().contains("resuming run"),
        "{}",
        again.log_text()
    );
    drop(again);
    // Moved, the same files: the plan may name their new place (the listing vouches for them).
    let moved = dir.path().join("moved-unlabeled");
    std::fs::rename(&tar_dir, &moved).expect("move the tars");
    let moved_plan = dir.path().join("moved-plan.toml");
    let text = std::fs::read_to_string(&plan).expect("plan");
    let moved_text = text.replacen(
        &tar_dir.display().to_string(),
        &moved.display().to_string(),
        1,
    );
    assert_ne!(moved_text, text);
    std::fs::write(&moved_plan, moved_text).expect("write plan");
    let (mut after_move, _) = start_coordinator(&moved_plan, &state_dir);
    assert!(after_move.is_running(), "{}", after_move.log_text());
    let log = after_move.log_text();
    assert!(
        log.contains("resuming run") && log.contains("unlabeled images from another place"),
        "{log}"
    );
}

/// A coordinator that hangs (stopped, not gone: its connections stay open and say nothing) is
/// an outage to its workers: they give up after `--connect-timeout-seconds` instead of waiting
/// on a call for ever.
#[test]
fn a_worker_gives_up_on_a_coordinator_that_hangs() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = workspace_root().join("deploy/plans/tiny.toml");
    let (coordinator, address) = start_coordinator(&plan, &dir.path().join("run"));
    let mut worker = start_worker_with(
        &address,
        dir.path().join("worker.log"),
        Path::new("."),
        &["--connect-timeout-seconds", "2"],
    );
    // Registered, waiting for a second worker (the plan's min_workers) and asking for work.
    wait_for("the worker to register", Duration::from_secs(60), || {
        (status(&runtime, &address).workers.len() == 1).then_some(())
    });
    let pid = coordinator.child.id().to_string();
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill -STOP");
    assert!(stopped.success());
    let exit = wait_for("the worker to give up", Duration::from_secs(90), || {
        worker.child.try_wait().expect("wait")
    });
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    assert!(!exit.success(), "{}", worker.log_text());
    assert!(
        worker
            .log_text()
            .contains("the coordinator was unreachable for"),
        "{}",
        worker.log_text()
    );
}

/// A training that ends while its coordinator is down: the worker keeps its result past its
/// connection timeout and gives it to the restarted coordinator, which takes it (the training
/// does not run again).
#[test]
fn a_result_finished_during_a_coordinator_outage_is_delivered_after_it() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut edits = ONE_WORKER_SHORT_HEARTBEAT.to_vec();
    edits.push((
        "steps = 30\nbatch_size = 32\nunlabeled_ratio",
        "steps = 600\nbatch_size = 32\nunlabeled_ratio",
    ));
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, tiny_plan_with(&edits)).expect("write plan");
    let state_dir = dir.path().join("run");
    let (listen, address) = free_loopback_address();
    let (mut coordinator, _) = start_coordinator_on(&plan, &listen, &state_dir);
    let mut worker = start_worker_with(
        &address,
        dir.path().join("worker.log"),
        Path::new("."),
        &["--connect-timeout-seconds", "1"],
    );
    // A student long enough (600 steps, seconds) to be killed under at the first sight of it.
    wait_for("the student to train", Duration::from_secs(300), || {
        let current = try_status(&runtime, &address)?;
        current
            .workers
            .iter()
            .any(|w| w.task.starts_with("train student"))
            .then_some(())
    });
    coordinator.child.kill().expect("kill the coordinator");
    let _ = coordinator.child.wait();
    // The training ends during the outage (its checkpoint written), and the outage outlasts
    // the worker's connection timeout.
    wait_for_file(&state_dir.join("checkpoints/round-1-student.attempt-1.safetensors"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(worker.is_running(), "{}", worker.log_text());
    let (mut coordinator, _) = start_coordinator_on(&plan, &listen, &state_dir);
    let status = watch_run(
        &runtime,
        &address,
        &mut coordinator,
        Duration::from_secs(300),
        |_| {},
    );
    assert_eq!(status.status, "succeeded", "{}", worker.log_text());
    let saved = saved_state(&state_dir);
    let student = saved["tasks"]
        .as_object()
        .expect("tasks")
        .values()
        .find(|task| task["spec"]["kind"] == "train" && task["spec"]["role"] == "student")
        .unwrap_or_else(|| panic!("no student task in {saved}"));
    assert_eq!(
        student["attempts"], 1,
        "the student trained again: {student}"
    );
}

/// A worker stopped with SIGTERM (a preempted node, the end of a scheduler's allocation) tells
/// the coordinator before it exits: its training task goes back to the queue at once, without
/// counting as a lost attempt, and the other worker finishes the run.
#[test]
fn a_worker_stopped_by_sigterm_gives_its_task_back_at_once() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan.toml");
    let text = tiny_plan_with(&[
        ("rounds = 2", "rounds = 1"),
        ("width_growth_per_round = 4\n", ""),
        (
            "[teacher.train]\nsteps = 30",
            "[teacher.train]\nsteps = 3000",
        ),
    ]);
    std::fs::write(&plan, text).expect("write plan");
    let state_dir = dir.path().join("run");
    let (mut coordinator, address) = start_coordinator(&plan, &state_dir);
    let _first = start_worker(&address, dir.path().join("worker-1.log"));
    let mut second = start_worker(&address, dir.path().join("worker-2.log"));
    let pid = second.child.id();
    wait_for(
        "the teacher to be training",
        Duration::from_secs(120),
        || {
            let current = try_status(&runtime, &address)?;
            current
                .workers
                .iter()
                .any(|w| w.pid == pid && w.task.starts_with("train teacher") && w.step > 0)
                .then_some(())
        },
    );
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(signalled.success());
    let exit = wait_for("the worker to exit", Duration::from_secs(10), || {
        second.child.try_wait().expect("wait")
    });
    assert_eq!(exit.code(), Some(143), "{}", second.log_text());
    // Told, the coordinator shows it exited at once (a vanished worker is lost only after
    // the heartbeat timeout) and gave the attempt back without counting a loss.
    let current = status(&runtime, &address);
    let gone = current
        .workers
        .iter()
        .find(|w| w.pid == pid)
        .expect("the worker in status");
    assert_eq!(gone.state, "exited");
    let saved = saved_state(&state_dir);
    let teacher = saved["tasks"]
        .as_object()
        .expect("tasks")
        .values()
        .find(|task| {
            task["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("SIGTERM"))
        })
        .unwrap_or_else(|| panic!("no task left by SIGTERM: {saved}"));
    assert_eq!(teacher["losses"], 0, "{teacher}");
    let final_status = watch_run(
        &runtime,
        &address,
        &mut coordinator,
        Duration::from_secs(300),
        |_| {},
    );
    assert_eq!(final_status.status, "succeeded", "{}", final_status.error);
}
