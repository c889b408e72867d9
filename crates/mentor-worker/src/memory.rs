//! How freed memory goes back to the C allocator on the CPU.
//!
//! libtorch allocates every activation and gradient of a CPU training step with `malloc` and
//! frees it by the end of the step. glibc serves a block above its mmap threshold (which it
//! raises as such blocks are freed, to 32 MB at most) with pages fresh from the kernel, and
//! gives them back when the block is freed; a thread's own arena maps any block above 64 MB on
//! its own whatever the settings. The activations of a Meta Pseudo Labels step on Fashion-MNIST
//! (960 images of 28x28x32 floats, 96 MB each) were page-faulted in and zeroed again at every
//! step, a fifth of the step's time in the kernel. Served from the one main heap and kept there,
//! they are reused: about 30% more images a second in a worker's joint training, for some 30%
//! more peak memory (README, "Benchmarks").

/// What [`keep_freed_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreedMemory {
    /// Large blocks come from the heap and freed memory stays in it.
    Kept,
    /// `GLIBC_TUNABLES` sets the allocator's own `glibc.malloc.*` settings, or one of glibc's
    /// older `MALLOC_*` variables is set: they are left as they are.
    LeftToEnvironment,
    /// The C library refused the settings (not glibc, say).
    Refused,
}

/// glibc's older environment variables for the settings [`keep_freed_memory`] makes.
pub const MALLOC_VARIABLES: [&str; 5] = [
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
];

/// Whether `tunables` (a `GLIBC_TUNABLES` value) sets any of glibc's malloc settings.
pub fn sets_malloc_tunables(tunables: &str) -> bool {
    tunables
        .split(':')
        .any(|setting| setting.trim_start().starts_with("glibc.malloc."))
}

/// Makes glibc serve large blocks from its main heap and keep freed memory there for reuse
/// (one arena for every thread, no `mmap` per large block, no trimming of the heap below
/// 2 GB), unless `GLIBC_TUNABLES` or a `MALLOC_*` variable says how the allocator should
/// behave. For processes that
/// train on the CPU; call it before any thread starts (a thread that already has an arena of
/// its own keeps it).
pub fn keep_freed_memory() -> FreedMemory {
    let tunables =
        std::env::var("GLIBC_TUNABLES").is_ok_and(|tunables| sets_malloc_tunables(&tunables));
    if tunables
        || MALLOC_VARIABLES
            .iter()
            .any(|name| std::env::var_os(name).is_some())
    {
        return FreedMemory::LeftToEnvironment;
    }
    if set_malloc_options() {
        FreedMemory::Kept
    } else {
        FreedMemory::Refused
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_malloc_options() -> bool {
    // SAFETY: `mallopt` takes any parameter and value, returns 0 on refusal and is thread-safe
    // (glibc takes its arenas' locks); these two change only where later blocks come from and
    // when free memory is returned.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1) == 1
            && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    }
}

/// Page faults served without I/O so far in this process (`None` where `getrusage` fails):
/// each page of a block the allocator maps afresh costs one.
#[allow(unsafe_code)]
pub fn minor_faults() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` writes a `rusage` into the pointer it is given, a valid one here, and
    // touches nothing else; zeroed is a valid `rusage` whatever it leaves.
    let done = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
    // SAFETY: zero-initialised above, filled in by `getrusage` when it succeeded.
    done.then(|| unsafe { usage.assume_init() }.ru_minflt as u64)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_malloc_options() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malloc_tunables_are_told_from_others() {
        assert!(sets_malloc_tunables("glibc.malloc.mmap_max=0"));
        assert!(sets_malloc_tunables(
            "glibc.cpu.hwcaps=-AVX2:glibc.malloc.trim_threshold=1"
        ));
        assert!(!sets_malloc_tunables("glibc.cpu.hwcaps=-AVX2"));
        assert!(!sets_malloc_tunables(""));
    }
}
