//! The coordinator's own step of a round: write the manifest, filter and balance globally, and
//! write the selection the student trains on.
//!
//! Blocking I/O: run it on a blocking thread, never on a tokio worker.

use std::path::Path;

use mentor_labels::{
    encode_shard, filter_and_balance, manifest_key, read_round, Manifest, ManifestShard,
    SelectionConfig, ShardHeader, ShardStore, SoftLabels,
};
use mentor_plan::Plan;

use crate::state::RoundRecord;

/// Writes the round's manifest, selects examples and writes the selection file.
/// Returns the number of selected examples (duplicates included).
pub fn filter_round(
    plan: &Plan,
    round: &RoundRecord,
    store: &dyn ShardStore,
    selection_path: &Path,
) -> Result<u64, String> {
    let teacher = round
        .teacher
        .as_ref()
        .map(|t| t.checkpoint.display().to_string())
        .unwrap_or_default();
    let manifest = Manifest {
        format_version: 1,
        round: round.round,
        teacher_checkpoint: teacher.clone(),
        temperature: plan.pseudo_labels.temperature,
        top_k: plan.pseudo_labels.top_k,
        classes: plan.data.classes,
        examples: round.examples,
        shards: round
            .shards
            .iter()
            .map(|shard| ManifestShard {
                index: shard.index,
                key: shard.key.clone(),
                examples: shard.examples,
                sha256: shard.sha256.clone(),
                bytes: shard.bytes,
            })
            .collect(),
    };
    // The manifest is written last, after every shard is committed.
    store
        .put(&manifest_key(round.round), &manifest.to_json())
        .map_err(|e| e.to_string())?;
    let (_, shards) = read_round(store, round.round).map_err(|e| e.to_string())?;

    let tops: Vec<(u16, f32)> = shards
        .iter()
        .flat_map(|shard| (0..shard.len()).map(move |row| shard.top(row)))
        .collect();
    let uses = filter_and_balance(
        &tops,
        &SelectionConfig {
            classes: plan.data.classes as usize,
            min_confidence: plan.pseudo_labels.min_confidence as f32,
            balance: plan.pseudo_labels.balance,
            per_class: plan.pseudo_labels.per_class,
            seed: plan.seed.wrapping_add(round.round as u64),
        },
    );
    let mut selection = SoftLabels::empty(plan.pseudo_labels.top_k as usize);
    let mut position = 0usize;
    for shard in &shards {
        for row in 0..shard.len() {
            for _ in 0..uses[position] {
                selection.push_row(shard, row);
            }
            position += 1;
        }
    }
    let bytes = encode_shard(
        &ShardHeader {
            round: round.round,
            teacher_checkpoint: teacher,
            temperature: plan.pseudo_labels.temperature,
            classes: plan.data.classes,
        },
        &selection,
    )
    .map_err(|e| e.to_string())?;
    let parent = selection_path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let temporary = selection_path.with_extension("tmp");
    std::fs::write(&temporary, &bytes).map_err(|e| format!("{}: {e}", temporary.display()))?;
    std::fs::rename(&temporary, selection_path)
        .map_err(|e| format!("{}: {e}", selection_path.display()))?;
    Ok(selection.len() as u64)
}
