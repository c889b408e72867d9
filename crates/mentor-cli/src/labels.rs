//! `mentor labels`: what a Noisy Student round's soft labels hold, class by class (how many
//! examples the teacher gave each class, how confidently, how many pass
//! `pseudo_labels.min_confidence`) and, once the round's filter has run, what the filter keeps
//! of each. Read from the run directory alone, live or not: the labelers' histograms (counted
//! again from a shard whose file is missing) and the round's selection file.

use std::path::Path;

use anyhow::{bail, Context};
use mentor_coordinator::state::{Phase, RoundRecord, RunState};
use mentor_labels::{Histogram, SelectionFile, ShardStore, CONFIDENCE_BINS};
use mentor_plan::{Method, Plan};
use serde_json::{json, Value};

/// What `mentor labels` shows of one round.
struct Summary {
    round: u32,
    shards_labeled: usize,
    shards_total: u32,
    examples: u64,
    min_confidence: f32,
    histogram: Histogram,
    /// The filter's decision, once it has run.
    selection: Option<SelectionFile>,
}

/// Prints the summary of `round` (default: the latest round with soft labels) of the run in
/// `state_dir`. Exit status 0; errors (no run, no soft labels) are the caller's status 2.
pub fn labels(state_dir: &Path, round: Option<u32>, as_json: bool) -> anyhow::Result<i32> {
    let summary = summarize(state_dir, round)?;
    let text = if as_json {
        format!("{}\n", to_json(&summary))
    } else {
        to_text(&summary)
    };
    crate::emit(&text);
    Ok(0)
}

fn summarize(state_dir: &Path, wanted: Option<u32>) -> anyhow::Result<Summary> {
    let state_file = state_dir.join("state.json");
    let text = std::fs::read_to_string(&state_file)
        .with_context(|| format!("no run in `{}`", state_dir.display()))?;
    let run_dir = state_dir
        .canonicalize()
        .with_context(|| state_dir.display().to_string())?;
    // (A store recorded inside a run directory that moved or was copied is read in its new
    // place, as the coordinator reads it.)
    let (state, _) = RunState::from_saved(&text, &run_dir)
        .map_err(|e| anyhow::anyhow!("`{}` is unreadable: {e}", state_file.display()))?;
    let plan = Plan::from_recorded_toml(&state.plan_toml)
        .map_err(|e| anyhow::anyhow!("the plan recorded in `{}`: {e}", state_file.display()))?;
    if plan.method != Method::NoisyStudent {
        bail!(
            "the run in `{}` is a Meta Pseudo Labels run: its teacher's labels are made in each training step and never written",
            state_dir.display()
        );
    }
    let record = pick_round(&state, wanted, state_dir)?;
    let storage = plan
        .pseudo_labels
        .storage
        .clone()
        .unwrap_or_else(|| run_dir.join("pseudo-labels").display().to_string());
    // Read, not made: a local store that is not there is named rather than created (a run
    // recorded by an earlier build may name it relative to where its coordinator ran).
    let local =
        plan.pseudo_labels.storage.is_none() || plan.pseudo_labels.local_storage().is_some();
    if local && !Path::new(&storage).is_dir() {
        bail!(
            "the soft-label store `{storage}` of the run in `{}` is not there{}",
            state_dir.display(),
            if Path::new(&storage).is_relative() {
                " (a relative store is read from the working directory: run this where the coordinator ran)"
            } else {
                ""
            }
        );
    }
    let store =
        ShardStore::open(&storage).with_context(|| format!("the soft-label store `{storage}`"))?;
    let histogram =
        mentor_coordinator::filter::round_histogram(&plan, record, &state.paths, &store)
            .map_err(|e| anyhow::anyhow!("round {}: {e}", record.round))?;
    // A filter that kept nothing failed the run before the round recorded its selection; its
    // file says each class's threshold, what the next min_confidence is chosen from.
    let kept_nothing = state.failed_in == Some(Phase::Filter) && record.round == state.round;
    let selection_file = match &record.selection {
        Some(path) if record.kept > 0 => Some(path.clone()),
        _ if kept_nothing => Some(state.paths.selection(record.round)).filter(|path| path.exists()),
        _ => None,
    };
    let selection = match selection_file {
        Some(path) => {
            let bytes = std::fs::read(&path)
                .with_context(|| format!("the selection file `{}`", path.display()))?;
            Some(
                serde_json::from_slice::<SelectionFile>(&bytes)
                    .with_context(|| format!("the selection file `{}`", path.display()))?,
            )
        }
        None => None,
    };
    Ok(Summary {
        round: record.round,
        shards_labeled: record.shards.len(),
        shards_total: record.shards_total,
        examples: record.examples,
        min_confidence: plan.pseudo_labels.min_confidence as f32,
        histogram,
        selection,
    })
}

/// Round `wanted`, else the latest round with a labeled shard.
fn pick_round<'a>(
    state: &'a RunState,
    wanted: Option<u32>,
    state_dir: &Path,
) -> anyhow::Result<&'a RoundRecord> {
    match wanted {
        Some(round) => {
            let Some(record) = state.rounds.iter().find(|r| r.round == round) else {
                bail!(
                    "the run in `{}` has no round {round} yet (rounds 1 to {})",
                    state_dir.display(),
                    state.rounds.len()
                );
            };
            if record.shards.is_empty() {
                bail!(
                    "round {round} of the run in `{}` has no soft labels yet (phase {})",
                    state_dir.display(),
                    state.phase.as_str()
                );
            }
            Ok(record)
        }
        None => state
            .rounds
            .iter()
            .rev()
            .find(|r| !r.shards.is_empty())
            .with_context(|| {
                format!(
                    "the run in `{}` has no soft labels yet (phase {})",
                    state_dir.display(),
                    state.phase.as_str()
                )
            }),
    }
}

/// Per class: examples whose top class it is, and their mean top-class probability (each
/// confidence taken at the middle of its 0.01-wide bin; the last bin holds 1.0 alone).
fn class_counts(histogram: &Histogram) -> Vec<(u64, Option<f64>)> {
    (0..histogram.classes)
        .map(|class| {
            let bins = &histogram.bins[class * CONFIDENCE_BINS..(class + 1) * CONFIDENCE_BINS];
            let count: u64 = bins.iter().sum();
            let weighted: f64 = bins
                .iter()
                .enumerate()
                .map(|(bin, &n)| n as f64 * ((bin as f64 + 0.5) / 100.0).min(1.0))
                .sum();
            (count, (count > 0).then(|| weighted / count as f64))
        })
        .collect()
}

/// A confidence threshold (a multiple of 0.01 held as f32) as the decimal it stands for.
fn hundredths(value: f32) -> f64 {
    (value as f64 * 100.0).round() / 100.0
}

fn to_json(summary: &Summary) -> Value {
    let counts = class_counts(&summary.histogram);
    let rules = summary.selection.as_ref().map(|file| &file.selection.rules);
    let classes: Vec<Value> = counts
        .iter()
        .enumerate()
        .map(|(class, (top1, mean))| {
            let mut entry = json!({
                "class": class,
                "top1": top1,
                "mean_confidence": mean,
                "passing": summary.histogram.passing[class],
            });
            if let Some(rule) = rules.and_then(|rules| rules.get(class)) {
                entry["threshold"] = json!(hundredths(rule.threshold));
                entry["ratio"] = json!(rule.ratio);
                entry["kept"] = json!(rule.kept);
            }
            entry
        })
        .collect();
    json!({
        "round": summary.round,
        "shards_labeled": summary.shards_labeled,
        "shards_total": summary.shards_total,
        "examples": summary.examples,
        "min_confidence": hundredths(summary.min_confidence),
        "undecodable": summary.histogram.undecodable,
        "filtered": summary.selection.is_some(),
        "kept": summary.selection.as_ref().map(|file| file.selection.kept()),
        "classes": classes,
    })
}

fn to_text(summary: &Summary) -> String {
    use std::fmt::Write;
    let thousands = crate::plan::thousands;
    let counts = class_counts(&summary.histogram);
    let rules = summary.selection.as_ref().map(|file| &file.selection.rules);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "round {}: {} of {} shards labeled, {} examples; min_confidence {}",
        summary.round,
        thousands(summary.shards_labeled as u64),
        thousands(summary.shards_total as u64),
        thousands(summary.examples),
        summary.min_confidence
    );
    let _ = write!(
        out,
        "{:>6} {:>12} {:>7} {:>10} {:>12}",
        "class", "top class", "share", "mean conf", "passing"
    );
    if rules.is_some() {
        let _ = write!(out, " {:>10} {:>6} {:>12}", "threshold", "uses", "kept");
    }
    out.push('\n');
    let total = summary.examples.max(1) as f64;
    for (class, (top1, mean)) in counts.iter().enumerate() {
        let mean = mean.map_or("-".to_string(), |m| format!("{m:.3}"));
        let _ = write!(
            out,
            "{:>6} {:>12} {:>6.1}% {:>10} {:>12}",
            class,
            thousands(*top1),
            *top1 as f64 / total * 100.0,
            mean,
            thousands(summary.histogram.passing[class])
        );
        if let Some(rule) = rules.and_then(|rules| rules.get(class)) {
            let _ = write!(
                out,
                " {:>10.2} {:>6.2} {:>12}",
                rule.threshold,
                rule.ratio,
                thousands(rule.kept)
            );
        }
        out.push('\n');
    }
    if summary.histogram.undecodable > 0 {
        let _ = writeln!(
            out,
            "{} images did not decode: labeled NaN, in no class, never kept (the labelers' logs name them)",
            thousands(summary.histogram.undecodable)
        );
    }
    match &summary.selection {
        Some(file) if file.selection.kept() == 0 => {
            let _ = writeln!(
                out,
                "the filter kept nothing: no class has an example at or above its threshold; lower pseudo_labels.min_confidence below the passing confidences above and run the coordinator again with --retry-failed"
            );
        }
        Some(file) => {
            let _ = writeln!(
                out,
                "the filter keeps {} examples (each used `uses` times in expectation: the class's examples at or above its threshold, `kept`, balanced to the same count a class)",
                thousands(file.selection.kept())
            );
        }
        None => {
            let _ = writeln!(out, "the round's filter has not run yet");
        }
    }
    out
}
