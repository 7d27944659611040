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
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use jiff::SignedDuration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::api::{BrazeDestination, ClusterBrazeDestination, CohortImport, DestinationKind};
use crate::fence::Fence;
use crate::notify::Notify;
use crate::snapshot::cluster as snapshot;
use cohort_index::CohortIndex;

pub mod admission;
pub mod clock;
pub mod cohort_index;
pub mod conflict;
pub mod desired;
pub mod destination_status;
pub mod destinations;
pub mod events;
pub mod importer;
pub mod kube_api;
pub mod leader;
pub mod metrics;
pub mod pipeline;
pub mod reconcile;
pub mod record;
pub mod retry;
pub mod runs;
pub mod secret_recheck;
pub mod secrets;
pub mod shard;
pub mod status;

use crate::domain::validate::Limits;
use clock::Clock;
use conflict::{Referenced, references};
use destinations::Catalog;
use events::Events;
use importer::Importer;
use leader::LeaderElection;
use metrics::Metrics;
use runs::RunRegistry;
use secrets::PartnerKeys;

/// Reconciles in flight at once, per watched namespace.
const RECONCILE_CONCURRENCY: u16 = 32;

/// How the controller behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// A scheduled run found later than this (the operator was down) is recorded as missed.
    pub starting_deadline: SignedDuration,
    pub partner_keys: PartnerKeys,
    /// `None`: run without leader election (a single replica).
    pub leader_election: Option<LeaderElection>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Names this replica in Events (e.g. the pod name).
    pub instance: Option<String>,
    /// Runs at once across all imports; more wait for a free slot.
    pub max_concurrent_runs: usize,
    /// Runs at once in one namespace, under `max_concurrent_runs`: one team's slow imports
    /// never take every slot.
    pub max_concurrent_runs_per_namespace: usize,
    /// Times a run may start: one interrupted this often (a crash loop) ends `Failed`.
    pub max_run_attempts: u32,
    /// Longest a run may take unless its `spec.runTimeoutSeconds` says otherwise.
    pub run_timeout: Duration,
    /// Longest a run report email may take.
    pub notification_timeout: Duration,
    /// Wait after a failed reconcile.
    pub error_requeue: Duration,
    /// Watch Secrets (by metadata) to reconcile an import when one it reads changes.
    /// `false` for RBAC that grants only `get`: see [`secret_recheck`].
    pub watch_secrets: bool,
    /// Without the watch, the longest wait between looks at a missing Secret.
    pub missing_secret_recheck: Duration,
    /// `None`: every import in the watched namespaces is ours (no sharding).
    pub shard: Option<shard::Shard>,
    /// With leader election, open only while this replica holds its Lease with margin
    /// ([`crate::fence`]); give the same [`Fence::leased`] to the importer's Braze client and
    /// snapshot store. The default never closes (a single replica).
    pub fence: Fence,
    /// Operator settings some spec rules depend on (`--min-cron-interval-minutes`).
    pub limits: Limits,
    /// The one namespace whose Secrets a ClusterBrazeDestination may name
    /// (`--destination-secret-namespace`); `None`: no cluster destination may name a Secret.
    pub destination_secret_namespace: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespaces: Vec::new(),
            starting_deadline: SignedDuration::from_hours(1),
            partner_keys: PartnerKeys::default(),
            leader_election: None,
            metrics_addr: None,
            instance: None,
            max_concurrent_runs: 16,
            max_concurrent_runs_per_namespace: 4,
            max_run_attempts: 3,
            run_timeout: Duration::from_secs(6 * 3600),
            notification_timeout: Duration::from_secs(60),
            error_requeue: Duration::from_secs(10),
            watch_secrets: true,
            missing_secret_recheck: Duration::from_secs(30),
            shard: None,
            fence: Fence::unfenced(),
            limits: Limits::default(),
            destination_secret_namespace: None,
        }
    }
}

/// What the controller works with besides the API server.
#[derive(Clone)]
pub struct Dependencies {
    pub clock: Arc<dyn Clock>,
    pub importer: Arc<dyn Importer>,
    /// `None`: no SMTP server configured; imports asking for email get a status note.
    pub notifier: Option<Arc<dyn Notify>>,
    pub metrics: Arc<Metrics>,
}

/// Shared by every reconcile and run.
pub struct Context {
    pub client: kube::Client,
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub importer: Arc<dyn Importer>,
    pub notifier: Option<Arc<dyn Notify>>,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    pub runs: RunRegistry,
    /// The run slots (`max_concurrent_runs`, at most `max_concurrent_runs_per_namespace` of
    /// them per namespace), admitted round-robin by namespace.
    admission: admission::Admission,
    /// The imports each controller sees (one per watched namespace, or one for all).
    stores: Vec<Store<CohortImport>>,
    /// Each store's imports by cohort (what conflict detection looks up when unsharded).
    cohorts: Vec<Arc<CohortIndex>>,
    /// Asks a controller to reconcile one import (after a run ends), by namespace.
    wakers: Vec<(Option<String>, mpsc::UnboundedSender<ObjectRef<CohortImport>>)>,
    /// Import held in `Conflict` → the import that owns its cohort.
    conflicts: Mutex<HashMap<ObjectRef<CohortImport>, ObjectRef<CohortImport>>>,
    /// With sharding: every shard's imports in the watched namespaces (status left out).
    every_shard: Vec<Store<CohortImport>>,
    /// Each of those stores' imports by cohort.
    every_shard_cohorts: Vec<Arc<CohortIndex>>,
    /// Imports that left this shard and whose run is being handed over.
    releasing: Mutex<HashSet<ObjectRef<CohortImport>>>,
    /// Failed reconciles in a row, per import: how far [`reconcile::error_policy`] backs off.
    reconcile_failures: Mutex<HashMap<ObjectRef<CohortImport>, u32>>,
    /// Secret keys found present, until the Secret watch sees their Secret change.
    pub secret_checks: secrets::SecretChecks,
    /// The shared destinations and Namespace labels, for resolving `destinationRef`s.
    pub catalog: Catalog,
}

impl Context {
    /// The imports of `cohort` in the watched namespaces, whichever shard owns them: what
    /// conflict detection compares (with sharding, their status is left out). Every reconcile
    /// asks, so the index says where to look and each store's copy says whether it is so.
    pub fn imports_of(&self, cohort: &conflict::CohortKey) -> Vec<Arc<CohortImport>> {
        let (stores, indexes) = if self.config.shard.is_some() {
            (&self.every_shard, &self.every_shard_cohorts)
        } else {
            (&self.stores, &self.cohorts)
        };
        let found = stores.iter().zip(indexes).flat_map(|(store, index)| {
            index.imports_of(cohort).into_iter().filter_map(|reference| store.get(&reference))
        });
        // Each as its reconcile sees it: an import through a shared destination it may not
        // use (or that is gone) cannot run, so it holds no cohort.
        found
            .filter_map(|import| self.catalog.effective(&import).ok())
            .filter(|import| cohort.is_of(&import.spec))
            .collect()
    }

    /// The controller's copy of `import`, as its watch last delivered it.
    pub fn cached(&self, import: &CohortImport) -> Option<Arc<CohortImport>> {
        let reference = ObjectRef::from_obj(import);
        self.stores.iter().find_map(|store| store.get(&reference))
    }

    /// This operator's shard (`--shard`), `""` without one: the shard label of its metrics.
    pub fn shard_name(&self) -> &str {
        self.config.shard.as_ref().and_then(|s| s.name.as_deref()).unwrap_or("")
    }

    /// Reconciles `import` soon.
    pub fn wake(&self, import: ObjectRef<CohortImport>) {
        let sender = self
            .wakers
            .iter()
            .find(|(ns, _)| ns.is_none() || ns.as_deref() == import.namespace.as_deref())
            .map(|(_, tx)| tx);
        if let Some(tx) = sender {
            let _ = tx.send(import);
        }
    }

    /// Counts a failed reconcile of `import` (`true`) or clears the count; returns it.
    fn note_reconcile(&self, import: &ObjectRef<CohortImport>, failed: bool) -> u32 {
        let mut failures = self.reconcile_failures.lock().unwrap_or_else(|e| e.into_inner());
        if !failed {
            failures.remove(import);
            return 0;
        }
        let count = failures.entry(import.clone()).or_default();
        *count = count.saturating_add(1);
        *count
    }

    /// Lets go of what this replica keeps about an import that is gone: its conflict, its
    /// failed reconciles and its per-import series. (Which run of it ended here is kept:
    /// a few bytes, and forgetting it for an import that is only out of sight for a moment
    /// could make a stale copy look like an interrupted run.)
    fn forget(&self, import: &ObjectRef<CohortImport>) {
        self.note_conflict(import, None);
        self.note_reconcile(import, false);
        self.metrics.forget(import.namespace.as_deref().unwrap_or_default(), &import.name);
    }

    fn note_conflict(&self, import: &ObjectRef<CohortImport>, winner: Option<ObjectRef<CohortImport>>) {
        let mut conflicts = self.conflicts.lock().unwrap_or_else(|e| e.into_inner());
        match winner {
            Some(w) => conflicts.insert(import.clone(), w),
            None => conflicts.remove(import),
        };
    }

    /// Imports that should look again when `changed` changes: those aimed at the same
    /// cohort, and those held in conflict by it.
    fn affected_by(&self, changed: &CohortImport) -> Vec<ObjectRef<CohortImport>> {
        self.affected_by_change(&Changed::of(changed, false, self.catalog.cohort_key(changed)))
    }

    /// A shared destination changed (or appeared, or went; `name` `None`: every one of `kind`
    /// was listed again): the imports naming it are filed under their cohort again and look
    /// again, and so do the imports of the cohorts they left and joined.
    fn destination_changed(&self, kind: DestinationKind, name: Option<&str>, namespace: Option<&str>) {
        let named = |import: &CohortImport| match name {
            Some(name) => destinations::names(import, kind, name, namespace),
            None => import.spec.destination.destination_ref.as_ref().is_some_and(|r| r.kind == kind),
        };
        let indexed =
            self.stores.iter().zip(&self.cohorts).chain(self.every_shard.iter().zip(&self.every_shard_cohorts));
        let mut woken = Vec::new();
        for (store, index) in indexed {
            for import in store.state().into_iter().filter(|i| named(i)) {
                let reference = ObjectRef::from_obj(import.as_ref());
                if let Some(left) = index.rekey(&import) {
                    woken.extend(self.affected_by_change(&Changed {
                        import: reference.clone(),
                        cohort: left,
                        deleted: false,
                    }));
                }
                woken.extend(self.affected_by_change(&Changed::of(&import, false, index.key_of(&import))));
                woken.push(reference);
            }
        }
        self.wake_all(woken);
    }

    /// A Namespace's labels may have changed: its imports through a ClusterBrazeDestination
    /// (whose `namespaceSelector` decides) look again, and so do the imports of their cohorts.
    fn namespace_changed(&self, namespace: &str) {
        let mut woken = Vec::new();
        for store in &self.stores {
            let through_cluster = |i: &Arc<CohortImport>| {
                i.namespace().as_deref() == Some(namespace)
                    && i.spec
                        .destination
                        .destination_ref
                        .as_ref()
                        .is_some_and(|r| r.kind == DestinationKind::ClusterBrazeDestination)
            };
            for import in store.state().into_iter().filter(through_cluster) {
                woken.extend(self.affected_by_change(&Changed::of(&import, false, self.catalog.cohort_key(&import))));
                woken.push(ObjectRef::from_obj(import.as_ref()));
            }
        }
        self.wake_all(woken);
    }

    fn wake_all(&self, mut imports: Vec<ObjectRef<CohortImport>>) {
        imports.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        imports.dedup();
        imports.into_iter().for_each(|import| self.wake(import));
    }

    fn affected_by_change(&self, changed: &Changed) -> Vec<ObjectRef<CohortImport>> {
        let me = changed.import.clone();
        let mut refs: Vec<_> = self
            .imports_of(&changed.cohort)
            .iter()
            .map(|other| ObjectRef::from_obj(other.as_ref()))
            .filter(|r| *r != me)
            .collect();
        let conflicts = self.conflicts.lock().unwrap_or_else(|e| e.into_inner());
        refs.extend(conflicts.iter().filter(|(_, winner)| **winner == me).map(|(loser, _)| loser.clone()));
        refs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        refs.dedup();
        refs
    }
}

/// An import the controller's own watch saw change (or go), once its store has the change.
struct Changed {
    import: ObjectRef<CohortImport>,
    cohort: conflict::CohortKey,
    deleted: bool,
}

impl Changed {
    fn of(import: &CohortImport, deleted: bool, cohort: conflict::CohortKey) -> Self {
        Changed { import: ObjectRef::from_obj(import), cohort, deleted }
    }
}

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
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        // Once each: a namespace named twice would get two controllers reconciling its
        // imports at the same time.
        config.namespaces.iter().cloned().collect::<BTreeSet<_>>().into_iter().map(Some).collect()
    };
    let api_for = |ns: &Option<String>| -> Api<CohortImport> {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    };

    // A shard watches (and so reconciles and runs) only the imports its selector picks.
    let own_selector = match &config.shard {
        Some(shard) => watcher::Config::default().any_semantic().labels(&shard.selector()),
        None => watcher::Config::default().any_semantic(),
    };
    let mut controllers = Vec::new();
    let mut stores = Vec::new();
    let mut every_shard = Vec::new();
    let mut cohorts = Vec::new();
    let mut every_shard_cohorts = Vec::new();
    let mut every_shard_writers = Vec::new();
    let mut wakers = Vec::new();
    let mut wake_streams = Vec::new();
    let mut changes = Vec::new();
    let sharded = config.shard.is_some();
    let (catalog, catalog_writers) = catalog(&scopes, config.destination_secret_namespace.clone());
    for scope in &scopes {
        let (reader, writer) = reflector::store();
        let (changed, changed_rx) = mpsc::unbounded_channel();
        let index = Arc::new(CohortIndex::resolving(catalog.clone()));
        cohorts.push(index.clone());
        let follow = (!sharded).then_some((index, changed));
        let own = own_imports(api_for(scope), own_selector.clone(), writer, follow);
        changes.push(changed_rx);
        // Reconciles are short API round trips; a bound keeps a burst (start-up, a re-list)
        // from holding a thousand requests in memory at once.
        let controller = Controller::for_stream(own, reader)
            .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY));
        stores.push(controller.store());
        let (reader, writer) = reflector::store();
        every_shard.push(reader);
        let index = Arc::new(CohortIndex::resolving(catalog.clone()));
        every_shard_cohorts.push(index.clone());
        every_shard_writers.push((writer, index));
        let (tx, rx) = mpsc::unbounded_channel();
        wakers.push((scope.clone(), tx));
        wake_streams.push(rx);
        controllers.push(controller);
    }

    let ctx = Arc::new(Context {
        client: client.clone(),
        events: Events::new(client.clone(), config.instance.clone()),
        admission: admission::Admission::new(config.max_concurrent_runs, config.max_concurrent_runs_per_namespace),
        config,
        clock: deps.clock.clone(),
        importer: deps.importer,
        notifier: deps.notifier,
        metrics: deps.metrics,
        runs: RunRegistry::default(),
        stores,
        cohorts,
        wakers,
        conflicts: Mutex::new(HashMap::new()),
        every_shard,
        every_shard_cohorts,
        releasing: Mutex::new(HashSet::new()),
        reconcile_failures: Mutex::new(HashMap::new()),
        secret_checks: secrets::SecretChecks::default(),
        catalog,
    });
    // Runs are tasks of their own; stop them all when this future goes (shutdown, lost
    // Lease, or the task running it aborted).
    let _stop_runs = runs::AbortRunsOnDrop(ctx.clone());

    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let mut running = watch_destinations(&ctx, &client, &scopes, catalog_writers, shutdown.clone());
    let scoped = scopes.iter().zip(controllers).zip(wake_streams).zip(every_shard_writers).zip(changes);
    for ((((scope, controller), wake), every_shard_writer), changed) in scoped {
        let controller = watching_related(&ctx, &client, scope, controller);
        // Every import of the scope, whichever shard owns it: a change may lift a conflict here.
        let controller = if ctx.config.shard.is_some() {
            let same_cohort = {
                let ctx = ctx.clone();
                move |changed: CohortImport| ctx.affected_by(&changed)
            };
            let (writer, index) = every_shard_writer;
            controller.watches_stream(every_shard_imports(&ctx, api_for(scope), writer, index), same_cohort)
        } else {
            controller
        };
        let stream = controller
            .reconcile_on(wakes(&ctx, wake, changed))
            .reconcile_all_on(ctx.clock.jumps())
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
            .for_each(|result| async move {
                match result {
                    // error_policy has logged it; a vanished object needs nothing.
                    Ok(_)
                    | Err(kube::runtime::controller::Error::ReconcilerFailed(..))
                    | Err(kube::runtime::controller::Error::ObjectNotFound(_)) => {}
                    Err(other) => warn!(error = %other, "controller"),
                }
            });
        running.push(stream.boxed());
    }
    futures::future::join_all(running).await;
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
                .filter(|import| ctx.catalog.reads_secret(import, &namespace, &name))
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
            futures::stream::iter(ctx.affected_by_change(&changed))
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
                if !ctx.owns(import) {
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
    for ((scope, writer), reader) in scopes.iter().zip(writers.namespaced).zip(ctx.catalog.namespaced.clone()) {
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
    let api: Api<ClusterBrazeDestination> = Api::all(client.clone());
    let events = destination_events(ctx, watcher(api, config()).default_backoff().reflect(writers.cluster));
    if ctx.catalog.secret_namespace.is_some() {
        let controller = Controller::for_stream(events, ctx.catalog.cluster.clone())
            .graceful_shutdown_on(shutdown.clone())
            .run(destination_status::reconcile_cluster, destination_status::error_policy, ctx.clone())
            .for_each(|_| async {});
        running.push(controller.boxed());
    } else {
        // No destination Secret namespace: every ClusterBrazeDestination is refused here, and
        // their status is left to an operator configured for them.
        let watched = events.for_each(|_| async {});
        running.push(futures::future::select(Box::pin(watched), Box::pin(shutdown.clone())).map(|_| ()).boxed());
    }
    let namespaces = {
        let ctx = ctx.clone();
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        watcher(api, config()).default_backoff().reflect(writers.namespaces).for_each(move |event| {
            if let Ok(watcher::Event::Apply(ns) | watcher::Event::Delete(ns)) = &event {
                ctx.namespace_changed(&ns.name_any());
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
                ctx.destination_changed(kind, Some(&d.name_any()), d.namespace().as_deref())
            }
            Ok(watcher::Event::InitDone) => ctx.destination_changed(kind, None, None),
            _ => {}
        })
        .applied_objects()
}
