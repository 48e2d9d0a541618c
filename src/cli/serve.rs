//! `herald serve`: load the configuration and contracts, then run the broker
//! (and the EWS adapter, when the config names one) until SIGINT or SIGTERM.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{Broker, ContractRegistry},
    config::{ServeFile, ServeOverrides, ServeSettings},
    ews::{self, config::EwsConfig},
    server::{ServeOptions, serve, shutdown_signal},
};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// A .proto file whose services are event contracts; repeatable.
    #[arg(long = "proto", value_name = "FILE")]
    pub proto: Vec<PathBuf>,
    /// A directory to resolve imports of --proto files; repeatable.
    #[arg(long = "proto-include", value_name = "DIR")]
    pub proto_include: Vec<PathBuf>,
    /// A TOML file with the same settings (flags win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Largest accepted payload in bytes [default: 4194304].
    #[arg(long)]
    pub max_payload_bytes: Option<usize>,
    /// Events a transient subscriber's queue holds before it lags [default: 1024].
    #[arg(long)]
    pub queue_capacity: Option<usize>,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => ServeFile::load(path)?,
        None => ServeFile::default(),
    };
    let settings = ServeSettings::resolve(
        file,
        ServeOverrides {
            listen: args.listen,
            proto: args.proto,
            proto_include: args.proto_include,
            max_payload_bytes: args.max_payload_bytes,
            queue_capacity: args.queue_capacity,
        },
    )?;
    let registry = load_registry(&settings)?;
    let broker = Broker::new(registry, settings.limits);
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let local = listener.local_addr()?;
    // One machine-readable line, so scripts and tests can use `--listen 127.0.0.1:0`.
    println!("herald listening on {local}");
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            stop.cancel();
        }
    });
    let adapter = match &settings.ews {
        Some(path) => Some(tokio::spawn(ews::run(
            ews_config(path, local)?,
            None,
            stop.clone().cancelled_owned(),
        ))),
        None => None,
    };
    serve(
        listener,
        broker,
        ServeOptions {
            drain_timeout: settings.drain_timeout,
        },
        stop.clone().cancelled_owned(),
    )
    .await?;
    stop.cancel();
    if let Some(adapter) = adapter {
        adapter.await.context("the EWS adapter panicked")??;
    }
    Ok(())
}

/// The EWS adapter's config, publishing to this broker on `local`.
fn ews_config(path: &Path, local: SocketAddr) -> anyhow::Result<EwsConfig> {
    let mut config = EwsConfig::load(path)?;
    let host = if local.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local.port())
    } else {
        local
    };
    config.broker = format!("http://{host}");
    Ok(config)
}

/// The built-in contracts plus every configured .proto file.
pub fn load_registry(settings: &ServeSettings) -> anyhow::Result<ContractRegistry> {
    let mut builder = ContractRegistry::builder();
    for path in &settings.proto {
        builder = builder.load_proto_file(path, &settings.proto_include)?;
    }
    Ok(builder.build())
}
