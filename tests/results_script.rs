//! `scripts/results-fashion-mnist.sh` (benches/results_fashion_mnist.py) against the real
//! binaries on tiny plans: what `--reuse` keeps, resumes and redoes, that an interrupted run's
//! processes stop with it, and that the supervised baseline of the students' architecture trains
//! the Meta Pseudo Labels plan's student model.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use mentor_e2e::{binary, plan_with, wait_for, workspace_root, Process};

/// The tiny MPL plan, long enough to be interrupted after its first joint-training save.
fn interruptible_plan(finetune: &str) -> String {
    plan_with(
        "tiny-mpl.toml",
        &[
            ("steps = 40", "steps = 600"),
            ("log_every = 10", "log_every = 10\ncheckpoint_every = 50"),
            (
                "finetune = { steps = 10, batch_size = 32, learning_rate = 0.01 }",
                finetune,
            ),
        ],
    )
}

/// Writes `text` as `dir/name` and returns the path.
fn write_plan(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write plan");
    path
}

fn script_args(plan: &Path, out: &Path, methods: &str, reuse: bool) -> Vec<String> {
    let bin_dir = binary("coordinator")
        .parent()
        .expect("binaries have a directory")
        .to_path_buf();
    let mut args = vec![
        workspace_root()
            .join("benches/results_fashion_mnist.py")
            .display()
            .to_string(),
        "--quick".into(),
        "--seeds".into(),
        "0".into(),
        "--methods".into(),
        methods.into(),
        "--bin-dir".into(),
        bin_dir.display().to_string(),
        "--mpl-plan".into(),
        plan.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    if reuse {
        args.push("--reuse".into());
    }
    args
}

/// Runs the script with `--methods methods` to its end; returns its standard error, failing on
/// a non-zero exit.
fn run_script(plan: &Path, out: &Path, methods: &str, reuse: bool) -> String {
    let output = Command::new("python3")
        .args(script_args(plan, out, methods, reuse))
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "the script failed:\n{stderr}");
    stderr
}

fn worker_logs(run: &Path) -> String {
    (1..=2)
        .map(|n| {
            std::fs::read_to_string(run.join(format!("logs/worker-{n}.log"))).unwrap_or_default()
        })
        .collect()
}

/// The first seed's accuracy of `method` in the script's results.json.
fn first_accuracy(out: &Path, method: &str) -> f64 {
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("results.json parses");
    results["rows"][method][0]
        .as_f64()
        .unwrap_or_else(|| panic!("no {method} accuracy in {results}"))
}

fn final_accuracy(out: &Path) -> f64 {
    first_accuracy(out, "meta-pseudo-labels")
}

/// An interrupted Meta Pseudo Labels run whose plan then changes in `[mpl.finetune]` alone (an
/// inline table becoming a `[mpl.finetune]` table with other steps) keeps its joint training:
/// `--reuse` resumes it from the last save and finetunes under the new plan; the finished run is
/// then reused as it is, and a change elsewhere runs again from scratch. Ctrl-C on the script
/// stops the run's coordinator.
#[test]
fn reuse_keeps_the_joint_training_of_a_run_whose_finetune_alone_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let run = out.join("meta-pseudo-labels-seed0");
    let first = write_plan(
        dir.path(),
        "first.toml",
        &interruptible_plan("finetune = { steps = 10, batch_size = 32, learning_rate = 0.01 }"),
    );

    // Interrupt the first run after its first joint-training save.
    let args = script_args(&first, &out, "meta-pseudo-labels", false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut script = Process::start(
        Path::new("python3"),
        &args,
        dir.path().join("interrupted.log"),
    );
    let checkpoint = run.join("checkpoints/mpl-joint.resume.safetensors");
    wait_for(
        "the first joint-training save",
        Duration::from_secs(300),
        || {
            assert!(
                script.is_running(),
                "the script ended early:\n{}",
                script.log_text()
            );
            checkpoint.exists().then_some(())
        },
    );
    let address = std::fs::read_to_string(run.join("coordinator.addr")).expect("address file");
    let status = Command::new("kill")
        .args(["-INT", &script.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    wait_for("the script to stop", Duration::from_secs(60), || {
        (!script.is_running()).then_some(())
    });
    assert!(
        script
            .log_text()
            .contains("interrupted; rerun with --reuse"),
        "{}",
        script.log_text()
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    wait_for("the coordinator to stop", Duration::from_secs(30), || {
        mentor_e2e::try_status(&runtime, address.trim())
            .is_none()
            .then_some(())
    });

    // The finetune alone changes: the joint training resumes from its save.
    let second_text =
        interruptible_plan("\n[mpl.finetune]\nsteps = 12\nbatch_size = 32\nlearning_rate = 0.01\n");
    let second = write_plan(dir.path(), "second.toml", &second_text);
    let stderr = run_script(&second, &out, "meta-pseudo-labels", true);
    assert!(
        stderr.contains("keeping the joint training"),
        "the joint training was not kept:\n{stderr}"
    );
    let logs = worker_logs(&run);
    let resumed = logs
        .lines()
        .find(|line| line.contains("meta pseudo labels resumes its joint training"))
        .unwrap_or_else(|| panic!("no worker resumed the joint training:\n{logs}"));
    assert!(!resumed.contains("step=0 "), "{resumed}");
    let accuracy = final_accuracy(&out);
    assert!((0.0..=1.0).contains(&accuracy));

    // The same plan again, with a comment more: the finished run is reused without starting
    // anything.
    let commented = write_plan(
        dir.path(),
        "second-commented.toml",
        &format!("# a comment changes nothing\n{second_text}"),
    );
    let stderr = run_script(&commented, &out, "meta-pseudo-labels", true);
    assert!(stderr.contains("reusing the finished run"), "{stderr}");
    assert_eq!(final_accuracy(&out), accuracy);

    // A change outside the finetune: the run starts again from scratch.
    let third = write_plan(
        dir.path(),
        "third.toml",
        &second_text.replacen("steps = 600", "steps = 100", 1),
    );
    let stderr = run_script(&third, &out, "meta-pseudo-labels", true);
    assert!(stderr.contains("running (logs in"), "{stderr}");
    assert!(
        !worker_logs(&run).contains("resumes its joint training"),
        "a run of a changed plan resumed an old joint training"
    );
}

/// supervised-1k-student trains, on the 1k labels alone, the model of the Meta Pseudo Labels
/// plan's student (here width 12 with a residual block, where the Noisy Student plan's teacher
/// has width 8 and none): its round-1 teacher checkpoint has that architecture.
#[test]
fn the_students_baseline_trains_the_meta_pseudo_labels_students_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let plan = write_plan(
        dir.path(),
        "mpl.toml",
        &plan_with(
            "tiny-mpl.toml",
            &[
                (
                    "[student.model]\nkind = \"cnn\"\nwidth = 8\nhidden = 32\n",
                    "[student.model]\nkind = \"cnn\"\nwidth = 12\nhidden = 32\nresidual_blocks = 1\n",
                ),
                ("dropout = 0.2", "dropout = 0.2\nstochastic_depth_survival = 0.9"),
            ],
        ),
    );
    run_script(&plan, &out, "supervised-1k-student", false);

    let run = out.join("supervised-1k-student-seed0");
    let bytes = std::fs::read(run.join("checkpoints/round-1-teacher.safetensors"))
        .expect("the baseline's teacher checkpoint");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let conv = tensors
        .tensor("stage1.conv.weight")
        .expect("a first convolution");
    assert_eq!(conv.shape(), [12, 1, 3, 3]);
    assert!(
        tensors
            .names()
            .iter()
            .any(|name| name.starts_with("block0.")),
        "no residual block in {:?}",
        tensors.names()
    );
    let written = std::fs::read_to_string(out.join("supervised-1k-student-seed0.toml"))
        .expect("the baseline's plan");
    assert!(
        written.contains("stochastic_depth_survival = 0.9"),
        "the student's stochastic depth is missing:\n{written}"
    );
    let accuracy = first_accuracy(&out, "supervised-1k-student");
    assert!((0.0..=1.0).contains(&accuracy));
}

/// Every seed trains on one labeled subset (ALGORITHMS.md section 4): the script fixes
/// `data.split_seed`, and the runs of seeds 0 and 1 record the same unlabeled listing (the
/// positions the labeled draw left), which another split seed changes.
#[test]
fn every_seed_trains_on_the_same_labeled_subset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = write_plan(dir.path(), "mpl.toml", &plan_with("tiny-mpl.toml", &[]));
    let listing = |out: &Path, seed: u32| -> String {
        let state = std::fs::read_to_string(
            out.join(format!("supervised-1k-student-seed{seed}/state.json")),
        )
        .expect("the run's state");
        let state: serde_json::Value = serde_json::from_str(&state).expect("json");
        state["unlabeled_fingerprint"]
            .as_str()
            .expect("a recorded listing")
            .to_string()
    };
    let run = |out: &Path, extra: &[&str]| {
        let mut args = script_args(&plan, out, "supervised-1k-student", false);
        let seeds = args.iter().position(|a| a == "--seeds").expect("--seeds") + 1;
        args[seeds] = "0,1".into();
        args.extend(extra.iter().map(|a| a.to_string()));
        let output = Command::new("python3")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "the script failed:\n{}",
            text(&output)
        );
    };
    let out = dir.path().join("out");
    run(&out, &[]);
    let written = std::fs::read_to_string(out.join("supervised-1k-student-seed1.toml"))
        .expect("seed 1's plan");
    assert!(
        written.contains("\nseed = 1\n") && written.contains("\nsplit_seed = 0\n"),
        "{written}"
    );
    let first = listing(&out, 0);
    assert_eq!(first, listing(&out, 1));
    // Another subset: the runs of the first are moved aside, not deleted.
    run(&out, &["--split-seed", "1"]);
    assert_eq!(listing(&out, 0), listing(&out, 1));
    assert_ne!(listing(&out, 0), first);
    let aside: Vec<String> = std::fs::read_dir(&out)
        .expect("out")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("supervised-1k-student-seed0.replaced-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept = std::fs::read_to_string(out.join(&aside[0]).join("state.json")).expect("kept");
    assert!(
        kept.contains(&first),
        "the earlier run was not kept as it was"
    );
    // A run directory a live coordinator holds is not touched.
    let lock = out.join("supervised-1k-student-seed0/coordinator.lock");
    let mut holder = Command::new("flock")
        .args(["-x", "-o"])
        .arg(&lock)
        .args(["sleep", "60"])
        .spawn()
        .expect("flock runs");
    wait_for("the lock to be held", Duration::from_secs(10), || {
        let probe = Command::new("flock")
            .args(["-n", "-s"])
            .arg(&lock)
            .arg("true")
            .status()
            .ok()?;
        (!probe.success()).then_some(())
    });
    let mut args = script_args(&plan, &out, "supervised-1k-student", false);
    args.extend(["--split-seed".to_string(), "2".to_string()]);
    let output = Command::new("python3")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs");
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(!output.status.success());
    assert!(
        text(&output).contains("is in use by a running coordinator"),
        "{}",
        text(&output)
    );
    assert_eq!(
        listing(&out, 0),
        listing(&out, 1),
        "the held run was left as it was"
    );
}

/// mpl-distilled: after the seed's Meta Pseudo Labels run, one Noisy Student round whose
/// teacher is that run's finetuned student, read with the MPL plan's student model.
#[test]
fn a_distilled_row_takes_its_teacher_from_the_same_seeds_mpl_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let plan = write_plan(dir.path(), "mpl.toml", &plan_with("tiny-mpl.toml", &[]));
    run_script(&plan, &out, "mpl-distilled", false);

    let mpl_accuracy = first_accuracy(&out, "meta-pseudo-labels");
    let distilled = first_accuracy(&out, "mpl-distilled");
    assert!((0.0..=1.0).contains(&distilled));
    let written = std::fs::read_to_string(out.join("mpl-distilled-seed0.toml"))
        .expect("the distillation plan");
    let teacher =
        out.join("meta-pseudo-labels-seed0/checkpoints/round-1-student-finetuned.safetensors");
    assert!(
        written.contains(&format!("checkpoint = \"{}\"", teacher.display())),
        "{written}"
    );
    // The teacher evaluated at the start of the round is the MPL run's final student.
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("results.json parses");
    let run = results["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .find(|run| run["method"] == "mpl-distilled")
        .expect("the distilled run");
    assert_eq!(
        run["status"]["rounds"][0]["teacher_test_accuracy"].as_f64(),
        Some(mpl_accuracy)
    );

    // The MPL run copied to another machine (another folder), whose copy of the data set lies
    // elsewhere: kept, and its finetuned student is read from where the copy put it.
    let copied = dir.path().join("copied");
    std::fs::rename(&out, &copied).expect("move the runs");
    std::fs::remove_dir_all(copied.join("mpl-distilled-seed0")).expect("remove the distillation");
    let data = dir.path().join("data");
    std::os::unix::fs::symlink("/usr/share/datasets/fashion-mnist", &data).expect("link the data");
    let elsewhere = format!("dir = \"{}\"", data.display());
    let plan = write_plan(
        dir.path(),
        "mpl.toml",
        &plan_with(
            "tiny-mpl.toml",
            &[("dir = \"/usr/share/datasets/fashion-mnist\"", &elsewhere)],
        ),
    );
    let teacher =
        copied.join("meta-pseudo-labels-seed0/checkpoints/round-1-student-finetuned.safetensors");
    // It ran on one worker there (a GPU machine's): a finished run is kept whatever processes
    // ran it.
    let copied_plan = copied.join("meta-pseudo-labels-seed0.toml");
    let one_worker = std::fs::read_to_string(&copied_plan)
        .expect("the copied run's plan")
        .replacen("min_workers = 2", "min_workers = 1", 1);
    assert!(one_worker.contains("min_workers = 1"), "{one_worker}");
    std::fs::write(&copied_plan, one_worker).expect("write");
    // Then without the status.json local-cluster.sh leaves (gpu-check.sh --mpl brings back the
    // state alone): the state tells.
    for without_status in [false, true] {
        if without_status {
            std::fs::remove_file(copied.join("meta-pseudo-labels-seed0/status.json"))
                .expect("remove the status");
            std::fs::remove_dir_all(copied.join("mpl-distilled-seed0"))
                .expect("remove the distillation");
        }
        let stderr = run_script(&plan, &copied, "mpl-distilled", true);
        assert!(
            stderr.contains("meta-pseudo-labels, seed 0: reusing the finished run"),
            "{stderr}"
        );
        let written = std::fs::read_to_string(copied.join("mpl-distilled-seed0.toml"))
            .expect("the distillation plan");
        assert!(
            written.contains(&format!("checkpoint = \"{}\"", teacher.display())),
            "{written}"
        );
        assert_eq!(first_accuracy(&copied, "meta-pseudo-labels"), mpl_accuracy);
    }
}

/// A failed Meta Pseudo Labels run of the same plan (a damaged joint-training save, since moved
/// away) is retried from where it failed with `--reuse`, not run again from scratch.
#[test]
fn reuse_retries_a_failed_run_from_where_it_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let plan = write_plan(dir.path(), "mpl.toml", &plan_with("tiny-mpl.toml", &[]));
    // The run the script would make for seed 0, failed: its plan and directory where the
    // script keeps them.
    let run = out.join("meta-pseudo-labels-seed0");
    let seed_plan = write_plan(
        &out_dir(&out),
        "meta-pseudo-labels-seed0.toml",
        &plan_with("tiny-mpl.toml", &[("seed = 1", "seed = 0")]),
    );
    let save = run.join("checkpoints/mpl-joint.resume.safetensors");
    std::fs::create_dir_all(save.parent().expect("parent")).expect("mkdir");
    std::fs::write(&save, b"damaged").expect("a damaged save");
    let bin_dir = binary("coordinator")
        .parent()
        .expect("binaries have a directory")
        .to_path_buf();
    let failed = Command::new(workspace_root().join("scripts/local-cluster.sh"))
        .arg("--plan")
        .arg(&seed_plan)
        .arg("--state-dir")
        .arg(&run)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .stdin(Stdio::null())
        .output()
        .expect("local-cluster.sh runs");
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    let run_id = |run: &Path| -> serde_json::Value {
        let state = std::fs::read_to_string(run.join("state.json")).expect("the run's state");
        let state: serde_json::Value = serde_json::from_str(&state).expect("state parses");
        state["run_id"].clone()
    };
    let failed_run = run_id(&run);
    std::fs::remove_file(&save).expect("move the damaged save away");

    let stderr = run_script(&plan, &out, "meta-pseudo-labels", true);
    assert!(
        stderr.contains("meta-pseudo-labels, seed 0: retrying the failed run"),
        "{stderr}"
    );
    assert!((0.0..=1.0).contains(&final_accuracy(&out)));
    // The same run went on (its run id kept), not a new one.
    assert_eq!(run_id(&run), failed_run);
    let logs = std::fs::read_to_string(run.join("logs/coordinator.log")).expect("log");
    assert!(
        logs.contains("retrying the failed run from the phase it failed in"),
        "{logs}"
    );
}

/// `out`, created.
fn out_dir(out: &Path) -> PathBuf {
    std::fs::create_dir_all(out).expect("mkdir");
    out.to_path_buf()
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
