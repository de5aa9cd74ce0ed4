//! A set of requests in flight, by key, each with its cancel token, that can be waited on until empty. Used by
//! the dispatcher (all requests), each socket connection (its requests by id) and MQTT (by reply address).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::engine::CancelToken;

/// See the module documentation.
pub struct InFlight<K> {
    map: Mutex<HashMap<K, CancelToken>>,
    changed: Notify,
}

impl<K> Default for InFlight<K> {
    fn default() -> Self {
        InFlight {
            map: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        }
    }
}

impl<K: Hash + Eq> InFlight<K> {
    /// Adds or replaces `key`.
    pub fn insert(&self, key: K, cancel: CancelToken) {
        self.map.lock().unwrap().insert(key, cancel);
    }

    pub fn contains(&self, key: &K) -> bool {
        self.map.lock().unwrap().contains_key(key)
    }

    /// Removes `key` and wakes whoever waits for the set to empty.
    pub fn remove(&self, key: &K) {
        self.map.lock().unwrap().remove(key);
        self.changed.notify_waiters();
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cancels `key` if present.
    pub fn cancel(&self, key: &K) {
        if let Some(c) = self.map.lock().unwrap().get(key) {
            c.cancel();
        }
    }

    pub fn cancel_all(&self) {
        for c in self.map.lock().unwrap().values() {
            c.cancel();
        }
    }

    /// Resolves once the set is empty.
    pub async fn empty(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a removal between the check and the wait is not missed.
            notified.as_mut().enable();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn empty_resolves_after_the_last_removal() {
        let set = std::sync::Arc::new(InFlight::default());
        let c = CancelToken::default();
        set.insert(1, c.clone());
        set.insert(2, CancelToken::default());
        assert!(set.contains(&1) && set.len() == 2);
        set.cancel(&1);
        assert!(c.is_cancelled());
        let waiter = tokio::spawn({
            let set = set.clone();
            async move { set.empty().await }
        });
        set.remove(&1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        set.remove(&2);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
