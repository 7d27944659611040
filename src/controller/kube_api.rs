//! The operator's Kubernetes API client: kube-rs's own stack with a client-side rate limit
//! (`--kube-api-qps`, `--kube-api-burst`, like client-go's QPS and Burst) and a count of the
//! requests sent, by verb (`cohort_operator_kube_api_requests_total`).
//!
//! kube-rs has no rate limit of its own; [`governor`]'s GCRA is client-go's token bucket:
//! `burst` requests at once after a quiet spell, then `qps` a second. Every request waits its
//! turn — reads, writes and the start of each watch (a watch then streams on one request).

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
    /// The operator's defaults (`--kube-api-qps`, `--kube-api-burst`).
    pub const DEFAULT: ApiLimits = ApiLimits { qps: 200.0, burst: 500 };

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
}

impl LimitLayer {
    /// One limit of `limits` (refused when they make none), counting in `metrics`.
    pub fn new(limits: ApiLimits, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let quota = limits.quota().map_err(anyhow::Error::msg)?;
        Ok(LimitLayer { limiter: quota.map(|q| Arc::new(RateLimiter::direct(q))), metrics })
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limited { inner, limiter: self.limiter.clone(), metrics: self.metrics.clone(), permitted: false, wait: None }
    }
}

/// A service whose calls each take a token of the limiter first. kube-rs drives it from one
/// buffer task (`poll_ready`, then `call`), so requests wait in that buffer's order.
pub struct Limited<S> {
    inner: S,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    metrics: Arc<Metrics>,
    /// A token is taken for the next call.
    permitted: bool,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S, B> Service<Request<B>> for Limited<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

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
        self.inner.call(request)
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
    use std::convert::Infallible;
    use tower::ServiceExt;

    /// A service answering every request at once, under a limit.
    type Answering = Limited<tower::util::ServiceFn<fn(Request<()>) -> Ready>>;

    fn limited(qps: f32, burst: u32) -> Answering {
        let layer = LimitLayer {
            limiter: ApiLimits { qps, burst }.quota().unwrap().map(|q| Arc::new(RateLimiter::direct(q))),
            metrics: Arc::new(Metrics::new()),
        };
        layer.layer(tower::service_fn(answer as fn(Request<()>) -> Ready))
    }

    type Ready = std::future::Ready<Result<(), Infallible>>;

    fn answer(_: Request<()>) -> Ready {
        std::future::ready(Ok(()))
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

    #[test]
    fn bad_limits_name_the_flag() {
        let e = ApiLimits { qps: -1.0, burst: 10 }.quota().unwrap_err();
        assert!(e.contains("--kube-api-qps"), "{e}");
        let e = ApiLimits { qps: 5.0, burst: 0 }.quota().unwrap_err();
        assert!(e.contains("--kube-api-burst"), "{e}");
        assert!(ApiLimits { qps: 0.0, burst: 0 }.quota().unwrap().is_none(), "0: no limit");
    }
}
