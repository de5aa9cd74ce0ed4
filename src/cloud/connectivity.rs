//! Whether the cloud is reachable. [`Link`] is the pure rule over probe results and the client's own signals;
//! [`Connectivity`] shares it, publishes changes on a `watch` channel (the router and the forwarder read it)
//! and runs the probe loop. Offline is a normal state, logged once per change.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::client::KimiClient;
use super::Cause;
use crate::backoff::backoff;
use crate::protocol::status::LinkStatus;
use crate::router::CloudState;

/// Outage failures of requests in a row that count as offline (before the breaker would open).
const FAILURES_OFFLINE: u32 = 2;
/// First probe interval while offline; it doubles up to the configured interval.
const OFFLINE_PROBE_MIN: Duration = Duration::from_secs(2);

/// The pure connectivity rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub state: CloudState,
    failures: u32,
    /// Why the link is in its state, for logs and status.
    pub reason: String,
}

impl Link {
    /// Before the first probe the cloud counts as offline: nothing is sent on a guess.
    pub fn new() -> Link {
        Link {
            state: CloudState::Offline,
            failures: 0,
            reason: "not probed yet".into(),
        }
    }

    /// A probe answered (any HTTP answer) or failed to.
    pub fn on_probe(&mut self, reachable: Result<(), &str>) {
        match reachable {
            Ok(()) => self.set_online("probe answered"),
            Err(why) => self.set_offline(format!("probe failed: {why}")),
        }
    }

    /// The probe answered, but the account offers no model the configuration accepts (`why`): the cloud
    /// counts as offline until a probe finds one, so nothing is sent to a model that does not exist.
    pub fn on_model_missing(&mut self, why: &str) {
        self.set_offline(why.to_string());
    }

    /// A cloud request completed, or failed for a reason that is not an outage.
    pub fn on_request_ok(&mut self) {
        self.set_online("a request succeeded");
    }

    /// A cloud request failed with an outage.
    pub fn on_request_outage(&mut self) {
        self.failures += 1;
        if self.failures >= FAILURES_OFFLINE {
            self.set_offline(format!("{} cloud requests failed in a row", self.failures));
        }
    }

    /// The breaker opened.
    pub fn on_circuit_open(&mut self) {
        self.set_offline("the circuit breaker opened".into());
    }

    fn set_online(&mut self, why: &str) {
        self.failures = 0;
        self.state = CloudState::Online;
        self.reason = why.into();
    }

    fn set_offline(&mut self, why: String) {
        self.state = CloudState::Offline;
        self.reason = why;
    }
}

impl Default for Link {
    fn default() -> Self {
        Link::new()
    }
}

/// See the module documentation.
pub struct Connectivity {
    link: Mutex<(Link, Instant)>,
    /// Whether the last model list had a model for the configuration, and the problem when not.
    model_listed: Mutex<Option<Result<(), String>>>,
    tx: watch::Sender<CloudState>,
    probe_now: Notify,
}

impl Connectivity {
    pub fn new() -> Connectivity {
        Connectivity {
            link: Mutex::new((Link::new(), Instant::now())),
            model_listed: Mutex::new(None),
            tx: watch::Sender::new(CloudState::Offline),
            probe_now: Notify::new(),
        }
    }

    /// The current state; changes arrive on [`Connectivity::subscribe`].
    pub fn state(&self) -> CloudState {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<CloudState> {
        self.tx.subscribe()
    }

    pub fn status(&self) -> LinkStatus {
        let listed = self.model_listed.lock().unwrap().clone();
        let (link, since) = &*self.link.lock().unwrap();
        LinkStatus {
            state: match link.state {
                CloudState::Online => "online",
                _ => "offline",
            }
            .into(),
            reason: link.reason.clone(),
            since_s: (since.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            model_listed: listed.as_ref().map(Result::is_ok),
            model_problem: listed.and_then(Result::err),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Link)) {
        let mut g = self.link.lock().unwrap();
        let before = g.0.state;
        f(&mut g.0);
        if g.0.state != before {
            g.1 = Instant::now();
            match g.0.state {
                CloudState::Online => log::info!(reason = g.0.reason.as_str(); "cloud online"),
                _ => log::warn!(reason = g.0.reason.as_str(); "cloud offline"),
            }
            self.tx.send_replace(g.0.state);
        }
    }

    pub(crate) fn request_succeeded(&self) {
        self.update(Link::on_request_ok);
    }

    /// An outage-type failure: counts, and asks the probe loop for a fresh look.
    pub(crate) fn request_failed(&self) {
        self.update(Link::on_request_outage);
        self.probe_now.notify_one();
    }

    pub(crate) fn circuit_opened(&self) {
        self.update(Link::on_circuit_open);
    }

    /// Probes `GET /models` now and then (every `every` while online; from 2 s doubling up to `every` while
    /// offline) until `stop`, and applies each model list to the client (`[cloud] model`): when the account
    /// offers no model the configuration accepts, the link stays offline with that reason, logged as an error
    /// once per change.
    pub async fn run_probes(
        &self,
        client: &KimiClient,
        every: Duration,
        probe_timeout: Duration,
        stop: CancellationToken,
    ) {
        let mut offline_round = 0u32;
        loop {
            let result = client.list_models(probe_timeout).await;
            let reachable = match &result {
                Ok(_) => Ok(()),
                // An HTTP error answer still proves the way to the cloud works.
                Err(e) if !matches!(e.cause, Cause::Connect | Cause::Timeout | Cause::Cut) => {
                    if matches!(e.cause, Cause::Unauthorized | Cause::Forbidden) {
                        log::error!(cause = e.cause.as_str(); "cloud probe: {}", e.message);
                    }
                    Ok(())
                }
                Err(e) => Err(e.message.as_str()),
            };
            let problem = result
                .as_ref()
                .ok()
                .and_then(|models| client.apply_listing(models).problem(models));
            if result.is_ok() {
                let now = problem.clone().map_or(Ok(()), Err);
                let changed = self.model_listed.lock().unwrap().replace(now.clone()) != Some(now);
                if let (Some(why), true) = (&problem, changed) {
                    log::error!("{why}; the cloud route stays off until the account lists it");
                }
            }
            match problem {
                Some(why) => self.update(|l| l.on_model_missing(&why)),
                None => self.update(|l| l.on_probe(reachable)),
            }
            let wait = if self.state() == CloudState::Online {
                offline_round = 0;
                every
            } else {
                offline_round += 1;
                backoff(offline_round - 1, OFFLINE_PROBE_MIN.min(every), every, 1.0)
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.probe_now.notified() => {}
            }
        }
    }
}

impl Default for Connectivity {
    fn default() -> Self {
        Connectivity::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_until_the_first_probe_answers() {
        let mut l = Link::new();
        assert_eq!(l.state, CloudState::Offline);
        l.on_probe(Ok(()));
        assert_eq!(l.state, CloudState::Online);
    }

    #[test]
    fn a_failed_probe_goes_offline_at_once() {
        let mut l = Link::new();
        l.on_probe(Ok(()));
        l.on_probe(Err("connection refused"));
        assert_eq!(l.state, CloudState::Offline);
        assert!(l.reason.contains("connection refused"));
    }

    #[test]
    fn one_failed_request_is_not_an_outage_two_are() {
        let mut l = Link::new();
        l.on_probe(Ok(()));
        l.on_request_outage();
        assert_eq!(l.state, CloudState::Online);
        l.on_request_outage();
        assert_eq!(l.state, CloudState::Offline);
    }

    #[test]
    fn a_success_resets_the_failures_and_brings_it_back() {
        let mut l = Link::new();
        l.on_request_outage();
        l.on_request_ok();
        l.on_request_outage();
        assert_eq!(l.state, CloudState::Online);
    }

    #[test]
    fn a_model_the_account_does_not_offer_keeps_the_cloud_off() {
        let mut l = Link::new();
        l.on_probe(Ok(()));
        l.on_model_missing("[cloud] model \"x\" is not offered by this account");
        assert_eq!(l.state, CloudState::Offline);
        assert!(l.reason.contains("not offered"));
    }

    #[test]
    fn an_open_breaker_is_offline() {
        let mut l = Link::new();
        l.on_probe(Ok(()));
        l.on_circuit_open();
        assert_eq!(l.state, CloudState::Offline);
    }
}
