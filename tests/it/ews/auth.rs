//! Issue point 1, `[auth]`: basic and bearer credentials, with the secret
//! read from the environment variable the file names, reach Exchange (the
//! fake checks the Authorization header); wrong ones show the mailbox as
//! failed with the reason. (OAuth2 is in throttling.rs.)

use herald::ews::fake::{FakeAuth, FakeOptions};

use super::{ALICE, Ews, fast_fake, has, receive_until, wait_for_state};
use crate::support::PATIENCE;

/// Starts the adapter with `auth` (the `[auth]` table) and the secret
/// `EWS_SECRET` = `secret` against a fake expecting `expected`; checks that
/// events flow when `accepted`, and that the mailbox fails with a 401
/// otherwise.
async fn check(expected: FakeAuth, auth: &str, secret: &str, accepted: bool) {
    let mut ews = Ews::with_fake(FakeOptions {
        auth: expected,
        ..fast_fake()
    })
    .await;
    ews.secrets.push(("EWS_SECRET".into(), secret.into()));
    let mut subscriber = ews.subscriber().await;
    ews.start_adapter(&[ALICE], auth).await;
    if accepted {
        ews.wait_ready(&[ALICE]).await;
        let item = ews.fake.deliver_mail(ALICE, "authorised", "x@y.example");
        receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    } else {
        // The adapter has its state database once it calls Exchange; the
        // test opens it only then, not to race it on creating it.
        assert!(
            ews.fake
                .wait_until(PATIENCE, |f| f.count("Subscribe") >= 1)
                .await
        );
        let failed = wait_for_state(&ews, ALICE, "failed").await;
        assert!(failed.detail.contains("401"), "{failed:?}");
    }
    ews.stop_adapter().await;
}

#[tokio::test]
async fn basic_auth_sends_the_account_and_its_password() {
    let auth =
        "[auth]\nkind = \"basic\"\nusername = \"svc-herald\"\npassword_env = \"EWS_SECRET\"\n";
    for (secret, accepted) in [("s3cret", true), ("wrong", false)] {
        let expected = FakeAuth::Basic {
            username: "svc-herald".into(),
            password: "s3cret".into(),
        };
        check(expected, auth, secret, accepted).await;
    }
}

#[tokio::test]
async fn bearer_auth_sends_the_token() {
    let auth = "[auth]\nkind = \"bearer\"\ntoken_env = \"EWS_SECRET\"\n";
    for (secret, accepted) in [("t0ken", true), ("expired", false)] {
        let expected = FakeAuth::Bearer {
            token: "t0ken".into(),
        };
        check(expected, auth, secret, accepted).await;
    }
}
