//! `herald ews`: run the EWS adapter from a config file, show its mailboxes'
//! state (`herald ews status`), or benchmark it (`herald ews bench`).

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};

use crate::{
    ews::{self, bench::BenchArgs, config::EwsConfig, store::StateStore},
    server::shutdown_signal,
};

#[derive(Debug, clap::Args)]
pub struct EwsArgs {
    /// The adapter's TOML configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<EwsCommand>,
}

#[derive(Debug, clap::Subcommand)]
pub enum EwsCommand {
    /// Show each mailbox's state, as the adapter last stored it.
    Status,
    /// Measure the adapter against the fake Exchange: events/s, latency, memory.
    Bench(BenchArgs),
}

pub async fn run(args: EwsArgs) -> anyhow::Result<()> {
    match args.command {
        Some(EwsCommand::Bench(bench)) => ews::bench::run(bench).await,
        Some(EwsCommand::Status) => status(&config_path(args.config)?).await,
        None => {
            let path = config_path(args.config)?;
            let config = EwsConfig::load(&path)?;
            ews::run(config, None, shutdown_signal()).await?;
            Ok(())
        }
    }
}

fn config_path(config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match config {
        Some(path) => Ok(path),
        None => bail!("--config FILE is required: the adapter's TOML configuration"),
    }
}

async fn status(path: &std::path::Path) -> anyhow::Result<()> {
    let config = EwsConfig::load(path)?;
    let store = StateStore::open_existing(&config.state)
        .await
        .context("cannot read the adapter's state (has it run with this config yet?)")?;
    let rows = store.statuses().await?;
    store.close().await;
    let now = ews::store::now_ms();
    outln!("{:<40} {:<12} {:>10}  DETAIL", "MAILBOX", "STATE", "SINCE")?;
    for mailbox in &config.mailboxes {
        match rows.iter().find(|r| r.mailbox == mailbox.address) {
            Some(row) => {
                let age =
                    Duration::from_millis(now.saturating_sub(row.updated_at_ms).max(0) as u64);
                outln!(
                    "{:<40} {:<12} {:>10}  {}",
                    row.mailbox,
                    row.state,
                    format!("{}s ago", age.as_secs()),
                    row.detail
                )?;
            }
            None => outln!("{:<40} {:<12} {:>10}", mailbox.address, "unknown", "-")?,
        }
    }
    Ok(())
}
