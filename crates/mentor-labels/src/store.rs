//! Where shards live: a small trait with a local-directory and an in-memory implementation.
//!
//! `put_if_absent` is the only way to write a shard: the first writer of a key wins, atomically,
//! and no reader ever sees a partial file.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::LabelError;

/// Whether a create-if-absent write took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// Another writer committed this key first; the store is unchanged.
    AlreadyExists,
}

/// Storage of soft-label shards and manifests, addressed by `/`-separated keys.
pub trait ShardStore: Send + Sync {
    /// Commits `bytes` under `key` unless the key exists; atomic and exactly once.
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<PutOutcome, LabelError>;
    /// Writes `bytes` under `key` atomically, replacing what was there (manifests).
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), LabelError>;
    fn get(&self, key: &str) -> Result<Vec<u8>, LabelError>;
    fn exists(&self, key: &str) -> Result<bool, LabelError>;
    /// A human-readable location of `key` (a path or URL).
    fn location(&self, key: &str) -> String;
}

/// A local directory (or a shared file system mounted on every worker).
#[derive(Debug, Clone)]
pub struct LocalDirStore {
    root: PathBuf,
}

impl LocalDirStore {
    pub fn new(root: impl Into<PathBuf>) -> LocalDirStore {
        LocalDirStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Writes a hidden temporary file next to `key`'s path and syncs it.
    fn write_temporary(&self, key: &str, bytes: &[u8]) -> Result<(PathBuf, PathBuf), LabelError> {
        let io = |source| LabelError::Io {
            key: key.to_string(),
            source,
        };
        let path = self.path(key);
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io)?;
        let file_name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temporary = parent.join(format!(
            ".{file_name}.{}.{}.tmp",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut file = std::fs::File::create(&temporary).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok((temporary, path))
    }
}

impl ShardStore for LocalDirStore {
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<PutOutcome, LabelError> {
        let (temporary, path) = self.write_temporary(key, bytes)?;
        // A hard link fails if the target exists: an atomic create-if-absent of a complete file.
        let outcome = match std::fs::hard_link(&temporary, &path) {
            Ok(()) => Ok(PutOutcome::Created),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok(PutOutcome::AlreadyExists)
            }
            Err(source) => Err(LabelError::Io {
                key: key.to_string(),
                source,
            }),
        };
        let _ = std::fs::remove_file(&temporary);
        outcome
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), LabelError> {
        let (temporary, path) = self.write_temporary(key, bytes)?;
        std::fs::rename(&temporary, &path).map_err(|source| LabelError::Io {
            key: key.to_string(),
            source,
        })
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, LabelError> {
        std::fs::read(self.path(key)).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                LabelError::NotFound {
                    key: key.to_string(),
                }
            } else {
                LabelError::Io {
                    key: key.to_string(),
                    source,
                }
            }
        })
    }

    fn exists(&self, key: &str) -> Result<bool, LabelError> {
        Ok(self.path(key).exists())
    }

    fn location(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }
}

/// An in-memory store for tests.
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemoryStore {
    fn objects(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.objects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ShardStore for MemoryStore {
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<PutOutcome, LabelError> {
        let mut objects = self.objects();
        if objects.contains_key(key) {
            return Ok(PutOutcome::AlreadyExists);
        }
        objects.insert(key.to_string(), bytes.to_vec());
        Ok(PutOutcome::Created)
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), LabelError> {
        self.objects().insert(key.to_string(), bytes.to_vec());
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, LabelError> {
        self.objects()
            .get(key)
            .cloned()
            .ok_or_else(|| LabelError::NotFound {
                key: key.to_string(),
            })
    }

    fn exists(&self, key: &str) -> Result<bool, LabelError> {
        Ok(self.objects().contains_key(key))
    }

    fn location(&self, key: &str) -> String {
        format!("memory:{key}")
    }
}
