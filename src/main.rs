//! The `herald` binary: parse the command line, set up logging, run, and turn
//! any error into one line on stderr and a non-zero exit.

use std::process::ExitCode;

use clap::Parser;
use herald::cli::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    herald::delivery::binding::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // async-nats (used by `bench`) logs every connection event at info.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`herald admin list | head -1`):
        // nothing is wrong, there is just nobody left to tell.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
