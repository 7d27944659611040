//! The controller at scale, on a real kube-apiserver: creates `IMPORTS` CohortImports
//! (default 1,000) and reports
//! - the time from the first create until every import is `Scheduled`,
//! - the operator's peak RSS (it runs as a child process of this benchmark), and its RSS
//!   while idle (every import Scheduled, after the idle hour),
//! - its Kubernetes API requests per minute while idle (real time, nothing due; target 0),
//! - the writes it makes to the API server (status, Events, ConfigMaps, Leases) during an
//!   idle hour of simulated time (target: none; no import is due in that hour),
//! - the busy minute: `BUSY` of the imports (default 1,000, at most `IMPORTS`) are due at
//!   the same minute; its API requests per minute from that slot until the last of them
//!   started, and the p50/p99 delay from the slot to each run's start.
//!
//! `cargo bench --bench controller_scale` (`IMPORTS=N`, `BUSY=N`, `NAMESPACES=N` (default 10),
//! `CREATORS=N` creates at once (default 16), `PRECREATE=1` to create every import before the
//! operator starts (times then run from its start), `IDLE_SECONDS=N` for the real-time idle window
//! (default 60), `STEP_MINUTES=N` for the simulated idle hour's steps (default 5),
//! `KUBE_API_QPS`/`KUBE_API_BURST` for the operator's client rate limit (default: the
//! operator's defaults), `OPERATOR_LOG` for the operator's `RUST_LOG` (default `warn`)).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cohort_operator::api::CurrentRun;
use cohort_operator::api::{self, CohortImport};
use cohort_operator::braze::normalize_endpoint;
use cohort_operator::controller::clock::{Clock, TestClock};
use cohort_operator::controller::importer::{ImportError, Importer};
use cohort_operator::controller::kube_api::{self, ApiLimits};
use cohort_operator::controller::metrics::{self, Metrics};
use cohort_operator::controller::pipeline::{PipelineImporter, SnapshotStoreKind};
use cohort_operator::controller::secrets::{BrazeKeys, PartnerKeys};
use cohort_operator::controller::{self, Config, Dependencies};
use cohort_operator::domain::validate::ValidSpec;
use cohort_operator::run::RunReport;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use serde_json::json;
use testkit::bench::{cpu_seconds_of, peak_rss_kib_of, rss_kib_of};
use testkit::cluster::Cluster;

#[path = "../tests/support/braze.rs"]
mod braze_support;

/// The partner and keys the sandbox accepts and the operator is given.
const KEYS: braze_support::BrazeKeys =
    braze_support::BrazeKeys { partner: "kubit", partner_key: "partner-key", import_key: "import-key" };

const ROLE: &str = "COHORT_BENCH_OPERATOR";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    if std::env::var_os(ROLE).is_some() {
        runtime.block_on(operator());
    } else {
        runtime.block_on(bench());
    }
}

async fn kube_config(path: &str) -> kube::Config {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap()
}

/// The operator's client rate limit: its defaults unless `KUBE_API_QPS`/`KUBE_API_BURST`.
fn api_limits() -> ApiLimits {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    ApiLimits {
        qps: env("KUBE_API_QPS").map_or(ApiLimits::DEFAULT.qps, |v| v.parse().expect("KUBE_API_QPS is a number")),
        burst: env("KUBE_API_BURST").map_or(ApiLimits::DEFAULT.burst, |v| v.parse().expect("KUBE_API_BURST")),
    }
}

/// The real importer, noting when each run reaches it (after waiting for a run slot): one
/// line `NAME SECONDS` per run in `BENCH_STARTS`, seconds after the busy slot.
struct NotingStarts {
    inner: PipelineImporter,
    clock: TestClock,
    busy_slot: Timestamp,
    starts: std::sync::Mutex<std::fs::File>,
}

impl Importer for NotingStarts {
    fn run<'a>(
        &'a self,
        import: &'a CohortImport,
        spec: &'a ValidSpec,
        run: &'a CurrentRun,
        keys: BrazeKeys,
    ) -> BoxFuture<'a, Result<RunReport, ImportError>> {
        let delay = self.clock.now().duration_since(self.busy_slot).as_secs_f64();
        writeln!(self.starts.lock().unwrap(), "{} {delay:.3}", import.name_any()).unwrap();
        self.inner.run(import, spec, run, keys)
    }

    fn remove_members<'a>(
        &'a self,
        import: &'a CohortImport,
        keys: BrazeKeys,
    ) -> BoxFuture<'a, Result<u64, ImportError>> {
        self.inner.remove_members(import, keys)
    }

    fn forget<'a>(&'a self, import: &'a CohortImport) -> BoxFuture<'a, Result<(), ImportError>> {
        self.inner.forget(import)
    }
}

/// The child: the controller with a test clock that the parent advances through stdin.
async fn operator() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let metrics = Arc::new(Metrics::new());
    let config = kube_config(&var("BENCH_KUBECONFIG")).await;
    let client = kube_api::client(config, api_limits(), metrics.clone()).unwrap();
    let clock = TestClock::starting_at(var("BENCH_CLOCK_START").parse().unwrap());
    let (addr, _server) = metrics::serve(metrics.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    println!("METRICS {addr}");
    let scratch = tempfile::tempdir().unwrap();
    let importer = Arc::new(NotingStarts {
        inner: PipelineImporter::new(
            client.clone(),
            cohort_operator::braze::BrazeClient::new(Default::default()).unwrap(),
            SnapshotStoreKind::Cluster,
            scratch.path().to_owned(),
        ),
        clock: clock.clone(),
        busy_slot: var("BENCH_BUSY_SLOT").parse().unwrap(),
        starts: std::sync::Mutex::new(std::fs::File::create(var("BENCH_STARTS")).unwrap()),
    });
    let config = Config {
        namespaces: var("BENCH_NAMESPACES").split(',').map(str::to_owned).collect(),
        partner_keys: PartnerKeys {
            dir: Some(var("BENCH_KEYS_DIR").into()),
            extra_endpoints: [(normalize_endpoint(&var("BENCH_SANDBOX_URL")), "us".to_owned())].into(),
        },
        ..Config::default()
    };
    let deps = Dependencies { clock: Arc::new(clock.clone()), importer, notifier: None, metrics };
    let controller = tokio::spawn(controller::serve(client, config, deps, futures::future::pending()));
    // `advance SECONDS` lines jump the clock; end of input ends the operator.
    let lines = tokio::task::spawn_blocking(move || {
        for line in std::io::stdin().lock().lines() {
            let line = line.unwrap();
            if let Some(secs) = line.strip_prefix("advance ") {
                clock.advance(SignedDuration::from_secs(secs.trim().parse().unwrap()));
                println!("NOW {}", clock.now());
            } else if let Some(at) = line.strip_prefix("set ") {
                clock.set(at.trim().parse().unwrap());
                println!("NOW {}", clock.now());
            }
        }
    });
    lines.await.unwrap();
    controller.abort();
}

struct Child_ {
    child: Child,
    stdin: ChildStdin,
    metrics_url: String,
}

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Marks the benchmark's own write that closes the idle hour. A watch delivers one kind's
/// events in order, so once a watcher has seen its fence, every earlier write of that kind
/// has been counted: no fixed wait for stragglers.
const FENCE_LABEL: &str = "bench.cohorts.dev/fence";

/// Counts writes to one kind in the benchmark's namespaces; signals `ready` when the watch
/// is primed and `fence` when the first fenced object arrives (that write is not counted).
fn count_writes<K>(
    api: Api<K>,
    namespaces: Arc<Vec<String>>,
    counter: Arc<AtomicU64>,
    ready: tokio::sync::mpsc::Sender<()>,
    fence: tokio::sync::mpsc::Sender<()>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        let mut fenced = false;
        while let Ok(Some(event)) = stream.try_next().await {
            match event {
                watcher::Event::InitDone => {
                    let _ = ready.send(()).await;
                }
                watcher::Event::Apply(object) | watcher::Event::Delete(object) => {
                    if !object.meta().namespace.as_ref().is_some_and(|ns| namespaces.contains(ns)) {
                        continue;
                    }
                    if !fenced && object.meta().labels.as_ref().is_some_and(|l| l.contains_key(FENCE_LABEL)) {
                        fenced = true;
                        let _ = fence.send(()).await;
                    } else {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                watcher::Event::Init | watcher::Event::InitApply(_) => {}
            }
        }
    })
}

/// Writes one fenced object of each watched kind. The import gets a label (a metadata-only
/// change: the operator plans it again and, idle, writes nothing).
async fn write_fences(client: &kube::Client, ns: &str, an_import: &str) {
    let labels = json!({ FENCE_LABEL: "idle-hour-end" });
    let pp = PostParams::default();
    Api::<CohortImport>::namespaced(client.clone(), ns)
        .patch(an_import, &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "labels": labels } })))
        .await
        .unwrap();
    let fence = |extra: serde_json::Value| {
        let mut doc = json!({ "metadata": { "name": "bench-fence", "labels": labels } });
        doc.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        doc
    };
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .create(&pp, &serde_json::from_value(fence(json!({}))).unwrap())
        .await
        .unwrap();
    Api::<Lease>::namespaced(client.clone(), ns)
        .create(&pp, &serde_json::from_value(fence(json!({ "spec": {} }))).unwrap())
        .await
        .unwrap();
    let event = fence(json!({
        "eventTime": Timestamp::now().to_string(),
        "reportingController": "cohorts.dev/bench",
        "reportingInstance": "bench",
        "action": "Fence",
        "reason": "Fence",
        "type": "Normal",
        "note": "end of the idle hour",
        "regarding": { "apiVersion": "v1", "kind": "ConfigMap", "namespace": ns, "name": "bench-fence" },
    }));
    Api::<Event>::namespaced(client.clone(), ns).create(&pp, &serde_json::from_value(event).unwrap()).await.unwrap();
}

/// The CPU the processes sharing the machine used, phase by phase: on 2 cores the operator,
/// the API server, etcd and this benchmark's own watches compete, and the split says which
/// of them bounds a phase.
struct CpuMeter {
    processes: Vec<(&'static str, u32)>,
    last: Vec<f64>,
}

impl CpuMeter {
    fn new(operator: u32, cluster: &Cluster) -> CpuMeter {
        let mut processes = vec![("operator", operator), ("benchmark", std::process::id())];
        processes.extend(cluster.server_pids());
        let last = processes.iter().map(|(_, pid)| cpu_seconds_of(*pid).unwrap_or(0.0)).collect();
        CpuMeter { processes, last }
    }

    /// CPU seconds each process used since the last call, as one line.
    fn phase(&mut self) -> String {
        let mut parts = Vec::new();
        for ((name, pid), last) in self.processes.iter().zip(self.last.iter_mut()) {
            let now = cpu_seconds_of(*pid).unwrap_or(*last);
            parts.push(format!("{name} {:.1}", now - *last));
            *last = now;
        }
        format!("CPU s: {}", parts.join(", "))
    }
}

/// The operator's API requests so far, by verb.
async fn requests_by_verb(url: &str) -> std::collections::BTreeMap<String, f64> {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("cohort_operator_kube_api_requests_total{verb=\""))
        .filter_map(|l| {
            let (verb, value) = l.split_once("\"} ")?;
            Some((verb.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().filter(|v| !v.is_empty()).map_or(default, |v| v.parse().expect(name))
}

/// What the benchmark's watch of the imports has seen: how many are `Scheduled`, and how
/// many of the busy minute's imports have run since the busy slot.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    scheduled: usize,
    busy_ran: usize,
}

fn is_scheduled(import: &CohortImport) -> bool {
    import.status.as_ref().is_some_and(|s| {
        s.next_run_at.is_some() && s.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "Scheduled")
    })
}

fn ran_since(import: &CohortImport, slot: Timestamp) -> bool {
    import.status.as_ref().and_then(|s| s.last_run.as_ref()).is_some_and(|r| r.started_at >= slot)
}

/// Watches every import (one watch, not a list every few hundred milliseconds: at 10,000
/// imports that would load the API server more than the operator does).
fn watch_progress(
    client: kube::Client,
    busy: Arc<std::collections::HashSet<String>>,
    busy_slot: Timestamp,
) -> tokio::sync::watch::Receiver<Option<Progress>> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let mut stream = watcher(Api::<CohortImport>::all(client), watcher::Config::default()).boxed();
        let (mut scheduled, mut ran) = (std::collections::HashSet::new(), std::collections::HashSet::new());
        while let Ok(Some(event)) = stream.try_next().await {
            match event {
                watcher::Event::Apply(import) | watcher::Event::InitApply(import) => {
                    let name = import.name_any();
                    if is_scheduled(&import) {
                        scheduled.insert(name.clone());
                    } else {
                        scheduled.remove(&name);
                    }
                    if busy.contains(&name) && ran_since(&import, busy_slot) {
                        ran.insert(name);
                    }
                }
                watcher::Event::Delete(_) | watcher::Event::Init => continue,
                watcher::Event::InitDone => {}
            }
            let _ = tx.send(Some(Progress { scheduled: scheduled.len(), busy_ran: ran.len() }));
        }
    });
    rx
}

async fn wait_for(
    progress: &mut tokio::sync::watch::Receiver<Option<Progress>>,
    what: &str,
    limit: Duration,
    done: impl Fn(Progress) -> bool,
) {
    let waited = tokio::time::timeout(limit, progress.wait_for(|p| p.is_some_and(&done))).await.is_ok();
    let seen = *progress.borrow();
    assert!(waited, "not {what} within {limit:?}: {seen:?}");
}

/// The import documents: `imports` of them spread over `namespaces`, the first `busy` due
/// daily at `busy_at`, the others at `at`.
fn import_doc(i: usize, busy: usize, at: &str, busy_at: &str, url: &str) -> serde_json::Value {
    json!({
        "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortImport",
        "metadata": { "name": format!("import-{i:05}") },
        "spec": {
            "cohort": { "id": format!("cohort-{i}"), "name": format!("Cohort {i}") },
            "source": { "inline": { "rows": [ { "id": format!("u{i}") } ] } },
            "identifiers": { "externalId": "id" },
            "destination": { "braze": {
                "restEndpoint": url, "partner": KEYS.partner,
                "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" }
            } },
            "schedule": { "cadence": "Daily", "at": if i < busy { busy_at } else { at } }
        }
    })
}

/// Percentile `p` (0–100) of sorted `values`, nearest rank.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

struct Env {
    cluster: Cluster,
    client: kube::Client,
    namespaces: Vec<String>,
    sandbox: braze_sandbox::RunningSandbox,
    _keys_dir: tempfile::TempDir,
    keys_dir: std::path::PathBuf,
}

async fn environment(namespace_count: usize) -> Env {
    let cluster = Cluster::start();
    let client = cluster.client().await;
    // Every CRD the operator watches, as the chart installs them: a watch of one that is not
    // served fails and is tried again on a backoff, requests an idle operator never sends.
    cluster.install_crd(&api::crd()).await;
    cluster.install_crd(&api::trigger_crd()).await;
    cluster.install_crd(&api::destination_crd()).await;
    cluster.install_crd(&api::cluster_destination_crd()).await;
    let mut namespaces = Vec::new();
    for _ in 0..namespace_count {
        namespaces.push(cluster.namespace("scale").await);
    }
    let sandbox = braze_support::start_sandbox(KEYS, vec![]).await;
    let keys_dir = tempfile::tempdir().unwrap();
    std::fs::write(keys_dir.path().join("us"), KEYS.partner_key).unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "braze" }, "stringData": { "data-import-key": KEYS.import_key }
    }))
    .unwrap();
    for ns in &namespaces {
        Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.unwrap();
    }
    let path = keys_dir.path().to_owned();
    Env { cluster, client, namespaces, sandbox, _keys_dir: keys_dir, keys_dir: path }
}

/// Creates `imports` CohortImports, `CREATORS` (16) at a time, spread over `namespaces`;
/// returns how long that took.
async fn create_imports(
    client: &kube::Client,
    namespaces: &[String],
    imports: usize,
    busy: usize,
    at: &str,
    busy_at: &str,
    sandbox_url: &str,
) -> Duration {
    let began = Instant::now();
    futures::stream::iter(0..imports)
        .map(|i| {
            let api = Api::<CohortImport>::namespaced(client.clone(), &namespaces[i % namespaces.len()]);
            let doc = import_doc(i, busy, at, busy_at, sandbox_url);
            async move { api.create(&PostParams::default(), &serde_json::from_value(doc).unwrap()).await.unwrap() }
        })
        .buffer_unordered(env_or("CREATORS", 16) as usize)
        .collect::<Vec<_>>()
        .await;
    began.elapsed()
}

/// The operator as a child process of this benchmark, once it says where its metrics are.
fn spawn_operator(
    env: &Env,
    start: Timestamp,
    busy_slot: Timestamp,
    starts_file: &std::path::Path,
) -> (Child_, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "1")
        .env("BENCH_KUBECONFIG", env.cluster.kubeconfig())
        .env("BENCH_NAMESPACES", env.namespaces.join(","))
        .env("BENCH_CLOCK_START", start.to_string())
        .env("BENCH_BUSY_SLOT", busy_slot.to_string())
        .env("BENCH_STARTS", starts_file)
        .env("BENCH_SANDBOX_URL", env.sandbox.url())
        .env("BENCH_KEYS_DIR", &env.keys_dir)
        .env("RUST_LOG", std::env::var("OPERATOR_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the operator starts");
    let stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = stdout.next().unwrap().unwrap();
    let metrics_url =
        format!("http://{}/metrics", first.strip_prefix("METRICS ").expect("the operator says where metrics are"));
    (Child_ { child, stdin, metrics_url }, stdout)
}

async fn bench() {
    let imports = env_or("IMPORTS", 1000) as usize;
    let busy = (env_or("BUSY", 1000) as usize).min(imports);
    let namespace_count = env_or("NAMESPACES", 10).max(1) as usize;
    let idle_seconds = env_or("IDLE_SECONDS", 60);
    let step_minutes = env_or("STEP_MINUTES", 5).clamp(1, 60) as i64;
    let env = environment(namespace_count).await;
    let (client, namespaces) = (env.client.clone(), env.namespaces.clone());

    // Simulated time starts now; the busy imports run daily at the top of the hour after
    // next, the others six hours from now, so the simulated hour that follows has nothing due.
    let start = Timestamp::now();
    let hour = start.to_zoned(jiff::tz::TimeZone::UTC).hour();
    let at = format!("{:02}:00", (hour + 6) % 24);
    let busy_at = format!("{:02}:00", (hour + 2) % 24);
    let busy_slot = Timestamp::from_second(start.as_second() / 3600 * 3600 + 2 * 3600).unwrap();
    let starts_dir = tempfile::tempdir().unwrap();
    let starts_file = starts_dir.path().join("starts");
    let busy_names: Arc<std::collections::HashSet<String>> =
        Arc::new((0..busy).map(|i| format!("import-{i:05}")).collect());
    let mut progress = watch_progress(client.clone(), busy_names.clone(), busy_slot);
    wait_for(&mut progress, "watching", Duration::from_secs(60), |_| true).await;
    let sandbox_url = env.sandbox.url();
    let create = || create_imports(&client, &namespaces, imports, busy, &at, &busy_at, &sandbox_url);
    let spawn = || spawn_operator(&env, start, busy_slot, &starts_file);

    // `PRECREATE=1`: every import exists before the operator starts (times from its start);
    // otherwise they are created while it runs (times from the first create).
    let precreate = env_or("PRECREATE", 0) == 1;
    let precreated = if precreate { Some(create().await) } else { None };
    let (mut operator, mut stdout) = spawn();
    let pid = operator.child.id();
    let mut cpu = CpuMeter::new(pid, &env.cluster);
    let idle_rss = peak_rss_kib_of(pid).unwrap_or(0);
    let requests = |url: String| async move { metric(&url, "cohort_operator_kube_api_requests_total").await };
    let startup_requests = requests(operator.metrics_url.clone()).await;
    let began = Instant::now();
    if !precreate {
        create().await;
    }
    let created = precreated.unwrap_or(began.elapsed());
    wait_for(&mut progress, "all Scheduled", Duration::from_secs(1800), |p| p.scheduled == imports).await;
    let all_scheduled = began.elapsed();
    let scheduling_requests = requests(operator.metrics_url.clone()).await - startup_requests;
    let scheduled_rss = peak_rss_kib_of(pid).unwrap_or(0);
    let scheduling_cpu = cpu.phase();

    // Idle, in real time: nothing is due, nothing changes.
    let before = requests_by_verb(&operator.metrics_url).await;
    tokio::time::sleep(Duration::from_secs(idle_seconds)).await;
    let after = requests_by_verb(&operator.metrics_url).await;
    let idle_by_verb: Vec<(String, f64)> = after
        .iter()
        .map(|(verb, n)| (verb.clone(), n - before.get(verb).copied().unwrap_or(0.0)))
        .filter(|(_, n)| *n > 0.0)
        .collect();
    // (`sum` of no floats is -0.0.)
    let idle_requests = idle_by_verb.iter().fold(0.0, |total, (_, n)| total + n);
    let idle_cpu = cpu.phase();

    let idle_hour = simulated_idle_hour(&mut operator, &mut stdout, &client, &namespaces, imports, step_minutes).await;
    let idle_hour_rss = peak_rss_kib_of(pid).unwrap_or(0);
    // Idle: every import Scheduled, nothing due; what the operator holds now, not its peak.
    let idle_rss_now = rss_kib_of(pid).unwrap_or(0);
    let idle_hour_cpu = cpu.phase();

    let busy_minute = if busy > 0 {
        Some(busy_minute(&mut operator, &mut stdout, &mut progress, busy, busy_slot, &starts_file, &busy_names).await)
    } else {
        None
    };
    let busy_cpu = cpu.phase();
    let errors = metric(&operator.metrics_url, "cohort_operator_reconcile_errors_total").await;

    println!(
        "controller_scale: {imports} CohortImports in {} namespaces on kube-apiserver v1.20.2; client limit {:?}",
        namespaces.len(),
        api_limits()
    );
    println!("  created in                         {:>8.2} s", created.as_secs_f64());
    if precreate {
        println!(
            "  all Scheduled after                {:>8.2} s (from the operator's start; all were created before)",
            all_scheduled.as_secs_f64()
        );
    } else {
        println!(
            "  all Scheduled after                {:>8.2} s (from the first create; {:.2} s after the last)",
            all_scheduled.as_secs_f64(),
            all_scheduled.saturating_sub(created).as_secs_f64()
        );
    }
    println!("  API requests until all Scheduled   {:>8.0}", scheduling_requests);
    println!("    {scheduling_cpu}");
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("  operator RSS at its start          {:>8.1} MiB", mib(idle_rss));
    println!(
        "  operator peak RSS                  {:>8.1} MiB (all Scheduled {:.1} MiB, after the idle hour {:.1} MiB)",
        mib(peak_rss_kib_of(pid).unwrap_or(0)),
        mib(scheduled_rss),
        mib(idle_hour_rss)
    );
    println!("  operator RSS idle (after the idle hour, VmRSS) {:>8.1} MiB", mib(idle_rss_now));
    println!(
        "  idle (real time, {idle_seconds} s):             {:>8.1} API requests/min ({})",
        idle_requests / idle_seconds as f64 * 60.0,
        if idle_by_verb.is_empty() {
            "none".to_owned()
        } else {
            idle_by_verb.iter().map(|(verb, n)| format!("{verb} {n}")).collect::<Vec<_>>().join(", ")
        }
    );
    println!("    {idle_cpu}");
    println!(
        "  idle hour (simulated, {} steps): {} API writes (status, Events, ConfigMaps, Leases); {:.0} reconciles in {:.1} s",
        60 / step_minutes,
        idle_hour.writes,
        idle_hour.reconciles,
        idle_hour.wall.as_secs_f64()
    );
    println!("    {idle_hour_cpu}");
    if let Some(b) = &busy_minute {
        b.print(busy);
        println!("    {busy_cpu}");
    }
    println!("  reconcile errors                   {:>8}", errors as u64);
    let by_verb = requests_by_verb(&operator.metrics_url).await;
    let by_verb: Vec<_> = by_verb.iter().map(|(verb, n)| format!("{verb} {n}")).collect();
    println!("  API requests in all, by verb       {}", by_verb.join(", "));
    assert_eq!(idle_hour.writes, 0, "the operator wrote to the API server during an idle hour");
    drop(operator);
    drop(env);
}

struct IdleHour {
    writes: u64,
    reconciles: f64,
    wall: Duration,
}

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// The idle hour: watch every kind the operator writes, then move the clock through the
/// hour in steps; each step makes the controller plan all imports again.
async fn simulated_idle_hour(
    operator: &mut Child_,
    stdout: &mut Lines,
    client: &kube::Client,
    namespaces: &[String],
    imports: usize,
    step_minutes: i64,
) -> IdleHour {
    let writes = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(4);
    let (fence_tx, mut fence_rx) = tokio::sync::mpsc::channel(4);
    let ours = Arc::new(namespaces.to_vec());
    let (o, w, r, f) = (&ours, &writes, &ready_tx, &fence_tx);
    let watchers = vec![
        count_writes(Api::<CohortImport>::all(client.clone()), o.clone(), w.clone(), r.clone(), f.clone()),
        count_writes(Api::<Event>::all(client.clone()), o.clone(), w.clone(), r.clone(), f.clone()),
        count_writes(Api::<ConfigMap>::all(client.clone()), o.clone(), w.clone(), r.clone(), f.clone()),
        count_writes(Api::<Lease>::all(client.clone()), o.clone(), w.clone(), r.clone(), f.clone()),
    ];
    for _ in 0..watchers.len() {
        ready_rx.recv().await.unwrap();
    }
    let reconciles_name = "cohort_operator_reconciles_total";
    let began = Instant::now();
    let first = metric(&operator.metrics_url, reconciles_name).await;
    let mut reconciles = first;
    for _ in 0..(60 / step_minutes) {
        writeln!(operator.stdin, "advance {}", step_minutes * 60).unwrap();
        operator.stdin.flush().unwrap();
        let _now = stdout.next().unwrap().unwrap();
        // Every import is planned again before the next step.
        let target = reconciles + imports as f64;
        loop {
            let now = metric(&operator.metrics_url, reconciles_name).await;
            if now >= target {
                reconciles = now;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Every write the last plans caused has reached the watchers once each has its fence.
    write_fences(client, &namespaces[0], "import-00000").await;
    let fence_deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..watchers.len() {
        let left = fence_deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, fence_rx.recv()).await.expect("every watcher sees its fence within 60 s").unwrap();
    }
    for w in watchers {
        w.abort();
    }
    IdleHour { writes: writes.load(Ordering::Relaxed), reconciles: reconciles - first, wall: began.elapsed() }
}

struct BusyMinute {
    /// Requests from the slot to 60 s after it (or to the last start, if sooner), per minute.
    first_minute_per_minute: f64,
    /// Requests from the slot until the last busy run ended, per minute.
    whole_per_minute: f64,
    whole: Duration,
    delays: Vec<f64>,
    histogram_count: f64,
}

impl BusyMinute {
    fn print(&self, busy: usize) {
        println!("  busy minute: {busy} imports due at the same minute");
        println!("    API requests/min, first minute   {:>8.0}", self.first_minute_per_minute);
        println!(
            "    API requests/min, slot to last   {:>8.0} (all ran {:.1} s after the slot)",
            self.whole_per_minute,
            self.whole.as_secs_f64()
        );
        println!(
            "    slot to run start  p50 {:.1} s, p99 {:.1} s, max {:.1} s ({} starts; run_start_delay_seconds count {})",
            percentile(&self.delays, 50.0),
            percentile(&self.delays, 99.0),
            self.delays.last().copied().unwrap_or(f64::NAN),
            self.delays.len(),
            self.histogram_count
        );
    }
}

/// Sets the clock a few seconds before the busy slot and waits until every busy import has
/// run; the operator's request counter and the runs' start times tell the rest.
async fn busy_minute(
    operator: &mut Child_,
    stdout: &mut Lines,
    progress: &mut tokio::sync::watch::Receiver<Option<Progress>>,
    busy: usize,
    slot: Timestamp,
    starts_file: &std::path::Path,
    busy_names: &std::collections::HashSet<String>,
) -> BusyMinute {
    let lead = Duration::from_secs(5);
    writeln!(operator.stdin, "set {}", slot - SignedDuration::try_from(lead).unwrap()).unwrap();
    operator.stdin.flush().unwrap();
    let _now = stdout.next().unwrap().unwrap();
    let url = operator.metrics_url.clone();
    let at_slot = Instant::now() + lead;
    tokio::time::sleep_until(at_slot.into()).await;
    let before = metric(&url, "cohort_operator_kube_api_requests_total").await;
    let first_minute = {
        let url = url.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until((at_slot + Duration::from_secs(60)).into()).await;
            metric(&url, "cohort_operator_kube_api_requests_total").await
        })
    };
    wait_for(progress, "every busy import run", Duration::from_secs(3600), |p| p.busy_ran == busy).await;
    let whole = at_slot.elapsed();
    let after = metric(&url, "cohort_operator_kube_api_requests_total").await;
    let first_minute_per_minute = if whole < Duration::from_secs(60) {
        first_minute.abort();
        (after - before) / whole.as_secs_f64() * 60.0
    } else {
        first_minute.await.unwrap() - before
    };
    let mut delays: Vec<f64> = std::fs::read_to_string(starts_file)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| busy_names.contains(*name))
        .map(|(_, d)| d.parse().unwrap())
        .collect();
    delays.sort_by(f64::total_cmp);
    BusyMinute {
        first_minute_per_minute,
        whole_per_minute: (after - before) / whole.as_secs_f64() * 60.0,
        whole,
        delays,
        histogram_count: metric(&url, "cohort_operator_run_start_delay_seconds_count").await,
    }
}
