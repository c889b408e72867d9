//! Soft-label shards: what the pseudo-label service writes and the student reads.
//!
//! A shard is a safetensors file (one line of Python opens it) holding, for each example, its
//! id, its top-k class ids and their f16 probabilities. Its header carries the teacher
//! checkpoint, the round, the temperature and a SHA-256 of the tensor data, checked on every
//! read. Shards go through a [`ShardStore`] (any `object_store` backend: a local directory,
//! `s3://`, ...), which commits each key exactly once and atomically; the [`Manifest`] of a
//! round is written last. The global filter and class balance are computed from per-shard
//! [`Histogram`]s into a [`Selection`] that the student's loader applies while reading shards.
//! [`durable`] writes local files so that a machine's crash leaves the old or the new one.
//! This crate knows nothing of models, tensors or the network.

pub mod durable;
mod format;
mod select;
mod store;

pub use format::{decode_shard, encode_shard, ShardHeader, SoftLabels};
pub use select::{
    confidence_bin, filter_and_balance, Histogram, Rule, Selection, SelectionConfig,
    CONFIDENCE_BINS,
};
pub use store::{PutOutcome, ShardStore};

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// What went wrong with a shard, a manifest or the store.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("storage error on `{key}`: {source}")]
    Io { key: String, source: std::io::Error },
    #[error("`{key}` not found in the soft-label store")]
    NotFound { key: String },
    #[error("shard `{key}` is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("shard `{key}` fails its checksum: expected sha256 {expected}, found {actual}")]
    ChecksumMismatch {
        key: String,
        expected: String,
        actual: String,
    },
    #[error("invalid soft labels: {0}")]
    Invalid(String),
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

/// Hex SHA-256 of a file's bytes, read a megabyte at a time (a model's checkpoint may not fit
/// in memory twice).
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => return Ok(hex(&hasher.finalize())),
            Ok(n) => hasher.update(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Store key of a shard.
pub fn shard_key(round: u32, shard_index: u32) -> String {
    format!("round-{round}/shard-{shard_index:05}.safetensors")
}

/// Store key of a round's manifest.
pub fn manifest_key(round: u32) -> String {
    format!("round-{round}/manifest.json")
}

/// One committed shard, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestShard {
    pub index: u32,
    pub key: String,
    pub examples: u64,
    /// SHA-256 of the whole shard file.
    pub sha256: String,
    pub bytes: u64,
    /// Top-class confidences of the shard, per class (what the global filter adds up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<Histogram>,
}

/// The list of a round's shards, written after every shard is committed. `S` is how a shard is
/// held: a [`ManifestShard`], or its JSON already written (`Box<serde_json::value::RawValue>`),
/// so that the writer of a round of many shards of many classes need not hold every shard's
/// histogram at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest<S = ManifestShard> {
    pub format_version: u32,
    pub round: u32,
    pub teacher_checkpoint: String,
    pub temperature: f64,
    pub top_k: u32,
    pub classes: u32,
    pub examples: u64,
    pub shards: Vec<S>,
}

impl<S: Serialize> Manifest<S> {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

impl Manifest {
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Manifest, LabelError> {
        read_versioned(key, "manifest", bytes, |manifest: &Manifest| {
            manifest.format_version
        })
    }
}

/// The `format_version` of manifests and selections this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Reads a manifest or selection (`what`) named `key`: valid JSON, of a format this build
/// knows (one written by a later build is refused: its fields could mean other things).
fn read_versioned<T: serde::de::DeserializeOwned>(
    key: &str,
    what: &str,
    bytes: &[u8],
    version_of: impl Fn(&T) -> u32,
) -> Result<T, LabelError> {
    let corrupt = |reason: String| LabelError::Corrupt {
        key: key.to_string(),
        reason,
    };
    let value: T = serde_json::from_slice(bytes)
        .map_err(|error| corrupt(format!("{what} is not valid JSON: {error}")))?;
    let version = version_of(&value);
    if version > FORMAT_VERSION {
        return Err(corrupt(format!(
            "{what} of format version {version}, which this build (version {FORMAT_VERSION}) does not read: use the build that wrote it, or a later one"
        )));
    }
    Ok(value)
}

/// Counts a shard's examples by top class and confidence.
pub fn shard_histogram(labels: &SoftLabels, classes: usize, min_confidence: f32) -> Histogram {
    let mut histogram = Histogram::new(classes, min_confidence);
    for row in 0..labels.len() {
        let (class, confidence) = labels.top(row);
        histogram.add(class, confidence);
    }
    histogram
}

/// What the student trains on after a round's filter: the rule per class and the shards to
/// apply it to. Written by the coordinator as JSON; read by the student's loader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectionFile {
    pub format_version: u32,
    pub round: u32,
    /// Root of the soft-label store (a path or URL).
    pub storage: String,
    pub top_k: u32,
    pub classes: u32,
    pub selection: Selection,
    pub shards: Vec<ManifestShard>,
}

impl SelectionFile {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_json(name: &str, bytes: &[u8]) -> Result<SelectionFile, LabelError> {
        read_versioned(name, "selection", bytes, |selection: &SelectionFile| {
            selection.format_version
        })
    }
}

/// The selected soft labels of one shard: rows repeated as many times as the selection uses them.
pub fn select_rows(labels: &SoftLabels, selection: &Selection) -> SoftLabels {
    let mut selected = SoftLabels::empty(labels.top_k);
    for row in 0..labels.len() {
        let (class, confidence) = labels.top(row);
        for _ in 0..selection.uses(labels.example_ids[row], class, confidence) {
            selected.push_row(labels, row);
        }
    }
    selected
}

/// Reads a shard, checks the whole file against `expected_sha256` (when given) and the data
/// against the checksum in its own header.
pub fn read_shard(
    store: &ShardStore,
    key: &str,
    expected_sha256: Option<&str>,
) -> Result<(ShardHeader, SoftLabels), LabelError> {
    let bytes = store.get(key)?;
    if let Some(expected) = expected_sha256 {
        let actual = sha256_hex(&bytes);
        if actual != expected {
            return Err(LabelError::ChecksumMismatch {
                key: store.location(key),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    decode_shard(&store.location(key), &bytes)
}

/// Reads a manifest and every shard it lists, checking each one; returns them in index order.
pub fn read_round(
    store: &ShardStore,
    round: u32,
) -> Result<(Manifest, Vec<SoftLabels>), LabelError> {
    let key = manifest_key(round);
    let manifest = Manifest::from_json(&store.location(&key), &store.get(&key)?)?;
    let mut shards = Vec::with_capacity(manifest.shards.len());
    for shard in &manifest.shards {
        let (_, labels) = read_shard(store, &shard.key, Some(&shard.sha256))?;
        if labels.len() as u64 != shard.examples {
            return Err(LabelError::Corrupt {
                key: store.location(&shard.key),
                reason: format!(
                    "{} examples, the manifest says {}",
                    labels.len(),
                    shard.examples
                ),
            });
        }
        shards.push(labels);
    }
    Ok((manifest, shards))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ShardHeader {
        ShardHeader {
            round: 2,
            teacher_checkpoint: "round-1-student".into(),
            temperature: 1.0,
            classes: 10,
        }
    }

    fn labels() -> SoftLabels {
        SoftLabels::new(
            2,
            vec![7, 9, 11],
            vec![3, 1, 0, 4, 9, 8],
            vec![0.75, 0.25, 0.5, 0.25, 0.875, 0.125],
        )
        .expect("labels")
    }

    #[test]
    fn shard_round_trips() {
        let bytes = encode_shard(&header(), &labels()).expect("encode");
        let (read_header, read_labels) = decode_shard("k", &bytes).expect("decode");
        assert_eq!(read_header, header());
        assert_eq!(read_labels, labels());
        assert_eq!(read_labels.top(2), (9, 0.875));
    }

    #[test]
    fn flipped_data_byte_fails_the_checksum() {
        let mut bytes = encode_shard(&header(), &labels()).expect("encode");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let error = decode_shard("round-2/shard-00000.safetensors", &bytes).expect_err("corrupt");
        assert!(
            matches!(error, LabelError::ChecksumMismatch { .. }),
            "{error}"
        );
        assert!(error
            .to_string()
            .starts_with("shard `round-2/shard-00000.safetensors` fails its checksum"));
    }

    #[test]
    fn truncated_shard_is_reported_with_its_key() {
        let bytes = encode_shard(&header(), &labels()).expect("encode");
        let error = decode_shard("s", &bytes[..bytes.len() - 5]).expect_err("truncated");
        assert!(
            error.to_string().starts_with("shard `s` is corrupt"),
            "{error}"
        );
    }

    /// The shard's bytes again with `example_id` of `shape` (its data and checksum kept).
    fn with_ids_shaped(bytes: &[u8], shape: Vec<usize>) -> Vec<u8> {
        use safetensors::tensor::TensorView;
        let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).expect("metadata");
        let tensors = safetensors::SafeTensors::deserialize(bytes).expect("tensors");
        let views: Vec<(String, TensorView)> = tensors
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let shape = match name.as_str() {
                    "example_id" => shape.clone(),
                    _ => view.shape().to_vec(),
                };
                let view = TensorView::new(view.dtype(), shape, view.data()).expect("view");
                (name, view)
            })
            .collect();
        safetensors::tensor::serialize(views, metadata.metadata()).expect("serialize")
    }

    #[test]
    fn a_shard_other_tools_wrote_wrong_is_refused_as_corrupt() {
        let bytes = encode_shard(&header(), &labels()).expect("encode");
        let error = decode_shard("s", &with_ids_shaped(&bytes, vec![3, 1])).expect_err("2-d ids");
        assert!(error.to_string().contains("example_id [3, 1]"), "{error}");
        // A class the header's classes do not have would index past a one-hot target.
        let beyond = SoftLabels::new(1, vec![1, 2], vec![4, 10], vec![0.9, 0.8]).expect("labels");
        let bytes = encode_shard(&header(), &beyond).expect("encode");
        let error = decode_shard("s", &bytes).expect_err("class 10 of 10");
        assert!(
            matches!(error, LabelError::Corrupt { .. })
                && error
                    .to_string()
                    .contains("class id 10 is not one of its 10 classes"),
            "{error}"
        );
        let wide = SoftLabels::new(11, vec![1], (0..11).collect(), vec![0.05; 11]).expect("labels");
        let bytes = encode_shard(&header(), &wide).expect("encode");
        let error = decode_shard("s", &bytes).expect_err("top 11 of 10");
        assert!(
            error.to_string().contains("top 11 of 10 classes"),
            "{error}"
        );
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let error = SoftLabels::new(2, vec![1], vec![1], vec![1.0]).expect_err("shapes");
        assert!(error.to_string().contains("need 2 class ids"), "{error}");
    }

    #[test]
    fn local_store_commits_exactly_once_under_a_race() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().display().to_string();
        let store = std::sync::Arc::new(ShardStore::open(&root).expect("store"));
        let writers: Vec<_> = (0..8u8)
            .map(|writer| {
                let store = store.clone();
                std::thread::spawn(move || {
                    store
                        .put_if_absent("round-1/shard-00000.safetensors", &[writer; 4096])
                        .expect("put")
                })
            })
            .collect();
        let outcomes: Vec<PutOutcome> = writers
            .into_iter()
            .map(|w| w.join().expect("thread"))
            .collect();
        assert_eq!(
            outcomes
                .iter()
                .filter(|&&o| o == PutOutcome::Created)
                .count(),
            1
        );
        let content = store.get("round-1/shard-00000.safetensors").expect("get");
        assert_eq!(content.len(), 4096);
        assert!(
            content.iter().all(|&b| b == content[0]),
            "content mixes writers"
        );
        let names: Vec<String> = std::fs::read_dir(dir.path().join("round-1"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["shard-00000.safetensors".to_string()],
            "temporary files left"
        );
        // A second store on the same directory (another labeler) loses too.
        let other = ShardStore::open(&root).expect("store");
        assert_eq!(
            other
                .put_if_absent("round-1/shard-00000.safetensors", b"late")
                .expect("put"),
            PutOutcome::AlreadyExists
        );
        assert_eq!(
            other
                .get("round-1/shard-00000.safetensors")
                .expect("get")
                .len(),
            4096
        );
    }

    #[test]
    fn store_urls_open_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}/labels", dir.path().display());
        let store = ShardStore::open(&url).expect("file url");
        store.put_if_absent("round-1/a", b"x").expect("put");
        assert!(dir.path().join("labels/round-1/a").exists());
        assert_eq!(store.location("round-1/a"), format!("{url}/round-1/a"));
        assert!(!store.exists("round-1/b").expect("exists"));
        store.delete("round-1/a").expect("delete");
        assert!(!store.exists("round-1/a").expect("exists"));
        store.delete("round-1/a").expect("a missing key deletes");
        // A relative path is made absolute: workers are sent the root.
        let cwd = std::env::current_dir().expect("cwd");
        let up = "../".repeat(cwd.components().count() - 1);
        let relative = format!(
            "{up}{}",
            dir.path()
                .join("local")
                .strip_prefix("/")
                .expect("absolute")
                .display()
        );
        let local = ShardStore::open(&relative).expect("relative path");
        assert_eq!(
            std::path::Path::new(local.root())
                .canonicalize()
                .expect("root"),
            dir.path().join("local").canonicalize().expect("dir")
        );
        assert!(local.root().starts_with('/'), "{}", local.root());
        let memory = ShardStore::open("memory:///").expect("memory url");
        assert_eq!(
            memory.put_if_absent("k", b"1").expect("put"),
            PutOutcome::Created
        );
        assert_eq!(
            memory.put_if_absent("k", b"2").expect("put"),
            PutOutcome::AlreadyExists
        );
        let error = ShardStore::open("nosuchscheme://bucket/x").expect_err("unknown scheme");
        assert!(
            error.to_string().contains("nosuchscheme://bucket/x"),
            "{error}"
        );
    }

    #[test]
    fn selection_applied_per_shard_equals_brute_force() {
        let config = SelectionConfig {
            classes: 10,
            min_confidence: 0.3,
            balance: true,
            per_class: 0,
            seed: 5,
        };
        let shards: Vec<SoftLabels> = (0..4)
            .map(|shard| {
                let ids: Vec<i64> = (0..50).map(|i| shard * 50 + i).collect();
                let classes: Vec<u16> = ids.iter().map(|&i| ((i * 7) % 10) as u16).collect();
                let probs: Vec<f32> = ids
                    .iter()
                    .map(|&i| ((i * 37) % 100) as f32 / 100.0)
                    .collect();
                SoftLabels::new(1, ids, classes, probs).expect("labels")
            })
            .collect();
        let mut histogram = Histogram::new(10, 0.3);
        for shard in &shards {
            histogram
                .merge(&shard_histogram(shard, 10, 0.3))
                .expect("merge");
        }
        let selection = Selection::from_histogram(&histogram, &config);
        let selected: Vec<i64> = shards
            .iter()
            .flat_map(|shard| select_rows(shard, &selection).example_ids)
            .collect();
        let all: Vec<(i64, u16, f32)> = shards
            .iter()
            .flat_map(|shard| {
                (0..shard.len()).map(move |row| {
                    let (class, confidence) = shard.top(row);
                    (shard.example_ids[row], class, confidence)
                })
            })
            .collect();
        let expected: Vec<i64> = filter_and_balance(&all, &config)
            .into_iter()
            .zip(&all)
            .flat_map(|(uses, &(id, _, _))| std::iter::repeat_n(id, uses as usize))
            .collect();
        assert_eq!(selected, expected);
        assert!(!selected.is_empty());
    }

    #[test]
    fn read_round_checks_every_listed_shard() {
        let store = ShardStore::in_memory().expect("store");
        let bytes = encode_shard(&header(), &labels()).expect("encode");
        let key = shard_key(2, 0);
        store.put_if_absent(&key, &bytes).expect("put");
        let mut manifest = Manifest {
            format_version: FORMAT_VERSION,
            round: 2,
            teacher_checkpoint: "round-1-student".into(),
            temperature: 1.0,
            top_k: 2,
            classes: 10,
            examples: 3,
            shards: vec![ManifestShard {
                index: 0,
                key: key.clone(),
                examples: 3,
                sha256: sha256_hex(&bytes),
                bytes: bytes.len() as u64,
                histogram: None,
            }],
        };
        store
            .put(&manifest_key(2), &manifest.to_json())
            .expect("manifest");
        let (read, shards) = read_round(&store, 2).expect("round");
        assert_eq!(read, manifest);
        assert_eq!(shards, vec![labels()]);

        manifest.shards[0].sha256 = "00".repeat(32);
        store
            .put(&manifest_key(2), &manifest.to_json())
            .expect("manifest");
        let error = read_round(&store, 2).expect_err("bad checksum");
        assert!(
            matches!(error, LabelError::ChecksumMismatch { .. }),
            "{error}"
        );
        let missing = read_round(&store, 3).expect_err("no manifest");
        assert_eq!(
            missing.to_string(),
            "`memory://round-3/manifest.json` not found in the soft-label store"
        );
        // A manifest of a later format is refused, not read as this one.
        manifest.format_version = FORMAT_VERSION + 1;
        let error = Manifest::from_json("m", &manifest.to_json()).expect_err("later format");
        assert!(
            error
                .to_string()
                .contains("this build (version 1) does not read"),
            "{error}"
        );
    }
}
