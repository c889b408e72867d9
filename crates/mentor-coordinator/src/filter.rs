//! The coordinator's own step of a round: write the manifest, decide the global filter and
//! balance from the shards' confidence histograms, and write the selection the student's loader
//! applies. No label is loaded here, except to rebuild the histogram of a shard whose labeler did
//! not report one (a run resumed from an older state file).
//!
//! Blocking I/O: run it on a blocking thread, never on a tokio worker.

use std::path::Path;

use mentor_labels::{
    manifest_key, read_shard, shard_histogram, Histogram, Manifest, ManifestShard, Selection,
    SelectionConfig, SelectionFile, ShardStore,
};
use mentor_plan::Plan;

use crate::state::RoundRecord;

/// Writes the round's manifest, decides the selection and writes it to `selection_path`.
/// Returns the number of distinct examples kept.
pub fn filter_round(
    plan: &Plan,
    round: &RoundRecord,
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
    for shard in &round.shards {
        let histogram = match &shard.histogram {
            Some(histogram)
                if histogram.classes == classes && histogram.min_confidence == min_confidence =>
            {
                histogram.clone()
            }
            _ => {
                let (_, labels) = read_shard(store, &shard.key, Some(&shard.sha256))
                    .map_err(|e| e.to_string())?;
                shard_histogram(&labels, classes, min_confidence)
            }
        };
        if histogram.total() != shard.examples {
            return Err(format!(
                "shard `{}`: its histogram counts {} examples, the shard has {}",
                shard.key,
                histogram.total(),
                shard.examples
            ));
        }
        total.merge(&histogram)?;
        shards.push(ManifestShard {
            index: shard.index,
            key: shard.key.clone(),
            examples: shard.examples,
            sha256: shard.sha256.clone(),
            bytes: shard.bytes,
            histogram: Some(histogram),
        });
    }
    let manifest = Manifest {
        format_version: mentor_labels::FORMAT_VERSION,
        round: round.round,
        teacher_checkpoint: teacher,
        temperature: plan.pseudo_labels.temperature,
        top_k: plan.top_k(),
        classes: plan.data.classes,
        examples: round.examples,
        shards: shards.clone(),
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
