//! One Braze request budget per destination, shared by every run in the process.
//!
//! Braze limits these endpoints per workspace (documented: 250,000 requests an hour) and
//! answers 429 past the limit. A hundred imports of one workspace due at 06:00, each with
//! its own retries, would collect 429s and some would fail; instead every request of a
//! destination — REST endpoint + partner + workspace — first takes a token from that
//! destination's bucket, and waits its turn (first come, first served) when there is none.
//!
//! Braze counts its limit per hour, so the bucket holds the hour's budget (the default
//! burst is the hourly limit): a destination spends what Braze allows at once instead of
//! being smoothed to the hourly average, and refills at that average. It listens to Braze:
//! a response's `x-ratelimit-remaining` lowers the tokens to Braze's count (this process's
//! share of it, with shards) when another sender spent part of the window, never raises
//! them above the operator's own budget; when less than a tenth of the limit is left, what
//! is left is spread over what is left of Braze's window (`x-ratelimit-reset`) — polite,
//! not bursting to the last request; `remaining: 0` or a 429 close it until the reset (or
//! `Retry-After`), and a 429 without either closes it for a backoff. Fairness between
//! imports is the queue's (first come, first served), not a slower rate for everyone.
//!
//! The workspace is known by a keyed one-way hash of its data import key (the key never
//! leaves the [`crate::secret::SecretString`]); the hash key is random per process.
//!
//! Hand-written rather than `governor`: governor's GCRA cannot be drained or paused from
//! outside (no "Braze says 3 left until 06:00:00"), and the pure bucket below is small and
//! tested with a clock the tests control.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::HeaderMap;
use tokio::time::Instant;

use super::retry::server_wait_hint;

/// Braze's documented limit for the partner cohort import endpoints.
pub const BRAZE_REQUESTS_PER_HOUR: u32 = 250_000;

/// Rate, burst and patience of every destination's bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetConfig {
    /// Sustained requests per hour per destination.
    pub requests_per_hour: u32,
    /// Requests that may go at once after a quiet spell: by default the hour's budget.
    pub burst: u32,
    /// Operators that share each destination's budget (the shards); this one takes
    /// 1/`shards` of it ([`Self::shared_by`]), and of what Braze says is left.
    pub shards: u32,
    /// Longest one request waits for budget; past it the run stops (`RateLimited`) and
    /// the next run sends the rest. The run's own end (stopped, lost Lease) ends it sooner.
    pub max_wait: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            requests_per_hour: BRAZE_REQUESTS_PER_HOUR,
            // The hour's budget: Braze counts per hour, so what it allows may go at once.
            burst: BRAZE_REQUESTS_PER_HOUR,
            shards: 1,
            // Braze's window is an hour: no honest wait is longer.
            max_wait: Duration::from_secs(3600),
        }
    }
}

impl BudgetConfig {
    /// Refuses settings that would never let a request through.
    pub fn validate(&self) -> Result<(), String> {
        if self.requests_per_hour == 0 {
            return Err("--braze-requests-per-hour must be at least 1 (Braze documents 250000)".into());
        }
        if self.burst == 0 {
            return Err("--braze-burst must be at least 1 (a request takes one token)".into());
        }
        Ok(())
    }

    fn per_second(&self) -> f64 {
        f64::from(self.requests_per_hour) / 3600.0
    }

    /// This process's share when `shards` operators (one per shard) send to the same
    /// destinations: 1/N of the rate and of the burst (at least one request), so that all
    /// shards together stay within the budget.
    pub fn shared_by(self, shards: usize) -> Self {
        let n = u32::try_from(shards.max(1)).unwrap_or(u32::MAX);
        let (requests_per_hour, burst) = ((self.requests_per_hour / n).max(1), (self.burst / n).max(1));
        Self { requests_per_hour, burst, shards: n, ..self }
    }
}

/// What one Braze answer says about the limit.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LimitSignal {
    /// The answer was 429.
    pub limited: bool,
    /// `x-ratelimit-remaining`.
    pub remaining: Option<u64>,
    /// `x-ratelimit-limit`: the window's whole budget.
    pub limit: Option<u64>,
    /// Until `x-ratelimit-reset`, or `Retry-After` on a 429.
    pub reset_in: Option<Duration>,
}

impl LimitSignal {
    /// Reads the headers of an answer with `status`, at wall-clock time `now`.
    pub fn read(status: u16, headers: &HeaderMap, now: jiff::Timestamp) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let limited = status == 429;
        let remaining = text("x-ratelimit-remaining").and_then(|v| v.trim().parse().ok());
        let limit = text("x-ratelimit-limit").and_then(|v| v.trim().parse().ok()).filter(|l| *l > 0);
        let reset = server_wait_hint(None, text("x-ratelimit-reset"), now);
        // Braze documents no Retry-After; honoured on a 429 when present.
        let retry_after = if limited { server_wait_hint(text("retry-after"), None, now) } else { None };
        Self { limited, remaining, limit, reset_in: retry_after.max(reset) }
    }
}

/// Below this share of Braze's limit left in its window, the bucket paces what is left.
const POLITE_BELOW: f64 = 0.1;

/// A token bucket that Braze's answers can slow down or close. Pure: every call takes the
/// time, so tests drive it with instants of their own.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
    /// Braze said: nothing until then.
    closed_until: Option<Instant>,
    /// Braze said: only so many until then; the rate is capped to fit.
    capped: Option<(f64, Instant)>,
    /// 429s without a reset in a row, for the backoff of the next one.
    blind_429s: u32,
    /// This process's part of what Braze says is left (1/shards).
    share: f64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(config: &BudgetConfig, now: Instant) -> Self {
        Self {
            per_second: config.per_second(),
            burst: f64::from(config.burst),
            tokens: f64::from(config.burst),
            updated: now,
            closed_until: None,
            capped: None,
            blind_429s: 0,
            share: 1.0 / f64::from(config.shards.max(1)),
        }
    }

    fn rate(&self, now: Instant) -> f64 {
        match self.capped {
            Some((rate, until)) if now < until => rate.min(self.per_second),
            _ => self.per_second,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(until) = self.closed_until {
            if now < until {
                return;
            }
            self.closed_until = None;
            self.updated = self.updated.max(until);
        }
        if now > self.updated {
            let gained = now.duration_since(self.updated).as_secs_f64() * self.rate(now);
            self.tokens = (self.tokens + gained).min(self.burst);
            self.updated = now;
        }
    }

    /// Takes a token, or says when to ask again.
    pub fn take(&mut self, now: Instant) -> Result<(), Instant> {
        self.refill(now);
        if let Some(until) = self.closed_until {
            return Err(until);
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(now + Duration::from_secs_f64(missing / self.rate(now)))
    }

    /// Whether the bucket holds nothing a new one would not (full, open, uncapped, no 429s
    /// in a row) at `now`: then it may be dropped and made again on next use.
    pub fn at_rest(&mut self, now: Instant) -> bool {
        self.refill(now);
        let capped = self.capped.is_some_and(|(_, until)| now < until);
        self.closed_until.is_none() && !capped && self.blind_429s == 0 && self.tokens >= self.burst
    }

    /// Closes the bucket until `until`: nothing goes before, and it refills from empty.
    pub fn close_until(&mut self, until: Instant) {
        self.tokens = 0.0;
        self.closed_until = Some(self.closed_until.map_or(until, |t| t.max(until)));
    }

    /// Adapts to what Braze said at `now`. `backoff(n)` is the pause after the n-th 429 in
    /// a row that named no reset.
    pub fn observe(&mut self, signal: LimitSignal, now: Instant, backoff: impl FnOnce(u32) -> Duration) {
        self.refill(now);
        if signal.limited {
            let wait = match signal.reset_in {
                Some(wait) => {
                    self.blind_429s = 0;
                    wait
                }
                None => {
                    self.blind_429s += 1;
                    backoff(self.blind_429s)
                }
            };
            self.close_until(now + wait);
            return;
        }
        self.blind_429s = 0;
        match (signal.remaining, signal.reset_in) {
            (Some(0), Some(wait)) => self.close_until(now + wait),
            (Some(remaining), reset) => self.calibrate(remaining as f64, reset, signal.limit, now),
            (None, _) => {}
        }
    }

    /// Braze says `remaining` are left of its window's `limit` until `reset`; this process
    /// counts its share of them.
    fn calibrate(&mut self, remaining: f64, reset: Option<Duration>, limit: Option<u64>, now: Instant) {
        let limit = limit.map_or(self.per_second * 3600.0 / self.share, |l| l as f64);
        let low = remaining < POLITE_BELOW * limit;
        let remaining = remaining * self.share;
        match reset.filter(|w| !w.is_zero()) {
            // Little left: what is left, spread over what is left of Braze's window.
            Some(wait) if low => {
                self.tokens = self.tokens.min(remaining);
                self.capped = Some((remaining / wait.as_secs_f64(), now + wait));
            }
            // Otherwise Braze's count only lowers what this process may still send (another
            // sender on the workspace): never above the operator's own budget.
            _ => self.tokens = self.tokens.min(remaining),
        }
    }
}

/// One destination's bucket, and the queue of requests waiting for it.
#[derive(Debug)]
pub struct Budget {
    bucket: Mutex<TokenBucket>,
    /// First come, first served: only the head of the queue sleeps on the bucket.
    queue: tokio::sync::Mutex<()>,
}

impl Budget {
    pub fn new(config: &BudgetConfig) -> Self {
        Self { bucket: Mutex::new(TokenBucket::new(config, Instant::now())), queue: tokio::sync::Mutex::new(()) }
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, TokenBucket> {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a token; returns how long it waited. Dropping the future leaves the queue.
    pub async fn acquire(&self) -> Duration {
        let started = Instant::now();
        let _turn = self.queue.lock().await;
        loop {
            let next = self.bucket().take(Instant::now());
            match next {
                Ok(()) => return started.elapsed(),
                Err(at) => tokio::time::sleep_until(at).await,
            }
        }
    }

    pub fn observe(&self, signal: LimitSignal, backoff: impl FnOnce(u32) -> Duration) {
        self.bucket().observe(signal, Instant::now(), backoff);
    }

    fn at_rest(&self, now: Instant) -> bool {
        self.bucket().at_rest(now)
    }
}

/// A run's admission slot as its Braze requests see it (see [`holding`]).
pub trait SlotHolder: Send + Sync {
    /// Gives the run's slot to another run, if it still holds it.
    fn hand_over(&self);
    /// Takes the slot back, waiting for it as a run waiting to start does.
    fn take_back(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

tokio::task_local! {
    static SLOT: Arc<dyn SlotHolder>;
}

/// A wait for budget longer than this is not pacing but throttling: the run gives its slot
/// away until its request has a token.
pub const HAND_OVER_AFTER: Duration = Duration::from_millis(500);

/// Runs `work` — one run, in one task — with `slot` as the admission slot its Braze requests
/// give away while they wait long for budget: runs of a throttled destination then do not
/// hold slots that runs of every other destination could use.
pub async fn holding<F: Future>(slot: Arc<dyn SlotHolder>, work: F) -> F::Output {
    SLOT.scope(slot, work).await
}

impl Budget {
    /// [`Self::acquire`], giving the run's slot away ([`holding`]) once the wait passes
    /// [`HAND_OVER_AFTER`], and taking it back once the token is there. Returns the wait
    /// for the token.
    pub async fn acquire_handing_over(&self) -> Duration {
        let acquire = self.acquire();
        tokio::pin!(acquire);
        tokio::select! {
            waited = &mut acquire => return waited,
            () = tokio::time::sleep(HAND_OVER_AFTER) => {}
        }
        let Ok(slot) = SLOT.try_with(Arc::clone) else {
            return acquire.await;
        };
        slot.hand_over();
        let waited = acquire.await;
        slot.take_back().await;
        waited
    }
}

/// Told of every wait for budget (the operator's metrics).
pub trait BudgetObserver: Send + Sync {
    fn waited(&self, wait: Duration);
}

/// Which budget a request draws from. No key in it: the workspace is a keyed hash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    endpoint: String,
    partner: String,
    workspace: u64,
}

/// Every destination's budget in this process. Cheap to share; clones of a
/// [`super::BrazeClient`] share one.
pub struct Budgets {
    config: BudgetConfig,
    /// Keyed per process: a workspace hash means nothing outside it.
    hasher: RandomState,
    budgets: Mutex<Entries>,
    observer: Option<Arc<dyn BudgetObserver>>,
}

/// The destinations' budgets, and the size at which idle ones are next looked for.
#[derive(Default)]
struct Entries {
    by_destination: HashMap<Destination, Arc<Budget>>,
    prune_at: usize,
}

/// Below this many destinations the map is not pruned.
const PRUNE_FROM: usize = 64;

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Budgets {
    pub fn new(config: BudgetConfig) -> Self {
        Self { config, hasher: RandomState::new(), budgets: Mutex::default(), observer: None }
    }

    pub fn with_observer(mut self, observer: Arc<dyn BudgetObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn config(&self) -> &BudgetConfig {
        &self.config
    }

    pub fn destination(&self, rest_endpoint: &str, partner: &str, data_import_key: &str) -> Destination {
        Destination {
            endpoint: rest_endpoint.trim().trim_end_matches('/').to_ascii_lowercase(),
            partner: partner.to_ascii_lowercase(),
            workspace: self.hasher.hash_one(data_import_key),
        }
    }

    /// The destination's budget, created full on first use. Idle budgets — in no request's
    /// hands and holding nothing a new one would not ([`TokenBucket::at_rest`]) — are dropped
    /// as the map grows (each time it doubles), so destinations that come and go (workspaces
    /// of deleted imports, rotated keys) do not pile up.
    pub fn get(&self, destination: Destination) -> Arc<Budget> {
        self.get_with(destination, &self.config)
    }

    /// [`Self::get`] for a destination with limits of its own (`/users/track`'s).
    pub fn get_with(&self, destination: Destination, config: &BudgetConfig) -> Arc<Budget> {
        self.get_at(destination, config, Instant::now())
    }

    fn get_at(&self, destination: Destination, config: &BudgetConfig, now: Instant) -> Arc<Budget> {
        let mut entries = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if entries.by_destination.len() >= entries.prune_at.max(PRUNE_FROM) {
            entries.by_destination.retain(|_, budget| Arc::strong_count(budget) > 1 || !budget.at_rest(now));
            entries.prune_at = entries.by_destination.len() * 2;
        }
        entries.by_destination.entry(destination).or_insert_with(|| Arc::new(Budget::new(config))).clone()
    }

    /// Destinations with a budget in memory.
    pub fn len(&self) -> usize {
        self.budgets.lock().unwrap_or_else(|e| e.into_inner()).by_destination.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn waited(&self, wait: Duration) {
        if let Some(observer) = &self.observer {
            observer.waited(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(per_hour: u32, burst: u32) -> BudgetConfig {
        BudgetConfig { requests_per_hour: per_hour, burst, ..BudgetConfig::default() }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn no_backoff(_: u32) -> Duration {
        panic!("no backoff expected")
    }

    #[test]
    fn a_full_bucket_gives_its_burst_then_one_token_per_interval() {
        let t0 = Instant::now();
        // 3,600 an hour: one a second.
        let mut bucket = TokenBucket::new(&config(3600, 3), t0);
        for _ in 0..3 {
            assert_eq!(bucket.take(t0), Ok(()));
        }
        assert_eq!(bucket.take(t0), Err(t0 + ms(1000)));
        assert_eq!(bucket.take(t0 + ms(999)), Err(t0 + ms(1000)));
        assert_eq!(bucket.take(t0 + ms(1000)), Ok(()));
        // A long quiet spell refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(bucket.take(later), Ok(()));
        }
        assert!(bucket.take(later).is_err());
    }

    #[test]
    fn over_any_span_no_more_than_rate_times_span_plus_burst_goes() {
        let t0 = Instant::now();
        // 600 a minute, burst 10: in 60 s at most 610.
        let mut bucket = TokenBucket::new(&config(36_000, 10), t0);
        let mut now = t0;
        let mut taken = 0;
        while now < t0 + Duration::from_secs(60) {
            match bucket.take(now) {
                Ok(()) => taken += 1,
                Err(at) => now = at,
            }
        }
        assert!((609..=610).contains(&taken), "{taken}");
    }

    #[test]
    fn remaining_zero_closes_until_the_reset_and_refills_from_empty() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(&config(3600, 5), t0);
        let signal =
            LimitSignal { limited: false, remaining: Some(0), reset_in: Some(Duration::from_secs(30)), limit: None };
        bucket.observe(signal, t0, no_backoff);
        let reset = t0 + Duration::from_secs(30);
        assert_eq!(bucket.take(t0 + ms(10)), Err(reset));
        assert_eq!(bucket.take(reset), Err(reset + ms(1000)), "empty at the reset, then the normal rate");
        assert_eq!(bucket.take(reset + ms(1000)), Ok(()));
    }

    #[test]
    fn a_429_closes_until_its_reset_or_retry_after_and_a_blind_one_backs_off() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(&config(3600, 5), t0);
        let limited =
            LimitSignal { limited: true, remaining: None, reset_in: Some(Duration::from_secs(7)), limit: None };
        bucket.observe(limited, t0, no_backoff);
        assert_eq!(bucket.take(t0), Err(t0 + Duration::from_secs(7)));
        // A later, shorter close does not reopen it early.
        let short = LimitSignal { reset_in: Some(ms(100)), ..limited };
        bucket.observe(short, t0, no_backoff);
        assert_eq!(bucket.take(t0 + ms(200)), Err(t0 + Duration::from_secs(7)));

        let mut bucket = TokenBucket::new(&config(3600, 5), t0);
        let blind = LimitSignal { limited: true, remaining: None, reset_in: None, limit: None };
        let mut seen = Vec::new();
        for _ in 0..3 {
            bucket.observe(blind, t0, |n| {
                seen.push(n);
                ms(50 * u64::from(n))
            });
        }
        assert_eq!(seen, [1, 2, 3]);
        assert_eq!(bucket.take(t0), Err(t0 + ms(150)));
    }

    #[test]
    fn few_remaining_slow_the_rate_until_the_reset_and_never_speed_it_up() {
        let t0 = Instant::now();
        // 36,000 an hour = 10 a second; Braze says 10 left for the next 10 s: 1 a second.
        let mut bucket = TokenBucket::new(&config(36_000, 5), t0);
        let signal =
            LimitSignal { limited: false, remaining: Some(10), reset_in: Some(Duration::from_secs(10)), limit: None };
        bucket.observe(signal, t0, no_backoff);
        for _ in 0..5 {
            assert_eq!(bucket.take(t0), Ok(()));
        }
        assert_eq!(bucket.take(t0), Err(t0 + ms(1000)));
        // After the reset, the configured rate again.
        let after = t0 + Duration::from_secs(20);
        for _ in 0..5 {
            assert_eq!(bucket.take(after), Ok(()));
        }
        assert_eq!(bucket.take(after), Err(after + ms(100)));
        // Plenty remaining changes nothing.
        let plenty = LimitSignal {
            remaining: Some(1_000_000),
            reset_in: Some(Duration::from_secs(1)),
            ..LimitSignal::default()
        };
        bucket.observe(plenty, after, no_backoff);
        assert_eq!(bucket.take(after), Err(after + ms(100)));
    }

    #[test]
    fn the_hours_budget_goes_at_once_and_brazes_count_calibrates_it() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(&BudgetConfig::default(), t0);
        // A 1,000,000-member first import: 1,000 requests, none waits.
        for _ in 0..1000 {
            assert_eq!(bucket.take(t0), Ok(()));
        }
        assert_eq!(bucket.tokens, 249_000.0);
        // Braze counts more sent (another sender on the workspace): its count wins.
        let hour = Some(Duration::from_secs(3000));
        let said = |remaining| LimitSignal {
            remaining: Some(remaining),
            limit: Some(250_000),
            reset_in: hour,
            ..LimitSignal::default()
        };
        bucket.observe(said(100_000), t0, no_backoff);
        assert_eq!(bucket.tokens, 100_000.0);
        // More left than this process's own budget: never raised above it.
        bucket.observe(said(240_000), t0, no_backoff);
        assert_eq!(bucket.tokens, 100_000.0);
        assert_eq!(bucket.rate(t0), bucket.per_second, "plenty left: no pacing");
        // Low (under a tenth of the limit): what is left, paced over what is left of the window.
        bucket.observe(said(3_000), t0, no_backoff);
        assert_eq!(bucket.tokens, 3_000.0);
        assert_eq!(bucket.rate(t0), 1.0, "3,000 over 3,000 s");
        // A shard counts its share of what Braze says is left.
        let mut share = TokenBucket::new(&BudgetConfig::default().shared_by(4), t0);
        share.observe(said(240_000), t0, no_backoff);
        assert_eq!(share.tokens, 60_000.0, "a quarter of what is left");
        share.observe(said(24_000), t0, no_backoff);
        assert_eq!((share.tokens, share.rate(t0)), (6_000.0, 2.0), "low: its quarter, paced");
    }

    #[test]
    fn remaining_lowers_the_tokens_held() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(&config(3600, 100), t0);
        bucket.observe(LimitSignal { remaining: Some(2), ..LimitSignal::default() }, t0, no_backoff);
        assert_eq!(bucket.take(t0), Ok(()));
        assert_eq!(bucket.take(t0), Ok(()));
        assert!(bucket.take(t0).is_err());
    }

    #[test]
    fn signals_are_read_from_lowercase_headers_and_retry_after_counts_only_on_429() {
        let now: jiff::Timestamp = "2026-11-29T00:00:00Z".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-limit", "600".parse().unwrap());
        headers.insert("x-ratelimit-remaining", "17".parse().unwrap());
        headers.insert("x-ratelimit-reset", (now.as_second() + 20).to_string().parse().unwrap());
        headers.insert("retry-after", "45".parse().unwrap());
        let ok = LimitSignal::read(201, &headers, now);
        let read = LimitSignal {
            remaining: Some(17),
            limit: Some(600),
            reset_in: Some(Duration::from_secs(20)),
            limited: false,
        };
        assert_eq!(ok, read);
        let limited = LimitSignal::read(429, &headers, now);
        assert_eq!(limited, LimitSignal { limited: true, reset_in: Some(Duration::from_secs(45)), ..read });
        let bare = LimitSignal::read(429, &HeaderMap::new(), now);
        assert_eq!(bare, LimitSignal { limited: true, ..LimitSignal::default() });
        headers.insert("x-ratelimit-remaining", "many".parse().unwrap());
        assert_eq!(LimitSignal::read(200, &headers, now).remaining, None);
    }

    #[test]
    fn destinations_are_per_endpoint_partner_and_workspace_and_hide_the_key() {
        let budgets = Budgets::new(BudgetConfig::default());
        let a = budgets.destination("https://rest.iad-01.braze.com/", "Kubit", "secret-key-1");
        let b = budgets.destination("https://REST.iad-01.braze.com", "kubit", "secret-key-1");
        assert_eq!(a, b);
        assert_ne!(a, budgets.destination("https://rest.iad-01.braze.com", "kubit", "secret-key-2"));
        assert_ne!(a, budgets.destination("https://rest.iad-02.braze.com", "kubit", "secret-key-1"));
        assert_ne!(a, budgets.destination("https://rest.iad-01.braze.com", "other", "secret-key-1"));
        assert!(!format!("{a:?}").contains("secret-key"));
        assert!(Arc::ptr_eq(&budgets.get(a.clone()), &budgets.get(b)));
        assert!(!Arc::ptr_eq(&budgets.get(a), &budgets.get(budgets.destination("x", "y", "z"))));
    }

    #[test]
    fn settings_that_never_let_a_request_through_are_refused() {
        assert!(BudgetConfig::default().validate().is_ok());
        let e = config(0, 1).validate().unwrap_err();
        assert!(e.contains("--braze-requests-per-hour"), "{e}");
        let e = config(1, 0).validate().unwrap_err();
        assert!(e.contains("--braze-burst"), "{e}");
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order_at_the_rate() {
        // 72,000 an hour = 20 a second, burst 1: five requests take at least 200 ms.
        let budget = Arc::new(Budget::new(&config(72_000, 1)));
        let started = Instant::now();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (budget, order) = (budget.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let waited = budget.acquire().await;
                order.lock().unwrap().push(i);
                waited
            }));
            // Each task queues before the next is spawned.
            tokio::task::yield_now().await;
        }
        let mut waits = Vec::new();
        for task in tasks {
            waits.push(task.await.unwrap());
        }
        assert!(started.elapsed() >= ms(195), "{:?}", started.elapsed());
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
        assert!(waits[0] < ms(20), "{waits:?}");
        assert!(waits[4] >= ms(190), "{waits:?}");
    }

    #[test]
    fn each_shard_takes_its_share_and_all_together_stay_within_the_budget() {
        let whole = BudgetConfig::default();
        let third = whole.clone().shared_by(3);
        assert_eq!((third.requests_per_hour, third.burst), (83_333, 83_333));
        assert!(third.requests_per_hour * 3 <= whole.requests_per_hour && third.burst * 3 <= whole.burst);
        assert_eq!(whole.clone().shared_by(1), whole);
        assert_eq!(whole.clone().shared_by(0), whole, "no shards: the whole budget");
        let tiny = config(2, 1).shared_by(5);
        assert_eq!((tiny.requests_per_hour, tiny.burst), (1, 1), "never below one request");
        assert!(tiny.validate().is_ok());
    }

    #[test]
    fn idle_budgets_are_dropped_as_the_map_grows_and_busy_ones_kept() {
        let budgets = Budgets::new(config(3600, 2));
        let get = |name: &str, at| budgets.get_at(budgets.destination("https://a", "p", name), &budgets.config, at);
        let t0 = Instant::now();
        let busy = get("held", t0);
        get("used", t0).bucket().take(t0).unwrap();
        let closed =
            LimitSignal { limited: true, remaining: None, reset_in: Some(Duration::from_secs(600)), limit: None };
        get("throttled", t0).bucket().observe(closed, t0, no_backoff);
        for i in 3..PRUNE_FROM {
            get(&format!("gone-{i}"), t0);
        }
        assert_eq!(budgets.len(), PRUNE_FROM, "nothing is dropped below the threshold");
        // Next use at the threshold: every idle, full budget goes; the one in use, the one
        // refilling and the one Braze closed stay (each holds what a new one would not).
        get("new", t0);
        assert_eq!(budgets.len(), 4);
        // Refilled and reopened later, they go at the next pruning too; the one held stays.
        let later = t0 + Duration::from_secs(700);
        for i in 0..PRUNE_FROM {
            get(&format!("again-{i}"), later);
        }
        // Pruned when the 61st was asked for (64 in the map): the held one stayed, 4 came after.
        assert_eq!(budgets.len(), 5);
        assert!(Arc::ptr_eq(&busy, &get("held", later)), "the budget in use was kept");
    }

    /// Records what a run's slot was told.
    #[derive(Default)]
    struct Slot(Mutex<Vec<&'static str>>);

    impl SlotHolder for Slot {
        fn hand_over(&self) {
            self.0.lock().unwrap().push("handed over");
        }

        fn take_back(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            Box::pin(async move { self.0.lock().unwrap().push("taken back") })
        }
    }

    #[tokio::test]
    async fn a_long_wait_for_budget_gives_the_runs_slot_away_until_the_token_comes() {
        // One a second, burst 1: the first token at once, the second a second later.
        let budget = Budget::new(&config(3600, 1));
        let slot = Arc::new(Slot::default());
        let (short, long) = holding(slot.clone(), async {
            let short = budget.acquire_handing_over().await;
            assert!(slot.0.lock().unwrap().is_empty(), "no wait, nothing handed over");
            (short, budget.acquire_handing_over().await)
        })
        .await;
        assert!(short < HAND_OVER_AFTER && long > HAND_OVER_AFTER, "{short:?} {long:?}");
        assert_eq!(*slot.0.lock().unwrap(), ["handed over", "taken back"]);
        // Outside a run (no slot): the same wait, nothing to hand over.
        assert!(budget.acquire_handing_over().await > HAND_OVER_AFTER);
    }
}
