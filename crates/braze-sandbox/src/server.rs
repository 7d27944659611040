//! The HTTP server: Braze's two endpoints, the `/sandbox/*` admin endpoints, and the
//! connection loop that can drop connections on purpose.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::header::USER_AGENT;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::faults::{Decision, FaultState, Faults, RateLimit, RateLimitHeaders};
use crate::store::{Cohorts, SandboxUser, Users};
use crate::track::{self, Profiles, TrackOutcome};
use crate::wire::{self, Envelope};

/// A partner as Braze knows it: the URL path segment and one of its API keys (a partner
/// with US and EU keys is listed twice).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Partner {
    pub name: String,
    pub api_key: String,
}

/// A customer's data import key (`client_secret`) and the partners enabled for it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataImportKey {
    pub key: String,
    /// Partner names enabled for this key; empty means every partner.
    #[serde(default)]
    pub partners: Vec<String>,
}

// Keys stay out of Debug output: the sandbox's logs are captured by tests that assert no
// key ever appears in a log line.
impl std::fmt::Debug for Partner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partner").field("name", &self.name).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DataImportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataImportKey").field("partners", &self.partners).finish_non_exhaustive()
    }
}

/// A customer's REST API key (`Authorization: Bearer …` on `/users/track`) and the
/// permissions it was given in Braze's dashboard.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestApiKey {
    pub key: String,
    /// Permission names, e.g. `users.track`; empty means every permission.
    #[serde(default)]
    pub permissions: Vec<String>,
}

impl RestApiKey {
    /// A key with the `users.track` permission.
    pub fn users_track(key: impl Into<String>) -> Self {
        Self { key: key.into(), permissions: vec![USERS_TRACK.to_owned()] }
    }
}

impl std::fmt::Debug for RestApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestApiKey").field("permissions", &self.permissions).finish_non_exhaustive()
    }
}

/// The permission `/users/track` needs.
pub const USERS_TRACK: &str = "users.track";

/// Braze's documented limit for `/users/track`: 3,000 requests per 3 seconds per workspace.
pub fn users_track_rate_limit() -> RateLimit {
    RateLimit { requests: 3000, window_ms: 3000, retry_after: false }
}

/// How to start a sandbox.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Loopback address; port 0 picks a free one.
    pub listen: SocketAddr,
    pub partners: Vec<Partner>,
    pub data_import_keys: Vec<DataImportKey>,
    /// Users to seed (merged into those of the state file).
    pub users: Vec<SandboxUser>,
    /// Loaded at start when it exists; saved on shutdown, on `POST /sandbox/save`, and every
    /// few seconds while something changed.
    pub state_file: Option<PathBuf>,
    pub faults: Faults,
    /// Larger bodies get 413.
    pub max_body_bytes: usize,
    /// REST API keys `/users/track` accepts.
    pub rest_api_keys: Vec<RestApiKey>,
    /// Faults of `/users/track`, which has its own rate limit: by default Braze's documented
    /// 3,000 requests per 3 seconds ([`users_track_rate_limit`]).
    pub track_faults: Faults,
    /// Values an array attribute keeps; adding past it drops the oldest (Braze: 500 by default).
    pub array_limit: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            partners: Vec::new(),
            data_import_keys: Vec::new(),
            users: Vec::new(),
            state_file: None,
            faults: Faults::default(),
            max_body_bytes: 4 * 1024 * 1024,
            rest_api_keys: Vec::new(),
            track_faults: Faults { rate_limit: Some(users_track_rate_limit()), ..Faults::default() },
            array_limit: track::DEFAULT_ARRAY_LIMIT,
        }
    }
}

/// Counters since start (or the last reset).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests to the two Braze endpoints, faulted and dropped ones included.
    pub requests: u64,
    pub name_requests: u64,
    pub users_requests: u64,
    pub responses_by_status: BTreeMap<u16, u64>,
    pub dropped_connections: u64,
    /// Identifiers in accepted `cohorts/users` requests.
    pub ids_received: u64,
    /// Of those, identifiers sent with `should_remove: true`.
    #[serde(default)]
    pub removes_received: u64,
    pub ids_matched: u64,
    /// Identifiers that matched no user (ignored, as Braze does).
    pub ids_unmatched: u64,
    /// The most identifiers any `cohorts/users` request carried, rejected ones included.
    pub max_ids_in_request: u64,
    /// Membership changes that took effect.
    pub joined: u64,
    pub left: u64,
    /// The most Braze requests handled at the same time (a client's concurrency bound).
    pub max_concurrent_requests: u64,
    /// With a rate limit set: the most requests one window received, 429s included.
    #[serde(default)]
    pub max_requests_in_rate_window: u64,
    /// `/users/track` (see [`crate::track`]).
    #[serde(default)]
    pub track: TrackStats,
}

/// Counters of `/users/track` since start (or the last reset).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrackStats {
    /// Requests, faulted ones included.
    pub requests: u64,
    /// The most objects any request carried, refused requests included.
    pub max_objects_in_request: u64,
    /// Objects in requests that passed the whole-request checks.
    pub objects: u64,
    /// Objects applied to a user.
    pub processed: u64,
    /// Objects listed in `errors` (201 answers).
    pub object_errors: u64,
    /// Update-only objects for users that do not exist: nothing happened.
    pub unknown_users: u64,
    /// Users created by objects that could create them (never, for a careful client).
    pub users_created: u64,
    /// `external_id` objects without `_update_existing_only`.
    pub missing_update_existing_only: u64,
    /// Attributes written: Braze's billable data points.
    pub data_points: u64,
    /// Writes that changed nothing (paid for nothing).
    pub wasted_writes: u64,
    /// Writes that take a value away (an array `remove`, a `null`, `false`).
    pub removals: u64,
    /// Of the wasted writes, removals (the rest added or set a value it had).
    pub wasted_removals: u64,
    /// Array values dropped past the array limit.
    pub array_overflow: u64,
    /// Users named twice in one request.
    pub duplicate_users: u64,
    /// With its rate limit: the most requests one window received, 429s included.
    pub max_requests_in_rate_window: u64,
}

impl TrackStats {
    fn add(&mut self, o: &TrackOutcome) {
        self.processed += o.processed;
        self.object_errors += o.errors.len() as u64;
        self.unknown_users += o.unknown_users;
        self.users_created += o.users_created;
        self.missing_update_existing_only += o.missing_update_existing_only;
        self.data_points += o.data_points;
        self.wasted_writes += o.wasted_writes;
        self.removals += o.removals;
        self.wasted_removals += o.wasted_removals;
        self.array_overflow += o.array_overflow;
        self.duplicate_users += o.duplicate_users;
    }
}

/// One Braze request, as `GET /sandbox/requests` lists it (never with keys).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub endpoint: String,
    pub partner: String,
    pub cohort_id: Option<String>,
    pub status: u16,
    pub message: String,
    pub ids: u64,
    pub removes: u64,
    /// Its place among the Braze requests received (from 1; `stats().requests` counted
    /// when it arrived, before any latency fault): which came after a given moment.
    #[serde(default)]
    pub arrival: u64,
    /// The client's `User-Agent` (a client may name itself there, e.g. a replica).
    #[serde(default)]
    pub user_agent: Option<String>,
}

/// A cohort as `GET /sandbox/cohorts` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CohortSummary {
    pub partner: String,
    pub cohort_id: String,
    pub name: Option<String>,
    pub created_at: Option<String>,
    pub members: usize,
}

const REQUEST_LOG_LEN: usize = 10_000;
const SAVE_EVERY: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    name_requests: AtomicU64,
    users_requests: AtomicU64,
    by_status: Box<[AtomicU64]>,
    dropped: AtomicU64,
    ids_received: AtomicU64,
    removes_received: AtomicU64,
    ids_matched: AtomicU64,
    ids_unmatched: AtomicU64,
    max_ids: AtomicU64,
    joined: AtomicU64,
    left: AtomicU64,
    concurrent: AtomicU64,
    max_concurrent: AtomicU64,
}

impl Counters {
    fn new() -> Self {
        Self { by_status: (0..600).map(|_| AtomicU64::new(0)).collect(), ..Self::default() }
    }

    fn status(&self, status: u16) {
        if let Some(c) = self.by_status.get(usize::from(status)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Stats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            requests: load(&self.requests),
            name_requests: load(&self.name_requests),
            users_requests: load(&self.users_requests),
            responses_by_status: self
                .by_status
                .iter()
                .enumerate()
                .filter(|(_, c)| load(c) > 0)
                .map(|(s, c)| (s as u16, load(c)))
                .collect(),
            dropped_connections: load(&self.dropped),
            ids_received: load(&self.ids_received),
            removes_received: load(&self.removes_received),
            ids_matched: load(&self.ids_matched),
            ids_unmatched: load(&self.ids_unmatched),
            max_ids_in_request: load(&self.max_ids),
            joined: load(&self.joined),
            left: load(&self.left),
            max_concurrent_requests: load(&self.max_concurrent),
            // Kept by the fault state and the track state; filled in by `Shared::stats`.
            max_requests_in_rate_window: 0,
            track: TrackStats::default(),
        }
    }

    fn reset(&self) {
        for a in [
            &self.requests,
            &self.name_requests,
            &self.users_requests,
            &self.dropped,
            &self.ids_received,
            &self.removes_received,
            &self.ids_matched,
            &self.ids_unmatched,
            &self.max_ids,
            &self.joined,
            &self.left,
            &self.max_concurrent,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        for a in self.by_status.iter() {
            a.store(0, Ordering::Relaxed);
        }
    }
}

/// `/users/track`'s own state: keys, faults, counters, attributes.
struct Track {
    keys: RwLock<Vec<RestApiKey>>,
    faults: Mutex<FaultState>,
    stats: Mutex<TrackStats>,
    profiles: RwLock<Profiles>,
    array_limit: usize,
}

struct Shared {
    track: Track,
    partners: RwLock<Vec<Partner>>,
    keys: RwLock<Vec<DataImportKey>>,
    users: RwLock<Users>,
    cohorts: Cohorts,
    faults: Mutex<FaultState>,
    counters: Counters,
    log: Mutex<VecDeque<RequestRecord>>,
    dirty: AtomicBool,
    state_file: Option<PathBuf>,
}

/// Inspection and control of a running sandbox; cheap to clone.
#[derive(Clone)]
pub struct SandboxHandle {
    shared: Arc<Shared>,
}

/// A sandbox serving on a loopback port; stops when dropped.
pub struct RunningSandbox {
    addr: SocketAddr,
    handle: SandboxHandle,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Starting a sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("state file {path}: {source}")]
    StateFile { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is not sandbox state: {source}")]
    StateFormat { path: PathBuf, source: serde_json::Error },
}

pub struct Sandbox;

impl Sandbox {
    /// Starts serving on `config.listen` (in the current tokio runtime).
    pub async fn start(config: SandboxConfig) -> Result<RunningSandbox, SandboxError> {
        let mut users = Users::default();
        let cohorts = Cohorts::default();
        if let Some(path) = &config.state_file
            && path.exists()
        {
            load_state(path, &mut users, &cohorts)?;
        }
        for user in config.users {
            users.upsert(user);
        }
        let mut profiles = Profiles::default();
        if let Some(path) = &config.state_file
            && path.exists()
        {
            load_profiles(path, &mut profiles)?;
        }
        let track = Track {
            keys: RwLock::new(config.rest_api_keys),
            faults: Mutex::new(FaultState::new(config.track_faults)),
            stats: Mutex::default(),
            profiles: RwLock::new(profiles),
            array_limit: config.array_limit.max(1),
        };
        let shared = Arc::new(Shared {
            track,
            partners: RwLock::new(config.partners),
            keys: RwLock::new(config.data_import_keys),
            users: RwLock::new(users),
            cohorts,
            faults: Mutex::new(FaultState::new(config.faults)),
            counters: Counters::new(),
            log: Mutex::new(VecDeque::new()),
            dirty: AtomicBool::new(false),
            state_file: config.state_file,
        });
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| SandboxError::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| SandboxError::Bind { addr: config.listen, source })?;
        let router = router(shared.clone(), config.max_body_bytes);
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(accept_loop(listener, router, shared.clone(), stop.clone()))];
        if shared.state_file.is_some() {
            tasks.push(tokio::spawn(save_loop(shared.clone(), stop)));
        }
        info!(%addr, "Braze sandbox listening");
        Ok(RunningSandbox { addr, handle: SandboxHandle { shared }, shutdown, tasks })
    }
}

impl RunningSandbox {
    /// `http://127.0.0.1:PORT`: the REST endpoint to give a client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn handle(&self) -> SandboxHandle {
        self.handle.clone()
    }

    /// Stops accepting, closes connections and saves the state file.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.shutdown.send_replace(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.handle.save()
    }
}

impl std::ops::Deref for RunningSandbox {
    type Target = SandboxHandle;
    fn deref(&self) -> &SandboxHandle {
        &self.handle
    }
}

impl Drop for RunningSandbox {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl SandboxHandle {
    /// Every cohort, sorted by partner and id.
    pub fn cohorts(&self) -> Vec<CohortSummary> {
        self.shared
            .cohorts
            .all()
            .into_iter()
            .map(|(partner, cohort_id, c)| {
                let c = c.lock();
                CohortSummary {
                    partner,
                    cohort_id,
                    name: c.name.clone(),
                    created_at: c.created_at.clone(),
                    members: c.members.len(),
                }
            })
            .collect()
    }

    /// The names Braze's segment filter offers for a partner: named cohorts, sorted.
    pub fn cohort_names(&self, partner: &str) -> Vec<String> {
        let mut names: Vec<String> =
            self.cohorts().into_iter().filter(|c| c.partner == partner).filter_map(|c| c.name).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The members of a cohort; `None` when Braze never heard of it.
    pub fn members(&self, partner: &str, cohort_id: &str) -> Option<Vec<SandboxUser>> {
        let cohort = self.shared.cohorts.get(partner, cohort_id)?;
        let mut indices: Vec<u32> = cohort.lock().members.iter().copied().collect();
        indices.sort_unstable();
        let users = self.shared.users.read();
        Some(indices.into_iter().filter_map(|i| users.get(i).cloned()).collect())
    }

    /// External ids of a cohort's members, sorted (members without one are left out).
    pub fn member_external_ids(&self, partner: &str, cohort_id: &str) -> Vec<String> {
        let mut ids: Vec<String> =
            self.members(partner, cohort_id).unwrap_or_default().into_iter().filter_map(|u| u.external_id).collect();
        ids.sort();
        ids
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    pub fn reset_stats(&self) {
        self.shared.reset_stats();
    }

    /// The latest Braze requests, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.log.lock().iter().cloned().collect()
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults.lock().faults.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.faults.lock().set(faults);
    }

    /// Adds or merges users; returns how many users there are.
    pub fn add_users(&self, users: impl IntoIterator<Item = SandboxUser>) -> usize {
        let mut store = self.shared.users.write();
        for user in users {
            store.upsert(user);
        }
        self.shared.dirty.store(true, Ordering::Relaxed);
        store.len()
    }

    pub fn user_count(&self) -> usize {
        self.shared.users.read().len()
    }

    /// Replaces the data import keys (a customer creating or invalidating keys).
    pub fn set_data_import_keys(&self, keys: Vec<DataImportKey>) {
        *self.shared.keys.write() = keys;
    }

    pub fn set_partners(&self, partners: Vec<Partner>) {
        *self.shared.partners.write() = partners;
    }

    /// Replaces the REST API keys (a customer creating, changing or deleting keys).
    pub fn set_rest_api_keys(&self, keys: Vec<RestApiKey>) {
        *self.shared.track.keys.write() = keys;
    }

    pub fn track_faults(&self) -> Faults {
        self.shared.track.faults.lock().faults.clone()
    }

    /// Replaces `/users/track`'s faults, its rate limit included.
    pub fn set_track_faults(&self, faults: Faults) {
        self.shared.track.faults.lock().set(faults);
    }

    /// The custom attributes of the user with this external id.
    pub fn attributes(&self, external_id: &str) -> Option<BTreeMap<String, serde_json::Value>> {
        let user = self.shared.users.read().by_external_id(external_id)?;
        self.shared.track.profiles.read().get(user).cloned()
    }

    /// The users a Braze segment filter on `attribute` matches: the array attribute
    /// "includes value" `value`, or, with `None`, the boolean attribute "is true".
    pub fn segment(&self, attribute: &str, value: Option<&str>) -> Vec<SandboxUser> {
        let matching = self.shared.track.profiles.read().matching(attribute, value);
        let users = self.shared.users.read();
        matching.into_iter().filter_map(|i| users.get(i).cloned()).collect()
    }

    /// [`Self::segment`]'s external ids, sorted.
    pub fn segment_external_ids(&self, attribute: &str, value: Option<&str>) -> Vec<String> {
        let mut ids: Vec<String> = self.segment(attribute, value).into_iter().filter_map(|u| u.external_id).collect();
        ids.sort();
        ids
    }

    /// Writes the state file, if there is one.
    pub fn save(&self) -> std::io::Result<()> {
        match &self.shared.state_file {
            Some(path) => save_state(&self.shared, path),
            None => Ok(()),
        }
    }
}

fn router(shared: Arc<Shared>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/partners/{partner}/cohorts", post(name_cohort))
        .route("/partners/{partner}/cohorts/users", post(change_members))
        .route("/sandbox/cohorts", get(admin_cohorts))
        .route("/sandbox/cohort-names", get(admin_cohort_names))
        .route("/sandbox/cohorts/{cohort_id}/members", get(admin_members))
        .route("/sandbox/stats", get(admin_stats).delete(admin_reset_stats))
        .route("/sandbox/requests", get(admin_requests))
        .route("/sandbox/faults", get(admin_faults).put(admin_set_faults))
        .route("/sandbox/users", post(admin_add_users))
        .route("/sandbox/data-import-keys", axum::routing::put(admin_set_keys))
        .route("/sandbox/save", post(admin_save))
        .route("/users/track", post(users_track))
        .route("/sandbox/segment", get(admin_segment))
        .route("/sandbox/users/track/faults", get(admin_track_faults).put(admin_set_track_faults))
        .route("/sandbox/rest-api-keys", axum::routing::put(admin_set_rest_api_keys))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(shared)
}

/// The request was read and the connection is to be closed without an answer.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by fault injection")]
struct DroppedConnection;

async fn accept_loop(listener: TcpListener, router: Router, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => return,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let router = router.clone();
            let shared = shared.clone();
            async move {
                let mut req = req;
                let path = req.uri().path();
                let tracked = path == "/users/track";
                let braze = tracked || path.starts_with("/partners/");
                let _concurrent = braze.then(|| Concurrent::enter(&shared));
                if braze {
                    let faults = if tracked { &shared.track.faults } else { &shared.faults };
                    let decision = faults.lock().decide(now_ms(), rand::random::<f64>);
                    if decision == Decision::Drop {
                        if tracked {
                            shared.track.stats.lock().requests += 1;
                        }
                        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
                        shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        let _ = req.body_mut().collect().await;
                        return Err(DroppedConnection);
                    }
                    req.extensions_mut().insert(decision);
                }
                let response = router.oneshot(req).await.unwrap_or_else(|e: Infallible| match e {});
                Ok::<_, DroppedConnection>(response)
            }
        });
        let builder = builder.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => if let Err(e) = result {
                    debug!(error = %e, "connection closed");
                },
                () = stopped(&mut stop) => {}
            }
        });
    }
}

async fn save_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SAVE_EVERY) => {}
            () = stopped(&mut stop) => return,
        }
        if shared.dirty.load(Ordering::Relaxed)
            && let Some(path) = &shared.state_file
            && let Err(e) = save_state(&shared, path)
        {
            warn!(path = %path.display(), error = %e, "cannot save sandbox state");
        }
    }
}

/// Counts a Braze request as being handled until dropped.
struct Concurrent(Arc<Shared>);

impl Concurrent {
    fn enter(shared: &Arc<Shared>) -> Self {
        let now = shared.counters.concurrent.fetch_add(1, Ordering::Relaxed) + 1;
        shared.counters.max_concurrent.fetch_max(now, Ordering::Relaxed);
        Self(shared.clone())
    }
}

impl Drop for Concurrent {
    fn drop(&mut self) {
        self.0.counters.concurrent.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once shutdown is signalled (or the sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A Braze-style JSON answer.
fn answer(status: u16, message: &str, ratelimit: Option<RateLimitHeaders>, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(serde_json::json!({ "message": message }))).into_response();
    let headers = response.headers_mut();
    if let Some(r) = ratelimit {
        put(headers, "x-ratelimit-limit", r.limit);
        put(headers, "x-ratelimit-remaining", r.remaining);
        put(headers, "x-ratelimit-reset", r.reset);
    }
    if let Some(secs) = retry_after {
        put(headers, "retry-after", secs);
    }
    response
}

fn put(headers: &mut HeaderMap, name: &'static str, value: u64) {
    headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
}

fn fault_message(status: u16) -> &'static str {
    match status {
        423 => "Resource locked",
        429 => "Rate limit exceeded",
        500 => "Internal server error",
        502 => "Bad gateway",
        503 => "Service unavailable",
        504 => "Gateway timeout",
        400 => "Injected fault: bad request",
        _ => "Injected fault",
    }
}

/// How a Braze request was answered, for the counters and the request log.
struct Answered<'a> {
    cohort_id: Option<&'a str>,
    status: u16,
    message: &'a str,
    ids: u64,
    removes: u64,
}

/// A Braze request as it arrived.
struct Received {
    endpoint: Endpoint,
    arrival: u64,
    user_agent: Option<String>,
}

impl Received {
    fn new(shared: &Shared, endpoint: Endpoint, headers: &HeaderMap) -> Self {
        let arrival = shared.counters.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let user_agent = headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
        Received { endpoint, arrival, user_agent }
    }
}

enum Endpoint {
    Name,
    Users,
    Track,
}

impl Endpoint {
    fn path(&self) -> &'static str {
        match self {
            Endpoint::Name => "cohorts",
            Endpoint::Users => "cohorts/users",
            Endpoint::Track => "users/track",
        }
    }
}

impl Shared {
    fn stats(&self) -> Stats {
        let mut track = self.track.stats.lock().clone();
        track.max_requests_in_rate_window = self.track.faults.lock().peak_window_requests();
        Stats {
            max_requests_in_rate_window: self.faults.lock().peak_window_requests(),
            track,
            ..self.counters.snapshot()
        }
    }

    fn reset_stats(&self) {
        self.counters.reset();
        self.faults.lock().reset_peak();
        self.track.faults.lock().reset_peak();
        *self.track.stats.lock() = TrackStats::default();
        self.log.lock().clear();
    }

    fn record(&self, received: &Received, partner: &str, a: Answered<'_>) {
        let Answered { cohort_id, status, message, ids, removes } = a;
        self.counters.status(status);
        let mut log = self.log.lock();
        if log.len() >= REQUEST_LOG_LEN {
            log.pop_front();
        }
        log.push_back(RequestRecord {
            endpoint: received.endpoint.path().to_owned(),
            partner: partner.to_owned(),
            cohort_id: cohort_id.map(str::to_owned),
            status,
            message: message.to_owned(),
            ids,
            removes,
            arrival: received.arrival,
            user_agent: received.user_agent.clone(),
        });
    }

    /// Records how a request was answered, and answers it.
    fn reply(
        &self,
        received: &Received,
        partner: &str,
        ratelimit: Option<RateLimitHeaders>,
        answered: Answered<'_>,
    ) -> Response {
        let response = answer(answered.status, answered.message, ratelimit, None);
        self.record(received, partner, answered);
        response
    }

    /// Applies the fault decision; a faulted request is recorded and its answer is the `Err`.
    async fn admit(
        &self,
        received: &Received,
        partner: &str,
        decision: Option<Extension<Decision>>,
    ) -> Result<Option<RateLimitHeaders>, Response> {
        gate(decision).await.map_err(|(status, response)| {
            let message = fault_message(status);
            self.record(received, partner, Answered { cohort_id: None, status, message, ids: 0, removes: 0 });
            response
        })
    }

    /// Braze's 401 checks, in its order.
    fn authorize(&self, partner: &str, env: &Envelope<'_>) -> Result<(), String> {
        let partner_key = wire::string(env.partner_api_key);
        let known = self
            .partners
            .read()
            .iter()
            .any(|p| p.name == partner && partner_key.as_deref() == Some(p.api_key.as_str()));
        if !known {
            return Err(wire::MSG_INVALID_PARTNER_KEY.to_owned());
        }
        let secret = wire::string(env.client_secret);
        let keys = self.keys.read();
        let Some(key) = keys.iter().find(|k| secret.as_deref() == Some(k.key.as_str())) else {
            return Err(wire::MSG_INVALID_CLIENT_SECRET.to_owned());
        };
        if !key.partners.is_empty() && !key.partners.iter().any(|p| p == partner) {
            // Braze's documented message repeats the key; the sandbox does too, so clients
            // are tested for redacting it.
            return Err(format!("{}{}", wire::MSG_PARTNER_NOT_ENABLED, key.key));
        }
        Ok(())
    }
}

/// Applies the fault decision: `Err` is the faulted answer.
async fn gate(decision: Option<Extension<Decision>>) -> Result<Option<RateLimitHeaders>, (u16, Response)> {
    let decision = decision.map(|Extension(d)| d).unwrap_or(Decision::Pass { delay: Duration::ZERO, ratelimit: None });
    match decision {
        Decision::Pass { delay, ratelimit } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(ratelimit)
        }
        Decision::Fail { status, delay, ratelimit, retry_after } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Err((status, answer(status, fault_message(status), ratelimit, retry_after)))
        }
        Decision::Drop => unreachable!("dropped before routing"),
    }
}

async fn name_cohort(
    State(shared): State<Arc<Shared>>,
    UrlPath(partner): UrlPath<String>,
    decision: Option<Extension<Decision>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Received::new(&shared, Endpoint::Name, &headers);
    shared.counters.name_requests.fetch_add(1, Ordering::Relaxed);
    let ratelimit = match shared.admit(&received, &partner, decision).await {
        Ok(r) => r,
        Err(response) => return response,
    };
    let reply = |status: u16, message: &str, cohort_id: Option<&str>| {
        let answered = Answered { cohort_id, status, message, ids: 0, removes: 0 };
        shared.reply(&received, &partner, ratelimit, answered)
    };
    let env = match Envelope::parse(&body) {
        Ok(env) => env,
        Err(message) => return reply(400, message, None),
    };
    if let Err(message) = shared.authorize(&partner, &env) {
        return reply(401, &message, None);
    }
    let request = match wire::name_request(&env) {
        Ok(r) => r,
        Err(message) => return reply(400, message, wire::string(env.cohort_id).as_deref()),
    };
    {
        let cohort = shared.cohorts.get_or_create(&partner, &request.cohort_id);
        let mut cohort = cohort.lock();
        cohort.name = Some(request.name.clone().into_owned());
        // Braze keeps the first creation time of a cohort; renames do not move it.
        if cohort.created_at.is_none() {
            cohort.created_at = Some(request.created_at.into_owned());
        }
    }
    shared.dirty.store(true, Ordering::Relaxed);
    debug!(partner, cohort_id = %request.cohort_id, name = %request.name, "cohort named");
    reply(201, "success", Some(&request.cohort_id))
}

async fn change_members(
    State(shared): State<Arc<Shared>>,
    UrlPath(partner): UrlPath<String>,
    decision: Option<Extension<Decision>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Received::new(&shared, Endpoint::Users, &headers);
    let c = &shared.counters;
    c.users_requests.fetch_add(1, Ordering::Relaxed);
    let ratelimit = match shared.admit(&received, &partner, decision).await {
        Ok(r) => r,
        Err(response) => return response,
    };
    let reply = |status: u16, message: &str, cohort_id: Option<&str>, ids: u64, removes: u64| {
        let answered = Answered { cohort_id, status, message, ids, removes };
        shared.reply(&received, &partner, ratelimit, answered)
    };
    let env = match Envelope::parse(&body) {
        Ok(env) => env,
        Err(message) => return reply(400, message, None, 0, 0),
    };
    if let Err(message) = shared.authorize(&partner, &env) {
        return reply(401, &message, None, 0, 0);
    }
    let request = match wire::users_request(&env) {
        Ok(r) => r,
        Err(message) => {
            // Count what an oversized request carried, so tests see any limit breach.
            if message == wire::MSG_TOO_MANY_IDS
                && let Ok(changes) =
                    serde_json::from_str::<Vec<wire::ChangeObject<'_>>>(env.cohort_changes.map_or("[]", |r| r.get()))
            {
                let ids: usize = changes.iter().map(wire::ChangeObject::id_count).sum();
                c.max_ids.fetch_max(ids as u64, Ordering::Relaxed);
            }
            return reply(400, message, wire::string(env.cohort_id).as_deref(), 0, 0);
        }
    };
    let ids = request.id_count as u64;
    let removes: u64 = request.changes.iter().filter(|o| o.remove()).map(|o| o.id_count() as u64).sum();
    c.max_ids.fetch_max(ids, Ordering::Relaxed);
    let (resolved, unmatched) = shared.users.read().resolve(&request.changes);
    let (joined, left) = shared.cohorts.get_or_create(&partner, &request.cohort_id).lock().apply(&resolved);
    c.ids_received.fetch_add(ids, Ordering::Relaxed);
    c.removes_received.fetch_add(removes, Ordering::Relaxed);
    c.ids_matched.fetch_add(resolved.len() as u64, Ordering::Relaxed);
    c.ids_unmatched.fetch_add(unmatched, Ordering::Relaxed);
    c.joined.fetch_add(joined, Ordering::Relaxed);
    c.left.fetch_add(left, Ordering::Relaxed);
    if joined + left > 0 {
        shared.dirty.store(true, Ordering::Relaxed);
    }
    reply(201, "success", Some(&request.cohort_id), ids, removes)
}

/// 401 for a missing or unknown key. Braze's errors page lists 401 "Unauthorized: unknown or
/// missing REST API key"; its exact body text is not documented.
pub const MSG_UNKNOWN_REST_KEY: &str = "Unknown or missing REST API key";
/// 403 for a key without the `users.track` permission (Braze's errors page: "Forbidden";
/// the body text is the sandbox's).
pub const MSG_NO_USERS_TRACK: &str = "This REST API key does not have the users.track permission";

impl Shared {
    /// The key of `Authorization: Bearer <key>`, checked: `Err((status, message))`.
    fn authorize_rest(&self, headers: &HeaderMap) -> Result<(), (u16, &'static str)> {
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let keys = self.track.keys.read();
        let key = keys.iter().find(|k| Some(k.key.as_str()) == bearer).ok_or((401, MSG_UNKNOWN_REST_KEY))?;
        if !key.permissions.is_empty() && !key.permissions.iter().any(|p| p == USERS_TRACK) {
            return Err((403, MSG_NO_USERS_TRACK));
        }
        Ok(())
    }
}

async fn users_track(
    State(shared): State<Arc<Shared>>,
    decision: Option<Extension<Decision>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let endpoint = Received::new(&shared, Endpoint::Track, &headers);
    shared.track.stats.lock().requests += 1;
    let ratelimit = match shared.admit(&endpoint, "", decision).await {
        Ok(r) => r,
        Err(response) => return response,
    };
    let reply = |status: u16, message: &str, objects: u64| {
        let answered = Answered { cohort_id: None, status, message, ids: objects, removes: 0 };
        shared.reply(&endpoint, "", ratelimit, answered)
    };
    if let Err((status, message)) = shared.authorize_rest(&headers) {
        return reply(status, message, 0);
    }
    let counted = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("attributes").and_then(|a| a.as_array()).map(|a| a.len() as u64))
        .unwrap_or(0);
    {
        let mut stats = shared.track.stats.lock();
        stats.max_objects_in_request = stats.max_objects_in_request.max(counted);
    }
    let mut request = match track::parse(&body) {
        Ok(r) => r,
        Err(message) => return reply(400, message, counted),
    };
    request.reject(&shared.track.faults.lock().faults.reject_external_ids);
    let objects = request.objects.len() as u64;
    let outcome = {
        let mut users = shared.users.write();
        shared.track.profiles.write().apply(&mut users, request, shared.track.array_limit)
    };
    {
        let mut stats = shared.track.stats.lock();
        stats.objects += objects;
        stats.add(&outcome);
    }
    if outcome.data_points > 0 || outcome.users_created > 0 {
        shared.dirty.store(true, Ordering::Relaxed);
    }
    shared.record(
        &endpoint,
        "",
        Answered { cohort_id: None, status: 201, message: "success", ids: objects, removes: 0 },
    );
    let mut body = serde_json::json!({ "message": "success", "attributes_processed": outcome.processed });
    if !outcome.errors.is_empty() {
        body["errors"] = serde_json::json!(outcome.errors);
    }
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Some(r) = ratelimit {
        let headers = response.headers_mut();
        put(headers, "x-ratelimit-limit", r.limit);
        put(headers, "x-ratelimit-remaining", r.remaining);
        put(headers, "x-ratelimit-reset", r.reset);
    }
    response
}

#[derive(Deserialize)]
struct SegmentQuery {
    attribute: String,
    /// An array attribute "includes value" this; without it, a boolean attribute "is true".
    includes: Option<String>,
}

async fn admin_segment(State(shared): State<Arc<Shared>>, Query(q): Query<SegmentQuery>) -> Json<Vec<SandboxUser>> {
    Json(SandboxHandle { shared }.segment(&q.attribute, q.includes.as_deref()))
}

async fn admin_track_faults(State(shared): State<Arc<Shared>>) -> Json<Faults> {
    Json(SandboxHandle { shared }.track_faults())
}

async fn admin_set_track_faults(State(shared): State<Arc<Shared>>, Json(faults): Json<Faults>) -> Json<Faults> {
    info!(?faults, "users/track faults changed");
    let handle = SandboxHandle { shared };
    handle.set_track_faults(faults);
    Json(handle.track_faults())
}

async fn admin_set_rest_api_keys(State(shared): State<Arc<Shared>>, Json(keys): Json<Vec<RestApiKey>>) -> StatusCode {
    info!(keys = keys.len(), "REST API keys replaced");
    SandboxHandle { shared }.set_rest_api_keys(keys);
    StatusCode::NO_CONTENT
}

async fn admin_cohorts(State(shared): State<Arc<Shared>>) -> Json<Vec<CohortSummary>> {
    Json(SandboxHandle { shared }.cohorts())
}

#[derive(Deserialize)]
struct PartnerQuery {
    partner: Option<String>,
}

async fn admin_cohort_names(State(shared): State<Arc<Shared>>, Query(q): Query<PartnerQuery>) -> Response {
    let handle = SandboxHandle { shared };
    let partners = partner_choice(&handle, q.partner, None);
    match partners {
        Ok(partner) => Json(handle.cohort_names(&partner)).into_response(),
        Err(message) => answer(400, &message, None, None),
    }
}

async fn admin_members(
    State(shared): State<Arc<Shared>>,
    UrlPath(cohort_id): UrlPath<String>,
    Query(q): Query<PartnerQuery>,
) -> Response {
    let handle = SandboxHandle { shared };
    let partner = match partner_choice(&handle, q.partner, Some(&cohort_id)) {
        Ok(p) => p,
        Err(message) => return answer(400, &message, None, None),
    };
    match handle.members(&partner, &cohort_id) {
        Some(members) => Json(members).into_response(),
        None => answer(404, "no such cohort", None, None),
    }
}

/// The partner a query means: the one named, else the only one that fits.
fn partner_choice(handle: &SandboxHandle, named: Option<String>, cohort_id: Option<&str>) -> Result<String, String> {
    if let Some(p) = named {
        return Ok(p);
    }
    let mut partners: Vec<String> = handle
        .cohorts()
        .into_iter()
        .filter(|c| cohort_id.is_none_or(|id| c.cohort_id == id))
        .map(|c| c.partner)
        .collect();
    partners.dedup();
    match partners.len() {
        0 => Ok(String::new()),
        1 => Ok(partners.remove(0)),
        _ => Err(format!("several partners match ({}); add ?partner=NAME", partners.join(", "))),
    }
}

async fn admin_stats(State(shared): State<Arc<Shared>>) -> Json<Stats> {
    Json(shared.stats())
}

async fn admin_reset_stats(State(shared): State<Arc<Shared>>) -> StatusCode {
    SandboxHandle { shared }.reset_stats();
    StatusCode::NO_CONTENT
}

async fn admin_requests(State(shared): State<Arc<Shared>>) -> Json<Vec<RequestRecord>> {
    Json(SandboxHandle { shared }.requests())
}

async fn admin_faults(State(shared): State<Arc<Shared>>) -> Json<Faults> {
    Json(SandboxHandle { shared }.faults())
}

async fn admin_set_faults(State(shared): State<Arc<Shared>>, Json(faults): Json<Faults>) -> Json<Faults> {
    info!(?faults, "faults changed");
    let handle = SandboxHandle { shared };
    handle.set_faults(faults);
    Json(handle.faults())
}

async fn admin_add_users(
    State(shared): State<Arc<Shared>>,
    Json(users): Json<Vec<SandboxUser>>,
) -> Json<serde_json::Value> {
    let total = SandboxHandle { shared }.add_users(users);
    Json(serde_json::json!({ "users": total }))
}

async fn admin_set_keys(State(shared): State<Arc<Shared>>, Json(keys): Json<Vec<DataImportKey>>) -> StatusCode {
    info!(keys = keys.len(), "data import keys replaced");
    SandboxHandle { shared }.set_data_import_keys(keys);
    StatusCode::NO_CONTENT
}

async fn admin_save(State(shared): State<Arc<Shared>>) -> Response {
    match (SandboxHandle { shared }).save() {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => answer(500, &e.to_string(), None, None),
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    users: Vec<SandboxUser>,
    cohorts: Vec<SavedCohort>,
    /// Custom attributes by index into `users`.
    #[serde(default)]
    attributes: Vec<(u32, BTreeMap<String, serde_json::Value>)>,
}

fn load_profiles(path: &Path, profiles: &mut Profiles) -> Result<(), SandboxError> {
    let text = std::fs::read(path).map_err(|source| SandboxError::StateFile { path: path.to_owned(), source })?;
    let state: StateFile =
        serde_json::from_slice(&text).map_err(|source| SandboxError::StateFormat { path: path.to_owned(), source })?;
    for (user, attributes) in state.attributes {
        profiles.insert(user, attributes);
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct SavedCohort {
    partner: String,
    cohort_id: String,
    name: Option<String>,
    created_at: Option<String>,
    /// Indices into `users`.
    members: Vec<u32>,
}

fn load_state(path: &Path, users: &mut Users, cohorts: &Cohorts) -> Result<(), SandboxError> {
    let text = std::fs::read(path).map_err(|source| SandboxError::StateFile { path: path.to_owned(), source })?;
    let state: StateFile =
        serde_json::from_slice(&text).map_err(|source| SandboxError::StateFormat { path: path.to_owned(), source })?;
    *users = Users::from_records(state.users);
    for saved in state.cohorts {
        let cohort = cohorts.get_or_create(&saved.partner, &saved.cohort_id);
        let mut cohort = cohort.lock();
        cohort.name = saved.name;
        cohort.created_at = saved.created_at;
        cohort.members = saved.members.into_iter().filter(|&i| (i as usize) < users.len()).collect();
    }
    info!(path = %path.display(), users = users.len(), "sandbox state loaded");
    Ok(())
}

fn save_state(shared: &Shared, path: &Path) -> std::io::Result<()> {
    shared.dirty.store(false, Ordering::Relaxed);
    let users = shared.users.read().records().to_vec();
    let cohorts = shared
        .cohorts
        .all()
        .into_iter()
        .map(|(partner, cohort_id, c)| {
            let c = c.lock();
            let mut members: Vec<u32> = c.members.iter().copied().collect();
            members.sort_unstable();
            SavedCohort { partner, cohort_id, name: c.name.clone(), created_at: c.created_at.clone(), members }
        })
        .collect();
    let attributes = shared.track.profiles.read().all().map(|(u, a)| (u, a.clone())).collect();
    let bytes = serde_json::to_vec(&StateFile { users, cohorts, attributes }).map_err(std::io::Error::other)?;
    // Write beside and rename, so a crash never leaves half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
