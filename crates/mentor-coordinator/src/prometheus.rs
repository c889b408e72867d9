//! The run's status for Prometheus: `GET /metrics` on `coordinator --metrics-listen ADDR`, in
//! the text exposition format (version 0.0.4), built from the same status `mentor status`
//! shows. A minimal HTTP/1.1 responder: one request per connection, nothing else served.

use std::fmt::Write as _;

use mentor_proto::coordinator::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::service::{status_of, Shared};

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

/// One gauge family, its HELP and TYPE lines, then `name{labels} value` per label set.
fn gauges(out: &mut String, name: &str, help: &str, samples: &[(Vec<(&str, &str)>, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (labels, value) in samples {
        out.push_str(name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(label, text)| format!("{label}=\"{}\"", escape(text)))
                .collect();
            let _ = write!(out, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(out, " {}", number(*value));
    }
}

/// The status as Prometheus text.
pub fn exposition(status: &pb::RunStatus) -> String {
    let mut out = String::new();
    let run = vec![
        ("run_id", status.run_id.as_str()),
        ("name", status.name.as_str()),
        ("method", status.method.as_str()),
        ("status", status.status.as_str()),
        ("phase", status.phase.as_str()),
    ];
    gauges(
        &mut out,
        "mentor_run_info",
        "The run (always 1), labelled with its id, plan name, method, status and phase.",
        &[(run, 1.0)],
    );
    let flag = |yes: bool| if yes { 1.0 } else { 0.0 };
    gauges(
        &mut out,
        "mentor_run_finished",
        "1 once the run has ended (succeeded or failed).",
        &[(vec![], flag(status.status != "running"))],
    );
    gauges(
        &mut out,
        "mentor_run_failed",
        "1 if the run failed.",
        &[(vec![], flag(status.status == "failed"))],
    );
    gauges(
        &mut out,
        "mentor_run_round",
        "The round the run is in.",
        &[(vec![], f64::from(status.round))],
    );
    gauges(
        &mut out,
        "mentor_run_rounds",
        "Rounds the run has in all.",
        &[(vec![], f64::from(status.total_rounds))],
    );
    gauges(
        &mut out,
        "mentor_run_elapsed_seconds",
        "Seconds since the run began, until it ended.",
        &[(vec![], status.elapsed_seconds)],
    );
    gauges(
        &mut out,
        "mentor_tasks",
        "Tasks of the run so far, by state (done, or all of them).",
        &[
            (vec![("state", "done")], f64::from(status.tasks_done)),
            (vec![("state", "all")], f64::from(status.tasks_total)),
        ],
    );
    let states = ["active", "silent", "suspected", "lost", "exited"];
    let counts: Vec<(Vec<(&str, &str)>, f64)> = states
        .iter()
        .map(|state| {
            let count = status.workers.iter().filter(|w| w.state == *state).count();
            (vec![("state", *state)], count as f64)
        })
        .collect();
    gauges(
        &mut out,
        "mentor_workers",
        "Registered workers by state.",
        &counts,
    );
    gauges(
        &mut out,
        "mentor_workers_required",
        "Workers the run waits for before it starts (workers.min_workers).",
        &[(vec![], f64::from(status.min_workers))],
    );

    // Per worker: what its current task reported last.
    let busy: Vec<&pb::WorkerStatus> = status
        .workers
        .iter()
        .filter(|w| !w.task_id.is_empty())
        .collect();
    let per_worker = |value: &dyn Fn(&pb::WorkerStatus) -> Option<f64>| {
        busy.iter()
            .filter_map(|w| {
                value(w).map(|v| {
                    (
                        vec![
                            ("worker", w.worker_id.as_str()),
                            ("task", w.task.as_str()),
                            ("device", w.device.as_str()),
                        ],
                        v,
                    )
                })
            })
            .collect::<Vec<_>>()
    };
    gauges(
        &mut out,
        "mentor_worker_step",
        "The step the worker's task reported last.",
        &per_worker(&|w| Some(w.step as f64)),
    );
    gauges(
        &mut out,
        "mentor_worker_steps",
        "Steps of the worker's task in all.",
        &per_worker(&|w| Some(w.total_steps as f64)),
    );
    gauges(
        &mut out,
        "mentor_worker_loss",
        "The training loss the worker's task reported last.",
        // Tasks that report no loss (labeling, evaluation) have no sample: a NaN would make
        // every aggregate over the workers NaN.
        &per_worker(&|w| Some(w.loss).filter(|loss| loss.is_finite())),
    );
    gauges(
        &mut out,
        "mentor_worker_images_per_second",
        "Images per second of the worker's task.",
        &per_worker(&|w| Some(w.images_per_second)),
    );
    gauges(
        &mut out,
        "mentor_worker_seconds_left",
        "Seconds until the worker's task ends, at its pace so far.",
        &per_worker(&|w| w.seconds_left),
    );
    let mut named: Vec<(Vec<(&str, &str)>, f64)> = Vec::new();
    for worker in &busy {
        let mut metrics: Vec<(&String, &f64)> = worker.metrics.iter().collect();
        metrics.sort_by(|a, b| a.0.cmp(b.0));
        for (metric, value) in metrics {
            named.push((
                vec![
                    ("worker", worker.worker_id.as_str()),
                    ("task", worker.task.as_str()),
                    ("metric", metric.as_str()),
                ],
                *value,
            ));
        }
    }
    gauges(
        &mut out,
        "mentor_worker_metric",
        "The task's own measurements (Meta Pseudo Labels: h, uda_mask_rate, the labeled losses, the periodic test accuracies), by name.",
        &named,
    );

    // Per round: what is measured so far.
    let rounds: Vec<(String, &pb::RoundStatus)> = status
        .rounds
        .iter()
        .map(|r| (r.round.to_string(), r))
        .collect();
    let per_round = |value: &dyn Fn(&pb::RoundStatus) -> Option<f64>| {
        rounds
            .iter()
            .filter_map(|(round, r)| value(r).map(|v| (vec![("round", round.as_str())], v)))
            .collect::<Vec<_>>()
    };
    gauges(
        &mut out,
        "mentor_round_test_accuracy",
        "Test accuracy of a round's models, by role (teacher, student, finetuned_student).",
        &rounds
            .iter()
            .flat_map(|(round, r)| {
                [
                    ("teacher", r.teacher_test_accuracy),
                    ("student", r.student_test_accuracy),
                    ("finetuned_student", r.finetuned_student_test_accuracy),
                ]
                .into_iter()
                .filter_map(move |(role, accuracy)| {
                    accuracy.map(|a| (vec![("round", round.as_str()), ("role", role)], a))
                })
            })
            .collect::<Vec<_>>(),
    );
    gauges(
        &mut out,
        "mentor_round_shards_done",
        "Pseudo-label shards of the round committed.",
        &per_round(&|r| Some(f64::from(r.shards_done))),
    );
    gauges(
        &mut out,
        "mentor_round_shards",
        "Pseudo-label shards of the round.",
        &per_round(&|r| Some(f64::from(r.shards))),
    );
    gauges(
        &mut out,
        "mentor_round_pseudo_labeled_examples",
        "Unlabeled examples the round's teacher labeled, and those the filter kept.",
        &rounds
            .iter()
            .flat_map(|(round, r)| {
                [("labeled", r.examples), ("kept", r.kept)].into_iter().map(
                    move |(which, count)| {
                        (
                            vec![("round", round.as_str()), ("examples", which)],
                            count as f64,
                        )
                    },
                )
            })
            .collect::<Vec<_>>(),
    );
    out
}

/// Answers `GET /metrics` on `listener` with the run's current status, until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, shared: Shared) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: wait a little rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buffer = [0u8; 1024];
            // The request line and headers, up to the blank line (or 8 KiB, or 5 s).
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&request);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = path.split('?').next().unwrap_or("");
            let (code, body, kind) = if method == "GET" && (path == "/metrics" || path == "/") {
                let status = {
                    let coordinator = shared.lock().unwrap_or_else(|p| p.into_inner());
                    status_of(&coordinator)
                };
                ("200 OK", exposition(&status), "text/plain; version=0.0.4")
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_string(),
                    "text/plain",
                )
            };
            let response = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {kind}; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_reads_as_prometheus_text() {
        let mut metrics = std::collections::HashMap::new();
        metrics.insert("h".to_string(), 0.25);
        let status = pb::RunStatus {
            run_id: "tiny-1".into(),
            name: "tiny".into(),
            method: "noisy-student".into(),
            status: "running".into(),
            round: 2,
            total_rounds: 2,
            phase: "pseudo-label".into(),
            tasks_done: 7,
            tasks_total: 9,
            min_workers: 2,
            workers: vec![
                pb::WorkerStatus {
                    worker_id: "w1".into(),
                    device: "cpu".into(),
                    state: "active".into(),
                    task_id: "r2-t0007".into(),
                    task: "train \"student\"".into(),
                    step: 40,
                    total_steps: 100,
                    loss: 0.5,
                    metrics,
                    seconds_left: Some(12.0),
                    ..Default::default()
                },
                pb::WorkerStatus {
                    worker_id: "w2".into(),
                    state: "lost".into(),
                    ..Default::default()
                },
                pb::WorkerStatus {
                    worker_id: "w4".into(),
                    state: "suspected".into(),
                    ..Default::default()
                },
                pb::WorkerStatus {
                    worker_id: "w3".into(),
                    device: "cpu".into(),
                    state: "active".into(),
                    task_id: "r2-t0008".into(),
                    task: "pseudo-label shard 3".into(),
                    step: 2,
                    total_steps: 8,
                    loss: f64::NAN,
                    ..Default::default()
                },
            ],
            rounds: vec![pb::RoundStatus {
                round: 1,
                teacher_test_accuracy: Some(0.75),
                student_test_accuracy: None,
                shards: 4,
                shards_done: 4,
                examples: 1500,
                kept: 1200,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = exposition(&status);
        for line in [
            "mentor_run_info{run_id=\"tiny-1\",name=\"tiny\",method=\"noisy-student\",status=\"running\",phase=\"pseudo-label\"} 1",
            "mentor_run_finished 0",
            "mentor_tasks{state=\"done\"} 7",
            "mentor_workers{state=\"active\"} 2",
            "mentor_workers{state=\"lost\"} 1",
            "mentor_workers{state=\"suspected\"} 1",
            "mentor_worker_step{worker=\"w1\",task=\"train \\\"student\\\"\",device=\"cpu\"} 40",
            "mentor_worker_seconds_left{worker=\"w1\",task=\"train \\\"student\\\"\",device=\"cpu\"} 12",
            "mentor_worker_metric{worker=\"w1\",task=\"train \\\"student\\\"\",metric=\"h\"} 0.25",
            "mentor_round_test_accuracy{round=\"1\",role=\"teacher\"} 0.75",
            "mentor_round_pseudo_labeled_examples{round=\"1\",examples=\"kept\"} 1200",
            "# TYPE mentor_round_shards gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        // Not measured yet: no sample rather than a made-up value.
        assert!(!text.contains("role=\"student\""), "{text}");
        // A labeler has no loss: no loss sample for it (it would turn aggregates into NaN).
        assert!(
            text.lines()
                .any(|l| l.starts_with("mentor_worker_step{worker=\"w3\"")),
            "{text}"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("mentor_worker_loss{worker=\"w3\"")),
            "{text}"
        );
        // Every sample line is `name{labels} value`, with a value that parses.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or("");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
