//! Push triggers: `CohortTrigger` webhooks that run imports when a pipeline says the data
//! is ready (Flux's `Receiver` is the model).
//!
//! - [`signature`]: pure — whether a call is genuine and what it asks for.
//! - [`hooks`]: the webhooks this replica serves, kept from a watch of the triggers.
//! - [`deliver`]: what a genuine call does to the API (a replay check, run requests).
//! - [`server`]: the HTTP port, with its cheap refusals first.
//!
//! Every replica serves the port; the run itself is started by the leader of the import's
//! shard, which sees the run-requested annotation like any other.

pub mod deliver;
pub mod hooks;
pub mod server;
pub mod signature;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::controller::metrics::Metrics;

/// Serves the triggers of `namespaces` (all when empty) on `addr` until the returned task is
/// dropped or aborted; returns the bound address.
pub async fn serve(
    client: kube::Client,
    namespaces: Vec<String>,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let hooks = Arc::new(hooks::Hooks::default());
    let (bound, server) = server::serve(client.clone(), hooks.clone(), metrics, addr).await?;
    let task = tokio::spawn(async move {
        let _server = AbortOnDrop(server);
        hooks::keep(client, namespaces, hooks).await;
    });
    Ok((bound, task))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
