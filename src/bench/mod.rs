//! `herald bench`: how fast Herald's transient fan-out is, side by side with
//! NATS core and Redis pub/sub under the same workload, how much memory the
//! broker spends per idle subscriber stream, and how fast persistent delivery
//! is end to end on PostgreSQL and SQLite. Benchmarks report; they never
//! assert. Every run is bounded in count and time and talks to loopback only.

pub mod child;
pub mod durable;
pub mod fanout;
pub mod herald;
pub mod idle;
pub mod measure;
pub mod nats;
pub mod redis;
pub mod report;
pub mod workload;

use std::time::Duration;

/// How long connecting to a system under test may take before it counts as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a benchmark run, or one system's part of it, could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The system is not running where it was looked for; the others still run.
    #[error("not reachable at {address}: {reason}")]
    Unreachable { address: String, reason: String },

    /// The system under test failed during the run.
    #[error("{0}")]
    System(String),

    #[error("{what} did not finish within {after:?}")]
    Timeout { what: &'static str, after: Duration },

    /// Starting or stopping the broker under test failed.
    #[error("the broker under test: {0}")]
    Broker(String),

    #[error("latency histogram: {0}")]
    Histogram(String),

    #[error("a benchmark task failed: {0}")]
    Task(String),

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
