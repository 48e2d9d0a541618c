//! `herald serve`: load the configuration and contracts, then run the broker
//! (and the EWS adapter, when the config names one) until SIGINT or SIGTERM.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::ContractRegistry,
    config::{ServeFile, ServeOverrides, ServeSettings},
    ews::{self, config::EwsConfig},
    server::{App, ServeOptions, serve_app, shutdown_signal},
    store,
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
    /// Payload bytes a transient subscriber's queue holds before it lags (one
    /// event always fits) [default: 67108864].
    #[arg(long)]
    pub queue_bytes: Option<usize>,
    /// Where persistent subscriptions and the delivery queue live: a
    /// postgres:// URL, or an SQLite file path [default: herald.db].
    #[arg(long = "database-url", env = "DATABASE_URL")]
    pub database: Option<String>,
    /// This node's name on the deliveries it claims; keep it stable across
    /// restarts [default: HOSTNAME:PORT].
    #[arg(long)]
    pub node_id: Option<String>,
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
            queue_bytes: args.queue_bytes,
            database: args.database,
            node_id: args.node_id,
        },
    )?;
    // Everything that can be wrong with the configuration is found before the
    // broker opens its store or says it is listening.
    let registry = Arc::new(load_registry(&settings)?);
    let ews_config = settings.ews.as_deref().map(EwsConfig::load).transpose()?;
    let store = store::open(&settings.database).await?;
    let app = App::persistent(registry, settings.limits, store, settings.delivery.clone()).await?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let local = listener.local_addr()?;
    // One machine-readable line, so scripts and tests can use `--listen 127.0.0.1:0`.
    outln!("herald listening on {local}")?;
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            stop.cancel();
        }
    });
    let adapter = ews_config.map(|mut config| {
        config.broker = broker_url(local);
        tokio::spawn(ews::run(config, None, stop.clone().cancelled_owned()))
    });
    serve_app(
        listener,
        app,
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

/// Where the in-process EWS adapter reaches this broker listening on `local`.
fn broker_url(local: SocketAddr) -> String {
    let host = if local.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local.port())
    } else {
        local
    };
    format!("http://{host}")
}

/// The built-in contracts plus every configured .proto file.
pub fn load_registry(settings: &ServeSettings) -> anyhow::Result<ContractRegistry> {
    let mut builder = ContractRegistry::builder();
    for path in &settings.proto {
        builder = builder.load_proto_file(path, &settings.proto_include)?;
    }
    Ok(builder.build())
}
