//! Compiles `proto/` (and the test contract) with protox, a pure-Rust protobuf
//! compiler, so no `protoc` is needed anywhere. Writes the file descriptor set
//! that feeds server reflection and the contract registry, the prost/tonic code,
//! and a hand-described `SubscriptionService` server whose codec sends events
//! that were encoded once and shared by every subscriber.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/herald/v1/herald.proto",
    "proto/herald/ews/v1/mailbox_events.proto",
    "proto/herald/bench/v1/bench.proto",
];

const TEST_PROTOS: &[&str] = &["tests/proto/herald_test.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=tests/proto");

    let fds = protox::compile(PROTOS, ["proto"])?;
    fs::write(out_dir.join("herald_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".herald.v1.Event.payload")
        .btree_map(".herald.v1.Event.attributes")
        .compile_fds(fds)?;

    let test_fds = protox::compile(TEST_PROTOS, ["tests/proto"])?;
    fs::write(
        out_dir.join("herald_test_descriptor.bin"),
        test_fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(test_fds)?;

    let subscription = tonic_build::manual::Service::builder()
        .name("SubscriptionService")
        .package("herald.v1")
        .method(
            tonic_build::manual::Method::builder()
                .name("subscribe")
                .route_name("Subscribe")
                .input_type("crate::pb::v1::SubscriptionCommand")
                .output_type("crate::api::codec::Outbound")
                .codec_path("crate::api::codec::SubscribeCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    let manual_dir = out_dir.join("manual");
    fs::create_dir_all(&manual_dir)?;
    tonic_build::manual::Builder::new()
        .build_client(false)
        .out_dir(&manual_dir)
        .compile(&[subscription]);
    Ok(())
}
