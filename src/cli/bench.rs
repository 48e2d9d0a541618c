//! `herald bench`: run a benchmark and print its table (Markdown, ready for
//! docs/BENCHMARKS.md). The work lives in `crate::bench`; this is arguments
//! and output only.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use tokio::net::TcpListener;

use crate::{
    bench::{
        durable::{self, DurablePlan},
        fanout::{self, FanoutPlan, System},
        herald::{HeraldOptions, Placement, bench_registry},
        idle::{self, IdlePlan},
        nats, redis, report,
        workload::Workload,
    },
    broker::{Broker, DEFAULT_QUEUE_CAPACITY, Limits},
    server::{ServeOptions, serve, shutdown_signal},
};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Fan events out to many subscribers; Herald, NATS core and Redis side by side.
    Fanout(FanoutArgs),
    /// The broker's resident memory per idle subscriber stream.
    Idle(IdleArgs),
    /// Persistent delivery end to end (fire, commit, dispatch, receipt) on
    /// PostgreSQL and SQLite.
    Durable(DurableArgs),
    /// Run a broker that knows the benchmark contract (for `fanout --broker child`).
    #[command(hide = true)]
    Broker(BrokerArgs),
}

#[derive(Debug, clap::Args)]
pub struct FanoutArgs {
    /// Subscribers, each on its own connection.
    #[arg(long, default_value_t = 100, value_parser = at_least_one())]
    pub subscribers: usize,
    /// Events to publish; each goes to every subscriber.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub events: u64,
    /// Size of each event's payload in bytes.
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Offer this many events per second (for latency); unset = as fast as possible.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: Option<u32>,
    /// Without --rate: how many events the publisher may run ahead of the
    /// slowest subscriber (0 = no limit: measures how fast buffers fill).
    #[arg(long, default_value_t = 256)]
    pub window: u64,
    /// Systems to measure, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "herald,nats,redis"
    )]
    pub systems: Vec<System>,
    /// Where Herald's broker runs.
    #[arg(long, value_enum, default_value = "in-process")]
    pub broker: Placement,
    /// Events each Herald subscriber's queue holds before it lags.
    #[arg(long, default_value_t = DEFAULT_QUEUE_CAPACITY, value_parser = at_least_one())]
    pub queue_capacity: usize,
    /// NATS server (loopback).
    #[arg(long, default_value = nats::DEFAULT_ADDRESS)]
    pub nats: SocketAddr,
    /// Redis server (loopback).
    #[arg(long, default_value = redis::DEFAULT_ADDRESS)]
    pub redis: SocketAddr,
    /// Longest one system's run may take, in seconds [default: 60, plus the
    /// paced duration when --rate is set].
    #[arg(long)]
    pub timeout: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct DurableArgs {
    /// Persistent gRPC subscribers, each its own server in this process.
    #[arg(long, default_value_t = 1, value_parser = at_least_one())]
    pub subscribers: usize,
    /// Events to fire; each goes to every subscriber.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub events: u64,
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Offer this many events per second, one FireEvent call each (times the
    /// calls too); unset = FireEvents as fast as delivered.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: Option<u32>,
    /// Without --rate: how many events the publisher may run ahead of the
    /// slowest subscriber.
    #[arg(long, default_value_t = 8192)]
    pub window: u64,
    /// Backends to measure, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "postgres,sqlite"
    )]
    pub backends: Vec<durable::Backend>,
    /// Calls in flight to one subscriber (the broker's `[delivery]
    /// per_address_in_flight).
    #[arg(long, default_value_t = crate::delivery::DispatcherOptions::default().per_address_in_flight, value_parser = at_least_one())]
    pub per_address_in_flight: usize,
    /// The PostgreSQL server to create a scratch database on (loopback only).
    #[arg(long, env = "DATABASE_URL", default_value = durable::DEFAULT_POSTGRES)]
    pub database_url: String,
    /// Longest one backend's run may take, in seconds [default: 120, plus the
    /// paced duration when --rate is set].
    #[arg(long)]
    pub timeout: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct IdleArgs {
    /// Idle subscriber streams to open.
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one())]
    pub subscribers: usize,
    /// Streams sharing one HTTP/2 connection.
    #[arg(long, default_value_t = 100, value_parser = at_least_one())]
    pub streams_per_connection: usize,
}

#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    #[arg(long, default_value_t = DEFAULT_QUEUE_CAPACITY, value_parser = at_least_one())]
    pub queue_capacity: usize,
}

/// Generous room for one system's run beyond its paced duration.
const BASE_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Fanout(args) => run_fanout(args).await,
        BenchCommand::Idle(args) => run_idle(args).await,
        BenchCommand::Durable(args) => run_durable(args).await,
        BenchCommand::Broker(args) => run_broker(args).await,
    }
}

/// Counts that must be at least 1 (subscribers, queue sizes, limits).
pub(crate) fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// `--timeout` seconds, or the base plus the paced duration of a `--rate` run.
fn run_timeout(seconds: Option<u64>, base: Duration, events: u64, rate: Option<u32>) -> Duration {
    match seconds {
        Some(seconds) => Duration::from_secs(seconds),
        None => {
            base + rate
                .map(|rate| Duration::from_secs_f64(events as f64 / f64::from(rate)))
                .unwrap_or_default()
        }
    }
}

async fn run_fanout(args: FanoutArgs) -> anyhow::Result<()> {
    for (flag, address) in [("--nats", args.nats), ("--redis", args.redis)] {
        if !address.ip().is_loopback() {
            bail!("{flag} must be a loopback address; got {address}");
        }
    }
    let timeout = run_timeout(args.timeout, BASE_TIMEOUT, args.events, args.rate);
    let plan = FanoutPlan {
        workload: Workload {
            subscribers: args.subscribers,
            events: args.events,
            payload_bytes: args.payload_bytes,
            rate: args.rate,
            window: args.window,
            timeout,
        },
        systems: args.systems,
        herald: HeraldOptions {
            placement: args.broker,
            queue_capacity: args.queue_capacity,
        },
        nats_address: args.nats.to_string(),
        redis_address: args.redis.to_string(),
    };
    let placement = match args.broker {
        Placement::InProcess => "in this process",
        Placement::Child => "in a child process",
    };
    outln!(
        "fan-out: {}",
        report::describe_workload(&plan.workload, placement)
    )?;
    outln!("machine: {}", report::describe_machine())?;
    outln!()?;
    let rows = fanout::run(&plan).await;
    outln!("{}", report::fanout_table(&rows))?;
    Ok(())
}

async fn run_durable(args: DurableArgs) -> anyhow::Result<()> {
    let timeout = run_timeout(args.timeout, 2 * BASE_TIMEOUT, args.events, args.rate);
    let plan = DurablePlan {
        workload: Workload {
            subscribers: args.subscribers,
            events: args.events,
            payload_bytes: args.payload_bytes,
            rate: args.rate,
            window: args.window,
            timeout,
        },
        backends: args.backends,
        postgres: args.database_url,
        per_address_in_flight: args.per_address_in_flight,
    };
    outln!(
        "persistent delivery: {}",
        report::describe_workload(&plan.workload, "in this process, with persistent delivery")
    )?;
    outln!("machine: {}", report::describe_machine())?;
    outln!()?;
    let rows = durable::run(&plan).await;
    outln!("{}", report::durable_table(&rows))?;
    Ok(())
}

async fn run_idle(args: IdleArgs) -> anyhow::Result<()> {
    outln!(
        "idle subscribers: {} streams, {} per connection, on a `herald serve` child process",
        args.subscribers,
        args.streams_per_connection
    )?;
    outln!("machine: {}", report::describe_machine())?;
    outln!()?;
    let report = idle::run(IdlePlan {
        subscribers: args.subscribers,
        streams_per_connection: args.streams_per_connection,
    })
    .await?;
    outln!("{}", report::idle_table(&report))?;
    Ok(())
}

async fn run_broker(args: BrokerArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "the benchmark broker listens on loopback only; got {}",
            args.listen
        );
    }
    let limits = Limits {
        queue_capacity: args.queue_capacity,
        ..Limits::default()
    };
    let broker = Broker::new(bench_registry()?, limits);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    outln!("herald listening on {}", listener.local_addr()?)?;
    serve(listener, broker, ServeOptions::default(), shutdown_signal()).await?;
    Ok(())
}
