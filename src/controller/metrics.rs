//! Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz` and `/readyz`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::{CohortImportStatus, RunResult};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImportLabels {
    pub namespace: String,
    pub name: String,
}

/// An import and one of its `Ready` reasons.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImportReasonLabels {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// An import and its last run's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImportResultLabels {
    pub namespace: String,
    pub name: String,
    pub result: String,
}

/// The `Ready` reason and last run result an import's series carry.
type Shown = (Option<String>, Option<String>);

/// The per-import gauges, set from an import's status ([`Metrics::observe`]). Label sets are
/// bounded: one series per import in each family — the current reason or result only, the
/// previous one removed — so at most imports × 4 series.
pub struct ImportGauges {
    pub ready: Family<ImportReasonLabels, Gauge>,
    pub last_run_result: Family<ImportResultLabels, Gauge>,
    pub last_success: Family<ImportLabels, Gauge<f64, AtomicU64>>,
    pub cohort_size: Family<ImportLabels, Gauge>,
    /// The reason and result each import's series carry now, to remove them when they change.
    shown: Mutex<HashMap<ImportLabels, Shown>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// HTTP status, or `none` when no answer came (timeout, connection error).
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub reason: String,
}

/// The shard (`--shard`) of this operator, `""` without sharding: one value per process.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: String,
}

/// The Kubernetes API requests this operator sent, by verb.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`.
    pub verb: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub runs: Family<ResultLabels, Counter>,
    pub run_duration: Family<ResultLabels, Histogram, fn() -> Histogram>,
    pub members_added: Counter,
    pub members_removed: Counter,
    pub braze_requests: Family<StatusLabels, Counter>,
    pub last_success: Family<ImportLabels, Gauge<f64, AtomicU64>>,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub runs_in_progress: Gauge,
    pub notification_failures: Counter,
    pub leader: Gauge,
    /// Waits of Braze requests for their destination's shared budget.
    pub braze_budget_wait: Histogram,
    pub imports: ImportGauges,
    /// From the time a run was due (its schedule slot) to its start, after waiting for a
    /// run slot; by shard.
    pub run_start_delay: Family<ShardLabels, Histogram, fn() -> Histogram>,
    /// Requests this operator sent to the Kubernetes API (after the client's rate limit).
    pub kube_api_requests: Family<VerbLabels, Counter>,
    /// Calls to CohortTrigger webhooks, by outcome (`accepted`, `ignored`, `unauthorized`, …).
    pub trigger_deliveries: Family<ResultLabels, Counter>,
    ready: AtomicBool,
}

fn run_start_delay_histogram() -> Histogram {
    // 0.1 s to about 55 minutes.
    Histogram::new(exponential_buckets(0.1, 2.0, 16))
}

fn run_duration_histogram() -> Histogram {
    // 0.5 s to about 4.5 hours.
    Histogram::new(exponential_buckets(0.5, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("cohort_operator");
        Metrics {
            runs: metric(&mut r, "runs", "Finished runs, by result", Family::default()),
            run_duration: metric(
                &mut r,
                "run_duration_seconds",
                "Run duration, by result",
                Family::new_with_constructor(run_duration_histogram),
            ),
            members_added: metric(&mut r, "members_added", "Members added to Braze cohorts", Counter::default()),
            members_removed: metric(
                &mut r,
                "members_removed",
                "Members removed from Braze cohorts",
                Counter::default(),
            ),
            braze_requests: metric(
                &mut r,
                "braze_requests",
                "Braze API attempts, by HTTP status (none: no answer)",
                Family::default(),
            ),
            last_success: metric(
                &mut r,
                "last_success_timestamp_seconds",
                "When each import's last successful run finished (Unix seconds)",
                Family::default(),
            ),
            reconciles: metric(&mut r, "reconciles", "Reconciliations of CohortImports", Counter::default()),
            reconcile_errors: metric(
                &mut r,
                "reconcile_errors",
                "Reconciliations that failed, by reason",
                Family::default(),
            ),
            runs_in_progress: metric(&mut r, "runs_in_progress", "Runs in progress", Gauge::default()),
            notification_failures: metric(
                &mut r,
                "notification_failures",
                "Run report emails that could not be sent",
                Counter::default(),
            ),
            leader: metric(&mut r, "leader", "1 while this replica leads and runs imports", Gauge::default()),
            // 1 ms to about 1.2 hours (Braze's window is an hour).
            braze_budget_wait: metric(
                &mut r,
                "braze_budget_wait_seconds",
                "Time each Braze request waited for its destination's shared rate budget",
                Histogram::new(exponential_buckets(0.001, 4.0, 12)),
            ),
            imports: ImportGauges::register(&mut r),
            run_start_delay: metric(
                &mut r,
                "run_start_delay_seconds",
                "From the time each run was due (its schedule slot) until it started, after waiting for a run slot",
                Family::new_with_constructor(run_start_delay_histogram),
            ),
            kube_api_requests: metric(
                &mut r,
                "kube_api_requests",
                "Requests sent to the Kubernetes API, by verb",
                Family::default(),
            ),
            trigger_deliveries: metric(
                &mut r,
                "trigger_deliveries",
                "Calls to CohortTrigger webhooks, by outcome",
                Family::default(),
            ),
            registry: r,
            ready: AtomicBool::new(false),
        }
    }

    pub fn run_finished(&self, result: RunResult, seconds: f64, added: u64, removed: u64) {
        let labels = ResultLabels { result: result_label(result).to_owned() };
        self.runs.get_or_create(&labels).inc();
        self.run_duration.get_or_create(&labels).observe(seconds);
        self.members_added.inc_by(added);
        self.members_removed.inc_by(removed);
    }

    pub fn braze_responses(&self, status: Option<u16>, count: u64) {
        let status = status.map_or_else(|| "none".to_owned(), |s| s.to_string());
        self.braze_requests.get_or_create(&StatusLabels { status }).inc_by(count);
    }

    /// A run of this operator's `shard` started `seconds` after it was due.
    pub fn run_admitted(&self, shard: &str, seconds: f64) {
        self.run_start_delay.get_or_create(&ShardLabels { shard: shard.to_owned() }).observe(seconds);
    }

    /// A request with `verb` went to the Kubernetes API.
    pub fn kube_api_request(&self, verb: &str) {
        self.kube_api_requests.get_or_create(&VerbLabels { verb: verb.to_owned() }).inc();
    }

    pub fn succeeded_at(&self, namespace: &str, name: &str, unix_seconds: f64) {
        let labels = ImportLabels { namespace: namespace.to_owned(), name: name.to_owned() };
        self.last_success.get_or_create(&labels).set(unix_seconds);
    }

    /// Sets the import's gauges from its status: called on every reconcile, so they are
    /// rebuilt from status at start-up and after a failover, whatever this process saw.
    pub fn observe(&self, namespace: &str, name: &str, status: Option<&CohortImportStatus>) {
        self.imports.observe(ImportLabels { namespace: namespace.to_owned(), name: name.to_owned() }, status);
    }

    /// The import is gone: stop exporting its series.
    pub fn forget(&self, namespace: &str, name: &str) {
        let import = ImportLabels { namespace: namespace.to_owned(), name: name.to_owned() };
        self.last_success.remove(&import);
        self.imports.forget(&import);
    }

    pub fn reconcile_error(&self, reason: &str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { reason: reason.to_owned() }).inc();
    }

    /// `/readyz` answers 200 from now on.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

impl crate::braze::BudgetObserver for Metrics {
    fn waited(&self, wait: std::time::Duration) {
        self.braze_budget_wait.observe(wait.as_secs_f64());
    }
}

impl ImportGauges {
    fn register(registry: &mut Registry) -> Self {
        let gauges = ImportGauges {
            ready: Family::default(),
            last_run_result: Family::default(),
            last_success: Family::default(),
            cohort_size: Family::default(),
            shown: Mutex::new(HashMap::new()),
        };
        registry.register("import_ready", "1 for each import's current Ready reason", gauges.ready.clone());
        registry.register(
            "import_last_run_result",
            "1 for the result of each import's last run",
            gauges.last_run_result.clone(),
        );
        registry.register(
            "import_last_success_timestamp_seconds",
            "When each import's last successful run finished (Unix seconds), from its status",
            gauges.last_success.clone(),
        );
        registry.register(
            "import_cohort_size",
            "Members in each import's source at its last successful run",
            gauges.cohort_size.clone(),
        );
        gauges
    }

    fn observe(&self, import: ImportLabels, status: Option<&CohortImportStatus>) {
        let reason = status.and_then(|s| s.ready()).map(|c| c.reason.clone());
        let result = status.and_then(|s| s.last_run.as_ref()).map(|r| result_label(r.result).to_owned());
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        let (old_reason, old_result) = shown.remove(&import).unwrap_or_default();
        if old_reason != reason
            && let Some(old) = old_reason
        {
            self.ready.remove(&self.reason_labels(&import, old));
        }
        if old_result != result
            && let Some(old) = old_result
        {
            self.last_run_result.remove(&self.result_labels(&import, old));
        }
        if let Some(reason) = &reason {
            self.ready.get_or_create(&self.reason_labels(&import, reason.clone())).set(1);
        }
        if let Some(result) = &result {
            self.last_run_result.get_or_create(&self.result_labels(&import, result.clone())).set(1);
        }
        match status.and_then(|s| s.last_successful_run_at) {
            Some(t) => {
                self.last_success.get_or_create(&import).set(t.as_second() as f64);
            }
            None => {
                self.last_success.remove(&import);
            }
        }
        match status.and_then(|s| s.members) {
            Some(members) => {
                self.cohort_size.get_or_create(&import).set(i64::try_from(members).unwrap_or(i64::MAX));
            }
            None => {
                self.cohort_size.remove(&import);
            }
        }
        shown.insert(import, (reason, result));
    }

    fn forget(&self, import: &ImportLabels) {
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        let (reason, result) = shown.remove(import).unwrap_or_default();
        if let Some(reason) = reason {
            self.ready.remove(&self.reason_labels(import, reason));
        }
        if let Some(result) = result {
            self.last_run_result.remove(&self.result_labels(import, result));
        }
        self.last_success.remove(import);
        self.cohort_size.remove(import);
    }

    fn reason_labels(&self, import: &ImportLabels, reason: String) -> ImportReasonLabels {
        ImportReasonLabels { namespace: import.namespace.clone(), name: import.name.clone(), reason }
    }

    fn result_labels(&self, import: &ImportLabels, result: String) -> ImportResultLabels {
        ImportResultLabels { namespace: import.namespace.clone(), name: import.name.clone(), result }
    }
}

pub fn result_label(result: RunResult) -> &'static str {
    match result {
        RunResult::Succeeded => "Succeeded",
        RunResult::Failed => "Failed",
        RunResult::Blocked => "Blocked",
        RunResult::DryRun => "DryRun",
        RunResult::Missed => "Missed",
    }
}

/// The HTTP routes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(serve_ready))
        .with_state(metrics)
}

async fn serve_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.render())
}

async fn serve_ready(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.is_ready() { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "starting") }
}

/// Serves the routes on `addr` until the task is dropped. Returns the bound address (useful
/// with port 0).
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(metrics);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok((bound, task))
}

/// Registers `metric` under `name` and returns it, for the [`Metrics`] that updates it.
fn metric<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_series() {
        let m = Metrics::new();
        m.run_finished(RunResult::Succeeded, 1.5, 10, 2);
        m.braze_responses(Some(201), 3);
        m.braze_responses(None, 1);
        m.succeeded_at("growth", "vip", 1_700_000_000.0);
        m.reconcile_error("Kube");
        crate::braze::BudgetObserver::waited(&m, std::time::Duration::from_millis(1500));
        m.run_admitted("", 2.5);
        m.run_admitted("", 0.5);
        m.kube_api_request("patch");
        let text = m.render();
        for needle in [
            "cohort_operator_runs_total{result=\"Succeeded\"} 1",
            "cohort_operator_run_duration_seconds_count{result=\"Succeeded\"} 1",
            "cohort_operator_members_added_total 10",
            "cohort_operator_members_removed_total 2",
            "cohort_operator_braze_requests_total{status=\"201\"} 3",
            "cohort_operator_braze_requests_total{status=\"none\"} 1",
            "cohort_operator_last_success_timestamp_seconds{namespace=\"growth\",name=\"vip\"} 1700000000",
            "cohort_operator_reconcile_errors_total{reason=\"Kube\"} 1",
            "cohort_operator_braze_budget_wait_seconds_sum 1.5",
            "cohort_operator_braze_budget_wait_seconds_count 1",
            "cohort_operator_run_start_delay_seconds_sum{shard=\"\"} 3.0",
            "cohort_operator_run_start_delay_seconds_count{shard=\"\"} 2",
            "cohort_operator_kube_api_requests_total{verb=\"patch\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        m.forget("growth", "vip");
        assert!(!m.render().contains("name=\"vip\""));
    }

    #[test]
    fn per_import_gauges_follow_status_and_keep_one_series_each() {
        use crate::api::{ReadyReason, RunRecord, RunTrigger};
        let now: jiff::Timestamp = "2026-03-02T06:31:00Z".parse().unwrap();
        let mut status = CohortImportStatus::default();
        let record = |result| RunRecord {
            attempt: None,
            id: "r".into(),
            trigger: RunTrigger::Scheduled,
            started_at: now,
            finished_at: Some(now),
            result,
            cohort_size: 42,
            added: 42,
            removed: 0,
            would_add: None,
            would_remove: None,
            message: String::new(),
        };
        super::super::status::record_run(
            &mut status,
            record(RunResult::Succeeded),
            crate::api::HistoryLimits::Newest(5),
        );
        super::super::status::set_ready(&mut status, ReadyReason::Succeeded, "ok", Some(1), now);
        let m = Metrics::new();
        m.observe("growth", "vip", Some(&status));
        let text = m.render();
        for needle in [
            "cohort_operator_import_ready{namespace=\"growth\",name=\"vip\",reason=\"Succeeded\"} 1",
            "cohort_operator_import_last_run_result{namespace=\"growth\",name=\"vip\",result=\"Succeeded\"} 1",
            "cohort_operator_import_last_success_timestamp_seconds{namespace=\"growth\",name=\"vip\"} 1772433060",
            "cohort_operator_import_cohort_size{namespace=\"growth\",name=\"vip\"} 42",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        // The next run fails: the old reason and result go, the last success stays.
        super::super::status::record_run(&mut status, record(RunResult::Failed), crate::api::HistoryLimits::Newest(5));
        super::super::status::set_ready(&mut status, ReadyReason::SourceFailed, "boom", Some(1), now);
        m.observe("growth", "vip", Some(&status));
        let text = m.render();
        assert!(text.contains("reason=\"SourceFailed\"} 1") && !text.contains("reason=\"Succeeded\""), "{text}");
        assert!(text.contains("result=\"Failed\"} 1") && !text.contains("result=\"Succeeded\""), "{text}");
        assert!(
            text.contains("cohort_operator_import_last_success_timestamp_seconds{namespace=\"growth\",name=\"vip\"}")
        );
        m.forget("growth", "vip");
        assert!(!m.render().contains("name=\"vip\""), "{}", m.render());
    }
}
