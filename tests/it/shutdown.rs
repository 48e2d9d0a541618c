//! Graceful shutdown: subscriber streams end with UNAVAILABLE, calls in flight
//! finish, and the server drains.

use std::time::Duration;

use tonic::Code;

use crate::support::{ORDERS, PATIENCE, TestBroker, order, order_event};

#[tokio::test]
async fn shutdown_ends_subscriber_streams_with_unavailable() {
    let mut broker = TestBroker::start().await;
    let mut first = broker.subscriber().await;
    let mut second = broker.subscriber().await;
    first.subscribe(ORDERS, "").await.expect("ack");
    second.subscribe(ORDERS, "Placed").await.expect("ack");
    broker.begin_shutdown();
    for subscriber in [&mut first, &mut second] {
        let status = subscriber.next().await.expect_err("the stream ends");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("shutting down"),
            "{}",
            status.message()
        );
    }
    broker.stop().await;
}

#[tokio::test]
async fn a_call_in_flight_finishes_and_health_says_not_serving() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let mut broker = TestBroker::start().await;
    let channel = broker.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let mut publisher = herald::pb::v1::publish_service_client::PublishServiceClient::new(channel);
    // A FireEvents call whose client stream is still open when shutdown begins.
    let (events, requests) = tokio::sync::mpsc::channel(8);
    let call = tokio::spawn(async move {
        publisher
            .fire_events(tokio_stream::wrappers::ReceiverStream::new(requests))
            .await
    });
    events
        .send(order_event("Placed", &order("before", 1)))
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.begin_shutdown();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|answer| answer.into_inner().status);
        // NOT_SERVING, or the server already refuses new calls as unavailable.
        let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing;
        match status {
            Ok(status) if status == not_serving as i32 => break,
            Err(error) if error.code() == Code::Unavailable => break,
            Err(error) => panic!("health check failed: {error}"),
            Ok(_) => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "still serving");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    events
        .send(order_event("Placed", &order("during", 1)))
        .await
        .expect("send");
    drop(events);
    let summary = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the call finishes")
        .expect("task")
        .expect("the call in flight succeeds")
        .into_inner();
    assert_eq!(summary.events, 2);
    broker.stop().await;
}
