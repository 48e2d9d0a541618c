//! The gRPC bindings (grpc://, grpcs://, unix://): call `/<contract>/<operation>`
//! on the subscriber with the payload bytes as they were fired, the event's id,
//! time and source in metadata. One lazily connected channel per address.

use std::time::Duration;

use dashmap::DashMap;
use hyper_util::rt::TokioIo;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use super::{
    BindingOptions, CallOutcome, EVENT_ID_HEADER, EVENT_TIME_HEADER, SOURCE_HEADER, causes,
};
use crate::{api::codec::RawCodec, delivery::address::Address, store::ClaimedDelivery};

pub struct GrpcBinding {
    /// Address text → its channel. Channels reconnect by themselves.
    channels: DashMap<String, Channel>,
    connect_timeout: Duration,
    extra_roots: Option<Vec<u8>>,
}

impl GrpcBinding {
    pub fn new(options: &BindingOptions, extra_roots: Option<&[u8]>) -> Self {
        Self {
            channels: DashMap::new(),
            connect_timeout: options.connect_timeout,
            extra_roots: extra_roots.map(<[u8]>::to_vec),
        }
    }

    pub fn forget(&self, address: &str) {
        self.channels.remove(address);
    }

    pub async fn deliver(&self, address: &Address, delivery: &ClaimedDelivery) -> CallOutcome {
        let channel = match self.channel(&delivery.address, address) {
            Ok(channel) => channel,
            Err(error) => return CallOutcome::Failed(error),
        };
        let event = delivery.event.event();
        let path = format!("/{}/{}", event.contract, event.operation);
        let Ok(path) = http::uri::PathAndQuery::try_from(path.as_str()) else {
            return CallOutcome::Failed(format!("'{path}' is not a valid gRPC path"));
        };
        let mut request = Request::new(event.payload.clone());
        let metadata = request.metadata_mut();
        let time = prost_types::Timestamp::from(event.time).to_string();
        for (key, value) in [
            (EVENT_ID_HEADER, event.id.as_str()),
            (EVENT_TIME_HEADER, time.as_str()),
            (SOURCE_HEADER, event.source.as_str()),
        ] {
            if let Ok(value) = MetadataValue::try_from(value) {
                metadata.insert(key, value);
            }
        }
        let mut client = tonic::client::Grpc::new(channel);
        if let Err(error) = client.ready().await {
            return CallOutcome::Failed(format!(
                "cannot reach the subscriber: {error}{}",
                causes(&error)
            ));
        }
        match client.unary(request, path, RawCodec).await {
            Ok(_) => CallOutcome::Delivered,
            Err(status) => CallOutcome::Failed(format!(
                "the subscriber answered {:?}: {}{}",
                status.code(),
                status.message(),
                causes(&status)
            )),
        }
    }

    fn channel(&self, key: &str, address: &Address) -> Result<Channel, String> {
        if let Some(channel) = self.channels.get(key) {
            return Ok(channel.clone());
        }
        let channel = self.build(address)?;
        self.channels.insert(key.to_owned(), channel.clone());
        Ok(channel)
    }

    fn build(&self, address: &Address) -> Result<Channel, String> {
        let endpoint = |uri: &str| {
            Endpoint::from_shared(uri.to_owned())
                .map(|e| e.connect_timeout(self.connect_timeout).tcp_nodelay(true))
                .map_err(|e| format!("invalid endpoint {uri}: {e}"))
        };
        match address {
            Address::Grpc { endpoint: uri } => Ok(endpoint(uri)?.connect_lazy()),
            Address::Grpcs {
                endpoint: uri,
                host,
            } => {
                let mut tls = ClientTlsConfig::new()
                    .domain_name(host.clone())
                    .with_native_roots();
                if let Some(pem) = &self.extra_roots {
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                Ok(endpoint(uri)?
                    .tls_config(tls)
                    .map_err(|e| format!("TLS setup for {uri}: {e}"))?
                    .connect_lazy())
            }
            Address::Unix { path } => {
                let path = path.clone();
                // The URI is required by the API but unused: the connector
                // below decides where to connect.
                Ok(
                    endpoint("http://unix.socket")?.connect_with_connector_lazy(tower::service_fn(
                        move |_| {
                            let path = path.clone();
                            async move {
                                let stream = tokio::net::UnixStream::connect(&path).await?;
                                Ok::<_, std::io::Error>(TokioIo::new(stream))
                            }
                        },
                    )),
                )
            }
            Address::Webhook { url } => Err(format!("{url} is a webhook, not a gRPC address")),
        }
    }
}
