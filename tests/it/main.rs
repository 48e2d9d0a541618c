//! Herald's integration tests: one binary, a real broker on 127.0.0.1 port 0
//! per test, real gRPC clients.

#[macro_use]
mod support;

mod admin;
mod bench;
mod cli;
mod config;
mod deploy;
mod discovery;
mod durability;
mod ews;
mod persistent;
mod publish;
mod shutdown;
mod store;
mod transient;
mod typed;
