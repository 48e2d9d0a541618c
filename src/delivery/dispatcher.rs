//! The dispatcher: claims due deliveries from the store, calls subscribers
//! through their bindings, and records the outcome (delivered, retry later,
//! dead letter). A slow or dead subscriber never delays the others: each
//! address has its own limit on calls in flight, every call has a deadline,
//! and an address that keeps failing is paused for a while.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use super::{
    binding::{Bindings, CallOutcome},
    index::SubscriptionIndex,
    retry::{Decision, RetryPolicy},
};
use crate::store::{Claim, ClaimedDelivery, Settlement, Store, now_micros};

/// Most deliveries claimed in one query.
const CLAIM_BATCH: usize = 256;

/// Consecutive failures after which an address is paused.
const PAUSE_AFTER_FAILURES: u32 = 3;

/// Longest pause of a failing address. Kept well below the claim lease, so
/// that deliveries claimed for a paused address are released in time.
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// How long to wait before claiming again after the store failed.
const STORE_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct DispatcherOptions {
    /// Written on claimed rows; a restarted node with the same id takes its
    /// unfinished claims back at once instead of waiting for their lease.
    pub node: String,
    /// How long a claim holds before another node may take the row over.
    pub lease: Duration,
    /// How often the store is polled when nothing woke the dispatcher.
    pub poll_interval: Duration,
    /// Deliveries claimed and not yet settled, across all addresses.
    pub max_in_flight: usize,
    /// Calls in flight to one address.
    pub per_address_in_flight: usize,
    pub retry: RetryPolicy,
}

impl Default for DispatcherOptions {
    fn default() -> Self {
        Self {
            node: "herald".to_owned(),
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            max_in_flight: 2048,
            per_address_in_flight: 32,
            retry: RetryPolicy::default(),
        }
    }
}

/// A finished call.
struct Finished {
    id: i64,
    address: String,
    event_id: String,
    attempts: u32,
    created_at: i64,
    outcome: CallOutcome,
}

/// What the dispatcher knows of one address.
#[derive(Default)]
struct AddressState {
    running: usize,
    waiting: VecDeque<ClaimedDelivery>,
    consecutive_failures: u32,
    paused_until: Option<Instant>,
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    bindings: Arc<Bindings>,
    index: Arc<SubscriptionIndex>,
    options: DispatcherOptions,
    addresses: HashMap<String, AddressState>,
    /// Claimed and not yet settled.
    in_flight: usize,
    calls: TaskTracker,
    finished_tx: mpsc::Sender<Finished>,
    finished_rx: mpsc::Receiver<Finished>,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        bindings: Arc<Bindings>,
        index: Arc<SubscriptionIndex>,
        options: DispatcherOptions,
    ) -> Self {
        // Every claimed delivery sends one result: the channel never blocks a call.
        let (finished_tx, finished_rx) = mpsc::channel(options.max_in_flight.max(1));
        Self {
            store,
            bindings,
            index,
            options,
            addresses: HashMap::new(),
            in_flight: 0,
            calls: TaskTracker::new(),
            finished_tx,
            finished_rx,
        }
    }

    /// Runs until `stop` is cancelled, then lets calls in flight finish (each
    /// has its deadline) and returns unstarted claims to the queue.
    pub async fn run(mut self, wake: Arc<Notify>, stop: CancellationToken) {
        match self.store.release_claims(&self.options.node).await {
            Ok(0) => {}
            Ok(released) => {
                info!(released, node = %self.options.node, "took back deliveries this node had claimed before it stopped")
            }
            Err(error) => {
                warn!(%error, "could not release this node's earlier claims; they return when their lease ends")
            }
        }
        let mut store_healthy = true;
        loop {
            let mut finished = Vec::new();
            while let Ok(done) = self.finished_rx.try_recv() {
                finished.push(done);
            }
            self.settle(finished).await;
            let mut claimed_full_batch = false;
            if store_healthy {
                match self.claim().await {
                    Ok(full) => claimed_full_batch = full,
                    Err(error) => {
                        warn!(%error, "claiming deliveries failed; retrying shortly");
                        store_healthy = false;
                    }
                }
            }
            self.start_calls();
            if claimed_full_batch {
                continue;
            }
            let wait = if store_healthy {
                self.options.poll_interval
            } else {
                STORE_RETRY
            };
            let next_unpause = self.next_unpause();
            tokio::select! {
                () = stop.cancelled() => break,
                Some(done) = self.finished_rx.recv() => self.settle(vec![done]).await,
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => store_healthy = true,
                () = sleep_until(next_unpause) => {}
            }
        }
        self.drain().await;
    }

    /// Claims due deliveries if there is room; `true` when a full batch came
    /// back (more are probably due).
    async fn claim(&mut self) -> Result<bool, crate::store::StoreError> {
        let room = self.options.max_in_flight.saturating_sub(self.in_flight);
        if room == 0 {
            return Ok(false);
        }
        let limit = room.min(CLAIM_BATCH);
        let now = Instant::now();
        let busy = self.options.per_address_in_flight * 2;
        let skip_addresses = self
            .addresses
            .iter()
            .filter(|(_, s)| {
                s.running + s.waiting.len() >= busy || s.paused_until.is_some_and(|t| t > now)
            })
            .map(|(address, _)| address.clone())
            .collect();
        let claimed = self
            .store
            .claim(&Claim {
                node: self.options.node.clone(),
                limit,
                now: now_micros(),
                lease: self.options.lease,
                skip_addresses,
            })
            .await?;
        let full = claimed.len() == limit;
        for delivery in claimed {
            self.in_flight += 1;
            self.addresses
                .entry(delivery.address.clone())
                .or_default()
                .waiting
                .push_back(delivery);
        }
        Ok(full)
    }

    /// Starts calls for every address below its limit and not paused.
    fn start_calls(&mut self) {
        let now = Instant::now();
        for state in self.addresses.values_mut() {
            if state.paused_until.is_some_and(|t| t > now) {
                continue;
            }
            state.paused_until = None;
            while state.running < self.options.per_address_in_flight {
                let Some(delivery) = state.waiting.pop_front() else {
                    break;
                };
                state.running += 1;
                let bindings = Arc::clone(&self.bindings);
                let finished = self.finished_tx.clone();
                self.calls.spawn(async move {
                    let outcome = bindings.deliver(&delivery).await;
                    let _ = finished
                        .send(Finished {
                            id: delivery.id,
                            address: delivery.address,
                            event_id: delivery.event.id,
                            attempts: delivery.attempts,
                            created_at: delivery.created_at,
                            outcome,
                        })
                        .await;
                });
            }
        }
        // Forget idle addresses (their failure count with them), so that the
        // map holds only addresses with work or a pause.
        self.addresses
            .retain(|_, s| s.running > 0 || !s.waiting.is_empty() || s.paused_until.is_some());
    }

    /// Records finished calls in the store, in one transaction.
    async fn settle(&mut self, finished: Vec<Finished>) {
        if finished.is_empty() {
            return;
        }
        let now = now_micros();
        let mut settlements = Vec::with_capacity(finished.len());
        let mut gone = Vec::new();
        for done in finished {
            self.in_flight = self.in_flight.saturating_sub(1);
            let state = self.addresses.entry(done.address.clone()).or_default();
            state.running = state.running.saturating_sub(1);
            match done.outcome {
                CallOutcome::Delivered => {
                    state.consecutive_failures = 0;
                    debug!(address = %done.address, event_id = %done.event_id, "delivered");
                    settlements.push(Settlement::Delivered { id: done.id });
                }
                CallOutcome::Gone(reason) => {
                    info!(address = %done.address, %reason, "the subscriber is gone; removing its subscriptions");
                    settlements.push(Settlement::Delivered { id: done.id });
                    gone.push(done.address);
                }
                CallOutcome::Failed(reason) => {
                    state.consecutive_failures += 1;
                    match self
                        .options
                        .retry
                        .after_failure(done.attempts, done.created_at, now)
                    {
                        Decision::RetryAt(at) => {
                            warn!(address = %done.address, event_id = %done.event_id, attempts = done.attempts, %reason, "delivery failed; will retry");
                            settlements.push(Settlement::Retry {
                                id: done.id,
                                at,
                                error: reason,
                            });
                        }
                        Decision::DeadLetter => {
                            error!(address = %done.address, event_id = %done.event_id, attempts = done.attempts, %reason, "delivery dead-lettered");
                            settlements.push(Settlement::Dead {
                                id: done.id,
                                error: reason,
                            });
                        }
                    }
                    if state.consecutive_failures >= PAUSE_AFTER_FAILURES {
                        let pause = self
                            .options
                            .retry
                            .delay(state.consecutive_failures - PAUSE_AFTER_FAILURES + 1)
                            .min(MAX_PAUSE);
                        state.paused_until = Some(Instant::now() + pause);
                        // Hand back what waits for this address instead of
                        // holding its claims through the pause.
                        let at = now + i64::try_from(pause.as_micros()).unwrap_or(i64::MAX);
                        for waiting in state.waiting.drain(..) {
                            self.in_flight = self.in_flight.saturating_sub(1);
                            settlements.push(Settlement::Release { id: waiting.id, at });
                        }
                    }
                }
            }
        }
        if let Err(error) = self.store.settle(&settlements).await {
            // The rows stay claimed; their lease ends and they are retried:
            // at-least-once, never lost.
            error!(%error, deliveries = settlements.len(), "could not record delivery outcomes");
        }
        for address in gone {
            if let Some(state) = self.addresses.get_mut(&address) {
                self.in_flight = self.in_flight.saturating_sub(state.waiting.len());
                state.waiting.clear();
            }
            self.bindings.forget(&address);
            match self.store.remove_address(&address).await {
                Ok(_) => {
                    if let Err(error) = self.index.reload(self.store.as_ref()).await {
                        warn!(%error, "could not reload subscriptions after removing a gone address");
                    }
                }
                Err(error) => {
                    warn!(%address, %error, "could not remove the subscriptions of a gone address")
                }
            }
        }
    }

    fn next_unpause(&self) -> Option<Instant> {
        self.addresses.values().filter_map(|s| s.paused_until).min()
    }

    async fn drain(mut self) {
        self.calls.close();
        let deadline = Instant::now() + self.options.lease / 2;
        let mut finished = Vec::new();
        while !self.calls.is_empty() || !self.finished_rx.is_empty() {
            tokio::select! {
                Some(done) = self.finished_rx.recv() => finished.push(done),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        while let Ok(done) = self.finished_rx.try_recv() {
            finished.push(done);
        }
        self.settle(finished).await;
        match self.store.release_claims(&self.options.node).await {
            Ok(released) if released > 0 => {
                info!(released, "returned unfinished deliveries to the queue")
            }
            Ok(_) => {}
            Err(error) => {
                warn!(%error, "could not return unfinished deliveries; they return when their lease ends")
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
