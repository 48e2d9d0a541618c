//! PublishService: validation of every input, and FireEvents.

use herald::{
    broker::Limits,
    pb::v1::{Event, FireEventRequest},
};
use prost::Message;
use tonic::Code;

use crate::support::{ORDERS, TestBroker, fire, order, order_event, orders, test_registry};

async fn refused(broker: &TestBroker, request: FireEventRequest) -> tonic::Status {
    broker
        .publisher()
        .await
        .fire_event(request)
        .await
        .expect_err("the broker refuses it")
}

fn with_event(edit: impl FnOnce(&mut Event)) -> FireEventRequest {
    let mut request = order_event("Placed", &order("o", 1));
    edit(request.event.as_mut().expect("event"));
    request
}

#[tokio::test]
async fn bad_events_get_clear_errors_with_the_right_status_and_lose_nothing() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    subscriber.subscribe(ORDERS, "").await.expect("ack");

    let status = refused(&broker, FireEventRequest { event: None }).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("event"), "{}", status.message());

    let status = refused(&broker, with_event(|e| e.contract = "acme.Nope".into())).await;
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("acme.Nope") && status.message().contains(ORDERS));

    let status = refused(&broker, with_event(|e| e.operation = "Lost".into())).await;
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("Lost")
            && status.message().contains("Placed, Shipped, Cancelled")
    );

    let status = refused(&broker, with_event(|e| e.operation = String::new())).await;
    assert_eq!(status.code(), Code::NotFound);

    // Field 1 (a string) claims 5 bytes and has 1.
    let status = refused(
        &broker,
        with_event(|e| e.payload = vec![0x0a, 0x05, b'a'].into()),
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("herald.test.v1.Order"),
        "{}",
        status.message()
    );

    let status = refused(
        &broker,
        with_event(|e| e.payload = vec![0xff, 0xff, 0xff].into()),
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);

    // A string field that is not UTF-8.
    let status = refused(
        &broker,
        with_event(|e| e.payload = vec![0x0a, 0x01, 0xff].into()),
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);

    let status = refused(&broker, with_event(|e| e.id = "x".repeat(1000))).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("event id"),
        "{}",
        status.message()
    );

    // Ids and sources travel as gRPC metadata and HTTP headers: visible ASCII only.
    for (edit, what) in [
        (with_event(|e| e.id = "événement-1".into()), "event id"),
        (with_event(|e| e.id = "a\nb".into()), "event id"),
        (with_event(|e| e.source = "bad\0src".into()), "event source"),
        (with_event(|e| e.source = "café".into()), "event source"),
        (with_event(|e| e.source = "s".repeat(2000)), "event source"),
    ] {
        let status = refused(&broker, edit).await;
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(what), "{}", status.message());
    }

    let status = refused(
        &broker,
        with_event(|e| {
            e.time = Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -5,
            })
        }),
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);

    // None of that reached the subscriber; a good event still does.
    fire(&mut broker.publisher().await, "Placed", &order("good", 1)).await;
    let event = subscriber.next_event().await;
    assert_eq!(
        orders::Order::decode(event.payload)
            .expect("decodes")
            .order_id,
        "good"
    );
    broker.stop().await;
}

#[tokio::test]
async fn oversized_payloads_are_refused_with_the_limit_named() {
    let limits = Limits {
        max_payload_bytes: 1024,
        ..Limits::default()
    };
    let broker = TestBroker::start_with(test_registry(), limits).await;
    let at_limit = orders::Order {
        order_id: "x".repeat(1000),
        ..Default::default()
    };
    assert!(at_limit.encoded_len() <= 1024);
    fire(&mut broker.publisher().await, "Placed", &at_limit).await;

    let over = orders::Order {
        order_id: "x".repeat(1100),
        ..Default::default()
    };
    let status = refused(&broker, order_event("Placed", &over)).await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("1024"), "{}", status.message());

    // Far over, the message is refused by tonic before it is decoded (tonic
    // answers OUT_OF_RANGE there), still naming the limit.
    let huge = orders::Order {
        order_id: "x".repeat(1024 * 1024),
        ..Default::default()
    };
    let status = refused(&broker, order_event("Placed", &huge)).await;
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{status:?}"
    );
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );
    broker.stop().await;
}

#[tokio::test]
async fn the_default_limit_is_four_mebibytes() {
    let broker = TestBroker::start().await;
    let just_under = orders::Order {
        order_id: "x".repeat(4 * 1024 * 1024 - 16),
        ..Default::default()
    };
    fire(&mut broker.publisher().await, "Placed", &just_under).await;
    let over = orders::Order {
        order_id: "x".repeat(4 * 1024 * 1024 + 1),
        ..Default::default()
    };
    let status = refused(&broker, order_event("Placed", &over)).await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    broker.stop().await;
}

#[tokio::test]
async fn fire_events_stops_at_the_first_bad_event_and_keeps_the_earlier_ones() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    subscriber.subscribe(ORDERS, "").await.expect("ack");
    let mut requests: Vec<_> = (0..3)
        .map(|i| order_event("Placed", &order(&i.to_string(), 1)))
        .collect();
    requests.push(with_event(|e| e.contract = "acme.Nope".into()));
    requests.push(order_event("Placed", &order("never", 1)));
    let status = broker
        .publisher()
        .await
        .fire_events(tokio_stream::iter(requests))
        .await
        .expect_err("the stream is refused at the bad event");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("event #3"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("3 earlier events were published"),
        "{}",
        status.message()
    );
    for i in 0..3 {
        let event = subscriber.next_event().await;
        assert_eq!(
            orders::Order::decode(event.payload)
                .expect("decodes")
                .order_id,
            i.to_string()
        );
    }
    subscriber
        .expect_silence(std::time::Duration::from_millis(300))
        .await;
    broker.stop().await;
}

#[tokio::test]
async fn an_empty_fire_events_call_publishes_nothing() {
    let broker = TestBroker::start().await;
    let summary = broker
        .publisher()
        .await
        .fire_events(tokio_stream::iter(Vec::<FireEventRequest>::new()))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(summary.events, 0);
    broker.stop().await;
}
