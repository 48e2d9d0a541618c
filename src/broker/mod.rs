//! The core of Herald: contracts, events, and fan-out to subscribers. It knows
//! nothing of gRPC or SQL; the API layer translates the wire into calls on
//! [`Broker`], and persistent delivery plugs in through [`DurableFanOut`].

mod cluster;
mod error;
mod event;
pub mod registry;
pub mod transcode;
pub mod transient;

use std::{sync::Arc, time::SystemTime};

use futures::future::BoxFuture;

pub use cluster::{ClusterBus, SingleNode};
pub use error::BrokerError;
pub use event::{Event, EventDraft, SharedEvent};
pub use registry::{ContractRegistry, RegistryBuilder, RegistryError};
pub use transient::{
    DEFAULT_QUEUE_BYTES, DEFAULT_QUEUE_CAPACITY, Delivery, Inbox, Subscriber, TransientRegistry,
    TransientStats,
};

/// The largest payload accepted by default (4 MiB).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

/// Publisher-chosen event ids longer than this are refused.
pub const MAX_EVENT_ID_LEN: usize = 256;

/// Event sources longer than this are refused.
pub const MAX_EVENT_SOURCE_LEN: usize = 1024;

/// Where persistent deliveries go: implemented by the store-backed delivery
/// queue. `enqueue` resolves only once the event and one delivery per matching
/// persistent subscription are durable, and returns how many were queued.
/// The event must be submitted when `enqueue` is called, not when the future is
/// first polled, so that submission order is firing order.
pub trait DurableFanOut: Send + Sync + 'static {
    fn enqueue(&self, event: Arc<SharedEvent>) -> BoxFuture<'static, Result<u32, BrokerError>>;
}

/// Limits that protect the broker from its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Payloads larger than this are refused.
    pub max_payload_bytes: usize,
    /// Events a transient subscriber's queue holds before it lags.
    pub queue_capacity: usize,
    /// Payload bytes a transient subscriber's queue holds before it lags.
    pub queue_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }
}

/// What firing one event achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FireOutcome {
    pub event_id: String,
    /// Transient subscribers whose queue took the event.
    pub transient: u32,
    /// Persistent deliveries durably queued.
    pub persistent: u32,
}

/// A fired event whose transient fan-out is done and whose persistent
/// deliveries may still be on their way to durable storage.
#[must_use = "a fire is complete only once `finish` resolves"]
pub struct PendingFire {
    event_id: String,
    transient: u32,
    durable: Option<BoxFuture<'static, Result<u32, BrokerError>>>,
}

impl PendingFire {
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// Waits until the persistent deliveries are durable.
    pub async fn finish(self) -> Result<FireOutcome, BrokerError> {
        let persistent = match self.durable {
            Some(durable) => durable.await?,
            None => 0,
        };
        Ok(FireOutcome {
            event_id: self.event_id,
            transient: self.transient,
            persistent,
        })
    }
}

/// A cheap, cloneable handle to the broker's shared state.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

struct Shared {
    /// Immutable after start-up.
    registry: Arc<ContractRegistry>,
    /// Live subscribers; internally synchronised (sharded map + atomics).
    transient: Arc<TransientRegistry>,
    /// `None` until persistent delivery is configured.
    durable: Option<Arc<dyn DurableFanOut>>,
    cluster: Arc<dyn ClusterBus>,
    limits: Limits,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("contracts", &self.shared.registry.contract_names())
            .field("transient", &self.shared.transient.stats())
            .field("limits", &self.shared.limits)
            .finish()
    }
}

impl Broker {
    pub fn new(registry: ContractRegistry, limits: Limits) -> Self {
        Self::with_parts(Arc::new(registry), limits, None, Arc::new(SingleNode))
    }

    pub fn with_parts(
        registry: Arc<ContractRegistry>,
        limits: Limits,
        durable: Option<Arc<dyn DurableFanOut>>,
        cluster: Arc<dyn ClusterBus>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                registry,
                transient: Arc::new(TransientRegistry::default()),
                durable,
                cluster,
                limits,
            }),
        }
    }

    pub fn registry(&self) -> &Arc<ContractRegistry> {
        &self.shared.registry
    }

    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    pub fn transient_stats(&self) -> TransientStats {
        self.shared.transient.stats()
    }

    /// A new transient subscriber with the configured queue capacity.
    pub fn connect(&self) -> (Subscriber, Inbox) {
        let limits = self.shared.limits;
        self.shared
            .transient
            .connect(limits.queue_capacity, limits.queue_bytes)
    }

    /// Subscribes after checking the contract and operation ("" = all operations).
    pub fn subscribe(
        &self,
        subscriber: &mut Subscriber,
        contract: &str,
        operation: &str,
    ) -> Result<(), BrokerError> {
        self.shared.registry.check_filter(contract, operation)?;
        subscriber.subscribe(contract, operation);
        Ok(())
    }

    /// Unsubscribes after checking the contract and operation ("" = the whole contract).
    pub fn unsubscribe(
        &self,
        subscriber: &mut Subscriber,
        contract: &str,
        operation: &str,
    ) -> Result<(), BrokerError> {
        self.shared.registry.check_filter(contract, operation)?;
        subscriber.unsubscribe(contract, operation);
        Ok(())
    }

    /// Validates an event, assigns its id and time, and fans it out to transient
    /// and persistent subscribers concurrently. Resolves once persistent
    /// deliveries are durable.
    pub async fn fire(&self, draft: EventDraft) -> Result<FireOutcome, BrokerError> {
        self.start_fire(draft)?.finish().await
    }

    /// The first half of [`Broker::fire`], done before returning: validation,
    /// submission to the durable queue, and the in-memory fan-out. A publisher
    /// that starts fires one after another sees them reach every subscriber in
    /// that order, even when it awaits their durability concurrently.
    pub fn start_fire(&self, draft: EventDraft) -> Result<PendingFire, BrokerError> {
        let event = Arc::new(SharedEvent::new(self.validate(draft)?));
        self.shared.cluster.announce(&event);
        // Submitted first, so the commit proceeds while we fan out in memory.
        let durable = self
            .shared
            .durable
            .as_ref()
            .map(|durable| durable.enqueue(Arc::clone(&event)));
        let transient = self.shared.transient.fan_out(&event);
        Ok(PendingFire {
            event_id: event.event().id.clone(),
            transient: u32::try_from(transient).unwrap_or(u32::MAX),
            durable,
        })
    }

    /// Delivers an event that another node fired to this node's transient subscribers.
    pub fn deliver_from_cluster(&self, event: Event) -> usize {
        self.shared
            .transient
            .fan_out(&Arc::new(SharedEvent::new(event)))
    }

    fn validate(&self, draft: EventDraft) -> Result<Event, BrokerError> {
        let registry = &self.shared.registry;
        registry.operation(&draft.contract, &draft.operation)?;
        let limit = self.shared.limits.max_payload_bytes;
        if draft.payload.len() > limit {
            return Err(BrokerError::PayloadTooLarge {
                size: draft.payload.len(),
                limit,
            });
        }
        registry.validate_payload(&draft.contract, &draft.operation, &draft.payload)?;
        let id = match draft.id {
            Some(id) if !id.is_empty() => check_header_text("event id", id, MAX_EVENT_ID_LEN)?,
            _ => uuid::Uuid::now_v7().to_string(),
        };
        let source = check_header_text("event source", draft.source, MAX_EVENT_SOURCE_LEN)?;
        Ok(Event {
            id,
            contract: draft.contract,
            operation: draft.operation,
            payload: draft.payload,
            time: draft.time.unwrap_or_else(SystemTime::now),
            attributes: draft.attributes,
            source,
        })
    }
}

/// Event ids and sources travel to subscribers as gRPC metadata and HTTP headers,
/// which carry visible ASCII only: anything else would be dropped on the way and
/// leave subscribers unable to de-duplicate.
fn check_header_text(what: &str, text: String, limit: usize) -> Result<String, BrokerError> {
    if text.len() > limit {
        return Err(BrokerError::InvalidEvent(format!(
            "{what} is {} bytes; at most {limit} are allowed",
            text.len()
        )));
    }
    if let Some(bad) = text.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(BrokerError::InvalidEvent(format!(
            "{what} contains {bad:?}; only visible ASCII characters and spaces are allowed"
        )));
    }
    Ok(text)
}
