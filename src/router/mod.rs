//! The routing decision: a pure function of the request's routing facts, the cloud's reachability, the
//! board's state and the configuration, tested case by case. The dispatcher carries it out.
//!
//! - [`complexity`]: the documented heuristic that scores a task.

pub mod complexity;

use std::time::Duration;

use crate::protocol::Route;

/// What bitnetd knows about the cloud right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudState {
    /// No cloud is configured (off, or no API key).
    Disabled,
    /// Configured, but not reachable now.
    Offline,
    /// Configured and reachable.
    Online,
}

/// Whether the prompt fits the local model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFit {
    Fits {
        prompt_tokens: usize,
    },
    TooLong {
        prompt_tokens: usize,
        context: usize,
    },
}

/// Measured local speed (moving averages).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalSpeed {
    pub ttft: Duration,
    pub tokens_per_s: f64,
}

impl LocalSpeed {
    /// Expected time to produce `tokens` tokens.
    pub fn estimate(&self, tokens: usize) -> Duration {
        let decode = tokens.saturating_sub(1) as f64 / self.tokens_per_s.max(1e-3);
        self.ttft + Duration::from_secs_f64(decode.min(1e6))
    }
}

/// The routing facts of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteRequest {
    pub route: Route,
    pub private: bool,
    pub defer: bool,
    pub fit: LocalFit,
    /// Tokens the request may generate.
    pub max_tokens: usize,
    /// Time left until its deadline.
    pub deadline: Option<Duration>,
    /// See [`complexity::score`].
    pub complexity: f32,
    /// Expert work: `task: "validate"`, or one of the plan's expert words.
    pub expert: bool,
    /// Its `context` is longer than `[router] long_context_chars`.
    pub long_context: bool,
}

/// The state of the board and the configuration that routing reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Situation {
    pub cloud: CloudState,
    /// The governor lets new local work in (not too hot, not short of memory).
    pub local_admits: bool,
    /// The board saves its battery: `auto` requests go to the cloud when it is online.
    pub prefer_cloud: bool,
    /// `None` before the first local request was measured.
    pub local_speed: Option<LocalSpeed>,
    pub complexity_threshold: f32,
    /// `auto` requests sent to the cloud fall back to local when it fails early.
    pub fallback_to_local: bool,
}

/// Why a route was chosen; the `route_reason` of the reply and a status counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// `private: true`.
    Private,
    /// `route: "local"` or `route: "cloud"`.
    Requested,
    /// The prompt does not fit the local context.
    TooLong,
    /// The local model cannot meet the deadline at its measured speed.
    Deadline,
    /// The governor does not admit local work now.
    BoardBusy,
    /// The board runs on a low battery and saves it.
    LowBattery,
    /// The request's context is longer than `[router] long_context_chars`.
    LongContext,
    /// Expert work (`task: "validate"`, or the plan's expert words).
    Expert,
    /// The complexity score reached the threshold.
    Complex,
    /// Nothing called for the cloud.
    Simple,
    /// The cloud would have been chosen but is offline (or off).
    CloudOffline,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Private => "private",
            Reason::Requested => "requested",
            Reason::TooLong => "too_long_for_local",
            Reason::Deadline => "deadline",
            Reason::BoardBusy => "board_busy",
            Reason::LowBattery => "low_battery",
            Reason::LongContext => "long_context",
            Reason::Expert => "expert",
            Reason::Complex => "complex",
            Reason::Simple => "simple",
            Reason::CloudOffline => "cloud_offline",
        }
    }
}

/// Why a request cannot run anywhere; [`crate::errors`] gives each its wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `route: "cloud"` with no cloud configured.
    NoCloud,
    /// `route: "cloud"` with the cloud unreachable and no `defer`.
    CloudOffline,
    /// The prompt does not fit the local context and the cloud cannot take it (`cloud` says why).
    TooLongForBoard {
        prompt_tokens: usize,
        context: usize,
        cloud: CloudState,
    },
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Local(Reason),
    /// `fallback`: on an early cloud failure, run it locally.
    Cloud {
        reason: Reason,
        fallback: bool,
    },
    /// Kept on disk, and sent to the cloud when it is back.
    Defer(Reason),
    Refuse(Refusal),
}

/// Decides where `req` runs. Rules, in order:
/// 1. `private` or `route: local`: local, always. A private request never reaches the network, not even as a
///    fallback or deferred.
/// 2. `route: cloud`: the cloud when online; else deferred if `defer` and a cloud is configured; else
///    `cloud_unavailable`. No local fallback: the client asked for the cloud.
/// 3. `route: auto`, with the cloud online: the cloud when the prompt does not fit locally, when the board
///    does not admit local work, when it saves a low battery, when the deadline is shorter than the local
///    estimate, when its context is long, when it is expert work, or when the complexity reaches the
///    threshold; else local. With the cloud offline, a request that would have gone there is
///    deferred if `defer`, and otherwise runs locally (a too-long prompt is refused `too_long`).
pub fn decide(req: &RouteRequest, s: &Situation) -> Decision {
    if req.private {
        return Decision::Local(Reason::Private);
    }
    match req.route {
        Route::Local => Decision::Local(Reason::Requested),
        Route::Cloud => match s.cloud {
            CloudState::Online => Decision::Cloud {
                reason: Reason::Requested,
                fallback: false,
            },
            CloudState::Offline if req.defer => Decision::Defer(Reason::Requested),
            CloudState::Offline => Decision::Refuse(Refusal::CloudOffline),
            CloudState::Disabled => Decision::Refuse(Refusal::NoCloud),
        },
        Route::Auto => auto(req, s),
    }
}

fn auto(req: &RouteRequest, s: &Situation) -> Decision {
    let wants_cloud = if let LocalFit::TooLong {
        prompt_tokens,
        context,
    } = req.fit
    {
        return match s.cloud {
            CloudState::Online => Decision::Cloud {
                reason: Reason::TooLong,
                fallback: false,
            },
            CloudState::Offline if req.defer => Decision::Defer(Reason::TooLong),
            cloud => Decision::Refuse(Refusal::TooLongForBoard {
                prompt_tokens,
                context,
                cloud,
            }),
        };
    } else if !s.local_admits {
        Some(Reason::BoardBusy)
    } else if s.prefer_cloud {
        Some(Reason::LowBattery)
    } else if req.deadline.is_some_and(|d| {
        s.local_speed
            .is_some_and(|sp| sp.estimate(req.max_tokens) > d)
    }) {
        Some(Reason::Deadline)
    } else if req.long_context {
        Some(Reason::LongContext)
    } else if req.expert {
        Some(Reason::Expert)
    } else if req.complexity >= s.complexity_threshold {
        Some(Reason::Complex)
    } else {
        None
    };
    match (wants_cloud, s.cloud) {
        (None, _) => Decision::Local(Reason::Simple),
        (Some(reason), CloudState::Online) => Decision::Cloud {
            reason,
            fallback: s.fallback_to_local,
        },
        (Some(reason), CloudState::Offline) if req.defer => Decision::Defer(reason),
        // Local anyway: the dispatcher applies the governor's refusal or the deadline's shortening.
        (Some(_), _) => Decision::Local(Reason::CloudOffline),
    }
}

#[cfg(test)]
mod tests;
