//! The integration tests of this crate, in one test binary (one link instead of one per
//! file).

mod batch;
mod chat;
mod cli;
mod common;
mod convert;
#[cfg(feature = "hub")]
mod hub;
#[cfg(feature = "hub")]
#[path = "../../../bitnet-inference/tests/it/hub_server.rs"]
mod hub_server;
mod readme;
mod serve;
mod smollm2;
mod tiny_model;
mod untrusted;
