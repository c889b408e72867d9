//! Durable local files: written beside their place, flushed to the disk, then renamed into
//! place with their directory flushed too. A reader, or a process started again after the
//! machine went down, finds the old file or the whole new one: a rename alone is atomic for a
//! crash of the process, not of the machine, whose file system may keep the new name over
//! contents it never wrote (an empty `state.json`, a checkpoint cut short).

use std::fs::File;
use std::io;
use std::path::Path;

/// Moves `temporary`, written in full, to `path` durably: its contents are flushed before the
/// rename and the directory's entry after it.
pub fn publish(temporary: &Path, path: &Path) -> io::Result<()> {
    File::open(temporary)?.sync_all()?;
    std::fs::rename(temporary, path)?;
    sync_directory_of(path)
}

/// Writes `bytes` to `path` durably through `temporary` (a file beside it, replaced). A write
/// that fails before the rename removes its temporary: a disk full, the likeliest cause, would
/// stay full of it.
pub fn write(path: &Path, temporary: &Path, bytes: &[u8]) -> io::Result<()> {
    std::fs::write(temporary, bytes)
        .and_then(|()| publish(temporary, path))
        .inspect_err(|_| remove_if_there(temporary))
}

/// Removes a temporary file that is of no use any more, if it is there (best effort: the error
/// that made it useless is the one to report).
pub fn remove_if_there(temporary: &Path) {
    if let Err(e) = std::fs::remove_file(temporary) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %temporary.display(), error = %e, "a temporary file could not be removed");
        }
    }
}

/// Linux's `EINVAL`, `EBADF` and `ENOTSUP`: what a directory flush returns on a file system
/// that cannot do it.
#[cfg(unix)]
const EINVAL: i32 = 22;
#[cfg(unix)]
const EBADF: i32 = 9;
#[cfg(unix)]
const ENOTSUP: i32 = 95;

/// Flushes the directory holding `path` (its entries: a new or renamed file's name).
fn sync_directory_of(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        match File::open(parent).and_then(|directory| directory.sync_all()) {
            // Some file systems (FUSE, network mounts) cannot flush a directory: the rename
            // stands as on a file system without the flush.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(code) if code == EINVAL || code == EBADF || code == ENOTSUP
                ) || error.kind() == io::ErrorKind::Unsupported =>
            {
                Ok(())
            }
            other => other,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("state.json");
        let temporary = dir.path().join("state.tmp");
        write(&path, &temporary, b"first").expect("first write");
        write(&path, &temporary, b"second, longer").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read back"), b"second, longer");
        assert!(!temporary.exists(), "the temporary was renamed into place");
    }

    #[test]
    fn a_write_that_cannot_be_moved_into_place_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("temporary directory");
        // A directory where the file should go: the rename fails after the temporary is written.
        let path = dir.path().join("state.json");
        std::fs::create_dir(&path).expect("a directory in the way");
        std::fs::write(path.join("inside"), b"kept").expect("write");
        let temporary = dir.path().join("state.tmp");
        write(&path, &temporary, b"new").expect_err("a directory is in the way");
        assert!(
            !temporary.exists(),
            "the temporary of a failed write was left"
        );
        assert_eq!(std::fs::read(path.join("inside")).expect("read"), b"kept");
    }

    #[test]
    fn a_failed_publish_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("checkpoint.safetensors");
        std::fs::write(&path, b"old").expect("old file");
        let missing = dir.path().join("never-written.tmp");
        let error = publish(&missing, &path).expect_err("nothing to publish");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert_eq!(std::fs::read(&path).expect("read back"), b"old");
    }
}
