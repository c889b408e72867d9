//! The shard file format: safetensors with three tensors and a small header.
//!
//! Tensors: `example_id` (I64, `[n]`), `class_ids` (U16, `[n, k]`), `probs` (F16, `[n, k]`),
//! rows sorted by descending probability. Header (`__metadata__`, all strings): `format`,
//! `round`, `teacher_checkpoint`, `temperature`, `classes`, `data_sha256` (SHA-256 of the three
//! tensors' bytes in that order).

use std::collections::HashMap;

use half::f16;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::{sha256_hex, LabelError};

const FORMAT: &str = "mentor-soft-labels-v1";

/// Soft labels of `len()` examples, `top_k` classes each, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftLabels {
    pub top_k: usize,
    pub example_ids: Vec<i64>,
    pub class_ids: Vec<u16>,
    pub probs: Vec<f16>,
}

impl SoftLabels {
    /// Builds soft labels, checking the shapes agree.
    pub fn new(
        top_k: usize,
        example_ids: Vec<i64>,
        class_ids: Vec<u16>,
        probs: Vec<f32>,
    ) -> Result<SoftLabels, LabelError> {
        if top_k == 0 {
            return Err(LabelError::Invalid("top_k must be >= 1".into()));
        }
        let rows = example_ids.len();
        if class_ids.len() != rows * top_k || probs.len() != rows * top_k {
            return Err(LabelError::Invalid(format!(
                "{rows} examples with top_k {top_k} need {} class ids and probabilities, got {} and {}",
                rows * top_k,
                class_ids.len(),
                probs.len()
            )));
        }
        Ok(SoftLabels {
            top_k,
            example_ids,
            class_ids,
            probs: probs.into_iter().map(f16::from_f32).collect(),
        })
    }

    pub fn empty(top_k: usize) -> SoftLabels {
        SoftLabels {
            top_k,
            example_ids: Vec::new(),
            class_ids: Vec::new(),
            probs: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.example_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.example_ids.is_empty()
    }

    /// The most likely class of row `row` and its probability.
    pub fn top(&self, row: usize) -> (u16, f32) {
        let at = row * self.top_k;
        (self.class_ids[at], self.probs[at].to_f32())
    }

    /// Appends row `row` of `other` (same top_k).
    pub fn push_row(&mut self, other: &SoftLabels, row: usize) {
        let at = row * other.top_k;
        self.example_ids.push(other.example_ids[row]);
        self.class_ids
            .extend_from_slice(&other.class_ids[at..at + other.top_k]);
        self.probs
            .extend_from_slice(&other.probs[at..at + other.top_k]);
    }
}

/// Shard header fields other than the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardHeader {
    pub round: u32,
    pub teacher_checkpoint: String,
    pub temperature: f64,
    pub classes: u32,
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to_bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&value| to_bytes(value)).collect()
}

/// Serializes a shard to bytes.
pub fn encode_shard(header: &ShardHeader, labels: &SoftLabels) -> Result<Vec<u8>, LabelError> {
    let rows = labels.len();
    let ids = le_bytes(&labels.example_ids, i64::to_le_bytes);
    let classes = le_bytes(&labels.class_ids, u16::to_le_bytes);
    let probs = le_bytes(&labels.probs, |p: f16| p.to_le_bytes());
    let mut all = Vec::with_capacity(ids.len() + classes.len() + probs.len());
    all.extend_from_slice(&ids);
    all.extend_from_slice(&classes);
    all.extend_from_slice(&probs);
    let metadata: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("round", header.round.to_string()),
        ("teacher_checkpoint", header.teacher_checkpoint.clone()),
        ("temperature", header.temperature.to_string()),
        ("classes", header.classes.to_string()),
        ("data_sha256", sha256_hex(&all)),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value))
    .collect();
    let tensors = vec![
        ("example_id", tensor_view(Dtype::I64, vec![rows], &ids)?),
        (
            "class_ids",
            tensor_view(Dtype::U16, vec![rows, labels.top_k], &classes)?,
        ),
        (
            "probs",
            tensor_view(Dtype::F16, vec![rows, labels.top_k], &probs)?,
        ),
    ];
    safetensors::tensor::serialize(tensors, &Some(metadata))
        .map_err(|error| LabelError::Invalid(error.to_string()))
}

fn tensor_view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>, LabelError> {
    TensorView::new(dtype, shape, data).map_err(|error| LabelError::Invalid(error.to_string()))
}

/// Parses and verifies a shard; `key` names it in errors.
pub fn decode_shard(key: &str, bytes: &[u8]) -> Result<(ShardHeader, SoftLabels), LabelError> {
    let corrupt = |reason: String| LabelError::Corrupt {
        key: key.to_string(),
        reason,
    };
    let (_, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|error| corrupt(format!("unreadable header ({error})")))?;
    let fields = metadata
        .metadata()
        .clone()
        .ok_or_else(|| corrupt("header has no metadata".into()))?;
    let field = |name: &str| {
        fields
            .get(name)
            .cloned()
            .ok_or_else(|| corrupt(format!("header lacks `{name}`")))
    };
    if field("format")? != FORMAT {
        return Err(corrupt(format!("format is not `{FORMAT}`")));
    }
    let number = |name: &str| -> Result<f64, LabelError> {
        field(name)?
            .parse::<f64>()
            .map_err(|_| corrupt(format!("header field `{name}` is not a number")))
    };
    let header = ShardHeader {
        round: number("round")? as u32,
        teacher_checkpoint: field("teacher_checkpoint")?,
        temperature: number("temperature")?,
        classes: number("classes")? as u32,
    };
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|error| corrupt(format!("unreadable tensors ({error})")))?;
    let tensor = |name: &str, dtype: Dtype| {
        let view = tensors
            .tensor(name)
            .map_err(|_| corrupt(format!("tensor `{name}` is missing")))?;
        if view.dtype() != dtype {
            return Err(corrupt(format!(
                "tensor `{name}` has dtype {:?}",
                view.dtype()
            )));
        }
        Ok(view)
    };
    let ids = tensor("example_id", Dtype::I64)?;
    let classes = tensor("class_ids", Dtype::U16)?;
    let probs = tensor("probs", Dtype::F16)?;
    let rows = ids.shape().first().copied().unwrap_or(0);
    let top_k = classes.shape().get(1).copied().unwrap_or(0);
    if ids.shape() != [rows]
        || classes.shape() != [rows, top_k]
        || probs.shape() != [rows, top_k]
        || top_k == 0
    {
        return Err(corrupt(format!(
            "tensor shapes disagree: example_id {:?}, class_ids {:?}, probs {:?}",
            ids.shape(),
            classes.shape(),
            probs.shape()
        )));
    }
    if top_k > header.classes as usize {
        return Err(corrupt(format!(
            "top {top_k} of {} classes",
            header.classes
        )));
    }
    let mut all = Vec::with_capacity(ids.data().len() + classes.data().len() + probs.data().len());
    all.extend_from_slice(ids.data());
    all.extend_from_slice(classes.data());
    all.extend_from_slice(probs.data());
    let actual = sha256_hex(&all);
    let expected = field("data_sha256")?;
    if actual != expected {
        return Err(LabelError::ChecksumMismatch {
            key: key.to_string(),
            expected,
            actual,
        });
    }
    let labels = SoftLabels {
        top_k,
        example_ids: ids
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        class_ids: classes
            .data()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
        probs: probs
            .data()
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect(),
    };
    if let Some(class) = labels
        .class_ids
        .iter()
        .find(|class| u32::from(**class) >= header.classes)
    {
        return Err(corrupt(format!(
            "class id {class} is not one of its {} classes",
            header.classes
        )));
    }
    Ok((header, labels))
}
