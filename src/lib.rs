//! kunpay: a hardened payment daemon for a bank's third-party online-payment business.
//!
//! docs/ARCHITECTURE.md is the map; each module's header says what it owns and what it must
//! never do. Data flows one way: channel -> verify -> risk -> journal -> core -> respond/notify.

/// Every binary that links kunpay (kunpayd, kunpayctl, kunpay-coresim, kunpay-audit, tests and
/// benchmarks) allocates through mimalloc: measured on the risk decision path (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod audit;
pub mod channel;
pub mod config;
pub mod core;
pub mod crypto;
pub mod daemon;
pub mod db;
pub mod gateway;
pub mod ha;
pub mod logging;
pub mod notify;
pub mod ops;
pub mod payment;
pub mod risk;
pub mod server;
