//! The gRPC face of the broker: thin services that translate between the wire
//! and the core, assembled into one router with health and reflection.

pub mod codec;
pub mod convert;
pub mod persistent;
pub mod publish;
pub mod subscription;
pub mod typed;

use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::{
    broker::Broker,
    delivery::Admin,
    pb::v1::{
        persistent_subscription_service_server::PersistentSubscriptionServiceServer,
        publish_service_server::PublishServiceServer,
    },
};

/// Herald's own services on the port, by their generated names (the
/// persistent one only when persistent delivery is on): what health reports.
pub fn herald_services(persistent: bool) -> Vec<&'static str> {
    let mut names = vec![
        crate::pb::v1::publish_service_server::SERVICE_NAME,
        crate::pb::v1::subscription_service_server::SERVICE_NAME,
    ];
    if persistent {
        names.push(crate::pb::v1::persistent_subscription_service_server::SERVICE_NAME);
    }
    names
}

/// Room for the envelope around a payload at the size limit; also what a typed
/// call may exceed the limit by and still get the broker's own answer naming it.
pub(crate) const ENVELOPE_SLACK_BYTES: usize = 64 * 1024;

/// Errors building the router.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("building server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the registry's descriptors do not decode: {0}")]
    Descriptors(#[from] prost::DecodeError),
}

/// Every service the broker serves on its port, except health (whose reporter
/// the server keeps to announce shutdown).
pub fn routes(
    broker: &Broker,
    admin: Option<Admin>,
    stopping: &CancellationToken,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<Routes, ApiError> {
    use prost::Message;

    let max_message = broker.limits().max_payload_bytes + ENVELOPE_SLACK_BYTES;
    let descriptors = prost_types::FileDescriptorSet::decode(
        broker.registry().encoded_file_descriptor_set().as_slice(),
    )?;
    let advertised = advertised_services(broker, admin.is_some());
    let mut v1 = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(descriptors.clone())
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    let mut v1alpha = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(descriptors)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for name in &advertised {
        v1 = v1.with_service_name(name);
        v1alpha = v1alpha.with_service_name(name);
    }
    let reflection_v1 = v1.build_v1()?;
    let reflection_v1alpha = v1alpha.build_v1alpha()?;

    let mut routes = Routes::new(health);
    if let Some(admin) = admin {
        routes = routes.add_service(PersistentSubscriptionServiceServer::new(
            persistent::PersistentApi::new(admin),
        ));
    }
    let routes = routes
        .add_service(
            PublishServiceServer::new(publish::PublishApi::new(broker.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(subscription::SubscriptionServiceServer::new(
            subscription::SubscriptionApi::new(broker.clone(), stopping.clone()),
        ))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let router = routes
        .into_axum_router()
        .fallback_service(typed::TypedPublish::new(broker.clone()));
    Ok(Routes::from(router))
}

/// The services reflection lists: Herald's own, the standard ones on the same
/// port, and every registered contract (which publishers may call directly).
fn advertised_services(broker: &Broker, persistent: bool) -> Vec<String> {
    let standard = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    herald_services(persistent)
        .into_iter()
        .chain(standard)
        .map(str::to_owned)
        .chain(broker.registry().contract_names())
        .collect()
}
