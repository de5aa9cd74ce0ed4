//! The resource governor (issue 7, in progress): [`telemetry`] reads the board's health under a configurable
//! root; [`policy`] is the pure state machine that turns readings into a [`policy::Directive`]. The loop that
//! samples, logs transitions and feeds the scheduler and router through a `watch` channel comes next.

pub mod policy;
pub mod telemetry;
