//! The example configurations under deploy/ stay valid as the code changes.

use std::path::Path;

use herald::{
    config::{ServeFile, ServeOverrides, ServeSettings},
    ews::config::EwsConfig,
    store::StoreLocation,
};

fn deploy(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

#[test]
fn the_example_broker_configuration_loads() {
    let file = ServeFile::load(&deploy("herald.toml")).expect("deploy/herald.toml parses");
    let settings = ServeSettings::resolve(file, ServeOverrides::default()).expect("and resolves");
    assert_eq!(settings.listen.port(), 50051);
    assert!(matches!(settings.database, StoreLocation::Postgres(_)));
    assert_eq!(settings.delivery.dispatcher.node, "herald-1");
    assert_eq!(settings.delivery.dispatcher.per_address_in_flight, 100);
    assert_eq!(settings.limits.queue_bytes, 64 * 1024 * 1024);
    assert!(settings.proto[0].ends_with("deploy/contracts/orders.proto"));
}

#[test]
fn the_example_adapter_configuration_loads() {
    let path = deploy("ews.toml");
    let text = std::fs::read_to_string(&path).expect("read deploy/ews.toml");
    let config = EwsConfig::parse(&path, &text, |name| {
        (name == "HERALD_EWS_PASSWORD").then(|| "secret".to_owned())
    })
    .expect("deploy/ews.toml parses");
    assert_eq!(config.mailboxes.len(), 2);
    let missing = EwsConfig::parse(&path, &text, |_| None).expect_err("the password is required");
    assert!(
        missing.to_string().contains("HERALD_EWS_PASSWORD"),
        "{missing}"
    );
}
