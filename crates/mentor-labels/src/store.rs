//! Where shards live: any `object_store` backend, a local directory by default.
//!
//! `put_if_absent` is the only way to write a shard: the first writer of a key wins, atomically
//! (`PutMode::Create`: a hard link of a fully written file on a local disk, `If-None-Match: *` on
//! S3), and no reader ever sees a partial object. The store is used from blocking threads (the
//! worker's libtorch thread, the coordinator's blocking pool): each call runs on a small runtime
//! of the store's own and waits for its answer, so it works with or without a tokio context.

use std::future::Future;
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::LabelError;

/// Whether `error` is a refusal of the credentials or permissions in use.
fn is_denied(error: &LabelError) -> bool {
    matches!(error, LabelError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied)
}

/// Whether a create-if-absent write took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// Another writer committed this key first; the store is unchanged.
    AlreadyExists,
}

/// Storage of soft-label shards and manifests, addressed by `/`-separated keys under a root.
#[derive(Clone)]
pub struct ShardStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The root as the user wrote it (a path or URL), for messages.
    root: String,
    runtime: Arc<StoreRuntime>,
}

/// The store's own runtime. Dropping a tokio runtime blocks until its threads stop, which
/// tokio refuses (a panic) inside an async context, where the last clone of a store may well
/// be dropped (the coordinator's, when its server shuts down): this one shuts down in the
/// background instead.
struct StoreRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for StoreRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0
            .as_ref()
            .expect("the runtime lives until the store is dropped")
    }
}

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStore")
            .field("root", &self.root)
            .finish()
    }
}

fn runtime(root: &str) -> Result<Arc<StoreRuntime>, LabelError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mentor-store")
        .enable_all()
        .build()
        .map(|runtime| Arc::new(StoreRuntime(Some(runtime))))
        .map_err(|source| LabelError::Io {
            key: root.to_string(),
            source,
        })
}

/// `location` without its trailing slashes, a URL's `scheme://` kept whole (`memory:///` is
/// `memory://`), for messages.
fn root_name(location: &str) -> String {
    let trimmed = location.trim_end_matches('/');
    if trimmed.ends_with(':') {
        format!("{trimmed}//")
    } else {
        trimmed.to_string()
    }
}

/// Whether `location` names an object store URL rather than a local path.
fn is_url(location: &str) -> bool {
    location.contains("://")
}

impl ShardStore {
    /// Opens `location`: a local directory (created if missing), or a URL (`s3://bucket/prefix`,
    /// `gs://`, `az://`, `file:///`; `memory:///` for tests) configured from the usual
    /// environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn open(location: &str) -> Result<ShardStore, LabelError> {
        let runtime = runtime(location)?;
        let invalid =
            |reason: String| LabelError::Invalid(format!("storage `{location}`: {reason}"));
        if !is_url(location) {
            // Absolute: workers are sent this root, and run elsewhere than the coordinator.
            let path = std::path::absolute(location).map_err(|source| LabelError::Io {
                key: location.to_string(),
                source,
            })?;
            return Self::local(&path, path.display().to_string(), runtime);
        }
        let url = url::Url::parse(location).map_err(|error| invalid(error.to_string()))?;
        if url.scheme() == "file" {
            // A file URL is a directory: flushed like one (object_store's own file store is not).
            let path = url
                .to_file_path()
                .map_err(|()| invalid("not a local path".into()))?;
            return Self::local(&path, root_name(location), runtime);
        }
        let options: Vec<(String, String)> = std::env::vars()
            .filter(|(key, _)| {
                ["AWS_", "GOOGLE_", "AZURE_"]
                    .iter()
                    .any(|prefix| key.starts_with(prefix))
            })
            .map(|(key, value)| (key.to_ascii_lowercase(), value))
            .collect();
        // Building some stores (credentials providers) needs a tokio context.
        let _context = runtime.enter();
        let (store, prefix) = object_store::parse_url_opts(&url, options)
            .map_err(|error| invalid(error.to_string()))?;
        Ok(ShardStore {
            store: Arc::from(store),
            prefix,
            root: root_name(location),
            runtime,
        })
    }

    /// The directory `path`, created if missing, as a store named `root`.
    fn local(
        path: &std::path::Path,
        root: String,
        runtime: Arc<StoreRuntime>,
    ) -> Result<ShardStore, LabelError> {
        std::fs::create_dir_all(path).map_err(|source| LabelError::Io {
            key: root.clone(),
            source,
        })?;
        // Flushed to the disk before a commit returns, as a cloud store's commit is: a shard or
        // manifest named after a machine's crash holds what was written.
        let local = object_store::local::LocalFileSystem::new_with_prefix(path)
            .map_err(|error| LabelError::Invalid(format!("storage `{root}`: {error}")))?
            .with_fsync(true);
        Ok(ShardStore {
            store: Arc::new(local),
            prefix: ObjectPath::default(),
            root,
            runtime,
        })
    }

    /// `store` at its root, under the name `root` (in memory; in tests, a store that fails on
    /// purpose).
    fn with_object_store(
        store: Arc<dyn ObjectStore>,
        root: &str,
    ) -> Result<ShardStore, LabelError> {
        Ok(ShardStore {
            store,
            prefix: ObjectPath::default(),
            root: root.to_string(),
            runtime: runtime(root)?,
        })
    }

    /// A store in memory (tests, benchmarks).
    pub fn in_memory() -> Result<ShardStore, LabelError> {
        Self::with_object_store(Arc::new(object_store::memory::InMemory::new()), "memory://")
    }

    /// The root as given to [`ShardStore::open`].
    pub fn root(&self) -> &str {
        &self.root
    }

    fn path(&self, key: &str) -> ObjectPath {
        key.split('/')
            .filter(|part| !part.is_empty())
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    /// What a refused operation asks of the user: credentials or file permissions that let
    /// soft labels be read, written, listed and deleted under the root.
    fn permission_advice(&self) -> String {
        let root = &self.root;
        if is_url(root) && !root.starts_with("file:") {
            format!("the credentials in use (the environment's, or the machine's role) must be valid and allow reading, writing, listing and deleting objects under `{root}` (on S3: s3:GetObject, s3:PutObject, s3:ListBucket and s3:DeleteObject)")
        } else {
            format!("the user running the coordinator and the workers must be able to read, write and delete files under `{root}`")
        }
    }

    /// Runs `future` on the store's runtime and waits for it.
    fn run<T: Send + 'static>(
        &self,
        key: &str,
        future: impl Future<Output = Result<T, object_store::Error>> + Send + 'static,
    ) -> Result<T, LabelError> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = sender.send(future.await);
        });
        // Errors name the whole location (bucket and prefix), not the key alone.
        let result = receiver.recv().map_err(|_| LabelError::Io {
            key: self.location(key),
            source: std::io::Error::other("the storage runtime stopped"),
        })?;
        result.map_err(|error| match error {
            object_store::Error::NotFound { .. } => LabelError::NotFound {
                key: self.location(key),
            },
            denied @ (object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }) => LabelError::Io {
                key: self.location(key),
                source: std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{denied}; {}", self.permission_advice()),
                ),
            },
            other => LabelError::Io {
                key: self.location(key),
                source: std::io::Error::other(other.to_string()),
            },
        })
    }

    /// Commits `bytes` under `key` unless the key exists; atomic and exactly once.
    pub fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<PutOutcome, LabelError> {
        let (store, path) = (self.store.clone(), self.path(key));
        let payload = PutPayload::from(bytes.to_vec());
        self.run(key, async move {
            let options = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match store.put_opts(&path, payload, options).await {
                Ok(_) => Ok(PutOutcome::Created),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => Ok(PutOutcome::AlreadyExists),
                Err(error) => Err(error),
            }
        })
    }

    /// [`ShardStore::put_if_absent`], tried again (up to 3 times, 1 s then 2 s apart) when the
    /// write fails: an object store does not retry a conditional write itself, since it cannot
    /// tell whether a write whose answer was lost was made; the next try finds it made
    /// (`AlreadyExists`), which the caller checks as it checks any existing object.
    pub fn commit(&self, key: &str, bytes: &[u8]) -> Result<PutOutcome, LabelError> {
        let mut tries = 0u32;
        loop {
            tries += 1;
            match self.put_if_absent(key, bytes) {
                // Refused credentials stay refused: no use waiting.
                Err(error) if is_denied(&error) => return Err(error),
                Err(error) if tries < 3 => {
                    tracing::warn!(key, %error, tries, "writing to the soft-label store failed, trying again");
                    std::thread::sleep(std::time::Duration::from_secs(u64::from(tries)));
                }
                outcome => return outcome,
            }
        }
    }

    /// Writes `bytes` under `key` atomically, replacing what was there (manifests).
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<(), LabelError> {
        let (store, path) = (self.store.clone(), self.path(key));
        let payload = PutPayload::from(bytes.to_vec());
        self.run(key, async move {
            store
                .put_opts(&path, payload, PutOptions::default())
                .await
                .map(|_| ())
        })
    }

    /// Removes `key` (a missing one is no error).
    pub fn delete(&self, key: &str) -> Result<(), LabelError> {
        let (store, path) = (self.store.clone(), self.path(key));
        match self.run(key, async move { store.delete(&path).await }) {
            Ok(()) | Err(LabelError::NotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    pub fn get(&self, key: &str) -> Result<Vec<u8>, LabelError> {
        let (store, path) = (self.store.clone(), self.path(key));
        self.run(key, async move {
            let bytes = store
                .get_opts(&path, GetOptions::default())
                .await?
                .bytes()
                .await?;
            Ok(bytes.to_vec())
        })
    }

    pub fn exists(&self, key: &str) -> Result<bool, LabelError> {
        let (store, path) = (self.store.clone(), self.path(key));
        match self.run(key, async move {
            store
                .get_opts(&path, GetOptions::new().with_head(true))
                .await
                .map(|result| result.meta)
        }) {
            Ok(_) => Ok(true),
            Err(LabelError::NotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// A human-readable location of `key` (a path or URL).
    pub fn location(&self, key: &str) -> String {
        if self.root.ends_with("://") {
            format!("{}{key}", self.root)
        } else {
            format!("{}/{key}", self.root)
        }
    }

    /// Checks that the store honours create-if-absent writes, which every shard commit and the
    /// run's claim of the store rely on: writes `probe_key` (a key of its own: the caller's run
    /// and process) twice and expects the second write refused and the first kept, then removes
    /// it. Some S3-compatible stores ignore `If-None-Match` and overwrite (two attempts of a
    /// label task would then both "win"); a FUSE mount without hard links fails such writes;
    /// either is named here, before any work, not in the middle of a round.
    pub fn check_conditional_writes(&self, probe_key: &str) -> Result<(), LabelError> {
        let advice = if is_url(&self.root) && !self.root.starts_with("file:") {
            "use a store that honours `If-None-Match` (AWS S3, Google Cloud Storage, Azure Blob Storage, a recent MinIO)"
        } else {
            "use a local or network file system with hard links, or the store's own URL (s3://, gs://, az://) rather than a FUSE mount of it"
        };
        let refused = |reason: String| {
            LabelError::Invalid(format!(
                "storage `{}` cannot create an object only if it is absent ({reason}); soft labels need that to commit each shard exactly once: {advice}",
                self.root
            ))
        };
        let verdict = (|| {
            // A first write whose answer was lost and that its retry then found made is ours.
            let first = self
                .commit(probe_key, b"first")
                .map_err(|error| refused(error.to_string()))?;
            if first == PutOutcome::AlreadyExists && self.get(probe_key)? != b"first" {
                return Err(refused(format!(
                    "`{}` held something else before the probe wrote it",
                    self.location(probe_key)
                )));
            }
            let second = self
                .put_if_absent(probe_key, b"second")
                .map_err(|error| refused(error.to_string()))?;
            if second == PutOutcome::Created {
                return Err(refused(
                    "a second create-if-absent write of the same key was accepted; the store ignores `If-None-Match`".into(),
                ));
            }
            if self.get(probe_key)? != b"first" {
                return Err(refused("a refused write replaced the object anyway".into()));
            }
            Ok(())
        })();
        // Removed whatever the verdict; a store that refuses deletes (a bucket policy without
        // DeleteObject) keeps a few bytes, which is no reason to refuse it.
        if let Err(error) = self.delete(probe_key) {
            tracing::warn!(%error, key = probe_key, "could not remove the store's write probe");
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures_util::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::{
        CopyOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, PutMultipartOptions,
        PutResult,
    };

    use super::*;

    /// An object store in memory that misbehaves as real ones do: writes that fail, writes
    /// made whose answer is lost, and create-if-absent ignored.
    #[derive(Debug, Default)]
    struct Faulty {
        inner: InMemory,
        /// The next this many writes fail, writing nothing.
        failing_puts: AtomicU32,
        /// The next this many writes are made, then answered with an error.
        lost_answers: AtomicU32,
        /// Create-if-absent writes overwrite (an S3-compatible store ignoring `If-None-Match`).
        ignores_create: bool,
        /// Writes are refused (credentials without write permission).
        denies_puts: bool,
        puts: AtomicU32,
    }

    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn failure(what: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "Faulty",
            source: what.into(),
        }
    }

    impl std::fmt::Display for Faulty {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Faulty")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Faulty {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            mut opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.puts.fetch_add(1, Ordering::SeqCst);
            if take(&self.failing_puts) {
                return Err(failure("connection reset"));
            }
            if self.denies_puts {
                return Err(object_store::Error::PermissionDenied {
                    path: location.to_string(),
                    source: "403 Forbidden: Access Denied".into(),
                });
            }
            if self.ignores_create {
                opts.mode = PutMode::Overwrite;
            }
            let result = self.inner.put_opts(location, payload, opts).await;
            if result.is_ok() && take(&self.lost_answers) {
                return Err(failure("timed out waiting for the answer"));
            }
            result
        }

        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<ObjectPath>>,
        ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    fn faulty(faulty: Faulty) -> (Arc<Faulty>, ShardStore) {
        let faulty = Arc::new(faulty);
        let store =
            ShardStore::with_object_store(faulty.clone(), "s3://bucket/labels").expect("store");
        (faulty, store)
    }

    /// A failed write is tried again and lands; a write made whose answer was lost is found
    /// made by the next try (the caller then checks the object as any existing one); a store
    /// that keeps failing gives up after 3 tries, naming the whole location.
    #[test]
    fn commits_are_tried_again_when_a_write_fails() {
        let (store, shards) = faulty(Faulty {
            failing_puts: AtomicU32::new(2),
            ..Faulty::default()
        });
        assert_eq!(
            shards.commit("round-1/a", b"a").expect("third try"),
            PutOutcome::Created
        );
        assert_eq!(store.puts.load(Ordering::SeqCst), 3);
        assert_eq!(shards.get("round-1/a").expect("get"), b"a".to_vec());

        let (store, shards) = faulty(Faulty {
            lost_answers: AtomicU32::new(1),
            ..Faulty::default()
        });
        assert_eq!(
            shards.commit("round-1/b", b"b").expect("second try"),
            PutOutcome::AlreadyExists
        );
        assert_eq!(store.puts.load(Ordering::SeqCst), 2);
        assert_eq!(shards.get("round-1/b").expect("get"), b"b".to_vec());

        let (store, shards) = faulty(Faulty {
            failing_puts: AtomicU32::new(u32::MAX),
            ..Faulty::default()
        });
        let error = shards.commit("round-1/c", b"c").expect_err("always fails");
        assert_eq!(store.puts.load(Ordering::SeqCst), 3);
        let message = error.to_string();
        assert!(
            message.contains("s3://bucket/labels/round-1/c")
                && message.contains("connection reset"),
            "{message}"
        );
    }

    /// Credentials that may not write: the error names the location and says what the
    /// credentials must allow.
    #[test]
    fn a_refused_write_says_what_the_credentials_must_allow() {
        let (store, shards) = faulty(Faulty {
            denies_puts: true,
            ..Faulty::default()
        });
        let message = shards
            .commit("round-1/d", b"d")
            .expect_err("refused")
            .to_string();
        assert_eq!(store.puts.load(Ordering::SeqCst), 1, "not tried again");
        assert!(
            message.contains("s3://bucket/labels/round-1/d")
                && message.contains("Access Denied")
                && message.contains("s3:PutObject")
                && message.contains("under `s3://bucket/labels`"),
            "{message}"
        );
    }

    /// A store that accepts a second create-if-absent write of a key is refused, naming the
    /// store; one that honours it passes; the probe is removed either way.
    #[test]
    fn conditional_writes_are_checked() {
        let (_, honest) = faulty(Faulty::default());
        honest
            .check_conditional_writes(".mentor/probe")
            .expect("honours create");
        assert!(!honest.exists(".mentor/probe").expect("exists"));

        // A first write whose answer was lost is found made by its retry: still a pass.
        let (_, lost) = faulty(Faulty {
            lost_answers: AtomicU32::new(1),
            ..Faulty::default()
        });
        lost.check_conditional_writes(".mentor/probe")
            .expect("a lost answer");

        let (_, lax) = faulty(Faulty {
            ignores_create: true,
            ..Faulty::default()
        });
        let message = lax
            .check_conditional_writes(".mentor/probe")
            .expect_err("ignores create")
            .to_string();
        assert!(
            message.contains("`s3://bucket/labels`")
                && message.contains("ignores `If-None-Match`")
                && message.contains("AWS S3"),
            "{message}"
        );
        assert!(!lax.exists(".mentor/probe").expect("exists"));

        // A local directory honours it (hard links).
        let dir = tempfile::tempdir().expect("tempdir");
        let local = ShardStore::open(dir.path().to_str().expect("utf-8")).expect("store");
        local
            .check_conditional_writes(".mentor/probe")
            .expect("local");
    }

    /// The coordinator's last clone of its store is dropped inside its async server: that must
    /// not panic (a tokio runtime dropped in an async context does).
    #[test]
    fn a_store_can_be_dropped_inside_an_async_context() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ShardStore::open(dir.path().to_str().expect("utf-8 path")).expect("store");
        assert_eq!(
            store.put_if_absent("a/b", b"shard").expect("put"),
            PutOutcome::Created
        );
        let outer = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        outer.block_on(async move {
            let clone = store.clone();
            drop(store);
            assert_eq!(clone.get("a/b").expect("get"), b"shard".to_vec());
            drop(clone);
        });
    }
}
