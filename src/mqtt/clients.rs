//! Per-client request rates for MQTT, pure (the clock is passed in): each client has a token bucket of
//! `[mqtt] client_requests_per_minute`, so that one device cannot fill the daemon's queue for the whole fleet.
//! A client is told apart by what its requests carry: the MQTT 5 user property `client_id`, else the reply
//! topic (subscribers never see the publisher's MQTT client id).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::cloud::limiter::RateLimiter;

/// Clients remembered at most; beyond it, those whose bucket is full again (idle) are forgotten first.
const MAX_CLIENTS: usize = 4096;

/// See the module documentation.
#[derive(Debug)]
pub struct ClientRates {
    per_minute: u32,
    buckets: HashMap<String, RateLimiter>,
}

impl ClientRates {
    pub fn new(per_minute: u32) -> ClientRates {
        ClientRates {
            per_minute,
            buckets: HashMap::new(),
        }
    }

    /// Takes one request of `client` at `now`, or says how long until it may send the next.
    pub fn check(&mut self, client: &str, now: Instant) -> Result<(), Duration> {
        if !self.buckets.contains_key(client) && self.buckets.len() >= MAX_CLIENTS {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= MAX_CLIENTS {
                // Every remembered client is busy: a newcomer starts a fresh bucket in place of them all,
                // which can only let more through, never refuse a client that has not sent.
                self.buckets.clear();
            }
        }
        let per_minute = self.per_minute;
        self.buckets
            .entry(client.to_string())
            .or_insert_with(|| RateLimiter::new(per_minute, now))
            .try_take(now)
    }

    /// Clients remembered now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Who sent a request: its `client_id` user property, else its reply topic.
pub fn client_of(user_properties: &[(String, String)], reply_topic: &str) -> String {
    match user_properties.iter().find(|(k, _)| k == "client_id") {
        Some((_, id)) => format!("id:{id}"),
        None => format!("topic:{reply_topic}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_over_its_rate_waits_and_others_do_not() {
        let t = Instant::now();
        let mut r = ClientRates::new(2);
        assert!(r.check("a", t).is_ok());
        assert!(r.check("a", t).is_ok());
        assert_eq!(r.check("a", t), Err(Duration::from_secs(30)));
        assert!(r.check("b", t).is_ok(), "another client has its own bucket");
        assert!(r.check("a", t + Duration::from_secs(30)).is_ok());
    }

    #[test]
    fn idle_clients_are_forgotten_when_the_table_is_full() {
        let t = Instant::now();
        let mut r = ClientRates::new(1);
        for i in 0..MAX_CLIENTS {
            r.check(&i.to_string(), t).unwrap();
        }
        assert_eq!(r.len(), MAX_CLIENTS);
        // A minute later every bucket is full again: the newcomer pushes the idle ones out.
        r.check("new", t + Duration::from_secs(60)).unwrap();
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn the_client_is_its_user_property_else_its_reply_topic() {
        let props = vec![("client_id".to_string(), "sensor-7".to_string())];
        assert_eq!(client_of(&props, "dev/7/answers"), "id:sensor-7");
        assert_eq!(client_of(&[], "dev/7/answers"), "topic:dev/7/answers");
    }
}
