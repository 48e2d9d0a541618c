//! `herald serve` configuration: a TOML file, overridden by command-line flags.
//! Relative paths in the file are relative to the file itself.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    broker::{DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_QUEUE_CAPACITY, Limits},
    server::DEFAULT_DRAIN_TIMEOUT,
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
    pub drain_timeout_seconds: Option<u64>,
    /// An EWS adapter config (`herald ews --config`) to run inside the broker,
    /// publishing to it.
    pub ews: Option<PathBuf>,
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
        let mut proto = file.proto;
        proto.extend(flags.proto);
        let mut proto_include = file.proto_include;
        proto_include.extend(flags.proto_include);
        Ok(Self {
            listen: flags
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("the default address parses")),
            proto,
            proto_include,
            limits: Limits {
                max_payload_bytes,
                queue_capacity,
            },
            drain_timeout: file
                .drain_timeout_seconds
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            ews: file.ews,
        })
    }
}
