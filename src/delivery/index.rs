//! The in-memory index of persistent subscriptions that the fire path matches
//! against, so that firing never reads the database. It is rebuilt from the
//! store whenever subscriptions change: at once for changes made through this
//! node, on notification for changes made through another node.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use crate::store::{Store, StoreError, Subscription, Target};

#[derive(Debug, Default)]
struct Snapshot {
    /// Contract → its subscriptions, in the store's order (by address).
    by_contract: HashMap<String, Vec<Subscription>>,
    total: usize,
}

/// Shared, read-mostly: readers take the current snapshot and let go of the
/// lock at once; a reload swaps in a new snapshot.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    current: RwLock<Arc<Snapshot>>,
    /// One reload at a time, so that a reload that read the store earlier can
    /// never install its older snapshot over a later one's.
    reloading: tokio::sync::Mutex<()>,
}

impl SubscriptionIndex {
    /// The subscriptions an event of `contract`/`operation` reaches, one per
    /// address (an address subscribed both to all operations and to this one
    /// gets one delivery).
    pub fn targets(&self, contract: &str, operation: &str) -> Vec<Target> {
        let snapshot = self.snapshot();
        let Some(subscriptions) = snapshot.by_contract.get(contract) else {
            return Vec::new();
        };
        // An address's subscriptions are next to each other (the store lists
        // them by address), so comparing with the last one kept is enough.
        let mut last: Option<&str> = None;
        subscriptions
            .iter()
            .filter(|s| s.matches(operation))
            .filter(|s| last.replace(s.address.as_str()) != Some(s.address.as_str()))
            .map(|s| Target {
                subscription_id: s.id,
                address: s.address.clone(),
                secret: s.secret.clone(),
            })
            .collect()
    }

    /// Number of stored subscription rows.
    pub fn len(&self) -> usize {
        self.snapshot().total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rebuilds the index from the store.
    pub async fn reload(&self, store: &dyn Store) -> Result<(), StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        let subscriptions = store.subscriptions().await?;
        let total = subscriptions.len();
        let mut by_contract: HashMap<String, Vec<Subscription>> = HashMap::new();
        for subscription in subscriptions {
            by_contract
                .entry(subscription.contract.clone())
                .or_default()
                .push(subscription);
        }
        let snapshot = Arc::new(Snapshot { by_contract, total });
        match self.current.write() {
            Ok(mut current) => *current = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
        Ok(())
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}
