//! The routing facts of one request, gathered for [`router::decide`]: the cloud's state, the complexity
//! score, whether the prompt fits the board, the measured local speed, the deadline.

use std::time::Instant;

use super::Dispatcher;
use crate::engine::ValidatedRequest;
use crate::protocol::{Request, Route, Task};
use crate::router::{self, complexity, CloudState, Decision, LocalFit, RouteRequest, Situation};
use crate::tasks;

impl Dispatcher {
    /// Asks the router where `req` runs; `local` is its validation for the board, or the prompt and context
    /// lengths when it does not fit.
    pub(super) fn route(
        &self,
        req: &Request,
        local: &Result<ValidatedRequest, (usize, usize)>,
        max_tokens: usize,
        deadline: Option<Instant>,
    ) -> Decision {
        let cloud = self.opts.cloud.as_ref();
        let cloud_state = cloud.map_or(CloudState::Disabled, |c| c.link.state());
        let (threshold, fallback) = cloud.map_or((f32::INFINITY, false), |c| {
            (c.router.complexity_threshold, c.router.fallback_to_local)
        });
        let (score, expert) = match cloud {
            Some(c) if req.route == Route::Auto && !req.private => {
                let c2 = complexity::score(
                    &tasks::query_text(req),
                    &c.router.keywords,
                    c.router.long_prompt_chars,
                );
                log::debug!(id:% = req.id, score = c2.score, signals:? = c2.signals; "complexity");
                // The plan's reasoning task is complex work at least; its validation is expert work.
                let score = match req.task {
                    Some(Task::Reason) => c2.score.max(complexity::COMPLEX_FLOOR),
                    _ => c2.score,
                };
                (score, c2.expert || req.task == Some(Task::Validate))
            }
            _ => (0.0, false),
        };
        let long_context =
            cloud.is_some_and(|c| tasks::context_chars(req) > c.router.long_context_chars);
        let fit = match local {
            Ok(v) => LocalFit::Fits {
                prompt_tokens: v.prompt_ids().len(),
            },
            Err((prompt_tokens, context)) => LocalFit::TooLong {
                prompt_tokens: *prompt_tokens,
                context: *context,
            },
        };
        let now = Instant::now();
        let board = self.local.board();
        router::decide(
            &RouteRequest {
                route: req.route,
                private: req.private,
                defer: req.defer,
                fit,
                max_tokens,
                deadline: deadline.map(|d| d.saturating_duration_since(now)),
                complexity: score,
                expert,
                long_context,
            },
            &Situation {
                cloud: cloud_state,
                local_admits: board.is_none_or(|b| b.admit_local),
                prefer_cloud: board.is_some_and(|b| b.prefer_cloud),
                local_speed: self.ledger.local_speed(),
                complexity_threshold: threshold,
                fallback_to_local: fallback,
            },
        )
    }
}
