//! The trigger port: `POST /hook/<digest>`. Cheap refusals first — calls in flight, an
//! unknown path, the trigger's own rate, the body size — then the signature, and only a
//! genuine call reaches the Kubernetes API. Unknown paths cost a map lookup and are not
//! rate limited: a flood of them cannot use up a trigger's rate, which is its own.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jiff::Timestamp;
use kube::Client;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::deliver::{DeliverError, deliver};
use super::hooks::Hooks;
use super::signature::{Expectation, Verdict, verify};
use crate::controller::metrics::{Metrics, ResultLabels};

/// Largest body read: GitHub push events and dbt Cloud events are a few KiB.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest a caller may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls handled at once; more are answered 503 at once.
const MAX_IN_FLIGHT: usize = 64;
/// Calls a second to one trigger's path, with a burst: a pipeline's calls, not a flood.
const HOOK_RATE: u32 = 1;
const HOOK_BURST: u32 = 20;

struct Served {
    client: Client,
    hooks: Arc<Hooks>,
    metrics: Arc<Metrics>,
    per_hook: DefaultKeyedRateLimiter<String>,
    in_flight: Semaphore,
}

/// Serves the webhooks in `hooks` on `addr`; returns the bound address and the server task.
pub async fn serve(
    client: Client,
    hooks: Arc<Hooks>,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let nz = |n: u32| NonZeroU32::new(n).expect("a positive rate");
    let served = Arc::new(Served {
        client,
        hooks,
        metrics,
        per_hook: RateLimiter::keyed(Quota::per_second(nz(HOOK_RATE)).allow_burst(nz(HOOK_BURST))),
        in_flight: Semaphore::new(MAX_IN_FLIGHT),
    });
    let app = Router::new().route("/hook/{digest}", post(call)).fallback(unknown).with_state(served.clone());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let forget = async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                served.per_hook.retain_recent();
            }
        };
        tokio::select! {
            result = axum::serve(listener, app) => if let Err(e) = result { warn!(error = %e, "the trigger port stopped") },
            () = forget => {}
        }
    });
    Ok((bound, task))
}

/// How a call ended: its answer and its metric label.
struct Answer(StatusCode, &'static str, String);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.2)).into_response()
    }
}

fn not_found() -> Answer {
    Answer(StatusCode::NOT_FOUND, "not_found", "no trigger here: POST to a CohortTrigger's status.webhookPath".into())
}

async fn unknown(State(served): State<Arc<Served>>) -> Response {
    let answer = not_found();
    count(&served, &answer);
    answer.into_response()
}

async fn call(
    State(served): State<Arc<Served>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let answer = answer(&served, &format!("/hook/{digest}"), &headers, body).await;
    count(&served, &answer);
    answer.into_response()
}

fn count(served: &Served, answer: &Answer) {
    served.metrics.trigger_deliveries.get_or_create(&ResultLabels { result: answer.1.to_owned() }).inc();
}

async fn answer(served: &Served, path: &str, headers: &HeaderMap, body: Body) -> Answer {
    let Ok(_slot) = served.in_flight.try_acquire() else {
        return Answer(StatusCode::SERVICE_UNAVAILABLE, "busy", "too many calls at once; try again later".into());
    };
    let Some(hook) = served.hooks.get(path) else {
        return not_found();
    };
    if served.per_hook.check_key(&path.to_owned()).is_err() {
        let message = "too many calls to this trigger; try again later".into();
        return Answer(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
    }
    let Some(body) = read_body(body).await else {
        let message =
            format!("the body is over {} KiB or was not sent in time; nothing was run", MAX_BODY_BYTES / 1024);
        return Answer(StatusCode::BAD_REQUEST, "too_large", message);
    };
    let now = Timestamp::now();
    let expected = Expectation { kind: hook.kind, token: hook.token.expose().as_bytes(), events: &hook.events };
    let id = match verify(&expected, headers, &body, now) {
        Ok(Verdict::Run { id }) => id,
        Ok(Verdict::Ignore(why)) => return Answer(StatusCode::OK, "ignored", why.message().into()),
        Err(refusal) if refusal.unauthorized() => {
            return Answer(StatusCode::UNAUTHORIZED, "unauthorized", format!("{refusal}; nothing was run"));
        }
        Err(refusal) => return Answer(StatusCode::BAD_REQUEST, "invalid", format!("{refusal}; nothing was run")),
    };
    match deliver(&served.client, &hook, &id, now).await {
        Ok(outcome) => {
            info!(
                namespace = hook.namespace,
                trigger = hook.name,
                delivery = id,
                ?outcome,
                "trigger delivery accepted"
            );
            let message =
                format!("runs requested: {} (and {} already waiting to run)", outcome.requested, outcome.merged);
            Answer(StatusCode::ACCEPTED, "accepted", message)
        }
        Err(e @ DeliverError::Replayed(_)) => Answer(StatusCode::BAD_REQUEST, "replayed", e.to_string()),
        Err(e @ DeliverError::Gone) => Answer(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        Err(e @ (DeliverError::Api(_) | DeliverError::Busy)) => {
            warn!(namespace = hook.namespace, trigger = hook.name, error = ?e, "trigger delivery failed");
            Answer(StatusCode::SERVICE_UNAVAILABLE, "failed", e.to_string())
        }
    }
}

/// The body, unless it is over [`MAX_BODY_BYTES`] or slower than [`BODY_TIMEOUT`].
async fn read_body(body: Body) -> Option<axum::body::Bytes> {
    tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES)).await.ok()?.ok()
}
