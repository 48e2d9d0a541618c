//! The dispatcher: claims due deliveries from the store, calls subscribers
//! through their bindings, and records the outcome (delivered, retry later,
//! dead letter). A slow or dead subscriber never delays the others: each
//! address has its own limit on calls in flight, every call has a deadline,
//! and an address that keeps failing is paused for a while.
//!
//! Outcomes are written by a settler task in batches (one transaction for
//! whatever finished while the previous one committed), so the store's commit
//! rate never bounds the delivery rate.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{Notify, Semaphore, mpsc},
    time::{Instant, MissedTickBehavior},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use super::{
    binding::{Bindings, CallOutcome},
    handoff::Intake,
    index::SubscriptionIndex,
    retry::{Decision, RetryPolicy},
};
use crate::store::{Claim, ClaimedDelivery, Settlement, Store, StoreError, after, now_micros};

/// Most deliveries claimed in one query.
const CLAIM_BATCH: usize = 256;

/// Least time between two claims that did not come back full, so that a
/// stream of finished calls does not turn into a stream of claim queries.
const MIN_CLAIM_GAP: Duration = Duration::from_millis(5);

/// Deliveries handed over in memory that may wait behind one address's
/// running calls; beyond this they are stored pending and claimed later.
const MAX_WAITING_PER_ADDRESS: usize = 4096;

/// Most outcomes written in one transaction.
const SETTLE_BATCH: usize = 2048;

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
    /// How often the store is polled for deliveries that became due (retries)
    /// or were queued by another node.
    pub poll_interval: Duration,
    /// Deliveries claimed and not yet finished, across all addresses.
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
            max_in_flight: 8192,
            per_address_in_flight: 100,
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
    /// Claimed deliveries in the order they were claimed, with when.
    waiting: VecDeque<(Instant, ClaimedDelivery)>,
    consecutive_failures: u32,
    paused_until: Option<Instant>,
}

/// A claim query in progress.
type ClaimFuture = Pin<Box<dyn Future<Output = Result<Vec<ClaimedDelivery>, StoreError>> + Send>>;

/// The result of the claim in progress; never resolves when there is none.
async fn claim_result(
    claiming: &mut Option<(ClaimFuture, usize, Vec<String>)>,
) -> Result<Vec<ClaimedDelivery>, StoreError> {
    match claiming {
        Some((future, _, _)) => future.as_mut().await,
        None => std::future::pending().await,
    }
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    bindings: Arc<Bindings>,
    index: Arc<SubscriptionIndex>,
    options: DispatcherOptions,
    addresses: HashMap<String, AddressState>,
    /// One permit per delivery that is not held here (claimed, handed over,
    /// waiting or in a call); shared with the writer's handoff.
    slots: Arc<Semaphore>,
    /// Deliveries the writer stored as claimed by this node.
    handoffs: mpsc::UnboundedReceiver<ClaimedDelivery>,
    calls: TaskTracker,
    finished_tx: mpsc::Sender<Finished>,
    finished_rx: mpsc::Receiver<Finished>,
    /// To the settler; bounded, so a slow store slows dispatching down.
    settlements: mpsc::Sender<Settlement>,
    settler_rx: Option<mpsc::Receiver<Settlement>>,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        bindings: Arc<Bindings>,
        index: Arc<SubscriptionIndex>,
        intake: Intake,
        options: DispatcherOptions,
    ) -> Self {
        // Every claimed delivery sends one result: the channel never blocks a call.
        let (finished_tx, finished_rx) = mpsc::channel(options.max_in_flight.max(1));
        let (settlements, settler_rx) = mpsc::channel(options.max_in_flight.max(1) * 2);
        Self {
            store,
            bindings,
            index,
            options,
            addresses: HashMap::new(),
            slots: intake.slots,
            handoffs: intake.deliveries,
            calls: TaskTracker::new(),
            finished_tx,
            finished_rx,
            settlements,
            settler_rx: Some(settler_rx),
        }
    }

    /// Runs until `stop` is cancelled, then lets calls in flight finish (each
    /// has its deadline), records their outcomes and returns unstarted claims
    /// to the queue.
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
        let settler = match self.settler_rx.take() {
            Some(outcomes) => tokio::spawn(settle_loop(Arc::clone(&self.store), outcomes)),
            None => return,
        };
        let mut poll = tokio::time::interval(self.options.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Something may be due already (a restart with a backlog).
        let mut due = true;
        let mut blocked: Vec<String> = Vec::new();
        let mut next_claim = Instant::now();
        let mut store_down_until: Option<Instant> = None;
        // The claim in progress: it runs while calls keep starting and
        // finishing, so that the store's latency never idles the subscribers.
        let mut claiming: Option<(ClaimFuture, usize, Vec<String>)> = None;
        loop {
            while let Ok(done) = self.finished_rx.try_recv() {
                self.finish(done).await;
            }
            while let Ok(delivery) = self.handoffs.try_recv() {
                self.accept_handoff(delivery).await;
            }
            let now = Instant::now();
            let store_up = store_down_until.is_none_or(|t| now >= t);
            let freed = blocked.iter().any(|a| !self.is_busy(a, now));
            if claiming.is_none() && store_up && now >= next_claim && (due || freed) {
                claiming = self.claim(now);
            }
            self.start_calls().await;
            let timer = [
                store_down_until,
                (claiming.is_none() && due && self.room() > 0).then_some(next_claim),
                self.next_unpause(),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                () = stop.cancelled() => break,
                result = claim_result(&mut claiming) => {
                    let Some((_, limit, skipped)) = claiming.take() else { continue };
                    let now = Instant::now();
                    match result {
                        Ok(batch) => {
                            let full = batch.len() == limit;
                            self.slots.add_permits(limit.saturating_sub(batch.len()));
                            self.accept(batch);
                            due = full;
                            blocked = skipped;
                            store_down_until = None;
                            next_claim = if full { now } else { now + MIN_CLAIM_GAP };
                        }
                        Err(error) => {
                            warn!(%error, "claiming deliveries failed; retrying shortly");
                            self.slots.add_permits(limit);
                            store_down_until = Some(now + STORE_RETRY);
                        }
                    }
                }
                Some(done) = self.finished_rx.recv() => self.finish(done).await,
                Some(delivery) = self.handoffs.recv() => self.accept_handoff(delivery).await,
                () = wake.notified() => due = true,
                _ = poll.tick() => due = true,
                () = sleep_until(timer) => {}
            }
        }
        // A claim still running is abandoned (its rows return when released
        // below); dropping it now gives back the store connection it may hold.
        drop(claiming);
        self.drain().await;
        debug!("dispatcher drained its calls");
        drop(self.settlements);
        if let Err(error) = settler.await {
            error!(%error, "the settler failed");
        }
        debug!("settler finished");
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

    fn room(&self) -> usize {
        self.slots.available_permits()
    }

    /// An address that should not get more work now: a claim's worth of its
    /// deliveries already waits behind its running calls, or it is paused.
    fn is_busy(&self, address: &str, now: Instant) -> bool {
        self.addresses.get(address).is_some_and(|s| {
            s.waiting.len() >= CLAIM_BATCH || s.paused_until.is_some_and(|t| t > now)
        })
    }

    /// Starts claiming due deliveries for addresses that can take more: the
    /// future, the batch size asked for, and the addresses left out. `None`
    /// when there is no room.
    fn claim(&self, now: Instant) -> Option<(ClaimFuture, usize, Vec<String>)> {
        // Room for the whole batch is taken now; what does not come back is
        // given back with the result.
        let limit = self.room().min(CLAIM_BATCH);
        let permits = u32::try_from(limit).ok()?;
        if limit == 0 {
            return None;
        }
        self.slots.try_acquire_many(permits).ok()?.forget();
        let skipped: Vec<String> = self
            .addresses
            .keys()
            .filter(|address| self.is_busy(address, now))
            .cloned()
            .collect();
        let claim = Claim {
            node: self.options.node.clone(),
            limit,
            now: now_micros(),
            lease: self.options.lease,
            skip_addresses: skipped.clone(),
        };
        let store = Arc::clone(&self.store);
        let future = Box::pin(async move { store.claim(&claim).await });
        Some((future, limit, skipped))
    }

    /// Queues claimed deliveries behind their addresses.
    fn accept(&mut self, claimed: Vec<ClaimedDelivery>) {
        for delivery in claimed {
            self.addresses
                .entry(delivery.address.clone())
                .or_default()
                .waiting
                .push_back((Instant::now(), delivery));
        }
    }

    /// Starts calls for every address below its limit and not paused. Claims
    /// that waited half their lease go back to the queue instead (they return
    /// as due at once): started later, a call could outlive its claim, and
    /// another claim would deliver the event twice.
    async fn start_calls(&mut self) {
        let now = Instant::now();
        let stale_after = self.options.lease / 2;
        let mut stale = Vec::new();
        for state in self.addresses.values_mut() {
            while let Some((since, _)) = state.waiting.front() {
                if now.duration_since(*since) < stale_after {
                    break;
                }
                if let Some((_, delivery)) = state.waiting.pop_front() {
                    stale.push(delivery.id);
                }
            }
            if state.paused_until.is_some_and(|t| t > now) {
                continue;
            }
            state.paused_until = None;
            while state.running < self.options.per_address_in_flight {
                let Some((_, delivery)) = state.waiting.pop_front() else {
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
                            event_id: delivery.event.event().id.clone(),
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
        if !stale.is_empty() {
            debug!(
                released = stale.len(),
                "claims waited half their lease behind a busy subscriber; back to the queue"
            );
            self.slots.add_permits(stale.len());
            let at = now_micros();
            for id in stale {
                self.settle(Settlement::Release { id, at }).await;
            }
        }
    }

    /// Queues a delivery the writer handed over, unless its address is paused
    /// or has too many waiting: then it goes back to the store as pending.
    async fn accept_handoff(&mut self, delivery: ClaimedDelivery) {
        let now = Instant::now();
        let state = self.addresses.entry(delivery.address.clone()).or_default();
        let paused = state.paused_until.filter(|t| *t > now);
        if paused.is_none() && state.waiting.len() < MAX_WAITING_PER_ADDRESS {
            state.waiting.push_back((Instant::now(), delivery));
            return;
        }
        let later = paused.map_or(Duration::ZERO, |t| t - now);
        let at = after(now_micros(), later);
        self.slots.add_permits(1);
        self.settle(Settlement::Release {
            id: delivery.id,
            at,
        })
        .await;
    }

    async fn settle(&self, outcome: Settlement) {
        if self.settlements.send(outcome).await.is_err() {
            error!("the settler stopped; outcomes are lost and their deliveries will be retried");
        }
    }

    /// Accounts for a finished call and hands its outcome to the settler.
    async fn finish(&mut self, done: Finished) {
        self.slots.add_permits(1);
        let state = self.addresses.entry(done.address.clone()).or_default();
        state.running = state.running.saturating_sub(1);
        let mut outcomes = Vec::with_capacity(1);
        let mut gone = false;
        match done.outcome {
            CallOutcome::Delivered => {
                state.consecutive_failures = 0;
                debug!(address = %done.address, event_id = %done.event_id, "delivered");
                outcomes.push(Settlement::Delivered { id: done.id });
            }
            CallOutcome::Gone(reason) => {
                info!(address = %done.address, %reason, "the subscriber is gone; removing its subscriptions");
                outcomes.push(Settlement::Delivered { id: done.id });
                self.slots.add_permits(state.waiting.len());
                state.waiting.clear();
                gone = true;
            }
            CallOutcome::Failed(reason) => {
                state.consecutive_failures += 1;
                let now = now_micros();
                match self
                    .options
                    .retry
                    .after_failure(done.attempts, done.created_at, now)
                {
                    Decision::RetryAt(at) => {
                        warn!(address = %done.address, event_id = %done.event_id, attempts = done.attempts, %reason, "delivery failed; will retry");
                        outcomes.push(Settlement::Retry {
                            id: done.id,
                            at,
                            error: reason,
                        });
                    }
                    Decision::DeadLetter => {
                        error!(address = %done.address, event_id = %done.event_id, attempts = done.attempts, %reason, "delivery dead-lettered");
                        outcomes.push(Settlement::Dead {
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
                    let at = after(now, pause);
                    for (_, waiting) in state.waiting.drain(..) {
                        self.slots.add_permits(1);
                        outcomes.push(Settlement::Release { id: waiting.id, at });
                    }
                }
            }
        }
        for outcome in outcomes {
            self.settle(outcome).await;
        }
        if gone {
            self.remove_gone(done.address);
        }
    }

    /// Removes a gone address's subscriptions beside the calls (a database
    /// write and a reload must not stall every other subscriber), tracked with
    /// them so that shutdown waits for it.
    fn remove_gone(&self, address: String) {
        self.bindings.forget(&address);
        let store = Arc::clone(&self.store);
        let index = Arc::clone(&self.index);
        self.calls.spawn(async move {
            match store.remove_address(&address).await {
                Ok(_) => {
                    if let Err(error) = index.reload(store.as_ref()).await {
                        warn!(%error, "could not reload subscriptions after removing a gone address");
                    }
                }
                Err(error) => {
                    warn!(%address, %error, "could not remove the subscriptions of a gone address")
                }
            }
        });
    }

    fn next_unpause(&self) -> Option<Instant> {
        self.addresses.values().filter_map(|s| s.paused_until).min()
    }

    /// Lets calls in flight finish, within half a lease, and records them.
    async fn drain(&mut self) {
        self.calls.close();
        let deadline = Instant::now() + self.options.lease / 2;
        while !self.calls.is_empty() || !self.finished_rx.is_empty() {
            tokio::select! {
                Some(done) = self.finished_rx.recv() => self.finish(done).await,
                // Tracked work that reports nothing (removing a gone address).
                () = self.calls.wait() => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        while let Ok(done) = self.finished_rx.try_recv() {
            self.finish(done).await;
        }
    }
}

/// Writes outcomes in batches: one transaction for whatever arrived while the
/// previous one committed. Ends when the dispatcher drops its sender.
async fn settle_loop(store: Arc<dyn Store>, mut outcomes: mpsc::Receiver<Settlement>) {
    let mut batch = Vec::with_capacity(SETTLE_BATCH);
    while outcomes.recv_many(&mut batch, SETTLE_BATCH).await > 0 {
        if let Err(error) = store.settle(&batch).await {
            // The rows stay claimed; their lease ends and they are retried:
            // at-least-once, never lost.
            error!(%error, deliveries = batch.len(), "could not record delivery outcomes");
        }
        batch.clear();
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
