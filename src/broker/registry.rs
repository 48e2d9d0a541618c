//! The contract registry: which event contracts and operations exist, and what
//! their payloads look like. Contracts are known, not guessed: they come from the
//! built-in descriptors and from `.proto` files compiled in-process at start-up.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use prost::Message;
use prost_reflect::{DescriptorPool, MessageDescriptor, MethodDescriptor, ServiceDescriptor};
use thiserror::Error;

use super::{BrokerError, transcode};

/// The descriptor set compiled from `proto/` by build.rs.
pub const BUILTIN_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/herald_descriptor.bin"));

/// The contract every broker has: Exchange mailbox events.
pub const MAILBOX_EVENTS: &str = "herald.ews.v1.MailboxEvents";

/// The contract `herald bench` fires; registered only by the benchmark.
pub const BENCH_CONTRACT: &str = "herald.bench.v1.Bench";

/// Why the registry could not be built. Each stops start-up with a message that
/// names the file and what is wrong with it.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// `message` starts with `line:column:` when the compiler located the problem.
    #[error("{}:{message}", path.display())]
    Compile { path: PathBuf, message: String },

    #[error("{}: {message}", path.display())]
    Descriptor { path: PathBuf, message: String },

    #[error("contract '{contract}' is defined twice (second time in {})", path.display())]
    DuplicateContract { contract: String, path: PathBuf },

    #[error("two different proto files are both named '{name}' (the second is {}); rename one", path.display())]
    DuplicateFile { name: String, path: PathBuf },

    #[error("there is no service '{0}' in the built-in descriptors")]
    UnknownBuiltin(String),
}

/// Builds a [`ContractRegistry`]; see [`ContractRegistry::builder`].
#[derive(Debug)]
pub struct RegistryBuilder {
    pool: DescriptorPool,
    contracts: BTreeMap<String, ServiceDescriptor>,
}

impl RegistryBuilder {
    /// Registers a service of the built-in descriptors as a contract.
    pub fn with_builtin(mut self, contract: &str) -> Result<Self, RegistryError> {
        let service = self
            .pool
            .get_service_by_name(contract)
            .ok_or_else(|| RegistryError::UnknownBuiltin(contract.to_owned()))?;
        self.contracts.insert(contract.to_owned(), service);
        Ok(self)
    }

    /// Compiles one `.proto` file (imports are resolved against its own directory
    /// and `includes`) and registers every service in it as a contract.
    pub fn load_proto_file(self, path: &Path, includes: &[PathBuf]) -> Result<Self, RegistryError> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut search = vec![dir.to_path_buf()];
        search.extend(includes.iter().cloned());
        let compile_error = |message: String| RegistryError::Compile {
            path: path.to_path_buf(),
            message,
        };
        let mut compiler =
            protox::Compiler::new(&search).map_err(|e| compile_error(e.to_string()))?;
        compiler.include_imports(true);
        compiler
            .open_file(path)
            .map_err(|e| compile_error(describe_protox_error(&e)))?;
        let set = compiler.file_descriptor_set();
        let own_name = compiler
            .files()
            .last()
            .map(|f| f.name().to_owned())
            .unwrap_or_default();
        self.add_descriptor_set(path, set, Some(&own_name))
    }

    /// Registers every service of an encoded `FileDescriptorSet` as a contract
    /// (used for contracts compiled ahead of time, like the tests' and the benchmark's).
    pub fn load_descriptor_set(self, origin: &Path, bytes: &[u8]) -> Result<Self, RegistryError> {
        let set = prost_types::FileDescriptorSet::decode(bytes).map_err(|e| {
            RegistryError::Descriptor {
                path: origin.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        self.add_descriptor_set(origin, set, None)
    }

    fn add_descriptor_set(
        mut self,
        origin: &Path,
        set: prost_types::FileDescriptorSet,
        only_file: Option<&str>,
    ) -> Result<Self, RegistryError> {
        for file in &set.file {
            let Some(existing) = self.pool.get_file_by_name(file.name()) else {
                continue;
            };
            if !file.name().starts_with("google/protobuf/")
                && existing.file_descriptor_proto() != file
            {
                return Err(RegistryError::DuplicateFile {
                    name: file.name().to_owned(),
                    path: origin.to_path_buf(),
                });
            }
        }
        let new_files: Vec<String> = set
            .file
            .iter()
            .filter(|f| only_file.is_none_or(|only| f.name() == only))
            .filter(|f| self.pool.get_file_by_name(f.name()).is_none())
            .map(|f| f.name().to_owned())
            .collect();
        self.pool
            .add_file_descriptor_set(set)
            .map_err(|e| RegistryError::Descriptor {
                path: origin.to_path_buf(),
                message: e.to_string(),
            })?;
        for name in new_files {
            let Some(file) = self.pool.get_file_by_name(&name) else {
                continue;
            };
            for service in file.services() {
                let full_name = service.full_name().to_owned();
                if self.contracts.contains_key(&full_name) {
                    return Err(RegistryError::DuplicateContract {
                        contract: full_name,
                        path: origin.to_path_buf(),
                    });
                }
                self.contracts.insert(full_name, service);
            }
        }
        Ok(self)
    }

    pub fn build(self) -> ContractRegistry {
        ContractRegistry {
            pool: self.pool,
            contracts: self.contracts,
        }
    }
}

/// Renders a protox error as `line:column: message` when it has a location
/// (the caller prefixes the path), or ` message` when it has none.
fn describe_protox_error(error: &protox::Error) -> String {
    use miette::Diagnostic;
    let message = error.to_string();
    let located = error.source_code().and_then(|source| {
        let label = error.labels()?.next()?;
        let span = source.read_span(label.inner(), 0, 0).ok()?;
        Some(format!(
            "{}:{}: {message}",
            span.line() + 1,
            span.column() + 1
        ))
    });
    located.unwrap_or_else(|| format!(" {message}"))
}

/// Every known event contract and operation. Immutable once built; shared by
/// reference between the publish path, the subscription path and reflection.
#[derive(Debug, Clone)]
pub struct ContractRegistry {
    /// Every descriptor the broker knows, including its own API and imports.
    pool: DescriptorPool,
    /// Contract full name → its service descriptor.
    contracts: BTreeMap<String, ServiceDescriptor>,
}

impl ContractRegistry {
    /// A builder holding the built-in descriptors, with `herald.ews.v1.MailboxEvents`
    /// already registered.
    pub fn builder() -> RegistryBuilder {
        let pool = DescriptorPool::decode(BUILTIN_DESCRIPTORS)
            .expect("build.rs wrote a valid descriptor set");
        let builder = RegistryBuilder {
            pool,
            contracts: BTreeMap::new(),
        };
        builder
            .with_builtin(MAILBOX_EVENTS)
            .expect("the built-in descriptors define MailboxEvents")
    }

    /// Every registered contract name, sorted.
    pub fn contract_names(&self) -> Vec<String> {
        self.contracts.keys().cloned().collect()
    }

    pub fn contract(&self, contract: &str) -> Result<&ServiceDescriptor, BrokerError> {
        self.contracts
            .get(contract)
            .ok_or_else(|| BrokerError::UnknownContract {
                contract: contract.to_owned(),
                known: self.contract_names(),
            })
    }

    /// The operation of a contract; both must exist.
    pub fn operation(
        &self,
        contract: &str,
        operation: &str,
    ) -> Result<MethodDescriptor, BrokerError> {
        let service = self.contract(contract)?;
        service
            .methods()
            .find(|m| m.name() == operation)
            .ok_or_else(|| BrokerError::UnknownOperation {
                contract: contract.to_owned(),
                operation: operation.to_owned(),
                known: service.methods().map(|m| m.name().to_owned()).collect(),
            })
    }

    /// Checks a subscription filter: the contract must exist and the operation
    /// must be empty (every operation) or one of the contract's.
    pub fn check_filter(&self, contract: &str, operation: &str) -> Result<(), BrokerError> {
        if operation.is_empty() {
            self.contract(contract).map(|_| ())
        } else {
            self.operation(contract, operation).map(|_| ())
        }
    }

    /// The payload type of an operation.
    pub fn payload_type(
        &self,
        contract: &str,
        operation: &str,
    ) -> Result<MessageDescriptor, BrokerError> {
        self.operation(contract, operation).map(|m| m.input())
    }

    /// Checks that `payload` decodes as the operation's request type.
    pub fn validate_payload(
        &self,
        contract: &str,
        operation: &str,
        payload: &[u8],
    ) -> Result<(), BrokerError> {
        let descriptor = self.payload_type(contract, operation)?;
        transcode::decode(&descriptor, payload)
            .map(|_| ())
            .map_err(|reason| BrokerError::InvalidPayload {
                contract: contract.to_owned(),
                operation: operation.to_owned(),
                message_type: descriptor.full_name().to_owned(),
                reason,
            })
    }

    /// Resolves a gRPC path `/<contract>/<operation>` to a registered operation.
    pub fn operation_for_path(&self, path: &str) -> Option<(String, String)> {
        let (contract, operation) = path.strip_prefix('/')?.split_once('/')?;
        self.operation(contract, operation).ok()?;
        Some((contract.to_owned(), operation.to_owned()))
    }

    /// Every descriptor, as an encoded `FileDescriptorSet` (for server reflection).
    pub fn encoded_file_descriptor_set(&self) -> Vec<u8> {
        self.pool.encode_to_vec()
    }

    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }
}
