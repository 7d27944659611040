//! The controller's notion of "now". Production reads the system clock; tests use a
//! [`TestClock`] they can set and advance, so schedules are tested without waiting for
//! wall-clock time.

use std::sync::{Arc, Mutex};

use futures::stream::{self, BoxStream, StreamExt};
use jiff::{SignedDuration, Timestamp};
use tokio::sync::watch;

/// Where the controller reads the time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;

    /// Yields each time the clock jumps (a test clock set or advanced); the controller then
    /// plans every import again. The system clock never jumps.
    fn jumps(&self) -> BoxStream<'static, ()> {
        stream::pending().boxed()
    }
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that runs at the real rate from a time the test chooses, and jumps when told.
///
/// Running at the real rate keeps the controller's timers (`requeue(next - now)`) honest:
/// set it a few seconds before a run and the run starts a few seconds later; jump it past a
/// run and every import is planned again at once.
#[derive(Clone, Debug)]
pub struct TestClock {
    inner: Arc<TestClockInner>,
}

#[derive(Debug)]
struct TestClockInner {
    /// Added to the system clock.
    offset: Mutex<SignedDuration>,
    jumped: watch::Sender<u64>,
}

impl TestClock {
    /// A clock that reads `start` now.
    pub fn starting_at(start: Timestamp) -> Self {
        let clock = TestClock {
            inner: Arc::new(TestClockInner { offset: Mutex::new(SignedDuration::ZERO), jumped: watch::Sender::new(0) }),
        };
        *clock.inner.offset.lock().unwrap() = start.duration_since(Timestamp::now());
        clock
    }

    /// Jumps to `t` and wakes the controller.
    pub fn set(&self, t: Timestamp) {
        *self.inner.offset.lock().unwrap() = t.duration_since(Timestamp::now());
        self.inner.jumped.send_modify(|n| *n += 1);
    }

    /// Jumps ahead by `by` and wakes the controller.
    pub fn advance(&self, by: SignedDuration) {
        *self.inner.offset.lock().unwrap() += by;
        self.inner.jumped.send_modify(|n| *n += 1);
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        let offset = *self.inner.offset.lock().unwrap();
        Timestamp::now() + offset
    }

    fn jumps(&self) -> BoxStream<'static, ()> {
        let rx = self.inner.jumped.subscribe();
        stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_clock_starts_where_told_and_jumps_wake_listeners() {
        let start: Timestamp = "2030-01-01T06:29:00Z".parse().unwrap();
        let clock = TestClock::starting_at(start);
        let now = clock.now();
        assert!(now >= start && now.duration_since(start) < SignedDuration::from_secs(5));

        let mut jumps = clock.jumps();
        clock.advance(SignedDuration::from_hours(1));
        jumps.next().await.expect("a jump is reported");
        assert!(clock.now().duration_since(start) >= SignedDuration::from_hours(1));

        clock.set(start);
        jumps.next().await.expect("a jump is reported");
        assert!(clock.now().duration_since(start) < SignedDuration::from_secs(5));
    }
}
