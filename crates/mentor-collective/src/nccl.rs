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

use crate::{nccl_error, CollectiveError};

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
    /// NCCL, loaded from the first candidate that opens, once per process: it stays loaded,
    /// since `ncclGetUniqueId` starts a bootstrap thread inside the library that outlives the
    /// call (unloading a copy libtorch did not load would unmap that thread's code).
    pub fn load() -> Result<Arc<NcclLibrary>, CollectiveError> {
        static LIBRARY: std::sync::OnceLock<Result<Arc<NcclLibrary>, String>> =
            std::sync::OnceLock::new();
        LIBRARY
            .get_or_init(|| {
                Self::open().map_err(|error| match error {
                    CollectiveError::Nccl(message) => message,
                    other => other.to_string(),
                })
            })
            .clone()
            .map_err(CollectiveError::Nccl)
    }

    fn open() -> Result<Arc<NcclLibrary>, CollectiveError> {
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
        let message = format!("{call} failed: {} (code {code})", message.to_string_lossy());
        Err(nccl_error(code, message))
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

/// Where a communicator is in its life. Its owner and its abort handles share it under a lock,
/// so that the communicator is freed once (by an abort or by the owner's drop, whichever comes
/// first) and never used after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Live,
    Aborted,
    Destroyed,
}

#[derive(Debug)]
struct Shared {
    comm: usize,
    life: std::sync::Mutex<Life>,
}

impl Shared {
    fn life(&self) -> std::sync::MutexGuard<'_, Life> {
        self.life
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One rank's NCCL communicator, on the CUDA device current when it was created.
#[derive(Debug)]
pub struct NcclComm {
    library: Arc<NcclLibrary>,
    comm: Comm,
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
    /// A collective was enqueued since the owner last saw the device finish
    /// ([`NcclComm::mark_finished`]): dropping it then aborts rather than waits.
    pending: std::sync::atomic::AtomicBool,
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
            shared: Arc::new(Shared {
                comm: comm as usize,
                life: std::sync::Mutex::new(Life::Live),
            }),
            pending: std::sync::atomic::AtomicBool::new(false),
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
        // Held through the call: an abort waits for the enqueue, and no enqueue follows one.
        let life = self.live("ncclAllReduce")?;
        self.pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let code = (self.library.all_reduce)(
            buffer,
            buffer,
            count,
            NCCL_FLOAT32,
            NCCL_SUM,
            self.comm,
            stream,
        );
        drop(life);
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
        if root >= self.world_size {
            return Err(CollectiveError::Nccl(format!(
                "ncclBroadcast from rank {root} in a group of {}",
                self.world_size
            )));
        }
        let life = self.live("ncclBroadcast")?;
        self.pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let code = (self.library.broadcast)(
            buffer,
            buffer,
            count,
            NCCL_FLOAT32,
            root as c_int,
            self.comm,
            stream,
        );
        drop(life);
        self.library.check(code, "ncclBroadcast")
    }

    /// The lock on the communicator's life, if it is live; `call` names the refused call.
    fn live(&self, call: &str) -> Result<std::sync::MutexGuard<'_, Life>, CollectiveError> {
        let life = self.shared.life();
        if *life != Life::Live {
            return Err(CollectiveError::Nccl(format!(
                "{call} on a communicator that was aborted"
            )));
        }
        Ok(life)
    }

    /// Says that the device has run every collective enqueued so far.
    pub fn mark_finished(&self) {
        self.pending
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// A handle that can abort this communicator from another thread (a watchdog).
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            library: self.library.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Whether a watchdog aborted the communicator (it is unusable afterwards).
    pub fn is_aborted(&self) -> bool {
        *self.shared.life() == Life::Aborted
    }
}

/// Aborts a communicator from another thread: pending collectives stop and every later call
/// fails. Used when a rank is declared dead.
#[derive(Debug, Clone)]
pub struct AbortHandle {
    library: Arc<NcclLibrary>,
    shared: Arc<Shared>,
}

impl AbortHandle {
    /// Aborts the communicator unless it was aborted or destroyed already (a handle may
    /// outlive its communicator).
    pub fn abort(&self) {
        let mut life = self.shared.life();
        if *life != Life::Live {
            return;
        }
        *life = Life::Aborted;
        // SAFETY: the communicator is live (its owner destroys it only under this lock, after
        // marking it so) and no call of the owner is in flight (they hold the lock); it is
        // freed here once.
        unsafe { (self.library.comm_abort)(self.shared.comm as Comm) };
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let mut life = self.shared.life();
        if *life != Life::Live {
            return;
        }
        *life = Life::Destroyed;
        drop(life);
        // A collective the device may not have run (a peer died, this rank failed between
        // enqueue and wait): ncclCommDestroy would wait for it, for ever if the peer is gone.
        if self.pending.load(std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: live until now, marked destroyed: no handle frees it after this.
            unsafe { (self.library.comm_abort)(self.comm) };
        } else {
            // SAFETY: as above, and nothing is pending.
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
