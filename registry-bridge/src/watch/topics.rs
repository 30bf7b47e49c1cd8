//! Shared channels by key. The first subscriber to a key gets the sender
//! back and starts the loop that feeds it; the loop asks to retire when its
//! receivers are gone, and is kept if someone subscribed meanwhile.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

use super::lock;

/// Channels by key.
pub(crate) struct Topics<V> {
    map: Mutex<HashMap<String, watch::Sender<V>>>,
}

impl<V> Default for Topics<V> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<V: Default> Topics<V> {
    /// A receiver for `key`, and the sender when the key is new (the caller
    /// then starts the loop that feeds it).
    pub(crate) fn subscribe(&self, key: &str) -> (watch::Receiver<V>, Option<watch::Sender<V>>) {
        let mut map = lock(&self.map);
        if let Some(tx) = map.get(key) {
            return (tx.subscribe(), None);
        }
        let (tx, rx) = watch::channel(V::default());
        map.insert(key.to_owned(), tx.clone());
        (rx, Some(tx))
    }

    /// Removes `key` if nobody receives from `tx` anymore; `false` when a
    /// subscriber came back in the meantime and the loop must go on.
    pub(crate) fn retire(&self, key: &str, tx: &watch::Sender<V>) -> bool {
        let mut map = lock(&self.map);
        // Checked under the lock that `subscribe` takes: no subscriber can
        // slip in between the check and the removal.
        if tx.receiver_count() > 0 {
            return false;
        }
        map.remove(key);
        true
    }

    /// Number of keys with a loop.
    pub(crate) fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_channel_per_key_retired_only_without_receivers() {
        let topics = Topics::<u32>::default();
        let (rx1, tx) = topics.subscribe("web");
        let tx = tx.expect("first subscriber starts the loop");
        let (rx2, again) = topics.subscribe("web");
        assert!(again.is_none(), "second subscriber shares the loop");
        tx.send_replace(7);
        assert_eq!(*rx2.borrow(), 7);
        drop(rx1);
        assert!(!topics.retire("web", &tx), "rx2 still listens");
        drop(rx2);
        assert!(topics.retire("web", &tx));
        assert_eq!(topics.len(), 0);
        assert!(
            topics.subscribe("web").1.is_some(),
            "a new loop after retiring"
        );
    }
}
