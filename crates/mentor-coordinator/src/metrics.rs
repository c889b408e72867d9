//! The run's measurements as they arrive: `<run_dir>/metrics.jsonl`, one JSON object a line.
//!
//! Status shows the latest report of each worker; this file keeps them all, so that a run's
//! curves (loss, `h`, the UDA mask rate, test accuracy as the student trains, images per
//! second) can be plotted during and after the run without reading logs. One line per progress
//! report of a task's current attempt (rank 0's alone for a data-parallel group: every rank
//! reports the same global numbers), and one per attempt that reports its end (done, or
//! failed), with its result. An attempt abandoned without a report (its worker lost, its lease
//! expired, the coordinator restarted) gets no line of its own. The file is only appended to: a
//! restarted coordinator goes on writing after the lines of the run it resumes, and a task
//! that runs again (from step 0, or a joint training from its last save) reports its steps
//! again; the lines later in the file are those of the attempt the run kept.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::state::{TaskOutcome, TaskRecord};
use crate::Progress;

/// The file's name in the run directory.
pub const FILE_NAME: &str = "metrics.jsonl";

/// Appends the run's measurements to `metrics.jsonl`. A file that cannot be written is
/// reported once and then left alone: the run goes on without it.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: Option<File>,
}

impl MetricsLog {
    /// Opens (creates, or goes on after the lines of) `<run_dir>/metrics.jsonl`.
    pub fn open(run_dir: &Path) -> MetricsLog {
        let path = run_dir.join(FILE_NAME);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| {
                // A line cut short (a full disk, a crash mid-write) is ended, so that the
                // lines written after it stay whole.
                if ends_mid_line(&mut file)? {
                    file.write_all(b"\n")?;
                }
                Ok(file)
            })
            .map_err(|error| {
                tracing::warn!(path = %path.display(), %error, "cannot write the metrics file; the run goes on without it");
            })
            .ok();
        MetricsLog { path, file }
    }

    /// A progress report of `attempt` of `task`, made by `worker`.
    pub fn progress(
        &mut self,
        run_id: &str,
        task: &TaskRecord,
        attempt: u32,
        worker: &str,
        progress: &Progress,
    ) {
        let mut row = task_row("progress", run_id, task, attempt, worker);
        row.insert("step".into(), json!(progress.step));
        row.insert("total_steps".into(), json!(progress.total_steps));
        row.insert("loss".into(), finite(progress.loss));
        row.insert(
            "images_per_second".into(),
            finite(Some(progress.images_per_second)),
        );
        let metrics: Map<String, Value> = progress
            .metrics
            .iter()
            .map(|(key, value)| (key.clone(), finite(Some(*value))))
            .collect();
        row.insert("metrics".into(), Value::Object(metrics));
        self.append(row);
    }

    /// The end of `attempt` of `task`: its result, or why it failed.
    pub fn outcome(
        &mut self,
        run_id: &str,
        task: &TaskRecord,
        attempt: u32,
        worker: &str,
        outcome: &TaskOutcome,
    ) {
        let event = match outcome {
            TaskOutcome::Failed(_) | TaskOutcome::GroupFailed(_) => "failed",
            _ => "done",
        };
        let mut row = task_row(event, run_id, task, attempt, worker);
        match outcome {
            TaskOutcome::Trained {
                checkpoint,
                final_loss,
            } => {
                row.insert("final_loss".into(), finite(Some(*final_loss)));
                row.insert("checkpoint".into(), json!(checkpoint.display().to_string()));
            }
            TaskOutcome::Labeled(shard) => {
                row.insert("examples".into(), json!(shard.examples));
                row.insert("bytes".into(), json!(shard.bytes));
            }
            TaskOutcome::Evaluated { accuracy, loss } => {
                row.insert("test_accuracy".into(), finite(Some(*accuracy)));
                row.insert("test_loss".into(), finite(Some(*loss)));
            }
            TaskOutcome::Failed(error) => {
                row.insert("error".into(), json!(error));
            }
            TaskOutcome::GroupFailed(error) => {
                row.insert("error".into(), json!(error));
                row.insert("group_failure".into(), json!(true));
            }
        }
        self.append(row);
    }

    fn append(&mut self, row: Map<String, Value>) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let mut line = Value::Object(row).to_string();
        line.push('\n');
        // One write per line: a reader never sees half a line from a coordinator that was
        // killed between two writes.
        if let Err(error) = file.write_all(line.as_bytes()) {
            tracing::warn!(path = %self.path.display(), %error, "cannot write the metrics file; the run goes on without it");
            self.file = None;
        }
    }
}

/// Whether `file` is not empty and its last byte is not a newline.
fn ends_mid_line(file: &mut File) -> std::io::Result<bool> {
    let length = file.metadata()?.len();
    if length == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(length - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// The fields every line has.
fn task_row(
    event: &str,
    run_id: &str,
    task: &TaskRecord,
    attempt: u32,
    worker: &str,
) -> Map<String, Value> {
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or(0.0);
    let mut row = Map::new();
    row.insert("time".into(), json!((time * 1000.0).round() / 1000.0));
    row.insert("event".into(), json!(event));
    row.insert("run_id".into(), json!(run_id));
    row.insert("round".into(), json!(task.round));
    row.insert("task".into(), json!(task.id.to_string()));
    row.insert("kind".into(), json!(task.spec.describe()));
    row.insert("attempt".into(), json!(attempt));
    row.insert("world_size".into(), json!(task.world_size.max(1)));
    row.insert("worker".into(), json!(worker));
    row
}

/// `null` for what is not known or not a number (JSON has no NaN).
fn finite(value: Option<f64>) -> Value {
    value
        .filter(|v| v.is_finite())
        .map_or(Value::Null, |v| json!(v))
}
