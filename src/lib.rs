//! superdisk: a block-device daemon that serves a virtual disk over NBD, reads from a local-SSD
//! mirror and writes through to a durable network disk. See docs/ARCHITECTURE.md.

pub mod config;
pub mod daemon;
pub mod device;
pub mod kernel;
pub mod meta;
pub mod mirror;
pub mod nbd;
pub mod server;
pub mod telemetry;
pub mod ublk;
pub mod volume;
