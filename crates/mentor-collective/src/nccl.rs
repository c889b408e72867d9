//! NCCL, loaded at run time.
//!
//! The torch wheel ships NCCL as `libnccl.so.2` (package `nvidia-nccl-cu13`) and libtorch's
//! CUDA library already depends on it, so it is usually loaded in the process by the time a GPU
//! group forms. [`NcclLibrary::load`] tries, in order: `$MENTOR_NCCL_LIBRARY`, `libnccl.so.2`
//! (the loaded copy or the loader's search path), then `nvidia/nccl/lib/libnccl.so.2` next to
//! the libtorch this process mapped (found in `/proc/self/maps`). No symlink, no link-time
//! dependency: machines without CUDA build and test this crate, and get a clear error if they
//! ask for a GPU group.
//!
//! Collectives are enqueued on a CUDA stream given as a raw pointer (null: the default stream,
//! the one torch computes on unless told otherwise). Buffers must stay alive until the stream
//! has run them, and every rank must issue the same collectives in the same order.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::Arc;

use crate::CollectiveError;

/// `ncclUniqueId`: 128 opaque bytes made by rank 0 and handed to every rank.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; 128],
}

impl UniqueId {
    pub fn to_bytes(&self) -> Vec<u8> {
        self.internal.iter().map(|&c| c as u8).collect()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<UniqueId, CollectiveError> {
        if bytes.len() != 128 {
            return Err(CollectiveError::Nccl(format!(
                "a unique id has 128 bytes, got {}",
                bytes.len()
            )));
        }
        let mut internal = [0 as c_char; 128];
        for (slot, &byte) in internal.iter_mut().zip(bytes) {
            *slot = byte as c_char;
        }
        Ok(UniqueId { internal })
    }
}

type Comm = *mut c_void;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> c_int;
type Broadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> c_int;
type CommDestroy = unsafe extern "C" fn(Comm) -> c_int;
type CommAbort = unsafe extern "C" fn(Comm) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;

/// The NCCL entry points this project uses.
pub struct NcclLibrary {
    _library: libloading::Library,
    path: String,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: AllReduce,
    broadcast: Broadcast,
    comm_destroy: CommDestroy,
    comm_abort: CommAbort,
    get_error_string: GetErrorString,
    get_version: GetVersion,
}

impl std::fmt::Debug for NcclLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclLibrary")
            .field("path", &self.path)
            .finish()
    }
}

/// Where to look for `libnccl.so.2`, in order.
pub fn candidates() -> Vec<String> {
    let mut paths = Vec::new();
    if let Ok(path) = std::env::var("MENTOR_NCCL_LIBRARY") {
        paths.push(path);
    }
    paths.push("libnccl.so.2".to_string());
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        for line in maps.lines() {
            let Some(path) = line.split_whitespace().nth(5) else {
                continue;
            };
            if path.ends_with("/libtorch_cpu.so") || path.ends_with("/libtorch.so") {
                let lib_dir = PathBuf::from(path);
                if let Some(torch_lib) = lib_dir.parent() {
                    // site-packages/torch/lib -> site-packages/nvidia/nccl/lib
                    let wheel = torch_lib.join("../../nvidia/nccl/lib/libnccl.so.2");
                    let wheel = wheel.display().to_string();
                    if !paths.contains(&wheel) {
                        paths.push(wheel);
                    }
                }
            }
        }
    }
    paths
}

impl NcclLibrary {
    /// Loads NCCL from the first candidate that opens.
    pub fn load() -> Result<Arc<NcclLibrary>, CollectiveError> {
        let mut failures = Vec::new();
        for path in candidates() {
            // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
            match unsafe { libloading::Library::new(&path) } {
                Ok(library) => return Self::bind(library, path).map(Arc::new),
                Err(error) => failures.push(format!("{path}: {error}")),
            }
        }
        Err(CollectiveError::Nccl(format!(
            "libnccl.so.2 not found (install the torch wheel's nvidia-nccl package or set MENTOR_NCCL_LIBRARY); tried {}",
            failures.join("; ")
        )))
    }

    fn bind(library: libloading::Library, path: String) -> Result<NcclLibrary, CollectiveError> {
        fn symbol<T: Copy>(
            library: &libloading::Library,
            name: &[u8],
        ) -> Result<T, CollectiveError> {
            // SAFETY: the signatures above are NCCL's public C API (nccl.h, NCCL 2.x).
            unsafe { library.get::<T>(name) }
                .map(|symbol| *symbol)
                .map_err(|error| {
                    CollectiveError::Nccl(format!(
                        "symbol {}: {error}",
                        String::from_utf8_lossy(name)
                    ))
                })
        }
        Ok(NcclLibrary {
            get_unique_id: symbol(&library, b"ncclGetUniqueId\0")?,
            comm_init_rank: symbol(&library, b"ncclCommInitRank\0")?,
            all_reduce: symbol(&library, b"ncclAllReduce\0")?,
            broadcast: symbol(&library, b"ncclBroadcast\0")?,
            comm_destroy: symbol(&library, b"ncclCommDestroy\0")?,
            comm_abort: symbol(&library, b"ncclCommAbort\0")?,
            get_error_string: symbol(&library, b"ncclGetErrorString\0")?,
            get_version: symbol(&library, b"ncclGetVersion\0")?,
            _library: library,
            path,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn check(&self, code: c_int, call: &str) -> Result<(), CollectiveError> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let message = unsafe { CStr::from_ptr((self.get_error_string)(code)) };
        Err(CollectiveError::Nccl(format!(
            "{call} failed: {} (code {code})",
            message.to_string_lossy()
        )))
    }

    /// NCCL's version code (e.g. 22809 for 2.28.9).
    pub fn version(&self) -> Result<i32, CollectiveError> {
        let mut version: c_int = 0;
        // SAFETY: writes one int.
        let code = unsafe { (self.get_version)(&mut version) };
        self.check(code, "ncclGetVersion")?;
        Ok(version)
    }

    /// A new unique id (rank 0 makes it, the rendezvous hands it to the others).
    pub fn unique_id(&self) -> Result<UniqueId, CollectiveError> {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: writes one ncclUniqueId.
        let code = unsafe { (self.get_unique_id)(&mut id) };
        self.check(code, "ncclGetUniqueId")?;
        Ok(id)
    }
}

/// One rank's NCCL communicator, on the CUDA device current when it was created.
#[derive(Debug)]
pub struct NcclComm {
    library: Arc<NcclLibrary>,
    comm: Comm,
    rank: usize,
    world_size: usize,
    aborted: Arc<std::sync::atomic::AtomicBool>,
}

// SAFETY: a communicator may be used from any thread, one at a time (we own it exclusively).
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the group (blocks until every rank has called it). The CUDA device of this rank
    /// must be current on the calling thread.
    pub fn init(
        library: Arc<NcclLibrary>,
        id: &UniqueId,
        rank: usize,
        world_size: usize,
    ) -> Result<NcclComm, CollectiveError> {
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is passed by value.
        let code =
            unsafe { (library.comm_init_rank)(&mut comm, world_size as c_int, *id, rank as c_int) };
        library.check(code, "ncclCommInitRank")?;
        Ok(NcclComm {
            library,
            comm,
            rank,
            world_size,
            aborted: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Enqueues an in-place sum of `count` f32 values at device address `buffer`.
    ///
    /// # Safety
    /// `buffer` must point to `count` f32 values in device memory of this communicator's GPU,
    /// alive until `stream` (null: the default stream) has run the collective.
    pub unsafe fn all_reduce_sum_f32(
        &self,
        buffer: *mut c_void,
        count: usize,
        stream: *mut c_void,
    ) -> Result<(), CollectiveError> {
        let code = (self.library.all_reduce)(
            buffer,
            buffer,
            count,
            NCCL_FLOAT32,
            NCCL_SUM,
            self.comm,
            stream,
        );
        self.library.check(code, "ncclAllReduce")
    }

    /// Enqueues an in-place broadcast from `root` of `count` f32 values at `buffer`.
    ///
    /// # Safety
    /// As for [`NcclComm::all_reduce_sum_f32`].
    pub unsafe fn broadcast_f32(
        &self,
        buffer: *mut c_void,
        count: usize,
        root: usize,
        stream: *mut c_void,
    ) -> Result<(), CollectiveError> {
        let code = (self.library.broadcast)(
            buffer,
            buffer,
            count,
            NCCL_FLOAT32,
            root as c_int,
            self.comm,
            stream,
        );
        self.library.check(code, "ncclBroadcast")
    }

    /// A handle that can abort this communicator from another thread (a watchdog).
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            library: self.library.clone(),
            comm: self.comm as usize,
            aborted: self.aborted.clone(),
        }
    }

    /// Whether a watchdog aborted the communicator (it is unusable afterwards).
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Aborts a communicator from another thread: pending collectives stop and every later call
/// fails. Used when a rank is declared dead.
#[derive(Debug, Clone)]
pub struct AbortHandle {
    library: Arc<NcclLibrary>,
    comm: usize,
    aborted: Arc<std::sync::atomic::AtomicBool>,
}

impl AbortHandle {
    pub fn abort(&self) {
        if self.aborted.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // SAFETY: ncclCommAbort may be called from any thread while collectives are pending;
        // the owner skips ncclCommDestroy once `aborted` is set.
        unsafe { (self.library.comm_abort)(self.comm as Comm) };
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.comm.is_null() && !self.is_aborted() {
            // SAFETY: the communicator is valid and dropped once.
            unsafe { (self.library.comm_destroy)(self.comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_round_trips_through_bytes() {
        let bytes: Vec<u8> = (0..128).map(|i| i as u8).collect();
        let id = UniqueId::from_bytes(&bytes).expect("id");
        assert_eq!(id.to_bytes(), bytes);
        assert!(UniqueId::from_bytes(&bytes[..10]).is_err());
    }

    #[test]
    fn the_override_comes_first_among_candidates() {
        let candidates = candidates();
        assert!(candidates.contains(&"libnccl.so.2".to_string()));
    }
}
