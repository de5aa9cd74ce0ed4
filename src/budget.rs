//! Memory accounting: the estimate of what a model needs before it is loaded, checked against the budget at
//! start, and the process's resident size for `status`.
//!
//! Weights count as resident, mapped or not: every decode step reads all of them. The embedding table is the
//! exception: the engine reads it a row per token from the file (`engine::weights`), so none of it is resident
//! (unless the output layer shares it). KV memory is what the cache allocates (whole pages, in the configured
//! format).

use std::path::Path;

use crate::engine::kv::{KvFormat, PAGE};
use crate::engine::OutputLayer;
use crate::meta::{ModelMeta, DATA_FILE, ONNX_FILE};

/// Allowance for the runtime beyond weights and KV cache: tokenizer, tract's plan and scratch, the daemon.
pub const RUNTIME_OVERHEAD_BYTES: u64 = 64 << 20;

/// What a model is expected to hold resident, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Weights read by every forward pass (the ONNX graph and its external data, less the embedding table).
    pub weights: u64,
    /// KV cache of one slot at full context.
    pub kv_per_slot: u64,
    pub slots: usize,
    pub overhead: u64,
    /// The KV cache format the estimate is for.
    pub kv: KvFormat,
}

impl MemoryEstimate {
    /// Estimates the resident size of the model in `dir` with `slots` sessions and a `kv` cache; a screened
    /// output layer counts as its high plane (half its int8 bytes: its rows are read from the file).
    pub fn for_model(
        dir: &Path,
        meta: &ModelMeta,
        slots: usize,
        kv: KvFormat,
        output_layer: OutputLayer,
    ) -> std::io::Result<MemoryEstimate> {
        let size = |f: &str| std::fs::metadata(dir.join(f)).map(|m| m.len());
        let data = match size(DATA_FILE) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let a = &meta.architecture;
        let facts = crate::onnx::inspect::graph_facts(&dir.join(ONNX_FILE))?;
        let in_file = facts.lookup_only_table
            + match output_layer {
                OutputLayer::Screened => facts.int8_output_layer / 2,
                OutputLayer::Exact => 0,
            };
        let positions = meta.context_length.div_ceil(PAGE) * PAGE;
        let kv_bytes = a.layers * positions * kv.position_bytes(a.kv_heads, a.head_dim);
        Ok(MemoryEstimate {
            weights: (size(ONNX_FILE)? + data).saturating_sub(in_file),
            kv_per_slot: kv_bytes as u64,
            slots,
            overhead: RUNTIME_OVERHEAD_BYTES,
            kv,
        })
    }

    pub fn total(&self) -> u64 {
        self.weights + self.kv_per_slot * self.slots as u64 + self.overhead
    }

    /// `Ok` when the estimate fits `budget`, else a sentence with the numbers and what to change.
    pub fn check(&self, budget: u64) -> Result<(), String> {
        if self.total() <= budget {
            return Ok(());
        }
        Err(format!(
            "the model needs about {} ({} weights + {} slot(s) x {} KV cache + {} runtime) but \
             the memory budget is {}: raise [budget] memory_bytes, use fewer [engine] slots{}, or use a smaller \
             model",
            mib(self.total()),
            mib(self.weights),
            self.slots,
            mib(self.kv_per_slot),
            mib(self.overhead),
            mib(budget),
            if self.kv == KvFormat::I8 {
                ""
            } else {
                ", use [model] kv_cache = \"i8\""
            }
        ))
    }
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
}

/// What the dispatcher needs to reserve KV memory per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvModel {
    /// Weights plus runtime overhead: resident whatever runs.
    pub base: u64,
    /// KV cache bytes per token of one sequence.
    pub per_token: u64,
    /// Sequences that run at once.
    pub slots: usize,
}

impl KvModel {
    pub fn for_estimate(e: &MemoryEstimate, context: usize) -> KvModel {
        KvModel {
            base: e.weights + e.overhead,
            per_token: e.kv_per_slot / context.max(1) as u64,
            slots: e.slots,
        }
    }

    /// Whether a request needing `new` bytes of KV cache fits `budget` next to the `reserved` ones: at most
    /// `slots` sequences run at once, so the worst case is the `slots` largest reservations. `Err` carries the
    /// bytes that would be needed.
    pub fn admits(&self, budget: u64, reserved: &[u64], new: u64) -> Result<(), u64> {
        let mut all: Vec<u64> = reserved.iter().copied().chain([new]).collect();
        all.sort_unstable_by(|a, b| b.cmp(a));
        let worst: u64 = all.iter().take(self.slots.max(1)).sum();
        let needed = self.base + worst;
        if needed <= budget {
            Ok(())
        } else {
            Err(needed)
        }
    }
}

/// The resident set size of this process (`None` where there is no procfs).
pub fn process_rss_bytes() -> Option<u64> {
    crate::governor::telemetry::Telemetry::new("/").rss_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_estimate_over_budget_says_what_to_change() {
        let e = MemoryEstimate {
            weights: 3 << 30,
            kv_per_slot: 600 << 20,
            slots: 2,
            overhead: RUNTIME_OVERHEAD_BYTES,
            kv: KvFormat::F16,
        };
        assert_eq!(e.total(), (3 << 30) + (1200 << 20) + (64 << 20));
        assert!(e.check(5 << 30).is_ok());
        let msg = e.check(4 << 30).unwrap_err();
        assert!(
            msg.contains("4336 MiB") && msg.contains("4096 MiB"),
            "{msg}"
        );
        assert!(
            msg.contains("memory_bytes")
                && msg.contains("slots")
                && msg.contains("kv_cache = \"i8\""),
            "{msg}"
        );
        let smallest = MemoryEstimate {
            kv: KvFormat::I8,
            ..e
        };
        let msg = smallest.check(4 << 30).unwrap_err();
        assert!(!msg.contains("kv_cache"), "already the smallest: {msg}");
    }

    #[test]
    fn kv_reservations_count_only_the_largest_that_can_run_at_once() {
        let m = KvModel {
            base: 100,
            per_token: 1,
            slots: 2,
        };
        assert_eq!(m.admits(300, &[], 200), Ok(()));
        assert_eq!(
            m.admits(300, &[150], 100),
            Err(350),
            "two slots: 150 + 100 run together"
        );
        assert_eq!(
            m.admits(300, &[10, 10, 10, 10], 150),
            Ok(()),
            "queued small ones do not add up"
        );
        assert_eq!(m.admits(300, &[], 201), Err(301), "never fits, even alone");
        let one = KvModel { slots: 1, ..m };
        assert_eq!(
            one.admits(300, &[200], 200),
            Ok(()),
            "one slot: they run one after the other"
        );
    }

    #[test]
    fn rss_is_read_on_linux() {
        let rss = process_rss_bytes().expect("procfs");
        assert!(rss > 1 << 20);
    }
}
