//! The trigger port: `POST /hook/<digest>`. Cheap refusals first — connections, a slow
//! header, an unknown path, bodies being read at once, the body size — then the signature,
//! a replay this replica has seen, and only then the trigger's rate and its namespace's
//! calls in flight: forged and replayed calls use up neither. Only a genuine call that is
//! new to this replica reaches the Kubernetes API.
//!
//! Every limit here is per replica; put the port behind an Ingress with limits of its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use jiff::Timestamp;
use kube::Client;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::deliver::{DeliverError, deliver};
use super::hooks::Hooks;
use super::signature::{Expectation, Verdict, verify};
use crate::controller::metrics::{Metrics, ResultLabels};

/// Largest body read: GitHub push events and dbt Cloud events are a few KiB.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest a caller may take to send its headers, then its body.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; more are closed as they arrive.
const MAX_CONNECTIONS: usize = 256;
/// Bodies read at once (at most 8 MiB together).
const MAX_BODY_READS: usize = 32;
/// Genuine calls of one namespace handled at once: one tenant's triggers cannot take the
/// API time of every other's.
const MAX_IN_FLIGHT_PER_NAMESPACE: usize = 8;
/// Deliveries this replica remembers accepting, per trigger: a replay is refused without
/// asking the API server.
const SEEN_PER_HOOK: usize = 512;
/// Genuine calls a second to one trigger, with a burst: a pipeline's calls, not a flood.
const HOOK_RATE: u32 = 1;
const HOOK_BURST: u32 = 20;

struct Served {
    client: Client,
    hooks: Arc<Hooks>,
    metrics: Arc<Metrics>,
    per_hook: DefaultKeyedRateLimiter<String>,
    in_flight: InFlight,
    body_reads: Semaphore,
    seen: Mutex<HashMap<String, std::collections::VecDeque<String>>>,
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
        in_flight: InFlight::default(),
        body_reads: Semaphore::new(MAX_BODY_READS),
        seen: Mutex::default(),
    });
    let app = Router::new().route("/hook/{digest}", post(call)).fallback(unknown).with_state(served.clone());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let forget = async {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                served.per_hook.retain_recent();
                served.seen.lock().expect("seen lock").retain(|path, _| served.hooks.get(path).is_some());
            }
        };
        tokio::select! {
            () = accept(listener, app) => {}
            () = forget => {}
        }
    });
    Ok((bound, task))
}

/// HTTP/1 only, one call a connection, headers within [`HEADER_TIMEOUT`], at most
/// [`MAX_CONNECTIONS`] at once (axum's own `serve` bounds none of these).
async fn accept(listener: tokio::net::TcpListener, app: Router) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "the trigger port could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            debug!(%peer, "too many connections to the trigger port; closed");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!(%peer, error = %e, "a trigger connection ended with an error");
            }
        });
    }
}

/// Calls in flight, by namespace.
#[derive(Default)]
struct InFlight(Mutex<HashMap<String, usize>>);

struct Slot<'a> {
    in_flight: &'a InFlight,
    namespace: String,
}

impl InFlight {
    fn take(&self, namespace: &str) -> Option<Slot<'_>> {
        let mut counts = self.0.lock().expect("in-flight lock");
        let count = counts.entry(namespace.to_owned()).or_default();
        if *count >= MAX_IN_FLIGHT_PER_NAMESPACE {
            return None;
        }
        *count += 1;
        Some(Slot { in_flight: self, namespace: namespace.to_owned() })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut counts = self.in_flight.0.lock().expect("in-flight lock");
        if let Some(count) = counts.get_mut(&self.namespace) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.namespace);
            }
        }
    }
}

/// How a call ended: its status, its metric label and the operator's message.
struct Answer(StatusCode, &'static str, String);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.2)).into_response()
    }
}

fn not_found() -> Answer {
    Answer(StatusCode::NOT_FOUND, "not_found", "no trigger here: POST to a CohortTrigger's status.webhookPath".into())
}

fn busy(message: &str) -> Answer {
    Answer(StatusCode::SERVICE_UNAVAILABLE, "busy", format!("{message}; try again later"))
}

async fn unknown(State(served): State<Arc<Served>>) -> Response {
    let answer = if served.hooks.ready() { not_found() } else { busy("the trigger port is starting") };
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

async fn answer(served: &Arc<Served>, path: &str, headers: &HeaderMap, body: Body) -> Answer {
    if !served.hooks.ready() {
        return busy("the trigger port is starting");
    }
    let Some(hook) = served.hooks.get(path) else {
        return not_found();
    };
    let body = {
        let Ok(_reading) = served.body_reads.try_acquire() else {
            return busy("too many calls at once");
        };
        let Some(body) = read_body(body).await else {
            let message =
                format!("the body is over {} KiB or was not sent in time; nothing was run", MAX_BODY_BYTES / 1024);
            return Answer(StatusCode::BAD_REQUEST, "too_large", message);
        };
        body
    };
    let now = Timestamp::now();
    let expected = Expectation { kind: hook.kind, token: hook.token.expose().as_bytes(), events: &hook.events };
    let delivery = match verify(&expected, headers, &body, now) {
        Ok(Verdict::Run(delivery)) => delivery,
        Ok(Verdict::Ignore(why)) => return Answer(StatusCode::OK, "ignored", why.message().into()),
        Err(refusal) if refusal.unauthorized() => {
            return Answer(StatusCode::UNAUTHORIZED, "unauthorized", format!("{refusal}; nothing was run"));
        }
        Err(refusal) => return Answer(StatusCode::BAD_REQUEST, "invalid", format!("{refusal}; nothing was run")),
    };
    if served.seen(path, &delivery.id) {
        return Answer(StatusCode::BAD_REQUEST, "replayed", DeliverError::Replayed(delivery.id).to_string());
    }
    // Charged only for genuine, new calls: forged and replayed ones never use up the rate.
    if served.per_hook.check_key(&path.to_owned()).is_err() {
        let message = "too many calls to this trigger; try again later".into();
        return Answer(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
    }
    let Some(slot) = served.in_flight.take(&hook.namespace) else {
        return busy("too many calls to this namespace's triggers at once");
    };
    drop(slot);
    // Its own task: a caller that hangs up does not stop a delivery half-way.
    let task = {
        let (served, path) = (served.clone(), path.to_owned());
        tokio::spawn(async move {
            let _slot = served.in_flight.take(&hook.namespace);
            let result = deliver(&served.client, &hook, &delivery, now).await;
            if matches!(result, Ok(_) | Err(DeliverError::Replayed(_))) {
                served.remember(&path, &delivery.id);
            }
            (hook, delivery, result)
        })
    };
    let Ok((hook, delivery, result)) = task.await else {
        return busy("the delivery stopped");
    };
    match result {
        Ok(outcome) => {
            info!(
                namespace = hook.namespace,
                trigger = hook.name,
                delivery = delivery.id,
                ?outcome,
                "trigger delivery accepted"
            );
            let message =
                format!("runs requested: {} (and {} already waiting to run)", outcome.requested, outcome.merged);
            Answer(StatusCode::ACCEPTED, "accepted", message)
        }
        Err(e @ (DeliverError::Replayed(_) | DeliverError::Stale)) => {
            Answer(StatusCode::BAD_REQUEST, "replayed", e.to_string())
        }
        Err(e @ DeliverError::Gone) => Answer(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        Err(e @ (DeliverError::Api(_) | DeliverError::Busy)) => {
            warn!(namespace = hook.namespace, trigger = hook.name, error = ?e, "trigger delivery failed");
            Answer(StatusCode::SERVICE_UNAVAILABLE, "failed", e.to_string())
        }
    }
}

impl Served {
    fn seen(&self, path: &str, id: &str) -> bool {
        self.seen.lock().expect("seen lock").get(path).is_some_and(|ids| ids.iter().any(|i| i == id))
    }

    fn remember(&self, path: &str, id: &str) {
        let mut seen = self.seen.lock().expect("seen lock");
        let ids = seen.entry(path.to_owned()).or_default();
        ids.push_front(id.to_owned());
        ids.truncate(SEEN_PER_HOOK);
    }
}

/// The body, unless it is over [`MAX_BODY_BYTES`] or slower than [`BODY_TIMEOUT`].
async fn read_body(body: Body) -> Option<axum::body::Bytes> {
    tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES)).await.ok()?.ok()
}
