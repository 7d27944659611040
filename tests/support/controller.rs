//! What the controller's end-to-end tests share: a real kube-apiserver (one per test
//! binary), a namespace per test, the Braze sandbox in-process, a test clock, and the
//! controller itself running in-process against the cluster.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use braze_sandbox::{RunningSandbox, SandboxUser};
use cohort_operator::api::{self, CohortImport};
use cohort_operator::braze::normalize_endpoint;
use cohort_operator::braze::{BrazeClient, BrazeClientConfig};
use cohort_operator::controller::clock::TestClock;
use cohort_operator::controller::importer::Importer;
use cohort_operator::controller::leader::LeaderElection;
use cohort_operator::controller::metrics::Metrics;
use cohort_operator::controller::pipeline::{PipelineImporter, SnapshotStoreKind};
use cohort_operator::controller::secrets::PartnerKeys;
use cohort_operator::controller::{self, Config, Dependencies};
use cohort_operator::notify::Notify;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use serde_json::{Value, json};
use testkit::cluster::Cluster;
use tokio::sync::{OnceCell, oneshot};

pub const PARTNER: &str = "kubit";
pub const PARTNER_KEY: &str = "partner-key-us";
pub const IMPORT_KEY: &str = "import-key-1";
pub const WAIT: Duration = Duration::from_secs(60);
/// The REST API key (`users.track`) the sandbox accepts; in Secret `braze-rest`, key `api-key`.
pub const REST_API_KEY: &str = braze_support::REST_API_KEY;
const KEYS: braze_support::BrazeKeys =
    braze_support::BrazeKeys { partner: PARTNER, partner_key: PARTNER_KEY, import_key: IMPORT_KEY };

#[path = "braze.rs"]
mod braze_support;

/// Waits until `cond` holds (checked every few milliseconds, so the instant it returns is
/// close to when it began to hold), failing after [`WAIT`].
pub async fn wait_until(what: &str, cond: impl Fn() -> bool) -> Instant {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "not {what} within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Instant::now()
}

/// Logs of the operator under test, when `RUST_LOG` asks for them.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Installs the CRDs once per test binary.
async fn install_crd(cluster: &Cluster) {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED
        .get_or_init(|| async {
            cluster.install_crd(&api::crd()).await;
            cluster.install_crd(&api::trigger_crd()).await;
            cluster.install_crd(&api::destination_crd()).await;
            cluster.install_crd(&api::cluster_destination_crd()).await;
        })
        .await;
}

/// A test's world.
pub struct Env {
    pub cluster: &'static Cluster,
    pub client: kube::Client,
    pub ns: String,
    pub sandbox: RunningSandbox,
    pub clock: TestClock,
    pub keys_dir: tempfile::TempDir,
    pub scratch: tempfile::TempDir,
}

/// A controller running in-process.
pub struct Operator {
    task: Option<tokio::task::JoinHandle<Result<(), controller::ControllerError>>>,
    shutdown: Option<oneshot::Sender<()>>,
    pub metrics: Arc<Metrics>,
}

impl Operator {
    /// Stops it the hard way, as a crash would: runs are cut short, a Lease is not released.
    pub async fn kill(mut self) {
        let task = self.task.take().unwrap();
        task.abort();
        let _ = task.await;
    }

    /// Stops it gracefully.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.task.take().unwrap().await;
    }

    pub fn is_leader(&self) -> bool {
        self.metrics.leader.get() == 1
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Users the sandbox knows: `u0` … `u{n-1}`.
pub const USERS: usize = 6000;

impl Env {
    pub async fn new(prefix: &str) -> Env {
        logs();
        let cluster = Cluster::shared();
        let client = cluster.client().await;
        install_crd(cluster).await;
        let ns = cluster.namespace(prefix).await;
        let sandbox =
            braze_support::start_sandbox(KEYS, (0..USERS).map(|i| SandboxUser::identified(format!("u{i}"))).collect())
                .await;
        let keys_dir = tempfile::tempdir().unwrap();
        std::fs::write(keys_dir.path().join("us"), PARTNER_KEY).unwrap();
        let env = Env {
            cluster,
            client,
            ns,
            sandbox,
            // Runs at the real rate from now; tests jump it to run times.
            clock: TestClock::starting_at(Timestamp::now()),
            keys_dir,
            scratch: tempfile::tempdir().unwrap(),
        };
        env.put_secret("braze", "data-import-key", IMPORT_KEY).await;
        env.put_secret("braze-rest", "api-key", REST_API_KEY).await;
        env
    }

    pub fn config(&self) -> Config {
        Config {
            namespaces: vec![self.ns.clone()],
            partner_keys: PartnerKeys {
                dir: Some(self.keys_dir.path().to_owned()),
                extra_endpoints: [(normalize_endpoint(&self.sandbox.url()), "us".to_owned())].into(),
            },
            error_requeue: Duration::from_secs(1),
            ..Config::default()
        }
    }

    pub fn importer(&self) -> Arc<PipelineImporter> {
        self.importer_on(self.client.clone())
    }

    /// The real pipeline, talking to the API server through `client`.
    pub fn importer_on(&self, client: kube::Client) -> Arc<PipelineImporter> {
        let braze = BrazeClient::new(BrazeClientConfig {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            ..BrazeClientConfig::default()
        })
        .unwrap();
        Arc::new(PipelineImporter::new(client, braze, SnapshotStoreKind::Cluster, self.scratch.path().to_owned()))
    }

    pub async fn start(&self) -> Operator {
        self.start_with(self.config(), None).await
    }

    pub async fn start_with(&self, config: Config, notifier: Option<Arc<dyn Notify>>) -> Operator {
        self.start_importing(config, notifier, self.importer()).await
    }

    /// Starts the controller with `importer` in place of the real pipeline.
    pub async fn start_importing(
        &self,
        config: Config,
        notifier: Option<Arc<dyn Notify>>,
        importer: Arc<dyn Importer>,
    ) -> Operator {
        self.start_on(self.client.clone(), config, notifier, importer).await
    }

    /// Starts the controller talking to the API server through `client`.
    pub async fn start_on(
        &self,
        client: kube::Client,
        config: Config,
        notifier: Option<Arc<dyn Notify>>,
        importer: Arc<dyn Importer>,
    ) -> Operator {
        let metrics = Arc::new(Metrics::new());
        let deps = Dependencies { clock: Arc::new(self.clock.clone()), importer, notifier, metrics: metrics.clone() };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(controller::serve(client, config, deps, async move {
            let _ = rx.await;
        }));
        Operator { task: Some(task), shutdown: Some(tx), metrics }
    }

    /// Leader election on a Lease in the test's namespace.
    pub fn leader_config(&self, identity: &str) -> Config {
        Config {
            leader_election: Some(LeaderElection {
                lease_name: "cohort-operator".into(),
                lease_namespace: self.ns.clone(),
                identity: identity.into(),
                lease_duration_seconds: 4,
                renew_grace_seconds: 2,
            }),
            ..self.config()
        }
    }

    /// A client whose every request is noted in the returned [`RequestLog`].
    pub async fn recording_client(&self) -> (kube::Client, RequestLog) {
        let kubeconfig = Kubeconfig::read_from(self.cluster.kubeconfig()).expect("kubeconfig readable");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig valid");
        let log = RequestLog::default();
        let client = kube::client::ClientBuilder::try_from(config).expect("client builder").with_layer(&log).build();
        (client, log)
    }

    pub fn imports(&self) -> Api<CohortImport> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn put_secret(&self, name: &str, key: &str, value: &str) {
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": name },
            "stringData": { key: value }
        }))
        .unwrap();
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&secret))
            .await
            .expect("Secret applies");
    }

    /// A ConfigMap `members` (key `ids`) with one external id a line.
    pub async fn put_members(&self, ids: &[String]) {
        let cm: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "members" },
            "data": { "ids": ids.join("\n") }
        }))
        .unwrap();
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.ns)
            .patch("members", &PatchParams::apply("test").force(), &Patch::Apply(&cm))
            .await
            .expect("ConfigMap applies");
    }

    /// A Daily import at `at` (UTC) reading the `members` ConfigMap into cohort `cohort`.
    pub fn import(&self, name: &str, cohort: &str, schedule: Value) -> Value {
        json!({
            "apiVersion": "cohorts.dev/v1alpha1",
            "kind": "CohortImport",
            "metadata": { "name": name },
            "spec": {
                "cohort": { "id": cohort, "name": format!("Cohort {cohort}") },
                "source": { "configMap": { "name": "members", "key": "ids" } },
                "identifiers": { "externalId": "id" },
                "destination": { "braze": {
                    "restEndpoint": self.sandbox.url(),
                    "partner": PARTNER,
                    "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" }
                } },
                "schedule": schedule,
                // The guard is tested with the pipeline; here removals flow freely.
                "removalGuard": { "disabled": true }
            }
        })
    }

    /// [`Self::import`] by `method: Attribute`: attribute `attribute` of `shape`, through the
    /// REST API key in Secret `braze-rest`.
    pub fn attribute_import(&self, name: &str, cohort: &str, schedule: Value, attribute: &str, shape: &str) -> Value {
        let mut doc = self.import(name, cohort, schedule);
        doc["spec"]["destination"]["braze"] = json!({
            "restEndpoint": self.sandbox.url(),
            "method": "Attribute",
            "apiKeySecretRef": { "name": "braze-rest", "key": "api-key" },
            "attribute": { "name": attribute, "shape": shape }
        });
        doc
    }

    pub async fn create(&self, doc: Value) -> CohortImport {
        self.imports()
            .create(&PostParams::default(), &serde_json::from_value(doc).unwrap())
            .await
            .expect("import created")
    }

    pub async fn get(&self, name: &str) -> CohortImport {
        self.imports().get(name).await.expect("import exists")
    }

    pub async fn merge(&self, name: &str, patch: Value) {
        self.imports().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("import patched");
    }

    /// Asks for a run now, as `kubectl cohort run` does: sets the run-requested annotation.
    pub async fn request_run(&self, name: &str, value: &str) {
        self.merge(name, json!({ "metadata": { "annotations": { api::RUN_REQUESTED_ANNOTATION: value } } })).await;
    }

    pub async fn delete(&self, name: &str) {
        self.imports().delete(name, &DeleteParams::default()).await.expect("delete accepted");
    }

    /// Waits until `cond` holds for the import (or, with `None`, until it is gone).
    pub async fn wait_for(
        &self,
        name: &str,
        what: &str,
        cond: impl Fn(Option<&CohortImport>) -> bool + Send + 'static,
    ) -> Option<CohortImport> {
        match tokio::time::timeout(WAIT, await_condition(self.imports(), name, cond)).await {
            Ok(found) => found.expect("watching the import"),
            Err(_) => {
                let now = self.imports().get_opt(name).await.ok().flatten();
                panic!(
                    "{name}: not {what} within {WAIT:?}; status: {}",
                    serde_json::to_string_pretty(&now.map(|i| i.status)).unwrap()
                );
            }
        }
    }

    /// Waits until `cond` holds for the import's status.
    pub async fn wait_status(
        &self,
        name: &str,
        what: &str,
        cond: impl Fn(&api::CohortImportStatus) -> bool + Send + 'static,
    ) -> CohortImport {
        self.wait_for(name, what, move |i| i.and_then(|i| i.status.as_ref()).is_some_and(&cond))
            .await
            .expect("the import exists")
    }

    /// Waits until the import's `Ready` reason is `reason`.
    pub async fn wait_reason(&self, name: &str, reason: &'static str) -> CohortImport {
        self.wait_status(name, reason, move |s| ready_reason(s) == Some(reason)).await
    }

    /// Waits until the import has `n` runs in its history and none in progress.
    pub async fn wait_runs(&self, name: &str, n: usize) -> CohortImport {
        self.wait_status(name, &format!("finished with {n} runs"), move |s| {
            s.history.len() == n && s.current_run.is_none() && ready_reason(s) != Some("Running")
        })
        .await
    }

    /// The snapshot ConfigMaps (head and chunks) the import `name` holds or last held.
    pub async fn snapshot_maps(&self, name: &str) -> Vec<ConfigMap> {
        let selector = "cohorts.dev/snapshot-part";
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|cm| {
                cm.metadata.annotations.as_ref().and_then(|a| a.get("cohorts.dev/import")).map(String::as_str)
                    == Some(name)
            })
            .collect()
    }

    /// Deletes the snapshot ConfigMaps of `name`, as a clean-up by label or a restore would;
    /// returns how many.
    pub async fn delete_snapshot(&self, name: &str) -> usize {
        let maps = self.snapshot_maps(name).await;
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.ns);
        for map in &maps {
            api.delete(map.metadata.name.as_deref().unwrap(), &DeleteParams::default()).await.unwrap();
        }
        maps.len()
    }

    /// External ids in the sandbox cohort.
    pub fn members(&self, cohort: &str) -> BTreeSet<String> {
        self.sandbox.member_external_ids(PARTNER, cohort).into_iter().collect()
    }

    /// Events on `name`, as (reason, note).
    pub async fn events(&self, name: &str) -> Vec<(String, String)> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// The notes of `name`'s Events of `reason`, once there are at least `count` of them.
    pub async fn wait_events(&self, name: &str, reason: &str, count: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let notes: Vec<String> =
                self.events(name).await.into_iter().filter(|(r, _)| r == reason).map(|(_, n)| n).collect();
            if notes.len() >= count {
                return notes;
            }
            assert!(Instant::now() < deadline, "{name}: {} {reason} Events within {WAIT:?}, not {count}", notes.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for an Event with `reason` on `name`.
    pub async fn wait_event(&self, name: &str, reason: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((_, note)) = self.events(name).await.into_iter().find(|(r, _)| r == reason) {
                return note;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: no {reason} Event within {WAIT:?}: {:?}",
                self.events(name).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The Kubernetes API requests a client sent, each as `VERB RESOURCE[/SUBRESOURCE]` (`get
/// secrets`, `patch cohortimports/status`, `deletecollection configmaps`); a tower layer.
#[derive(Clone, Default)]
pub struct RequestLog(Arc<std::sync::Mutex<Noted>>);

/// The requests noted, and when the last one was.
#[derive(Default)]
pub struct Noted {
    requests: Vec<String>,
    last: Option<Instant>,
}

impl RequestLog {
    /// The requests noted since the last take, watches left out (a watch is one long
    /// request, started once).
    pub fn take(&self) -> Vec<String> {
        let taken = std::mem::take(&mut self.0.lock().unwrap().requests);
        taken.into_iter().filter(|r| !r.starts_with("watch ")).collect()
    }

    /// Waits until the last request was sent at least `quiet` ago: whatever a change
    /// caused has been sent. Returns at once when it already was.
    pub async fn settle(&self, quiet: Duration) {
        let deadline = Instant::now() + WAIT;
        loop {
            let since = self.0.lock().unwrap().last.map_or(quiet, |last| last.elapsed());
            if since >= quiet {
                return;
            }
            assert!(Instant::now() < deadline, "requests kept coming for {WAIT:?}");
            tokio::time::sleep(quiet - since).await;
        }
    }

    fn note(&self, request: String) {
        let mut noted = self.0.lock().unwrap();
        noted.requests.push(request);
        noted.last = Some(Instant::now());
    }
}

impl<S> tower::Layer<S> for RequestLog {
    type Service = Recording<S>;

    fn layer(&self, inner: S) -> Recording<S> {
        Recording { inner, log: self.clone() }
    }
}

/// A service that notes each request in its [`RequestLog`].
#[derive(Clone)]
pub struct Recording<S> {
    inner: S,
    log: RequestLog,
}

impl<S, B> tower::Service<http::Request<B>> for Recording<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.log.note(describe(&request));
        self.inner.call(request)
    }
}

/// `VERB RESOURCE[/SUBRESOURCE]` of a request to the API server.
fn describe<B>(request: &http::Request<B>) -> String {
    let parts: Vec<&str> = request.uri().path().trim_start_matches('/').split('/').collect();
    // `/api/v1/…` or `/apis/GROUP/VERSION/…`, then `namespaces/NS/` unless cluster-scoped.
    let rest = if parts[0] == "api" { &parts[2..] } else { &parts[3.min(parts.len())..] };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 { &rest[2..] } else { rest };
    let (resource, named) = (rest.first().copied().unwrap_or("?"), rest.len() > 1);
    let sub = rest.get(2).map(|s| format!("/{s}")).unwrap_or_default();
    let watch = request.uri().query().is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = match *request.method() {
        http::Method::GET if watch => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if named => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "other",
    };
    format!("{verb} {resource}{sub}")
}

pub fn ready_reason(status: &api::CohortImportStatus) -> Option<&str> {
    status.ready().map(|c| c.reason.as_str())
}

pub fn ready(status: &api::CohortImportStatus) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.ready()
}

pub fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("u{i}")).collect()
}

pub fn set(ids: &[String]) -> BTreeSet<String> {
    ids.iter().cloned().collect()
}

pub fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// The binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cohort-operator"))
}
