//! `mentor plan`: the shipped plans pass over the real Fashion-MNIST files and say what their
//! runs do; a bad field, missing files and a split the data cannot give are refused, naming
//! what is wrong.

use std::path::Path;
use std::process::Output;

use std::time::Duration;

use mentor_e2e::{
    binary, saved_state, start_coordinator, tiny_plan_with, wait_for, workspace_root,
};
use mentor_plan::Plan;

fn mentor_plan(args: &[&str], plan: &Path) -> Output {
    std::process::Command::new(binary("mentor"))
        .arg("plan")
        .args(args)
        .arg(plan)
        .output()
        .expect("run mentor plan")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes a safetensors file of one tensor at `path`: a checkpoint as `mentor plan` and the
/// coordinator check one (its header), not one a model loads.
fn write_tiny_checkpoint(path: &Path) {
    let header = r#"{"fc.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0; 4]);
    std::fs::write(path, bytes).expect("write checkpoint");
}

#[test]
fn every_shipped_plan_passes_and_says_what_its_run_does() {
    let plans = workspace_root().join("deploy/plans");
    let mut checked = 0;
    for entry in std::fs::read_dir(&plans).expect("deploy/plans") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|extension| extension != "toml") {
            continue;
        }
        let plan = Plan::load(&path).expect("a shipped plan loads");
        // A plan whose teacher is another run's checkpoint is refused, naming the file, until
        // that run has made it; with a checkpoint there it passes.
        let copy = tempfile::tempdir().expect("tempdir");
        let path = match &plan.teacher.checkpoint {
            Some(checkpoint) if !checkpoint.exists() => {
                let output = mentor_plan(&[], &path);
                let stderr = text(&output.stderr);
                assert_eq!(output.status.code(), Some(1), "{stderr}");
                assert!(
                    stderr.contains(&format!(
                        "teacher.checkpoint `{}`: no such file",
                        checkpoint.display()
                    )),
                    "{stderr}"
                );
                let made = copy.path().join("teacher.safetensors");
                write_tiny_checkpoint(&made);
                let text = std::fs::read_to_string(&path).expect("plan").replacen(
                    &checkpoint.display().to_string(),
                    &made.display().to_string(),
                    1,
                );
                let copied = copy.path().join(path.file_name().expect("file name"));
                std::fs::write(&copied, text).expect("write plan");
                copied
            }
            _ => path,
        };
        let plan = Plan::load(&path).expect("a shipped plan loads");
        let output = mentor_plan(&[], &path);
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}: {stderr}",
            path.display()
        );
        assert!(
            stdout.starts_with(&format!("plan {}: ", plan.name)),
            "{}: {stdout}",
            path.display()
        );
        assert!(stdout.contains("labeled"), "{stdout}");

        // --resolved prints the very plan the run records, every default written out.
        let output = mentor_plan(&["--resolved"], &path);
        assert_eq!(output.status.code(), Some(0));
        let resolved = text(&output.stdout);
        assert_eq!(resolved, plan.to_toml_string());
        assert_eq!(
            Plan::from_toml_str(&resolved).expect("the resolved plan parses"),
            Plan::from_toml_str(&plan.to_toml_string()).expect("plan"),
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} plans in deploy/plans");
}

#[test]
fn the_main_plans_are_described_from_their_data() {
    let noisy_student = workspace_root().join("deploy/plans/fashion-mnist-noisy-student.toml");
    let stdout = text(&mentor_plan(&[], &noisy_student).stdout);
    // Counted from the data: 100 of each class drawn, the rest of the 60,000 unlabeled, in
    // shards of 8,192.
    assert!(
        stdout.contains(
            "1,000 labeled (100 per class drawn with seed 0, 10 classes), 59,000 unlabeled in 8 shards, 10,000 test images"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("(28x28 images)"), "{stdout}");
    assert!(
        stdout.contains("round 2   teacher  round 1's student"),
        "{stdout}"
    );
    assert!(stdout.contains("8 labeling tasks"), "{stdout}");
    // Every training setting of a role is said.
    assert!(
        stdout.contains("sgd at 0.05 (Nesterov momentum 0.9, weight decay 5e-4), cosine after 50 warmup steps, label smoothing 0.1; progress every 50 steps"),
        "{stdout}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let changed = dir.path().join("changed.toml");
    let text_of = std::fs::read_to_string(&noisy_student).expect("plan");
    let edited = text_of.replacen(
        "[teacher.train]\n",
        "[teacher.train]\nflip_and_shift = false\nlog_every = 7\nmomentum = 0\nlabel_smoothing = 0\n",
        1,
    );
    assert_ne!(edited, text_of, "the plan has a [teacher.train] table");
    std::fs::write(&changed, edited).expect("write plan");
    let changed_out = text(&mentor_plan(&[], &changed).stdout);
    assert!(
        changed_out.contains("sgd at 0.05 (no momentum, weight decay 5e-4), cosine after 50 warmup steps, no flips or shifts; progress every 7 steps"),
        "{changed_out}"
    );

    let mpl = workspace_root().join("deploy/plans/fashion-mnist-mpl-30k-mu7.toml");
    let stdout = text(&mentor_plan(&[], &mpl).stdout);
    assert!(
        stdout.contains("losses measured in training mode"),
        "{stdout}"
    );
    let eval = workspace_root().join("deploy/plans/fashion-mnist-mpl-30k-mu7-w10-eval.toml");
    let eval_out = text(&mentor_plan(&[], &eval).stdout);
    assert!(
        eval_out.contains("losses measured in evaluation mode around the step"),
        "{eval_out}"
    );
    assert!(
        stdout.contains("30,000 steps of 64 labeled + 448 unlabeled"),
        "{stdout}"
    );
    assert!(
        stdout.contains("(1,920 epochs of the labels, 228 of the unlabeled images)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("finetune  2,000 steps of 512 labeled"),
        "{stdout}"
    );
    assert!(
        stdout.contains("teacher at 0.05, student at 0.05 after waiting 100 steps"),
        "{stdout}"
    );
}

#[test]
fn bad_plans_and_data_are_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = |name: &str, plan_text: &str| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, plan_text).expect("write plan");
        let output = mentor_plan(&[], &path);
        assert_eq!(output.status.code(), Some(1), "{name}");
        assert!(output.stdout.is_empty(), "{name}: {}", text(&output.stdout));
        let stderr = text(&output.stderr);
        assert!(stderr.contains(name), "{name}: {stderr}");
        stderr
    };

    let stderr = refused("field.toml", &tiny_plan_with(&[("top_k = 3", "top_k = 0")]));
    assert!(
        stderr.contains("pseudo_labels.top_k: must be between 1 and data.classes (10), not 0"),
        "{stderr}"
    );

    // A setting that would do nothing: refused for a new run, naming it.
    let stderr = refused(
        "unused.toml",
        &tiny_plan_with(&[("top_k = 3", "top_k = 3\nbalance = false\nper_class = 50")]),
    );
    assert!(
        stderr.contains("(for a new run)")
            && stderr.contains("pseudo_labels.per_class: sets the class balance"),
        "{stderr}"
    );
    // For a run recorded with it (an earlier build's), which resumes with its plan: accepted.
    // (A real run of the tiny plan, its recorded plan then given that setting, as such a build
    // recorded it.)
    let recorded = dir.path().join("recorded-run");
    let tiny = dir.path().join("tiny.toml");
    std::fs::write(&tiny, tiny_plan_with(&[])).expect("write plan");
    let (mut coordinator, _) = start_coordinator(&tiny, &recorded);
    coordinator.signal("-TERM");
    wait_for("the coordinator to stop", Duration::from_secs(30), || {
        (!coordinator.is_running()).then_some(())
    });
    let mut state = saved_state(&recorded);
    let recorded_plan = state["plan_toml"]
        .as_str()
        .expect("plan_toml")
        .replacen("per_class = 0", "per_class = 50", 1)
        .replacen("balance = true", "balance = false", 1);
    assert!(recorded_plan.contains("per_class = 50") && recorded_plan.contains("balance = false"));
    state["plan_toml"] = recorded_plan.into();
    std::fs::write(recorded.join("state.json"), state.to_string()).expect("state");
    let state_dir = ["--state-dir", recorded.to_str().expect("utf-8")];
    let output = mentor_plan(&state_dir, &dir.path().join("unused.toml"));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));

    // Another plan for that run: refused as the coordinator would refuse it, naming the
    // difference (a run started then would stop at once).
    let other = dir.path().join("other.toml");
    let other_text = tiny_plan_with(&[("top_k = 3", "top_k = 4\nbalance = false\nper_class = 50")]);
    std::fs::write(&other, other_text).expect("write plan");
    let output = mentor_plan(&state_dir, &other);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("other.toml")
            && stderr.contains("holds a run of another plan")
            && stderr.contains("pseudo_labels.top_k: 3 -> 4"),
        "{stderr}"
    );
    // Nor is there a finetune to redo or a failure to retry in it.
    for (flag, why) in [
        ("--redo-finetune", "cannot redo the finetune"),
        ("--retry-failed", "it has not failed"),
    ] {
        let output = mentor_plan(
            &[state_dir[0], state_dir[1], flag],
            &dir.path().join("unused.toml"),
        );
        assert_eq!(output.status.code(), Some(1), "{flag}");
        let stderr = text(&output.stderr);
        assert!(stderr.contains(why), "{flag}: {stderr}");
    }
    // A state file that cannot be read is named.
    std::fs::write(recorded.join("state.json"), "{ cut short").expect("state");
    let output = mentor_plan(&state_dir, &tiny);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("unreadable state.json"), "{stderr}");

    let stderr = refused(
        "no-data.toml",
        &tiny_plan_with(&[(
            "/usr/share/datasets/fashion-mnist",
            dir.path().to_str().expect("utf-8"),
        )]),
    );
    assert!(stderr.contains("data file not found"), "{stderr}");
    assert!(stderr.contains("train-labels-idx1-ubyte"), "{stderr}");

    // Fashion-MNIST has 6,000 training images of each class.
    let stderr = refused(
        "split.toml",
        &tiny_plan_with(&[("labeled_per_class = 10", "labeled_per_class = 6001")]),
    );
    assert!(
        stderr.contains(
            "data.labeled_per_class = 6001, but the training set has only 6000 images of class 0"
        ),
        "{stderr}"
    );

    // Test labels the model has no output for (Fashion-MNIST has 10 classes; training images
    // of the other classes would only be unlabeled).
    let stderr = refused(
        "classes.toml",
        &tiny_plan_with(&[("[data]\n", "[data]\nclasses = 5\n")]),
    );
    assert!(
        stderr.contains("the test set has images labeled 9, but data.classes = 5"),
        "{stderr}"
    );

    // Every training image labeled: nothing left for the teacher to label.
    let stderr = refused(
        "all-labeled.toml",
        &tiny_plan_with(&[
            ("labeled_per_class = 10", "labeled_per_class = 6000"),
            ("unlabeled_limit = 1500\n", ""),
        ]),
    );
    assert!(
        stderr.contains(
            "data.labeled_per_class x data.classes (6000 x 10) takes every training image"
        ),
        "{stderr}"
    );

    // Soft labels the run could not store.
    let stderr = refused(
        "storage.toml",
        &tiny_plan_with(&[("top_k = 3\n", "top_k = 3\nstorage = \"/dev/null/labels\"\n")]),
    );
    assert!(
        stderr.contains("pseudo_labels.storage `/dev/null/labels`: `/dev/null` is not a directory"),
        "{stderr}"
    );

    // A folder this user may not write in (for root, who may write anywhere, the command runs
    // as `nobody` through setpriv, from a copy of the binary in /tmp, which `nobody` can reach
    // whatever TMPDIR says).
    let open_dir = tempfile::tempdir_in("/tmp").expect("a folder in /tmp");
    let dir = &open_dir;
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).expect("locked");
    let mode = |path: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    mode(dir.path(), 0o755);
    mode(&locked, 0o555);
    let plan = dir.path().join("locked.toml");
    let storage = locked.join("labels");
    std::fs::write(
        &plan,
        tiny_plan_with(&[(
            "top_k = 3\n",
            &format!("top_k = 3\nstorage = \"{}\"\n", storage.display()),
        )]),
    )
    .expect("write plan");
    mode(&plan, 0o644);
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .expect("id");
    let output = if text(&uid.stdout).trim() == "0" {
        let copy = dir.path().join("mentor");
        std::fs::copy(binary("mentor"), &copy).expect("copy mentor");
        mode(&copy, 0o755);
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&copy)
            .arg("plan")
            .arg(&plan)
            .output()
            .expect("setpriv (util-linux)")
    } else {
        mentor_plan(&[], &plan)
    };
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "`{}` is not writable by this user",
            locked.display()
        )),
        "{stderr}"
    );

    let missing = dir.path().join("absent.toml");
    let output = mentor_plan(&[], &missing);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("cannot read plan") && stderr.contains("absent.toml"),
        "{stderr}"
    );
}

/// A plan's `teacher.checkpoint` is checked while its run still labels with it: `mentor plan
/// --state-dir` on a run past its first labeling passes without the file, as the coordinator
/// then starts without it; before, the missing file is refused.
#[test]
fn a_given_teacher_is_needed_until_the_first_labeling_is_done() {
    let dir = tempfile::tempdir().expect("tempdir");
    let teacher = dir.path().join("teacher.safetensors");
    write_tiny_checkpoint(&teacher);
    let plan = dir.path().join("given.toml");
    let plan_text = tiny_plan_with(&[
        ("rounds = 2", "rounds = 1"),
        ("width_growth_per_round = 4\n", ""),
        (
            "[teacher.model]\nkind = \"cnn\"\nwidth = 8\nhidden = 32\n\n[teacher.train]\nsteps = 30\nbatch_size = 32\nlog_every = 10\n",
            &format!(
                "[teacher]\ncheckpoint = \"{}\"\n\n[teacher.model]\nkind = \"cnn\"\nwidth = 8\nhidden = 32\n",
                teacher.display()
            ),
        ),
    ]);
    std::fs::write(&plan, plan_text).expect("write plan");
    let run = dir.path().join("run");
    let (mut coordinator, _) = start_coordinator(&plan, &run);
    coordinator.signal("-TERM");
    wait_for("the coordinator to stop", Duration::from_secs(30), || {
        (!coordinator.is_running()).then_some(())
    });
    std::fs::remove_file(&teacher).expect("remove the teacher");
    let state_dir = ["--state-dir", run.to_str().expect("utf-8")];

    // Waiting for workers: the first labeling is still to come.
    let output = mentor_plan(&state_dir, &plan);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("teacher.checkpoint") && stderr.contains("no such file"),
        "{stderr}"
    );

    // Past it (the run trains its student).
    let mut state = saved_state(&run);
    state["phase"] = "train-student".into();
    std::fs::write(run.join("state.json"), state.to_string()).expect("state");
    let output = mentor_plan(&state_dir, &plan);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

/// A reader that goes away (`mentor plan PLAN | head -1`) ends the command quietly with 141
/// (128 + SIGPIPE), as any Unix tool, not with a panic.
#[test]
fn a_closed_output_ends_the_command_quietly() {
    let mut child = std::process::Command::new(binary("mentor"))
        .args(["plan", "--resolved"])
        .arg(workspace_root().join("deploy/plans/fashion-mnist-noisy-student.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run mentor plan");
    // Closed before the plan's data is read and the plan written.
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("mentor plan ends");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
