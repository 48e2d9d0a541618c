//! Herald's integration tests: one binary, a real broker on 127.0.0.1 port 0
//! per test, real gRPC clients.

mod support;

mod bench;
mod cli;
mod discovery;
mod publish;
mod shutdown;
mod transient;
mod typed;
