//! Herald: a publish-subscribe broker over gRPC. Transient subscribers hold a
//! live stream; persistent subscribers are addresses the broker calls; one
//! publish service fans each event out to both. See DESIGN.md for the map.

pub mod api;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod ews;
pub mod pb;
pub mod server;
pub mod store;
