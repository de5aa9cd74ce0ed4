//! The pure half of the MQTT interface: where a reply goes, which deliveries are duplicates, and how long to
//! wait before reconnecting. No I/O; unit-tested by name.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Where the replies of one request go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyAddress {
    pub topic: String,
    /// MQTT v5 Correlation Data, echoed on every reply.
    pub correlation: Option<Bytes>,
}

/// What an incoming message says about where to answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyHints {
    /// MQTT v5 Response Topic.
    pub response_topic: Option<String>,
    /// MQTT v5 Correlation Data.
    pub correlation: Option<Bytes>,
    /// `reply_to` in the JSON payload (MQTT 3.1.1 clients).
    pub reply_to: Option<String>,
    /// The request's `id`, as text, when it could be read.
    pub id: Option<String>,
}

/// Decides the reply address: the v5 Response Topic, else the payload's `reply_to`, else
/// `<prefix>/response/<id>`; `None` when there is nothing to go on (no topic and no id). Topics with wildcards
/// are not valid publish topics and are ignored.
pub fn reply_address(prefix: &str, hints: &ReplyHints) -> Option<ReplyAddress> {
    let valid = |t: &&String| !t.is_empty() && !t.contains(['+', '#']);
    let topic = hints
        .response_topic
        .as_ref()
        .filter(valid)
        .or(hints.reply_to.as_ref().filter(valid))
        .cloned()
        .or_else(|| {
            let id = hints.id.as_ref()?;
            let level = id.replace(['/', '+', '#'], "_");
            Some(format!("{prefix}/response/{level}"))
        })?;
    Some(ReplyAddress {
        topic,
        correlation: hints.correlation.clone(),
    })
}

/// The identity of a request for duplicate detection and cancel: its reply address plus its correlation
/// (Correlation Data, else the `id`).
pub fn request_key(addr: &ReplyAddress, id: &str) -> String {
    match &addr.correlation {
        Some(c) => format!("{}\u{0}c:{}", addr.topic, hex(c)),
        None => format!("{}\u{0}i:{id}", addr.topic),
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Remembers recent request keys, so that a QoS 1 redelivery of a request already running or answered is not
/// run twice. Bounded in size and age.
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    ttl: Duration,
    seen: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

impl Dedup {
    pub fn new(capacity: usize, ttl: Duration) -> Dedup {
        Dedup {
            capacity,
            ttl,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `key` at `now`; false when it was already seen within the time to live.
    pub fn first_time(&mut self, key: &str, now: Instant) -> bool {
        while let Some((k, at)) = self.order.front() {
            if now.duration_since(*at) < self.ttl && self.order.len() < self.capacity {
                break;
            }
            if self.seen.get(k) == Some(at) {
                self.seen.remove(k);
            }
            self.order.pop_front();
        }
        if self.seen.contains_key(key) {
            return false;
        }
        self.seen.insert(key.to_string(), now);
        self.order.push_back((key.to_string(), now));
        true
    }

    /// Forgets `key` (a request that was refused may be sent again).
    pub fn forget(&mut self, key: &str) {
        self.seen.remove(key);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The bytes of lower-case or upper-case hex text; `None` if it is not hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub use crate::backoff::backoff;

#[cfg(test)]
mod tests {
    use super::*;

    fn hints() -> ReplyHints {
        ReplyHints::default()
    }

    #[test]
    fn v5_response_topic_wins_and_correlation_is_kept() {
        let h = ReplyHints {
            response_topic: Some("dev/7/answers".into()),
            correlation: Some(Bytes::from_static(b"\x01\x02")),
            reply_to: Some("other".into()),
            id: Some("a".into()),
        };
        let a = reply_address("bitnetd/pi", &h).unwrap();
        assert_eq!(a.topic, "dev/7/answers");
        assert_eq!(a.correlation.as_deref(), Some(&b"\x01\x02"[..]));
    }

    #[test]
    fn payload_reply_to_serves_mqtt_3_clients() {
        let h = ReplyHints {
            reply_to: Some("dev/3/inbox".into()),
            id: Some("a".into()),
            ..hints()
        };
        assert_eq!(reply_address("p", &h).unwrap().topic, "dev/3/inbox");
    }

    #[test]
    fn without_an_address_the_id_names_the_response_topic() {
        let h = ReplyHints {
            id: Some("job/1+".into()),
            ..hints()
        };
        assert_eq!(
            reply_address("bitnetd/pi", &h).unwrap().topic,
            "bitnetd/pi/response/job_1_"
        );
        assert_eq!(
            reply_address("bitnetd/pi", &hints()),
            None,
            "nothing to go on"
        );
    }

    #[test]
    fn wildcard_reply_topics_are_ignored() {
        let h = ReplyHints {
            response_topic: Some("dev/#".into()),
            reply_to: Some("dev/+/x".into()),
            id: Some("q".into()),
            ..hints()
        };
        assert_eq!(reply_address("p", &h).unwrap().topic, "p/response/q");
    }

    #[test]
    fn request_keys_tell_correlation_and_ids_apart() {
        let a = ReplyAddress {
            topic: "t".into(),
            correlation: None,
        };
        let b = ReplyAddress {
            topic: "t".into(),
            correlation: Some(Bytes::from_static(b"1")),
        };
        assert_ne!(request_key(&a, "1"), request_key(&b, "1"));
        assert_eq!(
            request_key(&b, "x"),
            request_key(&b, "y"),
            "correlation data identifies a v5 request"
        );
        assert_ne!(request_key(&a, "x"), request_key(&a, "y"));
    }

    #[test]
    fn dedup_drops_redeliveries_within_the_ttl_only() {
        let t0 = Instant::now();
        let mut d = Dedup::new(100, Duration::from_secs(60));
        assert!(d.first_time("k", t0));
        assert!(!d.first_time("k", t0 + Duration::from_secs(1)));
        assert!(
            d.first_time("k", t0 + Duration::from_secs(61)),
            "forgotten after the ttl"
        );
        d.forget("k");
        assert!(
            d.first_time("k", t0 + Duration::from_secs(62)),
            "forgotten on request"
        );
    }

    #[test]
    fn dedup_is_bounded() {
        let t0 = Instant::now();
        let mut d = Dedup::new(3, Duration::from_secs(60));
        for k in ["a", "b", "c", "d"] {
            assert!(d.first_time(k, t0));
        }
        assert!(d.len() <= 3);
        assert!(d.first_time("a", t0), "the oldest was evicted");
    }
}
