//! The egress policy end to end: the operator binary, run with `--egress-deny`, on the real
//! kube-apiserver, with the Braze sandbox, real HTTP servers and the real PostgreSQL.
//!
//! Only loopback addresses are ever put on the deny list or contacted (127.0.0.2 stands for
//! a forbidden destination): no packet can leave the machine even if the policy failed.
//! Listeners on the denied addresses count the connections they get, and must get none.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::controller_support::*;
use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use cohort_operator::api::{RunResult, SourceSpec};
use cohort_operator::net::egress::{EgressPolicy, EgressRule};
use cohort_operator::source::{InMemoryObjects, SourceError, open_source_spec, read_cohort};
use serde_json::{Value, json};
use testkit::postgres::Postgres;

/// A TCP listener that accepts, counts and drops every connection.
struct Tripwire {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Tripwire {
    async fn on(ip: &str) -> Tripwire {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("binding a loopback address");
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Tripwire { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// An export server on 127.0.0.1 whose redirect and next page lead to `denied`.
async fn exports(denied: SocketAddr) -> (String, Arc<AtomicUsize>) {
    let served = Arc::new(AtomicUsize::new(0));
    let count = |served: &Arc<AtomicUsize>| {
        served.fetch_add(1, Ordering::SeqCst);
    };
    let (a, b, c) = (served.clone(), served.clone(), served.clone());
    let router = Router::new()
        .route(
            "/members.csv",
            get(move || async move {
                count(&a);
                "id\nu1\nu2\n"
            }),
        )
        .route(
            "/moved.csv",
            get(move || async move {
                count(&b);
                (StatusCode::FOUND, [(header::LOCATION, format!("http://{denied}/members.csv"))])
            }),
        )
        .route(
            "/paged.csv",
            get(move || async move {
                count(&c);
                ([(header::LINK, format!("<http://{denied}/page-2.csv>; rel=\"next\""))], "id\nu3\n")
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (base, served)
}

/// The operator binary, watching the test's namespace, with extra flags; killed on drop.
struct OperatorProcess {
    _child: tokio::process::Child,
}

impl OperatorProcess {
    fn start(env: &Env, flags: &[&str]) -> OperatorProcess {
        let child = tokio::process::Command::new(binary())
            .arg("run")
            .arg(format!("--watch-namespaces={}", env.ns))
            .arg("--metrics-addr=127.0.0.1:0")
            .arg("--log-format=text")
            .arg(format!("--partner-keys-dir={}", env.keys_dir.path().display()))
            .arg(format!("--braze-endpoint-region={}=us", env.sandbox.url()))
            .arg(format!("--scratch-dir={}", env.scratch.path().display()))
            .args(flags)
            .env("KUBECONFIG", env.cluster.kubeconfig())
            // Its logs only when RUST_LOG asks, as for the in-process operator.
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "off".into()))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the operator starts");
        OperatorProcess { _child: child }
    }
}

fn with_source(env: &Env, name: &str, source: Value) -> Value {
    let mut doc = env.import(name, name, json!({ "cadence": "Daily", "at": "03:00", "timeZone": "UTC" }));
    doc["spec"]["source"] = source;
    doc
}

fn http(url: String) -> Value {
    json!({ "http": { "url": url, "format": "Csv" } })
}

fn postgres(secret: &str) -> Value {
    json!({ "postgres": { "connectionSecretRef": { "name": secret, "key": "url" }, "query": "SELECT 'u1' AS id" } })
}

/// Runs `name` once by request and returns its run record.
async fn run_once(env: &Env, name: &str) -> cohort_operator::api::RunRecord {
    env.request_run(name, "once").await;
    env.wait_runs(name, 1).await.status.unwrap().history[0].clone()
}

fn assert_refused(run: &cohort_operator::api::RunRecord, names: &[&str]) {
    assert_eq!(run.result, RunResult::Failed, "{}", run.message);
    assert!(run.message.contains("refused by the operator's egress policy"), "{}", run.message);
    for name in names {
        assert!(run.message.contains(name), "{name} not named: {}", run.message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_a_redirect_a_next_page_and_a_warehouse_on_a_denied_address_are_refused_before_connecting() {
    let env = Env::new("egress-deny").await;
    let denied = Tripwire::on("127.0.0.2").await;
    let (base, served) = exports(denied.addr).await;
    let pg = Postgres::shared();
    let db = env.ns.replace('-', "_");
    pg.create_database(&db);
    env.put_secret(
        "warehouse-denied",
        "url",
        &format!("postgres://cohorts:pw-4jR8@{}/{db}?sslmode=disable", denied.addr),
    )
    .await;
    // By name: resolved by the operator, pinned to the checked address.
    let by_name = format!("postgres://postgres@localhost:{}/{db}?sslmode=disable", pg.port());
    env.put_secret("warehouse", "url", &by_name).await;
    let _operator = OperatorProcess::start(&env, &["--egress-deny=127.0.0.2/32"]);

    let imports = [
        ("direct", http(format!("http://{}/members.csv", denied.addr))),
        ("redirected", http(format!("{base}/moved.csv"))),
        (
            "paged",
            json!({ "http": { "url": format!("{base}/paged.csv"), "format": "Csv", "pagination": { "linkHeader": true } } }),
        ),
        ("warehouse-denied", postgres("warehouse-denied")),
        ("allowed", http(format!("{base}/members.csv"))),
        ("warehouse", postgres("warehouse")),
    ];
    for (name, source) in &imports {
        env.create(with_source(&env, name, source.clone())).await;
    }

    for name in ["direct", "redirected", "paged", "warehouse-denied"] {
        let run = run_once(&env, name).await;
        assert_refused(&run, &["127.0.0.2", "--egress-deny 127.0.0.2"]);
        assert!(!run.message.contains("pw-4jR8"), "{}", run.message);
        assert!(env.members(name).is_empty(), "{name}: nothing reaches Braze");
        let status = env.get(name).await.status.unwrap();
        let ready = ready(&status).unwrap();
        assert_eq!(ready.status, "False", "{ready:?}");
        assert!(ready.message.contains("127.0.0.2"), "{ready:?}");
    }
    let note = env.wait_event("direct", "RunFailed").await;
    assert!(note.contains("127.0.0.2"), "{note}");

    // What the policy allows still works: an export and a warehouse reached by name.
    let run = run_once(&env, "allowed").await;
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!(env.members("allowed"), set(&ids(1..3)));
    let run = run_once(&env, "warehouse").await;
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!(env.members("warehouse"), set(&ids(1..2)));

    // The redirect and the first page were served; the denied address saw nothing at all.
    assert!(served.load(Ordering::SeqCst) >= 3);
    assert_eq!(denied.hits(), 0, "a connection reached the denied address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_that_resolves_to_a_denied_address_is_refused_by_name_and_address() {
    let env = Env::new("egress-dns").await;
    // Every loopback address denied; the API server is not under the policy, so the operator
    // still runs (each run is refused at its source, before Braze, which is under it too).
    let v4 = Tripwire::on("127.0.0.1").await;
    let v6 = match tokio::net::TcpListener::bind(("::1", v4.addr.port())).await {
        // The same port on ::1, counted too, where the machine has IPv6 loopback.
        Ok(listener) => {
            let hits = Arc::new(AtomicUsize::new(0));
            let counted = hits.clone();
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    drop(socket);
                }
            });
            Some(hits)
        }
        Err(_) => None,
    };
    env.put_secret("warehouse", "url", &format!("postgres://cohorts:pw-8Lk2@localhost:{}/cohorts", v4.addr.port()))
        .await;
    let _operator = OperatorProcess::start(&env, &["--egress-deny=127.0.0.0/8,::1"]);

    env.create(with_source(&env, "export", http(format!("http://localhost:{}/members.csv", v4.addr.port())))).await;
    env.create(with_source(&env, "warehouse", postgres("warehouse"))).await;
    for name in ["export", "warehouse"] {
        let run = run_once(&env, name).await;
        assert_refused(&run, &["destination localhost (address ", "--egress-deny"]);
        assert!(!run.message.contains("pw-8Lk2"), "{}", run.message);
    }
    assert_eq!(v4.hits(), 0, "a connection reached 127.0.0.1");
    assert_eq!(v6.map_or(0, |h| h.load(Ordering::SeqCst)), 0, "a connection reached ::1");
}

// --- credentials and origins, at the source (no API server needed) ------------------------

/// A server on 127.0.0.1 that records the Authorization and X-Api-Key headers it gets.
async fn recording() -> (String, Arc<std::sync::Mutex<Vec<(Option<String>, Option<String>)>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let router = Router::new().route(
        "/members.csv",
        get(move |headers: HeaderMap| {
            let record = record.clone();
            async move {
                let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                record.lock().unwrap().push((value("authorization"), value("x-api-key")));
                "id\nu7\n".into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (base, seen)
}

/// A server that redirects everything to `to`.
async fn redirecting(to: String) -> String {
    let router = Router::new().fallback(move || {
        let to = to.clone();
        async move { (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    base
}

async fn read(url: &str, auth: Value, policy: EgressPolicy) -> Result<Vec<String>, SourceError> {
    let spec: SourceSpec =
        serde_json::from_value(json!({ "http": { "url": url, "format": "Csv", "auth": auth } })).unwrap();
    let mapping = serde_json::from_value(json!({ "externalId": "id" })).unwrap();
    let objects = InMemoryObjects::new("growth")
        .with_secret("export", "token", "tok-3Vb9-never-elsewhere")
        .with_egress(Arc::new(policy));
    let source = open_source_spec(&spec, &mapping, &objects).await?;
    let read = read_cohort(source.as_ref()).await?;
    Ok(read.members.iter().map(|k| format!("{k:?}")).collect())
}

#[tokio::test]
async fn a_redirect_to_another_origin_carries_no_credentials() {
    let (target, seen) = recording().await;
    let start = redirecting(format!("{target}/members.csv")).await;
    // A bearer token: followed, without it.
    let bearer = json!({ "bearerTokenSecretRef": { "name": "export", "key": "token" } });
    let members = read(&format!("{start}/members.csv"), bearer, EgressPolicy::default()).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(seen.lock().unwrap().as_slice(), &[(None, None)], "the token went to another origin");

    // A credential in a header of its own: the redirect stops the read, naming why.
    let header = json!({ "header": { "name": "X-Api-Key", "valueSecretRef": { "name": "export", "key": "token" } } });
    let err = read(&format!("{start}/members.csv"), header, EgressPolicy::default()).await.unwrap_err();
    assert!(err.to_string().contains("redirected to another origin"), "{err}");
    assert!(!err.to_string().contains("tok-3Vb9"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 1, "the header credential's request reached the other origin");
}

#[tokio::test]
async fn a_source_refused_by_the_policy_names_the_rule_and_connects_nowhere() {
    let denied = Tripwire::on("127.0.0.2").await;
    let policy = || EgressPolicy::new(vec![], vec!["127.0.0.2".parse::<EgressRule>().unwrap()], Default::default());
    let err = read(&format!("http://{}/members.csv", denied.addr), Value::Null, policy()).await.unwrap_err();
    assert_eq!(err.reason(), "EgressDenied");
    assert!(err.to_string().contains("destination 127.0.0.2 refused"), "{err}");
    let start = redirecting(format!("http://{}/members.csv", denied.addr)).await;
    let err = read(&format!("{start}/x.csv"), Value::Null, policy()).await.unwrap_err();
    assert_eq!(err.reason(), "EgressDenied", "{err}");
    assert_eq!(denied.hits(), 0);
}

/// `restEndpoint` is a tenant's to write, with its own partner key: it is held to the egress
/// policy like a source URL. The run fails naming the rule, and the denied address hears
/// nothing (the partner key and data import key never leave).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_braze_endpoint_on_a_denied_address_is_refused() {
    let env = Env::new("egress-braze").await;
    let denied = Tripwire::on("127.0.0.2").await;
    env.put_members(&ids(0..3)).await;
    env.put_secret("own-partner", "key", "partner-key-Zt7q-own").await;
    let _operator = OperatorProcess::start(&env, &["--egress-deny=127.0.0.2/32"]);
    let mut doc = env.import("elsewhere", "elsewhere", json!({ "cadence": "Daily", "at": "03:00", "timeZone": "UTC" }));
    doc["spec"]["destination"]["braze"]["restEndpoint"] = json!(format!("http://{}", denied.addr));
    doc["spec"]["destination"]["braze"]["partnerApiKeySecretRef"] = json!({ "name": "own-partner", "key": "key" });
    env.create(doc).await;
    let run = run_once(&env, "elsewhere").await;
    assert_refused(&run, &["127.0.0.2", "--egress-deny 127.0.0.2"]);
    assert!(!run.message.contains("partner-key-Zt7q"), "{}", run.message);
    let status = env.get("elsewhere").await.status.unwrap();
    assert_eq!(ready(&status).unwrap().status, "False");
    assert_eq!(denied.hits(), 0, "a connection reached the denied address");
}
