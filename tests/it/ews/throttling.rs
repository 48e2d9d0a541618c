//! Issue point 7: throttling and errors. ErrorServerBusy (a SOAP fault with
//! HTTP 500, or inside a normal answer) waits BackOffMilliseconds; HTTP 503
//! honours Retry-After; a 401 refreshes the OAuth2 token once; garbage,
//! truncated and hanging answers are retried; one mailbox's failure never
//! stops the others, and shows in its state.

use std::time::Duration;

use herald::ews::fake::{FakeAuth, FakeOptions, Fault};

use super::{
    ALICE, BOB, CAROL, Ews, fast_fake, has, receive_until, receive_within, summary, wait_for_state,
};
use crate::support::PATIENCE;

/// The time between the first two requests of `operation`.
fn gap(ews: &Ews, operation: &str) -> Duration {
    let times: Vec<_> = ews
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.operation == operation)
        .map(|r| r.at)
        .collect();
    assert!(times.len() >= 2, "{operation} was retried");
    times[1] - times[0]
}

#[tokio::test]
async fn server_busy_faults_wait_back_off_milliseconds() {
    let mut ews = Ews::start().await;
    ews.fake
        .fail_next(Some("Subscribe"), Fault::ServerBusyFault(400));
    ews.start_adapter(&[ALICE], "").await;
    ews.wait_ready(&[ALICE]).await;
    assert!(gap(&ews, "Subscribe") >= Duration::from_millis(400));
    ews.stop_adapter().await;
}

#[tokio::test]
async fn server_busy_inside_an_answer_waits_too() {
    let (mut ews, mut subscriber) =
        Ews::running(fast_fake(), &[ALICE], "fetch = [\"Subject\"]").await;
    ews.fake
        .fail_next(Some("GetItem"), Fault::ServerBusyResponse(300));
    let item = ews.fake.deliver_mail(ALICE, "busy", "x@y.example");
    let events = receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    let new_mail = events.iter().find(|(op, _)| op == "NewMail").unwrap();
    assert_eq!(
        new_mail.1.subject.as_deref(),
        Some("busy"),
        "fetched on the retry"
    );
    assert!(gap(&ews, "GetItem") >= Duration::from_millis(300));
    // The back-off is over: the mailbox shows what it does now.
    wait_for_state(&ews, ALICE, "streaming").await;
    ews.stop_adapter().await;
}

/// The first SyncFolderItems (the baseline) gets `fault`; the retry must
/// come no sooner than `wait` later.
async fn first_sync_waits(fault: Fault, wait: Duration) {
    let mut ews = Ews::start().await;
    ews.fake.fail_next(Some("SyncFolderItems"), fault);
    ews.start_adapter(&[ALICE], "").await;
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("SyncFolderItems") >= 2)
            .await
    );
    assert!(gap(&ews, "SyncFolderItems") >= wait);
    ews.stop_adapter().await;
}

#[tokio::test]
async fn server_busy_inside_a_sync_folder_items_answer_waits_too() {
    first_sync_waits(Fault::ServerBusyResponse(2000), Duration::from_secs(2)).await;
}

#[tokio::test]
async fn unavailable_honours_retry_after() {
    first_sync_waits(Fault::Unavailable(1), Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_401_refreshes_the_oauth_token_once() {
    let mut ews = Ews::with_fake(FakeOptions {
        auth: FakeAuth::OAuth {
            client_id: "herald".into(),
            client_secret: "s3cret".into(),
        },
        ..fast_fake()
    })
    .await;
    ews.secrets.push(("EWS_SECRET".into(), "s3cret".into()));
    let mut subscriber = ews.subscriber().await;
    let extra = format!(
        "fetch = [\"Subject\"]\n[auth]\nkind = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"herald\"\nclient_secret_env = \"EWS_SECRET\"\n",
        ews.fake.token_url()
    );
    ews.start_adapter(&[ALICE], &extra).await;
    ews.wait_ready(&[ALICE]).await;
    assert_eq!(ews.fake.tokens_issued(), 1, "one token serves every call");

    ews.fake.revoke_tokens();
    let item = ews
        .fake
        .deliver_mail(ALICE, "after the token expired", "x@y.example");
    let events = receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    assert_eq!(
        events
            .iter()
            .find(|(op, _)| op == "NewMail")
            .unwrap()
            .1
            .subject
            .as_deref(),
        Some("after the token expired")
    );
    assert_eq!(ews.fake.tokens_issued(), 2, "refreshed once");
    ews.stop_adapter().await;
}

#[tokio::test]
async fn garbage_truncated_and_hanging_answers_are_retried() {
    let mut ews = Ews::start().await;
    let mut subscriber = ews.subscriber().await;
    ews.fake.fail_next(Some("SyncFolderItems"), Fault::Garbage);
    ews.fake
        .fail_next(Some("SyncFolderItems"), Fault::Truncated);
    ews.fake.fail_next(Some("SyncFolderItems"), Fault::Hang);
    ews.start_adapter(
        &[ALICE],
        "fetch = [\"Subject\"]\nrequest_timeout_seconds = 1",
    )
    .await;
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("SyncFolderItems") >= 4)
            .await
    );
    ews.wait_ready(&[ALICE]).await;
    let item = ews
        .fake
        .deliver_mail(ALICE, "after the bad answers", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    ews.stop_adapter().await;
}

#[tokio::test]
async fn one_failing_mailbox_does_not_stop_the_others() {
    let mut ews = Ews::start().await;
    let mut subscriber = ews.subscriber().await;
    ews.fake.fail_mailbox(BOB, Fault::Unauthorized);
    ews.start_adapter(&[ALICE, BOB], "").await;
    ews.wait_ready(&[ALICE]).await;
    let item = ews.fake.deliver_mail(ALICE, "alice is fine", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;

    let store = ews.store().await;
    let failed = async {
        loop {
            let rows = store.statuses().await.unwrap();
            if let Some(bob) = rows
                .iter()
                .find(|r| r.mailbox == BOB && r.state == "failed")
            {
                return bob.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let bob = tokio::time::timeout(PATIENCE, failed)
        .await
        .expect("bob is shown as failed");
    assert!(
        bob.detail.contains("401"),
        "the reason is shown: {}",
        bob.detail
    );
    let alice = store
        .statuses()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.mailbox == ALICE)
        .unwrap();
    assert_eq!(alice.state, "streaming");

    // Bob recovers on his own once Exchange lets him in.
    ews.fake.heal_mailbox(BOB);
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.live_subscriptions(BOB).len() == 1)
            .await
    );
    ews.wait_ready(&[BOB]).await;
    let later = ews.fake.deliver_mail(BOB, "bob is back", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &later)).await;
    ews.stop_adapter().await;
}

#[tokio::test]
async fn a_member_stuck_on_subscribe_does_not_hold_up_its_group() {
    // The anchor (alice, first alphabetically) hangs or is told to back off
    // for a minute; bob and carol share her group and must not wait for her.
    for fault in [Fault::Hang, Fault::ServerBusyFault(60_000)] {
        let mut ews = Ews::start().await;
        let mut subscriber = ews.subscriber().await;
        ews.fake
            .fail_mailbox_on(ALICE, Some("Subscribe"), fault.clone());
        ews.start_adapter(&[ALICE, BOB, CAROL], "request_timeout_seconds = 5")
            .await;
        ews.wait_ready(&[BOB, CAROL]).await;
        let b = ews.fake.deliver_mail(BOB, "bob", "x@y.example");
        let c = ews.fake.deliver_mail(CAROL, "carol", "x@y.example");
        receive_until(&mut subscriber, |e| {
            has(e, "NewMail", &b) && has(e, "NewMail", &c)
        })
        .await;
        if fault == Fault::Hang {
            // Alice's next attempt succeeds and she joins the stream.
            ews.fake.heal_mailbox(ALICE);
            assert!(
                ews.fake
                    .wait_until(PATIENCE, |f| f
                        .requests()
                        .iter()
                        .any(|r| r.operation == "GetStreamingEvents"
                            && r.subscription_ids.len() == 3))
                    .await,
                "alice joined the group's stream"
            );
            let a = ews.fake.deliver_mail(ALICE, "alice", "x@y.example");
            receive_until(&mut subscriber, |e| has(e, "NewMail", &a)).await;
        }
        ews.stop_adapter().await;
    }
}

#[tokio::test]
async fn a_throttled_catch_up_does_not_delay_the_other_mailboxes() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE, BOB], "").await;
    // Alice's next catch-up is told to back off for a minute.
    let synced = ews.fake.count("SyncFolderItems");
    ews.fake.fail_mailbox_on(
        ALICE,
        Some("SyncFolderItems"),
        Fault::ServerBusyFault(60_000),
    );
    ews.fake.miss_events(ALICE);
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("SyncFolderItems") > synced)
            .await,
        "alice's catch-up started"
    );
    let b = ews.fake.deliver_mail(BOB, "bob", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &b)).await;
    ews.stop_adapter().await;
}

#[tokio::test]
async fn a_throttled_get_item_does_not_delay_the_other_mailboxes_of_its_stream() {
    // Alice and Bob share one GetStreamingEvents connection (one group).
    // Alice's GetItem is told to back off for far longer than Bob's mail
    // may take to arrive.
    const BACK_OFF: Duration = Duration::from_secs(20);
    const PROMPTLY: Duration = Duration::from_secs(8);
    let (mut ews, mut subscriber) =
        Ews::running(fast_fake(), &[ALICE, BOB], "fetch = [\"Subject\"]").await;
    ews.fake.fail_mailbox_on(
        ALICE,
        Some("GetItem"),
        Fault::ServerBusyResponse(BACK_OFF.as_millis() as u64),
    );
    let a = ews.fake.deliver_mail(ALICE, "alice", "x@y.example");
    let throttled = |f: &herald::ews::fake::FakeExchange| {
        f.requests()
            .iter()
            .any(|r| r.operation == "GetItem" && r.mailbox == ALICE)
    };
    assert!(
        ews.fake.wait_until(PATIENCE, throttled).await,
        "alice's GetItem was answered ErrorServerBusy"
    );
    // Her retry, once the back-off is over, gets the properties; her next
    // mail waits behind the first.
    ews.fake.heal_mailbox(ALICE);
    let a2 = ews.fake.deliver_mail(ALICE, "alice again", "x@y.example");

    let b = ews.fake.deliver_mail(BOB, "bob", "x@y.example");
    let events = receive_within(&mut subscriber, PROMPTLY, |e| has(e, "NewMail", &b)).await;
    assert!(
        !has(&events, "NewMail", &a) && !has(&events, "NewMail", &a2),
        "alice waits for her back-off: {:?}",
        summary(&events)
    );

    let events = receive_within(&mut subscriber, BACK_OFF * 2, |e| {
        has(e, "NewMail", &a) && has(e, "NewMail", &a2)
    })
    .await;
    let position = |item: &str| {
        events
            .iter()
            .position(|(op, e)| op == "NewMail" && e.item_id == item)
    };
    assert!(
        position(&a) < position(&a2),
        "alice's events keep their order: {:?}",
        summary(&events)
    );
    let new_mail = events
        .iter()
        .find(|(op, e)| op == "NewMail" && e.item_id == a)
        .map(|(_, e)| e);
    assert_eq!(
        new_mail.and_then(|e| e.subject.as_deref()),
        Some("alice"),
        "fetched on the retry"
    );
    let asked: Vec<_> = ews
        .requests_of("GetItem")
        .into_iter()
        .filter(|r| r.mailbox == ALICE)
        .map(|r| r.at)
        .collect();
    assert!(
        asked.len() >= 2 && asked[1] - asked[0] >= BACK_OFF,
        "alice's retry waited BackOffMilliseconds"
    );
    ews.stop_adapter().await;
}
