//! RocketMQ over its remoting protocol (a small codec of our own: the commands needed here, no
//! client library): answering transaction check-backs from the oracle, and the transactional
//! sends of the RocketMQ sink (`sink/rocketmq.rs`).

pub mod checkback;
pub mod client;
pub mod connection;
pub mod message;
pub mod remoting;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest topic or group name RocketMQ accepts.
const MAX_NAME: usize = 127;

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '%' | '|')
}

/// Whether `name` is a valid RocketMQ group name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.chars().all(name_char)
}

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

/// How long after settling a half message itself the relay still answers its check-backs
/// "unknown". The broker records an END_TRANSACTION asynchronously (RocketMQ batches the records
/// every `transactionOpBatchInterval`), so a check may still come for a message just committed;
/// answering it "commit" from the oracle would make the broker commit it a second time.
pub const SETTLED_GRACE: Duration = Duration::from_secs(10);

/// Transaction keys of the half messages this process sent and has not settled yet (or settled
/// within [`SETTLED_GRACE`]).
///
/// The relay's own check-back responder answers "unknown" for them instead of asking the oracle:
/// the oracle would settle a key the sink is about to commit as rolled back, and the sink would
/// then have to send the row again. A relay that crashed holds nothing here, so after a crash
/// the oracle decides. Each sink registers under a generation of its own and forgets its
/// unsettled keys when it is dropped (a rebuilt sink sends the unconfirmed rows again, under new
/// keys, and the oracle decides the old ones).
#[derive(Debug, Clone, Default)]
pub struct OwnHalves {
    inner: Arc<Mutex<Own>>,
    generations: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Debug, Default)]
struct Own {
    /// Key → (generation, when this process settled it).
    keys: HashMap<String, (u64, Option<Instant>)>,
    /// Settled keys in the order they were settled, to expire them.
    settled: VecDeque<(Instant, String)>,
}

impl Own {
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.settled.front()
            && now.duration_since(*at) >= SETTLED_GRACE
        {
            let Some((at, key)) = self.settled.pop_front() else {
                break;
            };
            if self.keys.get(&key).is_some_and(|(_, s)| *s == Some(at)) {
                self.keys.remove(&key);
            }
        }
    }
}

impl OwnHalves {
    /// A new generation for a sink.
    pub fn generation(&self) -> u64 {
        self.generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A half message about to be sent.
    pub fn insert(&self, key: &str, generation: u64) {
        if let Ok(mut own) = self.inner.lock() {
            own.expire(Instant::now());
            own.keys.insert(key.to_owned(), (generation, None));
        }
    }

    /// A half message that was never stored: the oracle may decide it at once.
    pub fn remove(&self, key: &str) {
        if let Ok(mut own) = self.inner.lock() {
            own.keys.remove(key);
        }
    }

    /// This process sent END_TRANSACTION for it (or tried to): kept for [`SETTLED_GRACE`].
    pub fn settled(&self, key: &str) {
        self.settled_at(key, Instant::now());
    }

    fn settled_at(&self, key: &str, now: Instant) {
        if let Ok(mut own) = self.inner.lock() {
            own.expire(now);
            if let Some(entry) = own.keys.get_mut(key) {
                entry.1 = Some(now);
                own.settled.push_back((now, key.to_owned()));
            }
        }
    }

    /// Whether check-backs on `key` are this process's to answer "unknown".
    pub fn contains(&self, key: &str) -> bool {
        self.contains_at(key, Instant::now())
    }

    fn contains_at(&self, key: &str, now: Instant) -> bool {
        self.inner.lock().is_ok_and(|own| {
            own.keys.get(key).is_some_and(|(_, settled)| {
                settled.is_none_or(|at| now.duration_since(at) < SETTLED_GRACE)
            })
        })
    }

    /// Forgets the unsettled keys of `generation`.
    pub fn forget(&self, generation: u64) {
        if let Ok(mut own) = self.inner.lock() {
            own.keys
                .retain(|_, (g, settled)| *g != generation || settled.is_some());
        }
    }

    /// Keys held (unsettled, or settled within the grace).
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
    fn a_dropped_generation_forgets_its_unsettled_keys() {
        let own = OwnHalves::default();
        let (a, b) = (own.generation(), own.generation());
        own.insert("k1", a);
        own.insert("k2", b);
        own.insert("k3", a);
        own.settled("k3");
        own.forget(a);
        assert!(!own.contains("k1"));
        assert!(own.contains("k2"));
        assert!(own.contains("k3"), "settled keys stay for the grace period");
        own.remove("k2");
        assert_eq!(own.len(), 1);
    }

    #[test]
    fn settled_keys_are_held_for_the_grace_period_then_expire() {
        let own = OwnHalves::default();
        let g = own.generation();
        let t0 = Instant::now();
        own.insert("k", g);
        own.settled_at("k", t0);
        assert!(own.contains_at("k", t0 + SETTLED_GRACE / 2));
        assert!(!own.contains_at("k", t0 + SETTLED_GRACE));
        // Expired entries leave the map on the next settle.
        own.insert("later", g);
        own.settled_at("later", t0 + SETTLED_GRACE);
        assert_eq!(own.len(), 1);
        assert!(!own.is_empty());
    }
}
