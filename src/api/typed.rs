//! Typed publishing: a publisher calls `/<contract>/<operation>` on the broker
//! with the contract's own generated client, and the broker treats the call as
//! FireEvent with the request as payload. Paths that are not a registered
//! operation get UNIMPLEMENTED, as from any gRPC server.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use tonic::{
    Request, Response, Status,
    body::Body,
    metadata::MetadataMap,
    server::{Grpc, UnaryService},
};

use super::codec::RawCodec;
use crate::broker::{Broker, EventDraft};

/// Metadata a typed publisher may send to set the event's id and source.
pub const EVENT_ID_HEADER: &str = "herald-event-id";
pub const SOURCE_HEADER: &str = "herald-source";

/// The fallback service of the broker's router.
#[derive(Clone)]
pub struct TypedPublish {
    broker: Broker,
}

impl TypedPublish {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }
}

impl<B> tower::Service<http::Request<B>> for TypedPublish
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let broker = self.broker.clone();
        Box::pin(async move {
            let Some((contract, operation)) = broker.registry().operation_for_path(&path) else {
                let status = Status::unimplemented(format!(
                    "no method at {path}: call one of Herald's services or an operation of a \
                     registered contract ({})",
                    broker.registry().contract_names().join(", ")
                ));
                return Ok(status.into_http());
            };
            // Slightly over the limit, the broker refuses the payload naming the
            // limit (RESOURCE_EXHAUSTED); far over, tonic stops reading it.
            let limit = broker.limits().max_payload_bytes + super::ENVELOPE_SLACK_BYTES;
            let mut grpc = Grpc::new(RawCodec).apply_max_message_size_config(Some(limit), None);
            let handler = Fire {
                broker,
                contract,
                operation,
            };
            Ok(grpc.unary(handler, request).await)
        })
    }
}

/// One typed call, turned into a fire.
struct Fire {
    broker: Broker,
    contract: String,
    operation: String,
}

impl UnaryService<Bytes> for Fire {
    type Response = Bytes;
    type Future = BoxFuture<'static, Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let broker = self.broker.clone();
        let contract = std::mem::take(&mut self.contract);
        let operation = std::mem::take(&mut self.operation);
        Box::pin(async move {
            let metadata = request.metadata();
            let draft = EventDraft {
                id: text(metadata, EVENT_ID_HEADER),
                source: text(metadata, SOURCE_HEADER).unwrap_or_default(),
                contract,
                operation,
                payload: request.into_inner(),
                ..EventDraft::default()
            };
            broker.fire(draft).await?;
            // Every operation answers with an empty message (google.protobuf.Empty
            // or any message type: an empty body decodes as its default).
            Ok(Response::new(Bytes::new()))
        })
    }
}

fn text(metadata: &MetadataMap, key: &str) -> Option<String> {
    metadata
        .get(key)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}
