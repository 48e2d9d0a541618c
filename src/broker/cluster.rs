//! The seam for running several broker nodes: a node shares each event it fires
//! with the others, which deliver it to their own transient subscribers. A single
//! node implements it as a no-op; a NATS-backed bus plugs in here later.

use std::sync::Arc;

use super::SharedEvent;

pub trait ClusterBus: Send + Sync + 'static {
    /// Shares an event fired on this node with the other nodes. Must not wait.
    fn announce(&self, event: &Arc<SharedEvent>);
}

/// The bus of a broker that runs alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleNode;

impl ClusterBus for SingleNode {
    fn announce(&self, _event: &Arc<SharedEvent>) {}
}
