//! Transient subscribers over SubscriptionService.Subscribe.

use std::time::Duration;

use herald::pb::v1::subscription_message::Message;
use prost::Message as _;
use tonic::Code;

use crate::support::{
    ORDERS, PATIENCE, TestBroker, fire, order, order_event, orders, subscriber::lagged,
};

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_subscriber_receives_what_it_subscribed_to_with_id_and_time_assigned() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    subscriber
        .subscribe(ORDERS, "Placed")
        .await
        .expect("ack ok");
    let mut publisher = broker.publisher().await;

    let answer = fire(&mut publisher, "Placed", &order("o-1", 2)).await;
    assert_eq!(answer.transient_subscribers, 1);
    assert_eq!(answer.persistent_subscribers, 0);

    let event = subscriber.next_event().await;
    assert_eq!(event.id, answer.event_id);
    let id = uuid::Uuid::parse_str(&event.id).expect("a UUID");
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(event.contract, ORDERS);
    assert_eq!(event.operation, "Placed");
    assert!(event.time.is_some(), "the broker stamps the time");
    let payload = orders::Order::decode(event.payload).expect("payload decodes");
    assert_eq!(payload, order("o-1", 2));
    broker.stop().await;
}

#[tokio::test]
async fn publisher_id_time_attributes_and_source_pass_through() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    subscriber.subscribe(ORDERS, "").await.expect("ack ok");
    let mut request = order_event("Shipped", &order("o-2", 1));
    let event = request.event.as_mut().expect("event");
    event.id = "publisher-chosen-id".to_owned();
    event.time = Some(prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 5,
    });
    event.source = "warehouse".to_owned();
    event
        .attributes
        .insert("region".to_owned(), "eu".to_owned());
    let answer = broker
        .publisher()
        .await
        .fire_event(request.clone())
        .await
        .expect("fire")
        .into_inner();
    assert_eq!(answer.event_id, "publisher-chosen-id");
    let received = subscriber.next_event().await;
    assert_eq!(Some(received), request.event);
    broker.stop().await;
}

#[tokio::test]
async fn two_subscribers_on_different_operations_get_only_their_own() {
    let broker = TestBroker::start().await;
    let mut placed = broker.subscriber().await;
    let mut shipped = broker.subscriber().await;
    placed.subscribe(ORDERS, "Placed").await.expect("ack");
    shipped.subscribe(ORDERS, "Shipped").await.expect("ack");
    let mut publisher = broker.publisher().await;

    assert_eq!(
        fire(&mut publisher, "Placed", &order("a", 1))
            .await
            .transient_subscribers,
        1
    );
    assert_eq!(
        fire(&mut publisher, "Shipped", &order("b", 1))
            .await
            .transient_subscribers,
        1
    );
    assert_eq!(
        fire(&mut publisher, "Cancelled", &order("c", 1))
            .await
            .transient_subscribers,
        0
    );

    assert_eq!(placed.next_event().await.operation, "Placed");
    assert_eq!(shipped.next_event().await.operation, "Shipped");
    placed.expect_silence(QUIET).await;
    shipped.expect_silence(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn subscribing_to_all_then_unsubscribing_one_leaves_the_others() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    subscriber.subscribe(ORDERS, "").await.expect("ack");
    subscriber
        .unsubscribe(ORDERS, "Shipped")
        .await
        .expect("ack");
    let mut publisher = broker.publisher().await;

    for operation in ["Placed", "Shipped", "Cancelled"] {
        fire(&mut publisher, operation, &order(operation, 1)).await;
    }
    assert_eq!(subscriber.next_event().await.operation, "Placed");
    assert_eq!(subscriber.next_event().await.operation, "Cancelled");
    subscriber.expect_silence(QUIET).await;

    // Unsubscribing with an empty operation removes the whole contract.
    subscriber.unsubscribe(ORDERS, "").await.expect("ack");
    fire(&mut publisher, "Placed", &order("x", 1)).await;
    subscriber.expect_silence(QUIET).await;
    assert_eq!(broker.broker.transient_stats().contracts, 0);
    broker.stop().await;
}

#[tokio::test]
async fn subscribing_twice_is_idempotent() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    subscriber.subscribe(ORDERS, "Placed").await.expect("ack");
    subscriber.subscribe(ORDERS, "Placed").await.expect("ack");
    let mut publisher = broker.publisher().await;
    assert_eq!(
        fire(&mut publisher, "Placed", &order("a", 1))
            .await
            .transient_subscribers,
        1
    );
    subscriber.next_event().await;
    subscriber.expect_silence(QUIET).await;

    subscriber.unsubscribe(ORDERS, "Placed").await.expect("ack");
    assert_eq!(
        fire(&mut publisher, "Placed", &order("b", 1))
            .await
            .transient_subscribers,
        0
    );
    broker.stop().await;
}

#[tokio::test]
async fn bad_commands_get_error_acks_and_the_stream_stays_open() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;

    let error = subscriber
        .subscribe("no.such.Contract", "")
        .await
        .expect_err("refused");
    assert_eq!(error.code, Code::NotFound as i32);
    assert!(
        error.message.contains("no.such.Contract"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains(ORDERS),
        "names what exists: {}",
        error.message
    );

    let error = subscriber
        .subscribe(ORDERS, "Refunded")
        .await
        .expect_err("refused");
    assert_eq!(error.code, Code::NotFound as i32);
    assert!(
        error.message.contains("Refunded") && error.message.contains("Placed, Shipped, Cancelled"),
        "{}",
        error.message
    );

    let error = subscriber.unsubscribe("", "").await.expect_err("refused");
    assert_eq!(error.code, Code::NotFound as i32);

    let error = subscriber.command_raw(None).await.expect_err("refused");
    assert_eq!(error.code, Code::InvalidArgument as i32);

    // Nothing was lost: the stream still works.
    subscriber.subscribe(ORDERS, "Placed").await.expect("ack");
    fire(&mut broker.publisher().await, "Placed", &order("a", 1)).await;
    assert_eq!(subscriber.next_event().await.operation, "Placed");
    broker.stop().await;
}

#[tokio::test]
async fn events_from_one_publisher_arrive_in_firing_order() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    subscriber.subscribe(ORDERS, "").await.expect("ack");
    let requests: Vec<_> = (0..500)
        .map(|i| order_event(["Placed", "Shipped"][i % 2], &order(&i.to_string(), 1)))
        .collect();
    let summary = broker
        .publisher()
        .await
        .fire_events(tokio_stream::iter(requests))
        .await
        .expect("fire_events")
        .into_inner();
    assert_eq!(summary.events, 500);
    assert_eq!(summary.transient_deliveries, 500);
    for i in 0..500 {
        let event = subscriber.next_event().await;
        let payload = orders::Order::decode(event.payload).expect("decodes");
        assert_eq!(payload.order_id, i.to_string());
    }
    broker.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_never_reads_lags_alone_and_does_not_slow_the_publisher() {
    let broker = TestBroker::start().await;
    let mut stuck = broker.subscriber().await;
    stuck.subscribe(ORDERS, "").await.expect("ack");
    let mut healthy = broker.subscriber().await;
    healthy.subscribe(ORDERS, "").await.expect("ack");

    // Enough events, with enough bytes, to fill the stuck stream's HTTP/2
    // window and then its queue, several times over. They go out in bursts,
    // each acknowledged by the healthy subscriber before the next, so that the
    // healthy one never lags however busy this machine is.
    const BURST: usize = 200;
    const EVENTS: usize = 20 * BURST;
    let big = orders::Order {
        order_id: "x".repeat(1_000),
        quantity: 1,
        customer: String::new(),
    };
    let (progress, mut received_by_healthy) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        for n in 1..=EVENTS {
            healthy.next_event().await;
            progress.send_replace(n);
        }
        healthy
    });
    let mut publisher = broker.publisher().await;
    let mut transient_deliveries = 0;
    for burst in 1..=EVENTS / BURST {
        let requests: Vec<_> = (0..BURST).map(|_| order_event("Placed", &big)).collect();
        let summary = tokio::time::timeout(
            PATIENCE,
            publisher.fire_events(tokio_stream::iter(requests)),
        )
        .await
        .expect("the publisher is never blocked by a stuck subscriber")
        .expect("fire_events")
        .into_inner();
        transient_deliveries += summary.transient_deliveries;
        tokio::time::timeout(
            PATIENCE,
            received_by_healthy.wait_for(|n| *n >= burst * BURST),
        )
        .await
        .expect("the healthy subscriber keeps up")
        .expect("the healthy subscriber is alive");
    }
    assert!(
        transient_deliveries < 2 * EVENTS as u64,
        "the stuck subscriber dropped some"
    );
    let mut healthy = reader
        .await
        .expect("the healthy subscriber got every event");

    // The stuck subscriber now reads what was queued for it before it fell
    // behind; the next event after the gap comes with how many it missed.
    let mut received = 0u64;
    while let Some(message) = stuck.next_within(Duration::from_millis(500)).await {
        assert!(matches!(message, Message::Event(_)), "{message:?}");
        received += 1;
    }
    assert!(received < EVENTS as u64);
    fire(&mut broker.publisher().await, "Placed", &order("after", 1)).await;
    let missed = lagged(stuck.next().await.expect("stream open"));
    assert_eq!(
        received + missed,
        EVENTS as u64,
        "every event is either received or reported missed"
    );
    let after = stuck.next_event().await;
    assert_eq!(
        orders::Order::decode(after.payload)
            .expect("decodes")
            .order_id,
        "after"
    );
    healthy.next_event().await;
    broker.stop().await;
}

#[tokio::test]
async fn subscriptions_end_when_the_client_goes_away() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    subscriber.subscribe(ORDERS, "").await.expect("ack");
    subscriber
        .subscribe("herald.ews.v1.MailboxEvents", "NewMail")
        .await
        .expect("ack");
    assert_eq!(broker.broker.transient_stats().contracts, 2);
    drop(subscriber);
    broker.wait_for_subscribers(0).await;
    assert_eq!(broker.broker.transient_stats().contracts, 0);
    assert_eq!(
        fire(&mut broker.publisher().await, "Placed", &order("a", 1))
            .await
            .transient_subscribers,
        0
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_half_closed_command_stream_keeps_receiving() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    subscriber.subscribe(ORDERS, "Placed").await.expect("ack");
    subscriber.close_commands();
    tokio::time::sleep(Duration::from_millis(100)).await;
    fire(&mut broker.publisher().await, "Placed", &order("a", 1)).await;
    assert_eq!(subscriber.next_event().await.operation, "Placed");
    broker.stop().await;
}

#[tokio::test]
async fn commands_and_events_larger_than_the_streams_first_buffers_arrive_whole() {
    let broker = TestBroker::start().await;
    let mut subscriber = broker.subscriber().await;
    let long_name = "x".repeat(10_000);
    let refused = subscriber
        .subscribe(&long_name, "")
        .await
        .expect_err("no such contract");
    assert_eq!(refused.code, Code::NotFound as i32);
    subscriber
        .subscribe(ORDERS, "Placed")
        .await
        .expect("ack ok");

    let mut big = order("o-big", 1);
    big.customer = "y".repeat(200_000);
    fire(&mut broker.publisher().await, "Placed", &big).await;
    let event = subscriber.next_event().await;
    assert_eq!(orders::Order::decode(event.payload).expect("decodes"), big);
    broker.stop().await;
}

#[tokio::test]
async fn a_stuck_subscriber_holds_no_more_than_its_byte_budget() {
    // Room for 100,000 events but only 256 KiB: 2,000 events of 10 KB (20 MB)
    // overflow the bytes long before the count.
    let broker = TestBroker::start_with(
        crate::support::test_registry(),
        herald::broker::Limits {
            queue_capacity: 100_000,
            queue_bytes: 256 * 1024,
            ..herald::broker::Limits::default()
        },
    )
    .await;
    let mut stuck = broker.subscriber().await;
    stuck.subscribe(ORDERS, "").await.expect("ack");
    const EVENTS: u64 = 2_000;
    let big = orders::Order {
        order_id: "x".repeat(10_000),
        quantity: 1,
        customer: String::new(),
    };
    let requests: Vec<_> = (0..EVENTS).map(|_| order_event("Placed", &big)).collect();
    broker
        .publisher()
        .await
        .fire_events(tokio_stream::iter(requests))
        .await
        .expect("fire_events");

    // Read what was held for it (lags may come between, as the stream's
    // buffers took some events before the queue overflowed).
    let (mut received, mut missed) = (0u64, 0u64);
    while let Some(message) = stuck.next_within(Duration::from_millis(500)).await {
        match message {
            Message::Event(_) => received += 1,
            Message::Lagged(lag) => missed += lag.missed,
            other => panic!("unexpected {other:?}"),
        }
    }
    // What was queued, plus what HTTP/2 buffered on the way: far from all.
    assert!(
        received < EVENTS / 4,
        "{received} of {EVENTS} were held for it"
    );
    fire(&mut broker.publisher().await, "Placed", &order("after", 1)).await;
    missed += lagged(stuck.next().await.expect("stream open"));
    assert_eq!(received + missed, EVENTS);
    broker.stop().await;
}
