//! The coordinator's own step of a round: write the manifest, decide the global filter and
//! balance from the shards' confidence histograms, and write the selection the student's loader
//! applies. No label is loaded here, except to rebuild the histogram of a shard whose histogram
//! file is missing or damaged (see [`save_histogram`]).
//!
//! Blocking I/O: run it on a blocking thread, never on a tokio worker.

use std::path::Path;

use mentor_labels::{
    manifest_key, read_shard, shard_histogram, Histogram, Manifest, ManifestShard, Selection,
    SelectionConfig, SelectionFile, ShardStore,
};
use mentor_plan::Plan;
use serde::{Deserialize, Serialize};

use crate::state::{RoundRecord, RunPaths, ShardRecord};

/// A shard's confidence histogram in its own file, named by the shard it counts.
#[derive(Serialize, Deserialize)]
struct HistogramFile {
    key: String,
    sha256: String,
    histogram: Histogram,
}

/// Writes the histogram a labeler reported for `shard` of `round` to its own file, once, so that
/// `state.json` does not carry it (see [`ShardRecord::histogram`]). Not flushed to the disk: the
/// file is a record of what the filter could recompute, and one lost or cut short by a crash of
/// the machine is recomputed from the shard.
pub fn save_histogram(
    paths: &RunPaths,
    round: u32,
    shard: &ShardRecord,
    histogram: &Histogram,
) -> std::io::Result<()> {
    let path = paths.histogram(round, shard.index);
    let file = HistogramFile {
        key: shard.key.clone(),
        sha256: shard.sha256.clone(),
        histogram: histogram.clone(),
    };
    let json = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, json)?;
    std::fs::rename(&temporary, &path)
}

/// Writes the histogram `shard` of `round` carries to its own file ([`save_histogram`]) and
/// leaves it out of the record (see [`ShardRecord::histogram`]); one that cannot be written
/// stays in memory (a restart then counts that shard's labels again).
pub fn set_histogram_aside(paths: &RunPaths, round: u32, shard: &mut ShardRecord) {
    let Some(histogram) = &shard.histogram else {
        return;
    };
    match save_histogram(paths, round, shard, histogram) {
        Ok(()) => shard.histogram = None,
        Err(error) => {
            let path = paths.histogram(round, shard.index);
            tracing::warn!(path = %path.display(), %error, "could not write a shard's histogram: the filter counts its labels again if the coordinator restarts first");
        }
    }
}

/// The histogram file of `shard` of `round`, when it is there and counts this very shard (its
/// key and SHA-256, its examples) in this shape; else None (with a warning when a file was
/// there), and the shard's labels are counted again.
fn load_histogram(
    paths: &RunPaths,
    round: u32,
    shard: &ShardRecord,
    classes: usize,
    min_confidence: f32,
) -> Option<Histogram> {
    let path = paths.histogram(round, shard.index);
    let bytes = std::fs::read(&path).ok()?;
    let why = match serde_json::from_slice::<HistogramFile>(&bytes) {
        Err(e) => e.to_string(),
        Ok(file) if file.key != shard.key || file.sha256 != shard.sha256 => {
            format!("it counts `{}` ({})", file.key, file.sha256)
        }
        // Another filter setting (a failed filter retried with another `min_confidence`): no
        // fault of the file.
        Ok(file)
            if file.histogram.classes != classes
                || file.histogram.min_confidence != min_confidence =>
        {
            return None
        }
        Ok(file)
            if file.histogram.bins.len() != classes * mentor_labels::CONFIDENCE_BINS
                || file.histogram.passing.len() != classes =>
        {
            format!(
                "{} bins and {} class counts for {classes} classes",
                file.histogram.bins.len(),
                file.histogram.passing.len()
            )
        }
        Ok(file) if file.histogram.total() != shard.examples => format!(
            "it counts {} examples, the shard has {}",
            file.histogram.total(),
            shard.examples
        ),
        Ok(file) => return Some(file.histogram),
    };
    tracing::warn!(path = %path.display(), shard = %shard.key, reason = %why, "a histogram file does not fit its shard: the shard's labels are counted again");
    None
}

/// The top-class confidence histogram of `shard` of round `round`: the one its labeler
/// reported, else its file, else counted again from the shard.
fn histogram_of(
    plan: &Plan,
    round: u32,
    shard: &ShardRecord,
    paths: &RunPaths,
    store: &ShardStore,
) -> Result<Histogram, String> {
    let classes = plan.data.classes as usize;
    let min_confidence = plan.pseudo_labels.min_confidence as f32;
    let reported = shard.histogram.as_ref().filter(|histogram| {
        histogram.classes == classes && histogram.min_confidence == min_confidence
    });
    let histogram = match reported {
        Some(histogram) => histogram.clone(),
        None => match load_histogram(paths, round, shard, classes, min_confidence) {
            Some(histogram) => histogram,
            None => {
                let (_, labels) = read_shard(store, &shard.key, Some(&shard.sha256))
                    .map_err(|e| e.to_string())?;
                shard_histogram(&labels, classes, min_confidence)
            }
        },
    };
    if histogram.total() != shard.examples {
        return Err(format!(
            "shard `{}`: its histogram counts {} examples, the shard has {}",
            shard.key,
            histogram.total(),
            shard.examples
        ));
    }
    Ok(histogram)
}

/// The top-class confidence histogram of the shards of `round` labeled so far (for `mentor
/// labels`; the filter adds them up as it writes the manifest).
pub fn round_histogram(
    plan: &Plan,
    round: &RoundRecord,
    paths: &RunPaths,
    store: &ShardStore,
) -> Result<Histogram, String> {
    let mut total = Histogram::new(
        plan.data.classes as usize,
        plan.pseudo_labels.min_confidence as f32,
    );
    for shard in &round.shards {
        total.merge(&histogram_of(plan, round.round, shard, paths, store)?)?;
    }
    Ok(total)
}

/// Writes the round's manifest, decides the selection and writes it to `selection_path`.
/// Returns the number of distinct examples kept.
pub fn filter_round(
    plan: &Plan,
    round: &RoundRecord,
    paths: &RunPaths,
    store: &ShardStore,
    selection_path: &Path,
) -> Result<u64, String> {
    let classes = plan.data.classes as usize;
    let min_confidence = plan.pseudo_labels.min_confidence as f32;
    let teacher = round
        .teacher
        .as_ref()
        .map(|t| t.checkpoint.display().to_string())
        .unwrap_or_default();
    let mut total = Histogram::new(classes, min_confidence);
    let mut shards = Vec::with_capacity(round.shards.len());
    let mut written = Vec::with_capacity(round.shards.len());
    for shard in &round.shards {
        let histogram = histogram_of(plan, round.round, shard, paths, store)?;
        total.merge(&histogram)?;
        let mut entry = ManifestShard {
            index: shard.index,
            key: shard.key.clone(),
            examples: shard.examples,
            sha256: shard.sha256.clone(),
            bytes: shard.bytes,
            histogram: Some(histogram),
        };
        // Written now, its histogram sparse: a round holds one shard's histogram at a time
        // (with a thousand classes 0.8 MB in memory, some 100 KB written).
        written.push(serde_json::value::to_raw_value(&entry).map_err(|e| e.to_string())?);
        // Every student worker reads the selection: the shards' histograms stay in the
        // manifest.
        entry.histogram = None;
        shards.push(entry);
    }
    let manifest = Manifest {
        format_version: mentor_labels::FORMAT_VERSION,
        round: round.round,
        teacher_checkpoint: teacher,
        temperature: plan.pseudo_labels.temperature,
        top_k: plan.top_k(),
        classes: plan.data.classes,
        examples: round.examples,
        shards: written,
    };
    // The manifest is written last, after every shard is committed.
    store
        .put(&manifest_key(round.round), &manifest.to_json())
        .map_err(|e| e.to_string())?;
    let selection = Selection::from_histogram(
        &total,
        &SelectionConfig {
            classes,
            min_confidence,
            balance: plan.pseudo_labels.balance,
            per_class: plan.pseudo_labels.per_class,
            seed: plan.seed.wrapping_add(round.round as u64),
        },
    );
    let kept = selection.kept();
    let file = SelectionFile {
        format_version: mentor_labels::FORMAT_VERSION,
        round: round.round,
        storage: store.root().to_string(),
        top_k: plan.top_k(),
        classes: plan.data.classes,
        selection,
        shards,
    };
    let parent = selection_path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    crate::write_atomically(selection_path, &file.to_json())
        .map_err(|e| format!("{}: {e}", selection_path.display()))?;
    Ok(kept)
}
