//! Whether a request the router sent to the board may run now, as a pure function: the governor's view (too
//! hot, short of memory, what to do with work while hot), the deadline against the measured local speed, and
//! the request's KV cache against the memory budget next to the work in flight. The dispatcher gathers the facts
//! (under the lock that guards the reservations) and carries out the result.

use std::time::Duration;

use crate::budget::KvModel;
use crate::config::HotAction;
use crate::governor::Budget;
use crate::protocol::OnDeadline;
use crate::router::LocalSpeed;

/// The governor's current view, as admission reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Board {
    /// New local work may start (not too hot, not short of memory).
    pub admit_local: bool,
    /// Local inference is paused because the board is too hot.
    pub local_paused: bool,
    pub memory_pressure: bool,
    /// The battery is critical: no local work until it charges.
    pub battery_critical: bool,
    /// The battery is low: `auto` requests prefer the cloud (read by the router, not by admission).
    pub prefer_cloud: bool,
    /// The battery's charge (percent), when on battery.
    pub battery_percent: Option<f32>,
    pub temperature_c: Option<f32>,
    /// The governor's hint for refused work.
    pub retry_after_ms: Option<u64>,
    /// The memory budget now (a cgroup limit may have lowered the configured one).
    pub memory_budget: u64,
}

impl From<&Budget> for Board {
    fn from(b: &Budget) -> Board {
        Board {
            admit_local: b.directive.admit_local,
            local_paused: b.directive.local_paused,
            memory_pressure: b.state.memory_pressure,
            battery_critical: b.directive.battery_critical,
            prefer_cloud: b.directive.prefer_cloud,
            battery_percent: b
                .power
                .battery_percent
                .filter(|_| b.power.on_battery == Some(true)),
            temperature_c: b.temperature_c,
            retry_after_ms: b.directive.retry_after_ms,
            memory_budget: b.state.memory_budget,
        }
    }
}

/// What one local run asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalAsk {
    pub prompt_tokens: usize,
    /// Most tokens to generate (already clipped to the context).
    pub max_new_tokens: usize,
    /// Time left until the deadline; `None`: no deadline applies.
    pub time_left: Option<Duration>,
    pub on_deadline: OnDeadline,
}

/// The limits and state admission reads besides the request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits<'a> {
    /// `None`: ungoverned (the engine alone, in tests).
    pub board: Option<Board>,
    pub hot_action: HotAction,
    /// Measured local speed; `None` before the first local request.
    pub speed: Option<LocalSpeed>,
    /// How much KV cache a request needs; `None` reserves nothing.
    pub kv: Option<KvModel>,
    /// The configured memory budget, used when ungoverned.
    pub memory_budget: u64,
    /// KV bytes reserved by the local work in flight.
    pub reserved: &'a [u64],
}

/// A local run that may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// `max_new_tokens` after deadline fitting.
    pub max_new_tokens: usize,
    /// True when the deadline lowered it (the run then ends with `finish_reason: "budget"`).
    pub shortened: bool,
    /// KV bytes to reserve until the run ends.
    pub kv_bytes: u64,
}

/// Why a local run may not start; [`crate::errors`] gives each its wire code.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// The board is too hot and work is not held while hot.
    TooHot {
        temperature_c: Option<f32>,
        retry_after_ms: Option<u64>,
    },
    ShortOfMemory {
        retry_after_ms: Option<u64>,
    },
    /// The board runs on a critical battery.
    BatteryCritical {
        battery_percent: Option<f32>,
        retry_after_ms: Option<u64>,
    },
    /// `on_deadline: "refuse"` and `tokens` need `needed` at the measured speed, more than the `left`.
    DeadlineTooShort {
        tokens: usize,
        needed: Duration,
        speed: LocalSpeed,
        left: Duration,
    },
    /// `tokens` need `bytes` of KV cache; with the work in flight that makes `needed` of `budget`.
    /// `retryable`: it would fit on an idle board.
    KvOverBudget {
        tokens: usize,
        bytes: u64,
        needed: u64,
        budget: u64,
        retryable: bool,
    },
}

/// Decides whether `ask` may run. Rules, in order:
/// 1. The governor: work starts when it admits local work. While the board is hot (paused) but not short of
///    memory nor on a critical battery, `hot_action = "queue"` admits it too (the paused engine holds it until it
///    cools); otherwise it is refused, too hot, on a critical battery or short of memory, with the governor's
///    retry hint.
/// 2. The deadline: with a deadline and a measured speed, `max_new_tokens` that cannot be generated in the time
///    left are shortened to what fits (at least one token), or refused with `on_deadline: "refuse"`.
/// 3. Memory: the KV cache of prompt + (possibly shortened) generation must fit the memory budget (the
///    governor's, else the configured one) next to the reservations in flight; worth retrying only if it
///    would fit on an idle board.
pub fn admit(ask: &LocalAsk, l: &Limits) -> Result<Admitted, Refusal> {
    if let Some(b) = &l.board {
        let held_while_hot = b.local_paused
            && !b.memory_pressure
            && !b.battery_critical
            && l.hot_action == HotAction::Queue;
        if !b.admit_local && !held_while_hot {
            return Err(if b.local_paused {
                Refusal::TooHot {
                    temperature_c: b.temperature_c,
                    retry_after_ms: b.retry_after_ms,
                }
            } else if b.battery_critical {
                Refusal::BatteryCritical {
                    battery_percent: b.battery_percent,
                    retry_after_ms: b.retry_after_ms,
                }
            } else {
                Refusal::ShortOfMemory {
                    retry_after_ms: b.retry_after_ms,
                }
            });
        }
    }
    let max_new_tokens = fit_deadline(ask, l.speed)?;
    let kv_bytes = match l.kv {
        None => 0,
        Some(kv) => {
            let tokens = ask.prompt_tokens + max_new_tokens;
            let bytes = kv.per_token * tokens as u64;
            let budget = l.board.map_or(l.memory_budget, |b| b.memory_budget);
            if let Err(needed) = kv.admits(budget, l.reserved, bytes) {
                return Err(Refusal::KvOverBudget {
                    tokens,
                    bytes,
                    needed,
                    budget,
                    retryable: kv.admits(budget, &[], bytes).is_ok(),
                });
            }
            bytes
        }
    };
    Ok(Admitted {
        max_new_tokens,
        shortened: max_new_tokens < ask.max_new_tokens,
        kv_bytes,
    })
}

fn fit_deadline(ask: &LocalAsk, speed: Option<LocalSpeed>) -> Result<usize, Refusal> {
    let (Some(left), Some(speed)) = (ask.time_left, speed) else {
        return Ok(ask.max_new_tokens);
    };
    let needed = speed.estimate(ask.max_new_tokens);
    if needed <= left {
        return Ok(ask.max_new_tokens);
    }
    match ask.on_deadline {
        OnDeadline::Refuse => Err(Refusal::DeadlineTooShort {
            tokens: ask.max_new_tokens,
            needed,
            speed,
            left,
        }),
        OnDeadline::Shorten => {
            let decode = left.saturating_sub(speed.ttft).as_secs_f64() * speed.tokens_per_s;
            let fits = 1 + decode.floor() as usize;
            Ok(ask.max_new_tokens.min(fits))
        }
    }
}

#[cfg(test)]
mod tests;
