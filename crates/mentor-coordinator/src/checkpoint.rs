//! What the coordinator can tell about a model checkpoint without libtorch: a safetensors file
//! is an 8-byte little-endian header length, a JSON header naming each tensor, then the data.

use std::io::Read;
use std::path::Path;

/// The largest header read (safetensors itself refuses headers above 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Tensors in the safetensors file at `path` (its `__metadata__` entry aside), or why it is
/// not one: missing, unreadable, cut short, or not safetensors.
pub fn tensor_count(path: &Path) -> Result<usize, String> {
    let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        _ => e.to_string(),
    })?;
    if file.metadata().map_err(|e| e.to_string())?.is_dir() {
        return Err("a directory, not a checkpoint file".into());
    }
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|_| format!("not a safetensors file ({size} bytes, no header)"))?;
    let length = u64::from_le_bytes(length);
    if length == 0 || length > MAX_HEADER || 8 + length > size {
        return Err(format!(
            "not a safetensors file (its first 8 bytes give a {length}-byte header in a {size}-byte file)"
        ));
    }
    let mut header = Vec::with_capacity(length as usize);
    file.take(length)
        .read_to_end(&mut header)
        .map_err(|e| e.to_string())?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| format!("not a safetensors file (its header is not JSON: {e})"))?;
    let Some(entries) = header.as_object() else {
        return Err("not a safetensors file (its header is not a JSON object)".into());
    };
    let tensors = entries.keys().filter(|k| *k != "__metadata__").count();
    if tensors == 0 {
        return Err("holds no tensors".into());
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safetensors(header: &str, data: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        bytes
    }

    #[test]
    fn a_checkpoint_is_told_from_what_is_not_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("write");
            path
        };
        let good = write(
            "good.safetensors",
            &safetensors(
                r#"{"__metadata__":{"k":"v"},"fc.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"fc.bias":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
                12,
            ),
        );
        assert_eq!(tensor_count(&good), Ok(2));
        let missing = dir.path().join("missing.safetensors");
        assert_eq!(tensor_count(&missing), Err("no such file".into()));
        assert_eq!(
            tensor_count(dir.path()),
            Err("a directory, not a checkpoint file".into())
        );
        let png = write("image.png", b"\x89PNG\r\n\x1a\n0000000000000000");
        let error = tensor_count(&png).expect_err("a PNG");
        assert!(error.starts_with("not a safetensors file"), "{error}");
        let short = write("short.safetensors", &safetensors("{}", 0)[..5]);
        assert_eq!(
            tensor_count(&short),
            Err("not a safetensors file (5 bytes, no header)".into())
        );
        let cut = write("cut.safetensors", &safetensors(r#"{"a":{}}"#, 0)[..12]);
        let error = tensor_count(&cut).expect_err("cut short");
        assert!(error.contains("8-byte header in a 12-byte file"), "{error}");
        let empty = write(
            "empty.safetensors",
            &safetensors(r#"{"__metadata__":{}}"#, 0),
        );
        assert_eq!(tensor_count(&empty), Err("holds no tensors".into()));
        let text = write("text.safetensors", &safetensors("[1, 2]", 0));
        assert_eq!(
            tensor_count(&text),
            Err("not a safetensors file (its header is not a JSON object)".into())
        );
    }
}
