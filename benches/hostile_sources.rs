//! The operator against hostile sources: the real `cohort-operator run` binary as a child
//! process, on a real kube-apiserver, with the Braze sandbox and an HTTP export server on
//! loopback serving
//! - a 300 MB unpaginated JSON export (one array of ~3.8 million rows),
//! - a 1 GiB CSV whose second line never ends,
//! - a 500 answer whose body never ends,
//! - a gzip bomb (10 GiB of blank lines from ~10 MB on the wire),
//! - 50 imports at once (20,000-row CSV exports each),
//! - a hostile Databricks `host` answering with one 240 MB `INLINE` result chunk (40 million
//!   one-character ids), and one of 30 MB (5 million, under the operator's 32 MiB page
//!   ceiling, so it is read),
//! - a JSON document that opens 256 MiB of `[` off the rows' path,
//! - a 100,000-page NDJSON export whose `Link` to each next page is padded to 8 KiB.
//!
//! Each case gets a fresh operator process; the benchmark prints its peak RSS (`VmHWM`) and
//! each run's result and message. Target: peak RSS under 128 MiB in every case, and every
//! input over a limit ends `Failed` with a message naming the limit and the field.
//!
//! `cargo bench --bench hostile_sources` (`-- --quick` for a 30 MB export and 100 MiB
//! bodies, to check that it works).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Path as UrlPath;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use braze_sandbox::RunningSandbox;
use cohort_operator::api::{self, CohortImport, RunResult};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use testkit::bench::peak_rss_kib_of;
use testkit::cluster::Cluster;
use tokio::io::AsyncReadExt;

#[path = "../tests/support/braze.rs"]
mod braze_support;
#[path = "../tests/support/hostile_databricks.rs"]
mod hostile_databricks;

/// The partner and keys the sandbox accepts and the operator is given.
const KEYS: braze_support::BrazeKeys =
    braze_support::BrazeKeys { partner: "kubit", partner_key: "partner-key", import_key: "import-key" };

const MIB: u64 = 1 << 20;
/// The target the figures are compared with.
const TARGET_RSS_MIB: f64 = 128.0;

/// Sizes of the hostile bodies.
#[derive(Clone, Copy)]
struct Sizes {
    json_export: u64,
    single_line: u64,
    bomb: u64,
    imports: usize,
    rows_each: usize,
    /// One-character ids in the Databricks chunk over the ceiling, and under it.
    inline_rows: u64,
    inline_rows_read: u64,
    deep_brackets: u64,
    ndjson_pages: usize,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick {
        Sizes {
            json_export: 30 * MIB,
            single_line: 100 * MIB,
            bomb: 1024 * MIB,
            imports: 50,
            rows_each: 2_000,
            inline_rows: 8_000_000,
            inline_rows_read: 1_000_000,
            deep_brackets: 64 * MIB,
            ndjson_pages: 5_000,
        }
    } else {
        Sizes {
            json_export: 300 * MIB,
            single_line: 1024 * MIB,
            bomb: 10 * 1024 * MIB,
            imports: 50,
            rows_each: 20_000,
            inline_rows: 40_000_000,
            inline_rows_read: 5_000_000,
            deep_brackets: 256 * MIB,
            ndjson_pages: 100_000,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(bench(sizes));
}

/// One JSON row of the export.
fn json_row(i: u64) -> String {
    format!(r#"{{"user_id":"user-{i:010}","email":"user-{i:010}@example.com","plan":"pro"}}"#)
}

/// `{"users":[…]}` of about `bytes` bytes, generated as it is sent.
fn json_export(bytes: u64) -> Body {
    let per_chunk = 10_000u64;
    let row_bytes = json_row(0).len() as u64 + 1;
    let chunks = (bytes / row_bytes).div_ceil(per_chunk);
    let head = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{\"users\":[")) });
    let rows = futures::stream::iter(0..chunks).map(move |c| {
        let mut chunk = String::with_capacity((per_chunk * row_bytes) as usize);
        for i in c * per_chunk..(c + 1) * per_chunk {
            if i > 0 {
                chunk.push(',');
            }
            chunk.push_str(&json_row(i));
        }
        Ok(Bytes::from(chunk))
    });
    let tail = futures::stream::once(async { Ok(Bytes::from_static(b"]}")) });
    Body::from_stream(head.chain(rows).chain(tail))
}

/// `head`, then `fill` until `bytes` in all (forever when `None`).
fn filled(head: &'static [u8], fill: u8, bytes: Option<u64>) -> Body {
    let block = Bytes::from(vec![fill; MIB as usize]);
    let blocks = bytes.map_or(u64::MAX, |b| b.div_ceil(MIB));
    let head = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from_static(head)) });
    Body::from_stream(head.chain(futures::stream::iter(0..blocks).map(move |_| Ok(block.clone()))))
}

async fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = async_compression::tokio::bufread::GzipEncoder::new(data);
    let mut out = Vec::new();
    encoder.read_to_end(&mut out).await.unwrap();
    out
}

/// A `.csv.gz` of a header and `bytes` of blank lines, as gzip members of 64 MiB each.
struct GzipBomb {
    header: Bytes,
    member: Bytes,
    members: u64,
}

impl GzipBomb {
    async fn new(bytes: u64) -> Self {
        let header = Bytes::from(gzip(b"user_id\n").await);
        let member = Bytes::from(gzip(&vec![b'\n'; 64 * MIB as usize]).await);
        let members = bytes.div_ceil(64 * MIB);
        let wire = (header.len() as u64 + members * member.len() as u64) as f64 / MIB as f64;
        println!("(gzip bomb: {} MiB of blank lines from {wire:.1} MiB on the wire)", bytes / MIB);
        GzipBomb { header, member, members }
    }

    fn body(&self) -> Body {
        let (header, member) = (self.header.clone(), self.member.clone());
        let head = futures::stream::once(async move { Ok::<_, std::io::Error>(header) });
        Body::from_stream(head.chain(futures::stream::iter(0..self.members).map(move |_| Ok(member.clone()))))
    }
}

async fn export_server(sizes: Sizes) -> String {
    let bomb = std::sync::Arc::new(GzipBomb::new(sizes.bomb).await);
    let router = Router::new()
        .route("/export.json", get(move || async move { json_export(sizes.json_export) }))
        .route("/line.csv", get(move || async move { filled(b"user_id\nu1\n", b'x', Some(sizes.single_line)) }))
        .route(
            "/fail",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, filled(b"exporter crashed: ", b'!', None)) }),
        )
        .route(
            "/bomb.csv.gz",
            get(move || {
                let bomb = bomb.clone();
                async move { bomb.body() }
            }),
        )
        .route("/deep.json", get(move || async move { filled(b"{\"skip\":", b'[', Some(sizes.deep_brackets)) }))
        .route(
            "/pages/{n}",
            get(move |UrlPath(n): UrlPath<usize>| async move {
                let body = format!("{{\"user_id\":\"page-{n}\"}}\n");
                if n + 1 == sizes.ndjson_pages {
                    return body.into_response();
                }
                let link = format!("</pages/{}?pad={}>; rel=\"next\"", n + 1, "p".repeat(8 * 1024));
                ([(axum::http::header::LINK, link)], body).into_response()
            }),
        )
        .route(
            "/small/{i}",
            get(move |UrlPath(i): UrlPath<usize>| async move {
                let mut body = String::from("user_id\n");
                for j in 0..sizes.rows_each {
                    body.push_str(&format!("s{i}-{j}\n"));
                }
                body.into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    base
}

/// The operator binary, running `run` for one namespace; killed when dropped.
struct Operator {
    child: Child,
}

impl Operator {
    fn start(cluster: &Cluster, ns: &str, sandbox: &RunningSandbox, keys: &Path, scratch: &Path, log: &Path) -> Self {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cohort-operator"))
            .args(["run", "--watch-namespaces", ns, "--metrics-addr", "127.0.0.1:0", "--log-format", "text"])
            .arg("--partner-keys-dir")
            .arg(keys)
            .arg("--braze-endpoint-region")
            .arg(format!("{}=us", sandbox.url()))
            .arg("--scratch-dir")
            .arg(scratch)
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the operator starts");
        Operator { child }
    }

    /// Peak resident set so far, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        peak_rss_kib_of(self.child.id()).unwrap_or(0) as f64 / 1024.0
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn import(name: &str, url: &str, format: &str, pointer: Option<&str>, sandbox: &RunningSandbox) -> CohortImport {
    let mut http = json!({ "url": url, "format": format, "readTimeoutSeconds": 30 });
    if let Some(p) = pointer {
        http["jsonPointer"] = json!(p);
    }
    if url.contains("/pages/") {
        http["pagination"] = json!({ "linkHeader": true });
    }
    import_from(name, json!({ "http": http }), sandbox)
}

/// An inline Databricks read from the hostile workspace at `host` (token in Secret
/// `databricks`), asking for a 1 GiB chunk cap it does not get.
fn databricks_import(name: &str, host: &str, sandbox: &RunningSandbox) -> CohortImport {
    let databricks = json!({
        "host": host, "warehouseId": "hostile", "disposition": "Inline", "maxChunkBytes": 1u64 << 30,
        "auth": { "tokenSecretRef": { "name": "databricks", "key": "token" } },
        "query": "SELECT user_id FROM cohort",
    });
    import_from(name, json!({ "databricks": databricks }), sandbox)
}

fn import_from(name: &str, source: serde_json::Value, sandbox: &RunningSandbox) -> CohortImport {
    serde_json::from_value(json!({
        "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortImport",
        "metadata": { "name": name },
        "spec": {
            "cohort": { "id": name, "name": format!("Hostile {name}") },
            "source": source,
            "identifiers": { "externalId": "user_id" },
            "destination": { "braze": {
                "restEndpoint": sandbox.url(), "partner": KEYS.partner,
                "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" }
            } },
            "schedule": { "cadence": "Once" }
        }
    }))
    .unwrap()
}

/// Waits until every import in `ns` has a finished run; returns (name, result, message).
async fn finished_runs(
    api: &Api<CohortImport>,
    expected: usize,
    deadline: Duration,
) -> Vec<(String, RunResult, String)> {
    let began = Instant::now();
    loop {
        let list = api.list(&ListParams::default()).await.unwrap();
        let done: Vec<_> = list
            .items
            .iter()
            .filter_map(|i| {
                let run = i.status.as_ref()?.history.first()?;
                Some((i.metadata.name.clone().unwrap_or_default(), run.result, run.message.clone()))
            })
            .collect();
        if done.len() == expected {
            return done;
        }
        assert!(began.elapsed() < deadline, "only {} of {expected} runs finished within {deadline:?}", done.len());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

struct Case {
    name: String,
    imports: Vec<CohortImport>,
    /// Whether the input is over a limit, so the run must fail.
    over_limit: bool,
}

async fn bench(sizes: Sizes) {
    let cluster = Cluster::start();
    let client = cluster.client().await;
    cluster.install_crd(&api::crd()).await;
    let sandbox = braze_support::start_sandbox(KEYS, vec![]).await;
    let base = export_server(sizes).await;
    let huge_chunk = hostile_databricks::serve_inline_chunk(sizes.inline_rows).await;
    let read_chunk = hostile_databricks::serve_inline_chunk(sizes.inline_rows_read).await;
    let mib = |rows| hostile_databricks::inline_chunk_bytes(rows) as f64 / MIB as f64;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::write(keys.join("us"), KEYS.partner_key).unwrap();

    let cases = vec![
        Case {
            name: "300 MB unpaginated JSON export".to_owned(),
            imports: vec![import("json-export", &format!("{base}/export.json"), "Json", Some("/users"), &sandbox)],
            over_limit: false,
        },
        Case {
            name: "1 GiB single-line CSV".to_owned(),
            imports: vec![import("single-line", &format!("{base}/line.csv"), "Csv", None, &sandbox)],
            over_limit: true,
        },
        Case {
            name: "500 with an endless body".to_owned(),
            imports: vec![import("endless-500", &format!("{base}/fail"), "Csv", None, &sandbox)],
            over_limit: true,
        },
        Case {
            name: "gzip bomb".to_owned(),
            imports: vec![import("gzip-bomb", &format!("{base}/bomb.csv.gz"), "Csv", None, &sandbox)],
            over_limit: true,
        },
        Case {
            name: "50 imports at once".to_owned(),
            imports: (0..sizes.imports)
                .map(|i| import(&format!("small-{i:02}"), &format!("{base}/small/{i}"), "Csv", None, &sandbox))
                .collect(),
            over_limit: false,
        },
        Case {
            name: format!(
                "{:.0} MiB Databricks inline chunk ({} one-character ids)",
                mib(sizes.inline_rows),
                sizes.inline_rows
            ),
            imports: vec![databricks_import("inline-huge", &huge_chunk, &sandbox)],
            over_limit: true,
        },
        Case {
            name: format!(
                "{:.0} MiB Databricks inline chunk ({} one-character ids, under the page ceiling)",
                mib(sizes.inline_rows_read),
                sizes.inline_rows_read
            ),
            imports: vec![databricks_import("inline-read", &read_chunk, &sandbox)],
            over_limit: false,
        },
        Case {
            name: format!("deep-bracket JSON ({} MiB of '[')", sizes.deep_brackets / MIB),
            imports: vec![import("deep-json", &format!("{base}/deep.json"), "Json", Some("/users"), &sandbox)],
            over_limit: true,
        },
        Case {
            name: format!("{}-page NDJSON export with 8 KiB padded links", sizes.ndjson_pages),
            imports: vec![import("padded-pages", &format!("{base}/pages/0"), "Ndjson", None, &sandbox)],
            over_limit: false,
        },
    ];

    println!(
        "hostile_sources: cohort-operator run (release) on kube-apiserver v1.20.2; target peak RSS < {TARGET_RSS_MIB} MiB"
    );
    let mut worst = 0f64;
    for (n, case) in cases.into_iter().enumerate() {
        let ns = cluster.namespace(&format!("hostile-{n}")).await;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": { "name": "braze" }, "stringData": { "data-import-key": KEYS.import_key }
        }))
        .unwrap();
        Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &secret).await.unwrap();
        let token: Secret = serde_json::from_value(json!({
            "metadata": { "name": "databricks" }, "stringData": { "token": "dapi-hostile-workspace" }
        }))
        .unwrap();
        Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &token).await.unwrap();
        let scratch = dir.path().join(format!("scratch-{n}"));
        std::fs::create_dir(&scratch).unwrap();
        let log = dir.path().join(format!("operator-{n}.log"));
        let operator = Operator::start(&cluster, &ns, &sandbox, &keys, &scratch, &log);
        let api: Api<CohortImport> = Api::namespaced(client.clone(), &ns);
        let began = Instant::now();
        let expected = case.imports.len();
        futures::stream::iter(case.imports)
            .map(|doc| {
                let api = api.clone();
                async move { api.create(&PostParams::default(), &doc).await.unwrap() }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        let runs = finished_runs(&api, expected, Duration::from_secs(900)).await;
        let took = began.elapsed();
        let rss = operator.peak_rss_mib();
        drop(operator);
        worst = worst.max(rss);
        let failed = runs.iter().filter(|r| r.1 == RunResult::Failed).count();
        println!("- {}: peak RSS {rss:.1} MiB, {expected} run(s) in {:.1} s", case.name, took.as_secs_f64());
        let mut by_result = std::collections::BTreeMap::<String, usize>::new();
        for (_, result, _) in &runs {
            *by_result.entry(format!("{result:?}")).or_default() += 1;
        }
        if expected > 1 {
            println!("    results: {by_result:?}");
        }
        for (name, result, message) in runs.iter().take(2) {
            println!("    {name}: {result:?}: {message}");
        }
        let expected_failed = if case.over_limit { expected } else { 0 };
        assert_eq!(failed, expected_failed, "{}: unexpected results {runs:?} (log: {})", case.name, log.display());
    }
    println!("worst peak RSS {worst:.1} MiB (target < {TARGET_RSS_MIB} MiB)");
    drop(sandbox);
    drop(cluster);
}
