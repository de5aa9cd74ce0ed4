//! One attempt of a streamed chat completion: the request, the status and error body, then the SSE stream
//! (`data:` chunks until `data: [DONE]`) under the first-byte, stall and overall limits, relaying text as it
//! comes.

use std::time::{Instant, SystemTime};

use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::timeout_at;

use super::{read_capped, transport_error, Attempt, CloudAnswer, KimiClient, Piece};
use crate::cloud::wire::{self, StreamItem};
use crate::cloud::{Cause, CloudError};

impl KimiClient {
    pub(super) async fn attempt(
        &self,
        body: &[u8],
        model: &str,
        limit: (Instant, bool),
        tokens: &UnboundedSender<Piece>,
        started: Instant,
    ) -> Attempt {
        let failed = |error| Attempt::Failed {
            error,
            relayed: false,
        };
        let first_byte = (Instant::now() + self.cfg.first_byte_timeout).min(limit.0);
        let send = self
            .http
            .post(&self.url)
            .bearer_auth(self.key.expose())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send();
        let resp = match timeout_at(first_byte.into(), send).await {
            Err(_) => return failed(self.no_bytes(first_byte, limit, "an answer")),
            Ok(Err(e)) => return failed(transport_error(&e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| wire::parse_retry_after(v, SystemTime::now()));
            let body =
                read_capped(resp, (Instant::now() + self.cfg.stall_timeout).min(limit.0)).await;
            return failed(wire::http_error(status.as_u16(), &body, retry_after));
        }
        let mut events = resp.bytes_stream().eventsource();
        // Passes a piece on (the first one sets the time to first token); false when the requester went away.
        let relay = |p: Piece, ttft: &mut Option<std::time::Duration>| {
            ttft.get_or_insert_with(|| started.elapsed());
            tokens.send(p).is_ok()
        };
        let gone = || Attempt::Failed {
            error: CloudError::new(Cause::Cancelled, "the requester went away"),
            relayed: true,
        };
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut ttft = None;
        let mut usage = None;
        let mut finish: Option<String> = None;
        loop {
            let idle = if ttft.is_some() {
                self.cfg.stall_timeout
            } else {
                self.cfg.first_byte_timeout
            };
            let until = (Instant::now() + idle).min(limit.0);
            let relayed = !text.is_empty() || !reasoning.is_empty();
            let ev = match timeout_at(until.into(), events.next()).await {
                Err(_) => {
                    return Attempt::Failed {
                        error: self.no_bytes(until, limit, "stream data"),
                        relayed,
                    }
                }
                Ok(None) => {
                    return match finish {
                        // Some servers close right after the finish chunk; the answer is whole.
                        Some(reason) => Attempt::Done(CloudAnswer {
                            text,
                            reasoning,
                            model: model.to_string(),
                            finish_reason: reason,
                            usage,
                            cached: false,
                            attempts: 0,
                            ttft,
                        }),
                        None => Attempt::Failed {
                            error: CloudError::new(
                                Cause::Cut,
                                "the stream ended before its end marker",
                            ),
                            relayed,
                        },
                    };
                }
                Ok(Some(Err(e))) => {
                    let error = match e {
                        EventStreamError::Transport(e) => CloudError::new(
                            Cause::Cut,
                            format!("the stream broke: {}", transport_error(&e).message),
                        ),
                        other => {
                            CloudError::new(Cause::Protocol, format!("unreadable stream: {other}"))
                        }
                    };
                    return Attempt::Failed { error, relayed };
                }
                Ok(Some(Ok(ev))) => ev,
            };
            let items = match wire::parse_event(&ev.data) {
                Ok(i) => i,
                Err(error) => return Attempt::Failed { error, relayed },
            };
            for item in items {
                match item {
                    StreamItem::Text(t) | StreamItem::Reasoning(t) if t.is_empty() => {}
                    StreamItem::Text(t) => {
                        text.push_str(&t);
                        if !relay(Piece::Text(t), &mut ttft) {
                            return gone();
                        }
                    }
                    StreamItem::Reasoning(t) => {
                        reasoning.push_str(&t);
                        if !relay(Piece::Reasoning(t), &mut ttft) {
                            return gone();
                        }
                    }
                    StreamItem::Finish { reason, usage: u } => {
                        finish = Some(reason);
                        usage = u.or(usage);
                    }
                    StreamItem::Usage(u) => usage = Some(u),
                    StreamItem::Done => {
                        return Attempt::Done(CloudAnswer {
                            text,
                            reasoning,
                            model: model.to_string(),
                            finish_reason: finish.unwrap_or_else(|| "stop".into()),
                            usage,
                            cached: false,
                            attempts: 0,
                            ttft,
                        })
                    }
                }
            }
        }
    }

    fn no_bytes(&self, at: Instant, limit: (Instant, bool), what: &str) -> CloudError {
        if at >= limit.0 {
            self.timed_out(limit, what)
        } else {
            CloudError::new(
                Cause::Timeout,
                format!("no {what} from the cloud in time (stalled)"),
            )
        }
    }
}
