//! An in-memory LRU cache of cloud answers, for identical deterministic requests (temperature 0): a fleet of
//! sensors asking the same question pays once. Keyed by a hash of the exact request body (model, messages,
//! limits, stop strings).

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

use super::wire::ApiUsage;

/// A cached answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedAnswer {
    pub text: String,
    pub finish_reason: String,
    pub usage: Option<ApiUsage>,
}

/// See the module documentation. `capacity` 0 turns it off.
pub struct AnswerCache {
    inner: Option<Mutex<LruCache<[u8; 32], CachedAnswer>>>,
}

impl AnswerCache {
    pub fn new(capacity: usize) -> AnswerCache {
        AnswerCache {
            inner: NonZeroUsize::new(capacity).map(|c| Mutex::new(LruCache::new(c))),
        }
    }

    /// The key of a request body; two bodies share a key only if they are byte for byte the same.
    pub fn key(body: &[u8]) -> [u8; 32] {
        ring::digest::digest(&ring::digest::SHA256, body)
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes")
    }

    pub fn get(&self, key: &[u8; 32]) -> Option<CachedAnswer> {
        self.inner.as_ref()?.lock().unwrap().get(key).cloned()
    }

    pub fn put(&self, key: [u8; 32], answer: CachedAnswer) {
        if let Some(c) = &self.inner {
            c.lock().unwrap().put(key, answer);
        }
    }

    pub fn clear(&self) {
        if let Some(c) = &self.inner {
            c.lock().unwrap().clear();
        }
    }

    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |c| c.lock().unwrap().len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(t: &str) -> CachedAnswer {
        CachedAnswer {
            text: t.into(),
            finish_reason: "stop".into(),
            usage: None,
        }
    }

    #[test]
    fn keeps_the_most_recent_answers() {
        let c = AnswerCache::new(2);
        let (a, b, d) = (
            AnswerCache::key(b"a"),
            AnswerCache::key(b"b"),
            AnswerCache::key(b"d"),
        );
        c.put(a, answer("A"));
        c.put(b, answer("B"));
        assert_eq!(c.get(&a).unwrap().text, "A");
        c.put(d, answer("D"));
        assert!(c.get(&b).is_none(), "b was the least recently used");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn capacity_zero_is_off() {
        let c = AnswerCache::new(0);
        c.put(AnswerCache::key(b"a"), answer("A"));
        assert!(c.get(&AnswerCache::key(b"a")).is_none());
        assert!(c.is_empty());
    }
}
