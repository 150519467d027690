//! Settings of the allocator the binaries use (mimalloc).
//!
//! mimalloc returns memory freed in whole pages to the operating system a second after it is
//! freed (its `purge_delay`; 10 ms in its older v2). The processor frees users in bulk (a
//! revoked partition's users, idle users evicted together) and then builds new ones, and
//! memory taken back from the OS costs a page fault and a zeroed page on its first write
//! again: 400 to 900 ns per event applied into it (`cargo bench --bench ingest`,
//! docs/PERFORMANCE.md). The processor keeps freed memory for [`PURGE_DELAY_MS`] instead, so
//! memory freed and reused within that time is not faulted in twice; what stays unused is
//! still returned after it. Resident memory never grows past its peak for it: freed memory is
//! reused before more is taken.

use std::ffi::c_long;

/// How long freed memory is kept before it is returned to the operating system, in ms.
pub const PURGE_DELAY_MS: c_long = 10_000;

/// The environment variable with which mimalloc reads its own setting; where it is set, it
/// wins.
pub const PURGE_DELAY_VAR: &str = "MIMALLOC_PURGE_DELAY";

/// `mi_option_purge_delay` in mimalloc's `mimalloc.h` (both the v2 and v3 sources vendored by
/// `libmimalloc-sys`), which its Rust bindings do not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`] unless [`PURGE_DELAY_VAR`] is set, and
/// returns the delay in force.
pub fn keep_freed_memory() -> c_long {
    if std::env::var_os(PURGE_DELAY_VAR).is_none() {
        // SAFETY: sets an integer option; mimalloc reads it when it next purges.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    purge_delay()
}

fn purge_delay() -> c_long {
    // SAFETY: reads an integer option.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_is_kept_for_the_delay_unless_the_environment_says_otherwise() {
        let before = purge_delay();
        match std::env::var(PURGE_DELAY_VAR) {
            // mimalloc's own default is shorter; the setting takes the option from it.
            Err(_) => {
                assert!(before < PURGE_DELAY_MS, "{before}");
                assert_eq!(keep_freed_memory(), PURGE_DELAY_MS);
                assert_eq!(purge_delay(), PURGE_DELAY_MS);
            }
            Ok(set) => assert_eq!(keep_freed_memory().to_string(), set),
        }
    }
}
