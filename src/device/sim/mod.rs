//! Simulated devices for tests, fuzzing and benchmarks (feature `sim`; never in the shipped
//! binary):
//!
//! * [`mem::MemDevice`]: a disk in memory with a volatile write cache (crash drops or tears
//!   unflushed writes), Linux's write-back error semantics, and optionally strict block sizes;
//! * [`shadow::ShadowDisk`]: the model of what such a disk may legally read as;
//! * [`fault::FaultDevice`]: seeded fault injection around any of them (errors, torn failed
//!   writes, latency, reordering, hangs, vanishing).

pub mod fault;
pub mod mem;
pub mod shadow;
