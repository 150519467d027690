//! The latest signal record per user, for the read-only `GET /users/{key}/signals` lookup.
//!
//! The publisher hands every record in as it is published (no copy, no encoding); the HTTP
//! server reads them out by pseudonymised key and encodes only what is asked for; opt-outs and
//! deletions take a user out. Memory is bounded by `http.signals_lookup_capacity`: records are
//! kept in two generations, the current one filling up to half the capacity, when the older
//! one is dropped and the current one takes its place. A user whose record was delivered
//! recently is therefore always found; one not scored for a while may have aged out. The
//! signal topic, compacted by user key, stays the authoritative store of every user's latest
//! record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::signals::SignalRecord;

/// The latest record of recently scored users; shared by the publisher and the HTTP server.
pub struct LatestSignals {
    /// Locked briefly by each insert, removal and lookup, never across an await.
    generations: Mutex<Generations>,
    /// Entries the current generation takes before it becomes the older one.
    generation_size: usize,
}

#[derive(Default)]
struct Generations {
    current: HashMap<String, Arc<SignalRecord>>,
    older: HashMap<String, Arc<SignalRecord>>,
}

impl LatestSignals {
    /// Keeps up to `capacity` users (at least two).
    pub fn new(capacity: usize) -> LatestSignals {
        LatestSignals { generations: Mutex::default(), generation_size: (capacity / 2).max(1) }
    }

    /// Keeps `record` as the latest record of its user.
    pub fn insert(&self, record: SignalRecord) {
        let mut generations = self.lock();
        generations.older.remove(&record.user_key);
        generations.current.insert(record.user_key.clone(), Arc::new(record));
        if generations.current.len() >= self.generation_size {
            let full = std::mem::take(&mut generations.current);
            generations.older = full;
        }
    }

    /// The latest record of `user_key`, if it is still kept.
    pub fn get(&self, user_key: &str) -> Option<Arc<SignalRecord>> {
        let generations = self.lock();
        generations.current.get(user_key).or_else(|| generations.older.get(user_key)).cloned()
    }

    /// Forgets `user_key` (an opt-out or a deletion).
    pub fn remove(&self, user_key: &str) {
        let mut generations = self.lock();
        generations.current.remove(user_key);
        generations.older.remove(user_key);
    }

    /// Users kept.
    pub fn len(&self) -> usize {
        let generations = self.lock();
        generations.current.len() + generations.older.len()
    }

    /// Whether no user is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // Every update leaves the maps consistent, so a panic elsewhere cannot corrupt them.
        self.generations.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(user_key: &str, version: u64) -> SignalRecord {
        SignalRecord::for_test(user_key, version, &[], &[])
    }

    fn version(latest: &LatestSignals, user_key: &str) -> Option<u64> {
        latest.get(user_key).map(|r| r.version)
    }

    #[test]
    fn latest_insert_wins() {
        let latest = LatestSignals::new(10);
        latest.insert(record("u1", 1));
        latest.insert(record("u1", 2));
        assert_eq!(version(&latest, "u1"), Some(2));
        assert_eq!(latest.len(), 1);
    }

    #[test]
    fn never_holds_more_than_capacity_and_keeps_the_recent_half() {
        let latest = LatestSignals::new(100);
        for i in 0..1_000 {
            latest.insert(record(&format!("u{i}"), 1));
            assert!(latest.len() <= 100, "{} users kept after {i} inserts", latest.len());
        }
        for i in 950..1_000 {
            assert!(latest.get(&format!("u{i}")).is_some(), "recent user u{i} was dropped");
        }
        assert!(latest.get("u0").is_none());
    }

    #[test]
    fn a_user_in_the_older_generation_moves_forward_when_scored_again() {
        let latest = LatestSignals::new(4);
        latest.insert(record("a", 1));
        latest.insert(record("b", 1));
        // The current generation was full and is now the older one.
        latest.insert(record("a", 2));
        latest.insert(record("c", 1));
        assert_eq!(version(&latest, "a"), Some(2));
        assert_eq!(version(&latest, "c"), Some(1));
        assert!(latest.get("b").is_none(), "b aged out with the older generation");
    }

    #[test]
    fn removed_users_are_gone_from_both_generations() {
        let latest = LatestSignals::new(4);
        for user in ["a", "b", "c"] {
            latest.insert(record(user, 1));
        }
        latest.remove("a");
        latest.remove("c");
        assert!(latest.get("a").is_none());
        assert!(latest.get("c").is_none());
        assert_eq!(version(&latest, "b"), Some(1));
    }
}
