//! Typed publishing: a contract's own generated client calls the broker.

use tonic::Code;

use crate::support::{ORDERS, TestBroker, order, orders::orders_client::OrdersClient};

#[tokio::test]
async fn a_generated_client_publishes_by_calling_the_operation() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    subscriber.subscribe(ORDERS, "Shipped").await.expect("ack");

    let mut client = OrdersClient::new(broker.channel().await);
    let mut request = tonic::Request::new(order("typed-1", 4));
    request
        .metadata_mut()
        .insert("herald-source", "orders-service".parse().expect("ascii"));
    client
        .shipped(request)
        .await
        .expect("the broker accepts a typed call");

    let event = subscriber.next_event().await;
    assert_eq!(event.contract, ORDERS);
    assert_eq!(event.operation, "Shipped");
    assert_eq!(event.source, "orders-service");
    let payload: crate::support::orders::Order =
        prost::Message::decode(event.payload).expect("decodes");
    assert_eq!(payload, order("typed-1", 4));
    broker.stop().await;
}

#[tokio::test]
async fn a_typed_call_to_an_unregistered_contract_is_unimplemented() {
    // The benchmark contract is compiled in but not registered here.
    let broker = TestBroker::start().await;
    let mut client = herald::pb::bench::bench_client::BenchClient::new(broker.channel().await);
    let status = client
        .tick(herald::pb::bench::Tick::default())
        .await
        .expect_err("not a registered contract");
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains(ORDERS), "{}", status.message());
    broker.stop().await;
}

#[tokio::test]
async fn a_typed_call_with_a_bad_payload_is_invalid_argument() {
    let broker = TestBroker::start().await;
    let mut raw = tonic::client::Grpc::new(broker.channel().await);
    raw.ready().await.expect("ready");
    let status = raw
        .unary::<bytes::Bytes, bytes::Bytes, _>(
            tonic::Request::new(bytes::Bytes::from_static(&[0xff, 0xff])),
            http::uri::PathAndQuery::from_static("/herald.test.v1.Orders/Placed"),
            herald::api::codec::RawCodec,
        )
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    broker.stop().await;
}

#[tokio::test]
async fn typed_calls_get_the_same_checks_as_fire_event() {
    let broker = TestBroker::start_with(
        crate::support::test_registry(),
        herald::broker::Limits {
            max_payload_bytes: 64,
            ..herald::broker::Limits::default()
        },
    )
    .await;
    let mut client = OrdersClient::new(broker.channel().await);

    let mut big = order("x", 1);
    big.order_id = "o".repeat(200);
    let status = client.placed(big).await.expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("64"), "{}", status.message());

    for (header, value) in [
        ("herald-event-id", "x".repeat(300)),
        ("herald-source", "s".repeat(2000)),
    ] {
        let mut request = tonic::Request::new(order("typed", 1));
        request
            .metadata_mut()
            .insert(header, value.parse().expect("ascii"));
        let status = client.placed(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{header}");
    }
    // Not UTF-8 in an ASCII metadata value is impossible; a binary one is ignored
    // by name, so the broker assigns the id itself.
    let mut request = tonic::Request::new(order("typed", 1));
    request.metadata_mut().insert_bin(
        "herald-event-id-bin",
        tonic::metadata::MetadataValue::from_bytes(b"\xff"),
    );
    client.placed(request).await.expect("accepted");
    broker.stop().await;
}
