//! The process allocator's settings for inference.
//!
//! glibc's malloc raises its mmap threshold each time a large block is freed, up to 32 MiB. A prompt step's
//! activations are blocks of a few MiB, so after the first one they come from the heap instead of their own
//! mappings, and the heap keeps what fragmentation leaves behind: on the 2B-4T shape a 1500-token prompt then
//! held about 300 MiB more than its KV cache until its session ended (measured with `benches/decode.rs`). A fixed
//! threshold keeps every block above it in a mapping of its own that goes back to the system when freed; it costs
//! a mapping and its page faults per large block (a prompt step's few dozen), nothing per decode step, whose
//! tensors are small.

/// Blocks from this size up get their own mapping (glibc's initial threshold, now fixed).
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
pub const MMAP_THRESHOLD: usize = 128 << 10;

/// Applies the settings once per process (glibc only; other C libraries keep their own behaviour).
pub fn tune() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: `mallopt` only changes the allocator's parameters; any value is valid for this one.
        unsafe {
            if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 0 {
                log::debug!("mallopt(M_MMAP_THRESHOLD) was refused");
            }
        }
    });
}
