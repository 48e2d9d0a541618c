//! What the CLI's client commands share: connecting to a broker, turning gRPC
//! errors into one readable line, and learning a contract's descriptors from
//! the broker's server reflection (so the CLI works with any contract).

use std::collections::BTreeMap;

use anyhow::{Context, anyhow, bail};
use prost::Message;
use prost_reflect::{DescriptorPool, MessageDescriptor, ServiceDescriptor};
use tokio_stream::StreamExt;
use tonic::{Status, transport::Channel};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// Opens a channel to the broker, failing fast when nothing listens there.
pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    let endpoint = Channel::from_shared(url.to_owned())
        .with_context(|| {
            format!("'{url}' is not a valid server URL (expected e.g. http://127.0.0.1:50051)")
        })?
        .connect_timeout(std::time::Duration::from_secs(5));
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to the broker at {url}"))
}

/// One line describing a status the broker answered with.
pub fn status_error(what: &str, status: Status) -> anyhow::Error {
    anyhow!("{what}: {:?}: {}", status.code(), status.message())
}

/// A contract as the broker describes it through server reflection.
pub struct RemoteContract {
    pub service: ServiceDescriptor,
}

impl RemoteContract {
    /// Fetches the descriptors of `contract` from the broker.
    pub async fn fetch(channel: Channel, contract: &str) -> anyhow::Result<Self> {
        let pool = fetch_pool(channel, contract).await?;
        let service = pool
            .get_service_by_name(contract)
            .ok_or_else(|| anyhow!("the broker does not describe a service named '{contract}'"))?;
        Ok(Self { service })
    }

    /// The payload type of `operation`, or an error listing the operations.
    pub fn payload_type(&self, operation: &str) -> anyhow::Result<MessageDescriptor> {
        match self.service.methods().find(|m| m.name() == operation) {
            Some(method) => Ok(method.input()),
            None => bail!(
                "contract '{}' has no operation '{operation}'; its operations: {}",
                self.service.full_name(),
                self.service
                    .methods()
                    .map(|m| m.name().to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// Asks reflection for the file defining `symbol`, then for every file it
/// imports, until the set is complete.
async fn fetch_pool(channel: Channel, symbol: &str) -> anyhow::Result<DescriptorPool> {
    let mut client = ServerReflectionClient::new(channel);
    let mut files: BTreeMap<String, prost_types::FileDescriptorProto> = BTreeMap::new();
    let mut wanted = vec![MessageRequest::FileContainingSymbol(symbol.to_owned())];
    while let Some(request) = wanted.pop() {
        let found = match reflect(&mut client, request).await {
            Ok(found) => found,
            Err(Reflection::NotFound(message)) if files.is_empty() => {
                let offered = list_services(&mut client).await.unwrap_or_default();
                bail!(
                    "unknown contract '{symbol}' ({message}); the broker offers: {}",
                    offered.join(", ")
                )
            }
            Err(Reflection::NotFound(message)) => bail!("server reflection: {message}"),
            Err(Reflection::Failed(error)) => return Err(error),
        };
        for file in found {
            files.entry(file.name().to_owned()).or_insert(file);
        }
        for file in files.values() {
            for dependency in &file.dependency {
                if !files.contains_key(dependency) {
                    wanted.push(MessageRequest::FileByFilename(dependency.clone()));
                }
            }
        }
        wanted.dedup();
    }
    let mut pool = DescriptorPool::new();
    pool.add_file_descriptor_protos(files.into_values())
        .context("the broker's descriptors are incomplete")?;
    Ok(pool)
}

enum Reflection {
    NotFound(String),
    Failed(anyhow::Error),
}

/// One reflection request on its own stream.
async fn reflect(
    client: &mut ServerReflectionClient<Channel>,
    request: MessageRequest,
) -> Result<Vec<prost_types::FileDescriptorProto>, Reflection> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let failed = |s: Status| match s.code() {
        tonic::Code::NotFound => Reflection::NotFound(s.message().to_owned()),
        _ => Reflection::Failed(status_error("server reflection failed", s)),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .map_err(failed)?
        .into_inner();
    let mut files = Vec::new();
    while let Some(response) = responses.next().await {
        match response.map_err(failed)?.message_response {
            Some(MessageResponse::FileDescriptorResponse(found)) => {
                for bytes in found.file_descriptor_proto {
                    let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).map_err(
                        |e| {
                            Reflection::Failed(anyhow!(
                                "the broker sent a descriptor that does not decode: {e}"
                            ))
                        },
                    )?;
                    files.push(file);
                }
            }
            Some(MessageResponse::ErrorResponse(error)) => {
                return Err(Reflection::NotFound(error.error_message));
            }
            _ => {}
        }
    }
    Ok(files)
}

/// The services the broker lists through reflection.
async fn list_services(
    client: &mut ServerReflectionClient<Channel>,
) -> anyhow::Result<Vec<String>> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let mut names = Vec::new();
    while let Some(response) = responses.next().await {
        if let Some(MessageResponse::ListServicesResponse(list)) = response?.message_response {
            names.extend(list.service.into_iter().map(|s| s.name));
        }
    }
    Ok(names)
}
