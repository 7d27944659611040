//! The leader's fence, end to end on a real kube-apiserver with the Braze sandbox: a leader
//! whose connection to the API server is black-holed (a TCP proxy that stops forwarding but
//! keeps every socket open, so nothing fails — requests just hang) stops sending to Braze on
//! its own clock before the standby can take the Lease; the standby resumes the run as a new
//! attempt and Braze ends exactly equal to the source. And a leader *process* frozen
//! (SIGSTOP) past its deadline, resumed after the standby took over, sends Braze nothing
//! more: its fence is a clock comparison, checked again at the wire (see `src/fence.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::controller_support::*;
use braze_sandbox::Faults;
use cohort_operator::api::RunResult;
use cohort_operator::braze::{BrazeClient, BrazeClientConfig};
use cohort_operator::controller::metrics::Metrics;
use cohort_operator::controller::pipeline::{PipelineImporter, SnapshotStoreKind};
use cohort_operator::controller::{self, Config, ControllerError, Dependencies};
use cohort_operator::domain::diff::KeyCursor;
use cohort_operator::fence::{Fence, LeaseTiming};
use cohort_operator::snapshot::cluster::ClusterSnapshotStore;
use cohort_operator::snapshot::format::{BodyWriter, read_body};
use cohort_operator::snapshot::{DoubtMeta, FORMAT_VERSION, SnapshotStore};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// A TCP proxy to `upstream` that, once black-holed, forwards nothing more in either
/// direction and accepts new connections without ever answering, keeping every socket open.
struct BlackHoleProxy {
    addr: SocketAddr,
    holed: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl BlackHoleProxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (holed, _) = watch::channel(false);
        let rx = holed.subscribe();
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                if *rx.borrow() {
                    held.push(client); // accepted, never answered, never closed
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, rx.clone()));
                tokio::spawn(pump(server_read, client_write, rx.clone()));
            }
        });
        BlackHoleProxy { addr, holed, accept }
    }

    fn black_hole(&self) {
        self.holed.send_replace(true);
    }
}

impl Drop for BlackHoleProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to` until either closes; once black-holed, holds both open forever.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut holed: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = holed.wait_for(|h| *h) => 0,
        };
        if *holed.borrow() {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A replica run in-process with its own kube clients, fence and importer.
struct Replica {
    task: Option<JoinHandle<Result<(), ControllerError>>>,
    _shutdown: oneshot::Sender<()>,
    metrics: Arc<Metrics>,
}

impl Replica {
    fn is_leader(&self) -> bool {
        self.metrics.leader.get() == 1
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Clients as `main.rs` builds them: a connect timeout on both, a read timeout below the
/// Lease's renew window on the runs' client. `via` replaces the API server's address.
async fn kube_clients(env: &Env, via: Option<SocketAddr>, timing: LeaseTiming) -> (kube::Client, kube::Client) {
    let kubeconfig = Kubeconfig::read_from(env.cluster.kubeconfig()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    if let Some(addr) = via {
        config.cluster_url = format!("https://{addr}").parse().unwrap();
    }
    config.connect_timeout = Some(Duration::from_secs(1));
    let controller = kube::Client::try_from(config.clone()).unwrap();
    config.read_timeout = Some(timing.api_read_timeout());
    config.reset_reader_on_write = true;
    (controller, kube::Client::try_from(config).unwrap())
}

async fn start_replica(
    env: &Env,
    identity: &str,
    via: Option<SocketAddr>,
    braze: BrazeClientConfig,
) -> (Replica, Fence) {
    let mut config = env.leader_config(identity);
    // A window (duration − grace) of 3 s: renewals every 0.75 s, each given up to 1.5 s,
    // so a loaded test machine does not make the leader step down by itself.
    let election = config.leader_election.as_mut().unwrap();
    (election.lease_duration_seconds, election.renew_grace_seconds) = (6, 3);
    let election = election.clone();
    let (client, run_client) = kube_clients(env, via, election.timing().unwrap()).await;
    let fence = Fence::leased();
    let importer = PipelineImporter::new(
        run_client,
        BrazeClient::new(braze).unwrap(),
        SnapshotStoreKind::Cluster,
        env.scratch.path().join(identity),
    )
    .with_fence(fence.clone());
    let config = Config { fence: fence.clone(), ..config };
    let metrics = Arc::new(Metrics::new());
    let deps = Dependencies {
        clock: Arc::new(env.clock.clone()),
        importer: Arc::new(importer),
        notifier: None,
        metrics: metrics.clone(),
    };
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(controller::serve(client, config, deps, async move {
        let _ = rx.await;
    }));
    (Replica { task: Some(task), _shutdown: tx, metrics }, fence)
}

fn api_server(env: &Env) -> SocketAddr {
    let kubeconfig = Kubeconfig::read_from(env.cluster.kubeconfig()).unwrap();
    let server = kubeconfig.clusters[0].cluster.as_ref().unwrap().server.clone().unwrap();
    let authority = server.trim_start_matches("https://").split('/').next().unwrap().to_owned();
    authority.parse().unwrap_or_else(|e| panic!("the test API server is at an address ({authority}): {e}"))
}

#[tokio::test]
async fn a_black_holed_leader_stops_sending_before_the_standby_leads_and_the_standby_finishes_the_run() {
    let env = Env::new("ctl-fence").await;
    env.put_members(&ids(0..6000)).await;
    let proxy = BlackHoleProxy::start(api_server(&env)).await;

    // Replica A reaches the API server only through the proxy; it leads. One Braze request
    // at a time, so that it is mid-run (not done) when it loses the API server.
    let slow = BrazeClientConfig { max_in_flight: 1, request_timeout: Duration::from_secs(10), ..Default::default() };
    let (a, fence_a) = start_replica(&env, "replica-a", Some(proxy.addr), slow).await;
    wait_until("replica A leading", || a.is_leader()).await;
    let fast = BrazeClientConfig { request_timeout: Duration::from_secs(10), ..Default::default() };
    let (b, _fence_b) = start_replica(&env, "replica-b", None, fast).await;

    // A runs the import against a slow Braze.
    env.sandbox.set_faults(Faults { latency_ms: 1200, ..Faults::default() });
    env.create(env.import("fenced", "fenced", json!({ "cadence": "Once" }))).await;
    let running = env.wait_status("fenced", "Running", |s| s.current_run.is_some()).await;
    let run = running.status.unwrap().current_run.unwrap();
    assert_eq!(run.attempt, 1);
    wait_until("A sending members to Braze", || env.sandbox.stats().users_requests >= 1).await;
    assert!(a.is_leader() && !b.is_leader(), "A is the one sending");

    // A's API server connection goes dark mid-run; meanwhile the source changes.
    proxy.black_hole();
    env.put_members(&ids(500..5500)).await;

    // B takes the Lease. By then A has stopped sending: everything Braze receives from now
    // on is B's resumed run.
    wait_until("replica B leading", || b.is_leader()).await;
    let at_takeover = env.sandbox.stats();
    assert!(!fence_a.is_open(), "A's fence closed before B could lead");
    assert!(
        (1..6).contains(&at_takeover.users_requests),
        "A was mid-run: {} of 6 membership requests sent",
        at_takeover.users_requests
    );

    let status = env.wait_runs("fenced", 1).await.status.unwrap();
    let record = &status.history[0];
    assert_eq!(record.id, run.id, "the same run, resumed by B");
    assert_eq!(record.result, RunResult::Succeeded, "{}", record.message);
    assert_eq!(record.cohort_size, 5000);
    env.wait_event("fenced", "RunInterrupted").await;
    assert_eq!(env.members("fenced"), set(&ids(500..5500)), "Braze equals the source");

    // B's resumed attempt re-sent every key A had in doubt as the new source says (1,000
    // removals, 5,000 additions: six requests) and named the cohort: exactly seven requests
    // arrived after B took the Lease, so none of them was A's.
    let end = env.sandbox.stats();
    assert_eq!(end.name_requests - at_takeover.name_requests, 1, "B named the cohort; A sent nothing more");
    assert_eq!(end.users_requests - at_takeover.users_requests, 6, "B's membership requests only");
    assert_eq!(end.requests - at_takeover.requests, 7);
    assert!(!a.is_leader(), "A stepped down");
    let mut a = a;
    let task = a.task.take().unwrap();
    let stepped_down = tokio::time::timeout(WAIT, task).await.expect("A's controller returned").unwrap();
    assert!(matches!(stepped_down, Err(ControllerError::Leader(_))), "A reports the lost Lease: {stepped_down:?}");
    drop(proxy);
}

fn body(dir: &std::path::Path, name: &str, keys: &[&str]) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut w = BodyWriter::new(std::fs::File::create(&path).unwrap()).unwrap();
    for k in keys {
        w.push(k.as_bytes()).unwrap();
    }
    w.finish().unwrap();
    path
}

fn doubt(keys: u64, run_id: &str) -> DoubtMeta {
    DoubtMeta {
        format: FORMAT_VERSION,
        base_generation: 0,
        cohort_id: "vip".into(),
        keys,
        run_id: run_id.into(),
        recorded_at: jiff::Timestamp::now(),
    }
}

/// Two attempts of one run (an old leader and the new one) record their keys in doubt in
/// the ConfigMap store: the later merges with the earlier, so both survive until a commit.
#[tokio::test]
async fn keys_in_doubt_of_two_attempts_are_merged_in_the_cluster_store() {
    let env = Env::new("ctl-doubt").await;
    let dir = tempfile::tempdir().unwrap();
    let uid = format!("7a1d2c3e-{:04x}-4e5f-8a9b-{:012x}", rand::random::<u16>(), rand::random::<u64>() >> 16);
    let key = cohort_operator::snapshot::snapshot_key(&env.ns, "https://braze.test", "kubit", "vip");
    let store = ClusterSnapshotStore::for_cohort(env.client.clone(), &env.ns, &key, "vip", "vip", &uid);
    store.record_doubt(&doubt(2, "attempt-1"), &body(dir.path(), "a1", &["\x01a", "\x01c"])).await.unwrap();
    store.record_doubt(&doubt(2, "attempt-2"), &body(dir.path(), "a2", &["\x01b", "\x01c"])).await.unwrap();
    let loaded = store.load(dir.path()).await.unwrap().doubt.expect("keys in doubt");
    assert_eq!(loaded.meta.keys, 3, "the union of both attempts' keys");
    let mut reader = read_body(loaded.body).unwrap();
    let mut keys = Vec::new();
    while let Some(k) = reader.key() {
        keys.push(k.to_vec());
        reader.advance().unwrap();
    }
    assert_eq!(keys, [b"\x01a".to_vec(), b"\x01b".to_vec(), b"\x01c".to_vec()]);
}

/// The operator binary as one replica under leader election on the test's Lease; killed on
/// drop (its own child, by pid).
struct ReplicaProcess {
    child: tokio::process::Child,
}

impl ReplicaProcess {
    fn start(env: &Env, identity: &str) -> ReplicaProcess {
        let child = tokio::process::Command::new(binary())
            .arg("run")
            .arg(format!("--watch-namespaces={}", env.ns))
            .arg("--metrics-addr=127.0.0.1:0")
            .arg("--log-format=text")
            .arg(format!("--partner-keys-dir={}", env.keys_dir.path().display()))
            .arg(format!("--braze-endpoint-region={}=us", env.sandbox.url()))
            .arg(format!("--scratch-dir={}", env.scratch.path().display()))
            .arg("--leader-election")
            .arg(format!("--lease-namespace={}", env.ns))
            .arg(format!("--identity={identity}"))
            // A window (duration − grace) of 3 s, as for the in-process replicas above.
            .args(["--lease-duration-seconds=6", "--lease-renew-grace-seconds=3"])
            .env("KUBECONFIG", env.cluster.kubeconfig())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "off".into()))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the operator starts");
        ReplicaProcess { child }
    }

    /// Sends `signal` to this replica's process (and no other).
    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id().expect("still running") as libc::pid_t;
        // SAFETY: kill(2) with the pid of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal {signal} to {pid}");
    }
}

/// Waits until the Lease `cohort-operator` names `identity` as its holder.
async fn wait_for_holder(env: &Env, identity: &str) {
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), &env.ns);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let lease = leases.get_opt("cohort-operator").await.unwrap();
        let holder = lease.and_then(|l| l.spec).and_then(|s| s.holder_identity);
        if holder.as_deref() == Some(identity) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{identity} not holding the Lease within {WAIT:?} ({holder:?} does)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a Braze request came from `identity` (each replica names itself in its User-Agent).
fn from(request: &braze_sandbox::RequestRecord, identity: &str) -> bool {
    request.user_agent.as_deref().is_some_and(|ua| ua.ends_with(&format!("({identity})")))
}

#[tokio::test]
async fn a_leader_frozen_past_its_deadline_sends_nothing_to_braze_after_it_resumes() {
    let env = Env::new("ctl-sigstop").await;
    env.put_members(&ids(0..6000)).await;
    let a = ReplicaProcess::start(&env, "replica-a");
    wait_for_holder(&env, "replica-a").await;
    let b = ReplicaProcess::start(&env, "replica-b");

    // A runs an import against a slow Braze: requests are on the wire when it freezes.
    env.sandbox.set_faults(Faults { latency_ms: 400, ..Faults::default() });
    env.create(env.import("frozen", "frozen", json!({ "cadence": "Once" }))).await;
    wait_until("A sending members to Braze", || env.sandbox.stats().users_requests >= 1).await;
    a.signal(libc::SIGSTOP);

    // Frozen past its deadline: B takes the Lease, and A is resumed only then.
    wait_for_holder(&env, "replica-b").await;
    let resumed_after = env.sandbox.stats().requests;
    a.signal(libc::SIGCONT);

    // A finds its fence closed by the clock, steps down and exits; B finishes the run.
    let mut a = a;
    let exit = tokio::time::timeout(WAIT, a.child.wait()).await.expect("A exits after losing its Lease").unwrap();
    assert!(!exit.success(), "A reports the lost Lease: {exit}");
    let status = env.wait_runs("frozen", 1).await.status.unwrap();
    let record = &status.history[0];
    assert_eq!(record.result, RunResult::Succeeded, "{}", record.message);
    assert_eq!(env.members("frozen"), set(&ids(0..6000)), "Braze equals the source");

    let requests = env.sandbox.requests();
    let (before, after): (Vec<_>, Vec<_>) = requests.iter().partition(|r| r.arrival <= resumed_after);
    assert!(before.iter().any(|r| from(r, "replica-a")), "A sent before it froze: {before:?}");
    assert!(after.iter().any(|r| from(r, "replica-b")), "B sent the rest: {after:?}");
    let late: Vec<_> = after.iter().filter(|r| !from(r, "replica-b")).collect();
    assert!(late.is_empty(), "requests reached Braze after A resumed, not from B: {late:?}");
    drop(b);
}
