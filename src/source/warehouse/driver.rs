//! The one read loop of the SQL-over-REST warehouses ([`read`]) and the wire protocol each
//! of them implements for it ([`Protocol`]).
//!
//! A read is the same on Snowflake, Databricks and BigQuery: submit one statement, poll it
//! until it finished, then read its result page after page, each page checked against what
//! the statement promised before its rows become members. What differs is the wire — URLs,
//! bodies, auth headers, how an answer is told apart — so a warehouse implements only
//! [`Protocol`], each method one request and its answer classified ([`Failure`],
//! [`Progress`]), and [`read`] owns what must not differ:
//!
//! - retries: one [`Backoff`] per request for transient answers, fresh credentials once when
//!   they are refused, and a statement that ended in passing (or whose requests kept failing
//!   before it finished) submitted anew while the protocol's resubmissions last;
//! - the deadline (`statementTimeoutSeconds`) over the whole read: past it a statement still
//!   running is cancelled, and the cancel sent, before the read fails;
//! - cancel on drop: a read abandoned while its statement runs (a run's timeout drops the
//!   stream) cancels it in the background, so no warehouse keeps working for nobody;
//! - the byte meter: every page body is read under the page limit ([`Protocol::read_page`]),
//!   and one page is held at a time;
//! - row mapping: each page's rows through one [`RowMapper`], [`super::BATCH_ROWS`] at a time.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::{Backoff, BodyError, PageLimit, PageRows, RowMapper, read_body_bounded, sleep_within};
use crate::domain::identifiers::IdentifierFields;
use crate::source::{MemberStream, SourceError};

/// How long a cancel request may take before it is given up.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// One warehouse's wire protocol for a read-only statement. Each async method is **one**
/// request; [`read`] retries, waits, times out and cancels.
pub(crate) trait Protocol: Sync {
    /// The submitted statement as the warehouse names it: a Snowflake statement handle, a
    /// Databricks statement id, a BigQuery job.
    type Handle: Send + Sync;
    /// The answer of a finished statement: its schema, what it promises, its first page.
    type Finished: Send;
    /// Where a page after the first is: a partition number, a chunk, a page token.
    type Cursor: Send + Sync;
    /// What a page says besides its rows (a chunk's offsets, the next page token).
    type PageInfo: Send + Sync;
    /// What the statement promised (row counts, partitions, chunks), and what was read of
    /// it so far: checked page by page and at the end.
    type Ledger: Send;
    /// One page's rows as the warehouse sends them.
    type Rows: PageRows<Kind: Send + Sync> + Send + Sync;

    /// The format a malformed answer is named by ("Snowflake result").
    const FORMAT: &'static str;

    /// What is read, for messages and logs (never a secret).
    fn what(&self) -> &str;

    /// The spec's identifier mapping.
    fn fields(&self) -> &IdentifierFields;

    /// How long the whole read may take (`statementTimeoutSeconds`).
    fn statement_timeout(&self) -> Duration;

    /// The most bytes one page body may have.
    fn page_limit(&self) -> PageLimit;

    /// Waits and attempts for one request's transient answers.
    fn retries(&self) -> Backoff {
        Backoff::transient()
    }

    /// Waits between polls of a running statement (bounded by the deadline alone).
    fn polling(&self) -> Backoff {
        super::polling()
    }

    /// How often a statement that ended in passing, or whose requests kept failing before
    /// it finished, is submitted anew. None by default: a resubmission could run it twice.
    fn resubmissions(&self) -> Backoff {
        Backoff::new(Duration::ZERO, Duration::ZERO, 0)
    }

    /// Submits the statement. `request_id` is the same for every attempt of one submission
    /// (idempotent resubmission where the API has it); `resend` is set after a transient
    /// answer.
    fn submit(
        &self,
        request_id: &str,
        resend: bool,
    ) -> impl Future<Output = Result<(Self::Handle, Progress<Self::Finished>), Failure>> + Send;

    /// Asks how the statement is doing.
    fn poll(&self, handle: &Self::Handle) -> impl Future<Output = Result<Progress<Self::Finished>, Failure>> + Send;

    /// Checks a finished statement's answer: its columns, what it promises, its first page.
    fn result(&self, finished: Self::Finished) -> Result<ResultSet<Self>, SourceError>;

    /// Fetches the page at `cursor`, its body read with [`Protocol::read_page`].
    fn page(
        &self,
        handle: &Self::Handle,
        cursor: &Self::Cursor,
    ) -> impl Future<Output = Result<Page<Self>, Failure>> + Send;

    /// Checks `page` against the ledger and counts it in: where the next page is, or `None`
    /// after the last.
    fn tally(&self, ledger: &mut Self::Ledger, page: &Page<Self>) -> Result<Option<Self::Cursor>, SourceError>;

    /// Checks, after the last page, that everything promised was read.
    fn settle(&self, ledger: Self::Ledger) -> Result<(), SourceError>;

    /// The request that cancels a statement still running; `None` when none can be made.
    fn cancel(&self, handle: &Self::Handle) -> Option<reqwest::RequestBuilder>;

    /// The credentials were refused: get fresh ones, or fail with `refused` when there are
    /// none to get (a personal access token).
    fn reauthenticate(&self, refused: SourceError) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// A page body (or a result set), refused past [`Protocol::page_limit`]; an answer that
    /// breaks off is worth another try.
    fn read_page(
        &self,
        part: &str,
        response: reqwest::Response,
    ) -> impl Future<Output = Result<Vec<u8>, Failure>> + Send {
        async move {
            let limit = self.page_limit();
            read_body_bounded(response, limit.bytes).await.map_err(|e| match e {
                BodyError::TooLarge => Failure::Fatal(limit.exceeded(self.what(), part)),
                BodyError::Transport(e) => Failure::transient(format!(
                    "reading {part} failed: {}",
                    crate::secret::error_chain(&e.without_url())
                )),
            })
        }
    }
}

/// How a submitted statement is doing.
#[derive(Debug)]
pub(crate) enum Progress<F> {
    /// Still queued or running: poll again.
    Running,
    /// Finished with a result.
    Finished(F),
    /// Ended without a result for a passing reason (a warehouse under maintenance): worth
    /// submitting again. What happened, as it may be shown.
    Interrupted(String),
    /// Ended without a result: the error the read ends with.
    Failed(SourceError),
}

/// Why one request did not get its answer.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth sending again after a wait (429, 503, a lost connection, a body cut off).
    Transient(Transient),
    /// The credentials were refused: fresh ones, then once more; refused again, this error.
    Unauthorized(SourceError),
    /// No retry changes it.
    Fatal(SourceError),
}

/// A transient answer.
#[derive(Debug)]
pub(crate) struct Transient {
    /// What was answered, as it may be shown.
    pub detail: String,
    /// The server's `Retry-After`.
    pub hint: Option<Duration>,
    /// The error the read ends with when the retries run out; `None`:
    /// [`SourceError::Unavailable`] with `detail`.
    pub last: Option<SourceError>,
}

impl Failure {
    pub fn transient(detail: String) -> Self {
        Failure::Transient(Transient { detail, hint: None, last: None })
    }

    pub fn retry_after(detail: String, hint: Option<Duration>) -> Self {
        Failure::Transient(Transient { detail, hint, last: None })
    }
}

impl From<SourceError> for Failure {
    fn from(e: SourceError) -> Self {
        Failure::Fatal(e)
    }
}

/// One page: its rows, its name for messages ("partition 3", "chunk 2", "page 4") and what
/// else it says.
pub(crate) struct Page<P: Protocol + ?Sized> {
    pub rows: P::Rows,
    pub part: String,
    pub info: P::PageInfo,
}

/// The first page: in the finished statement's answer, or still to fetch.
pub(crate) enum Next<P: Protocol + ?Sized> {
    Page(Page<P>),
    Fetch(P::Cursor),
}

/// A finished statement's answer, checked: its columns (name, kind), what it promises, and
/// its first page.
pub(crate) struct ResultSet<P: Protocol + ?Sized> {
    pub columns: Vec<(String, <P::Rows as PageRows>::Kind)>,
    pub ledger: P::Ledger,
    pub first: Next<P>,
}

/// Reads the statement `protocol` describes to its last row, as member batches.
pub(crate) fn read<P: Protocol>(protocol: &P) -> MemberStream<'_> {
    Box::pin(async_stream::try_stream! {
        let deadline = Instant::now() + protocol.statement_timeout();
        let (handle, finished) = finish(protocol, deadline).await?;
        let ResultSet { columns, mut ledger, first } = protocol.result(finished)?;
        let mapper = RowMapper::new(protocol.what(), protocol.fields(), columns)?;
        let mut next = first;
        loop {
            let page = match next {
                Next::Page(page) => page,
                Next::Fetch(cursor) => {
                    request(protocol, deadline, |_| protocol.page(&handle, &cursor)).await.map_err(Stop::into_error)?
                }
            };
            let cursor = protocol.tally(&mut ledger, &page)?;
            for batch in mapper.batches(protocol.what(), P::FORMAT, &page.part, &page.rows)? {
                yield batch;
            }
            // One page at a time: this one goes before the next is fetched.
            drop(page);
            match cursor {
                Some(cursor) => next = Next::Fetch(cursor),
                None => break,
            }
        }
        protocol.settle(ledger)?;
    })
}

/// Why a request stopped without its answer.
#[derive(Debug)]
enum Stop {
    /// Its retries ran out on a transient answer: the error the read ends with, unless the
    /// statement is submitted anew.
    Exhausted(SourceError),
    Final(SourceError),
}

impl Stop {
    fn into_error(self) -> SourceError {
        match self {
            Stop::Exhausted(e) | Stop::Final(e) => e,
        }
    }
}

fn timeout<P: Protocol>(protocol: &P) -> SourceError {
    SourceError::Timeout { what: protocol.what().to_owned(), seconds: protocol.statement_timeout().as_secs() }
}

/// One request until an answer that is not transient: after a backoff wait on a transient
/// answer, once more with fresh credentials when they are refused; never past `deadline`.
async fn request<P, T, Fut>(protocol: &P, deadline: Instant, mut attempt: impl FnMut(bool) -> Fut) -> Result<T, Stop>
where
    P: Protocol,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut backoff = protocol.retries();
    let (mut resend, mut reauthenticated) = (false, false);
    loop {
        let failure = match tokio::time::timeout_at(deadline, attempt(resend)).await {
            Err(_) => return Err(Stop::Final(timeout(protocol))),
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(failure)) => failure,
        };
        match failure {
            Failure::Fatal(e) => return Err(Stop::Final(e)),
            Failure::Unauthorized(e) if reauthenticated => return Err(Stop::Final(e)),
            Failure::Unauthorized(e) => {
                reauthenticated = true;
                let fresh = tokio::time::timeout_at(deadline, protocol.reauthenticate(e)).await;
                fresh.map_err(|_| Stop::Final(timeout(protocol)))?.map_err(Stop::Final)?;
            }
            Failure::Transient(t) => {
                tracing::debug!(source = %protocol.what(), "transient answer, retrying: {}", t.detail);
                resend = true;
                let Some(wait) = backoff.next_delay(t.hint) else {
                    return Err(Stop::Exhausted(t.last.unwrap_or_else(|| SourceError::Unavailable {
                        what: protocol.what().to_owned(),
                        attempts: backoff.attempts() + 1,
                        detail: t.detail,
                    })));
                };
                sleep_within(wait, deadline, || timeout(protocol)).await.map_err(Stop::Final)?;
            }
        }
    }
}

/// A statement the warehouse may still be running: cancelled when dropped unfinished.
struct Running<'a, P: Protocol> {
    protocol: &'a P,
    handle: Option<P::Handle>,
}

impl<P: Protocol> Running<'_, P> {
    /// Cancels the statement in the background (best effort: outside a Tokio runtime
    /// nothing is sent).
    fn abandon(&mut self) {
        let Some(handle) = self.handle.take() else { return };
        let Some(request) = self.protocol.cancel(&handle) else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(send_cancel(self.protocol.what().to_owned(), request));
        }
    }

    /// Cancels the statement now and waits (a bounded while) for the answer: the read ends
    /// only after the warehouse was told.
    async fn cancel(&mut self) {
        let Some(handle) = self.handle.take() else { return };
        if let Some(request) = self.protocol.cancel(&handle) {
            send_cancel(self.protocol.what().to_owned(), request).await;
        }
    }
}

impl<P: Protocol> Drop for Running<'_, P> {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// Sends a statement's cancel request and logs how it went.
async fn send_cancel(what: String, request: reqwest::RequestBuilder) {
    match request.timeout(CANCEL_WAIT).send().await {
        Ok(r) => tracing::info!(source = %what, status = r.status().as_u16(), "cancelled the unfinished statement"),
        Err(e) => tracing::warn!(
            source = %what,
            "cancelling the unfinished statement failed: {}",
            crate::secret::error_chain(&e.without_url())
        ),
    }
}

/// How one submission ended.
enum Ended<P: Protocol> {
    Finished(P::Handle, P::Finished),
    /// The statement ended in passing ([`Progress::Interrupted`]): what happened.
    Interrupted(String),
    /// Its requests kept failing: the error to end with when the resubmissions are used up.
    Exhausted(SourceError),
}

/// Submits the statement and polls it until it finished; submits it anew after an
/// interruption while the resubmissions last. Past the deadline the statement still running
/// is cancelled before the read fails.
async fn finish<P: Protocol>(protocol: &P, deadline: Instant) -> Result<(P::Handle, P::Finished), SourceError> {
    let mut running = Running { protocol, handle: None };
    let mut resubmissions = protocol.resubmissions();
    loop {
        let wait = match submission(protocol, &mut running, deadline).await {
            Ok(Ended::Finished(handle, finished)) => return Ok((handle, finished)),
            Ok(Ended::Interrupted(detail)) => resubmissions.delay_or_unavailable(None, protocol.what(), detail)?,
            Ok(Ended::Exhausted(e)) => resubmissions.next_delay(None).ok_or(e)?,
            Err(e @ SourceError::Timeout { .. }) => {
                running.cancel().await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        // A statement given up on must not run on beside the new one.
        running.abandon();
        tracing::warn!(source = %protocol.what(), "submitting the statement again");
        sleep_within(wait, deadline, || timeout(protocol)).await?;
    }
}

/// One submission: submit, then poll until the statement finished or ended.
async fn submission<P: Protocol>(
    protocol: &P,
    running: &mut Running<'_, P>,
    deadline: Instant,
) -> Result<Ended<P>, SourceError> {
    let request_id = super::request_id();
    let submitted = request(protocol, deadline, |resend| protocol.submit(&request_id, resend)).await;
    let (handle, mut progress) = match submitted {
        Ok(submitted) => submitted,
        Err(Stop::Exhausted(e)) => return Ok(Ended::Exhausted(e)),
        Err(Stop::Final(e)) => return Err(e),
    };
    running.handle = Some(handle);
    let mut polling = protocol.polling();
    loop {
        match progress {
            Progress::Running => {}
            Progress::Finished(finished) => {
                let handle = running.handle.take().expect("set at submission");
                return Ok(Ended::Finished(handle, finished));
            }
            Progress::Interrupted(detail) => {
                running.handle = None;
                return Ok(Ended::Interrupted(detail));
            }
            Progress::Failed(e) => {
                running.handle = None;
                return Err(e);
            }
        }
        let wait = polling.next_delay(None).unwrap_or(Duration::from_secs(5));
        sleep_within(wait, deadline, || timeout(protocol)).await?;
        let handle = running.handle.as_ref().expect("set at submission");
        progress = match request(protocol, deadline, |_| protocol.poll(handle)).await {
            Ok(progress) => progress,
            Err(Stop::Exhausted(e)) => return Ok(Ended::Exhausted(e)),
            Err(Stop::Final(e)) => return Err(e),
        };
    }
}
