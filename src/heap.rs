//! The process heap: how glibc's allocator is told to give memory back to the system.
//!
//! A long-running daemon allocates large buffers for a moment (a 29 MB message, a
//! manifest, an image, ONNX Runtime's working set) and must not keep the pages after.
//! glibc serves allocations above its mmap threshold with their own mappings (returned on
//! free), but raises that threshold each time such a block is freed, up to 32 MiB; after
//! one large message, later ones come from the heap and stay resident when freed. Round
//! after round of large calls then left the daemon hundreds of megabytes larger.
//!
//! So the daemon fixes the threshold at start ([`tune`]), and hands back free pages after
//! the largest transient work ([`give_back`]). Both do nothing outside glibc.

/// Allocations of at least this many bytes get their own mapping, returned on free.
pub const MMAP_THRESHOLD: i32 = 1 << 20;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] (which also stops it from moving),
/// for the whole process. Call once, early. Returns whether the allocator took it.
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; M_MMAP_THRESHOLD with a value
        // within glibc's bounds (at most 32 MiB on 64-bit) is always accepted.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Hands the heap's free pages back to the system. Blocking (it walks every arena): call
/// it off the async threads, after large transient work.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the system; it does not touch
    // memory in use, and glibc makes it safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_threshold() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        assert!(super::tune());
        super::give_back();
    }
}
