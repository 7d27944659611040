//! The one outbound HTTP client builder.
//!
//! Every client the operator uses for a tenant — HTTP exports, warehouse APIs and their
//! result links, token and metadata endpoints, Slack/webhook/PagerDuty reports, Braze — is
//! an [`HttpClient`] built here, so the egress policy ([`super::egress`]) is applied the same
//! way everywhere, four times over:
//!
//! 1. every URL a request is made for ([`HttpClient::request`]): a URL that names an address
//!    is connected to without DNS, so this is where a literal address meets the policy;
//! 2. every name, when it is resolved ([`EgressResolver`]): denied addresses are dropped, so
//!    a name that changes its answer (DNS rebinding) gains nothing;
//! 3. every redirect, before it is followed (or none is followed, the default);
//! 4. the address a connection actually reached, before anything is written on it (a
//!    connector layer): no path — a literal, a name, a redirect, a pooled connection's first
//!    use — writes a byte to an address a rule denies.
//!
//! Proxies from the environment are never used (a proxy resolves names out of the policy's
//! sight). Each client has a connect timeout and, where asked, a read timeout.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connection, HttpInfo};
use reqwest::{Method, RequestBuilder, Url};

use super::egress::{EgressDenied, EgressPolicy, EgressResolver};

/// `User-Agent` of every request the operator sends.
pub const USER_AGENT: &str = concat!("cohort-operator/", env!("CARGO_PKG_VERSION"));

/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 10;

/// The connect timeout unless the caller sets one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Credentials a client sends, which must not leave the first URL's origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credentials {
    None,
    /// An `Authorization` header (bearer, basic, user information in the URL): reqwest
    /// drops it on a redirect to another origin (scheme, host, port), so such a redirect
    /// is followed without it.
    Authorization,
    /// A header reqwest does not know to be a credential: a redirect to another origin
    /// stops the request (the header would go along).
    OtherHeader,
}

/// What a client does with a redirect.
#[derive(Clone, Debug)]
enum Redirects {
    /// Follows none: the 3xx is the answer. Right for anything that carries a token to an
    /// API that never redirects, and for POSTs (a redirected POST turns into a GET).
    Refuse,
    /// Follows up to [`MAX_REDIRECTS`], each URL checked under the policy first, and keeps
    /// `credentials` to `origin`.
    Follow { origin: Url, credentials: Credentials },
}

/// Builds an [`HttpClient`]; see the module documentation for what every client gets.
#[derive(Clone, Debug)]
pub struct HttpClientBuilder {
    policy: Arc<EgressPolicy>,
    connect_timeout: Duration,
    read_timeout: Option<Duration>,
    redirects: Redirects,
    pool_max_idle_per_host: Option<usize>,
    user_agent: String,
}

/// An HTTP client under the operator's egress policy. Cheap to clone (one pool).
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: reqwest::Client,
    policy: Arc<EgressPolicy>,
}

impl HttpClient {
    /// A builder under `policy`: no redirects, a 10 s connect timeout, no read timeout.
    pub fn builder(policy: &Arc<EgressPolicy>) -> HttpClientBuilder {
        HttpClientBuilder {
            policy: policy.clone(),
            connect_timeout: CONNECT_TIMEOUT,
            read_timeout: None,
            redirects: Redirects::Refuse,
            pool_max_idle_per_host: None,
            user_agent: USER_AGENT.to_owned(),
        }
    }

    /// A request for `url`, refused when the policy denies the URL's host (a name by its
    /// rules; an address, which is never resolved, by its address).
    pub fn request(&self, method: Method, url: Url) -> Result<RequestBuilder, EgressDenied> {
        self.policy.check_url(&url)?;
        Ok(self.inner.request(method, url))
    }

    pub fn get(&self, url: Url) -> Result<RequestBuilder, EgressDenied> {
        self.request(Method::GET, url)
    }

    pub fn post(&self, url: Url) -> Result<RequestBuilder, EgressDenied> {
        self.request(Method::POST, url)
    }

    /// Sends `request` (one built before, such as a retried copy), refused like
    /// [`HttpClient::request`] when the policy denies its URL.
    pub fn execute(
        &self,
        request: reqwest::Request,
    ) -> Result<impl Future<Output = reqwest::Result<reqwest::Response>> + use<>, EgressDenied> {
        self.policy.check_url(request.url())?;
        Ok(self.inner.execute(request))
    }

    /// The policy this client connects under.
    pub fn policy(&self) -> &Arc<EgressPolicy> {
        &self.policy
    }
}

impl HttpClientBuilder {
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest wait for any read (a response's head, each part of its body).
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = Some(timeout);
        self
    }

    /// Follows redirects (up to [`MAX_REDIRECTS`]), each checked under the policy before it
    /// is followed, keeping `credentials` to `origin`'s scheme, host and port.
    pub fn follow_redirects(mut self, origin: &Url, credentials: Credentials) -> Self {
        self.redirects = Redirects::Follow { origin: origin.clone(), credentials };
        self
    }

    /// Idle connections kept per host (a client that sends many requests in parallel).
    pub fn pool_max_idle_per_host(mut self, max: usize) -> Self {
        self.pool_max_idle_per_host = Some(max);
        self
    }

    /// The `User-Agent` instead of [`USER_AGENT`] (Braze's names the replica).
    pub fn user_agent(mut self, user_agent: String) -> Self {
        self.user_agent = user_agent;
        self
    }

    pub fn build(self) -> Result<HttpClient, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .dns_resolver(EgressResolver(self.policy.clone()))
            .no_proxy()
            .connector_layer(AddressCheckLayer(self.policy.clone()))
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .user_agent(self.user_agent)
            .redirect(redirect_policy(&self.policy, self.redirects));
        if let Some(timeout) = self.read_timeout {
            builder = builder.read_timeout(timeout);
        }
        if let Some(max) = self.pool_max_idle_per_host {
            builder = builder.pool_max_idle_per_host(max);
        }
        Ok(HttpClient { inner: builder.build()?, policy: self.policy })
    }
}

fn redirect_policy(policy: &Arc<EgressPolicy>, redirects: Redirects) -> reqwest::redirect::Policy {
    let Redirects::Follow { origin, credentials } = redirects else {
        return reqwest::redirect::Policy::none();
    };
    let checked = policy.clone();
    let origin = origin.origin();
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        if let Err(denied) = checked.check_url(attempt.url()) {
            return attempt.error(denied);
        }
        if credentials == Credentials::OtherHeader && attempt.url().origin() != origin {
            return attempt.error("redirected to another origin; the credential header is not sent there");
        }
        attempt.follow()
    })
}

// --- the address actually connected to ---------------------------------------------------

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Checks the peer address of every new connection before reqwest writes on it: refused
/// when a deny rule (an operator flag or the built-in list) names the address. The name's
/// own rules were applied when it was resolved, and an unnamed literal by
/// [`HttpClient::request`]; this layer is what no path around those can pass.
#[derive(Clone)]
struct AddressCheckLayer(Arc<EgressPolicy>);

impl<S> tower::Layer<S> for AddressCheckLayer {
    type Service = AddressCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AddressCheck { inner, policy: self.0.clone() }
    }
}

#[derive(Clone)]
struct AddressCheck<S> {
    inner: S,
    policy: Arc<EgressPolicy>,
}

impl<S, R> tower::Service<R> for AddressCheck<S>
where
    S: tower::Service<R>,
    S::Response: Connection + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let connecting = self.inner.call(request);
        let policy = self.policy.clone();
        Box::pin(async move {
            let connection = connecting.await.map_err(Into::into)?;
            match peer_address(&connection) {
                Some(address) => policy.check_connected(address).map_err(|denied| Box::new(denied) as BoxError)?,
                // Every TCP connection reports its peer; one that cannot is not trusted.
                None => return Err("the connection does not report its peer address".into()),
            }
            Ok(connection)
        })
    }
}

/// The address a connection reached, as the TCP connector reports it.
fn peer_address(connection: &impl Connection) -> Option<IpAddr> {
    let mut extensions = http::Extensions::new();
    connection.connected().get_extras(&mut extensions);
    extensions.get::<HttpInfo>().map(|info| info.remote_addr().ip())
}

#[cfg(test)]
mod tests {
    //! Loopback only: 127.0.0.2 stands for a denied network.
    use super::*;
    use crate::net::egress::{EgressDefault, EgressRule, denied_in};

    fn policy(deny: &[&str], default: EgressDefault) -> Arc<EgressPolicy> {
        let deny: Vec<EgressRule> = deny.iter().map(|r| r.parse().unwrap()).collect();
        Arc::new(EgressPolicy::new(vec![], deny, default))
    }

    /// A server on `address` answering every request with `answer` (status line and
    /// headers); counts the connections it accepted.
    async fn server(address: &str, answer: String) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind((address, 0)).await.unwrap();
        let at = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        (at, accepted)
    }

    fn ok() -> String {
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".to_owned()
    }

    #[tokio::test]
    async fn a_url_naming_a_denied_address_is_refused_before_any_connection() {
        let (at, accepted) = server("127.0.0.2", ok()).await;
        let client = HttpClient::builder(&policy(&["127.0.0.2"], EgressDefault::Allow)).build().unwrap();
        let url = Url::parse(&format!("http://{at}/x")).unwrap();
        let err = client.get(url).unwrap_err();
        assert!(err.to_string().contains("--egress-deny 127.0.0.2"), "{err}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_name_resolving_to_a_denied_address_is_refused_by_the_resolver() {
        let (at, accepted) = server("127.0.0.1", ok()).await;
        let client = HttpClient::builder(&policy(&["127.0.0.0/8", "::1"], EgressDefault::Allow)).build().unwrap();
        let url = Url::parse(&format!("http://localhost:{}/x", at.port())).unwrap();
        let err = client.get(url).unwrap().send().await.unwrap_err();
        assert!(denied_in(&err).is_some(), "{err:?}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_redirect_to_a_denied_address_is_not_followed() {
        let (denied_at, denied_accepted) = server("127.0.0.2", ok()).await;
        let redirect = format!(
            "HTTP/1.1 302 Found\r\nlocation: http://{denied_at}/y\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let (at, _) = server("127.0.0.1", redirect).await;
        let start = Url::parse(&format!("http://{at}/x")).unwrap();
        let client = HttpClient::builder(&policy(&["127.0.0.2"], EgressDefault::Allow))
            .follow_redirects(&start, Credentials::None)
            .build()
            .unwrap();
        let err = client.get(start).unwrap().send().await.unwrap_err();
        assert!(denied_in(&err).is_some(), "{err:?}");
        assert_eq!(denied_accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn redirects_are_refused_unless_asked_for() {
        let redirect = "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:9/\r\ncontent-length: 0\r\n\r\n".to_owned();
        let (at, _) = server("127.0.0.1", redirect).await;
        let client = HttpClient::builder(&policy(&[], EgressDefault::Allow)).build().unwrap();
        let response = client.get(Url::parse(&format!("http://{at}/")).unwrap()).unwrap().send().await.unwrap();
        assert_eq!(response.status(), 302);
    }

    #[tokio::test]
    async fn the_connected_address_is_checked_whatever_path_led_there() {
        // The layer alone, as if a URL's check had been bypassed: the connection to a
        // denied address is made, then refused before anything is written on it.
        let (at, _) = server("127.0.0.2", ok()).await;
        let denied = policy(&["127.0.0.2"], EgressDefault::Allow);
        let client = HttpClient::builder(&denied).build().unwrap();
        let url = Url::parse(&format!("http://{at}/x")).unwrap();
        let err = client.inner.get(url).send().await.unwrap_err();
        let found = denied_in(&err).unwrap_or_else(|| panic!("{err:?}"));
        assert_eq!(found.address, Some("127.0.0.2".parse().unwrap()));
        // An allowed address goes through the same layer.
        let (at, _) = server("127.0.0.1", ok()).await;
        let response = client.get(Url::parse(&format!("http://{at}/x")).unwrap()).unwrap().send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "ok");
    }
}
