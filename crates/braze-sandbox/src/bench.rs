//! Measures the sandbox's capacity with 1,000-id `cohorts/users` bodies, so benchmarks of
//! the client can show the sandbox was not their bottleneck. Loopback only, bounded in
//! requests and time.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::seed::generated_users;
use crate::server::{DataImportKey, Partner, RunningSandbox, Sandbox, SandboxConfig};

#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// A running sandbox to measure; `None` starts one in this process.
    pub url: Option<String>,
    pub partner: String,
    pub partner_api_key: String,
    pub data_import_key: String,
    /// Stop after this many requests…
    pub requests: u64,
    /// …or after this long, whichever comes first.
    pub max_duration: Duration,
    /// Requests in flight.
    pub concurrency: usize,
    /// Users seeded in an in-process sandbox (ids `bench-user-{i}`).
    pub users: u32,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            url: None,
            partner: "bench".into(),
            partner_api_key: "bench-partner-key".into(),
            data_import_key: "bench-import-key".into(),
            requests: 20_000,
            max_duration: Duration::from_secs(20),
            concurrency: 32,
            users: 100_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchResult {
    pub requests: u64,
    pub ids: u64,
    pub failures: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
}

impl BenchResult {
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    pub fn ids_per_sec(&self) -> f64 {
        self.ids as f64 / self.elapsed.as_secs_f64()
    }
}

impl std::fmt::Display for BenchResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "braze-sandbox capacity: {} requests of 1,000 ids in {:.2}s = {:.0} requests/s, {:.0} ids/s; \
             latency p50 {:.2} ms, p99 {:.2} ms; {} not 2xx",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.requests_per_sec(),
            self.ids_per_sec(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.failures,
        )
    }
}

const IDS_PER_BODY: u32 = 1000;
const DISTINCT_BODIES: u32 = 64;

pub async fn run(config: &BenchConfig) -> anyhow::Result<BenchResult> {
    let (_sandbox, url): (Option<RunningSandbox>, String) = match &config.url {
        Some(url) => {
            require_loopback(url)?;
            (None, url.trim_end_matches('/').to_owned())
        }
        None => {
            let sandbox = Sandbox::start(SandboxConfig {
                partners: vec![Partner { name: config.partner.clone(), api_key: config.partner_api_key.clone() }],
                data_import_keys: vec![DataImportKey { key: config.data_import_key.clone(), partners: vec![] }],
                users: generated_users("bench-user-", config.users).collect(),
                ..SandboxConfig::default()
            })
            .await?;
            let url = sandbox.url();
            (Some(sandbox), url)
        }
    };
    let endpoint = format!("{url}/partners/{}/cohorts/users", config.partner);
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..DISTINCT_BODIES).map(|i| body(config, i)).collect());
    let client = reqwest::Client::builder().pool_max_idle_per_host(config.concurrency).tcp_nodelay(true).build()?;
    let issued = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + config.max_duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..config.concurrency.max(1) {
        let (client, endpoint, bodies, issued) = (client.clone(), endpoint.clone(), bodies.clone(), issued.clone());
        let limit = config.requests;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0u64;
            let mut n = worker;
            while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < limit {
                let body = bodies[n % bodies.len()].clone();
                n += 1;
                let sent = Instant::now();
                let ok = match client.post(&endpoint).header("content-type", "application/json").body(body).send().await
                {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let _ = resp.bytes().await;
                        ok
                    }
                    Err(_) => false,
                };
                latencies.push(sent.elapsed());
                failures += u64::from(!ok);
            }
            (latencies, failures)
        }));
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    for task in tasks {
        let (l, f) = task.await.context("benchmark worker panicked")?;
        latencies.extend(l);
        failures += f;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let requests = latencies.len() as u64;
    Ok(BenchResult {
        requests,
        ids: requests * u64::from(IDS_PER_BODY),
        failures,
        elapsed,
        p50: pct(0.5),
        p99: pct(0.99),
    })
}

/// A 1,000-id body: half joining, half leaving, of seeded users (and some unknown ids).
fn body(config: &BenchConfig, variant: u32) -> Vec<u8> {
    let users = config.users.max(1);
    let id = |k: u32| {
        format!(
            "bench-user-{}",
            (variant.wrapping_mul(7919).wrapping_add(k.wrapping_mul(104_729))) % (users + users / 10)
        )
    };
    let half = IDS_PER_BODY / 2;
    let adds: Vec<String> = (0..half).map(id).collect();
    let removes: Vec<String> = (half..IDS_PER_BODY).map(id).collect();
    serde_json::to_vec(&serde_json::json!({
        "partner_api_key": config.partner_api_key,
        "client_secret": config.data_import_key,
        "cohort_id": format!("bench-{}", variant % 4),
        "cohort_changes": [
            { "user_ids": adds },
            { "user_ids": removes, "should_remove": true },
        ],
    }))
    .expect("JSON of strings")
}

fn require_loopback(url: &str) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("--url {url:?}"))?;
    let host = parsed.host_str().unwrap_or_default();
    let loopback =
        host == "localhost" || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("--url {url:?}: the benchmark only targets loopback addresses (127.0.0.1, ::1, localhost)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(require_loopback("http://127.0.0.1:4010").is_ok());
        assert!(require_loopback("http://[::1]:4010/").is_ok());
        assert!(require_loopback("http://localhost:1").is_ok());
        assert!(require_loopback("https://rest.iad-01.braze.com").is_err());
        assert!(require_loopback("http://10.0.0.1").is_err());
    }

    #[test]
    fn bodies_carry_exactly_1000_ids() {
        let config = BenchConfig { users: 50, ..BenchConfig::default() };
        let v: serde_json::Value = serde_json::from_slice(&body(&config, 3)).unwrap();
        let n: usize =
            v["cohort_changes"].as_array().unwrap().iter().map(|o| o["user_ids"].as_array().unwrap().len()).sum();
        assert_eq!(n, 1000);
    }
}
