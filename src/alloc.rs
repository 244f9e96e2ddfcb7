//! The process allocator of the `burnish` binary and the benchmarks: mimalloc, told to keep the
//! memory it frees.
//!
//! A training step allocates and frees the same tensors, tens of megabytes each, every step.
//! glibc returns each one above its mmap threshold to the OS, and mimalloc by default purges
//! freed memory after 10 ms; either way the next step page-faults the buffers in again and the
//! kernel zeroes them, which was a third of a CPU step on the ~17M benchmark. Like PyTorch's
//! caching allocators, we keep what we freed: the resident size stays at the peak of the
//! largest stage, and is reused by every later step and stage.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (`mimalloc.h`); libmimalloc-sys only
/// names the options that kept their numbers since mimalloc 1.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never purge freed memory back to the OS (call first thing in `main`).
pub fn keep_freed_memory() {
    // SAFETY: sets a process-wide option; mimalloc reads it at every purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
