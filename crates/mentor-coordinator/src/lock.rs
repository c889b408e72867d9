//! One coordinator per run directory: `<run_dir>/coordinator.lock`.
//!
//! Two coordinators on one run directory would overwrite each other's state and checkpoints.
//! The lock is the operating system's (`flock`), so a coordinator that dies, however it dies,
//! leaves the directory free; the file's text says who holds it (pid, host and, once it
//! listens, address), for the refusal a second coordinator gets. On a shared file system the
//! lock holds across hosts only where the file system supports `flock` (NFS v4 does).

use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use crate::CoordinatorError;

/// The lock file's name in the run directory.
pub const FILE_NAME: &str = "coordinator.lock";

/// What precedes the holder's address in the lock file's text.
const LISTENING: &str = ", listening at ";

/// The address to reach a holder at: a coordinator listening on every interface
/// (`0.0.0.0`, `[::]`) is reached at its host's name (`who` is `pid N on HOST`), from this
/// machine or another that shares the run directory.
fn reachable(url: &str, who: &str) -> String {
    let host = who.split_once(" on ").map(|(_, host)| host.trim());
    match host {
        Some(host) if !host.is_empty() => ["0.0.0.0", "[::]"]
            .iter()
            .find_map(|any| {
                url.strip_prefix(&format!("http://{any}:"))
                    .map(|port| format!("http://{host}:{port}"))
            })
            .unwrap_or_else(|| url.to_string()),
        _ => url.to_string(),
    }
}

/// Who holds a run directory's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// No coordinator.
    None,
    /// A coordinator that does not listen yet.
    Starting,
    /// A coordinator listening at this address.
    Listening(String),
}

/// The held lock of a run directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of `run_dir` (which must exist), or says who holds it.
    pub fn take(run_dir: &Path) -> Result<RunLock, CoordinatorError> {
        let path = run_dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| store_error(&path, e))?;
        // `check_free` and `mentor status` hold a shared lock for an instant: a lock still busy
        // after a second is another coordinator's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            match file.try_lock() {
                Ok(()) => {
                    let mut lock = RunLock { file, path };
                    lock.describe(None);
                    return Ok(lock);
                }
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(in_use(run_dir, &path)),
                Err(std::fs::TryLockError::Error(e)) => return Err(lock_error(&path, e)),
            }
        }
    }

    /// Who holds `run_dir`, and where it listens once it does.
    pub fn holder(run_dir: &Path) -> Result<Holder, CoordinatorError> {
        match RunLock::check_free(run_dir) {
            Ok(()) => Ok(Holder::None),
            Err(CoordinatorError::RunInUse { .. }) => {
                let text = std::fs::read_to_string(run_dir.join(FILE_NAME)).unwrap_or_default();
                Ok(match text.split_once(LISTENING) {
                    Some((who, url)) => Holder::Listening(reachable(url.trim(), who)),
                    None => Holder::Starting,
                })
            }
            Err(error) => Err(error),
        }
    }

    /// Fails, saying who holds it, when another coordinator holds `run_dir`; creates nothing.
    /// For a check before anything else is done (the lock itself is taken by [`RunLock::take`]).
    pub fn check_free(run_dir: &Path) -> Result<(), CoordinatorError> {
        let path = run_dir.join(FILE_NAME);
        let file = match OpenOptions::new().read(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(store_error(&path, e)),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => Err(in_use(run_dir, &path)),
            Err(std::fs::TryLockError::Error(e)) => Err(lock_error(&path, e)),
        }
    }

    /// Adds the address this coordinator listens at to what the lock file says.
    pub fn record_address(&mut self, url: &str) {
        self.describe(Some(url));
    }

    /// Writes who holds the lock. Best effort: the lock holds whatever the text says.
    fn describe(&mut self, url: Option<&str>) {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_default();
        let mut text = format!("pid {}", std::process::id());
        if !host.is_empty() {
            text.push_str(&format!(" on {host}"));
        }
        if let Some(url) = url {
            text.push_str(&format!("{LISTENING}{url}"));
        }
        let written = self
            .file
            .set_len(0)
            .and_then(|()| self.file.rewind())
            .and_then(|()| writeln!(self.file, "{text}"));
        if let Err(error) = written {
            tracing::warn!(path = %self.path.display(), %error, "cannot write who holds the run directory's lock");
        }
    }
}

fn in_use(run_dir: &Path, path: &Path) -> CoordinatorError {
    let holder = std::fs::read_to_string(path).unwrap_or_default();
    let holder = holder.trim();
    CoordinatorError::RunInUse {
        dir: run_dir.to_path_buf(),
        holder: if holder.is_empty() {
            String::new()
        } else {
            format!(" ({holder})")
        },
    }
}

/// Linux's `ENOLCK`, `ENOSYS` and `EOPNOTSUPP`: what `flock` returns on a file system that
/// does not lock (Lustre mounted without `flock`, some FUSE and network mounts).
const NO_LOCKS: [i32; 3] = [37, 38, 95];

/// A failure to lock `path`, with what to do when its file system cannot lock at all.
fn lock_error(path: &Path, error: std::io::Error) -> CoordinatorError {
    let unsupported = error.kind() == std::io::ErrorKind::Unsupported
        || error
            .raw_os_error()
            .is_some_and(|code| NO_LOCKS.contains(&code));
    if !unsupported {
        return store_error(path, error);
    }
    CoordinatorError::StateStore {
        path: path.to_path_buf(),
        reason: format!(
            "cannot lock it ({error}): its file system does not support flock, with which a coordinator keeps its run directory to itself; use a run directory on one that does (NFS v4, a local disk; Lustre mounted with -o flock)"
        ),
    }
}

fn store_error(path: &Path, error: std::io::Error) -> CoordinatorError {
    CoordinatorError::StateStore {
        path: path.to_path_buf(),
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file system that cannot lock is named as the cause, with what to do; other failures
    /// are reported as they are.
    #[test]
    fn a_file_system_without_locks_is_named() {
        let path = Path::new("/shared/run/coordinator.lock");
        for code in NO_LOCKS {
            let message = lock_error(path, std::io::Error::from_raw_os_error(code)).to_string();
            assert!(
                message.contains("does not support flock") && message.contains("-o flock"),
                "{message}"
            );
        }
        let denied = lock_error(path, std::io::Error::from_raw_os_error(13)).to_string();
        assert!(!denied.contains("flock"), "{denied}");
    }

    #[test]
    fn a_coordinator_on_every_interface_is_reached_at_its_host() {
        assert_eq!(
            reachable("http://0.0.0.0:50051", "pid 7 on node-1"),
            "http://node-1:50051"
        );
        assert_eq!(
            reachable("http://[::]:50051", "pid 7 on node-1"),
            "http://node-1:50051"
        );
        assert_eq!(
            reachable("http://10.0.0.5:50051", "pid 7 on node-1"),
            "http://10.0.0.5:50051"
        );
        assert_eq!(
            reachable("http://0.0.0.0:50051", "pid 7"),
            "http://0.0.0.0:50051"
        );
    }
}
