//! The resource governor: [`telemetry`] reads the board's health under a configurable root (its power through
//! [`supply`], system-wide figures through `sysinfo` in [`system`]); [`policy`] is the pure state machine that
//! turns readings into a [`policy::Directive`], with the battery and power rules in [`power`]; [`service`]
//! samples, logs transitions and publishes a [`Budget`] on a `watch` channel for the dispatcher and the status
//! outputs.

pub mod policy;
pub mod power;
mod service;
pub mod supply;
pub mod system;
pub mod telemetry;

pub use service::{spawn, Budget};
