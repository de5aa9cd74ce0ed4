//! The resource governor: [`telemetry`] reads the board's health under a configurable root; [`policy`] is the
//! pure state machine that turns readings into a [`policy::Directive`]; [`service`] samples, logs transitions and
//! publishes a [`Budget`] on a `watch` channel for the dispatcher and the status outputs.

pub mod policy;
mod service;
pub mod telemetry;

pub use service::{spawn, Budget};
