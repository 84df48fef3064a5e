//! What the C allocator does with freed memory. Two workloads want opposite things: inference
//! lets go of the f32 weights it quantized and should give them back to the system, while a
//! training step allocates and frees the same few GiB of activations and gradients every step
//! and should keep them.

/// Gives freed heap memory back to the system. glibc keeps freed blocks below its (adaptive)
/// mmap threshold for reuse, so without this the f32 weights a quantized model let go would
/// still count in its resident memory.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Keeps freed memory in the process for the next allocation, for training loops. By default
/// glibc serves blocks over its mmap threshold (at most 32 MiB) with fresh mappings and
/// unmaps them on free, and trims the heap's free top: every step then faults in and zeroes
/// its activations' pages again (118k page faults, about 460 MiB, per cross-entropy step of
/// the default model at 512 tokens; 1.9k with this). Peak memory is unchanged (the same
/// blocks are reused), but memory freed stays counted in the process until it exits.
pub fn keep_freed_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocation policy. No mapping per block; a trim threshold
    // of -1 turns trimming off (mallopt(3)).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}
