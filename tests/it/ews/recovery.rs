//! Issue point 6: nothing lost. A restart is a gap closed with SyncFolderItems
//! from the stored SyncState (recovered events, nothing published twice);
//! the first start takes a baseline without publishing. (A crash, SIGKILL,
//! is in process.rs.)

use std::time::Duration;

use super::{ALICE, BOB, Ews, MailboxEvent, drain, fast_fake, has, receive_until};

#[tokio::test]
async fn the_first_start_takes_a_baseline_without_publishing() {
    let mut ews = Ews::start().await;
    let old = ews.fake.deliver_mail(ALICE, "already there", "x@y.example");
    let mut subscriber = ews.subscriber().await;
    ews.start_adapter(&[ALICE], "").await;
    ews.wait_ready(&[ALICE]).await;
    let new = ews.fake.deliver_mail(ALICE, "new", "x@y.example");
    let events = receive_until(&mut subscriber, |e| has(e, "NewMail", &new)).await;
    assert!(
        events.iter().all(|(_, e)| e.item_id != old),
        "existing mail is not published: {events:?}"
    );
    let store = ews.store().await;
    assert!(
        store.sync_state(ALICE, "inbox").await.unwrap().is_some(),
        "the baseline is stored"
    );
    ews.stop_adapter().await;
}

#[tokio::test]
async fn changes_while_stopped_are_recovered_once_after_a_restart() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE, BOB], "").await;
    let before = ews.fake.deliver_mail(ALICE, "before", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &before)).await;
    drain(&mut subscriber, Duration::from_millis(300)).await;
    ews.stop_adapter().await;

    // While the adapter is down.
    let created = ews.fake.deliver_mail(ALICE, "while down", "x@y.example");
    ews.fake.modify_item(ALICE, &before);
    let gone = ews
        .fake
        .deliver_mail(BOB, "read and deleted while down", "x@y.example");
    let bob_old = ews.fake.items(BOB, "inbox");
    ews.fake.hard_delete(BOB, &gone);

    ews.start_adapter(&[ALICE, BOB], "").await;
    let events = receive_until(&mut subscriber, |e| {
        has(e, "Created", &created) && has(e, "Modified", &before)
    })
    .await;
    assert!(
        events.iter().all(|(_, e)| e.recovered),
        "found by SyncFolderItems: {events:?}"
    );
    let (_, recovered) = events
        .iter()
        .find(|(op, e)| op == "Created" && e.item_id == created)
        .unwrap();
    assert_eq!(
        recovered.change_key,
        ews.fake.change_key(ALICE, &created).unwrap()
    );
    assert!(
        !has(&events, "Created", &before),
        "the mail published before the restart is not published again"
    );
    assert!(
        !events.iter().any(|(_, e)| e.item_id == gone),
        "created and deleted during the gap: nothing to say"
    );
    assert!(bob_old.contains(&gone));
    subscriber.expect_silence(Duration::from_millis(500)).await;
    ews.stop_adapter().await;
}

#[tokio::test]
async fn deletes_during_a_gap_are_recovered_and_moves_are_not_repeated() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE], "").await;
    let first = ews.fake.deliver_mail(ALICE, "one", "x@y.example");
    let second = ews.fake.deliver_mail(ALICE, "two", "x@y.example");
    receive_until(&mut subscriber, |e| {
        has(e, "NewMail", &first) && has(e, "NewMail", &second)
    })
    .await;
    // Published as a Moved event while running…
    ews.fake.delete_item(ALICE, &first).unwrap();
    receive_until(&mut subscriber, |e| {
        e.iter()
            .any(|(op, ev)| op == "Moved" && ev.old_item_id == first)
    })
    .await;
    ews.stop_adapter().await;
    // …and deleted during the gap.
    ews.fake.hard_delete(ALICE, &second);

    ews.start_adapter(&[ALICE], "").await;
    let events = receive_until(&mut subscriber, |e| has(e, "Deleted", &second)).await;
    assert!(events.iter().all(|(_, e)| e.recovered), "{events:?}");
    assert!(
        !events
            .iter()
            .any(|(op, e)| op == "Deleted" && e.item_id == first),
        "the move was already published"
    );
    subscriber.expect_silence(Duration::from_millis(500)).await;
    ews.stop_adapter().await;
}

/// Makes alice's subscription miss events (a catch-up follows) and waits
/// until that catch-up has published what it found: a mail delivered after
/// it started reaches the subscriber only after that. Returns what arrived.
async fn caught_up(
    ews: &Ews,
    subscriber: &mut crate::support::TestSubscriber,
) -> Vec<(String, MailboxEvent)> {
    let synced = ews.fake.count("SyncFolderItems");
    ews.fake.miss_events(ALICE);
    assert!(
        ews.fake
            .wait_until(crate::support::PATIENCE, |f| f.count("SyncFolderItems")
                > synced)
            .await
    );
    let marker = ews.fake.deliver_mail(ALICE, "marker", "x@y.example");
    receive_until(subscriber, |e| has(e, "NewMail", &marker)).await
}

#[tokio::test]
async fn a_read_flag_change_already_streamed_is_not_published_again() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE], "").await;
    let item = ews.fake.deliver_mail(ALICE, "to be read", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    // The stored SyncState moves past the item's creation.
    caught_up(&ews, &mut subscriber).await;

    ews.fake.mark_read(ALICE, &item);
    let streamed = receive_until(&mut subscriber, |e| has(e, "Modified", &item)).await;
    // This catch-up finds the change as a ReadFlagChange.
    let later = caught_up(&ews, &mut subscriber).await;
    let modified: Vec<_> = [streamed, later]
        .concat()
        .into_iter()
        .filter(|(op, e)| op == "Modified" && e.item_id == item)
        .collect();
    assert_eq!(modified.len(), 1, "published once: {modified:?}");
    assert!(!modified[0].1.recovered, "by the stream");
    ews.stop_adapter().await;
}
