//! The controller's end-to-end tests, in one binary: one real kube-apiserver for all of them
//! (`testkit::cluster::Cluster::shared`), each test in a namespace of its own with its own
//! Braze sandbox and its own controller watching only that namespace
//! (`tests/support/controller.rs`). One binary links once, where one per file linked
//! eighteen times. Run one file's tests with `cargo test --test controller -- fencing::`.

#[allow(dead_code)]
#[path = "../support/controller.rs"]
mod controller_support;

mod attribute;
mod cadence;
mod destinations;
mod e2e;
mod egress;
mod fencing;
mod ha;
mod health;
mod lean;
mod lifecycle;
mod notify;
mod notify_channels;
mod retry;
mod safety;
mod shards;
mod snapshot_safety;
mod sources;
mod tenancy;
mod triggers;
mod warehouses;
