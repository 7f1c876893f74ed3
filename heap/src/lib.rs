//! Gives memory the C allocator holds free back to the operating system.
//!
//! glibc's malloc keeps what a thread frees in that thread's arena and only returns the top of
//! an arena, so after a burst of large requests a process stays resident near its peak long after
//! the memory is free. `malloc_trim(0)` walks every arena and returns free pages with `madvise`.
//! It locks each arena in turn, so call it from a quiet moment (the webhook does, after a second
//! with no request), never on a hot path.
//!
//! This crate holds one of the workspace's two `unsafe` calls (the other is in
//! `sidecar/src/tunnel/userspace.rs`): one call to a glibc function that has no preconditions. On other C libraries (musl, macOS) it does nothing.

/// Ask the allocator to return free memory to the OS; `true` when glibc says it returned some.
#[must_use]
pub fn release_free_memory() -> bool {
    imp::release()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    extern "C" {
        /// glibc: `int malloc_trim(size_t pad)`.
        fn malloc_trim(pad: usize) -> i32;
    }

    pub fn release() -> bool {
        // SAFETY: malloc_trim takes a plain integer, touches only the allocator's own state
        // under its arena locks, and is safe to call from any thread at any time.
        unsafe { malloc_trim(0) != 0 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn release() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Freed memory held in a thread's arena is returned: RSS drops after the trim.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_arena_memory_goes_back_to_the_os() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                .unwrap_or(0)
        }
        // Many small blocks in a thread arena, all but the last freed: the arena's top stays in
        // use, so glibc's automatic trimming cannot return the space below it.
        let keep = std::thread::spawn(|| {
            let mut blocks: Vec<Vec<u8>> = (0..20_000u32)
                .map(|i| vec![u8::try_from(i % 251).unwrap_or(0); 1000])
                .collect();
            let last = blocks.pop();
            drop(blocks);
            let before = rss_kib();
            let released = release_free_memory();
            let after = rss_kib();
            (before, after, released, last.map(|b| b.len()))
        })
        .join();
        let Ok((before, after, released, _)) = keep else {
            panic!("the allocating thread panicked");
        };
        assert!(released, "glibc reported nothing released");
        assert!(
            after + 8 * 1024 < before,
            "RSS went from {before} KiB to {after} KiB: expected at least 8 MiB back"
        );
    }
}
