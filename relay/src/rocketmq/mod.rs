//! RocketMQ over its remoting protocol (a small codec of our own: the commands needed here, no
//! client library): answering transaction check-backs from the oracle, and the transactional
//! sends of the RocketMQ sink (`sink/rocketmq.rs`).

pub mod acl;
pub mod checkback;
pub mod client;
pub mod connection;
pub mod message;
pub mod remoting;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// The longest topic or group name RocketMQ accepts.
const MAX_NAME: usize = 127;

use crate::config::rocketmq_name_char as name_char;
pub use crate::config::rocketmq_name_ok as valid_name;

/// The RocketMQ topic for a routed topic name: characters RocketMQ does not allow in topic names
/// (only letters, digits, `_`, `-`, `%` and `|` are) become `_`, so the default
/// `outbox.event.{aggregatetype}` gives `outbox_event_order`. `None` when the result is not a
/// topic RocketMQ accepts (empty or longer than 127 characters).
pub fn topic_name(routed: &str) -> Option<String> {
    let mapped: String = routed
        .chars()
        .map(|c| if name_char(c) { c } else { '_' })
        .collect();
    (!mapped.is_empty() && mapped.len() <= MAX_NAME).then_some(mapped)
}

/// Transaction keys of the half messages this process sent and has not settled yet.
///
/// The relay's own check-back responder answers "unknown" for them instead of asking the oracle:
/// the oracle would settle a key the sink is about to commit as rolled back, and the sink would
/// then have to send the row again. A relay that crashed holds nothing here, so after a crash
/// the oracle decides. Each sink registers under a generation of its own and forgets its keys
/// when it is dropped: a rebuilt sink sends the unconfirmed rows again under new keys, and the
/// oracle decides the old ones.
#[derive(Debug, Clone, Default)]
pub struct OwnHalves {
    inner: Arc<Mutex<Own>>,
}

#[derive(Debug, Default)]
struct Own {
    /// Key → the generation that sent it.
    keys: HashMap<String, u64>,
    next_generation: u64,
    /// Generations forgotten: keys they still try to add are ignored.
    retired: HashSet<u64>,
}

impl OwnHalves {
    /// A new generation for a sink.
    pub fn generation(&self) -> u64 {
        self.inner
            .lock()
            .map(|mut own| {
                own.next_generation += 1;
                own.next_generation
            })
            .unwrap_or(0)
    }

    /// A half message about to be sent by `generation`.
    pub fn insert(&self, key: &str, generation: u64) {
        if let Ok(mut own) = self.inner.lock()
            && !own.retired.contains(&generation)
        {
            own.keys.insert(key.to_owned(), generation);
        }
    }

    /// Settled, or never stored: the oracle decides from now on.
    pub fn remove(&self, key: &str) {
        if let Ok(mut own) = self.inner.lock() {
            own.keys.remove(key);
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.inner
            .lock()
            .is_ok_and(|own| own.keys.contains_key(key))
    }

    /// Forgets every key of `generation`, and any it adds later.
    pub fn forget(&self, generation: u64) {
        if let Ok(mut own) = self.inner.lock() {
            own.keys.retain(|_, g| *g != generation);
            own.retired.insert(generation);
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|own| own.keys.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_map_to_what_rocketmq_accepts() {
        assert_eq!(
            topic_name("outbox.event.order").as_deref(),
            Some("outbox_event_order")
        );
        assert_eq!(topic_name("a-b_c%D|9").as_deref(), Some("a-b_c%D|9"));
        assert_eq!(topic_name("ü").as_deref(), Some("_"));
        assert_eq!(topic_name(""), None);
        assert_eq!(topic_name(&"x".repeat(128)), None);
        assert!(valid_name("outbox-relay"));
        assert!(!valid_name("outbox.relay"));
        assert!(!valid_name(""));
    }

    #[test]
    fn a_dropped_generation_forgets_its_keys_and_later_ones() {
        let own = OwnHalves::default();
        let (a, b) = (own.generation(), own.generation());
        assert_ne!(a, b);
        own.insert("k1", a);
        own.insert("k2", b);
        own.forget(a);
        assert!(!own.contains("k1"));
        assert!(own.contains("k2"));
        // A send of the dropped sink still finishing adds nothing.
        own.insert("k3", a);
        assert!(!own.contains("k3"));
        own.remove("k2");
        assert!(own.is_empty());
    }
}
