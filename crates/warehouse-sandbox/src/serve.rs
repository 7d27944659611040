//! What the Snowflake and Databricks stand-ins share: serving their router on loopback until
//! dropped, and the queue of faults a test injects for the next request of a kind.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;

use axum::Router;

/// A router served on a bound listener; the task stops when this is dropped.
pub(crate) struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub(crate) fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<Server> {
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Server { addr, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Faults waiting for a request they target, in the order injected.
pub(crate) struct Faults<T, F>(Mutex<VecDeque<(T, F)>>);

impl<T, F> Default for Faults<T, F> {
    fn default() -> Self {
        Faults(Mutex::new(VecDeque::new()))
    }
}

impl<T: PartialEq, F> Faults<T, F> {
    /// Answers the next request aimed at `target` with `fault`.
    pub(crate) fn push(&self, target: T, fault: F) {
        self.0.lock().unwrap().push_back((target, fault));
    }

    /// The first fault injected for `target`, taken off the queue.
    pub(crate) fn take(&self, target: T) -> Option<F> {
        let mut faults = self.0.lock().unwrap();
        let at = faults.iter().position(|(t, _)| *t == target)?;
        faults.remove(at).map(|(_, f)| f)
    }
}
