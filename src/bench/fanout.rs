//! `herald bench fanout`: the same workload against Herald, NATS core and Redis
//! pub/sub, one after another (never at once, so they do not compete for the
//! machine), each as one row of the result. A peer that is down or fails gives
//! a row that says so; it never stops the others from being measured.

use tracing::info;

use super::{
    BenchError, herald,
    herald::HeraldOptions,
    measure::Measurement,
    nats, redis,
    workload::{Clock, Workload},
};

/// A system the benchmark can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    Herald,
    Nats,
    Redis,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::Herald => "Herald",
            System::Nats => "NATS core",
            System::Redis => "Redis pub/sub",
        }
    }
}

/// Everything one `bench fanout` run needs.
#[derive(Debug, Clone)]
pub struct FanoutPlan {
    pub workload: Workload,
    pub systems: Vec<System>,
    pub herald: HeraldOptions,
    pub nats_address: String,
    pub redis_address: String,
}

/// One system's result.
#[derive(Debug)]
pub enum Outcome {
    Measured(Measurement),
    /// Nothing listens where the system was looked for.
    Unreachable(String),
    /// The system was reached but the run failed.
    Failed(String),
}

#[derive(Debug)]
pub struct Row {
    pub system: System,
    pub outcome: Outcome,
}

/// Measures each system of the plan in turn.
pub async fn run(plan: &FanoutPlan) -> Vec<Row> {
    let mut rows = Vec::with_capacity(plan.systems.len());
    for &system in &plan.systems {
        info!(system = system.label(), "measuring");
        // A fresh origin per system: latencies are differences within one run.
        let clock = Clock::start();
        let result = match system {
            System::Herald => herald::run(&plan.workload, clock, plan.herald).await,
            System::Nats => nats::run(&plan.workload, clock, &plan.nats_address).await,
            System::Redis => redis::run(&plan.workload, clock, &plan.redis_address).await,
        };
        let outcome = match result {
            Ok(measurement) => Outcome::Measured(measurement),
            Err(error @ BenchError::Unreachable { .. }) => Outcome::Unreachable(error.to_string()),
            Err(error) => Outcome::Failed(error.to_string()),
        };
        rows.push(Row { system, outcome });
    }
    rows
}
