//! The `herald` command line: one subcommand per module.

/// `println!` for command output, returning an error instead of panicking when
/// stdout is gone (`herald admin list | head -1`); `main` exits quietly on that.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        anyhow::Context::context(
            writeln!(std::io::stdout().lock(), $($arg)*),
            "writing to stdout",
        )
    }};
}

pub mod admin;
pub mod bench;
pub mod client;
pub mod ews;
pub mod fire;
pub mod listen;
pub mod serve;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "A publish-subscribe broker over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Subscribe to a contract and print each event as a JSON line.
    Listen(listen::ListenArgs),
    /// Fire one event whose payload is given as JSON.
    Fire(fire::FireArgs),
    /// Manage persistent subscriptions and the delivery queue.
    Admin(admin::AdminArgs),
    /// Run the Exchange (EWS) adapter: publish mailbox events into a broker.
    Ews(ews::EwsArgs),
    /// Measure the broker: fan-out throughput and latency, idle memory, persistent delivery.
    Bench(bench::BenchArgs),
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Listen(args) => listen::run(args).await,
        Command::Fire(args) => fire::run(args).await,
        Command::Admin(args) => admin::run(args).await,
        Command::Ews(args) => ews::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}
