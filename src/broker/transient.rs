//! Transient subscribers: live clients that receive events on their own stream,
//! in memory only. Fan-out never waits: each subscriber has a bounded queue, and
//! a full queue drops the event for that subscriber alone and remembers how many
//! it missed, so its stream can report `lagged` before the next event. A queue is
//! full at its event capacity or at its byte budget, whichever comes first, so a
//! stuck subscriber never pins more than that budget of payloads.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use dashmap::DashMap;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use super::SharedEvent;

/// Events a subscriber's queue holds before further events are dropped for it
/// (and counted as missed) until it catches up. Configurable per broker.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;

/// Payload bytes a subscriber's queue holds before further events are dropped
/// for it; one event always fits, however large. Configurable per broker.
pub const DEFAULT_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// One event handed to a subscriber, with the number of events that were
/// dropped for this subscriber just before it (0 when none were).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: Arc<SharedEvent>,
    pub missed_before: u64,
}

impl Delivery {
    /// What the delivery counts against its queue's byte budget.
    fn payload_len(&self) -> usize {
        self.event.event().payload.len()
    }
}

/// Which operations of one contract a subscriber wants.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selection {
    /// Every operation, including ones the contract gains later, except these.
    All { except: BTreeSet<String> },
    /// Exactly these operations (never empty: an empty selection is removed).
    Only(BTreeSet<String>),
}

impl Selection {
    fn matches(&self, operation: &str) -> bool {
        match self {
            Selection::All { except } => !except.contains(operation),
            Selection::Only(ops) => ops.contains(operation),
        }
    }
}

/// The sending half of a subscriber's queue, shared with the registry.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<Delivery>,
    /// Events dropped since the last one that fit; carried by the next delivery.
    missed: AtomicU64,
    /// Payload bytes queued and not yet taken by the subscriber's stream.
    bytes: AtomicUsize,
    max_bytes: usize,
}

impl Queue {
    /// Offers an event without waiting; `false` when the queue was full or closed.
    fn offer(&self, event: &Arc<SharedEvent>) -> bool {
        let size = event.event().payload.len();
        let queued = self.bytes.fetch_add(size, Ordering::AcqRel);
        if queued > 0 && queued + size > self.max_bytes {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            self.missed.fetch_add(1, Ordering::AcqRel);
            return false;
        }
        let missed_before = self.missed.swap(0, Ordering::AcqRel);
        match self.tx.try_send(Delivery {
            event: Arc::clone(event),
            missed_before,
        }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(rejected)) => {
                self.bytes.fetch_sub(size, Ordering::AcqRel);
                self.missed
                    .fetch_add(rejected.missed_before + 1, Ordering::AcqRel);
                false
            }
            // The subscriber is leaving; its entries are being removed.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.bytes.fetch_sub(size, Ordering::AcqRel);
                false
            }
        }
    }

    /// Gives back the budget of deliveries the stream took.
    fn taken(&self, bytes: usize) {
        if bytes > 0 {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

/// The receiving end of a subscriber's queue: what its stream reads from.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Delivery>,
    queue: Arc<Queue>,
}

impl Inbox {
    /// Appends up to `limit` queued deliveries to `buffer`; `Ready(0)` once the
    /// queue is closed and empty.
    pub fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &mut Vec<Delivery>,
        limit: usize,
    ) -> Poll<usize> {
        let start = buffer.len();
        let polled = self.rx.poll_recv_many(cx, buffer, limit);
        let bytes = buffer[start..].iter().map(Delivery::payload_len).sum();
        self.queue.taken(bytes);
        polled
    }

    /// The next delivery, waiting for one; `None` once the queue is closed.
    pub async fn recv(&mut self) -> Option<Delivery> {
        let delivery = self.rx.recv().await?;
        self.queue.taken(delivery.payload_len());
        Some(delivery)
    }

    /// The next delivery if one is queued.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        let delivery = self.rx.try_recv().ok()?;
        self.queue.taken(delivery.payload_len());
        Some(delivery)
    }
}

#[derive(Debug)]
struct Entry {
    selection: Selection,
    queue: Arc<Queue>,
}

type SubscriberId = u64;

/// Every live transient subscriber, indexed by contract for fan-out.
#[derive(Debug, Default)]
pub struct TransientRegistry {
    /// Contract → the subscribers of that contract. An entry is removed when its
    /// last subscriber leaves, so the map never grows with dead contracts.
    by_contract: DashMap<String, HashMap<SubscriberId, Entry>>,
    next_id: AtomicU64,
    /// Live [`Subscriber`] handles.
    subscribers: AtomicUsize,
}

/// Counts for tests, the admin and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransientStats {
    /// Live subscriber streams.
    pub subscribers: usize,
    /// Contracts with at least one subscriber.
    pub contracts: usize,
}

impl TransientRegistry {
    /// Registers a new subscriber with a queue of `capacity` events and
    /// `max_bytes` of payload. The subscriber's subscriptions all go away when
    /// the returned handle is dropped.
    pub fn connect(self: &Arc<Self>, capacity: usize, max_bytes: usize) -> (Subscriber, Inbox) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.subscribers.fetch_add(1, Ordering::AcqRel);
        let queue = Arc::new(Queue {
            tx,
            missed: AtomicU64::new(0),
            bytes: AtomicUsize::new(0),
            max_bytes,
        });
        let subscriber = Subscriber {
            id,
            registry: Arc::clone(self),
            queue: Arc::clone(&queue),
            contracts: HashSet::new(),
        };
        (subscriber, Inbox { rx, queue })
    }

    /// Offers the event to every subscriber of its contract and operation.
    /// Returns how many queues took it. Never waits.
    pub fn fan_out(&self, event: &Arc<SharedEvent>) -> usize {
        let fired = event.event();
        let Some(subscribers) = self.by_contract.get(&fired.contract) else {
            return 0;
        };
        subscribers
            .values()
            .filter(|entry| entry.selection.matches(&fired.operation))
            .filter(|entry| entry.queue.offer(event))
            .count()
    }

    pub fn stats(&self) -> TransientStats {
        TransientStats {
            subscribers: self.subscribers.load(Ordering::Acquire),
            contracts: self.by_contract.len(),
        }
    }
}

/// One live subscriber's handle: its subscriptions, and the right to change them.
/// Dropping it removes every subscription at once (the client went away).
#[derive(Debug)]
pub struct Subscriber {
    id: SubscriberId,
    registry: Arc<TransientRegistry>,
    queue: Arc<Queue>,
    /// Contracts this subscriber has entries for, so that leaving is cheap.
    contracts: HashSet<String>,
}

impl Subscriber {
    /// Adds `operation` (or every operation when empty) of `contract`. Idempotent.
    /// The caller has checked the contract and operation against the registry.
    pub fn subscribe(&mut self, contract: &str, operation: &str) {
        let mut subscribers = self
            .registry
            .by_contract
            .entry(contract.to_owned())
            .or_default();
        let entry = subscribers.entry(self.id).or_insert_with(|| Entry {
            selection: Selection::Only(BTreeSet::new()),
            queue: Arc::clone(&self.queue),
        });
        match (&mut entry.selection, operation) {
            (selection, "") => {
                *selection = Selection::All {
                    except: BTreeSet::new(),
                }
            }
            (Selection::All { except }, op) => {
                except.remove(op);
            }
            (Selection::Only(ops), op) => {
                ops.insert(op.to_owned());
            }
        }
        self.contracts.insert(contract.to_owned());
    }

    /// Removes `operation` (or the whole contract when empty). Unsubscribing from
    /// something not subscribed is a no-op. After subscribing to all operations,
    /// unsubscribing from one leaves the others, including ones added later.
    pub fn unsubscribe(&mut self, contract: &str, operation: &str) {
        let now_empty = {
            let Some(mut subscribers) = self.registry.by_contract.get_mut(contract) else {
                return;
            };
            let remove_entry = match subscribers.get_mut(&self.id) {
                None => false,
                Some(_) if operation.is_empty() => true,
                Some(entry) => match &mut entry.selection {
                    Selection::All { except } => {
                        except.insert(operation.to_owned());
                        false
                    }
                    Selection::Only(ops) => {
                        ops.remove(operation);
                        ops.is_empty()
                    }
                },
            };
            if remove_entry {
                subscribers.remove(&self.id);
                self.contracts.remove(contract);
            }
            subscribers.is_empty()
        };
        if now_empty {
            self.registry
                .by_contract
                .remove_if(contract, |_, subscribers| subscribers.is_empty());
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        for contract in std::mem::take(&mut self.contracts) {
            let now_empty = match self.registry.by_contract.get_mut(&contract) {
                Some(mut subscribers) => {
                    subscribers.remove(&self.id);
                    subscribers.is_empty()
                }
                None => false,
            };
            if now_empty {
                self.registry
                    .by_contract
                    .remove_if(&contract, |_, subscribers| subscribers.is_empty());
            }
        }
        self.registry.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::broker::Event;

    fn event(contract: &str, operation: &str) -> Arc<SharedEvent> {
        sized_event(contract, operation, 0)
    }

    fn sized_event(contract: &str, operation: &str, bytes: usize) -> Arc<SharedEvent> {
        Arc::new(SharedEvent::new(Event {
            id: "e".into(),
            contract: contract.into(),
            operation: operation.into(),
            payload: vec![0u8; bytes].into(),
            time: SystemTime::now(),
            attributes: Default::default(),
            source: String::new(),
        }))
    }

    #[test]
    fn all_then_unsubscribe_one_keeps_the_rest_and_future_operations() {
        let registry = Arc::new(TransientRegistry::default());
        let (mut sub, _rx) = registry.connect(8, DEFAULT_QUEUE_BYTES);
        sub.subscribe("c", "");
        sub.unsubscribe("c", "A");
        assert_eq!(registry.fan_out(&event("c", "A")), 0);
        assert_eq!(registry.fan_out(&event("c", "B")), 1);
        assert_eq!(registry.fan_out(&event("c", "AddedLater")), 1);
        sub.subscribe("c", "A");
        assert_eq!(registry.fan_out(&event("c", "A")), 1);
    }

    #[test]
    fn last_unsubscribe_removes_the_contract_entry() {
        let registry = Arc::new(TransientRegistry::default());
        let (mut sub, _rx) = registry.connect(8, DEFAULT_QUEUE_BYTES);
        sub.subscribe("c", "A");
        sub.subscribe("c", "A");
        sub.subscribe("c", "B");
        sub.unsubscribe("c", "A");
        assert_eq!(registry.stats().contracts, 1);
        sub.unsubscribe("c", "B");
        assert_eq!(registry.stats().contracts, 0);
    }

    #[test]
    fn dropping_the_handle_removes_everything() {
        let registry = Arc::new(TransientRegistry::default());
        let (mut sub, rx) = registry.connect(8, DEFAULT_QUEUE_BYTES);
        sub.subscribe("c", "");
        sub.subscribe("d", "X");
        assert_eq!(
            registry.stats(),
            TransientStats {
                subscribers: 1,
                contracts: 2
            }
        );
        drop(sub);
        drop(rx);
        assert_eq!(
            registry.stats(),
            TransientStats {
                subscribers: 0,
                contracts: 0
            }
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_for_that_subscriber_only() {
        let registry = Arc::new(TransientRegistry::default());
        let (mut slow, mut slow_rx) = registry.connect(2, DEFAULT_QUEUE_BYTES);
        let (mut fast, mut fast_rx) = registry.connect(16, DEFAULT_QUEUE_BYTES);
        slow.subscribe("c", "");
        fast.subscribe("c", "");
        for _ in 0..5 {
            registry.fan_out(&event("c", "A"));
        }
        for _ in 0..5 {
            assert_eq!(fast_rx.try_recv().expect("queued").missed_before, 0);
        }
        assert_eq!(slow_rx.try_recv().expect("queued").missed_before, 0);
        assert_eq!(slow_rx.try_recv().expect("queued").missed_before, 0);
        assert!(slow_rx.try_recv().is_none());
        registry.fan_out(&event("c", "A"));
        assert_eq!(slow_rx.try_recv().expect("queued").missed_before, 3);
    }

    #[test]
    fn the_byte_budget_bounds_a_queue_but_always_takes_one_event() {
        let registry = Arc::new(TransientRegistry::default());
        let (mut sub, mut rx) = registry.connect(100, 1000);
        sub.subscribe("c", "");
        // One event larger than the whole budget still fits an empty queue.
        assert_eq!(registry.fan_out(&sized_event("c", "A", 5000)), 1);
        assert_eq!(registry.fan_out(&sized_event("c", "A", 10)), 0);
        assert_eq!(
            rx.try_recv().expect("queued").event.event().payload.len(),
            5000
        );
        // Taking it frees its bytes: 400 + 400 fit, a third does not.
        assert_eq!(registry.fan_out(&sized_event("c", "A", 400)), 1);
        assert_eq!(registry.fan_out(&sized_event("c", "A", 400)), 1);
        assert_eq!(registry.fan_out(&sized_event("c", "A", 400)), 0);
        assert_eq!(rx.try_recv().expect("queued").missed_before, 1);
        assert_eq!(rx.try_recv().expect("queued").missed_before, 0);
        assert!(rx.try_recv().is_none());
        assert_eq!(registry.fan_out(&sized_event("c", "A", 400)), 1);
        assert_eq!(rx.try_recv().expect("queued").missed_before, 1);
    }
}
