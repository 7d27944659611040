//! The HTTP side: one keep-alive connection pool, bounded requests in flight, retries.

use std::collections::BTreeMap;
use std::ops::Range;
use std::pin::pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, FuturesUnordered, Stream, StreamExt};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Request, Url};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::attributes::{self, MembershipAttribute, Rejected, TrackBody};
use super::batch::{Batch, Change, IdCounts, MAX_IDS_PER_REQUEST, Packer};
use super::budget::{Budget, BudgetConfig, Budgets, LimitSignal};
use super::error::{BrazeError, TransientFailure, UnauthorizedReason};
use super::retry::{Disposition, RetryDelay, RetryPolicy, classify, is_rate_limited, server_wait_hint};
use super::wire::{self, NameBody, READ_BODY_BYTES, ResponseText, UsersBody};
use crate::fence::{Fence, Fenced};
use crate::net::HttpClient;
use crate::net::egress::{EgressPolicy, denied_in};
use crate::secret::{SecretString, error_chain, redact};

/// Tuning of a [`BrazeClient`].
#[derive(Clone, Debug)]
pub struct BrazeClientConfig {
    /// Requests of one run on the wire at once (after the first one succeeded).
    pub max_in_flight: usize,
    /// Identifiers per request; clamped to Braze's 1,000.
    pub max_ids_per_request: usize,
    /// Deadline of one attempt, from sending to the end of the answer.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub retry: RetryPolicy,
    /// Where requests may go: the operator's egress policy. `restEndpoint` is a tenant's to
    /// write, so it is held to the same rules as a source URL.
    pub egress: Arc<EgressPolicy>,
    /// This replica (its `--identity`, the pod name), named in the `User-Agent`: which
    /// replica sent a request is then plain in Braze's (and a sandbox's) logs.
    pub instance: Option<String>,
}

impl Default for BrazeClientConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 8,
            max_ids_per_request: MAX_IDS_PER_REQUEST,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            egress: EgressPolicy::shared_default(),
            instance: None,
        }
    }
}

/// One Braze cohort and the keys to reach it.
#[derive(Clone, Debug)]
pub struct CohortTarget {
    /// The customer's REST endpoint, e.g. `https://rest.iad-01.braze.com`.
    pub rest_endpoint: String,
    /// How membership gets there, with the keys it takes.
    pub delivery: Delivery,
    pub cohort_id: String,
}

/// How membership reaches Braze (`spec.destination.braze.method`).
#[derive(Clone, Debug)]
pub enum Delivery {
    /// The partner cohort import API (`method: CohortImport`).
    CohortImport {
        /// The partner path segment.
        partner: String,
        /// Braze's key for the partner (`partner_api_key`); picked by cluster.
        partner_api_key: SecretString,
        /// The customer's data import key (`client_secret`).
        data_import_key: SecretString,
    },
    /// A custom attribute through `/users/track` (`method: Attribute`).
    Attribute {
        /// The customer's REST API key, with the `users.track` permission.
        api_key: SecretString,
        attribute: MembershipAttribute,
    },
}

impl CohortTarget {
    /// A target of the partner cohort import API.
    pub fn partner(
        rest_endpoint: impl Into<String>,
        partner: impl Into<String>,
        partner_api_key: SecretString,
        data_import_key: SecretString,
        cohort_id: impl Into<String>,
    ) -> Self {
        let delivery = Delivery::CohortImport { partner: partner.into(), partner_api_key, data_import_key };
        Self { rest_endpoint: rest_endpoint.into(), delivery, cohort_id: cohort_id.into() }
    }

    /// A target written as a custom attribute through `/users/track`.
    pub fn attribute(
        rest_endpoint: impl Into<String>,
        api_key: SecretString,
        attribute: MembershipAttribute,
        cohort_id: impl Into<String>,
    ) -> Self {
        let delivery = Delivery::Attribute { api_key, attribute };
        Self { rest_endpoint: rest_endpoint.into(), delivery, cohort_id: cohort_id.into() }
    }

    /// The URL of a partner endpoint (`tail` after `partners/{partner}/`), or of
    /// `/users/track` for an attribute (`tail` is then ignored).
    fn url(&self, tail: &str) -> Result<Url, BrazeError> {
        let base = self.rest_endpoint.trim_end_matches('/');
        let text = match &self.delivery {
            Delivery::CohortImport { partner, .. } => format!("{base}/partners/{partner}/{tail}"),
            Delivery::Attribute { .. } => format!("{base}/users/track"),
        };
        let url = Url::parse(&text)
            .map_err(|e| BrazeError::InvalidRequest(format!("REST endpoint {:?}: {e}", self.rest_endpoint)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(BrazeError::InvalidRequest(format!(
                "REST endpoint {:?} is not an http(s) URL",
                self.rest_endpoint
            )));
        }
        Ok(url)
    }

    fn secrets(&self) -> Vec<&str> {
        match &self.delivery {
            Delivery::CohortImport { partner_api_key, data_import_key, .. } => {
                vec![partner_api_key.expose(), data_import_key.expose()]
            }
            Delivery::Attribute { api_key, .. } => vec![api_key.expose()],
        }
    }

    /// Identifiers per request this delivery allows.
    pub fn max_per_request(&self, configured: usize) -> usize {
        match self.delivery {
            Delivery::CohortImport { .. } => configured,
            Delivery::Attribute { .. } => configured.min(attributes::MAX_OBJECTS_PER_REQUEST),
        }
    }
}

/// The result of one request (a batch of changes, or a naming).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutcome {
    /// Request number within the run, from 0.
    pub seq: u64,
    /// Positions in the input of the changes it carried (empty for a naming).
    pub changes: Range<u64>,
    pub adds: IdCounts,
    pub removes: IdCounts,
    pub attempts: u32,
    /// The status of the last answer; `None` when the last attempt got none.
    pub status: Option<u16>,
    /// `None`: Braze accepted the request.
    pub error: Option<BrazeError>,
    /// Objects of an accepted `/users/track` request Braze listed in `errors`.
    pub rejected: Rejected,
    /// The last answer's body and message (keys redacted, truncated).
    pub response: ResponseText,
    pub elapsed: Duration,
    /// Time spent waiting for the destination's budget (included in `elapsed`).
    pub budget_wait: Duration,
}

impl RequestOutcome {
    pub fn accepted(&self) -> bool {
        self.error.is_none()
    }
}

/// What one `send_changes` run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangesReport {
    /// Every request, by `seq`.
    pub requests: Vec<RequestOutcome>,
    /// Batches sent but not accepted, with their members: leave them out of "what Braze has".
    pub unaccepted: Vec<Batch>,
    /// Input positions from here on were never sent (the input may have ended before).
    /// Every position below it is in exactly one request.
    pub unsent_from: u64,
    pub totals: ChangesTotals,
    /// Why the run stopped early: the first request that failed for good. `None` when every
    /// change of the input was accepted.
    pub stopped: Option<BrazeError>,
}

impl ChangesReport {
    /// Every change of the input was accepted.
    pub fn is_complete(&self) -> bool {
        self.stopped.is_none()
    }

    /// Whether the change at input `position` was accepted by Braze.
    pub fn accepted(&self, position: u64) -> bool {
        if position >= self.unsent_from {
            return false;
        }
        let i = self.requests.partition_point(|r| r.changes.end <= position);
        self.requests.get(i).is_some_and(|r| r.changes.contains(&position) && r.accepted())
    }
}

/// Run counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangesTotals {
    /// Requests started, each counted once however many attempts it took.
    pub requests: u32,
    pub accepted_requests: u32,
    pub failed_requests: u32,
    /// HTTP attempts, retries included.
    pub attempts: u32,
    pub retries: u32,
    /// Identifiers in accepted requests (Braze does not say how many matched a user),
    /// less the objects it rejected.
    pub added: u64,
    pub removed: u64,
    /// Objects of accepted requests Braze rejected (`/users/track`'s `errors`), by reason.
    pub rejected: Rejected,
    /// Identifiers in requests sent but not accepted.
    pub unaccepted_adds: u64,
    pub unaccepted_removes: u64,
    /// Answers by HTTP status, every attempt counted.
    pub responses_by_status: BTreeMap<u16, u32>,
    pub timeouts: u32,
    pub connection_errors: u32,
    /// Accepted answers that listed non-fatal `errors`.
    pub accepted_with_errors: u32,
    /// 429s absorbed by waiting for the destination's budget (also in `retries`; they do
    /// not use up the retry budget or a request's attempts).
    pub rate_limited: u32,
    /// Wall-clock time during which at least one request waited for budget.
    pub budget_wait: Duration,
}

/// Braze's partner cohort import API. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct BrazeClient {
    http: HttpClient,
    config: BrazeClientConfig,
    /// Shared by clones, and by every run of a destination.
    budgets: Arc<Budgets>,
    /// Checked before every attempt; an attempt still waiting at its deadline is dropped.
    fence: Fence,
}

/// Shared by the requests of one run.
struct RunState {
    budget: u32,
    retries_left: AtomicU32,
    stop: watch::Sender<bool>,
    by_status: Mutex<BTreeMap<u16, u32>>,
    timeouts: AtomicU32,
    connection_errors: AtomicU32,
    rate_limited: AtomicU32,
    waiting: Mutex<WaitClock>,
}

/// Wall-clock time during which at least one request of a run waited for budget.
#[derive(Default)]
struct WaitClock {
    waiting: usize,
    since: Option<Instant>,
    total: Duration,
}

impl RunState {
    fn new(budget: u32) -> Self {
        Self {
            budget,
            retries_left: AtomicU32::new(budget),
            stop: watch::Sender::new(false),
            by_status: Mutex::default(),
            timeouts: AtomicU32::new(0),
            connection_errors: AtomicU32::new(0),
            rate_limited: AtomicU32::new(0),
            waiting: Mutex::default(),
        }
    }

    fn wait_clock(&self) -> std::sync::MutexGuard<'_, WaitClock> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_waiting(&self) {
        let mut clock = self.wait_clock();
        clock.waiting += 1;
        clock.since.get_or_insert_with(Instant::now);
    }

    fn stop_waiting(&self) {
        let mut clock = self.wait_clock();
        clock.waiting -= 1;
        if clock.waiting == 0
            && let Some(since) = clock.since.take()
        {
            clock.total += since.elapsed();
        }
    }

    fn budget_wait(&self) -> Duration {
        let clock = self.wait_clock();
        clock.total + clock.since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    fn take_retry(&self) -> bool {
        self.retries_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn count_status(&self, status: u16) {
        let mut map = self.by_status.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(status).or_default() += 1;
    }
}

/// One request after all its attempts.
struct Attempted {
    attempts: u32,
    status: Option<u16>,
    response: ResponseText,
    error: Option<BrazeError>,
    budget_wait: Duration,
    /// Objects an accepted `/users/track` answer listed in `errors`.
    rejected: Rejected,
}

/// Ends a request's wait for budget in its run's wait clock, however the wait ends.
struct Waiting<'a>(&'a RunState);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.stop_waiting();
    }
}

impl Attempted {
    /// Refused before any attempt.
    fn refused(error: BrazeError) -> Self {
        Attempted {
            attempts: 0,
            status: None,
            response: ResponseText::default(),
            error: Some(error),
            budget_wait: Duration::ZERO,
            rejected: Rejected::default(),
        }
    }
}

impl BrazeClient {
    pub fn new(config: BrazeClientConfig) -> Result<Self, BrazeError> {
        // A redirected POST turns into a GET: no redirect is followed (the 3xx is reported).
        let http = HttpClient::builder(&config.egress)
            .user_agent(user_agent(config.instance.as_deref()))
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(config.max_in_flight.max(1))
            .build()
            .map_err(|e| BrazeError::InvalidRequest(format!("cannot set up the HTTP client: {e}")))?;
        let budgets = Arc::new(Budgets::new(BudgetConfig::default()));
        Ok(Self { http, config, budgets, fence: Fence::unfenced() })
    }

    /// Sends only while `fence` is open (the leader's Lease, see [`crate::fence`]).
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// The Lease (`namespace/name`) whose fence it sends under, if any (leader election).
    pub fn fenced_by(&self) -> Option<&str> {
        self.fence.lease()
    }

    /// Draws requests from `budgets` (the operator's `--braze-requests-per-hour` and
    /// `--braze-burst`) instead of a default budget of its own.
    pub fn with_budgets(mut self, budgets: Arc<Budgets>) -> Self {
        self.budgets = budgets;
        self
    }

    pub fn config(&self) -> &BrazeClientConfig {
        &self.config
    }

    pub fn budgets(&self) -> &Arc<Budgets> {
        &self.budgets
    }

    fn budget(&self, target: &CohortTarget) -> Arc<Budget> {
        match &target.delivery {
            Delivery::CohortImport { partner, data_import_key, .. } => {
                self.budgets.get(self.budgets.destination(&target.rest_endpoint, partner, data_import_key.expose()))
            }
            // `/users/track` has limits of its own (per workspace, so per REST API key).
            Delivery::Attribute { api_key, .. } => {
                let destination = self.budgets.destination(&target.rest_endpoint, "users/track", api_key.expose());
                self.budgets.get_with(destination, &attributes::users_track_budget(self.budgets.config()))
            }
        }
    }

    /// Waits for a token of `budget`; fails when the run stops or the wait is too long.
    async fn wait_for_budget(
        &self,
        budget: &Budget,
        run: &RunState,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Duration, BrazeError> {
        let max_wait = self.budgets.config().max_wait;
        run.start_waiting();
        let _waiting = Waiting(run);
        let waited = tokio::select! {
            waited = budget.acquire_handing_over() => Ok(waited),
            () = tokio::time::sleep(max_wait) => Err(BrazeError::RateLimited { wait: max_wait, max_wait }),
            _ = stop.wait_for(|stopped| *stopped) => return Err(BrazeError::Abandoned),
        };
        self.budgets.waited(*waited.as_ref().unwrap_or(&max_wait));
        waited
    }

    /// Creates or renames the cohort (`POST …/cohorts`); Braze treats it as an upsert by
    /// `cohort_id`. Retried like membership changes, with a budget of its own.
    pub async fn name_cohort(
        &self,
        target: &CohortTarget,
        name: &str,
        created_at: jiff::Timestamp,
    ) -> Result<RequestOutcome, BrazeError> {
        if name.trim().is_empty() {
            return Err(BrazeError::InvalidRequest("the cohort name is empty".into()));
        }
        if target.cohort_id.is_empty() {
            return Err(BrazeError::InvalidRequest("the cohort id is empty".into()));
        }
        let Delivery::CohortImport { partner, partner_api_key, data_import_key } = &target.delivery else {
            return Err(BrazeError::InvalidRequest("an attribute destination has no cohort to name".into()));
        };
        let url = target.url("cohorts")?;
        let created_at = created_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let body = serde_json::to_vec(&NameBody {
            partner_api_key: partner_api_key.expose(),
            client_secret: data_import_key.expose(),
            cohort_id: &target.cohort_id,
            name,
            created_at: &created_at,
        })
        .map_err(|e| BrazeError::InvalidRequest(format!("cannot encode the request: {e}")))?;
        let run = RunState::new(self.config.retry.run_retry_budget);
        let started = Instant::now();
        let done = self.execute(target, url, body, &run, (0, (0, 0))).await;
        let outcome = RequestOutcome {
            seq: 0,
            changes: 0..0,
            adds: IdCounts::default(),
            removes: IdCounts::default(),
            attempts: done.attempts,
            status: done.status,
            error: done.error.clone(),
            rejected: Rejected::default(),
            response: done.response,
            elapsed: started.elapsed(),
            budget_wait: done.budget_wait,
        };
        match done.error {
            None => {
                info!(cohort_id = %target.cohort_id, %partner, attempts = outcome.attempts, "Braze cohort named");
                Ok(outcome)
            }
            Some(error) => Err(error),
        }
    }

    /// Sends membership changes, packed into requests of at most 1,000 identifiers.
    /// See [`Self::send_changes_with`].
    pub async fn send_changes<S>(&self, target: &CohortTarget, changes: S) -> ChangesReport
    where
        S: Stream<Item = Change>,
    {
        self.send_changes_with(target, changes, |_, _| {}).await
    }

    /// Sends membership changes and calls `on_request` as each request finishes (in
    /// completion order), with the batch it carried, so a caller can checkpoint accepted
    /// changes as they land.
    ///
    /// The first request goes alone, so wrong keys cost one request; then up to
    /// `max_in_flight` go at once. The input is read only as fast as requests go out. The
    /// first request that fails for good (400, 401, retries used up…) stops the run: no
    /// further input is read, no new request starts, requests waiting to retry give up, and
    /// requests already on the wire finish. Each member should appear at most once in the
    /// input (a diff guarantees it): requests of a run may land in any order.
    pub async fn send_changes_with<S, F>(&self, target: &CohortTarget, changes: S, mut on_request: F) -> ChangesReport
    where
        S: Stream<Item = Change>,
        F: FnMut(&Batch, &RequestOutcome),
    {
        let mut report = ChangesReport::default();
        let url = match target.url("cohorts/users") {
            Ok(url) => url,
            Err(e) => {
                report.stopped = Some(e);
                return report;
            }
        };
        if target.cohort_id.is_empty() {
            report.stopped = Some(BrazeError::InvalidRequest("the cohort id is empty".into()));
            return report;
        }
        let run = RunState::new(self.config.retry.run_retry_budget);
        let batches = pin!(batches(changes, target.max_per_request(self.config.max_ids_per_request)));
        let mut batches = batches.fuse();
        let mut in_flight = FuturesUnordered::new();
        // Slow start: one request until Braze has accepted one.
        let mut limit = 1;
        let mut input_done = false;
        let max_in_flight = self.config.max_in_flight.max(1);
        loop {
            let may_send = report.stopped.is_none() && !input_done && in_flight.len() < limit;
            if !may_send && in_flight.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some((batch, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                    on_request(&batch, &outcome);
                    if outcome.accepted() {
                        limit = max_in_flight;
                    } else {
                        if report.stopped.is_none() {
                            report.stopped = outcome.error.clone();
                            run.stop();
                        }
                        report.unaccepted.push(batch);
                    }
                    report.requests.push(outcome);
                }
                next = batches.next(), if may_send => match next {
                    Some(batch) => {
                        report.unsent_from = batch.changes().end;
                        in_flight.push(self.send_batch(target, &url, batch, &run));
                    }
                    None => input_done = true,
                },
            }
        }
        report.requests.sort_by_key(|r| r.seq);
        report.unaccepted.sort_by_key(|b| b.seq);
        report.totals = totals(&report.requests, &run);
        let t = &report.totals;
        match &report.stopped {
            None => info!(
                cohort_id = %target.cohort_id, requests = t.requests, added = t.added,
                removed = t.removed, retries = t.retries, "Braze accepted every change"
            ),
            Some(error) => warn!(
                cohort_id = %target.cohort_id, requests = t.requests, added = t.added,
                removed = t.removed, unaccepted_adds = t.unaccepted_adds,
                unaccepted_removes = t.unaccepted_removes, unsent_from = report.unsent_from,
                %error, "Braze import stopped early"
            ),
        }
        report
    }

    async fn send_batch(
        &self,
        target: &CohortTarget,
        url: &Url,
        batch: Batch,
        run: &RunState,
    ) -> (Batch, RequestOutcome) {
        let started = Instant::now();
        let mut body = Vec::with_capacity(256 + batch.len() * 96);
        let encoded = match &target.delivery {
            Delivery::CohortImport { partner_api_key, data_import_key, .. } => serde_json::to_writer(
                &mut body,
                &UsersBody {
                    partner_api_key: partner_api_key.expose(),
                    client_secret: data_import_key.expose(),
                    cohort_id: &target.cohort_id,
                    batch: &batch,
                },
            ),
            Delivery::Attribute { attribute, .. } => {
                serde_json::to_writer(&mut body, &TrackBody { attribute, cohort_id: &target.cohort_id, batch: &batch })
            }
        };
        let done = match encoded {
            Ok(()) => {
                let objects = (batch.len() as u64, batch.removes.len() as u64);
                self.execute(target, url.clone(), body, run, (batch.seq, objects)).await
            }
            Err(e) => Attempted::refused(BrazeError::InvalidRequest(format!("cannot encode the request: {e}"))),
        };
        let outcome = RequestOutcome {
            seq: batch.seq,
            changes: batch.changes(),
            adds: batch.add_counts,
            removes: batch.remove_counts,
            attempts: done.attempts,
            status: done.status,
            error: done.error,
            rejected: done.rejected,
            response: done.response,
            elapsed: started.elapsed(),
            budget_wait: done.budget_wait,
        };
        debug!(
            cohort_id = %target.cohort_id, seq = outcome.seq, ids = batch.len(),
            status = outcome.status, attempts = outcome.attempts,
            accepted = outcome.accepted(), "Braze request finished"
        );
        (batch, outcome)
    }

    /// One attempt's request. Its body goes to the connection only while the fence is open
    /// ([`Fence::body`]): checked again once the connection is made and ready to write.
    fn request(&self, url: &Url, body: &bytes::Bytes, bearer: Option<&HeaderValue>) -> Request {
        let mut request = Request::new(reqwest::Method::POST, url.clone());
        request.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(bearer) = bearer {
            request.headers_mut().insert(AUTHORIZATION, bearer.clone());
        }
        *request.timeout_mut() = Some(self.config.request_timeout);
        *request.body_mut() = Some(self.fence.body(body.clone()));
        request
    }

    /// Sends one request until it is accepted, fails for good, or retrying must stop.
    /// `objects`: a `/users/track` batch's objects and removals, to read per-object errors.
    async fn execute(
        &self,
        target: &CohortTarget,
        url: Url,
        body: Vec<u8>,
        run: &RunState,
        (seq, objects): (u64, (u64, u64)),
    ) -> Attempted {
        let body = bytes::Bytes::from(body);
        let bearer = match bearer(target) {
            Ok(bearer) => bearer,
            Err(error) => return Attempted::refused(error),
        };
        let mut stop = run.stop.subscribe();
        let budget = self.budget(target);
        let mut tries = Tries::default();
        loop {
            match self.wait_for_budget(&budget, run, &mut stop).await {
                Ok(wait) => tries.waited += wait,
                Err(error) => return tries.end_with_last(error),
            }
            // The fence, last thing before the wire: a request waits (for budget, for a
            // retry) but never starts, nor stays in flight, past the leader's deadline.
            if let Err(fenced) = self.fence.check() {
                return tries.end_with_last(fenced.into());
            }
            tries.attempts += 1;
            let sending = match self.http.execute(self.request(&url, &body, bearer.as_ref())) {
                Ok(sending) => sending,
                Err(denied) => return tries.end_unanswered(BrazeError::EgressDenied(denied.to_string())),
            };
            let sent = match self.fence.bounded(sending).await {
                Ok(sent) => sent,
                Err(fenced) => return tries.end_unanswered(fenced.into()),
            };
            let failed = match sent {
                Ok(resp) => match self.answered(resp, target, run, &budget, (seq, objects)).await {
                    Answer::Done { status, response, error, rejected } => {
                        return Attempted { status: Some(status), response, error, rejected, ..tries.attempted() };
                    }
                    Answer::Retry(failed) => failed,
                },
                Err(e) => match self.not_answered(&e, target, run) {
                    Ok(failed) => failed,
                    Err(error) => return tries.end_unanswered(error),
                },
            };
            if let Some(ended) = self.before_retry(&mut tries, failed, target, run, seq, &mut stop).await {
                return ended;
            }
        }
    }

    /// What Braze's answer means for this request: done (accepted or refused for good), or
    /// a failure to retry. Braze's window state is read from it on the way.
    async fn answered(
        &self,
        resp: reqwest::Response,
        target: &CohortTarget,
        run: &RunState,
        budget: &Budget,
        (seq, objects): (u64, (u64, u64)),
    ) -> Answer {
        let secrets = target.secrets();
        let status = resp.status().as_u16();
        run.count_status(status);
        // Braze's window state counts from an accepted answer or a rate limit; the headers of
        // a 5xx (often a proxy's) must not stretch its own backoff.
        let remaining = resp.headers().get("x-ratelimit-remaining").and_then(|v| v.to_str().ok());
        if (200..300).contains(&status) || is_rate_limited(status, remaining) {
            let signal = LimitSignal::read(status, resp.headers(), jiff::Timestamp::now());
            let policy = &self.config.retry;
            budget.observe(signal, |n| policy.backoff(n, 0.5 + rand::random::<f64>() / 2.0));
        }
        let hint = wait_hint(status, resp.headers());
        let bytes = read_body(resp).await;
        let response = wire::read_response(&bytes, &secrets);
        match classify(status) {
            Disposition::Accepted => {
                if response.has_errors {
                    warn!(cohort_id = %target.cohort_id, seq, status, body = %response.body, "Braze accepted the request but listed errors");
                }
                let rejected = match target.delivery {
                    Delivery::Attribute { .. } => attributes::rejected_objects(&bytes, objects.0, objects.1, &secrets),
                    Delivery::CohortImport { .. } => Rejected::default(),
                };
                Answer::Done { status, response, error: None, rejected }
            }
            Disposition::Permanent => {
                let error = permanent_error(status, &response, &target.delivery);
                warn!(cohort_id = %target.cohort_id, seq, status, %error, "Braze refused the request");
                Answer::Done { status, response, error: Some(error), rejected: Rejected::default() }
            }
            Disposition::Retry => {
                let message = response.message.clone();
                let failure = TransientFailure::Status { status, message };
                Answer::Retry(Failed { status: Some(status), response, failure, hint })
            }
        }
    }

    /// A request that got no answer: a failure to retry, or (`Err`) one no retry changes.
    fn not_answered(&self, e: &reqwest::Error, target: &CohortTarget, run: &RunState) -> Result<Failed, BrazeError> {
        // The endpoint's name resolves only to denied addresses: no retry changes that.
        if let Some(denied) = denied_in(e) {
            return Err(BrazeError::EgressDenied(denied.to_string()));
        }
        // Refused at the wire: the fence closed before the body was handed over.
        if !self.fence.is_open() {
            return Err(Fenced.into());
        }
        let failure = if e.is_timeout() {
            run.timeouts.fetch_add(1, Ordering::Relaxed);
            TransientFailure::Timeout(self.config.request_timeout)
        } else {
            run.connection_errors.fetch_add(1, Ordering::Relaxed);
            TransientFailure::Connection(redact(&error_chain(e), &target.secrets(), wire::REDACT_MIN_LEN))
        };
        Ok(Failed { status: None, response: ResponseText::default(), failure, hint: None })
    }

    /// After `failed`: the request's end (`Some`), or `None` once it may go again — at once
    /// for a 429 (it waits for the destination's budget like every other request, without
    /// using up an attempt or the run's retries), else after the policy's delay.
    async fn before_retry(
        &self,
        tries: &mut Tries,
        failed: Failed,
        target: &CohortTarget,
        run: &RunState,
        seq: u64,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<Attempted> {
        let policy = &self.config.retry;
        let Failed { status, response, failure, hint } = failed;
        let give_up = |tries: &Tries, error| {
            Some(Attempted { status, response: response.clone(), error: Some(error), ..tries.attempted() })
        };
        if run.stopped() {
            return give_up(tries, BrazeError::Abandoned);
        }
        if status == Some(429) {
            // A wait past what the policy accepts stops the run at once (the next run sends
            // the rest) instead of holding it for Braze's hour.
            if let Some(wait) = hint.filter(|wait| *wait > policy.max_server_wait) {
                return give_up(tries, BrazeError::RateLimited { wait, max_wait: policy.max_server_wait });
            }
            tries.limited += 1;
            run.rate_limited.fetch_add(1, Ordering::Relaxed);
            let cohort_id = &target.cohort_id;
            warn!(%cohort_id, seq, attempt = tries.attempts, "Braze rate limit; waiting for the destination's budget");
            tries.last = (status, response);
            return None;
        }
        if tries.attempts - tries.limited >= policy.max_attempts {
            return give_up(tries, BrazeError::AttemptsExhausted { attempts: tries.attempts, last: failure });
        }
        let delay = match policy.delay(tries.attempts, hint, rand::random::<f64>()) {
            RetryDelay::Wait(delay) => delay,
            RetryDelay::TooLong(wait) => {
                return give_up(tries, BrazeError::RateLimited { wait, max_wait: policy.max_server_wait });
            }
        };
        if !run.take_retry() {
            return give_up(tries, BrazeError::RetryBudgetExhausted { budget: run.budget, last: failure });
        }
        warn!(cohort_id = %target.cohort_id, seq, attempt = tries.attempts, %failure, ?delay, "Braze request failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(delay) => None,
            _ = stop.wait_for(|stopped| *stopped) => give_up(tries, BrazeError::Abandoned),
        }
    }
}

/// One request's attempts so far.
#[derive(Default)]
struct Tries {
    attempts: u32,
    /// 429s answered so far: they wait for the budget instead of using up attempts.
    limited: u32,
    waited: Duration,
    /// The last answer, for a request that ends while waiting for budget again.
    last: (Option<u16>, ResponseText),
}

impl Tries {
    /// The request's end so far: no answer, no error, nothing rejected.
    fn attempted(&self) -> Attempted {
        Attempted {
            attempts: self.attempts,
            status: None,
            response: ResponseText::default(),
            error: None,
            budget_wait: self.waited,
            rejected: Rejected::default(),
        }
    }

    /// Ends with `error`, keeping the last answer (a request stopped while it waited).
    fn end_with_last(self, error: BrazeError) -> Attempted {
        let (status, response) = self.last.clone();
        Attempted { status, response, error: Some(error), ..self.attempted() }
    }

    /// Ends with `error` on an attempt that got no answer.
    fn end_unanswered(&self, error: BrazeError) -> Attempted {
        Attempted { error: Some(error), ..self.attempted() }
    }
}

/// What an answer means for its request.
enum Answer {
    /// Accepted (with what it rejected) or refused for good.
    Done {
        status: u16,
        response: ResponseText,
        error: Option<BrazeError>,
        rejected: Rejected,
    },
    Retry(Failed),
}

/// An attempt that may be tried again.
struct Failed {
    status: Option<u16>,
    response: ResponseText,
    failure: TransientFailure,
    /// Braze's own wait (`Retry-After`, the rate-limit reset), if it named one.
    hint: Option<Duration>,
}

/// `cohort-operator/<version>`, with ` (<instance>)` when it is a plain name (a pod name
/// is); anything else is left out rather than put in a header.
/// The `Authorization` header of a `/users/track` request (the customer's REST API key);
/// none for the partner endpoints, whose keys go in the body.
fn bearer(target: &CohortTarget) -> Result<Option<HeaderValue>, BrazeError> {
    let Delivery::Attribute { api_key, .. } = &target.delivery else { return Ok(None) };
    let mut bearer = HeaderValue::from_str(&format!("Bearer {}", api_key.expose()))
        .map_err(|_| BrazeError::InvalidRequest("the REST API key is not a valid header value".into()))?;
    bearer.set_sensitive(true);
    Ok(Some(bearer))
}

fn user_agent(instance: Option<&str>) -> String {
    let product = concat!("cohort-operator/", env!("CARGO_PKG_VERSION"));
    let plain = |name: &&str| {
        !name.is_empty() && name.len() <= 253 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    };
    match instance.filter(plain) {
        Some(name) => format!("{product} ({name})"),
        None => product.to_owned(),
    }
}

/// Batches of the input, read only when the next one is wanted.
fn batches<S: Stream<Item = Change>>(changes: S, max_ids: usize) -> impl Stream<Item = Batch> {
    let state = (Box::pin(changes), Packer::new(max_ids), false);
    stream::unfold(state, |(mut changes, mut packer, done)| async move {
        if done {
            return None;
        }
        loop {
            match changes.next().await {
                Some(change) => {
                    if let Some(batch) = packer.push(change) {
                        return Some((batch, (changes, packer, false)));
                    }
                }
                None => {
                    return packer.finish().map(|batch| (batch, (changes, packer, true)));
                }
            }
        }
    })
}

/// Braze's wait hint, only when the answer is a rate limit ([`is_rate_limited`]): other
/// retryable answers back off on their own schedule.
fn wait_hint(status: u16, headers: &HeaderMap) -> Option<Duration> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if !is_rate_limited(status, text("x-ratelimit-remaining")) {
        return None;
    }
    server_wait_hint(text(RETRY_AFTER.as_str()), text("x-ratelimit-reset"), jiff::Timestamp::now())
}

/// Reads at most [`READ_BODY_BYTES`]; a broken body keeps what arrived.
async fn read_body(mut resp: reqwest::Response) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < READ_BODY_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(READ_BODY_BYTES);
    bytes
}

fn permanent_error(status: u16, response: &ResponseText, delivery: &Delivery) -> BrazeError {
    let message = response.message.clone();
    let rest_key = matches!(delivery, Delivery::Attribute { .. });
    match status {
        401 if rest_key => BrazeError::Unauthorized { reason: UnauthorizedReason::RestApiKey, message },
        403 if rest_key => BrazeError::Forbidden { message },
        401 => BrazeError::Unauthorized { reason: UnauthorizedReason::from_message(&message), message },
        400 => BrazeError::BadRequest { message },
        _ => BrazeError::Rejected { status, message },
    }
}

fn totals(requests: &[RequestOutcome], run: &RunState) -> ChangesTotals {
    let mut t = ChangesTotals {
        responses_by_status: run.by_status.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        timeouts: run.timeouts.load(Ordering::Relaxed),
        connection_errors: run.connection_errors.load(Ordering::Relaxed),
        rate_limited: run.rate_limited.load(Ordering::Relaxed),
        retries: run.budget - run.retries_left.load(Ordering::Relaxed) + run.rate_limited.load(Ordering::Relaxed),
        budget_wait: run.budget_wait(),
        ..ChangesTotals::default()
    };
    for r in requests {
        t.requests += 1;
        t.attempts += r.attempts;
        let (adds, removes) = (u64::from(r.adds.total()), u64::from(r.removes.total()));
        if r.accepted() {
            t.accepted_requests += 1;
            t.added += adds - r.rejected.adds.min(adds);
            t.removed += removes - r.rejected.removes.min(removes);
            t.rejected.merge(&r.rejected);
            t.accepted_with_errors += u32::from(r.response.has_errors);
        } else {
            t.failed_requests += 1;
            t.unaccepted_adds += adds;
            t.unaccepted_removes += removes;
        }
    }
    t
}
