//! The controller: keeps every `CohortImport` on schedule.
//!
//! Built like kube-rs's controller-rs: one [`Context`] shared by [`reconcile::reconcile`]
//! and [`reconcile::error_policy`]. A reconcile is a short pipeline (fetch → validate →
//! plan → decide → apply, see `docs/architecture.md`): its decisions are pure
//! ([`desired`]), and applying them writes status, publishes Events or starts a run as a
//! task of its own ([`runs`]). Every run ends through [`record`], then asks for a
//! reconcile, which requeues exactly at the next run time; nothing polls.
//!
//! - [`clock`]: the time source (tests use a clock they control).
//! - [`secrets`]: the Braze keys; [`importer`]: the seam to the import pipeline
//!   ([`pipeline`] is the real one).
//! - [`status`], [`events`], [`metrics`]: what the controller tells people.
//! - [`leader`]: only the replica holding the Lease runs anything.
//! - [`shard`]: several operators, each owning the imports its label selector picks.
//! - [`destinations`]: shared destinations an import names (`destinationRef`), resolved from
//!   watches; [`destination_status`]: their `Ready`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::api::{BrazeDestination, ClusterBrazeDestination, CohortImport, DestinationKind};
use crate::snapshot::cluster as snapshot;
use cohort_index::CohortIndex;

pub mod admission;
pub mod clock;
pub mod cohort_index;
pub mod conflict;
pub mod context;
pub mod desired;
pub mod destination_status;
pub mod destinations;
pub mod events;
pub mod handover;
pub mod importer;
pub mod kube_api;
pub mod leader;
pub mod metrics;
pub mod pipeline;
pub mod reconcile;
pub mod record;
pub mod registry;
pub mod retry;
pub mod runs;
pub mod secret_recheck;
pub mod secrets;
pub mod shard;
pub mod status;
pub mod watched;

use conflict::{Referenced, references};
pub use context::{Config, Context, Dependencies};
use destinations::Catalog;
use events::Events;
use registry::RunRegistry;
use watched::{Changed, Watched};

/// Reconciles in flight at once, per watched namespace.
const RECONCILE_CONCURRENCY: u16 = 32;

/// Why the controller stopped (not a run: see [`record`] for how runs end).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: std::io::Error },
}

/// Runs the controller until `shutdown` resolves (or, with leader election, the Lease is
/// lost — an error: the process should exit and start again as a standby).
pub async fn serve(
    client: kube::Client,
    config: Config,
    deps: Dependencies,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let _server = match config.metrics_addr {
        Some(addr) => {
            let (bound, task) = metrics::serve(deps.metrics.clone(), addr)
                .await
                .map_err(|source| ControllerError::Metrics { addr, source })?;
            info!(%bound, "serving /metrics, /healthz and /readyz");
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    match config.leader_election.clone() {
        None => {
            deps.metrics.set_ready(true);
            watch_and_reconcile(client, config, deps, shutdown).await;
            Ok(())
        }
        Some(election) => {
            // A standby is healthy and ready: it is doing its job, waiting.
            deps.metrics.set_ready(true);
            let metrics = deps.metrics.clone();
            let fence = config.fence.clone();
            let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
            let leading = watch_and_reconcile(client.clone(), config, deps, shutdown.clone());
            election.lead(client, &metrics, &fence, shutdown, leading).await?;
            Ok(())
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One controller per watched namespace (or one for all), sharing a [`Context`]. Dropping
/// the returned future stops every run in progress.
async fn watch_and_reconcile(
    client: kube::Client,
    config: Config,
    deps: Dependencies,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    // Once each: a namespace named twice would get two controllers reconciling its imports
    // at the same time.
    let namespaces: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().collect::<BTreeSet<_>>().into_iter().map(Some).collect()
    };
    let (catalog, catalog_writers) = catalog(&namespaces, config.destination_secret_namespace.clone());
    let scopes: Vec<Scope> = namespaces.iter().map(|ns| Scope::new(&client, ns.clone(), &config, &catalog)).collect();
    let ctx = Arc::new(context(&client, config, deps, &scopes, catalog));
    // Runs are tasks of their own; stop them all when this future goes (shutdown, lost
    // Lease, or the task running it aborted).
    let _stop_runs = runs::AbortRunsOnDrop(ctx.clone());
    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let mut running = watch_destinations(&ctx, &client, &namespaces, catalog_writers, shutdown.clone());
    running.extend(scopes.into_iter().map(|scope| scope.run(&ctx, &client, shutdown.clone()).boxed()));
    futures::future::join_all(running).await;
}

/// The [`Context`] of `scopes`: its parts, each built once, sharing the client and handles.
fn context(client: &kube::Client, config: Config, deps: Dependencies, scopes: &[Scope], catalog: Catalog) -> Context {
    let stores: Vec<_> = scopes.iter().map(|s| s.controller.store()).collect();
    let events = Events::new(client.clone(), config.instance.clone());
    let status = status::StatusWriter { client: client.clone(), stores: stores.clone() };
    let runs = Arc::new(RunRegistry::default());
    let reporter = record::Reporter {
        metrics: deps.metrics.clone(),
        events: events.clone(),
        notifier: deps.notifier,
        notification_timeout: config.notification_timeout,
        status: status.clone(),
        runs: runs.clone(),
        fence: config.fence.clone(),
    };
    let watched = Watched {
        sharded: config.shard.is_some(),
        stores,
        cohorts: scopes.iter().map(|s| s.cohorts.clone()).collect(),
        wakers: scopes.iter().map(|s| (s.namespace.clone(), s.waker.clone())).collect(),
        conflicts: Mutex::new(HashMap::new()),
        every_shard: scopes.iter().map(|s| s.every_shard.clone()).collect(),
        every_shard_cohorts: scopes.iter().map(|s| s.every_shard_cohorts.clone()).collect(),
        reconcile_failures: Mutex::new(HashMap::new()),
        catalog,
    };
    let handover = handover::Handover {
        client: client.clone(),
        shard: config.shard.clone(),
        leader_election: config.leader_election.clone(),
        instance: config.instance.clone(),
        clock: deps.clock.clone(),
    };
    Context {
        client: client.clone(),
        events,
        admission: admission::Admission::new(config.max_concurrent_runs, config.max_concurrent_runs_per_namespace),
        config,
        clock: deps.clock.clone(),
        importer: deps.importer,
        metrics: deps.metrics,
        runs,
        watched,
        handover,
        status,
        reporter,
        releasing: Mutex::new(HashSet::new()),
        secret_checks: secrets::SecretChecks::default(),
    }
}

/// One watched namespace (or all of them): its controller and the watches, stores and
/// channels around it, until [`Scope::run`] puts them together.
struct Scope {
    namespace: Option<String>,
    /// Reconciles the imports this operator owns in the namespace.
    controller: Controller<CohortImport>,
    /// Those imports by cohort (unsharded, what conflict detection looks up).
    cohorts: Arc<CohortIndex>,
    /// Unsharded: each change of an owned import, once store and index have it.
    changed: mpsc::UnboundedReceiver<Changed>,
    /// With sharding: every shard's imports, their index, and the store's writer.
    every_shard: Store<CohortImport>,
    every_shard_cohorts: Arc<CohortIndex>,
    every_shard_writer: reflector::store::Writer<CohortImport>,
    /// Asks for a reconcile of one import (after a run ends).
    waker: mpsc::UnboundedSender<ObjectRef<CohortImport>>,
    wake: mpsc::UnboundedReceiver<ObjectRef<CohortImport>>,
}

impl Scope {
    fn new(client: &kube::Client, namespace: Option<String>, config: &Config, catalog: &Catalog) -> Self {
        // A shard watches (and so reconciles and runs) only the imports its selector picks.
        let own_selector = match &config.shard {
            Some(shard) => watcher::Config::default().any_semantic().labels(&shard.selector()),
            None => watcher::Config::default().any_semantic(),
        };
        let (reader, writer) = reflector::store();
        let (changed_tx, changed) = mpsc::unbounded_channel();
        let cohorts = Arc::new(CohortIndex::resolving(catalog.clone()));
        let follow = config.shard.is_none().then_some((cohorts.clone(), changed_tx));
        let own = own_imports(Self::api(client, &namespace), own_selector, writer, follow);
        // Reconciles are short API round trips; a bound keeps a burst (start-up, a re-list)
        // from holding a thousand requests in memory at once.
        let controller = Controller::for_stream(own, reader)
            .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY));
        let (every_shard, every_shard_writer) = reflector::store();
        let (waker, wake) = mpsc::unbounded_channel();
        let every_shard_cohorts = Arc::new(CohortIndex::resolving(catalog.clone()));
        Scope {
            namespace,
            controller,
            cohorts,
            changed,
            every_shard,
            every_shard_cohorts,
            every_shard_writer,
            waker,
            wake,
        }
    }

    fn api(client: &kube::Client, namespace: &Option<String>) -> Api<CohortImport> {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }

    /// Reconciles until `shutdown`: on the scope's watch events, wake-ups and clock jumps.
    async fn run(
        self,
        ctx: &Arc<Context>,
        client: &kube::Client,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + Clone + 'static,
    ) {
        let controller = watching_related(ctx, client, &self.namespace, self.controller);
        // Every import of the scope, whichever shard owns it: a change may lift a conflict here.
        let controller = if ctx.config.shard.is_some() {
            let same_cohort = {
                let ctx = ctx.clone();
                move |changed: CohortImport| ctx.watched.affected_by(&changed)
            };
            let every_shard = every_shard_imports(
                ctx,
                Self::api(client, &self.namespace),
                self.every_shard_writer,
                self.every_shard_cohorts,
            );
            controller.watches_stream(every_shard, same_cohort)
        } else {
            controller
        };
        controller
            .reconcile_on(wakes(ctx, self.wake, self.changed))
            .reconcile_all_on(ctx.clock.jumps())
            .graceful_shutdown_on(shutdown)
            .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
            .for_each(|result| async move {
                match result {
                    // error_policy has logged it; a vanished object needs nothing.
                    Ok(_)
                    | Err(kube::runtime::controller::Error::ReconcilerFailed(..))
                    | Err(kube::runtime::controller::Error::ObjectNotFound(_)) => {}
                    Err(other) => warn!(error = %other, "controller"),
                }
            })
            .await;
    }
}

/// The imports this controller owns, kept in `writer`'s store. Unsharded, conflicts are
/// decided from that store, so `follow` keeps its cohort index in step and reports each
/// change once both have it: imports of the same cohort then look again (a second watch
/// would race with them).
fn own_imports(
    api: Api<CohortImport>,
    selector: watcher::Config,
    writer: reflector::store::Writer<CohortImport>,
    follow: Option<(Arc<CohortIndex>, mpsc::UnboundedSender<Changed>)>,
) -> impl futures::Stream<Item = Result<CohortImport, watcher::Error>> + Send + 'static {
    watcher(api, selector)
        .default_backoff()
        // Never read here, and the largest part of an import in memory: every field
        // manager's field set (status is written by server-side apply, which needs none).
        .modify(|import| import.metadata.managed_fields = None)
        .reflect(writer)
        .inspect(move |event| {
            let (Ok(event), Some((index, changed))) = (event.as_ref(), follow.as_ref()) else { return };
            index.apply(event);
            let change = match event {
                watcher::Event::Apply(i) | watcher::Event::InitApply(i) => Changed::of(i, false, index.key_of(i)),
                watcher::Event::Delete(i) => Changed::of(i, true, index.key_of(i)),
                watcher::Event::Init | watcher::Event::InitDone => return,
            };
            let _ = changed.send(change);
        })
        .applied_objects()
}

/// Adds to `controller` the watches of what imports name: Secrets (unless
/// `--watch-secrets=false`) and source ConfigMaps, by metadata only.
fn watching_related(
    ctx: &Arc<Context>,
    client: &kube::Client,
    scope: &Option<String>,
    controller: Controller<CohortImport>,
) -> Controller<CohortImport> {
    // Only metadata: the controller never keeps Secret values in memory.
    let secrets: Api<PartialObjectMeta<Secret>> = match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let config_maps: Api<PartialObjectMeta<ConfigMap>> = match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let store = controller.store();
    let by_secret = {
        let (ctx, store, referencing) = (ctx.clone(), store.clone(), referencing(store.clone(), Referenced::Secret));
        move |secret: PartialObjectMeta<Secret>| {
            let (namespace, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
            ctx.secret_checks.saw(&namespace, &name, secret.resource_version().as_deref());
            // And the imports whose shared destination reads it (a ClusterBrazeDestination's
            // Secrets are in another namespace than its imports).
            let through_destination = store
                .state()
                .into_iter()
                .filter(|import| ctx.watched.catalog.reads_secret(import, &namespace, &name))
                .map(|import| ObjectRef::from_obj(import.as_ref()));
            let mut imports = referencing(secret);
            imports.extend(through_destination);
            imports
        }
    };
    // Without the watch (RBAC grants `get` only), a missing Secret is looked for on a
    // backoff instead (secret_recheck).
    let controller = if ctx.config.watch_secrets {
        controller.watches(secrets, watcher::Config::default().any_semantic(), by_secret)
    } else {
        controller
    };
    // Source ConfigMaps only: the operator's own snapshot writes (several per run) are
    // never an import's source, and each event would be matched against every import.
    let sources = watcher::Config::default().any_semantic().labels(&format!("!{}", snapshot::SNAPSHOT_OF_LABEL));
    controller.watches(config_maps, sources, referencing(store, Referenced::ConfigMap))
}

/// The imports to reconcile besides watch events: those a run asks for when it ends
/// (`wake`), and the other imports of a cohort one of them changed in (`changed`,
/// forgetting a deleted import's state first).
fn wakes(
    ctx: &Arc<Context>,
    wake: mpsc::UnboundedReceiver<ObjectRef<CohortImport>>,
    changed: mpsc::UnboundedReceiver<Changed>,
) -> impl futures::Stream<Item = ObjectRef<CohortImport>> + Send + 'static {
    let wake = futures::stream::unfold(wake, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let ctx = ctx.clone();
    let same_cohort = futures::stream::unfold(changed, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
        .flat_map(move |changed: Changed| {
            if changed.deleted {
                ctx.forget(&changed.import);
            }
            futures::stream::iter(ctx.watched.affected_by_change(&changed))
        });
    futures::stream::select(wake, same_cohort)
}

/// Every import of a scope, whichever shard owns it, kept in `writer`'s store (and `index`)
/// with only the status conflict detection needs. Each one that left this shard
/// while it ran here is let go first, and its series are no longer exported here.
fn every_shard_imports(
    ctx: &Arc<Context>,
    api: Api<CohortImport>,
    writer: reflector::store::Writer<CohortImport>,
    index: Arc<CohortIndex>,
) -> impl futures::Stream<Item = Result<CohortImport, watcher::Error>> + Send + 'static {
    let imports = forgetting_deleted(ctx, watcher(api, watcher::Config::default().any_semantic()).default_backoff());
    let ctx = ctx.clone();
    imports
        .map(move |event| {
            if let Ok(watcher::Event::Apply(import) | watcher::Event::InitApply(import)) = &event {
                ctx.let_go_if_left(import);
                // Its series are exported by the shard that owns it, never by two at once.
                if !ctx.handover.owns(import) {
                    ctx.metrics.forget(&import.namespace().unwrap_or_default(), &import.name_any());
                }
            }
            event
        })
        .modify(|import| {
            // Conflict detection needs only whether an import has run and its workspace
            // (conflict::holds): one history entry is kept, the rest goes.
            if let Some(status) = import.status.as_mut() {
                status.history.truncate(1);
                status.conditions.clear();
            }
            import.metadata.managed_fields = None;
            import.metadata.annotations = None;
        })
        .reflect(writer)
        // Before the change is mapped to the imports of its cohort (`same_cohort`).
        .inspect(move |event| {
            if let Ok(event) = event {
                index.apply(event);
            }
        })
        .touched_objects()
}

/// `events`, forgetting what this replica keeps about each import they show deleted: one
/// deleted without the finalizer (it never ran) is never reconciled again to clean up.
fn forgetting_deleted(
    ctx: &Arc<Context>,
    events: impl futures::Stream<Item = Result<watcher::Event<CohortImport>, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = Result<watcher::Event<CohortImport>, watcher::Error>> + Send + 'static {
    let ctx = ctx.clone();
    events.inspect(move |event| {
        if let Ok(watcher::Event::Delete(import)) = event {
            ctx.forget(&ObjectRef::from_obj(import));
        }
    })
}

/// Maps a changed Secret or ConfigMap to the imports in its namespace that read it.
fn referencing<K: Resource + ResourceExt>(
    store: Store<CohortImport>,
    kind: Referenced,
) -> impl Fn(K) -> Vec<ObjectRef<CohortImport>> + Send + Sync + 'static {
    move |object: K| {
        let namespace = object.namespace();
        let name = object.name_any();
        store
            .state()
            .into_iter()
            .filter(|import| import.namespace() == namespace)
            .filter(|import| references(&import.spec).iter().any(|(k, n)| *k == kind && *n == name))
            .map(|import| ObjectRef::from_obj(import.as_ref()))
            .collect()
    }
}

/// The catalog of shared destinations and Namespace labels, and the writers that fill it:
/// one store of BrazeDestinations per scope, as imports are watched.
fn catalog(scopes: &[Option<String>], secret_namespace: Option<String>) -> (Catalog, CatalogWriters) {
    let (namespaced, namespaced_writers): (Vec<_>, Vec<_>) = scopes.iter().map(|_| reflector::store()).unzip();
    let (cluster, cluster_writer) = reflector::store();
    let (namespaces, namespaces_writer) = reflector::store();
    let catalog = Catalog { namespaced, cluster, namespaces, secret_namespace };
    (catalog, CatalogWriters { namespaced: namespaced_writers, cluster: cluster_writer, namespaces: namespaces_writer })
}

struct CatalogWriters {
    namespaced: Vec<reflector::store::Writer<BrazeDestination>>,
    cluster: reflector::store::Writer<ClusterBrazeDestination>,
    namespaces: reflector::store::Writer<PartialObjectMeta<Namespace>>,
}

/// The watches that fill the catalog, each destination kind driving the controller that
/// writes its status ([`destination_status`]); every change wakes the imports it concerns.
fn watch_destinations(
    ctx: &Arc<Context>,
    client: &kube::Client,
    scopes: &[Option<String>],
    writers: CatalogWriters,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + Clone + 'static,
) -> Vec<BoxFuture<'static, ()>> {
    let mut running: Vec<BoxFuture<'static, ()>> = Vec::new();
    let config = || watcher::Config::default().any_semantic();
    for ((scope, writer), reader) in scopes.iter().zip(writers.namespaced).zip(ctx.watched.catalog.namespaced.clone()) {
        let api: Api<BrazeDestination> = match scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let events = destination_events(ctx, watcher(api, config()).default_backoff().reflect(writer));
        let controller = Controller::for_stream(events, reader)
            .graceful_shutdown_on(shutdown.clone())
            .run(destination_status::reconcile_namespaced, destination_status::error_policy, ctx.clone())
            .for_each(|_| async {});
        running.push(controller.boxed());
    }
    // ClusterBrazeDestinations are off without a destination Secret namespace: neither they
    // nor Namespaces are watched (no cluster-wide read needed), and imports naming one are
    // refused saying so.
    if ctx.watched.catalog.secret_namespace.is_none() {
        return running;
    }
    let api: Api<ClusterBrazeDestination> = Api::all(client.clone());
    let events = destination_events(ctx, watcher(api, config()).default_backoff().reflect(writers.cluster));
    let controller = Controller::for_stream(events, ctx.watched.catalog.cluster.clone())
        .graceful_shutdown_on(shutdown.clone())
        .run(destination_status::reconcile_cluster, destination_status::error_policy, ctx.clone())
        .for_each(|_| async {});
    running.push(controller.boxed());
    let namespaces = {
        let ctx = ctx.clone();
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        watcher(api, config()).default_backoff().reflect(writers.namespaces).for_each(move |event| {
            if let Ok(watcher::Event::Apply(ns) | watcher::Event::Delete(ns)) = &event {
                ctx.watched.namespace_changed(&ns.name_any());
            }
            async {}
        })
    };
    let namespaces = futures::future::select(Box::pin(namespaces), Box::pin(shutdown)).map(|_| ());
    running.push(namespaces.boxed());
    running
}

/// A destination kind's watch events, once its store has them: each change wakes the imports
/// naming the destination; a re-list, every import naming one of its kind.
fn destination_events<K>(
    ctx: &Arc<Context>,
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + ResourceExt + Clone + Send + 'static,
{
    let ctx = ctx.clone();
    let kind = if K::kind(&()) == "ClusterBrazeDestination" {
        DestinationKind::ClusterBrazeDestination
    } else {
        DestinationKind::BrazeDestination
    };
    events
        .inspect(move |event| match event {
            Ok(watcher::Event::Apply(d) | watcher::Event::Delete(d)) => {
                ctx.watched.destination_changed(kind, Some(&d.name_any()), d.namespace().as_deref())
            }
            Ok(watcher::Event::InitDone) => ctx.watched.destination_changed(kind, None, None),
            _ => {}
        })
        .applied_objects()
}
