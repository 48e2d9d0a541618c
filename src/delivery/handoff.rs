//! The fast path from the writer to this node's dispatcher: deliveries the
//! writer stores as already claimed by this node are handed over in memory,
//! so the dispatcher calls their subscribers without a claim query and
//! without reading the event back. The dispatcher's capacity is a semaphore
//! both sides draw from: one permit per delivery claimed, handed over or
//! in a call. When it is exhausted, deliveries are stored pending and claimed
//! later like any other.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use crate::store::ClaimedDelivery;

/// The writer's end.
#[derive(Clone)]
pub struct Handoff {
    slots: Arc<Semaphore>,
    deliveries: mpsc::UnboundedSender<ClaimedDelivery>,
}

/// The dispatcher's end.
pub struct Intake {
    pub slots: Arc<Semaphore>,
    /// Unbounded as a channel, bounded by the permits its senders hold.
    pub deliveries: mpsc::UnboundedReceiver<ClaimedDelivery>,
}

/// A handoff pair whose dispatcher holds at most `capacity` deliveries.
pub fn channel(capacity: usize) -> (Handoff, Intake) {
    let slots = Arc::new(Semaphore::new(capacity.max(1)));
    let (deliveries, received) = mpsc::unbounded_channel();
    (
        Handoff {
            slots: Arc::clone(&slots),
            deliveries,
        },
        Intake {
            slots,
            deliveries: received,
        },
    )
}

impl Handoff {
    /// Reserves room for `count` deliveries, all or none.
    pub fn reserve(&self, count: usize) -> bool {
        let Ok(count) = u32::try_from(count) else {
            return false;
        };
        match self.slots.try_acquire_many(count) {
            Ok(permits) => {
                permits.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back room reserved for deliveries that were not handed over.
    pub fn unreserve(&self, count: usize) {
        self.slots.add_permits(count);
    }

    /// Hands over a delivery whose room was reserved. If the dispatcher is
    /// gone, the room is given back and the stored claim runs out by itself.
    pub fn hand_over(&self, delivery: ClaimedDelivery) {
        if self.deliveries.send(delivery).is_err() {
            self.unreserve(1);
        }
    }
}
