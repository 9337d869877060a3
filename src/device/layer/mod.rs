//! Wrappers around a [`super::BlockDevice`], each a `BlockDevice` itself, each one job. Every layer
//! forwards every capability it does not change (`write_shared`, `identity`, `drop_cached`,
//! `zero_copy_source`): dropping one silently changes the path production takes, which the
//! conformance suite (`device::conformance`) catches.

pub mod backing_guard;
pub mod cache_time_limit;
pub mod injected_stall;
pub mod instrumented;
pub mod striped;
