//! The leader's fence: what changes Braze or the snapshot is done only while this process
//! holds its Lease, with margin.
//!
//! Another replica may take the Lease once `renewTime + leaseDuration` has passed by its
//! clock. The leader renews every few seconds ([`crate::controller::leader`]); a renewal
//! that *started* at `t` and succeeded lets this process work until
//! `t + leaseDuration − grace` ([`LeaseTiming::deadline`]). The grace covers clock skew
//! between replicas and a request already on the wire at the deadline. A leader whose
//! renewals hang (a dead connection to the API server) thus stops on its own clock, before
//! anyone else can lead — it does not wait to *learn* that it lost the Lease.
//!
//! Between renewals the fence is one clock comparison, so it is checked before every Braze
//! request and every snapshot write ([`Fence::check`], [`Fence::bounded`]). Without leader
//! election (a single replica) the fence is always open ([`Fence::unfenced`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long a Lease lasts and how much of it the holder gives up as margin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// `leaseDurationSeconds`: how long the Lease is valid after a renewal.
    pub duration: Duration,
    /// Margin before expiry: the holder stops this long before another replica may lead.
    pub grace: Duration,
}

impl LeaseTiming {
    /// Fails unless `0 < grace < duration`.
    pub fn new(duration: Duration, grace: Duration) -> Result<Self, String> {
        if grace.is_zero() || grace >= duration {
            return Err(format!(
                "the Lease renew grace ({grace:?}) must be above zero and below the Lease duration ({duration:?}): \
                 the leader stops that long before its Lease can expire"
            ));
        }
        Ok(LeaseTiming { duration, grace })
    }

    /// How long after a renewal started this process may still work on it.
    pub fn window(&self) -> Duration {
        self.duration.saturating_sub(self.grace)
    }

    /// Until when a renewal that started at `renewal_started` (and succeeded) lets this
    /// process work: the fence closes at `last renewal + lease duration − grace`.
    pub fn deadline(&self, renewal_started: Instant) -> Instant {
        renewal_started + self.window()
    }

    /// Time between renewals: four fit in the window, so one or two failing (a slow API
    /// server, a dropped connection) do not close the fence.
    pub fn renew_every(&self) -> Duration {
        self.window() / 4
    }

    /// Longest one renewal may take before it is abandoned (its connection dropped) and
    /// tried again: a renewal hanging on a dead connection never keeps the leader unaware.
    /// (Never past the fence's deadline either: see the leader's loop.)
    pub fn renew_timeout(&self) -> Duration {
        self.window() / 2
    }

    /// A read timeout for API requests made while leading: half the window, so a request
    /// hanging on a dead connection fails, and is retried on a new one, well before the
    /// fence would close.
    pub fn api_read_timeout(&self) -> Duration {
        (self.window() / 2).max(Duration::from_millis(500))
    }
}

/// Whether work may go on at `now`, given the deadline of the last successful renewal
/// (`None`: not leading). The whole timing decision: open strictly before the deadline.
pub fn is_open(deadline: Option<Instant>, now: Instant) -> bool {
    deadline.is_some_and(|deadline| now < deadline)
}

/// Work refused, or cut short, because the fence closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "stopped: this replica no longer holds its Lease with margin (it was not renewed in time), so another \
     replica may lead; the run stays in progress for the leader to resume"
)]
pub struct Fenced;

/// A cheap handle on the fence; clones share it.
#[derive(Clone, Default)]
pub struct Fence(Option<Arc<Held>>);

struct Held {
    /// The Lease (`namespace/name`) this fence follows, when it is named.
    lease: Option<String>,
    /// Deadlines are kept as nanoseconds after this instant (0: closed), in one atomic.
    base: Instant,
    deadline: AtomicU64,
    /// Wakes [`Fence::opened`] on each renewal.
    renewals: tokio::sync::Notify,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Fence(unfenced)"),
            Some(_) => write!(f, "Fence(open: {})", self.is_open()),
        }
    }
}

impl Fence {
    /// Always open: no leader election, a single replica.
    pub fn unfenced() -> Self {
        Fence(None)
    }

    /// Closed until the first renewal ([`Self::renewed`]).
    pub fn leased() -> Self {
        Self::held(None)
    }

    /// [`Self::leased`], following the Lease `namespace/name` ([`Self::lease`]).
    pub fn for_lease(lease: String) -> Self {
        Self::held(Some(lease))
    }

    fn held(lease: Option<String>) -> Self {
        Fence(Some(Arc::new(Held {
            lease,
            base: Instant::now(),
            deadline: AtomicU64::new(0),
            renewals: tokio::sync::Notify::new(),
        })))
    }

    /// Whether this fence follows a Lease (else it is always open).
    pub fn is_leased(&self) -> bool {
        self.0.is_some()
    }

    /// The Lease this fence follows, when it was named ([`Self::for_lease`]).
    pub fn lease(&self) -> Option<&str> {
        self.0.as_ref()?.lease.as_deref()
    }

    /// A renewal succeeded: work may go on until `until` (never moves the deadline back).
    /// A fence whose deadline has passed stays closed — a renewal answered after it does
    /// not reopen it: work was cut off there, and the leader steps down — until
    /// [`Self::close`] resets it for the next time this replica leads.
    pub fn renewed(&self, until: Instant) {
        let Some(held) = &self.0 else { return };
        let nanos = until.saturating_duration_since(held.base).as_nanos().clamp(1, u64::MAX.into()) as u64;
        let now = Instant::now();
        let _ = held.deadline.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            let expired = current != 0 && !is_open(Some(held.base + Duration::from_nanos(current)), now);
            (!expired && nanos > current).then_some(nanos)
        });
        held.renewals.notify_waiters();
    }

    /// Waits until the fence is open (at once when it is, or unfenced).
    pub async fn opened(&self) {
        let Some(held) = &self.0 else { return };
        loop {
            // Created before looking, so a renewal in between still wakes it.
            let renewed = held.renewals.notified();
            if self.is_open() {
                return;
            }
            renewed.await;
        }
    }

    /// The Lease is lost or given up: close now.
    pub fn close(&self) {
        if let Some(held) = &self.0 {
            held.deadline.store(0, Ordering::Release);
        }
    }

    /// Until when work may go on; `None` when closed. Unfenced: far in the future.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.0 {
            None => Some(Instant::now() + Duration::from_secs(365 * 24 * 3600)),
            Some(held) => match held.deadline.load(Ordering::Acquire) {
                0 => None,
                nanos => Some(held.base + Duration::from_nanos(nanos)),
            },
        }
    }

    pub fn is_open(&self) -> bool {
        self.0.is_none() || is_open(self.deadline(), Instant::now())
    }

    /// `Ok` while work may go on.
    pub fn check(&self) -> Result<(), Fenced> {
        if self.is_open() { Ok(()) } else { Err(Fenced) }
    }

    /// Runs `work` while the fence is open: refused if closed, dropped (cancelled) when the
    /// deadline passes without a renewal. Renewals meanwhile extend it.
    ///
    /// The clock is read before *every* poll of `work`, not only when a timer fires: after a
    /// freeze (SIGSTOP, a starved node) the first poll may find `work` ready to go on — a
    /// connection just made, a request about to be written — and it must not be polled then.
    pub async fn bounded<F: Future>(&self, work: F) -> Result<F::Output, Fenced> {
        if self.0.is_none() {
            return Ok(work.await);
        }
        let mut work = std::pin::pin!(work);
        let mut alarm = std::pin::pin!(tokio::time::sleep_until(Instant::now().into()));
        std::future::poll_fn(|cx| {
            let Some(deadline) = self.deadline().filter(|d| is_open(Some(*d), Instant::now())) else {
                return Poll::Ready(Err(Fenced));
            };
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            // Woken at the deadline (moved by renewals) to look at the clock again.
            if alarm.deadline() != deadline.into() {
                alarm.as_mut().reset(deadline.into());
            }
            if alarm.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await
    }

    /// A request body handed to the connection only while the fence is open.
    ///
    /// The fence is looked at when the connection — new or reused from the pool, its TLS
    /// handshake done — asks for the body's first bytes, in the same poll that writes them.
    /// Over HTTP/1.1 hyper buffers a request's head until then, and a body that fails there
    /// drops the connection without flushing anything: a request whose fence closed while
    /// it waited for a connection (or while the process was frozen) never reaches the
    /// server. Over HTTP/2 the HEADERS frame may already be out; the stream is reset, and
    /// the body — where Braze's keys and the changes are — never leaves. The body's length
    /// is announced (`Content-Length`), as for a plain byte body.
    pub fn body(&self, bytes: impl Into<Bytes>) -> reqwest::Body {
        reqwest::Body::wrap(FencedBody { fence: self.clone(), bytes: Some(bytes.into()) })
    }
}

/// See [`Fence::body`].
struct FencedBody {
    fence: Fence,
    /// `None` once handed over.
    bytes: Option<Bytes>,
}

impl http_body::Body for FencedBody {
    type Data = Bytes;
    type Error = Fenced;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Fenced>>> {
        let Some(bytes) = self.bytes.take() else {
            return Poll::Ready(None);
        };
        Poll::Ready(Some(self.fence.check().map(|()| http_body::Frame::data(bytes))))
    }

    /// Not at its end before the first poll, even when empty: the fence is always looked at.
    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(duration: u64, grace: u64) -> LeaseTiming {
        LeaseTiming::new(Duration::from_secs(duration), Duration::from_secs(grace)).unwrap()
    }

    #[test]
    fn the_fence_closes_at_last_renewal_plus_duration_minus_grace() {
        let t = timing(15, 5);
        let renewed = Instant::now();
        let deadline = t.deadline(renewed);
        assert_eq!(deadline - renewed, Duration::from_secs(10));
        assert!(is_open(Some(deadline), renewed));
        assert!(is_open(Some(deadline), deadline - Duration::from_millis(1)));
        assert!(!is_open(Some(deadline), deadline), "closed at the deadline itself");
        assert!(!is_open(Some(deadline), deadline + Duration::from_secs(1)));
        assert!(!is_open(None, renewed), "never renewed: closed");
    }

    #[test]
    fn renewals_fit_four_times_in_the_window_and_time_out_before_it_ends() {
        let t = timing(15, 5);
        assert_eq!(t.window(), Duration::from_secs(10));
        assert!(t.renew_every() * 4 <= t.window());
        assert!(t.renew_timeout() < t.window());
        assert!(t.api_read_timeout() < t.window());
        let short = timing(4, 2);
        assert!(short.renew_every() * 4 <= short.window());
    }

    #[test]
    fn a_grace_outside_the_duration_is_refused() {
        for (d, g) in [(10, 0), (10, 10), (5, 8)] {
            let err = LeaseTiming::new(Duration::from_secs(d), Duration::from_secs(g)).unwrap_err();
            assert!(err.contains("renew grace"), "{err}");
        }
    }

    #[test]
    fn a_leased_fence_opens_on_renewal_never_moves_back_and_closes() {
        let fence = Fence::leased();
        assert!(fence.check().is_err(), "closed before the first renewal");
        let far = Instant::now() + Duration::from_secs(60);
        fence.renewed(far);
        assert!(fence.is_open());
        fence.renewed(Instant::now() + Duration::from_secs(1));
        assert_eq!(fence.deadline(), Some(far), "a slower renewal does not shorten the deadline");
        fence.close();
        assert_eq!(fence.check(), Err(Fenced));
        fence.renewed(Instant::now() - Duration::from_secs(1));
        assert!(!fence.is_open(), "a deadline in the past is closed");
        fence.renewed(Instant::now() + Duration::from_secs(60));
        assert!(!fence.is_open(), "expired: a late renewal does not reopen it");
        fence.close();
        fence.renewed(Instant::now() + Duration::from_secs(60));
        assert!(fence.is_open(), "closed and reset: the next leadership opens it again");
        assert!(Fence::unfenced().is_open() && Fence::default().check().is_ok());
    }

    #[tokio::test]
    async fn opened_waits_for_the_first_renewal() {
        Fence::unfenced().opened().await;
        let fence = Fence::leased();
        let waiting = tokio::spawn({
            let fence = fence.clone();
            async move { fence.opened().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "closed: still waiting");
        fence.renewed(Instant::now() + Duration::from_secs(30));
        tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("opened on renewal").unwrap();
    }

    #[tokio::test]
    async fn bounded_work_is_cut_at_the_deadline_unless_renewed_before_it() {
        let fence = Fence::leased();
        assert_eq!(fence.bounded(async { 1 }).await, Err(Fenced), "closed: refused");
        fence.renewed(Instant::now() + Duration::from_secs(30));
        assert_eq!(fence.bounded(async { 2 }).await, Ok(2));
        fence.close();
        fence.renewed(Instant::now() + Duration::from_millis(100));
        let cut = fence.bounded(std::future::pending::<()>());
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), cut).await, Ok(Err(Fenced)));
        // Renewed while the work runs: it goes on past the first deadline.
        fence.close();
        fence.renewed(Instant::now() + Duration::from_millis(100));
        let renewer = fence.clone();
        let work = async {
            tokio::task::yield_now().await;
            renewer.renewed(Instant::now() + Duration::from_secs(30));
            tokio::time::sleep(Duration::from_millis(200)).await;
            3
        };
        assert_eq!(fence.bounded(work).await, Ok(3));
    }

    /// A freeze past the deadline, as the work sees it: its first poll returns only once the
    /// deadline has passed (the process "resumes"), and its next poll would go on to the wire.
    #[tokio::test]
    async fn work_found_ready_after_the_deadline_is_not_polled_again() {
        let fence = Fence::leased();
        fence.renewed(Instant::now() + Duration::from_millis(50));
        let went_on = std::sync::atomic::AtomicBool::new(false);
        let mut polls = 0;
        let work = std::future::poll_fn(|cx| {
            polls += 1;
            if polls == 1 {
                let deadline = fence.deadline().unwrap();
                while Instant::now() <= deadline {
                    std::hint::spin_loop();
                }
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            went_on.store(true, Ordering::SeqCst);
            Poll::Ready(())
        });
        assert_eq!(fence.bounded(work).await, Err(Fenced));
        assert!(!went_on.load(Ordering::SeqCst), "polled again past the deadline");
    }

    /// An HTTP/1.1 server on loopback that answers each request (5-byte bodies) `204` and
    /// reports, as each connection closes, the requests it answered on it and the bytes
    /// received beyond them (the start of a request never finished).
    async fn counting_server() -> (String, tokio::sync::mpsc::UnboundedReceiver<(usize, usize)>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let (closed, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let closed = closed.clone();
                tokio::spawn(async move {
                    let (mut answered, mut pending, mut buf) = (0, Vec::new(), [0u8; 4096]);
                    while let Ok(n @ 1..) = socket.read(&mut buf).await {
                        pending.extend_from_slice(&buf[..n]);
                        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n")
                            && pending.len() >= end + 4 + 5
                        {
                            pending.drain(..end + 4 + 5);
                            answered += 1;
                            let _ = socket.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                        }
                    }
                    let _ = closed.send((answered, pending.len()));
                });
            }
        });
        (url, rx)
    }

    async fn next_closed(closed: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, usize)>) -> Option<(usize, usize)> {
        tokio::time::timeout(Duration::from_secs(10), closed.recv()).await.expect("the connection closes")
    }

    #[tokio::test]
    async fn a_body_whose_fence_closed_is_never_written_on_a_new_or_pooled_connection() {
        let (url, mut closed) = counting_server().await;
        let fence = Fence::leased();
        fence.renewed(Instant::now() + Duration::from_secs(60));
        let http = reqwest::Client::new();
        let sent = http.post(&url).body(fence.body(&b"hello"[..])).send().await.unwrap();
        assert_eq!(sent.status(), 204, "open: sent, and the connection stays in the pool");

        // The fence closes while the next request waits for a connection: it gets the pooled
        // one, and nothing of it is written there (not even its head).
        fence.close();
        let refused = http.post(&url).body(fence.body(&b"hello"[..])).send().await.unwrap_err();
        assert!(std::error::Error::source(&refused).is_some(), "{refused:?}");
        assert_eq!(next_closed(&mut closed).await, Some((1, 0)), "the pooled connection got the first request only");

        // A new connection, made after the fence closed: accepted, and nothing written on it.
        let fresh = reqwest::Client::new();
        assert!(fresh.post(&url).body(fence.body(&b"hello"[..])).send().await.is_err());
        assert_eq!(next_closed(&mut closed).await, Some((0, 0)), "nothing written on a new connection");
    }
}
