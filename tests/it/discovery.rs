//! Health and server reflection on the broker's port, and contracts loaded
//! from .proto files.

use std::path::Path;

use herald::broker::{ContractRegistry, Limits, RegistryError};
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{ORDERS, TestBroker, process::test_proto};

/// The services a reflection client of one protocol version lists (v1 and
/// v1alpha have identical shapes in different modules).
macro_rules! list_services {
    ($version:ident, $broker:expr) => {{
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new($broker.channel().await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection answers")
            .into_inner();
        let mut names: Vec<String> = Vec::new();
        while let Some(response) = responses.next().await {
            if let Some(MessageResponse::ListServicesResponse(list)) =
                response.expect("ok").message_response
            {
                names.extend(list.service.into_iter().map(|s| s.name));
            }
        }
        names
    }};
}

#[tokio::test]
async fn reflection_lists_herald_services_and_a_contract_loaded_from_a_proto_file() {
    let registry = ContractRegistry::builder()
        .load_proto_file(Path::new(&test_proto()), &[])
        .expect("the test proto compiles")
        .build();
    let broker = TestBroker::start_with(registry, Limits::default()).await;
    for names in [list_services!(v1, broker), list_services!(v1alpha, broker)] {
        for expected in [
            "herald.v1.PublishService",
            "herald.v1.SubscriptionService",
            "grpc.health.v1.Health",
            "herald.ews.v1.MailboxEvents",
            ORDERS,
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n == "herald.bench.v1.Bench"),
            "an unregistered contract is not advertised: {names:?}"
        );
    }
    // The listed contract is usable by name.
    let mut subscriber = broker.subscriber().await;
    subscriber.subscribe(ORDERS, "Placed").await.expect("ack");
    broker.stop().await;
}

#[tokio::test]
async fn health_reports_serving() {
    let broker = TestBroker::start().await;
    let mut health = HealthClient::new(broker.channel().await);
    for service in [
        "",
        "herald.v1.PublishService",
        "herald.v1.SubscriptionService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service '{service}'");
    }
    broker.stop().await;
}

#[test]
fn a_bad_proto_file_is_refused_with_file_line_and_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("broken.proto");
    std::fs::write(
        &path,
        "syntax = \"proto3\";\npackage acme;\n\nservice Broken {\n  rpc Fire(Missing) returns (Missing)\n}\n",
    )
    .expect("write");
    let error = ContractRegistry::builder()
        .load_proto_file(&path, &[])
        .expect_err("does not compile");
    assert!(matches!(error, RegistryError::Compile { .. }), "{error:?}");
    let message = error.to_string();
    // protox notices the missing ';' at the '}' on line 6.
    assert!(
        message.contains("broken.proto:6:1: expected ';'"),
        "{message}"
    );
}

#[test]
fn a_missing_proto_file_is_refused_naming_it() {
    let error = ContractRegistry::builder()
        .load_proto_file(Path::new("/nonexistent/acme.proto"), &[])
        .expect_err("no such file");
    assert!(error.to_string().contains("acme.proto"), "{error}");
}

#[test]
fn a_contract_defined_twice_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let body =
        "syntax = \"proto3\";\npackage acme;\nmessage M {}\nservice S { rpc E(M) returns (M); }\n";
    std::fs::create_dir_all(dir.path().join("a")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("b")).expect("mkdir");
    std::fs::write(dir.path().join("a/one.proto"), body).expect("write");
    std::fs::write(dir.path().join("b/two.proto"), body).expect("write");
    let error = ContractRegistry::builder()
        .load_proto_file(&dir.path().join("a/one.proto"), &[])
        .expect("first loads")
        .load_proto_file(&dir.path().join("b/two.proto"), &[])
        .expect_err("second clashes");
    assert!(error.to_string().contains("acme"), "{error}");
}
