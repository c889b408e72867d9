//! Collectives for data-parallel training, on host memory (`f32` slices) or device pointers.
//!
//! - [`SingleProcess`]: world size 1, every collective is the identity.
//! - [`TcpRing`]: ring all-reduce (reduce-scatter then all-gather) and broadcast over TCP
//!   between processes, on one host or several; every socket operation has a timeout, so a
//!   dead or silent peer makes the collective fail instead of hanging.
//! - [`nccl`]: NCCL loaded at run time (`libnccl.so.2`, as shipped with the torch wheel), for
//!   GPU tensors. Nothing here links CUDA: the crate builds and tests on machines without it.
//!
//! This crate knows nothing of tensors, models or the coordinator; the rendezvous (who is rank
//! r, where does it listen) is the caller's.

pub mod cuda;
pub mod nccl;
mod ring;

pub use ring::{RingConfig, TcpRing};

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {peer} did not answer within {seconds:.0}s during {operation}")]
    Timeout {
        peer: usize,
        operation: &'static str,
        seconds: f64,
    },
    /// A collective of the whole group (NCCL) that did not finish in time: some rank of the
    /// group is dead or silent, which one the transport cannot tell.
    #[error(
        "the group's {operation} did not finish within {seconds:.0}s: a rank stopped or fell silent (its log names the cause); the communicator was aborted"
    )]
    GroupTimeout {
        operation: &'static str,
        seconds: f64,
    },
    #[error("connection to rank {peer} failed during {operation}: {source}")]
    Peer {
        peer: usize,
        operation: &'static str,
        source: std::io::Error,
    },
    #[error("collective out of step: {0}")]
    OutOfStep(String),
    #[error("group setup failed: {0}")]
    Setup(String),
    /// The group's setup failed because another rank did not take part in time (it never
    /// connected, or never joined the NCCL communicator).
    #[error("group setup failed: {0}")]
    PeerSetup(String),
    #[error("NCCL: {0}")]
    Nccl(String),
    /// An NCCL error that another rank's end most likely caused: `ncclRemoteError` (a remote
    /// process exited, or the network failed) or `ncclSystemError` (a socket or call failed).
    #[error("NCCL: {0}")]
    NcclPeer(String),
    /// A collective this rank could not run (an impossible call, a failed system call).
    #[error("collective: {0}")]
    Local(String),
    /// A tensor a collective cannot take (NCCL reads it by address as contiguous f32).
    #[error("collective buffer: {0}")]
    Buffer(String),
}

impl CollectiveError {
    /// Whether another rank is the likely cause (it died, fell silent or never came), rather
    /// than this rank's own setup, device or buffers: the coordinator counts such an attempt as
    /// the group's loss, and an error of a rank's own as that rank's failure.
    pub fn is_peer_failure(&self) -> bool {
        matches!(
            self,
            CollectiveError::Timeout { .. }
                | CollectiveError::GroupTimeout { .. }
                | CollectiveError::Peer { .. }
                | CollectiveError::PeerSetup(_)
                | CollectiveError::NcclPeer(_)
        )
    }
}

/// `ncclSystemError` and `ncclRemoteError`, the result codes of a peer gone.
const NCCL_PEER_CODES: [i32; 2] = [2, 6];

/// The error of NCCL result `code`: a peer's failure for [`NCCL_PEER_CODES`], else this rank's.
pub fn nccl_error(code: i32, message: String) -> CollectiveError {
    if NCCL_PEER_CODES.contains(&code) {
        CollectiveError::NcclPeer(message)
    } else {
        CollectiveError::Nccl(message)
    }
}

/// A collective over `f32` host buffers, the same for every backend above the transport.
pub trait HostCollective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `data` by the element-wise sum over all ranks.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError>;
    /// Replaces `data` on every rank by `root`'s.
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError>;
    /// How long a collective may wait on a peer from now on (a transport without peers has
    /// nothing to wait for).
    fn set_timeout(&mut self, _timeout: std::time::Duration) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// World size 1.
#[derive(Debug, Default)]
pub struct SingleProcess;

impl HostCollective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _data: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn broadcast(&mut self, _data: &mut [f32], _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// The `[start, end)` bounds of chunk `index` when `len` elements are split in `parts`.
pub fn chunk_bounds(len: usize, parts: usize, index: usize) -> (usize, usize) {
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    let size = base + usize::from(index < extra);
    (start, start + size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_errors_of_a_peer_gone_are_the_groups() {
        assert!(nccl_error(6, "remote process exited".into()).is_peer_failure());
        assert!(nccl_error(2, "system error".into()).is_peer_failure());
        assert!(!nccl_error(4, "invalid argument".into()).is_peer_failure());
        assert!(!nccl_error(1, "unhandled cuda error".into()).is_peer_failure());
    }
}
