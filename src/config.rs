//! `herald serve` configuration: a TOML file, overridden by command-line flags.
//! Relative paths in the file are relative to the file itself.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    broker::{DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_QUEUE_BYTES, DEFAULT_QUEUE_CAPACITY, Limits},
    delivery::{BindingOptions, DeliveryOptions, DispatcherOptions, retry::RetryPolicy},
    server::DEFAULT_DRAIN_TIMEOUT,
    store::{DEFAULT_SQLITE_FILE, StoreLocation},
};

/// The address `herald serve` listens on and clients call by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// The server URL clients use by default.
pub const DEFAULT_SERVER_URL: &str = "http://127.0.0.1:50051";

/// The `[serve]`-level keys of a config file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    /// Address to listen on, e.g. "0.0.0.0:50051".
    pub listen: Option<SocketAddr>,
    /// `.proto` files whose services are event contracts.
    #[serde(default)]
    pub proto: Vec<PathBuf>,
    /// Extra directories to resolve `import`s in those files.
    #[serde(default)]
    pub proto_include: Vec<PathBuf>,
    pub max_payload_bytes: Option<usize>,
    pub queue_capacity: Option<usize>,
    /// Payload bytes a transient subscriber's queue holds before it lags.
    pub queue_bytes: Option<usize>,
    pub drain_timeout_seconds: Option<u64>,
    /// A `postgres://` URL, or the path of the SQLite file (default herald.db).
    pub database: Option<String>,
    /// This node's name on claimed deliveries; keep it stable across restarts.
    pub node_id: Option<String>,
    /// An EWS adapter config (`herald ews --config`) to run inside the broker,
    /// publishing to it.
    pub ews: Option<PathBuf>,
    #[serde(default)]
    pub delivery: DeliveryFile,
}

/// The `[delivery]` table: persistent delivery tuning.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryFile {
    pub max_attempts: Option<u32>,
    pub max_age_seconds: Option<u64>,
    pub retry_base_seconds: Option<f64>,
    pub retry_max_seconds: Option<f64>,
    pub call_timeout_seconds: Option<f64>,
    pub per_address_in_flight: Option<usize>,
    pub lease_seconds: Option<u64>,
    /// PEM file of extra root certificates for grpcs:// and https:// subscribers.
    pub tls_roots: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key} must be at least 1")]
    Zero { key: &'static str },
    #[error("{key} must be a positive number of seconds")]
    BadSeconds { key: &'static str },
    #[error(
        "delivery.lease_seconds ({lease}) must be more than twice delivery.call_timeout_seconds \
         ({call}): a claim must outlast its call, or another claim may deliver the event again"
    )]
    LeaseTooShort { lease: u64, call: f64 },
    #[error("database: {0}")]
    Database(#[from] crate::store::StoreError),
}

impl ServeFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut file: ServeFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in file
            .proto
            .iter_mut()
            .chain(file.proto_include.iter_mut())
            .chain(file.delivery.tls_roots.iter_mut())
            .chain(file.ews.iter_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(file)
    }
}

/// The effective settings of `herald serve`.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub listen: SocketAddr,
    pub proto: Vec<PathBuf>,
    pub proto_include: Vec<PathBuf>,
    pub limits: Limits,
    pub drain_timeout: Duration,
    pub database: StoreLocation,
    pub delivery: DeliveryOptions,
    /// The EWS adapter config to run in-process, if any.
    pub ews: Option<PathBuf>,
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct ServeOverrides {
    pub listen: Option<SocketAddr>,
    pub proto: Vec<PathBuf>,
    pub proto_include: Vec<PathBuf>,
    pub max_payload_bytes: Option<usize>,
    pub queue_capacity: Option<usize>,
    pub queue_bytes: Option<usize>,
    pub database: Option<String>,
    pub node_id: Option<String>,
}

impl ServeSettings {
    pub fn resolve(file: ServeFile, flags: ServeOverrides) -> Result<Self, ConfigError> {
        let max_payload_bytes = flags
            .max_payload_bytes
            .or(file.max_payload_bytes)
            .unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES);
        let queue_capacity = flags
            .queue_capacity
            .or(file.queue_capacity)
            .unwrap_or(DEFAULT_QUEUE_CAPACITY);
        if max_payload_bytes == 0 {
            return Err(ConfigError::Zero {
                key: "max_payload_bytes",
            });
        }
        if queue_capacity == 0 {
            return Err(ConfigError::Zero {
                key: "queue_capacity",
            });
        }
        let queue_bytes = flags
            .queue_bytes
            .or(file.queue_bytes)
            .unwrap_or(DEFAULT_QUEUE_BYTES);
        if queue_bytes == 0 {
            return Err(ConfigError::Zero { key: "queue_bytes" });
        }
        let mut proto = file.proto;
        proto.extend(flags.proto);
        let mut proto_include = file.proto_include;
        proto_include.extend(flags.proto_include);
        let listen = flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("the default address parses"));
        let database = StoreLocation::parse(
            flags
                .database
                .or(file.database)
                .as_deref()
                .unwrap_or(DEFAULT_SQLITE_FILE),
        )?;
        let node = flags
            .node_id
            .or(file.node_id)
            .unwrap_or_else(|| default_node_id(listen.port()));
        let delivery = delivery_options(file.delivery, node)?;
        Ok(Self {
            listen,
            proto,
            proto_include,
            limits: Limits {
                max_payload_bytes,
                queue_capacity,
                queue_bytes,
            },
            drain_timeout: file
                .drain_timeout_seconds
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            database,
            delivery,
            ews: file.ews,
        })
    }
}

fn delivery_options(file: DeliveryFile, node: String) -> Result<DeliveryOptions, ConfigError> {
    let seconds = |value: Option<f64>, key: &'static str, default: Duration| match value {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
        Some(_) => Err(ConfigError::BadSeconds { key }),
    };
    let defaults = DeliveryOptions::default();
    let retry_defaults = defaults.dispatcher.retry;
    let retry = RetryPolicy {
        max_attempts: file.max_attempts.unwrap_or(retry_defaults.max_attempts),
        max_age: file
            .max_age_seconds
            .map(Duration::from_secs)
            .unwrap_or(retry_defaults.max_age),
        base_delay: seconds(
            file.retry_base_seconds,
            "delivery.retry_base_seconds",
            retry_defaults.base_delay,
        )?,
        max_delay: seconds(
            file.retry_max_seconds,
            "delivery.retry_max_seconds",
            retry_defaults.max_delay,
        )?,
    };
    if retry.max_attempts == 0 {
        return Err(ConfigError::Zero {
            key: "delivery.max_attempts",
        });
    }
    let per_address_in_flight = file
        .per_address_in_flight
        .unwrap_or(defaults.dispatcher.per_address_in_flight);
    if per_address_in_flight == 0 {
        return Err(ConfigError::Zero {
            key: "delivery.per_address_in_flight",
        });
    }
    let lease = file
        .lease_seconds
        .map(Duration::from_secs)
        .unwrap_or(defaults.dispatcher.lease);
    let bindings = BindingOptions {
        call_timeout: seconds(
            file.call_timeout_seconds,
            "delivery.call_timeout_seconds",
            defaults.bindings.call_timeout,
        )?,
        extra_roots: file.tls_roots,
        ..defaults.bindings
    };
    // The dispatcher starts a call at most half a lease after its claim, and the
    // call timeout bounds the whole call, connecting included.
    if lease <= bindings.call_timeout * 2 {
        return Err(ConfigError::LeaseTooShort {
            lease: lease.as_secs(),
            call: bindings.call_timeout.as_secs_f64(),
        });
    }
    Ok(DeliveryOptions {
        dispatcher: DispatcherOptions {
            node,
            lease,
            per_address_in_flight,
            retry,
            ..defaults.dispatcher
        },
        bindings,
    })
}

/// `HOSTNAME:PORT`, stable across restarts so that a restarted node takes back
/// its own earlier claims. With port 0 the port says nothing, so the process id
/// stands in: two such nodes on one host must never share an id.
fn default_node_id(port: u16) -> String {
    if port == 0 {
        format!("{}:pid{}", hostname(), std::process::id())
    } else {
        format!("{}:{port}", hostname())
    }
}

/// This machine's name, for the default node id.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "herald".to_owned())
}
