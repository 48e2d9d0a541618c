//! Graceful shutdown: subscriber streams end with UNAVAILABLE and the server
//! drains.

use tonic::Code;

use crate::support::{ORDERS, TestBroker};

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
