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

    /// What the read needs to know besides the wire.
    fn reading(&self) -> Reading<'_>;

    /// What is read, for messages and logs (never a secret).
    fn what(&self) -> &str {
        self.reading().what
    }

    /// The most bytes one page body may have.
    fn page_limit(&self) -> PageLimit {
        self.reading().page_limit
    }

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

/// What a read needs to know of its source besides the wire.
pub(crate) struct Reading<'a> {
    /// What is read, for messages and logs (never a secret).
    pub what: &'a str,
    /// The spec's identifier mapping.
    pub fields: &'a IdentifierFields,
    /// How long the whole read may take (`statementTimeoutSeconds`).
    pub statement_timeout: Duration,
    /// The most bytes one page body may have (the spec's cap under the operator's ceiling).
    pub page_limit: PageLimit,
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
    /// [`SourceError::Unavailable`] with `detail`. (Boxed: a failure stays small.)
    pub last: Option<Box<SourceError>>,
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
        let deadline = Instant::now() + protocol.reading().statement_timeout;
        let (handle, finished) = finish(protocol, deadline).await?;
        let ResultSet { columns, mut ledger, first } = protocol.result(finished)?;
        let mapper = RowMapper::new(protocol.what(), protocol.reading().fields, columns)?;
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
    SourceError::Timeout { what: protocol.what().to_owned(), seconds: protocol.reading().statement_timeout.as_secs() }
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
                    let unavailable = || SourceError::Unavailable {
                        what: protocol.what().to_owned(),
                        attempts: backoff.attempts() + 1,
                        detail: t.detail,
                    };
                    return Err(Stop::Exhausted(t.last.map_or_else(unavailable, |last| *last)));
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures::StreamExt;

    use super::*;
    use crate::api::IdentifierMapping;
    use crate::domain::member::Member;
    use crate::source::warehouse::{ColumnType, CompactRows};

    /// What the fake warehouse answers, request by request, in order.
    enum Reply {
        Running,
        /// Finished, its result in `n` pages of two rows each: the first in the answer.
        Finished(usize),
        Interrupted,
        Page(&'static str),
        Fail(Failure),
    }

    /// A warehouse that answers from a script, counts what it was asked, and has one
    /// column, `ID`.
    struct Fake {
        script: Mutex<VecDeque<Reply>>,
        submits: AtomicU32,
        cancels: AtomicU32,
        reauthentications: AtomicU32,
        fields: IdentifierFields,
        timeout: Duration,
        resubmissions: u32,
    }

    fn fake(script: Vec<Reply>) -> Fake {
        let mapping = IdentifierMapping { external_id: Some("ID".into()), ..Default::default() };
        Fake {
            script: Mutex::new(script.into()),
            submits: AtomicU32::default(),
            cancels: AtomicU32::default(),
            reauthentications: AtomicU32::default(),
            fields: IdentifierFields::from_mapping(&mapping).unwrap(),
            timeout: Duration::from_secs(5),
            resubmissions: 0,
        }
    }

    fn rows(json: &str) -> CompactRows {
        serde_json::from_str(json).unwrap()
    }

    impl Fake {
        fn next(&self) -> Reply {
            self.script.lock().unwrap().pop_front().unwrap_or(Reply::Running)
        }

        fn progress(&self) -> Result<Progress<usize>, Failure> {
            match self.next() {
                Reply::Running => Ok(Progress::Running),
                Reply::Finished(pages) => Ok(Progress::Finished(pages)),
                Reply::Interrupted => Ok(Progress::Interrupted("under maintenance".into())),
                Reply::Fail(failure) => Err(failure),
                Reply::Page(_) => unreachable!("a page while the statement runs"),
            }
        }
    }

    impl Protocol for Fake {
        type Handle = u32;
        type Finished = usize;
        type Cursor = usize;
        type PageInfo = ();
        /// Pages promised, pages read.
        type Ledger = (usize, usize);
        type Rows = CompactRows;

        const FORMAT: &'static str = "fake result";

        fn reading(&self) -> Reading<'_> {
            let page_limit = PageLimit::new("maxPageBytes", 16, 1024);
            Reading { what: "fake query", fields: &self.fields, statement_timeout: self.timeout, page_limit }
        }

        fn retries(&self) -> Backoff {
            Backoff::new(Duration::from_millis(1), Duration::from_millis(2), 3)
        }

        fn polling(&self) -> Backoff {
            Backoff::new(Duration::from_millis(1), Duration::from_millis(2), u32::MAX)
        }

        fn resubmissions(&self) -> Backoff {
            Backoff::new(Duration::from_millis(1), Duration::from_millis(2), self.resubmissions)
        }

        async fn submit(&self, _request_id: &str, _resend: bool) -> Result<(u32, Progress<usize>), Failure> {
            let progress = self.progress()?;
            Ok((self.submits.fetch_add(1, Ordering::SeqCst) + 1, progress))
        }

        async fn poll(&self, _handle: &u32) -> Result<Progress<usize>, Failure> {
            self.progress()
        }

        fn result(&self, pages: usize) -> Result<ResultSet<Self>, SourceError> {
            let first = Page { rows: rows(r#"[["a"],["b"]]"#), part: "page 0".into(), info: () };
            let columns = vec![("ID".to_owned(), ColumnType::Text)];
            Ok(ResultSet { columns, ledger: (pages, 0), first: Next::Page(first) })
        }

        async fn page(&self, _handle: &u32, n: &usize) -> Result<Page<Self>, Failure> {
            match self.next() {
                Reply::Page(json) => Ok(Page { rows: rows(json), part: format!("page {n}"), info: () }),
                Reply::Fail(failure) => Err(failure),
                _ => unreachable!("the script gives pages here"),
            }
        }

        fn tally(
            &self,
            (promised, read): &mut (usize, usize),
            page: &Page<Self>,
        ) -> Result<Option<usize>, SourceError> {
            if page.rows.len() != 2 {
                return Err(SourceError::Malformed {
                    what: "fake query".into(),
                    format: Self::FORMAT,
                    location: page.part.clone(),
                    message: "cut short".into(),
                });
            }
            *read += 1;
            Ok((*read < *promised).then_some(*read))
        }

        fn settle(&self, (promised, read): (usize, usize)) -> Result<(), SourceError> {
            assert_eq!(promised, read, "every page was read");
            Ok(())
        }

        fn cancel(&self, _handle: &u32) -> Option<reqwest::RequestBuilder> {
            self.cancels.fetch_add(1, Ordering::SeqCst);
            None
        }

        async fn reauthenticate(&self, _refused: SourceError) -> Result<(), SourceError> {
            self.reauthentications.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn refused() -> Failure {
        Failure::Unauthorized(SourceError::Auth {
            what: "fake query".into(),
            detail: "HTTP 401".into(),
            fix: "".into(),
        })
    }

    async fn ids(source: &Fake) -> Result<Vec<String>, SourceError> {
        let mut stream = read(source);
        let mut ids = Vec::new();
        while let Some(batch) = stream.next().await {
            ids.extend(batch?.members.into_iter().map(|m| match m {
                Member::ExternalId(id) => id,
                other => panic!("only external ids here: {other:?}"),
            }));
        }
        Ok(ids)
    }

    #[tokio::test]
    async fn transient_answers_are_retried_and_credentials_renewed_once() {
        let source = fake(vec![
            Reply::Fail(Failure::transient("HTTP 503".into())),
            Reply::Fail(refused()),
            Reply::Running,
            Reply::Fail(Failure::retry_after("HTTP 429".into(), Some(Duration::from_millis(1)))),
            Reply::Finished(3),
            Reply::Fail(Failure::transient("reading page 1 failed".into())),
            Reply::Page(r#"[["c"],["d"]]"#),
            Reply::Page(r#"[["e"],["f"]]"#),
        ]);
        let ids = ids(&source).await.expect("read despite the faults");
        assert_eq!(ids, ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(source.submits.load(Ordering::SeqCst), 1, "retries are not resubmissions");
        assert_eq!(source.reauthentications.load(Ordering::SeqCst), 1);
        assert_eq!(source.cancels.load(Ordering::SeqCst), 0, "a finished statement is not cancelled");
    }

    #[tokio::test]
    async fn retries_run_out_into_unavailable_or_the_protocols_own_error() {
        let failing = || (0..4).map(|_| Reply::Fail(Failure::transient("HTTP 503".into())));
        let source = fake(failing().collect());
        let err = ids(&source).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "fake query: still unavailable after 4 attempts: HTTP 503; the next run tries again"
        );

        let last = || SourceError::Query { what: "fake query".into(), message: "kept failing".into() };
        let mut script: Vec<Reply> = vec![Reply::Finished(2)];
        script.extend((0..4).map(|_| {
            let last = Some(Box::new(last()));
            Reply::Fail(Failure::Transient(Transient { detail: "HTTP 503".into(), hint: None, last }))
        }));
        let err = ids(&fake(script)).await.unwrap_err();
        assert_eq!(err.to_string(), last().to_string());

        let source = fake(vec![Reply::Fail(refused()), Reply::Fail(refused())]);
        assert!(matches!(ids(&source).await.unwrap_err(), SourceError::Auth { .. }));
        assert_eq!(source.reauthentications.load(Ordering::SeqCst), 1, "fresh credentials once, not twice");
    }

    #[tokio::test]
    async fn an_interrupted_statement_is_submitted_again_while_resubmissions_last() {
        let mut source = fake(vec![Reply::Interrupted, Reply::Running, Reply::Finished(1)]);
        source.resubmissions = 1;
        assert_eq!(ids(&source).await.unwrap().len(), 2);
        assert_eq!(source.submits.load(Ordering::SeqCst), 2);
        assert_eq!(source.cancels.load(Ordering::SeqCst), 0, "an interrupted statement has ended");

        let source = fake(vec![Reply::Interrupted]);
        let err = ids(&source).await.unwrap_err();
        assert!(err.to_string().contains("still unavailable after 1 attempts: under maintenance"), "{err}");
        assert_eq!(source.submits.load(Ordering::SeqCst), 1, "no resubmission by default");

        // Requests that kept failing before it finished: the statement may run on, so it is
        // cancelled before the new one is submitted.
        let mut script: Vec<Reply> = vec![Reply::Running];
        script.extend((0..4).map(|_| Reply::Fail(Failure::transient("HTTP 503".into()))));
        script.extend([Reply::Finished(1)]);
        let mut source = fake(script);
        source.resubmissions = 1;
        assert_eq!(ids(&source).await.unwrap().len(), 2);
        assert_eq!((source.submits.load(Ordering::SeqCst), source.cancels.load(Ordering::SeqCst)), (2, 1));
    }

    #[tokio::test]
    async fn a_statement_past_its_deadline_is_cancelled_before_the_read_fails() {
        let mut source = fake(vec![]);
        source.timeout = Duration::from_millis(100);
        let err = ids(&source).await.unwrap_err();
        assert!(matches!(err, SourceError::Timeout { .. }), "{err}");
        assert_eq!(source.cancels.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_read_dropped_while_the_statement_runs_cancels_it_and_a_finished_one_is_left_alone() {
        let source = fake(vec![]);
        {
            let mut stream = read(&source);
            assert!(tokio::time::timeout(Duration::from_millis(50), stream.next()).await.is_err());
        }
        assert_eq!(source.cancels.load(Ordering::SeqCst), 1, "dropped while running");

        let source = fake(vec![Reply::Finished(2)]);
        {
            let mut stream = read(&source);
            assert_eq!(stream.next().await.unwrap().unwrap().rows(), 2);
        }
        assert_eq!(source.cancels.load(Ordering::SeqCst), 0, "dropped after it finished");

        let source = fake(vec![Reply::Finished(1)]);
        drop(read(&source));
        assert_eq!(source.submits.load(Ordering::SeqCst), 0, "nothing is sent before the stream is polled");
    }

    #[tokio::test]
    async fn a_page_is_checked_before_its_rows_become_members() {
        let source = fake(vec![Reply::Finished(2), Reply::Page(r#"[["c"]]"#)]);
        let mut stream = read(&source);
        assert_eq!(stream.next().await.unwrap().unwrap().rows(), 2);
        let err = stream.next().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("page 1") && err.to_string().contains("cut short"), "{err}");
        assert!(stream.next().await.is_none(), "the read ends at its error");

        let source = fake(vec![Reply::Finished(2), Reply::Page(r#"[["c","x"],["d","y"]]"#)]);
        let err = ids(&source).await.unwrap_err();
        assert!(err.to_string().contains("page 1, row 0: 2 cells where the schema has 1 columns"), "{err}");
    }

    #[tokio::test]
    async fn page_bodies_are_read_under_the_limit() {
        let source = fake(vec![]);
        let response = |body: &str| reqwest::Response::from(http::Response::new(body.to_owned()));
        assert_eq!(source.read_page("page 1", response("[[\"a\"]]")).await.unwrap(), b"[[\"a\"]]");
        let Err(Failure::Fatal(err)) = source.read_page("page 2", response(&"x".repeat(17))).await else {
            panic!("a body over the limit is refused")
        };
        assert!(matches!(err, SourceError::PageTooLarge { limit: 16, .. }), "{err}");
        assert!(err.to_string().contains("page 2 is larger than maxPageBytes (16 bytes)"), "{err}");
    }
}
