//! Issue point 5: push notifications. The listener answers OK at once
//! (publishing happens after the answer), Unsubscribe for ids it does not own,
//! checks PreviousWatermark continuity, and recreates a silent subscription
//! from the last watermark.

use std::time::Duration;

use herald::ews::fake::FakeOptions;
use tokio::net::TcpListener;

use super::{ALICE, Ews, fast_fake, has, receive_until};
use crate::support::PATIENCE;
use crate::support::TestSubscriber;

/// StatusFrequency "minutes" of 300 ms.
fn push_fake() -> FakeOptions {
    FakeOptions {
        minute: Duration::from_millis(300),
        ..fast_fake()
    }
}

/// A fake, a subscriber and the adapter in push mode (publishing to `broker`
/// when given), baseline taken; also returns the listener's URL.
async fn push_running(
    broker: Option<&str>,
    resubscribe_after: u64,
) -> (Ews, TestSubscriber, String) {
    let mut ews = Ews::with_fake(push_fake()).await;
    let subscriber = ews.subscriber().await;
    let url = start_push(&mut ews, broker, resubscribe_after).await;
    ews.wait_ready(&[ALICE]).await;
    (ews, subscriber, url)
}

fn assert_all_answered_ok(ews: &Ews) {
    let replies = ews.fake.push_replies();
    assert!(
        replies.iter().all(|(_, reply)| reply == "OK"),
        "{replies:?}"
    );
}

/// Starts the adapter in push mode; returns the listener's URL.
async fn start_push(ews: &mut Ews, broker: Option<&str>, resubscribe_after: u64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("http://{addr}/ews/notify");
    let mut text = ews.config_text(
        &[ALICE],
        &format!(
            "mode = \"push\"\n[push]\nlisten = \"{addr}\"\npublic_url = \"{url}\"\nstatus_frequency_minutes = 1\nresubscribe_after_seconds = {resubscribe_after}\n"
        ),
    );
    if let Some(broker) = broker {
        text = text.replace(
            &format!("broker = \"{}\"", ews.broker.url()),
            &format!("broker = \"{broker}\""),
        );
    }
    ews.start_adapter_with(&text, Some(listener)).await;
    url
}

#[tokio::test]
async fn pushed_events_are_published_and_answered_ok() {
    let (mut ews, mut subscriber, _) = push_running(None, 60).await;
    let item = ews.fake.deliver_mail(ALICE, "pushed", "x@y.example");
    let events = receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    assert!(
        events.iter().all(|(_, e)| !e.watermark.is_empty()),
        "push events carry watermarks"
    );
    assert_all_answered_ok(&ews);
    ews.stop_adapter().await;
}

#[tokio::test]
async fn an_unknown_subscription_is_told_to_unsubscribe() {
    let (mut ews, _subscriber, url) = push_running(None, 60).await;
    let body = r#"<soap11:Envelope xmlns:soap11="http://schemas.xmlsoap.org/soap/envelope/"><soap11:Body><m:SendNotification xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><m:ResponseMessages><m:SendNotificationResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode><m:Notification><t:SubscriptionId>not-ours</t:SubscriptionId><t:PreviousWatermark>AQAAAA==</t:PreviousWatermark><t:MoreEvents>false</t:MoreEvents><t:StatusEvent><t:Watermark>AQAAAA==</t:Watermark></t:StatusEvent></m:Notification></m:SendNotificationResponseMessage></m:ResponseMessages></m:SendNotification></soap11:Body></soap11:Envelope>"#;
    let reply = reqwest::Client::new()
        .post(&url)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let text = reply.text().await.unwrap();
    assert!(
        text.contains("<m:SubscriptionStatus>Unsubscribe</m:SubscriptionStatus>"),
        "{text}"
    );
    let garbage = reqwest::Client::new()
        .post(&url)
        .body("<<not xml")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    ews.stop_adapter().await;
}

#[tokio::test]
async fn exchange_gets_its_answer_even_while_the_broker_is_down() {
    let mut ews = Ews::with_fake(push_fake()).await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    start_push(&mut ews, Some(&dead_url), 60).await;
    ews.wait_ready(&[ALICE]).await;
    let before = ews.fake.push_replies().len();
    ews.fake
        .deliver_mail(ALICE, "nobody can publish this yet", "x@y.example");
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.push_replies().len() >= before + 2)
            .await,
        "notifications are answered although publishing cannot finish"
    );
    assert_all_answered_ok(&ews);
    ews.stop_adapter().await;
}

#[tokio::test]
async fn a_previous_watermark_gap_is_caught_up() {
    let (mut ews, mut subscriber, _) = push_running(None, 60).await;
    ews.fake.pause_push(ALICE);
    let skipped = ews.fake.deliver_mail(ALICE, "never pushed", "x@y.example");
    ews.fake.skip_push_events(ALICE);
    ews.fake.resume_push(ALICE);
    let pushed = ews.fake.deliver_mail(ALICE, "pushed", "x@y.example");
    let events = receive_until(&mut subscriber, |e| {
        has(e, "NewMail", &pushed) && has(e, "Created", &skipped)
    })
    .await;
    let recovered = events
        .iter()
        .find(|(op, e)| op == "Created" && e.item_id == skipped)
        .unwrap();
    assert!(recovered.1.recovered);
    ews.stop_adapter().await;
}

#[tokio::test]
async fn a_silent_subscription_is_recreated_from_the_last_watermark() {
    let (mut ews, mut subscriber, _) = push_running(None, 1).await;
    ews.fake.pause_push(ALICE);
    let item = ews.fake.deliver_mail(ALICE, "while silent", "x@y.example");
    let events = receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    assert!(
        events.iter().any(|(op, e)| op == "NewMail" && !e.recovered),
        "replayed from the watermark"
    );
    let subscribes: Vec<_> = ews.requests_of("Subscribe").into_iter().collect();
    assert!(subscribes.len() >= 2, "the subscription was recreated");
    assert!(subscribes[1].watermark.is_some(), "with the last watermark");
    ews.stop_adapter().await;
}

#[tokio::test]
async fn a_silent_subscription_is_recreated_although_resyncs_run_more_often() {
    // Resyncs every 300 ms, recreation after 2 s of silence: as with the
    // defaults (30 min and 2 × 30 min), resyncs come first and must not
    // hold the watchdog off.
    let mut ews = Ews::with_fake(push_fake()).await;
    ews.tweak = |config| config.resync_interval = Duration::from_millis(300);
    let _subscriber = ews.subscriber().await;
    start_push(&mut ews, None, 2).await;
    ews.wait_ready(&[ALICE]).await;
    // StatusEvents stop too: Exchange dropped the subscription.
    ews.fake.pause_push(ALICE);
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("Subscribe") >= 2)
            .await,
        "the silent subscription was recreated"
    );
    ews.stop_adapter().await;
}
