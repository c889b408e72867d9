//! The benchmark scripts and binaries still run, on the smallest settings: each prints its
//! table with a positive finite number in every measured cell. Nothing here is timed; the
//! numbers themselves are the benchmarks' business (README, "Benchmarks"). A benchmark that
//! no longer runs (a plan it writes that a later check refuses, an argument renamed) fails
//! here rather than when someone next measures.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use mentor_e2e::{binary, workspace_root};

/// The folder of the built binaries, as the scripts' `MENTOR_BIN`.
fn bin_dir() -> PathBuf {
    binary("coordinator")
        .parent()
        .expect("binaries have a directory")
        .to_path_buf()
}

/// Runs `scripts/<script>` with `args` on the built binaries (no build of its own: without
/// `CARGO_TARGET_DIR` the script takes `MENTOR_BIN` as it is) and returns its standard output,
/// failing on a non-zero exit.
fn run_script(script: &str, args: &[&str]) -> String {
    let mut command = Command::new(workspace_root().join("scripts").join(script));
    command
        .env("MENTOR_BIN", bin_dir())
        .env_remove("CARGO_TARGET_DIR");
    stdout_of(command, script, args)
}

/// The standard output of `command` run with `args` in the workspace root, failing (with both
/// outputs) on a non-zero exit.
fn stdout_of(mut command: Command, name: &str, args: &[&str]) -> String {
    let output = command
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("{name} does not start: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The numbers of the line of `table` that starts (after spaces) with `label`, which must hold
/// `count` of them, all positive and finite.
fn row(table: &str, label: &str, count: usize) -> Vec<f64> {
    let line = table
        .lines()
        .find(|line| line.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{table}"));
    let numbers: Vec<f64> = line.trim_start()[label.len()..]
        .split_whitespace()
        .filter_map(|field| field.replace(',', "").parse().ok())
        .collect();
    assert_eq!(numbers.len(), count, "row {label:?}: {line}");
    assert!(
        numbers.iter().all(|n| n.is_finite() && *n > 0.0),
        "row {label:?}: {line}"
    );
    numbers
}

#[test]
fn data_parallel_training_benchmark_runs_one_and_two_processes() {
    let table = run_script("bench-ddp.sh", &["--steps", "3", "--batch", "16"]);
    // img/s of mentor and PyTorch (both layouts), and the two ratios.
    row(&table, "1 ", 5);
    row(&table, "2 ", 5);
}

#[test]
fn all_reduce_benchmark_runs_the_ring_and_gloo() {
    let table = run_script(
        "bench-allreduce.sh",
        &["--worlds", "2", "--sizes-mb", "1", "--iterations", "2"],
    );
    // algbw and busbw of both, and the ratio.
    row(&table, "2      1MB", 5);
}

#[test]
fn scheduler_benchmark_runs_both_ways_of_saving() {
    let table = run_script(
        "bench-scheduler.sh",
        &[
            "--shard-size",
            "100",
            "--tasks",
            "40",
            "--reference-tasks",
            "10",
        ],
    );
    // tasks/s, tasks, seconds and saves of each, then the ratio.
    assert_eq!(row(&table, "grouped saves (mentor):", 4)[1], 40.0);
    assert_eq!(row(&table, "a save per change:", 4)[1], 10.0);
    row(&table, "ratio (grouped / a save per change):", 1);
}

#[test]
fn labeling_benchmark_runs_the_service_and_pytorch() {
    let table = run_script(
        "bench-label.sh",
        &["--examples", "64", "--batch-size", "32"],
    );
    row(&table, "bare forward (decoded, no I/O)", 1);
    // img/s, then the ratio (to the bare forward, then mentor / PyTorch).
    row(&table, "mentor label service", 2);
    row(&table, "PyTorch DataLoader + numpy", 2);
    row(&table, "student read of pseudo labels:", 1);
}

/// The model and MPL step benchmarks' own halves (their scripts add PyTorch with torchvision,
/// which the test setup does not install).
#[test]
fn model_and_mpl_step_benchmark_binaries_measure() {
    let run = |name: &str, args: &[&str]| -> Vec<serde_json::Value> {
        // The allocator's settings are the benchmark's own, not the environment's.
        let mut command = Command::new(binary(name));
        command.env_remove("GLIBC_TUNABLES");
        for variable in [
            "MALLOC_ARENA_MAX",
            "MALLOC_MMAP_MAX_",
            "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_",
            "MALLOC_TOP_PAD_",
        ] {
            command.env_remove(variable);
        }
        stdout_of(command, name, args)
            .lines()
            .filter(|line| line.starts_with('{'))
            .map(|line| serde_json::from_str(line).expect("a JSON result"))
            .collect()
    };
    let positive = |value: &serde_json::Value, key: &str| {
        let number = value[key].as_f64().unwrap_or(f64::NAN);
        assert!(number.is_finite() && number > 0.0, "{key} in {value}");
    };
    let models = run(
        "bench-models",
        &[
            "--models",
            "wrn-28-2",
            "--batch",
            "2",
            "--warmup",
            "1",
            "--iterations",
            "1",
            "--threads",
            "1",
        ],
    );
    let modes: Vec<&str> = models
        .iter()
        .map(|result| {
            positive(result, "images_per_second");
            result["mode"].as_str().unwrap_or("?")
        })
        .collect();
    assert_eq!(modes, ["train", "inference"], "{models:?}");
    // Steps enough for the allocator to reach its steady state.
    let mpl_args = [
        "--plan",
        "deploy/plans/fashion-mnist-mpl.toml",
        "--steps",
        "4",
        "--warmup",
        "4",
        "--threads",
        "1",
        "--device",
        "cpu",
    ];
    let mpl = run("bench-mpl", &mpl_args);
    assert_eq!(mpl.len(), 1, "{mpl:?}");
    positive(&mpl[0], "step_seconds");
    positive(&mpl[0], "batch_seconds");
    // Freed memory is kept for reuse as in the workers: the steps' activations (45 MB blocks)
    // fault in no fresh pages, where the allocator's default maps them anew at every step.
    let mut args = mpl_args.to_vec();
    args.extend(["--keep-freed-memory", "false"]);
    let default = run("bench-mpl", &args);
    assert_eq!(default[0]["freed_memory_kept"], false, "{default:?}");
    assert_eq!(mpl[0]["freed_memory_kept"], true, "{mpl:?}");
    let faults = |result: &serde_json::Value| {
        result["minor_faults_per_step"]
            .as_f64()
            .unwrap_or_else(|| panic!("no fault count: {result}"))
    };
    assert!(
        faults(&mpl[0]) * 4.0 < faults(&default[0]),
        "page faults a step: {} kept, {} by default",
        faults(&mpl[0]),
        faults(&default[0])
    );
}
