//! The operator's Kubernetes API client: kube-rs's own stack with a client-side rate limit
//! (`--kube-api-qps`, `--kube-api-burst`, like client-go's QPS and Burst) and a count of the
//! requests sent, by verb (`cohort_operator_kube_api_requests_total`).
//!
//! kube-rs has no rate limit of its own; [`governor`]'s GCRA is client-go's token bucket:
//! `burst` requests at once after a quiet spell, then `qps` a second. Every request waits its
//! turn — reads, writes and the start of each watch (a watch then streams on one request).
//!
//! Every request but a watch must also start to be answered within [`ANSWER_TIMEOUT`].

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{Method, Request};
use tower::{Layer, Service};

use super::metrics::Metrics;

/// The client's rate limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ApiLimits {
    /// Requests a second, sustained; 0: no limit.
    pub qps: f32,
    /// Requests at once after a quiet spell (at least 1).
    pub burst: u32,
}

impl ApiLimits {
    /// The operator's defaults (`--kube-api-qps`, `--kube-api-burst`): a seatbelt sized to
    /// the operator's own busy minute — 1,000 runs due at once, about 7 requests each, all
    /// started within 15 s (`controller_scale`) — not a courtesy cap. API Priority and
    /// Fairness (on by default since Kubernetes 1.20, GA in 1.29) shares the API server
    /// fairly between clients, and SIG API Machinery advises relying on it: controller-runtime
    /// has no client-side limit by default any more. Lower it for an API server without it.
    pub const DEFAULT: ApiLimits = ApiLimits { qps: 500.0, burst: 1000 };

    /// A clear error naming the flag, or the quota.
    fn quota(&self) -> Result<Option<Quota>, String> {
        if !self.qps.is_finite() || self.qps < 0.0 {
            return Err(format!("--kube-api-qps must be a number ≥ 0 (0: no limit), not {}", self.qps));
        }
        if self.qps == 0.0 {
            return Ok(None);
        }
        let burst = NonZeroU32::new(self.burst)
            .ok_or_else(|| "--kube-api-burst must be at least 1 when --kube-api-qps is set".to_owned())?;
        let period = Duration::from_secs_f64(1.0 / f64::from(self.qps));
        let quota = Quota::with_period(period).ok_or_else(|| format!("--kube-api-qps {} is too large", self.qps))?;
        Ok(Some(quota.allow_burst(burst)))
    }
}

/// Longest wait for the API server to start answering a request other than a watch. A
/// connection that hangs — a stalled API server, a network path that drops packets — then
/// fails the request, and its caller backs off and tries again (a reconcile, a run's status
/// write), instead of waiting forever: kube-rs sets no read timeout by default, since one
/// would also cut watches that are merely quiet. Generous: under load the test API server
/// took about a second.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// A request the API server did not start to answer in time. The path names the resource,
/// never a value.
#[derive(Debug, thiserror::Error)]
#[error("the Kubernetes API server did not answer {verb} {path} within {timeout:?}")]
pub struct NoAnswer {
    verb: &'static str,
    path: String,
    timeout: Duration,
}

/// A client for `config` whose requests go through `limits` and are counted in `metrics`.
pub fn client(config: kube::Config, limits: ApiLimits, metrics: Arc<Metrics>) -> anyhow::Result<kube::Client> {
    with_layer(config, &LimitLayer::new(limits, metrics)?)
}

/// A client for `config` under `layer`: clients built with one layer share its limit.
pub fn with_layer(config: kube::Config, layer: &LimitLayer) -> anyhow::Result<kube::Client> {
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(builder.with_layer(layer).build())
}

/// Rate-limits and counts requests.
#[derive(Clone)]
pub struct LimitLayer {
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    metrics: Arc<Metrics>,
    answer_timeout: Duration,
}

impl LimitLayer {
    /// One limit of `limits` (refused when they make none), counting in `metrics`.
    pub fn new(limits: ApiLimits, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let quota = limits.quota().map_err(anyhow::Error::msg)?;
        Ok(LimitLayer {
            limiter: quota.map(|q| Arc::new(RateLimiter::direct(q))),
            metrics,
            answer_timeout: ANSWER_TIMEOUT,
        })
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limited {
            inner,
            limiter: self.limiter.clone(),
            metrics: self.metrics.clone(),
            answer_timeout: self.answer_timeout,
            permitted: false,
            wait: None,
        }
    }
}

/// A service whose calls each take a token of the limiter first. kube-rs drives it from one
/// buffer task (`poll_ready`, then `call`), so requests wait in that buffer's order.
pub struct Limited<S> {
    inner: S,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    metrics: Arc<Metrics>,
    answer_timeout: Duration,
    /// A token is taken for the next call.
    permitted: bool,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S, B> Service<Request<B>> for Limited<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
    S::Error: From<NoAnswer>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while !self.permitted {
            let Some(limiter) = &self.limiter else { break };
            if let Some(wait) = self.wait.as_mut() {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            match limiter.check() {
                Ok(()) => self.permitted = true,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    self.wait = Some(Box::pin(tokio::time::sleep(wait)));
                }
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.permitted = false;
        let verb = verb(request.method(), request.uri().query());
        // The path names the resource, never a value: Secret names, not their data.
        tracing::trace!(verb, path = request.uri().path(), "Kubernetes API request");
        self.metrics.kube_api_request(verb);
        if verb == "watch" {
            // A watch answers at once and then streams for as long as the server keeps it.
            return Box::pin(self.inner.call(request));
        }
        let (path, timeout) = (request.uri().path().to_owned(), self.answer_timeout);
        let answer = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(timeout, answer).await {
                Ok(answered) => answered,
                Err(_) => Err(NoAnswer { verb, path, timeout }.into()),
            }
        })
    }
}

/// The Kubernetes verb of a request (`get` also stands for `list`: the path alone cannot
/// tell them apart without knowing every resource).
fn verb(method: &Method, query: Option<&str>) -> &'static str {
    let watch = query.is_some_and(|q| q.split('&').any(|pair| pair == "watch=true" || pair == "watch=1"));
    match *method {
        Method::GET if watch => "watch",
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{BoxError, ServiceExt};

    /// A service answering every request at once, under a limit.
    type Answering = Limited<tower::util::ServiceFn<fn(Request<()>) -> Ready>>;

    fn layer(qps: f32, burst: u32, answer_timeout: Duration) -> LimitLayer {
        LimitLayer {
            limiter: ApiLimits { qps, burst }.quota().unwrap().map(|q| Arc::new(RateLimiter::direct(q))),
            metrics: Arc::new(Metrics::new()),
            answer_timeout,
        }
    }

    fn limited(qps: f32, burst: u32) -> Answering {
        layer(qps, burst, ANSWER_TIMEOUT).layer(tower::service_fn(answer as fn(Request<()>) -> Ready))
    }

    type Ready = std::future::Ready<Result<(), BoxError>>;

    fn answer(_: Request<()>) -> Ready {
        std::future::ready(Ok(()))
    }

    type Hanging = std::future::Pending<Result<(), BoxError>>;

    fn hang(_: Request<()>) -> Hanging {
        std::future::pending()
    }

    #[tokio::test]
    async fn a_request_left_unanswered_fails_but_a_quiet_watch_goes_on() {
        let timeout = Duration::from_millis(50);
        let mut service = layer(0.0, 0, timeout).layer(tower::service_fn(hang as fn(Request<()>) -> Hanging));
        let patch = request(Method::PATCH, "/apis/cohorts.dev/v1alpha1/namespaces/a/cohortimports/x/status");
        let error = service.ready().await.unwrap().call(patch).await.unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("did not answer patch /apis/cohorts.dev/v1alpha1/namespaces/a/cohortimports/x/status")
        );
        assert!(message.contains("50ms"), "{message}");

        let watch = request(Method::GET, "/apis/cohorts.dev/v1alpha1/cohortimports?watch=true&resourceVersion=1");
        let watching = service.ready().await.unwrap().call(watch);
        assert!(tokio::time::timeout(timeout * 4, watching).await.is_err(), "the watch is still open");
    }

    fn request(method: Method, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).unwrap()
    }

    #[tokio::test]
    async fn a_burst_goes_at_once_then_requests_wait_for_the_rate() {
        let mut service = limited(20.0, 5);
        let began = std::time::Instant::now();
        for _ in 0..5 {
            service.ready().await.unwrap().call(request(Method::GET, "/api/v1/secrets")).await.unwrap();
        }
        assert!(began.elapsed() < Duration::from_millis(40), "the burst is not held back");
        for _ in 0..4 {
            service.ready().await.unwrap().call(request(Method::GET, "/api/v1/secrets")).await.unwrap();
        }
        // 4 more at 20 a second: about 200 ms.
        let took = began.elapsed();
        assert!(took >= Duration::from_millis(150), "past the burst, requests wait: {took:?}");
    }

    #[tokio::test]
    async fn requests_are_counted_by_verb() {
        let mut service = limited(0.0, 0);
        for (method, uri) in [
            (Method::GET, "/apis/cohorts.dev/v1alpha1/cohortimports?watch=true&resourceVersion=1"),
            (Method::GET, "/api/v1/namespaces/a/secrets/b"),
            (Method::PATCH, "/apis/cohorts.dev/v1alpha1/namespaces/a/cohortimports/x/status"),
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/a/events"),
        ] {
            service.ready().await.unwrap().call(request(method, uri)).await.unwrap();
        }
        let text = service.metrics.render();
        for verb in ["watch", "get", "patch", "create"] {
            assert!(text.contains(&format!("cohort_operator_kube_api_requests_total{{verb=\"{verb}\"}} 1")), "{text}");
        }
    }

    /// Through kube's own client stack: an API server that accepts the connection and never
    /// answers fails a read with the error, instead of holding its caller.
    #[tokio::test]
    async fn a_kube_client_call_to_a_silent_server_fails_in_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = listener.accept().await {
                held.push(connection);
            }
        });
        let config = kube::Config::new(url.parse().unwrap());
        let client = with_layer(config, &layer(0.0, 0, Duration::from_millis(100))).unwrap();
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, "team");
        let read = tokio::time::timeout(Duration::from_secs(10), secrets.get("braze")).await;
        let error = read.expect("the read fails in time, not after kube's defaults").unwrap_err();
        assert!(error.to_string().contains("did not answer get /api/v1/namespaces/team/secrets/braze"), "{error}");
        silent.abort();
    }

    #[test]
    fn bad_limits_name_the_flag() {
        let e = ApiLimits { qps: -1.0, burst: 10 }.quota().unwrap_err();
        assert!(e.contains("--kube-api-qps"), "{e}");
        let e = ApiLimits { qps: 5.0, burst: 0 }.quota().unwrap_err();
        assert!(e.contains("--kube-api-burst"), "{e}");
        assert!(ApiLimits { qps: 0.0, burst: 0 }.quota().unwrap().is_none(), "0: no limit");
    }
}
