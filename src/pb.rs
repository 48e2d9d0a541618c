//! Generated protobuf and gRPC code for Herald's own packages.

/// `herald.v1`: the broker's public interface.
pub mod v1 {
    tonic::include_proto!("herald.v1");
}

/// `herald.ews.v1`: the built-in Exchange mailbox events contract.
pub mod ews {
    tonic::include_proto!("herald.ews.v1");
}

/// `herald.bench.v1`: the contract the benchmark fires.
pub mod bench {
    tonic::include_proto!("herald.bench.v1");
}
