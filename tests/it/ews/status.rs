//! Issue point 8: each mailbox's state, as `herald ews status` shows it,
//! says what the mailbox is doing now, not what it did last. (After a
//! back-off inside a call: throttling::server_busy_inside_an_answer_waits_too.)

use herald::ews::fake::Fault;

use super::{ALICE, Ews, fast_fake, wait_for_state};

#[tokio::test]
async fn a_mailbox_is_streaming_again_after_a_failed_catch_up_is_retried() {
    let (mut ews, _subscriber) = Ews::running(fast_fake(), &[ALICE], "").await;
    let synced = ews.fake.count("SyncFolderItems");
    // The catch-up after missed events fails once, then works.
    ews.fake
        .fail_next(Some("SyncFolderItems"), Fault::Unauthorized);
    ews.fake.miss_events(ALICE);
    assert!(
        ews.fake
            .wait_until(crate::support::PATIENCE, |f| f.count("SyncFolderItems")
                >= synced + 2)
            .await,
        "the failed catch-up was retried"
    );
    wait_for_state(&ews, ALICE, "streaming").await;
    ews.stop_adapter().await;
}
