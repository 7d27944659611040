//! A two-replica chaos soak (issue 22): how many ids a run re-sends to Braze when its
//! leader is killed again and again.
//!
//! Two `cohort-operator run` processes (release build) elect a leader on a Lease of a real
//! kube-apiserver and keep their snapshots in ConfigMaps (the controller's default store).
//! Two imports read one cohort from an HTTP export on loopback: one through the partner
//! cohort import API, one by `method: Attribute` (`/users/track`). A first import of
//! `CHAOS_MEMBERS` members, then a churn run (`CHAOS_CHURN` leave, as many join). While a
//! phase's runs go on, a chaos loop waits for a leader, lets it lead 15–25 s (seeded RNG,
//! `CHAOS_SEED`; `CHAOS_KILL_MIN_MS`/`CHAOS_KILL_MAX_MS` for denser chaos), SIGKILLs it (by
//! its pid) and starts it again — under the same identity
//! (its container restarted) or, half the time, a new one (its pod replaced: a failover
//! through the Lease) — until both runs have succeeded, or for `CHAOS_SECONDS` at most;
//! then the runs finish in calm, and the figures say which run finished only then.
//!
//! Braze is the sandbox, behind one delay line per path: a request reaches the sandbox at
//! once and is applied; its answer comes back `CHAOS_PARTNER_LATENCY_MS` /
//! `CHAOS_TRACK_LATENCY_MS` later. So every request in flight at a kill was applied and
//! not acknowledged — the worst case for re-sends. The sandbox counts the ids it received,
//! the removals among them and the changes that took effect; per path and phase the
//! benchmark prints the ids needed (the diff), the ids sent, the re-sent fraction, wasted
//! adds and removes, the kills, and what each kill during a run cost against the ids it
//! can find in flight (what no checkpoint can vouch for), and checks Braze ends exactly
//! equal to the source.
//!
//! `cargo bench --bench chaos` (`-- --quick`: 100,000 members, about a minute).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use braze_sandbox::{RunningSandbox, SandboxUser, Stats};
use cohort_operator::api::{self, CohortImport, RunResult};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use testkit::cluster::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "../tests/support/braze.rs"]
mod braze_support;

const KEYS: braze_support::BrazeKeys =
    braze_support::BrazeKeys { partner: "kubit", partner_key: "partner-key-chaos", import_key: "import-key-chaos" };
const PARTNER: &str = "partner";
const ATTRIBUTE: &str = "attribute";
/// The `/users/track` attribute holding the attribute path's cohort (an array of cohort ids).
const ATTRIBUTE_NAME: &str = "cohorts";
/// How long a phase may take before the benchmark gives up.
const PHASE_LIMIT: Duration = Duration::from_secs(900);

/// The soak's settings; each can be set from the environment.
#[derive(Clone, Copy, Debug)]
struct Settings {
    members: u64,
    churn: u64,
    seed: u64,
    /// The leader leads this long (uniform, milliseconds) before it is killed.
    kill_after_ms: (u64, u64),
    /// How long the chaos goes on in a phase at most; then the runs finish in calm.
    chaos_seconds: u64,
    partner_latency_ms: u64,
    track_latency_ms: u64,
    lease_duration_s: u64,
    lease_grace_s: u64,
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let members = env("CHAOS_MEMBERS", if quick { 100_000 } else { 800_000 });
    let settings = Settings {
        members,
        churn: env("CHAOS_CHURN", members / 10),
        seed: env("CHAOS_SEED", 22),
        kill_after_ms: (env("CHAOS_KILL_MIN_MS", 15_000), env("CHAOS_KILL_MAX_MS", 25_000)),
        chaos_seconds: env("CHAOS_SECONDS", if quick { 30 } else { 240 }),
        partner_latency_ms: env("CHAOS_PARTNER_LATENCY_MS", 250),
        track_latency_ms: env("CHAOS_TRACK_LATENCY_MS", 25),
        lease_duration_s: env("CHAOS_LEASE_DURATION_SECONDS", 6),
        lease_grace_s: env("CHAOS_LEASE_GRACE_SECONDS", 3),
    };
    assert!(settings.churn * 5 <= settings.members, "CHAOS_CHURN: at most a fifth of the members (the removal guard)");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(bench(settings));
}

fn user(i: u64) -> String {
    format!("user-{i:08}")
}

/// The members of phase `churned` (false: `0..members`; true: the first `churn` left and
/// as many new ones joined).
fn members(s: &Settings, churned: bool) -> std::ops::Range<u64> {
    if churned { s.churn..s.members + s.churn } else { 0..s.members }
}

/// The export both imports read: a CSV of the current phase's members.
async fn export_server(s: Settings, churned: Arc<AtomicBool>) -> String {
    let router = Router::new().route(
        "/members.csv",
        get(move || {
            let churned = churned.clone();
            async move {
                let mut body = String::from("user_id\n");
                for i in members(&s, churned.load(Ordering::SeqCst)) {
                    body.push_str(&user(i));
                    body.push('\n');
                }
                body
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/members.csv", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// A TCP proxy to `upstream` that forwards requests at once and each answer's bytes
/// `latency` after they left `upstream`, in order: Braze applied a request in flight, its
/// answer is on its way.
async fn delay_line(upstream: SocketAddr, latency: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else { continue };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (mut client_read, client_write) = client.into_split();
            let (server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                let _ = server_write.shutdown().await;
            });
            tokio::spawn(delayed_copy(server_read, client_write, latency));
        }
    });
    url
}

async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    latency: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || tx.send((tokio::time::Instant::now() + latency, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// One replica: the operator binary under leader election. After a kill it comes back
/// either under the same identity (its container restarted in the same pod: it may take
/// its own Lease back at once) or under a new one (the pod replaced: the Lease must expire
/// first, and either replica may win it).
struct Replica {
    deployment: String,
    pods: u32,
    identity: String,
    metrics: SocketAddr,
    args: Vec<String>,
    kubeconfig: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn new(name: &str, metrics: SocketAddr, args: Vec<String>, kubeconfig: PathBuf, dir: &Path) -> Replica {
        let log = dir.join(format!("{name}.log"));
        let identity = format!("{name}-1");
        Replica { deployment: name.to_owned(), pods: 1, identity, metrics, args, kubeconfig, log, child: None }
    }

    /// The next start is a new pod, with a new identity.
    fn replace_pod(&mut self) {
        self.pods += 1;
        self.identity = format!("{}-{}", self.deployment, self.pods);
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cohort-operator"))
            .args(&self.args)
            .arg(format!("--identity={}", self.identity))
            .arg(format!("--metrics-addr={}", self.metrics))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the operator starts");
        self.child = Some(child);
    }

    /// SIGKILL (std's `Child::kill`) to this replica's own process, then reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it says it leads (`cohort_operator_leader 1` on its metrics port).
    async fn leads(&self, http: &reqwest::Client) -> bool {
        let url = format!("http://{}/metrics", self.metrics);
        match http.get(url).timeout(Duration::from_secs(1)).send().await {
            Ok(r) => r.text().await.is_ok_and(|t| t.lines().any(|l| l == "cohort_operator_leader 1")),
            Err(_) => false,
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The operator's flags common to both replicas.
fn operator_args(s: &Settings, ns: &str, keys: &Path, scratch: &Path, endpoints: &[String]) -> Vec<String> {
    let mut args = vec![
        "run".to_owned(),
        format!("--watch-namespaces={ns}"),
        "--log-format=text".to_owned(),
        format!("--partner-keys-dir={}", keys.display()),
        format!("--scratch-dir={}", scratch.display()),
        "--leader-election".to_owned(),
        format!("--lease-namespace={ns}"),
        format!("--lease-duration-seconds={}", s.lease_duration_s),
        format!("--lease-renew-grace-seconds={}", s.lease_grace_s),
        // Each kill is an interrupted attempt; the soak kills far more often than the
        // default 3 attempts allow (which would end the run Failed for a person to look at).
        "--max-run-attempts=1000".to_owned(),
    ];
    args.extend(endpoints.iter().map(|e| format!("--braze-endpoint-region={e}=us")));
    args
}

/// The two imports: the partner path and the attribute path, read from `export`.
fn imports(export: &str, partner_url: &str, track_url: &str) -> [CohortImport; 2] {
    let import = |name: &str, destination: serde_json::Value| -> CohortImport {
        serde_json::from_value(json!({
            "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortImport",
            "metadata": { "name": name },
            "spec": {
                "cohort": { "id": format!("chaos-{name}"), "name": format!("Chaos {name}") },
                "source": { "http": { "url": export, "format": "Csv" } },
                "identifiers": { "externalId": "user_id" },
                "destination": { "braze": destination },
                // Runs only when asked (cohorts.dev/run-requested-at), one per phase.
                "schedule": { "cadence": "Weekly", "dayOfWeek": "Monday", "at": "03:00" }
            }
        }))
        .unwrap()
    };
    [
        import(
            PARTNER,
            json!({ "restEndpoint": partner_url, "partner": KEYS.partner,
                    "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" } }),
        ),
        import(
            ATTRIBUTE,
            json!({ "restEndpoint": track_url, "method": "Attribute",
                    "apiKeySecretRef": { "name": "braze-rest", "key": "api-key" },
                    "attribute": { "name": ATTRIBUTE_NAME, "shape": "Array" } }),
        ),
    ]
}

async fn create_secrets(client: &kube::Client, ns: &str) {
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    for (name, key, value) in
        [("braze", "data-import-key", KEYS.import_key), ("braze-rest", "api-key", braze_support::REST_API_KEY)]
    {
        let secret: Secret =
            serde_json::from_value(json!({ "metadata": { "name": name }, "stringData": { key: value } })).unwrap();
        secrets.create(&PostParams::default(), &secret).await.unwrap();
    }
}

/// Whether both imports have finished `runs` runs.
async fn finished(api: &Api<CohortImport>, runs: usize) -> bool {
    let Ok(list) = api.list(&Default::default()).await else { return false };
    list.items.len() == 2
        && list
            .items
            .iter()
            .all(|i| i.status.as_ref().is_some_and(|s| s.history.len() == runs && s.current_run.is_none()))
}

/// Whether a run is in progress on either import.
async fn running(api: &Api<CohortImport>) -> bool {
    let Ok(list) = api.list(&Default::default()).await else { return false };
    list.items.iter().any(|i| i.status.as_ref().is_some_and(|s| s.current_run.is_some()))
}

/// The replica that says it leads, if one does.
async fn leading(replicas: &[Replica; 2], http: &reqwest::Client) -> Option<usize> {
    for (n, replica) in replicas.iter().enumerate() {
        if replica.leads(http).await {
            return Some(n);
        }
    }
    None
}

/// One kill: when, whether a run was in progress, whether the pod was replaced (a new
/// identity: a failover through the Lease).
struct Kill {
    at: jiff::Timestamp,
    mid_run: bool,
    replaced: bool,
}

/// What the chaos loop did in one phase.
#[derive(Default)]
struct Chaos {
    kills: Vec<Kill>,
    /// When the chaos stopped at its time limit, the runs unfinished.
    stopped_at: Option<jiff::Timestamp>,
}

/// Kills the leader 2–6 s (seeded) after it is seen leading, and starts it again, until both
/// imports have finished `runs` runs; past `s.chaos_seconds`, leaves them to finish in calm.
async fn chaos_until_finished(w: &mut World, rng: &mut StdRng, s: &Settings, runs: usize) -> Chaos {
    let http = reqwest::Client::new();
    let began = Instant::now();
    let mut chaos = Chaos::default();
    while !finished(&w.api, runs).await {
        assert!(began.elapsed() < PHASE_LIMIT, "the runs did not finish within {PHASE_LIMIT:?}");
        if chaos.stopped_at.is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if began.elapsed() > Duration::from_secs(s.chaos_seconds) {
            chaos.stopped_at = Some(jiff::Timestamp::now());
            println!("    chaos stopped after {} s with the runs unfinished; they go on in calm", s.chaos_seconds);
            continue;
        }
        let Some(n) = leading(&w.replicas, &http).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let lead = Duration::from_millis(rng.random_range(s.kill_after_ms.0..=s.kill_after_ms.1));
        let replace = rng.random_bool(0.5);
        if !lead_for(&w.api, runs, lead).await {
            break;
        }
        kill(w, n, replace, &mut chaos, began, lead).await;
    }
    chaos
}

/// Waits `lead`; false when the runs finish first.
async fn lead_for(api: &Api<CohortImport>, runs: usize, lead: Duration) -> bool {
    let kill_at = Instant::now() + lead;
    while Instant::now() < kill_at {
        if finished(api, runs).await {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200).min(kill_at - Instant::now())).await;
    }
    true
}

/// SIGKILLs replica `leader` and starts it again (in a new pod when `replace`); prints the ids
/// each path has sent so far.
async fn kill(w: &mut World, leader: usize, replace: bool, chaos: &mut Chaos, began: Instant, lead: Duration) {
    let at = jiff::Timestamp::now();
    let mid_run = running(&w.api).await;
    let killed = w.replicas[leader].identity.clone();
    w.replicas[leader].kill();
    if replace {
        w.replicas[leader].replace_pod();
    }
    w.replicas[leader].start();
    chaos.kills.push(Kill { at, mid_run, replaced: replace });
    let stats = w.sandbox.stats();
    println!(
        "    kill {}: {killed} after {:.1} s leading, {:.1} s in; {}; sent so far {} ids (partner), {} objects (track){}",
        chaos.kills.len(),
        lead.as_secs_f64(),
        began.elapsed().as_secs_f64(),
        if replace { format!("replaced by {}", w.replicas[leader].identity) } else { "restarted".to_owned() },
        n(stats.ids_received),
        n(stats.track.objects),
        if mid_run { "" } else { " (no run in progress)" }
    );
}

/// Ids of one path in one phase: additions and removals.
#[derive(Clone, Copy, Default)]
struct Ids {
    adds: u64,
    removes: u64,
}

impl Ids {
    fn total(self) -> u64 {
        self.adds + self.removes
    }

    fn plus(self, o: Ids) -> Ids {
        Ids { adds: self.adds + o.adds, removes: self.removes + o.removes }
    }
}

/// What one path needed, was sent, and was sent for nothing (a change already in effect).
#[derive(Clone, Copy, Default)]
struct Figures {
    needed: Ids,
    sent: Ids,
    wasted: Ids,
    kills: u32,
    mid_run: u32,
    replaced: u32,
    /// Phases whose run finished only after the chaos stopped.
    calm: u32,
    /// Ids the path has in flight at most (requests at once × ids a request).
    in_flight: u64,
}

/// Ids the operator has in flight at most on `path` with its defaults: requests at once per
/// destination × ids a request carries (Braze's documented maxima).
fn in_flight(path: &str) -> u64 {
    use cohort_operator::braze::{BrazeClientConfig, MAX_IDS_PER_REQUEST, attributes::MAX_OBJECTS_PER_REQUEST};
    let per_request = if path == PARTNER { MAX_IDS_PER_REQUEST } else { MAX_OBJECTS_PER_REQUEST };
    (BrazeClientConfig::default().max_in_flight * per_request) as u64
}

impl Figures {
    /// From the sandbox's counters for the path (all of whose ids are Braze users), and the
    /// kills before its run finished.
    fn of(path: &str, stats: &Stats, needed: Ids, chaos: &Chaos, finished: jiff::Timestamp) -> Figures {
        let (sent, wasted) = if path == PARTNER {
            assert_eq!(stats.ids_unmatched, 0, "every id sent is a Braze user");
            let sent = Ids { adds: stats.ids_received - stats.removes_received, removes: stats.removes_received };
            (sent, Ids { adds: sent.adds - stats.joined, removes: sent.removes - stats.left })
        } else {
            let t = &stats.track;
            assert_eq!((t.unknown_users, t.users_created, t.object_errors), (0, 0, 0), "every object applied");
            let sent = Ids { adds: t.objects - t.removals, removes: t.removals };
            (sent, Ids { adds: t.wasted_writes - t.wasted_removals, removes: t.wasted_removals })
        };
        let hit: Vec<&Kill> = chaos.kills.iter().filter(|k| k.at < finished).collect();
        let count = |f: fn(&Kill) -> bool| hit.iter().filter(|k| f(k)).count() as u32;
        let calm = u32::from(chaos.stopped_at.is_some_and(|t| t < finished));
        Figures {
            needed,
            sent,
            wasted,
            kills: hit.len() as u32,
            mid_run: count(|k| k.mid_run),
            replaced: count(|k| k.replaced),
            calm,
            in_flight: in_flight(path),
        }
    }

    fn plus(self, o: Figures) -> Figures {
        Figures {
            needed: self.needed.plus(o.needed),
            sent: self.sent.plus(o.sent),
            wasted: self.wasted.plus(o.wasted),
            kills: self.kills + o.kills,
            mid_run: self.mid_run + o.mid_run,
            replaced: self.replaced + o.replaced,
            calm: self.calm + o.calm,
            in_flight: self.in_flight,
        }
    }

    fn print(&self, label: &str) {
        let resent = self.sent.total().saturating_sub(self.needed.total());
        let pct = |n: u64, of: u64| n as f64 * 100.0 / of.max(1) as f64;
        println!(
            "  {label}: {} ids needed (+{} −{}), {} sent (+{} −{}): {} re-sent = {:.2}% of the ids sent \
             ({:.2}% of those needed); wasted {} adds, {} removes; {} kills before its run finished ({} during a run, {} replacing the pod){}{}",
            n(self.needed.total()),
            n(self.needed.adds),
            n(self.needed.removes),
            n(self.sent.total()),
            n(self.sent.adds),
            n(self.sent.removes),
            n(resent),
            pct(resent, self.sent.total()),
            pct(resent, self.needed.total()),
            n(self.wasted.adds),
            n(self.wasted.removes),
            self.kills,
            self.mid_run,
            self.replaced,
            if self.calm > 0 { "; finished only after the chaos stopped" } else { "" },
            match self.mid_run {
                0 => String::new(),
                kills => format!(
                    "; per kill during a run {} re-sent, {:.2}× the {} ids a kill finds in flight at most",
                    n(resent / u64::from(kills)),
                    resent as f64 / f64::from(kills) / self.in_flight as f64,
                    n(self.in_flight)
                ),
            },
        );
    }
}

/// `1234567` as `1,234,567`.
fn n(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The members Braze holds for `path`'s cohort.
fn braze_members(sandbox: &RunningSandbox, path: &str) -> BTreeSet<String> {
    let ids = match path {
        PARTNER => sandbox.member_external_ids(KEYS.partner, "chaos-partner"),
        _ => sandbox.segment_external_ids(ATTRIBUTE_NAME, Some("chaos-attribute")),
    };
    ids.into_iter().collect()
}

/// Checks each import's last run succeeded and Braze holds exactly the source; prints them
/// and returns when each finished.
async fn check_runs(
    api: &Api<CohortImport>,
    sandbox: &RunningSandbox,
    expected: &BTreeSet<String>,
) -> [jiff::Timestamp; 2] {
    let mut finished = [jiff::Timestamp::now(); 2];
    for (path, finished) in [PARTNER, ATTRIBUTE].into_iter().zip(&mut finished) {
        let import = api.get(path).await.unwrap();
        let run = import.status.unwrap().history[0].clone();
        let equal = braze_members(sandbox, path) == *expected;
        println!(
            "  {path}: run {} {:?} on attempt {}, +{} −{}; Braze equals the source: {}",
            run.id,
            run.result,
            run.attempt.unwrap_or(1),
            n(run.added),
            n(run.removed),
            if equal { "yes" } else { "NO" }
        );
        assert_eq!(run.result, RunResult::Succeeded, "{path}: {}", run.message);
        assert!(equal, "{path}: Braze does not hold exactly the source's members");
        *finished = run.finished_at.unwrap_or(*finished);
    }
    finished
}

/// The soak's world: the API server, Braze behind its delay lines, the export, the replicas.
struct World {
    _cluster: Cluster,
    api: Api<CohortImport>,
    sandbox: RunningSandbox,
    churned: Arc<AtomicBool>,
    replicas: [Replica; 2],
    _dir: tempfile::TempDir,
}

async fn world(s: &Settings) -> World {
    let cluster = Cluster::start();
    let client = cluster.client().await;
    cluster.install_crd(&api::crd()).await;
    let ns = cluster.namespace("chaos").await;
    create_secrets(&client, &ns).await;
    let users = (0..s.members + s.churn).map(|i| SandboxUser::identified(user(i))).collect();
    let sandbox = braze_support::start_sandbox(KEYS, users).await;
    let partner_url = delay_line(sandbox.addr(), Duration::from_millis(s.partner_latency_ms)).await;
    let track_url = delay_line(sandbox.addr(), Duration::from_millis(s.track_latency_ms)).await;
    let churned = Arc::new(AtomicBool::new(false));
    let export = export_server(*s, churned.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::write(keys.join("us"), KEYS.partner_key).unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let args = operator_args(s, &ns, &keys, &scratch, &[partner_url.clone(), track_url.clone()]);
    // Free ports for the two metrics endpoints, held together so that they differ.
    let ports = [(); 2].map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let mut identities = ["replica-a", "replica-b"].into_iter();
    let mut replicas = ports.map(|port| {
        let metrics = port.local_addr().unwrap();
        drop(port);
        Replica::new(identities.next().unwrap(), metrics, args.clone(), cluster.kubeconfig(), dir.path())
    });
    for replica in &mut replicas {
        replica.start();
    }
    let api: Api<CohortImport> = Api::namespaced(client, &ns);
    for import in imports(&export, &partner_url, &track_url) {
        api.create(&PostParams::default(), &import).await.unwrap();
    }
    println!("  operator logs: {}", dir.path().display());
    World { _cluster: cluster, api, sandbox, churned, replicas, _dir: dir }
}

async fn request_runs(api: &Api<CohortImport>, value: &str) {
    let patch = json!({ "metadata": { "annotations": { api::RUN_REQUESTED_ANNOTATION: value } } });
    for path in [PARTNER, ATTRIBUTE] {
        api.patch(path, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
}

/// One phase under chaos: runs both imports to success; returns each path's figures.
async fn phase(w: &mut World, s: &Settings, rng: &mut StdRng, churned: bool) -> [Figures; 2] {
    let (name, runs) = if churned { ("churn", 2) } else { ("first import", 1) };
    w.churned.store(churned, Ordering::SeqCst);
    w.sandbox.reset_stats();
    let began = Instant::now();
    println!("- {name}:");
    request_runs(&w.api, name.split(' ').next().unwrap()).await;
    let chaos = chaos_until_finished(w, rng, s, runs).await;
    println!("  both runs finished in {:.1} s", began.elapsed().as_secs_f64());
    let expected: BTreeSet<String> = members(s, churned).map(user).collect();
    let finished = check_runs(&w.api, &w.sandbox, &expected).await;
    let needed = if churned { Ids { adds: s.churn, removes: s.churn } } else { Ids { adds: s.members, removes: 0 } };
    let stats = w.sandbox.stats();
    let figures = [(PARTNER, finished[0]), (ATTRIBUTE, finished[1])]
        .map(|(path, finished)| Figures::of(path, &stats, needed, &chaos, finished));
    figures[0].print("partner path");
    figures[1].print("attribute path");
    figures
}

async fn bench(s: Settings) {
    println!(
        "chaos: two `cohort-operator run` replicas (release) on kube-apiserver v1.20.2, ConfigMap snapshots; \
         {} members, churn {} out / {} in; the leader killed (SIGKILL) {}–{} ms after it leads, seed {}, \
         for at most {} s a phase, then restarted (or its pod replaced, half the time); Lease {} s (grace {} s); Braze answers after {} ms (partner) / {} ms (/users/track), each request \
         applied before its answer leaves",
        n(s.members),
        n(s.churn),
        n(s.churn),
        s.kill_after_ms.0,
        s.kill_after_ms.1,
        s.seed,
        s.chaos_seconds,
        s.lease_duration_s,
        s.lease_grace_s,
        s.partner_latency_ms,
        s.track_latency_ms
    );
    let began = Instant::now();
    let mut world = world(&s).await;
    let mut rng = StdRng::seed_from_u64(s.seed);
    let first = phase(&mut world, &s, &mut rng, false).await;
    let churn = phase(&mut world, &s, &mut rng, true).await;
    println!("- both phases:");
    first[0].plus(churn[0]).print("partner path");
    first[1].plus(churn[1]).print("attribute path");
    println!("(wall {:.1} s)", began.elapsed().as_secs_f64());
    for replica in &mut world.replicas {
        replica.kill();
    }
}
