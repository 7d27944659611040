//! The controller at scale, on a real kube-apiserver: creates 1,000 CohortImports and
//! reports
//! - the time from the first create until every import is `Scheduled`,
//! - the operator's peak RSS (it runs as a child process of this benchmark),
//! - the writes it makes to the API server (status, Events, ConfigMaps, Leases) during an
//!   idle hour of simulated time (target: none; no import is due in that hour).
//!
//! `cargo bench --bench controller_scale` (`IMPORTS=N` to change the count).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use braze_sandbox::{DataImportKey, Partner, Sandbox, SandboxConfig};
use cohort_operator::api::{self, CohortImport};
use cohort_operator::controller::clock::{Clock, TestClock};
use cohort_operator::controller::metrics::{self, Metrics};
use cohort_operator::controller::pipeline::{PipelineImporter, SnapshotStoreKind};
use cohort_operator::controller::secrets::{PartnerKeys, normalize_endpoint};
use cohort_operator::controller::{self, Config, Dependencies};
use futures::{StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use serde_json::json;
use testkit::cluster::Cluster;

const ROLE: &str = "COHORT_BENCH_OPERATOR";
const SIMULATED_STEP_MINUTES: i64 = 5;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    if std::env::var_os(ROLE).is_some() {
        runtime.block_on(operator());
    } else {
        runtime.block_on(bench());
    }
}

async fn client_from(path: &str) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    kube::Client::try_from(config).unwrap()
}

/// The child: the controller with a test clock that the parent advances through stdin.
async fn operator() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let client = client_from(&var("BENCH_KUBECONFIG")).await;
    let clock = TestClock::starting_at(var("BENCH_CLOCK_START").parse().unwrap());
    let metrics = Arc::new(Metrics::new());
    let (addr, _server) = metrics::serve(metrics.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    println!("METRICS {addr}");
    let scratch = tempfile::tempdir().unwrap();
    let importer = Arc::new(PipelineImporter::new(
        client.clone(),
        cohort_operator::braze::BrazeClient::new(Default::default()).unwrap(),
        SnapshotStoreKind::Cluster,
        scratch.path().to_owned(),
    ));
    let config = Config {
        namespaces: vec![var("BENCH_NAMESPACE")],
        partner_keys: PartnerKeys {
            dir: Some(var("BENCH_KEYS_DIR").into()),
            extra_endpoints: [(normalize_endpoint(&var("BENCH_SANDBOX_URL")), "us".to_owned())].into(),
        },
        ..Config::default()
    };
    let deps = Dependencies { clock: Arc::new(clock.clone()), importer, notifier: None, metrics };
    let controller = tokio::spawn(controller::run(client, config, deps, futures::future::pending()));
    // `advance SECONDS` lines jump the clock; end of input ends the operator.
    let lines = tokio::task::spawn_blocking(move || {
        for line in std::io::stdin().lock().lines() {
            let line = line.unwrap();
            if let Some(secs) = line.strip_prefix("advance ") {
                clock.advance(SignedDuration::from_secs(secs.trim().parse().unwrap()));
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

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Counts changes the API server reports for one kind in the namespace.
/// Marks the benchmark's own write that closes the idle hour. A watch delivers one kind's
/// events in order, so once a watcher has seen its fence, every earlier write of that kind
/// has been counted: no fixed wait for stragglers.
const FENCE_LABEL: &str = "bench.cohorts.dev/fence";

/// Counts writes to one kind; signals `ready` when the watch is primed and `fence` when the
/// first fenced object arrives (that write itself is not counted).
fn count_writes<K>(
    api: Api<K>,
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

async fn bench() {
    let imports: usize = std::env::var("IMPORTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let cluster = Cluster::start();
    let client = cluster.client().await;
    cluster.install_crd(&api::crd()).await;
    let ns = cluster.namespace("scale").await;
    let sandbox = Sandbox::start(SandboxConfig {
        partners: vec![Partner { name: "kubit".into(), api_key: "partner-key".into() }],
        data_import_keys: vec![DataImportKey { key: "import-key".into(), partners: vec![] }],
        ..SandboxConfig::default()
    })
    .await
    .unwrap();
    let keys_dir = tempfile::tempdir().unwrap();
    std::fs::write(keys_dir.path().join("us"), "partner-key").unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "braze" }, "stringData": { "data-import-key": "import-key" }
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &secret).await.unwrap();

    // Simulated time starts now and every import runs daily six hours from now, so the
    // simulated hour that follows has nothing due.
    let start = Timestamp::now();
    let at = format!("{:02}:00", (start.to_zoned(jiff::tz::TimeZone::UTC).hour() + 6) % 24);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "1")
        .env("BENCH_KUBECONFIG", cluster.kubeconfig())
        .env("BENCH_NAMESPACE", &ns)
        .env("BENCH_CLOCK_START", start.to_string())
        .env("BENCH_SANDBOX_URL", sandbox.url())
        .env("BENCH_KEYS_DIR", keys_dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the operator starts");
    let stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = stdout.next().unwrap().unwrap();
    let metrics_url =
        format!("http://{}/metrics", first.strip_prefix("METRICS ").expect("the operator says where metrics are"));
    let mut operator = Child_ { child, stdin, metrics_url };
    let pid = operator.child.id();
    let idle_rss = peak_rss_kib(pid);

    // 1,000 imports, created 16 at a time.
    let api: Api<CohortImport> = Api::namespaced(client.clone(), &ns);
    let began = Instant::now();
    futures::stream::iter(0..imports)
        .map(|i| {
            let api = api.clone();
            let url = sandbox.url();
            let at = at.clone();
            async move {
                let doc = json!({
                    "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortImport",
                    "metadata": { "name": format!("import-{i:04}") },
                    "spec": {
                        "cohort": { "id": format!("cohort-{i}"), "name": format!("Cohort {i}") },
                        "source": { "inline": { "rows": [ { "id": format!("u{i}") } ] } },
                        "identifiers": { "externalId": "id" },
                        "destination": { "braze": {
                            "restEndpoint": url, "partner": "kubit",
                            "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" }
                        } },
                        "schedule": { "cadence": "Daily", "at": at }
                    }
                });
                api.create(&PostParams::default(), &serde_json::from_value(doc).unwrap()).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let created = began.elapsed();
    loop {
        let list = api.list(&ListParams::default()).await.unwrap();
        let scheduled = list
            .items
            .iter()
            .filter(|i| {
                i.status.as_ref().is_some_and(|s| {
                    s.next_run_at.is_some()
                        && s.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "Scheduled")
                })
            })
            .count();
        if scheduled == imports {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(300), "only {scheduled} of {imports} scheduled after 5 min");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_scheduled = began.elapsed();
    let rss_after_scheduling = peak_rss_kib(pid);

    // The idle hour: watch every kind the operator writes, then move the clock through the
    // hour in steps; each step makes the controller plan all imports again.
    let writes = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(4);
    let (fence_tx, mut fence_rx) = tokio::sync::mpsc::channel(4);
    let watchers = vec![
        count_writes(api.clone(), writes.clone(), ready_tx.clone(), fence_tx.clone()),
        count_writes(Api::<Event>::namespaced(client.clone(), &ns), writes.clone(), ready_tx.clone(), fence_tx.clone()),
        count_writes(
            Api::<ConfigMap>::namespaced(client.clone(), &ns),
            writes.clone(),
            ready_tx.clone(),
            fence_tx.clone(),
        ),
        count_writes(Api::<Lease>::namespaced(client.clone(), &ns), writes.clone(), ready_tx.clone(), fence_tx.clone()),
    ];
    for _ in 0..watchers.len() {
        ready_rx.recv().await.unwrap();
    }
    let reconciles_name = "cohort_operator_reconciles_total";
    let idle_began = Instant::now();
    let mut reconciles = metric(&operator.metrics_url, reconciles_name).await;
    for _ in 0..(60 / SIMULATED_STEP_MINUTES) {
        writeln!(operator.stdin, "advance {}", SIMULATED_STEP_MINUTES * 60).unwrap();
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
    write_fences(&client, &ns, "import-0000").await;
    let fence_deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..watchers.len() {
        let left = fence_deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, fence_rx.recv()).await.expect("every watcher sees its fence within 60 s").unwrap();
    }
    let idle_writes = writes.load(Ordering::Relaxed);
    let idle_wall = idle_began.elapsed();
    let errors = metric(&operator.metrics_url, "cohort_operator_reconcile_errors_total").await;
    for w in watchers {
        w.abort();
    }

    println!("controller_scale: {imports} CohortImports on kube-apiserver v1.20.2");
    println!("  created in                         {:>8.2} s", created.as_secs_f64());
    println!("  all Scheduled after                {:>8.2} s (from the first create)", all_scheduled.as_secs_f64());
    println!("  operator RSS before any import     {:>8.1} MiB", idle_rss as f64 / 1024.0);
    println!(
        "  operator peak RSS                  {:>8.1} MiB",
        rss_after_scheduling.max(peak_rss_kib(pid)) as f64 / 1024.0
    );
    println!(
        "  idle hour (simulated, {} steps): {} API writes (status, Events, ConfigMaps, Leases); {:.0} reconciles in {:.1} s",
        60 / SIMULATED_STEP_MINUTES,
        idle_writes,
        reconciles,
        idle_wall.as_secs_f64()
    );
    println!("  reconcile errors                   {:>8}", errors as u64);
    assert_eq!(idle_writes, 0, "the operator wrote to the API server during an idle hour");
    drop(operator);
    drop(sandbox);
    drop(cluster);
}
