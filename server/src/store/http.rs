//! The HTTP transport of the object stores (GCS, S3): hyper 1.x with hyper-util's pooled client
//! and rustls (hyper-rustls, ring provider, webpki roots; HTTP/2 by ALPN where the server offers
//! it, HTTP/1.1 otherwise; plain `http://` for emulators), with deadlines, retries and metrics.
//!
//! The [`super::Store`] trait is synchronous; this module keeps it so. One process-wide tokio
//! runtime (two worker threads named `thaw-http`) owns every connection. A store call on the
//! caller's thread hands each attempt to the runtime as a task and waits for its result on its own
//! thread (a small thread-parking executor, never a runtime's `block_on`, so a caller inside some
//! other runtime does not panic). A streamed read ([`HttpClient::read_stream`]) receives the body
//! in [`Bytes`] pieces through a bounded channel and calls the caller's sink on the caller's
//! thread as each piece lands; dropping the receiver (the sink said stop, or the call failed)
//! ends the task, which drops the response body, which closes that connection.
//!
//! # Deadlines ([`HttpConfig`])
//! - `connect`: TCP connect (and TLS handshake) of a new connection;
//! - `first_byte`: request body sent (taken whole by the connection) to response headers
//!   received; while a request body is being sent, each piece of it must be taken within
//!   `idle` (the first within `first_byte`);
//! - `idle`: between two body pieces (re-armed at every piece);
//! - `budget`: the whole operation, all attempts and backoff sleeps included. Every wait of an
//!   attempt is also cut at the budget's end, so an operation never outlives it by more than the
//!   caller's own sink time.
//!
//! # Retries
//! Full-jitter exponential backoff (`sleep = random(0, min(backoff_max, backoff_base * 2^n))`)
//! for 408, 429, 5xx, connection errors and resets, deadline expiries and truncated bodies, at
//! most `attempts` attempts and only while the budget leaves time for the sleep. 404 is
//! [`StoreErrorKind::NotFound`] and never retried; 401 and 403 are [`StoreErrorKind::Denied`]
//! (permanent: neither this transport nor the engine retries them); 416 (a range past the end)
//! is [`StoreErrorKind::Truncated`] and not retried; other 4xx are not retried. A streamed read that
//! failed after delivering N bytes resumes at `offset + N`: the bytes already handed to the sink
//! are final. A body shorter than its `Content-Length` or the requested range is an error, never
//! data; a 206 whose `Content-Range` is not the requested range is refused, and so is a 200 (the
//! whole object) to a ranged request, unless the whole object is exactly the range.
//!
//! # Metrics (the `metrics` facade; no-ops unless a recorder is installed)
//! Labels `scheme` (`gs`, `s3`) and `op` (the store operation: `read`, `stat`, `get`, `put`, ...):
//! - `thaw_store_requests_total`: HTTP requests sent (every attempt);
//! - `thaw_store_bytes_received_total`, `thaw_store_bytes_sent_total`: body bytes;
//! - `thaw_store_retries_total`: attempts after the first;
//! - `thaw_store_errors_total{kind}`: failed attempts by kind (`status_5xx`, `status_429`,
//!   `status_4xx`, `not_found`, `denied`, `connect`, `timeout_connect`, `timeout_first_byte`,
//!   `timeout_idle`, `timeout_budget`, `io`, `truncated`, `bad_response`, `too_large`);
//! - `thaw_store_first_byte_seconds`: request sent to response headers, per attempt (histogram);
//! - `thaw_store_operation_seconds`: whole operation, retries included (histogram).
//!
//! # Configuration
//! [`HttpConfig::from_env`] reads `THAW_HTTP_CONNECT_TIMEOUT`, `THAW_HTTP_FIRST_BYTE_TIMEOUT`,
//! `THAW_HTTP_IDLE_TIMEOUT`, `THAW_HTTP_BUDGET`, `THAW_HTTP_ATTEMPTS`, `THAW_HTTP_BACKOFF_BASE`,
//! `THAW_HTTP_BACKOFF_MAX`; then store URL query parameters of the same names in lower case with
//! dashes (`gs://bucket/prefix?connect-timeout=2s&budget=20s`) override them
//! ([`HttpConfig::set`]). Durations take `ms`, `s` or `m` suffixes (`250ms`, `5s`).

use std::fmt;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_RANGE, HeaderMap, HeaderName, HeaderValue, RANGE};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;
use tokio::sync::mpsc;

use super::{StoreError, StoreErrorKind};

/// Pieces of a streamed body that may wait in the channel for a slow sink.
const STREAM_CHANNEL_DEPTH: usize = 16;

/// Bytes of an error response body kept for the error message.
const ERROR_BODY_LIMIT: usize = 512;

/// Deadlines and retry policy of one store's HTTP requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpConfig {
    /// TCP connect (and TLS handshake) of a new connection (`connect-timeout`, default 5 s).
    pub connect_timeout: Duration,
    /// Request sent to response headers (`first-byte-timeout`, default 10 s).
    pub first_byte_timeout: Duration,
    /// Longest wait for the next body piece (`idle-timeout`, default 10 s).
    pub idle_timeout: Duration,
    /// Whole operation including retries and backoff (`budget`, default 25 s: below the 30 s
    /// kernel NBD timeout).
    pub budget: Duration,
    /// Most attempts per operation (`attempts`, default 10, as e2b's GCS clients).
    pub attempts: u32,
    /// First backoff ceiling (`backoff-base`, default 50 ms).
    pub backoff_base: Duration,
    /// Largest backoff ceiling (`backoff-max`, default 2 s).
    pub backoff_max: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            budget: Duration::from_secs(25),
            attempts: 10,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

impl HttpConfig {
    /// The names [`HttpConfig::set`] accepts.
    pub const KEYS: &'static [&'static str] = &[
        "connect-timeout",
        "first-byte-timeout",
        "idle-timeout",
        "budget",
        "attempts",
        "backoff-base",
        "backoff-max",
    ];

    /// The defaults, overridden by the `THAW_HTTP_*` environment variables (see the module
    /// docs). The error names the variable and its bad value.
    pub fn from_env() -> Result<Self, String> {
        let mut config = Self::default();
        for key in Self::KEYS {
            let var = format!("THAW_HTTP_{}", key.to_ascii_uppercase().replace('-', "_"));
            if let Ok(value) = std::env::var(&var) {
                config
                    .set(key, &value)
                    .map_err(|e| format!("environment variable {var}: {e}"))?;
            }
        }
        Ok(config)
    }

    /// Sets the parameter `key` (one of [`HttpConfig::KEYS`]) from its text. Returns
    /// `Ok(false)` when `key` is not a transport parameter (the store may know it), and an error
    /// naming the parameter when the value is bad.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let duration = || {
            parse_duration(value)
                .ok_or_else(|| format!("{key}={value:?}: expected a duration such as 5s or 250ms"))
        };
        match key {
            "connect-timeout" => self.connect_timeout = positive(key, duration()?)?,
            "first-byte-timeout" => self.first_byte_timeout = positive(key, duration()?)?,
            "idle-timeout" => self.idle_timeout = positive(key, duration()?)?,
            "budget" => self.budget = positive(key, duration()?)?,
            "backoff-base" => self.backoff_base = duration()?,
            "backoff-max" => self.backoff_max = duration()?,
            "attempts" => {
                self.attempts = value
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| format!("{key}={value:?}: expected a whole number >= 1"))?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The parameters as URL query text (`connect-timeout=5s&...`), for [`super::Store::url`].
    pub fn to_query(&self) -> String {
        format!(
            "connect-timeout={}&first-byte-timeout={}&idle-timeout={}&budget={}&attempts={}\
             &backoff-base={}&backoff-max={}",
            fmt_duration(self.connect_timeout),
            fmt_duration(self.first_byte_timeout),
            fmt_duration(self.idle_timeout),
            fmt_duration(self.budget),
            self.attempts,
            fmt_duration(self.backoff_base),
            fmt_duration(self.backoff_max),
        )
    }
}

fn positive(key: &str, d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        Err(format!("{key} must be more than zero"))
    } else {
        Ok(d)
    }
}

/// Parses `250ms`, `5s`, `1.5s`, `2m` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number.trim().parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    Duration::try_from_secs_f64(value * scale).ok()
}

/// `5s`, `250ms`: the shortest exact form.
fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Splits `scheme://rest?k=v&k2=v2` into the URL without its query and the decoded pairs.
/// A parameter without `=` gets an empty value; `+` and `%XX` are decoded.
pub fn split_query(url: &str) -> (&str, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url, Vec::new());
    };
    let pairs = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_query(k), decode_query(v))
        })
        .collect();
    (base, pairs)
}

fn decode_query(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

/// One HTTP request of an attempt. Built afresh for every attempt (a signer can stamp the time).
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// Method.
    pub method: Method,
    /// Absolute URL (`http://127.0.0.1:4443/...` or `https://storage.googleapis.com/...`).
    pub url: String,
    /// Request headers (`Host` and `Content-Length` are set by the client).
    pub headers: HeaderMap,
    /// Request body (empty for GET).
    pub body: Bytes,
}

impl HttpRequest {
    /// A request without headers or body.
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        Self {
            method,
            url: url.into(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    /// Adds a header; a name or value that is not valid HTTP is an error naming it.
    pub fn header(mut self, name: &str, value: &str) -> Result<Self, String> {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let v =
            HeaderValue::from_str(value).map_err(|_| format!("invalid value for header {name}"))?;
        self.headers.append(n, v);
        Ok(self)
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
}

/// A buffered response ([`HttpClient::execute`]): a 2xx status (or one the caller accepted:
/// [`HttpClient::execute_accepting`]), its headers, its whole body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status (2xx, or one of those accepted).
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl HttpResponse {
    /// A header's value as text, if present and visible ASCII.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Builds the request of one attempt. Errors (a bad key, a failed signature or token) end the
/// operation without retry.
pub type BuildRequest<'a> = dyn FnMut() -> Result<HttpRequest, StoreError> + 'a;

/// Builds the request of one attempt of a ranged read of `[start, end)`; the client adds
/// `Range: bytes=start-(end-1)` unless the builder set a `Range` header itself.
pub type BuildRangeRequest<'a> = dyn FnMut(u64, u64) -> Result<HttpRequest, StoreError> + 'a;

/// Why one attempt failed.
#[derive(Debug)]
struct Failure {
    /// Metric label (`status_5xx`, `timeout_idle`, ...).
    label: &'static str,
    /// The error kind if this ends the operation.
    kind: StoreErrorKind,
    /// Worth another attempt.
    retry: bool,
    /// Human-readable detail (status line and body snippet, or the I/O error chain).
    detail: String,
}

impl Failure {
    fn new(label: &'static str, kind: StoreErrorKind, retry: bool, detail: String) -> Self {
        Self {
            label,
            kind,
            retry,
            detail,
        }
    }

    /// The failure of an answer with a non-success `status` (`body`: the start of its body).
    fn status(status: StatusCode, body: &[u8]) -> Self {
        // An XML API `<Error>` body (S3, GCS XML) reads as `Code: Message`.
        let text = super::multipart::describe_error_body(body)
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        let text = text.trim();
        let detail = if text.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {text}")
        };
        let code = status.as_u16();
        match code {
            404 => Self::new("not_found", StoreErrorKind::NotFound, false, detail),
            416 => Self::new("status_4xx", StoreErrorKind::Truncated, false, detail),
            401 | 403 => Self::new(
                "denied",
                StoreErrorKind::Denied,
                false,
                format!("access denied (check the credentials and their permissions): {detail}"),
            ),
            429 => Self::new("status_429", StoreErrorKind::Io, true, detail),
            408 => Self::new("status_4xx", StoreErrorKind::Io, true, detail),
            500..=599 => Self::new("status_5xx", StoreErrorKind::Io, true, detail),
            _ => Self::new("status_4xx", StoreErrorKind::Io, false, detail),
        }
    }

    /// The failure of a hyper client error (connect, reset, protocol).
    fn client(e: &hyper_util::client::legacy::Error) -> Self {
        let label = if e.is_connect() { "connect" } else { "io" };
        Self::new(label, StoreErrorKind::Io, true, error_chain(e))
    }
}

/// Whether an I/O error of kind `UnexpectedEof` is in `e`'s source chain (hyper's "end of file
/// before message length reached").
fn ends_early(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// `e: cause: cause` (the whole source chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Messages from an attempt's task to the caller of a streamed read.
#[derive(Debug)]
enum Event {
    Data(Bytes),
    End,
    Fail(Failure),
}

type HyperClient = Client<HttpsConnector<HttpConnector>, SendBody>;

/// Largest piece of a request body handed to the connection at once: the transport sees the
/// upload progress piece by piece (see [`HttpClient::send`]).
const SEND_PIECE: usize = 256 << 10;

/// Bytes of a request body that may still sit in socket buffers (ours and the peer's) when
/// the connection has taken the last piece: the first-byte deadline of an upload also allows
/// the time they take to drain at the rate the body was sent.
const SEND_BUFFER_ALLOWANCE: u64 = 16 << 20;

/// A request body handed to hyper in pieces of at most [`SEND_PIECE`] bytes, publishing how
/// many bytes the connection has taken so far (its exact length is announced up front, so the
/// request carries a `Content-Length`).
#[derive(Debug)]
struct SendBody {
    rest: Bytes,
    taken: u64,
    progress: tokio::sync::watch::Sender<u64>,
}

impl hyper::body::Body for SendBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            return Poll::Ready(None);
        }
        let piece = this.rest.split_to(this.rest.len().min(SEND_PIECE));
        this.taken = this
            .taken
            .saturating_add(u64::try_from(piece.len()).unwrap_or(u64::MAX));
        this.progress.send_replace(this.taken);
        Poll::Ready(Some(Ok(hyper::body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(u64::try_from(self.rest.len()).unwrap_or(u64::MAX))
    }
}

/// A request ready for hyper, with the progress of its body.
#[derive(Debug)]
struct Outgoing {
    req: http::Request<SendBody>,
    /// Body bytes the connection has taken (see [`SendBody`]).
    progress: tokio::sync::watch::Receiver<u64>,
    /// The body's length.
    len: u64,
}

/// `n` as a float (exact below 2^53; these are byte counts).
#[allow(
    clippy::cast_precision_loss,
    reason = "byte counts far below 2^53, used for a rate"
)]
fn u64_f64(n: u64) -> f64 {
    n as f64
}

/// The process-wide runtime of the HTTP transport (two named worker threads), or why it could
/// not start.
fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("thaw-http")
                .enable_all()
                .build()
                .map_err(|e| format!("starting the HTTP runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Polls `fut` to completion on the calling thread, parking between wake-ups. The futures run
/// here only wait on channels fed by the runtime's tasks, so this never drives I/O itself and
/// works from any thread (a runtime's own `block_on` panics inside another runtime).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// Runs `fut` on the transport's runtime and waits for its output on the calling thread (for
/// async helpers such as token providers). The error says why the runtime or the task failed.
pub fn run<F>(fut: F) -> Result<F::Output, String>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handle = runtime()?.spawn(fut);
    block_on(handle).map_err(|e| format!("task failed: {e}"))
}

/// Counters of one [`HttpClient`] (all attempts of all operations), for tests and diagnostics.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
}

/// A snapshot of an [`HttpClient`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// HTTP requests sent (every attempt).
    pub requests: u64,
    /// Attempts after the first of their operation.
    pub retries: u64,
    /// Body bytes received.
    pub bytes_received: u64,
    /// Body bytes sent.
    pub bytes_sent: u64,
}

/// The pooled HTTP(S) client of one store: connection reuse, deadlines, retries, metrics.
#[derive(Clone)]
pub struct HttpClient {
    client: HyperClient,
    config: HttpConfig,
    store_url: String,
    scheme: &'static str,
    counters: Arc<Counters>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("store_url", &self.store_url)
            .field("scheme", &self.scheme)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One operation's bookkeeping: start, attempts, deadline.
struct Op<'a> {
    client: &'a HttpClient,
    name: &'static str,
    key: &'a str,
    what: String,
    start: Instant,
    deadline: tokio::time::Instant,
    attempts: u32,
    /// Why the latest retried attempt failed: named in the error when a later attempt ends the
    /// operation for another reason (the budget running out mid-attempt).
    retried: Option<String>,
}

impl Op<'_> {
    fn remaining(&self) -> Duration {
        self.deadline
            .saturating_duration_since(tokio::time::Instant::now())
    }

    /// After failure `f` of the latest attempt: sleeps the backoff and returns `None` when
    /// another attempt is allowed, or returns the operation's error.
    fn after_failure(&mut self, f: Failure) -> Option<StoreError> {
        let c = self.client;
        metrics::counter!("thaw_store_errors_total", "scheme" => c.scheme, "op" => self.name,
            "kind" => f.label)
        .increment(1);
        if f.retry && self.attempts < c.config.attempts {
            let exp = c
                .config
                .backoff_base
                .saturating_mul(1u32 << self.attempts.saturating_sub(1).min(20));
            let ceiling = exp.min(c.config.backoff_max);
            let sleep = ceiling.mul_f64(rand::rng().random::<f64>());
            // Leave the next attempt at least a little time after the sleep.
            if sleep.saturating_add(Duration::from_millis(10)) < self.remaining() {
                tracing::debug!(store = %c.store_url, key = self.key, op = self.name,
                    attempt = self.attempts, error = %f.detail, "retrying");
                std::thread::sleep(sleep);
                self.retried = Some(f.detail);
                return None;
            }
        }
        Some(self.error(f.kind, &f.detail))
    }

    /// The operation's error: store URL, key, operation, detail, attempts and elapsed time.
    fn error(&self, kind: StoreErrorKind, detail: &str) -> StoreError {
        let plural = if self.attempts == 1 { "" } else { "s" };
        let before = match &self.retried {
            Some(r) if r != detail => format!("; the attempt before: {r}"),
            _ => String::new(),
        };
        StoreError::new(
            kind,
            self.client.store_url.clone(),
            self.key,
            format!(
                "{}: {detail}{before} ({} attempt{plural} in {:.3}s)",
                self.what,
                self.attempts,
                self.start.elapsed().as_secs_f64()
            ),
        )
    }

    /// Counts the start of an attempt.
    fn begin_attempt(&mut self) {
        let c = self.client;
        self.attempts = self.attempts.saturating_add(1);
        c.counters.requests.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("thaw_store_requests_total", "scheme" => c.scheme, "op" => self.name)
            .increment(1);
        if self.attempts > 1 {
            c.counters.retries.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("thaw_store_retries_total", "scheme" => c.scheme, "op" => self.name)
                .increment(1);
        }
    }

    fn finish(&self) {
        let c = self.client;
        metrics::histogram!("thaw_store_operation_seconds", "scheme" => c.scheme, "op" => self.name)
            .record(self.start.elapsed().as_secs_f64());
    }
}

impl HttpClient {
    /// A client for the store at `store_url` (used in messages; `scheme` labels the metrics).
    ///
    /// # Errors
    /// The TLS configuration cannot be built (no usable crypto provider).
    pub fn new(
        store_url: impl Into<String>,
        scheme: &'static str,
        config: HttpConfig,
    ) -> Result<Self, StoreError> {
        let store_url = store_url.into();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        // ring (the brief's choice: pure Rust + asm, no cmake) has no post-quantum key exchange;
        // rustls 0.23.48 marks its provider deprecated for that reason only.
        #[allow(deprecated, reason = "ring is the chosen provider; see above")]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .map_err(|e| {
                StoreError::new(
                    StoreErrorKind::Io,
                    store_url.clone(),
                    "",
                    format!("TLS configuration: {e}"),
                )
            })?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(Self {
            client,
            config,
            store_url,
            scheme,
            counters: Arc::new(Counters::default()),
        })
    }

    /// The deadlines and retry policy.
    pub fn config(&self) -> &HttpConfig {
        &self.config
    }

    /// The store URL used in messages.
    pub fn store_url(&self) -> &str {
        &self.store_url
    }

    /// Counters of every request made through this client (clones share them).
    pub fn stats(&self) -> HttpStats {
        HttpStats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
            bytes_received: self.counters.bytes_received.load(Ordering::Relaxed),
            bytes_sent: self.counters.bytes_sent.load(Ordering::Relaxed),
        }
    }

    fn op<'a>(&'a self, name: &'static str, key: &'a str, what: String) -> Op<'a> {
        Op {
            client: self,
            name,
            key,
            what,
            start: Instant::now(),
            deadline: tokio::time::Instant::now() + self.config.budget,
            attempts: 0,
            retried: None,
        }
    }

    /// Turns an [`HttpRequest`] into a hyper request.
    fn to_hyper(&self, req: HttpRequest) -> Result<Outgoing, String> {
        let mut builder = http::Request::builder()
            .method(req.method)
            .uri(req.url.as_str());
        if let Some(headers) = builder.headers_mut() {
            headers.extend(req.headers);
        }
        let len = u64::try_from(req.body.len()).unwrap_or(u64::MAX);
        let (progress_tx, progress) = tokio::sync::watch::channel(0u64);
        let req = builder
            .body(SendBody {
                rest: req.body,
                taken: 0,
                progress: progress_tx,
            })
            .map_err(|e| format!("bad request for {}: {e}", req.url))?;
        Ok(Outgoing { req, progress, len })
    }

    /// Sends one request and answers its response headers (and the operation's deadline).
    ///
    /// The first-byte deadline runs from the moment the connection has taken the whole request
    /// body, not from the start: a large upload is not cut for the time its body takes to send.
    /// It is extended by the time the bytes still in socket buffers (at most
    /// [`SEND_BUFFER_ALLOWANCE`]) take to drain at the rate the body was taken. While the body is
    /// being sent, each piece must be taken within the idle deadline (the first one within the
    /// first-byte deadline, which covers setting the connection up); a response that comes
    /// before the body is all sent (an early refusal) is answered at once.
    async fn send(
        client: HyperClient,
        out: Outgoing,
        config: &HttpConfig,
        deadline: tokio::time::Instant,
        labels: (&'static str, &'static str),
    ) -> Result<http::Response<hyper::body::Incoming>, Failure> {
        let Outgoing {
            req,
            mut progress,
            len,
        } = out;
        let first_byte = config.first_byte_timeout;
        let mut response = pin!(client.request(req));
        let mut gap = first_byte;
        let mut early = None;
        let mut first_piece: Option<tokio::time::Instant> = None;
        while len > 0 && *progress.borrow_and_update() < len {
            let now = tokio::time::Instant::now();
            let until = (now + gap).min(deadline);
            let by_budget = until == deadline && deadline < now + gap;
            tokio::select! {
                r = &mut response => {
                    early = Some(r);
                    break;
                }
                changed = progress.changed() => {
                    if changed.is_err() {
                        break; // the body is gone: the response future ends the attempt
                    }
                    gap = config.idle_timeout;
                    first_piece.get_or_insert_with(tokio::time::Instant::now);
                }
                () = tokio::time::sleep_until(until) => {
                    let taken = *progress.borrow();
                    return Err(if by_budget {
                        Failure::new(
                            "timeout_budget",
                            StoreErrorKind::Io,
                            false,
                            format!(
                                "the operation's time budget ran out sending the request body \
                                 ({taken} of {len} bytes sent)"
                            ),
                        )
                    } else {
                        Failure::new(
                            "timeout_idle",
                            StoreErrorKind::Io,
                            true,
                            format!(
                                "the request body stalled: no progress within {} ({taken} of \
                                 {len} bytes sent)",
                                fmt_duration(gap)
                            ),
                        )
                    });
                }
            }
        }
        let sent = tokio::time::Instant::now();
        // Time for the buffered tail to drain at the rate the body went (0 without a body).
        let drain = first_piece.map_or(Duration::ZERO, |t| {
            let secs = sent.duration_since(t).as_secs_f64();
            let rate = u64_f64(len) / secs.max(1e-3);
            Duration::from_secs_f64((u64_f64(len.min(SEND_BUFFER_ALLOWANCE)) / rate).min(3600.0))
        });
        let wait = first_byte.saturating_add(drain);
        let until = (sent + wait).min(deadline);
        let budget_first = until == deadline && deadline < sent + wait;
        let answer = match early {
            Some(r) => Ok(r),
            None => tokio::time::timeout_at(until, response).await,
        };
        match answer {
            Ok(Ok(resp)) => {
                metrics::histogram!("thaw_store_first_byte_seconds", "scheme" => labels.0,
                    "op" => labels.1)
                .record(sent.elapsed().as_secs_f64());
                Ok(resp)
            }
            Ok(Err(e)) => Err(Failure::client(&e)),
            Err(_) if budget_first => Err(Failure::new(
                "timeout_budget",
                StoreErrorKind::Io,
                false,
                "the operation's time budget ran out waiting for the response".to_owned(),
            )),
            Err(_) => Err(Failure::new(
                "timeout_first_byte",
                StoreErrorKind::Io,
                true,
                format!(
                    "no response headers within the first-byte deadline of {}",
                    fmt_duration(wait)
                ),
            )),
        }
    }

    /// The next body piece within the idle deadline (and the operation's deadline): `Ok(None)`
    /// at the end of the body.
    async fn next_piece(
        body: &mut hyper::body::Incoming,
        idle: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Bytes>, Failure> {
        loop {
            let now = tokio::time::Instant::now();
            let until = (now + idle).min(deadline);
            let by_budget = until == deadline && deadline < now + idle;
            match tokio::time::timeout_at(until, body.frame()).await {
                Ok(None) => return Ok(None),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Ok(Some(data));
                    }
                    // Trailers or an empty piece: keep reading.
                }
                Ok(Some(Err(e))) => {
                    // The connection ended before the announced length: a truncated body.
                    let (label, kind) = if e.is_incomplete_message() || ends_early(&e) {
                        ("truncated", StoreErrorKind::Truncated)
                    } else {
                        ("io", StoreErrorKind::Io)
                    };
                    return Err(Failure::new(
                        label,
                        kind,
                        true,
                        format!("body read failed: {}", error_chain(&e)),
                    ));
                }
                Err(_) if by_budget => {
                    return Err(Failure::new(
                        "timeout_budget",
                        StoreErrorKind::Io,
                        false,
                        "the operation's time budget ran out while the body was read".to_owned(),
                    ));
                }
                Err(_) => {
                    return Err(Failure::new(
                        "timeout_idle",
                        StoreErrorKind::Io,
                        true,
                        format!(
                            "no body bytes within the idle deadline of {}",
                            fmt_duration(idle)
                        ),
                    ));
                }
            }
        }
    }

    /// The start of an error response's body (for the message), bounded in size and time.
    async fn error_body(
        body: &mut hyper::body::Incoming,
        deadline: tokio::time::Instant,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let until = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
        while out.len() < ERROR_BODY_LIMIT {
            match tokio::time::timeout_at(until, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        let take = data.len().min(ERROR_BODY_LIMIT - out.len());
                        out.extend_from_slice(data.get(..take).unwrap_or_default());
                    }
                }
                _ => break,
            }
        }
        out
    }

    /// Runs a request to completion with retries and answers its 2xx response with the whole
    /// body (at most `max_body` bytes: a longer `Content-Length` or body is
    /// [`StoreErrorKind::TooLarge`], refused before the body is read when the length is
    /// announced). `op` names the operation in metrics (`stat`, `get`, `put`, ...) and `what`
    /// describes it in errors (`"stat"`, `"upload of 5 MiB"`).
    ///
    /// Non-2xx answers are errors: 404 [`StoreErrorKind::NotFound`], 416
    /// [`StoreErrorKind::Truncated`], others [`StoreErrorKind::Io`] with the status and the start
    /// of the body; 408, 429 and 5xx are retried (see the module docs).
    ///
    /// # Errors
    /// As above, plus deadline expiries and connection failures after the last attempt, and the
    /// builder's own errors.
    pub fn execute(
        &self,
        op: &'static str,
        key: &str,
        what: &str,
        max_body: u64,
        build: &mut BuildRequest<'_>,
    ) -> Result<HttpResponse, StoreError> {
        self.execute_accepting(op, key, what, max_body, &[], build)
    }

    /// [`HttpClient::execute`], also answering a response whose status is in `accept` (with its
    /// body, as a 2xx), e.g. 308 Resume Incomplete of a GCS resumable upload. The response's
    /// `status` tells which it was.
    ///
    /// # Errors
    /// As [`HttpClient::execute`].
    pub fn execute_accepting(
        &self,
        op: &'static str,
        key: &str,
        what: &str,
        max_body: u64,
        accept: &'static [StatusCode],
        build: &mut BuildRequest<'_>,
    ) -> Result<HttpResponse, StoreError> {
        let rt = runtime().map_err(|e| StoreError::new(StoreErrorKind::Io, self.url(), key, e))?;
        let mut op_state = self.op(op, key, what.to_owned());
        let result = loop {
            let req = build()?;
            let sent = u64::try_from(req.body.len()).unwrap_or(u64::MAX);
            let req = self
                .to_hyper(req)
                .map_err(|e| op_state.error(StoreErrorKind::InvalidKey, &e))?;
            op_state.begin_attempt();
            let task = Self::buffered_attempt(
                self.client.clone(),
                req,
                self.config,
                op_state.deadline,
                max_body,
                accept,
                (self.scheme, op),
            );
            let handle = rt.spawn(task);
            let outcome = match block_on(handle) {
                Ok(outcome) => outcome,
                Err(e) => Err(Failure::new(
                    "io",
                    StoreErrorKind::Io,
                    false,
                    format!("request task failed: {e}"),
                )),
            };
            self.counters.bytes_sent.fetch_add(sent, Ordering::Relaxed);
            metrics::counter!("thaw_store_bytes_sent_total", "scheme" => self.scheme, "op" => op)
                .increment(sent);
            match outcome {
                Ok(resp) => {
                    let n = u64::try_from(resp.body.len()).unwrap_or(u64::MAX);
                    self.counters.bytes_received.fetch_add(n, Ordering::Relaxed);
                    metrics::counter!("thaw_store_bytes_received_total",
                        "scheme" => self.scheme, "op" => op)
                    .increment(n);
                    break Ok(resp);
                }
                Err(f) => {
                    if let Some(e) = op_state.after_failure(f) {
                        break Err(e);
                    }
                }
            }
        };
        op_state.finish();
        result
    }

    async fn buffered_attempt(
        client: HyperClient,
        req: Outgoing,
        config: HttpConfig,
        deadline: tokio::time::Instant,
        max_body: u64,
        accept: &'static [StatusCode],
        labels: (&'static str, &'static str),
    ) -> Result<HttpResponse, Failure> {
        let head = req.req.method() == Method::HEAD;
        let resp = Self::send(client, req, &config, deadline, labels).await?;
        let (parts, mut body) = resp.into_parts();
        if !parts.status.is_success() && !accept.contains(&parts.status) {
            let text = Self::error_body(&mut body, deadline).await;
            return Err(Failure::status(parts.status, &text));
        }
        if head {
            // A HEAD answer has no body; its Content-Length is the object's (S3 stat).
            return Ok(HttpResponse {
                status: parts.status,
                headers: parts.headers,
                body: Bytes::new(),
            });
        }
        let announced = content_length(&parts.headers)?;
        if let Some(n) = announced
            && n > max_body
        {
            return Err(Failure::new(
                "too_large",
                StoreErrorKind::TooLarge,
                false,
                format!("the object is {n} bytes, more than the limit of {max_body}"),
            ));
        }
        let cap = usize::try_from(announced.unwrap_or(0).min(64 << 20)).unwrap_or(0);
        let mut out = Vec::with_capacity(cap);
        while let Some(piece) = Self::next_piece(&mut body, config.idle_timeout, deadline).await? {
            let total = u64::try_from(out.len().saturating_add(piece.len())).unwrap_or(u64::MAX);
            if total > max_body {
                return Err(Failure::new(
                    "too_large",
                    StoreErrorKind::TooLarge,
                    false,
                    format!("the body is more than the limit of {max_body} bytes"),
                ));
            }
            out.extend_from_slice(&piece);
        }
        let got = u64::try_from(out.len()).unwrap_or(u64::MAX);
        if let Some(n) = announced
            && got != n
        {
            return Err(Failure::new(
                "truncated",
                StoreErrorKind::Truncated,
                true,
                format!("the body ended after {got} of its {n} bytes (Content-Length)"),
            ));
        }
        Ok(HttpResponse {
            status: parts.status,
            headers: parts.headers,
            body: Bytes::from(out),
        })
    }

    /// Streams the bytes `[offset, offset + len)` of `key` to `sink` on the calling thread, piece
    /// by piece as they arrive, with ranged requests built by `build(start, end)` (the client
    /// adds the `Range` header unless `build` set one). A failed attempt after N delivered bytes
    /// is retried from `offset + N`. `sink` may answer [`ControlFlow::Break`]: the transfer stops
    /// (its connection is closed) and the call returns `Ok` with the bytes delivered so far.
    /// `len == 0` sends nothing and returns `Ok(0)`.
    ///
    /// # Errors
    /// [`StoreErrorKind::NotFound`] (404), [`StoreErrorKind::Truncated`] (the object ends inside
    /// the range: 416, a shorter `Content-Range`), [`StoreErrorKind::Corrupt`] (an answer that
    /// is not the requested range), [`StoreErrorKind::Io`] (other statuses, connection failures
    /// and deadlines past the retries).
    pub fn read_stream(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        build: &mut BuildRangeRequest<'_>,
        sink: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        let Some(end) = offset.checked_add(len) else {
            return Err(StoreError::new(
                StoreErrorKind::InvalidKey,
                self.url(),
                key,
                format!("range at {offset} of {len} bytes overflows"),
            ));
        };
        if len == 0 {
            return Ok(0);
        }
        let rt = runtime().map_err(|e| StoreError::new(StoreErrorKind::Io, self.url(), key, e))?;
        let mut op_state = self.op("read", key, format!("read [{offset}, {end})"));
        let mut done = 0u64;
        let result = 'op: loop {
            let start = offset.saturating_add(done);
            let mut req = build(start, end)?;
            if !req.headers.contains_key(RANGE) {
                let value =
                    HeaderValue::from_str(&format!("bytes={start}-{}", end.saturating_sub(1)))
                        .map_err(|e| op_state.error(StoreErrorKind::InvalidKey, &e.to_string()))?;
                req.headers.insert(RANGE, value);
            }
            let req = self
                .to_hyper(req)
                .map_err(|e| op_state.error(StoreErrorKind::InvalidKey, &e))?;
            op_state.begin_attempt();
            let (tx, mut rx) = mpsc::channel(STREAM_CHANNEL_DEPTH);
            rt.spawn(Self::stream_attempt(
                self.client.clone(),
                req,
                self.config,
                op_state.deadline,
                (start, end),
                tx,
                (self.scheme, "read"),
            ));
            let failure = loop {
                match block_on(rx.recv()) {
                    Some(Event::Data(piece)) => {
                        let n = u64::try_from(piece.len()).unwrap_or(u64::MAX);
                        done = done.saturating_add(n);
                        self.counters.bytes_received.fetch_add(n, Ordering::Relaxed);
                        metrics::counter!("thaw_store_bytes_received_total",
                            "scheme" => self.scheme, "op" => "read")
                        .increment(n);
                        if sink(&piece).is_break() {
                            // Dropping `rx` ends the task and closes its connection.
                            break 'op Ok(done);
                        }
                    }
                    Some(Event::End) => break 'op Ok(done),
                    Some(Event::Fail(f)) => break f,
                    None => {
                        break Failure::new(
                            "io",
                            StoreErrorKind::Io,
                            true,
                            "the request task ended without an answer".to_owned(),
                        );
                    }
                }
            };
            if done >= len {
                // Every byte arrived; only the end of the body went wrong (a chunked body whose
                // last chunk never came): the range is complete.
                break Ok(done);
            }
            let failure = if done > 0 && failure.retry {
                Failure {
                    detail: format!("{} (after {done} bytes delivered)", failure.detail),
                    ..failure
                }
            } else {
                failure
            };
            if let Some(e) = op_state.after_failure(failure) {
                break Err(e);
            }
        };
        op_state.finish();
        result
    }

    /// One attempt of a streamed ranged read of `[start, end)`: checks the answer is exactly
    /// that range, then forwards the body pieces. Ends when the receiver is dropped.
    async fn stream_attempt(
        client: HyperClient,
        req: Outgoing,
        config: HttpConfig,
        deadline: tokio::time::Instant,
        (start, end): (u64, u64),
        tx: mpsc::Sender<Event>,
        labels: (&'static str, &'static str),
    ) {
        let event =
            match Self::stream_body(client, req, config, deadline, (start, end), &tx, labels).await
            {
                Ok(true) => Event::End,
                Ok(false) => return, // the receiver is gone
                Err(f) => Event::Fail(f),
            };
        let _ = tx.send(event).await;
    }

    /// `Ok(true)`: the whole range was sent; `Ok(false)`: the receiver went away.
    async fn stream_body(
        client: HyperClient,
        req: Outgoing,
        config: HttpConfig,
        deadline: tokio::time::Instant,
        (start, end): (u64, u64),
        tx: &mpsc::Sender<Event>,
        labels: (&'static str, &'static str),
    ) -> Result<bool, Failure> {
        let resp = Self::send(client, req, &config, deadline, labels).await?;
        let (parts, mut body) = resp.into_parts();
        let want = end.saturating_sub(start);
        match parts.status {
            StatusCode::PARTIAL_CONTENT => {
                check_content_range(&parts.headers, start, end)?;
            }
            StatusCode::OK => {
                // The server ignored the range: only an answer that is exactly the range (the
                // whole object, starting at 0, of the requested length) can be used.
                let n = content_length(&parts.headers)?;
                if start != 0 || n != Some(want) {
                    return Err(Failure::new(
                        "bad_response",
                        StoreErrorKind::Corrupt,
                        false,
                        format!(
                            "HTTP 200 (the whole object{}) to a request for bytes [{start}, {end})",
                            n.map(|n| format!(", {n} bytes")).unwrap_or_default()
                        ),
                    ));
                }
            }
            status if status.is_success() => {
                return Err(Failure::new(
                    "bad_response",
                    StoreErrorKind::Corrupt,
                    false,
                    format!("unexpected HTTP {status} to a ranged read"),
                ));
            }
            status => {
                let text = Self::error_body(&mut body, deadline).await;
                return Err(Failure::status(status, &text));
            }
        }
        if let Some(n) = content_length(&parts.headers)?
            && n != want
        {
            return Err(Failure::new(
                "bad_response",
                StoreErrorKind::Corrupt,
                false,
                format!("Content-Length {n} for a range of {want} bytes"),
            ));
        }
        let mut got = 0u64;
        while let Some(piece) = Self::next_piece(&mut body, config.idle_timeout, deadline).await? {
            let n = u64::try_from(piece.len()).unwrap_or(u64::MAX);
            if got.saturating_add(n) > want {
                return Err(Failure::new(
                    "bad_response",
                    StoreErrorKind::Corrupt,
                    false,
                    format!("the body is longer than the requested {want} bytes"),
                ));
            }
            got += n;
            if tx.send(Event::Data(piece)).await.is_err() {
                return Ok(false);
            }
        }
        if got < want {
            return Err(Failure::new(
                "truncated",
                StoreErrorKind::Truncated,
                true,
                format!("the body ended after {got} of {want} bytes"),
            ));
        }
        Ok(true)
    }

    fn url(&self) -> String {
        self.store_url.clone()
    }
}

/// The `Content-Length` header, if any; an unparsable one is a failure.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Failure> {
    let Some(value) = headers.get(CONTENT_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            Failure::new(
                "bad_response",
                StoreErrorKind::Corrupt,
                false,
                format!("unparsable Content-Length {value:?}"),
            )
        })
}

/// Checks a 206 answer's `Content-Range: bytes a-b/total` is `[start, end)`. A range cut at
/// the object's end is [`StoreErrorKind::Truncated`]; anything else is
/// [`StoreErrorKind::Corrupt`].
fn check_content_range(headers: &HeaderMap, start: u64, end: u64) -> Result<(), Failure> {
    let bad = |detail: String| Failure::new("bad_response", StoreErrorKind::Corrupt, false, detail);
    let value = headers
        .get(CONTENT_RANGE)
        .ok_or_else(|| bad("HTTP 206 without Content-Range".to_owned()))?;
    let text = value
        .to_str()
        .map_err(|_| bad(format!("unparsable Content-Range {value:?}")))?;
    let parsed = parse_content_range(text)
        .ok_or_else(|| bad(format!("unparsable Content-Range {text:?}")))?;
    let (first, last, total) = parsed;
    if first == start && last.checked_add(1) == Some(end) {
        return Ok(());
    }
    if first == start && last < end && total.is_some_and(|t| last.checked_add(1) == Some(t)) {
        let size = total.unwrap_or_default();
        return Err(Failure::new(
            "truncated",
            StoreErrorKind::Truncated,
            false,
            format!("range [{start}, {end}) extends past the end of the object ({size} bytes)"),
        ));
    }
    Err(bad(format!(
        "Content-Range {text:?} is not the requested bytes [{start}, {end})"
    )))
}

/// Parses `bytes a-b/total` (total may be `*`).
fn parse_content_range(text: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = text.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let first = a.trim().parse::<u64>().ok()?;
    let last = b.trim().parse::<u64>().ok()?;
    if last < first {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    Some((first, last, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_config() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        for bad in ["", "x", "-1s", "NaNs", "1e400s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        let mut c = HttpConfig::default();
        assert_eq!(c.set("connect-timeout", "2s"), Ok(true));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.set("attempts", "3"), Ok(true));
        assert_eq!(c.attempts, 3);
        assert_eq!(c.set("colour", "blue"), Ok(false));
        assert!(c.set("attempts", "0").unwrap_err().contains("attempts"));
        assert!(c.set("budget", "0s").unwrap_err().contains("budget"));
        assert!(
            c.set("idle-timeout", "soon")
                .unwrap_err()
                .contains("idle-timeout")
        );
        let mut d = HttpConfig::default();
        for pair in c.to_query().split('&') {
            let (k, v) = pair.split_once('=').unwrap();
            assert_eq!(d.set(k, v), Ok(true), "{pair}");
        }
        assert_eq!(c, d);
    }

    #[test]
    fn queries_split() {
        let (base, pairs) = split_query("gs://b/p?budget=5s&x=a%2Fb&flag");
        assert_eq!(base, "gs://b/p");
        assert_eq!(
            pairs,
            vec![
                ("budget".to_owned(), "5s".to_owned()),
                ("x".to_owned(), "a/b".to_owned()),
                ("flag".to_owned(), String::new()),
            ]
        );
        assert_eq!(split_query("gs://b").1, Vec::new());
    }

    #[test]
    fn content_ranges() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(CONTENT_RANGE, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(check_content_range(&h("bytes 0-99/1000"), 0, 100).is_ok());
        assert!(check_content_range(&h("bytes 10-19/*"), 10, 20).is_ok());
        let cut = check_content_range(&h("bytes 900-999/1000"), 900, 1100).unwrap_err();
        assert_eq!(cut.kind, StoreErrorKind::Truncated);
        assert!(!cut.retry);
        for bad in [
            "bytes 0-99/1000",
            "bytes 11-19/100",
            "bytes x",
            "items 10-19/20",
        ] {
            let f = check_content_range(&h(bad), 10, 20).unwrap_err();
            assert_eq!(f.kind, StoreErrorKind::Corrupt, "{bad}");
        }
        assert_eq!(
            check_content_range(&HeaderMap::new(), 0, 1)
                .unwrap_err()
                .kind,
            StoreErrorKind::Corrupt
        );
    }

    #[test]
    fn statuses_classify() {
        let cases = [
            (404, StoreErrorKind::NotFound, false),
            (416, StoreErrorKind::Truncated, false),
            (403, StoreErrorKind::Denied, false),
            (401, StoreErrorKind::Denied, false),
            (429, StoreErrorKind::Io, true),
            (503, StoreErrorKind::Io, true),
            (500, StoreErrorKind::Io, true),
            (408, StoreErrorKind::Io, true),
        ];
        for (code, kind, retry) in cases {
            let f = Failure::status(StatusCode::from_u16(code).unwrap(), b"  why  ");
            assert_eq!((f.kind, f.retry), (kind, retry), "{code}");
            assert!(f.detail.ends_with(": why"), "{}", f.detail);
        }
        let f = Failure::status(
            StatusCode::FORBIDDEN,
            b"<?xml version=\"1.0\"?>\n<Error><Code>AccessDenied</Code><Message>no</Message>\
              <RequestId>1</RequestId></Error>",
        );
        assert_eq!(
            f.detail,
            "access denied (check the credentials and their permissions): \
             HTTP 403 Forbidden: AccessDenied: no"
        );
    }

    #[test]
    fn block_on_waits_for_the_runtime() {
        let rt = runtime().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        rt.spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(7u32).await.unwrap();
        });
        assert_eq!(block_on(rx.recv()), Some(7));
    }
}
