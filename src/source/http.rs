//! `http`: an export fetched with GET over HTTP(S), page after page.
//!
//! Every body is parsed as it arrives, in bounded memory: CSV and NDJSON row by row, a JSON
//! document element by element ([`super::json`], on a blocking thread fed by the async
//! body). No row may be longer than `maxRowBytes`; `maxBytes` counts decompressed bytes
//! across all pages, so a gzip bomb stops there. An error answer's body is never read: the
//! error names the status, not what the server said (an export URL may be an in-cluster
//! service, and status is readable by whoever can read the import). Bodies are decompressed when the server says `Content-Encoding: gzip` and
//! also when the body itself is gzip (a `.csv.gz` export).
//!
//! Pagination follows one of: a next-page URL in the JSON body, a cursor in the JSON body
//! sent back as a query parameter, or `Link: <…>; rel="next"` headers. A page that repeats
//! an earlier URL is an error, not an endless loop (URLs are remembered as 32-byte digests,
//! at most [`MAX_PAGES`] of them). Credentials are sent only to the
//! export's own origin: a next page elsewhere is refused, and redirects elsewhere carry no
//! credentials (reqwest drops `Authorization`; a named-header credential stops the run).
//!
//! Every page, redirect and resolved address is checked against the operator's egress
//! policy ([`crate::net`]) before anything connects there.
//!
//! Messages name the URL as `scheme://host[:port]/path` — never its query (which may carry
//! a key) nor user information — with the page number and the line or position.

use std::collections::HashSet;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_compression::tokio::bufread::GzipDecoder;
use futures::TryStreamExt;
use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LINK};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::formats::{CsvRows, FormatError, NdjsonRows};
use super::json::{self, Cancelled, JsonPlan, Scalar};
use super::{BATCH_ROWS, MemberBatch, MemberSource, MemberStream, REDACT_MIN_LEN, SourceContext, SourceError};
use crate::api::{HttpFormat, HttpSource};
use crate::domain::identifiers::IdentifierFields;
use crate::net::egress;
use crate::net::{Credentials, HttpClient};
use crate::secret::{SecretString, error_chain, redact};

/// Most pages one read follows.
const MAX_PAGES: u64 = 100_000;

/// The pages one read has fetched, as SHA-256 digests of their URLs: a loop is still seen,
/// in 32 bytes a page however long the URLs a server pads its links with.
#[derive(Default)]
struct PageHistory(HashSet<[u8; 32]>);

impl PageHistory {
    /// `false` when `url` was fetched before.
    fn first_visit(&mut self, url: &Url) -> bool {
        self.0.insert(Sha256::digest(url.as_str().as_bytes()).into())
    }
}

/// Credentials resolved from Secrets.
#[derive(Debug)]
enum Auth {
    Bearer(SecretString),
    Basic { username: SecretString, password: SecretString },
    Header { name: HeaderName, value: SecretString },
}

impl Auth {
    fn secrets(&self) -> Vec<&str> {
        match self {
            Auth::Bearer(t) => vec![t.expose()],
            Auth::Basic { username, password } => vec![username.expose(), password.expose()],
            Auth::Header { value, .. } => vec![value.expose()],
        }
    }
}

pub struct HttpMembers {
    what: String,
    spec: HttpSource,
    start: Url,
    fields: IdentifierFields,
    auth: Option<Auth>,
    /// Where the credentials come from, for hints on 401/403.
    auth_from: Option<String>,
    /// Checks every page's URL, redirects, resolved and connected addresses ([`HttpClient`]).
    client: HttpClient,
}

impl std::fmt::Debug for HttpMembers {
    /// Only what `describe` shows: the URL's query and user information may carry a key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMembers")
            .field("what", &self.what)
            .field("format", &self.spec.format)
            .finish_non_exhaustive()
    }
}

/// `scheme://host[:port]/path`: no user information, no query.
pub fn display_url(url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    if url.query().is_some() {
        shown.push_str("?…");
    }
    shown
}

/// The `rel="next"` target of `Link` headers (RFC 8288), resolved against `base`.
pub fn next_link(headers: &HeaderMap, base: &Url) -> Option<Result<Url, String>> {
    for value in headers.get_all(LINK) {
        let Ok(value) = value.to_str() else { continue };
        let mut rest = value;
        while let Some(open) = rest.find('<') {
            let Some(close) = rest[open..].find('>') else { break };
            let target = &rest[open + 1..open + close];
            let after = &rest[open + close + 1..];
            // Parameters run to the next link-value, which starts with '<'.
            let params_end = after.find('<').unwrap_or(after.len());
            let params = &after[..params_end];
            let is_next = params.split(';').any(|p| {
                let Some((name, v)) = p.split_once('=') else { return false };
                name.trim().eq_ignore_ascii_case("rel")
                    && v.trim().trim_matches('"').split_ascii_whitespace().any(|r| r.eq_ignore_ascii_case("next"))
            });
            if is_next {
                return Some(base.join(target).map_err(|e| format!("Link header target {target:?}: {e}")));
            }
            rest = after;
        }
    }
    None
}

impl HttpMembers {
    /// Resolves the credentials and builds the client; checks the URL and that the
    /// pagination suits the format.
    pub async fn open(
        spec: &HttpSource,
        fields: IdentifierFields,
        ctx: &impl SourceContext,
    ) -> Result<Self, SourceError> {
        let start = Url::parse(&spec.url).map_err(|e| SourceError::Config {
            what: "http export".to_owned(),
            message: format!("url is not a valid URL: {e}"),
        })?;
        let what = format!("http export {}", display_url(&start));
        let config = |message: String| SourceError::Config { what: what.clone(), message };
        if !matches!(start.scheme(), "http" | "https") {
            return Err(config("url must start with http:// or https://".to_owned()));
        }
        if let Some(p) = &spec.pagination
            && (p.next_url_pointer.is_some() || p.cursor.is_some())
            && spec.format != HttpFormat::Json
        {
            return Err(config(
                "pagination by nextUrlPointer or cursor reads the JSON body; use format Json, or linkHeader".to_owned(),
            ));
        }
        let ns = ctx.namespace();
        let (auth, auth_from) = match &spec.auth {
            None => (None, None),
            Some(a) => match (&a.bearer_token_secret_ref, &a.basic, &a.header) {
                (Some(r), None, None) => (
                    Some(Auth::Bearer(ctx.secret_value(&r.name, &r.key).await?)),
                    Some(format!("Secret {ns}/{} key {}", r.name, r.key)),
                ),
                (None, Some(b), None) => (
                    Some(Auth::Basic {
                        username: ctx.secret_value(&b.secret_name, &b.username_key).await?,
                        password: ctx.secret_value(&b.secret_name, &b.password_key).await?,
                    }),
                    Some(format!("Secret {ns}/{}", b.secret_name)),
                ),
                (None, None, Some(h)) => {
                    let name = HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| config(format!("auth.header.name {:?} is not a header name", h.name)))?;
                    let value = ctx.secret_value(&h.value_secret_ref.name, &h.value_secret_ref.key).await?;
                    (
                        Some(Auth::Header { name, value }),
                        Some(format!("Secret {ns}/{} key {}", h.value_secret_ref.name, h.value_secret_ref.key)),
                    )
                }
                _ => return Err(config("auth: set exactly one of bearerTokenSecretRef, basic and header".to_owned())),
            },
        };
        // Checked now so that a bad value fails before any request, without showing it.
        if let Some(auth) = &auth {
            let bad = match auth {
                Auth::Bearer(t) => HeaderValue::from_str(&format!("Bearer {}", t.expose())).is_err(),
                Auth::Header { value, .. } => HeaderValue::from_str(value.expose()).is_err(),
                Auth::Basic { username, .. } => username.expose().contains(':'),
            };
            if bad {
                return Err(config(format!(
                    "the credential in {} cannot be sent in an HTTP header (control characters, or ':' in a username)",
                    auth_from.as_deref().unwrap_or("the Secret")
                )));
            }
        }
        let egress = ctx.egress();
        egress.check_url(&start).map_err(|denied| SourceError::EgressDenied { what: what.clone(), denied })?;
        let credentials = match &auth {
            Some(Auth::Header { .. }) => Credentials::OtherHeader,
            Some(_) => Credentials::Authorization,
            None if !start.username().is_empty() || start.password().is_some() => Credentials::Authorization,
            None => Credentials::None,
        };
        let client = HttpClient::builder(&egress)
            .follow_redirects(&start, credentials)
            .connect_timeout(Duration::from_secs(spec.connect_timeout_seconds.into()))
            .read_timeout(Duration::from_secs(spec.read_timeout_seconds.into()))
            .build()
            .map_err(|e| config(format!("cannot build the HTTP client: {}", error_chain(&e))))?;
        Ok(HttpMembers { what, spec: spec.clone(), start, fields, auth, auth_from, client })
    }

    fn secrets(&self) -> Vec<&str> {
        self.auth.as_ref().map(Auth::secrets).unwrap_or_default()
    }

    /// Sends one GET and checks the status.
    async fn get(&self, page: &Page) -> Result<reqwest::Response, SourceError> {
        let mut request = self
            .client
            .get(page.url.clone())
            .map_err(|denied| SourceError::EgressDenied { what: self.what.clone(), denied })?;
        match &self.auth {
            None => {}
            Some(Auth::Bearer(token)) => request = request.bearer_auth(token.expose()),
            Some(Auth::Basic { username, password }) => {
                request = request.basic_auth(username.expose(), Some(password.expose()));
            }
            Some(Auth::Header { name, value }) => {
                let mut v = HeaderValue::from_str(value.expose()).expect("checked when opened");
                v.set_sensitive(true);
                request = request.header(name.clone(), v);
            }
        }
        let response = request.send().await.map_err(|e| page.transport(self, &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let mut detail = status.canonical_reason().map(|r| format!(" {r}")).unwrap_or_default();
        if matches!(status.as_u16(), 401 | 403) {
            detail.push_str(&match &self.auth_from {
                Some(from) => format!(" — check the credential in {from}"),
                None => " — the export needs credentials: set http.auth".to_owned(),
            });
        }
        Err(SourceError::HttpStatus {
            what: self.what.clone(),
            url: display_url(&page.url),
            page: page.number,
            status: status.as_u16(),
            detail,
        })
    }

    /// The pointers whose values the JSON walk captures: the next-page URL, or the cursor.
    fn pagination_pointers(&self) -> Vec<String> {
        let Some(p) = &self.spec.pagination else { return Vec::new() };
        p.next_url_pointer.iter().cloned().chain(p.cursor.iter().map(|c| c.pointer.clone())).collect()
    }

    /// The next page's URL, from the values captured in the JSON body (in the order of
    /// [`Self::pagination_pointers`]) or the `Link` header.
    fn next_page(
        &self,
        page: &Page,
        captured: Option<&[Option<Scalar>]>,
        link: Option<Result<Url, String>>,
    ) -> Result<Option<Url>, SourceError> {
        let Some(pagination) = &self.spec.pagination else { return Ok(None) };
        let malformed = |location: String, message: String| SourceError::Malformed {
            what: self.what.clone(),
            format: "JSON",
            location: format!("page {}, {location}", page.number),
            message,
        };
        // Only one of nextUrlPointer and cursor is read, and it is the first value captured.
        let value = captured.and_then(|c| c.first()).and_then(Option::as_ref).and_then(|v| match v {
            Scalar::Text(s) => Some(Ok(s.clone())),
            Scalar::Null => None,
            Scalar::Other(_) => Some(Err(())),
        });
        let next = if let Some(pointer) = &pagination.next_url_pointer {
            match value {
                None => return Ok(None),
                Some(Err(())) => {
                    return Err(malformed(pointer.clone(), "the next-page URL is not a string".to_owned()));
                }
                Some(Ok(s)) if s.is_empty() => return Ok(None),
                Some(Ok(s)) => page
                    .url
                    .join(&s)
                    .map_err(|e| malformed(pointer.clone(), format!("the next-page URL is not a URL: {e}")))?,
            }
        } else if let Some(cursor) = &pagination.cursor {
            match value {
                None => return Ok(None),
                Some(Err(())) => {
                    return Err(malformed(cursor.pointer.clone(), "the cursor is not a string or number".to_owned()));
                }
                Some(Ok(s)) if s.is_empty() => return Ok(None),
                Some(Ok(s)) => {
                    // The cursor replaces its parameter in the export's own URL.
                    let mut next = self.start.clone();
                    let kept: Vec<(String, String)> = self
                        .start
                        .query_pairs()
                        .filter(|(k, _)| k != &cursor.param)
                        .map(|(k, v)| (k.into(), v.into()))
                        .collect();
                    next.query_pairs_mut().clear().extend_pairs(kept).append_pair(&cursor.param, &s);
                    next
                }
            }
        } else if pagination.link_header == Some(true) {
            match link {
                None => return Ok(None),
                Some(Ok(url)) => url,
                Some(Err(message)) => {
                    return Err(SourceError::Malformed {
                        what: self.what.clone(),
                        format: "Link header",
                        location: format!("page {}", page.number),
                        message,
                    });
                }
            }
        } else {
            return Ok(None);
        };
        if self.auth.is_some() && next.origin() != self.start.origin() {
            return Err(SourceError::Config {
                what: self.what.clone(),
                message: format!(
                    "page {} points to {} on another origin; credentials are sent only to the export's own",
                    page.number,
                    display_url(&next)
                ),
            });
        }
        Ok(Some(next))
    }
}

/// One page being read.
struct Page {
    url: Url,
    number: u64,
    gzip: bool,
}

impl Page {
    fn transport(&self, source: &HttpMembers, e: &reqwest::Error) -> SourceError {
        if let Some(denied) = egress::denied_in(e) {
            return SourceError::EgressDenied { what: source.what.clone(), denied: denied.clone() };
        }
        let message = if e.is_timeout() {
            format!(
                "timed out (connectTimeoutSeconds {}, readTimeoutSeconds {})",
                source.spec.connect_timeout_seconds, source.spec.read_timeout_seconds
            )
        } else {
            // Without the URL: its query may carry a key.
            let mut text = error_chain(e);
            if let Some(url) = e.url() {
                text = text.replace(url.as_str(), &display_url(url));
            }
            text
        };
        SourceError::Transport {
            what: source.what.clone(),
            url: display_url(&self.url),
            page: self.number,
            message: redact(&message, &source.secrets(), REDACT_MIN_LEN),
        }
    }

    fn io(&self, source: &HttpMembers, e: io::Error) -> SourceError {
        if let Some(inner) = e.get_ref() {
            if inner.downcast_ref::<BodyTooLarge>().is_some() {
                return SourceError::TooLarge { what: source.what.clone(), limit: source.spec.max_bytes };
            }
            if let Some(re) = inner.downcast_ref::<reqwest::Error>() {
                return self.transport(source, re);
            }
        }
        if self.gzip {
            return SourceError::Malformed {
                what: source.what.clone(),
                format: "gzip",
                location: format!("page {}", self.number),
                message: e.to_string(),
            };
        }
        SourceError::Transport {
            what: source.what.clone(),
            url: display_url(&self.url),
            page: self.number,
            message: e.to_string(),
        }
    }

    fn format(&self, source: &HttpMembers, e: FormatError) -> SourceError {
        match e {
            FormatError::Io(e) => self.io(source, e),
            FormatError::Malformed { format, location, message } => SourceError::Malformed {
                what: source.what.clone(),
                format,
                location: format!("page {}, {location}", self.number),
                message,
            },
            FormatError::MissingColumn { column, header } => SourceError::Config {
                what: source.what.clone(),
                message: format!("page {}: {}", self.number, FormatError::missing_column_message(&column, &header)),
            },
            FormatError::RowTooLarge { format, location, limit } => SourceError::RowTooLarge {
                what: source.what.clone(),
                item: match format {
                    "CSV" => "CSV row",
                    "NDJSON" => "NDJSON line",
                    _ => "JSON row, key or value",
                },
                location: format!("page {}, {location}", self.number),
                limit,
                field: "http.maxRowBytes",
            },
        }
    }
}

/// What the JSON walk sends back from its thread.
enum JsonEvent {
    Batch(MemberBatch),
    /// The end of the page: the pagination values.
    Done(Vec<Option<Scalar>>),
    Failed(FormatError),
}

/// Marks the read that went past `maxBytes`.
#[derive(Debug)]
struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the body is larger than maxBytes")
    }
}

impl std::error::Error for BodyTooLarge {}

/// Counts bytes read into a budget shared by all pages, failing past the limit.
struct Limited<R> {
    inner: R,
    used: Arc<AtomicU64>,
    limit: u64,
}

impl<R: AsyncRead + Unpin> AsyncRead for Limited<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let read = (buf.filled().len() - before) as u64;
            if this.used.fetch_add(read, Ordering::Relaxed) + read > this.limit {
                return Poll::Ready(Err(io::Error::other(BodyTooLarge)));
            }
        }
        poll
    }
}

type Body = Pin<Box<dyn AsyncBufRead + Send>>;

/// The response body as decompressed, size-limited bytes.
async fn body(response: reqwest::Response, page: &mut Page, used: Arc<AtomicU64>, limit: u64) -> io::Result<Body> {
    let stream = response.bytes_stream().map_err(io::Error::other);
    let mut raw = StreamReader::new(stream);
    // gzip content (not just gzip transfer): decompress it too.
    let head = raw.fill_buf().await?;
    page.gzip = head.starts_with(&[0x1f, 0x8b]);
    let decoded: Pin<Box<dyn AsyncRead + Send>> = if page.gzip {
        let mut decoder = GzipDecoder::new(raw);
        decoder.multiple_members(true);
        Box::pin(decoder)
    } else {
        Box::pin(raw)
    };
    Ok(Box::pin(BufReader::new(Limited { inner: decoded, used, limit })))
}

impl HttpMembers {
    /// Walks a JSON body on a blocking thread (the parser reads synchronously), sending
    /// batches back as the rows are read. Dropping the receiver stops the walk.
    fn walk_json(&self, body: Body) -> mpsc::Receiver<JsonEvent> {
        let (tx, rx) = mpsc::channel(2);
        let rows = self.spec.json_pointer.clone().unwrap_or_default();
        let captures = self.pagination_pointers();
        let fields = self.fields.clone();
        let max_row_bytes = self.spec.max_row_bytes;
        tokio::task::spawn_blocking(move || {
            let captures: Vec<&str> = captures.iter().map(String::as_str).collect();
            let plan = JsonPlan { rows: &rows, captures: &captures, fields: &fields, max_row_bytes };
            let emit = |batch| tx.blocking_send(JsonEvent::Batch(batch)).map_err(|_| Cancelled);
            let last = match json::read_rows(SyncIoBridge::new(body), &plan, emit) {
                Ok(values) => JsonEvent::Done(values),
                Err(e) => JsonEvent::Failed(e),
            };
            let _ = tx.blocking_send(last);
        });
        rx
    }
}

impl MemberSource for HttpMembers {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn members(&self) -> MemberStream<'_> {
        Box::pin(async_stream::try_stream! {
            let used = Arc::new(AtomicU64::new(0));
            let mut history = PageHistory::default();
            let mut url = self.start.clone();
            for number in 1..=MAX_PAGES {
                let mut page = Page { url: url.clone(), number, gzip: false };
                if !history.first_visit(&url) {
                    Err(SourceError::Config {
                        what: self.what.clone(),
                        message: format!("page {number} repeats the URL of an earlier page; the pagination loops"),
                    })?;
                }
                let response = self.get(&page).await?;
                let link = next_link(response.headers(), &page.url);
                let body = body(response, &mut page, used.clone(), self.spec.max_bytes).await.map_err(|e| page.io(self, e))?;
                let max_row = self.spec.max_row_bytes;
                let captured = match self.spec.format {
                    HttpFormat::Csv => {
                        let mut rows = CsvRows::new(body, &self.fields, max_row).await.map_err(|e| page.format(self, e))?;
                        while let Some(batch) = rows.next_batch(&self.fields, BATCH_ROWS).await.map_err(|e| page.format(self, e))? {
                            yield batch;
                        }
                        None
                    }
                    HttpFormat::Ndjson => {
                        let mut rows = NdjsonRows::new(body, max_row);
                        while let Some(batch) = rows.next_batch(&self.fields, BATCH_ROWS).await.map_err(|e| page.format(self, e))? {
                            yield batch;
                        }
                        None
                    }
                    HttpFormat::Json => {
                        let mut events = self.walk_json(body);
                        let mut captured = None;
                        while let Some(event) = events.recv().await {
                            match event {
                                JsonEvent::Batch(batch) => yield batch,
                                JsonEvent::Done(values) => captured = Some(values),
                                JsonEvent::Failed(e) => Err(page.format(self, e))?,
                            }
                        }
                        // The walk ends with Done or Failed; without either its thread died.
                        Some(captured.ok_or_else(|| page.io(self, io::Error::other("the JSON reader stopped unexpectedly")))?)
                    }
                };
                match self.next_page(&page, captured.as_deref(), link)? {
                    None => return,
                    Some(next) => url = next,
                }
            }
            Err(SourceError::Config {
                what: self.what.clone(),
                message: format!("more than {MAX_PAGES} pages; the pagination does not end"),
            })?;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn debug_output_leaves_out_the_url_query_and_user_information() {
        let spec: HttpSource = serde_json::from_value(
            serde_json::json!({ "url": "https://u:pw-7x@example.com/x.csv?api_key=k-3q", "format": "Csv" }),
        )
        .unwrap();
        let mapping = crate::api::IdentifierMapping { external_id: Some("uid".into()), ..Default::default() };
        let fields = IdentifierFields::from_mapping(&mapping).unwrap();
        let source = HttpMembers::open(&spec, fields, &crate::source::InMemoryObjects::new("ns")).await.unwrap();
        let debug = format!("{source:?}");
        assert!(debug.contains("https://example.com/x.csv?…"), "{debug}");
        assert!(!debug.contains("pw-7x") && !debug.contains("k-3q"), "{debug}");
    }

    #[test]
    fn urls_are_shown_without_credentials_or_query() {
        let url = Url::parse("https://user:pw@example.com:8443/export/users.csv?api_key=abc").unwrap();
        assert_eq!(display_url(&url), "https://example.com:8443/export/users.csv?…");
        assert_eq!(display_url(&Url::parse("http://h/x").unwrap()), "http://h/x");
    }

    #[test]
    fn page_history_sees_a_repeated_url_and_keeps_32_bytes_a_page() {
        let mut history = PageHistory::default();
        let padded = |n: u32| Url::parse(&format!("https://e.example/p?n={n}&pad={}", "x".repeat(8192))).unwrap();
        assert!((0..1000).all(|n| history.first_visit(&padded(n))));
        assert!(!history.first_visit(&padded(7)));
        assert_eq!(history.0.len(), 1000);
    }

    #[test]
    fn link_headers_give_the_next_page() {
        let base = Url::parse("https://api.example.com/v1/users?page=1").unwrap();
        let mut headers = HeaderMap::new();
        headers.append(
            LINK,
            HeaderValue::from_static(
                r#"<https://api.example.com/v1/users?page=1>; rel="prev first", </v1/users?page=3>; rel="next""#,
            ),
        );
        assert_eq!(next_link(&headers, &base).unwrap().unwrap().as_str(), "https://api.example.com/v1/users?page=3");
        let mut headers = HeaderMap::new();
        headers.append(LINK, HeaderValue::from_static(r#"<?page=2>; title="x, y"; rel=next"#));
        assert_eq!(next_link(&headers, &base).unwrap().unwrap().as_str(), "https://api.example.com/v1/users?page=2");
        let mut headers = HeaderMap::new();
        headers.append(LINK, HeaderValue::from_static(r#"<https://x/last>; rel="last""#));
        assert!(next_link(&headers, &base).is_none());
        assert!(next_link(&HeaderMap::new(), &base).is_none());
    }
}
