//! The S3-compatible store (`s3://bucket/prefix`): AWS S3, MinIO, R2, moto, ... over the shared
//! HTTP transport ([`super::http`]), requests signed with SigV4 by the `aws-sigv4` crate.
//!
//! # Configuration
//! `s3://BUCKET[/PREFIX][?PARAM=VALUE&...]`; builds live at `PREFIX/{build}/{file}`.
//!
//! | URL parameter | environment (used when the parameter is absent) | default |
//! |---|---|---|
//! | `endpoint=http://127.0.0.1:9000` | `AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL` | `https://s3.{region}.amazonaws.com` |
//! | `region=eu-west-1` | `AWS_REGION`, then `AWS_DEFAULT_REGION` | `us-east-1` |
//! | `path-style=true\|false` | | `true` with an endpoint override or a bucket name that is not a DNS label, else `false` (virtual-host style: `BUCKET.s3.{region}.amazonaws.com`) |
//! | `part-size=16MiB` | | 16 MiB (at least 5 MiB): multipart part size, and the largest object sent with one `PUT` |
//! | `upload-concurrency=4` | | 4 parts in flight |
//! | the transport's `connect-timeout`, `first-byte-timeout`, `idle-timeout`, `budget`, `attempts`, `backoff-base`, `backoff-max` | `THAW_HTTP_*` | see [`super::http::HttpConfig`] |
//!
//! Credentials come only from the environment (never from the URL, which appears in messages):
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and optionally `AWS_SESSION_TOKEN`. Without them
//! requests are sent unsigned (anonymous access to a public bucket); errors then say so.
//!
//! # Signing
//! Every request is signed (SigV4, service `s3`, a fresh timestamp per attempt) over the path,
//! query, `host`, `range`, `content-md5`, `content-type` and `x-amz-meta-*` headers and the
//! SHA-256 of the body (`x-amz-content-sha256`). Bodies are signed, not `UNSIGNED-PAYLOAD`: the
//! upload bodies are in memory anyway (one part or one small object), hashing them costs little
//! next to the upload, and the signature then also protects the bytes over plain `http://`
//! endpoints (MinIO or moto on a LAN), where TLS does not. Reads have empty bodies (the hash of
//! the empty string).
//!
//! # Operations
//! Ranged `GET` streamed through the transport (`read_range`, `read_range_progress`,
//! `read_stream`); `HEAD` for `stat` (size, preferring `x-amz-meta-uncompressed-size`) and
//! `exists`; `GET` for `get` (a `Content-Length` above the limit is refused before the body is
//! read); `PUT` with `Content-MD5` and `x-amz-meta-*` for small objects; the XML multipart upload
//! ([`super::multipart`]) for streaming writers and objects larger than one part. S3 `<Error>`
//! bodies are parsed into messages (`AccessDenied: ...`); 404 (`NoSuchKey`) is
//! [`StoreErrorKind::NotFound`] and never retried.

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use bytes::Bytes;

use super::http::{HttpClient, HttpConfig, HttpRequest, HttpResponse, split_query};
use super::multipart::{
    MAX_XML_BODY, Method, MultipartConfig, MultipartWriter, XmlApi, XmlRequest, XmlResponse,
    check_metadata, content_md5, metadata_headers,
};
use super::{ObjectInfo, ObjectWriter, PutOptions, Store, StoreError, StoreErrorKind};

/// Default multipart part size (and largest single `PUT`).
pub const DEFAULT_PART_SIZE: usize = 16 << 20;

/// Default number of parts uploaded at once.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;

/// Most parts in flight a URL may ask for.
const MAX_UPLOAD_CONCURRENCY: usize = 64;

/// Region when neither the URL nor the environment names one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// Custom metadata header prefix of S3.
const META_PREFIX: &str = "x-amz-meta-";

/// The URL parameters of the S3 store itself (the transport's are [`HttpConfig::KEYS`]).
pub const KEYS: &[&str] = &[
    "endpoint",
    "region",
    "path-style",
    "part-size",
    "upload-concurrency",
];

/// An endpoint: `http` or `https`, and `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http` or `https`.
    pub scheme: String,
    /// `host` or `host:port`.
    pub authority: String,
}

impl Endpoint {
    /// Parses `http://host[:port][/]` or `https://...`; a path, query, user info or an empty
    /// host is refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("endpoint {text:?} is not http://HOST[:PORT] or https://..."))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "endpoint {text:?}: the scheme must be http or https"
            ));
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(format!("endpoint {text:?} has no host"));
        }
        if authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "endpoint {text:?}: only http(s)://HOST[:PORT] is supported (no path, query or user)"
            ));
        }
        // Let the http crate judge the authority (and a port, if any).
        let uri: http::Uri = format!("{scheme}://{authority}/")
            .parse()
            .map_err(|e| format!("endpoint {text:?}: {e}"))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("endpoint {text:?} has no host"));
        }
        Ok(Self {
            scheme,
            authority: authority.to_owned(),
        })
    }

    /// `scheme://authority`.
    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }
}

/// Everything an [`S3Store`] needs, parsed from its URL and the environment.
#[derive(Clone)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// Endpoint override (`None`: AWS's regional endpoint).
    pub endpoint: Option<Endpoint>,
    /// Signing region.
    pub region: String,
    /// Path-style (`endpoint/bucket/key`) rather than virtual-host style (`bucket.endpoint/key`).
    pub path_style: bool,
    /// Signing credentials (`None`: anonymous).
    pub credentials: Option<Credentials>,
    /// Multipart part size.
    pub part_size: usize,
    /// Parts uploaded at once.
    pub upload_concurrency: usize,
    /// Deadlines and retries of the transport.
    pub http: HttpConfig,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field(
                "access_key_id",
                &self
                    .credentials
                    .as_ref()
                    .map(|c| c.access_key_id().to_owned()),
            )
            .field("part_size", &self.part_size)
            .field("upload_concurrency", &self.upload_concurrency)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

/// Whether `bucket` is usable as a DNS label in virtual-host style over TLS (lower-case letters,
/// digits and `-`, 3 to 63 characters, no dots: a dot breaks the `*.s3...` certificate).
fn dns_compatible(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !bucket.starts_with('-')
        && !bucket.ends_with('-')
}

/// A bucket name S3 or an S3-compatible service could have (legacy names included).
fn valid_bucket(bucket: &str) -> bool {
    (1..=255).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl S3Config {
    /// Parses `url` (`s3://bucket/prefix?...`), reading the environment through `env`
    /// (`|name| std::env::var(name).ok()` in production).
    pub fn parse(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, StoreError> {
        let bad = |detail: String| StoreError::new(StoreErrorKind::InvalidUrl, url, "", detail);
        let (base, params) = split_query(url);
        let rest = base
            .strip_prefix("s3://")
            .ok_or_else(|| bad("an S3 store URL starts with s3://".to_owned()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket (s3://BUCKET/PREFIX)".to_owned()));
        }
        if !valid_bucket(bucket) {
            return Err(bad(format!(
                "bucket name {bucket:?}: only letters, digits, '-', '.' and '_' are allowed"
            )));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            super::join_key(std::path::Path::new("/"), prefix)
                .map_err(|why| bad(format!("prefix {prefix:?}: {why}")))?;
        }

        let mut http = HttpConfig::default();
        for key in HttpConfig::KEYS {
            let var = format!("THAW_HTTP_{}", key.to_ascii_uppercase().replace('-', "_"));
            if let Some(value) = env(&var) {
                http.set(key, &value)
                    .map_err(|e| bad(format!("environment variable {var}: {e}")))?;
            }
        }

        let mut endpoint = None;
        let mut region = None;
        let mut path_style = None;
        let mut part_size = DEFAULT_PART_SIZE;
        let mut upload_concurrency = DEFAULT_UPLOAD_CONCURRENCY;
        for (key, value) in &params {
            match key.as_str() {
                "endpoint" => endpoint = Some(Endpoint::parse(value).map_err(bad)?),
                "region" => {
                    if value.is_empty()
                        || !value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    {
                        return Err(bad(format!("region={value:?} is not a region name")));
                    }
                    region = Some(value.clone());
                }
                "path-style" => {
                    path_style = Some(match value.as_str() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => {
                            return Err(bad(format!(
                                "path-style={value:?}: expected true or false"
                            )));
                        }
                    });
                }
                "part-size" => {
                    let n = crate::cli::parse_size(value)
                        .map_err(|e| bad(format!("part-size: {e}")))?;
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    if !(super::multipart::MIN_PART_SIZE..=super::multipart::MAX_PART_SIZE)
                        .contains(&n)
                    {
                        return Err(bad(format!(
                            "part-size={value}: S3 parts are 5 MiB to 5 GiB"
                        )));
                    }
                    part_size = n;
                }
                "upload-concurrency" => {
                    upload_concurrency = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_UPLOAD_CONCURRENCY).contains(n))
                        .ok_or_else(|| {
                            bad(format!(
                                "upload-concurrency={value:?}: expected 1 to {MAX_UPLOAD_CONCURRENCY}"
                            ))
                        })?;
                }
                other => {
                    if !http.set(other, value).map_err(bad)? {
                        return Err(bad(format!(
                            "unknown parameter {other:?} (known: {}, {})",
                            KEYS.join(", "),
                            HttpConfig::KEYS.join(", ")
                        )));
                    }
                }
            }
        }
        if endpoint.is_none() {
            for var in ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"] {
                if let Some(value) = env(var).filter(|v| !v.is_empty()) {
                    endpoint = Some(
                        Endpoint::parse(&value)
                            .map_err(|e| bad(format!("environment variable {var}: {e}")))?,
                    );
                    break;
                }
            }
        }
        let region = region
            .or_else(|| env("AWS_REGION").filter(|v| !v.is_empty()))
            .or_else(|| env("AWS_DEFAULT_REGION").filter(|v| !v.is_empty()))
            .unwrap_or_else(|| DEFAULT_REGION.to_owned());
        let path_style = match path_style {
            Some(false) if !dns_compatible(bucket) => {
                return Err(bad(format!(
                    "path-style=false: bucket {bucket:?} is not a DNS label (a-z, 0-9, '-'), so \
                     it cannot be addressed virtual-host style"
                )));
            }
            Some(p) => p,
            None => endpoint.is_some() || !dns_compatible(bucket),
        };
        let credentials = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
                let token = env("AWS_SESSION_TOKEN").filter(|t| !t.is_empty());
                Some(Credentials::new(id, secret, token, None, "environment"))
            }
            (Some(id), _) if !id.is_empty() => {
                return Err(bad(
                    "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".to_owned(),
                ));
            }
            (_, Some(secret)) if !secret.is_empty() => {
                return Err(bad(
                    "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".to_owned(),
                ));
            }
            _ => None,
        };
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint,
            region,
            path_style,
            credentials,
            part_size,
            upload_concurrency,
            http,
        })
    }

    /// The store's URL: bucket, prefix and endpoint override (what names its objects), for
    /// messages and for telling two stores apart.
    pub fn url(&self) -> String {
        let mut url = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            url.push('/');
            url.push_str(&self.prefix);
        }
        if let Some(endpoint) = &self.endpoint {
            url.push_str("?endpoint=");
            url.push_str(&endpoint.base());
        }
        url
    }

    /// The endpoint requests go to (before virtual-host addressing).
    fn endpoint(&self) -> Endpoint {
        self.endpoint.clone().unwrap_or_else(|| Endpoint {
            scheme: "https".to_owned(),
            authority: format!("s3.{}.amazonaws.com", self.region),
        })
    }

    /// The full object name of `key` (prefix included).
    fn object_name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// The request URL of object `key` (`None`: the bucket itself) with `query` (encoded).
    pub fn request_url(&self, key: Option<&str>, query: &str) -> String {
        let endpoint = self.endpoint();
        let mut url = if self.path_style {
            format!("{}/{}", endpoint.base(), encode_path_segment(&self.bucket))
        } else {
            format!(
                "{}://{}.{}",
                endpoint.scheme, self.bucket, endpoint.authority
            )
        };
        if let Some(key) = key {
            url.push('/');
            let name = self.object_name(key);
            let encoded: Vec<String> = name.split('/').map(encode_path_segment).collect();
            url.push_str(&encoded.join("/"));
        } else if !self.path_style {
            url.push('/');
        }
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        url
    }
}

/// RFC 3986 unreserved characters stay; everything else is percent-encoded (S3's rule for
/// key segments, which SigV4 then signs as is).
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode_path_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, PATH_SEGMENT).to_string()
}

/// Adds the SigV4 headers (`authorization`, `x-amz-date`, `x-amz-content-sha256`,
/// `x-amz-security-token`) for a request to `url` with `headers` and `body`, signed at `time`.
pub fn sign_request(
    credentials: &Credentials,
    region: &str,
    method: &str,
    url: &str,
    headers: &mut Vec<(String, String)>,
    body: &[u8],
    time: SystemTime,
) -> Result<(), String> {
    let mut settings = SigningSettings::default();
    // Keys are encoded once when the URL is built; S3 does not double-encode nor normalise.
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("s3")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("signing {method} {url}: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("signing {method} {url}: {e}"))?
        .into_parts();
    let (new_headers, _params) = instructions.into_parts();
    for h in new_headers {
        headers.push((h.name().to_owned(), h.value().to_owned()));
    }
    Ok(())
}

/// One buffered request of [`S3Api::execute`].
#[derive(Debug)]
struct Call<'a> {
    method: Method,
    /// The object (`None`: the bucket).
    key: Option<&'a str>,
    /// Encoded query string without `?`.
    query: &'a str,
    headers: &'a [(String, String)],
    body: Bytes,
    /// Largest body accepted (refused before reading when announced).
    max_body: u64,
}

/// The S3 side of the XML API: URLs, signing and the transport.
#[derive(Debug)]
pub struct S3Api {
    config: S3Config,
    url: String,
    client: HttpClient,
}

impl S3Api {
    /// One signed request for `key` (`None`: the bucket).
    fn build(
        &self,
        method: Method,
        key: Option<&str>,
        query: &str,
        headers: &[(String, String)],
        body: &Bytes,
    ) -> Result<HttpRequest, StoreError> {
        let url = self.config.request_url(key, query);
        let mut all: Vec<(String, String)> = headers.to_vec();
        if let Some(creds) = &self.config.credentials {
            sign_request(
                creds,
                &self.config.region,
                method.as_str(),
                &url,
                &mut all,
                body,
                SystemTime::now(),
            )
            .map_err(|e| {
                StoreError::new(StoreErrorKind::InvalidKey, &self.url, key.unwrap_or(""), e)
            })?;
        }
        let method = match method {
            Method::Get => http::Method::GET,
            Method::Head => http::Method::HEAD,
            Method::Put => http::Method::PUT,
            Method::Post => http::Method::POST,
            Method::Delete => http::Method::DELETE,
        };
        let mut req = HttpRequest::new(method, url).body(body.clone());
        for (name, value) in &all {
            req = req.header(name, value).map_err(|e| {
                StoreError::new(StoreErrorKind::InvalidKey, &self.url, key.unwrap_or(""), e)
            })?;
        }
        Ok(req)
    }

    /// Runs one buffered request (retried by the transport); `label` names the operation in
    /// metrics, `what` in messages.
    fn execute(
        &self,
        label: &'static str,
        what: &str,
        call: Call<'_>,
    ) -> Result<HttpResponse, StoreError> {
        let Call {
            method,
            key,
            query,
            headers,
            body,
            max_body,
        } = call;
        self.client
            .execute(label, key.unwrap_or(""), what, max_body, &mut || {
                self.build(method, key, query, headers, &body)
            })
            .map_err(|e| self.explain(e))
    }

    /// Adds a hint to access errors of unsigned requests.
    fn explain(&self, e: StoreError) -> StoreError {
        if self.config.credentials.is_none() && e.to_string().contains("HTTP 403") {
            return StoreError::new(
                e.kind(),
                e.url(),
                e.key(),
                format!(
                    "{} (the request was unsigned: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                     are not set)",
                    detail_of(&e)
                ),
            );
        }
        e
    }
}

/// The detail of `e` (its display without the `url: key: ` head).
fn detail_of(e: &StoreError) -> String {
    let text = e.to_string();
    let head = if e.key().is_empty() {
        format!("{}: ", e.url())
    } else {
        format!("{}: {}: ", e.url(), e.key())
    };
    text.strip_prefix(&head).unwrap_or(&text).to_owned()
}

impl XmlApi for S3Api {
    fn store_url(&self) -> String {
        self.url.clone()
    }

    fn meta_prefix(&self) -> &'static str {
        META_PREFIX
    }

    fn send(&self, mut req: XmlRequest<'_>) -> Result<XmlResponse, StoreError> {
        let label = req.metric_op();
        let headers = req.take_headers();
        let resp = self.execute(
            label,
            req.op,
            Call {
                method: req.method,
                key: Some(req.key),
                query: req.query,
                headers: &headers,
                body: Bytes::from(req.body),
                max_body: u64::try_from(MAX_XML_BODY).unwrap_or(u64::MAX),
            },
        )?;
        Ok(XmlResponse::from_parts(
            resp.status,
            &resp.headers,
            &resp.body,
        ))
    }
}

/// The S3-compatible store.
#[derive(Debug, Clone)]
pub struct S3Store {
    api: Arc<S3Api>,
}

impl S3Store {
    /// Opens `url` with credentials and defaults from the process environment.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with_env(url, &|name| std::env::var(name).ok())
    }

    /// Opens `url`, reading the environment through `env`.
    pub fn open_with_env(
        url: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, StoreError> {
        Self::from_config(S3Config::parse(url, env)?)
    }

    /// A store from a parsed configuration.
    pub fn from_config(config: S3Config) -> Result<Self, StoreError> {
        let url = config.url();
        let client = HttpClient::new(url.clone(), "s3", config.http)?;
        Ok(Self {
            api: Arc::new(S3Api {
                config,
                url,
                client,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &S3Config {
        &self.api.config
    }

    /// Counters of the store's HTTP requests.
    pub fn http_stats(&self) -> super::http::HttpStats {
        self.api.client.stats()
    }

    fn err(&self, kind: StoreErrorKind, key: &str, detail: impl Into<String>) -> StoreError {
        StoreError::new(kind, &self.api.url, key, detail)
    }

    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        super::join_key(std::path::Path::new("/"), key)
            .map(|_| ())
            .map_err(|why| self.err(StoreErrorKind::InvalidKey, key, why))
    }

    /// Creates the bucket (`PUT /bucket`, with a location constraint outside us-east-1). An
    /// existing bucket of ours (`BucketAlreadyOwnedByYou`) is not an error.
    pub fn create_bucket(&self) -> Result<(), StoreError> {
        let body = if self.api.config.region == DEFAULT_REGION {
            Vec::new()
        } else {
            format!(
                "<CreateBucketConfiguration><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                self.api.config.region
            )
            .into_bytes()
        };
        let res = self.api.execute(
            "create_bucket",
            "CreateBucket",
            Call {
                method: Method::Put,
                key: None,
                query: "",
                headers: &[],
                body: Bytes::from(body),
                max_body: u64::try_from(MAX_XML_BODY).unwrap_or(u64::MAX),
            },
        );
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("BucketAlreadyOwnedByYou") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Keys (below the prefix) of the multipart uploads in progress under the prefix
    /// (ListMultipartUploads; the first 1000).
    pub fn list_multipart_uploads(&self) -> Result<Vec<String>, StoreError> {
        let mut query = "uploads".to_owned();
        if !self.api.config.prefix.is_empty() {
            query.push_str("&prefix=");
            query.push_str(&super::multipart::encode_query_value(&format!(
                "{}/",
                self.api.config.prefix
            )));
        }
        let resp = self.api.execute(
            "list",
            "ListMultipartUploads",
            Call {
                method: Method::Get,
                key: None,
                query: &query,
                headers: &[],
                body: Bytes::new(),
                max_body: u64::try_from(MAX_XML_BODY).unwrap_or(u64::MAX),
            },
        )?;
        let keys = super::multipart::parse_list_uploads(&resp.body)
            .map_err(|e| self.err(StoreErrorKind::Io, "", format!("ListMultipartUploads: {e}")))?;
        let strip = if self.api.config.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.api.config.prefix)
        };
        Ok(keys
            .into_iter()
            .map(|k| k.strip_prefix(&strip).map(str::to_owned).unwrap_or(k))
            .collect())
    }

    /// The streaming writer [`Store::create`] returns, with its concrete type (its
    /// [`MultipartWriter::upload_id`] is visible once the first part is sent).
    pub fn multipart_writer(
        &self,
        key: &str,
        opts: &PutOptions,
    ) -> Result<MultipartWriter<S3Api>, StoreError> {
        self.check_key(key)?;
        MultipartWriter::new(Arc::clone(&self.api), key, opts, self.multipart_config())
    }

    /// AbortMultipartUpload of upload `upload_id` of `key` (operations and tests: a writer aborts
    /// its own upload on failure and on drop).
    pub fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.check_key(key)?;
        let query = format!(
            "uploadId={}",
            super::multipart::encode_query_value(upload_id)
        );
        self.api.send(XmlRequest {
            op: "AbortMultipartUpload",
            method: Method::Delete,
            key,
            query: &query,
            headers: Vec::new(),
            body: Vec::new(),
        })?;
        Ok(())
    }

    /// `HEAD` of `key`.
    ///
    /// A HEAD answer has no body, so a refused HEAD (403, 400) would not say why: the request is
    /// then repeated as a one-byte GET, whose `<Error>` body names the S3 error code
    /// (`InvalidAccessKeyId`, `SignatureDoesNotMatch`, ...).
    fn head(&self, key: &str) -> Result<HttpResponse, StoreError> {
        self.check_key(key)?;
        let res = self.api.execute(
            "stat",
            "stat",
            Call {
                method: Method::Head,
                key: Some(key),
                query: "",
                headers: &[],
                body: Bytes::new(),
                max_body: 0,
            },
        );
        match res {
            Err(e)
                if matches!(e.kind(), StoreErrorKind::Io | StoreErrorKind::Denied) && {
                    let text = e.to_string();
                    text.contains("HTTP 403") || text.contains("HTTP 400")
                } =>
            {
                let range = [("range".to_owned(), "bytes=0-0".to_owned())];
                match self.api.execute(
                    "stat",
                    "stat (GET for the error code)",
                    Call {
                        method: Method::Get,
                        key: Some(key),
                        query: "",
                        headers: &range,
                        body: Bytes::new(),
                        max_body: 1,
                    },
                ) {
                    Err(why) => Err(why),
                    Ok(_) => Err(e),
                }
            }
            other => other,
        }
    }

    fn multipart_config(&self) -> MultipartConfig {
        MultipartConfig {
            part_size: self.api.config.part_size,
            concurrency: self.api.config.upload_concurrency,
        }
    }
}

impl Store for S3Store {
    fn url(&self) -> String {
        self.api.url.clone()
    }

    fn read_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.read_range_progress(key, offset, buf, &mut |_| {})
    }

    fn read_range_progress(
        &self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
        progress: &mut dyn FnMut(usize),
    ) -> Result<(), StoreError> {
        super::read_range_from_stream(self, key, offset, buf, progress)
    }

    fn read_stream(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        self.check_key(key)?;
        let api = &self.api;
        api.client
            .read_stream(
                key,
                offset,
                len,
                &mut |start, end| {
                    let range = vec![(
                        "range".to_owned(),
                        format!("bytes={start}-{}", end.saturating_sub(1)),
                    )];
                    api.build(Method::Get, Some(key), "", &range, &Bytes::new())
                },
                sink,
            )
            .map_err(|e| api.explain(e))
    }

    fn stat(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        let resp = self.head(key)?;
        let size = resp
            .header_str("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                self.err(
                    StoreErrorKind::Corrupt,
                    key,
                    "HEAD answered without a valid Content-Length",
                )
            })?;
        let meta = format!(
            "{META_PREFIX}{}",
            thaw_codec::names::UNCOMPRESSED_SIZE_METADATA
        );
        let uncompressed_size = match resp.header_str(&meta) {
            None => None,
            Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                self.err(
                    StoreErrorKind::Corrupt,
                    key,
                    format!("{meta} {v:?} is not a decimal number"),
                )
            })?),
        };
        Ok(ObjectInfo {
            size,
            uncompressed_size,
        })
    }

    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>, StoreError> {
        self.check_key(key)?;
        let resp = self.api.execute(
            "get",
            "get",
            Call {
                method: Method::Get,
                key: Some(key),
                query: "",
                headers: &[],
                body: Bytes::new(),
                max_body: max_len,
            },
        )?;
        Ok(resp.body.to_vec())
    }

    fn put(&self, key: &str, data: &[u8], opts: &PutOptions) -> Result<(), StoreError> {
        self.check_key(key)?;
        if data.len() > self.api.config.part_size {
            let mut writer = self.create(key, opts)?;
            std::io::Write::write_all(&mut writer, data)
                .map_err(|e| StoreError::io(&self.api.url, key, "upload", e))?;
            return writer.commit();
        }
        check_metadata(opts).map_err(|e| self.err(StoreErrorKind::InvalidKey, key, e))?;
        let mut headers = metadata_headers(META_PREFIX, opts);
        headers.push(("content-md5".to_owned(), content_md5(data)));
        self.api.send(XmlRequest {
            op: "PutObject",
            method: Method::Put,
            key,
            query: "",
            headers,
            body: data.to_vec(),
        })?;
        Ok(())
    }

    fn create(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        Ok(Box::new(self.multipart_writer(key, opts)?))
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.head(key) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn urls_parse_with_defaults() {
        let c = S3Config::parse("s3://snap/builds/v1/", &env_of(&[])).unwrap();
        assert_eq!(c.bucket, "snap");
        assert_eq!(c.prefix, "builds/v1");
        assert_eq!(c.endpoint, None);
        assert_eq!(c.region, "us-east-1");
        assert!(!c.path_style);
        assert!(c.credentials.is_none());
        assert_eq!(c.part_size, DEFAULT_PART_SIZE);
        assert_eq!(c.upload_concurrency, DEFAULT_UPLOAD_CONCURRENCY);
        assert_eq!(c.url(), "s3://snap/builds/v1");
        assert_eq!(
            c.request_url(Some("b1/memfile.zstd"), ""),
            "https://snap.s3.us-east-1.amazonaws.com/builds/v1/b1/memfile.zstd"
        );
        assert_eq!(
            c.request_url(None, "uploads"),
            "https://snap.s3.us-east-1.amazonaws.com/?uploads"
        );
        let bare = S3Config::parse("s3://snap", &env_of(&[])).unwrap();
        assert_eq!(bare.prefix, "");
        assert_eq!(bare.url(), "s3://snap");
        assert_eq!(
            bare.request_url(Some("k"), ""),
            "https://snap.s3.us-east-1.amazonaws.com/k"
        );
    }

    #[test]
    fn parameters_and_environment() {
        let env = env_of(&[
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "SECRET"),
            ("AWS_SESSION_TOKEN", "TOKEN"),
            ("AWS_REGION", "eu-west-3"),
            ("AWS_DEFAULT_REGION", "ap-south-1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("THAW_HTTP_BUDGET", "7s"),
        ]);
        let c = S3Config::parse("s3://snap/p", &env).unwrap();
        assert_eq!(c.region, "eu-west-3");
        assert_eq!(c.endpoint.as_ref().unwrap().base(), "http://127.0.0.1:9000");
        assert!(c.path_style, "an endpoint override defaults to path style");
        assert_eq!(c.http.budget, std::time::Duration::from_secs(7));
        let creds = c.credentials.as_ref().unwrap();
        assert_eq!(creds.access_key_id(), "AKID");
        assert_eq!(creds.session_token(), Some("TOKEN"));
        assert_eq!(c.url(), "s3://snap/p?endpoint=http://127.0.0.1:9000");
        assert_eq!(
            c.request_url(Some("a b/c+d"), "partNumber=1&uploadId=x"),
            "http://127.0.0.1:9000/snap/p/a%20b/c%2Bd?partNumber=1&uploadId=x"
        );
        // The secret never shows in Debug output.
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("SECRET") && !debug.contains("TOKEN"),
            "{debug}"
        );

        // URL parameters win over the environment.
        let c = S3Config::parse(
            "s3://snap/p?endpoint=https%3A%2F%2Fminio.local%3A9443&region=us-west-2&path-style=false\
             &part-size=5MiB&upload-concurrency=2&budget=3s&attempts=2",
            &env,
        )
        .unwrap();
        assert_eq!(
            c.endpoint.as_ref().unwrap().base(),
            "https://minio.local:9443"
        );
        assert_eq!(c.region, "us-west-2");
        assert!(!c.path_style);
        assert_eq!(c.part_size, 5 << 20);
        assert_eq!(c.upload_concurrency, 2);
        assert_eq!(c.http.budget, std::time::Duration::from_secs(3));
        assert_eq!(c.http.attempts, 2);
        assert_eq!(
            c.request_url(Some("k"), ""),
            "https://snap.minio.local:9443/p/k"
        );
        // AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL; AWS_DEFAULT_REGION is the fallback.
        let c = S3Config::parse(
            "s3://snap",
            &env_of(&[
                ("AWS_ENDPOINT_URL", "http://a:1"),
                ("AWS_ENDPOINT_URL_S3", "http://b:2"),
                ("AWS_DEFAULT_REGION", "ap-south-1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.endpoint.unwrap().base(), "http://b:2");
        assert_eq!(c.region, "ap-south-1");
        // A bucket that is not a DNS label is addressed path style even on AWS.
        let c = S3Config::parse("s3://My_Bucket.old", &env_of(&[])).unwrap();
        assert!(c.path_style);
        assert_eq!(
            c.request_url(Some("k"), ""),
            "https://s3.us-east-1.amazonaws.com/My_Bucket.old/k"
        );
    }

    #[test]
    fn bad_urls_are_refused_clearly() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case<'_>] = &[
            ("s3://", &[], "no bucket"),
            ("s3:///prefix", &[], "no bucket"),
            ("s3://b a d", &[], "bucket name"),
            ("s3://b/x/../y", &[], "prefix"),
            ("s3://b//y", &[], "prefix"),
            ("s3://b?colour=blue", &[], "unknown parameter \"colour\""),
            ("s3://b?endpoint=ftp://x", &[], "http or https"),
            ("s3://b?endpoint=http://", &[], "no host"),
            ("s3://b?endpoint=http://h/path", &[], "no path"),
            ("s3://b?endpoint=127.0.0.1:9000", &[], "not http://"),
            ("s3://b?region=", &[], "region"),
            ("s3://b?path-style=maybe", &[], "path-style"),
            ("s3://b?part-size=1MiB", &[], "5 MiB to 5 GiB"),
            ("s3://b?part-size=lots", &[], "part-size"),
            ("s3://b?upload-concurrency=0", &[], "upload-concurrency"),
            ("s3://b?budget=never", &[], "budget"),
            ("s3://b.c?path-style=false", &[], "not a DNS label"),
            (
                "s3://b",
                &[("AWS_ACCESS_KEY_ID", "x")],
                "AWS_SECRET_ACCESS_KEY is not",
            ),
            (
                "s3://b",
                &[("AWS_SECRET_ACCESS_KEY", "x")],
                "AWS_ACCESS_KEY_ID is not",
            ),
            (
                "s3://b",
                &[("AWS_ENDPOINT_URL", "nope")],
                "AWS_ENDPOINT_URL",
            ),
            (
                "s3://b",
                &[("THAW_HTTP_ATTEMPTS", "0")],
                "THAW_HTTP_ATTEMPTS",
            ),
        ];
        for (url, env, want) in cases {
            let err = S3Config::parse(url, &env_of(env)).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::InvalidUrl, "{url}: {err}");
            assert!(err.to_string().contains(want), "{url}: {err}");
            assert!(err.to_string().starts_with(url), "{url}: {err}");
        }
    }

    #[test]
    fn signing_matches_a_known_signature() {
        // AWS's documented example (S3 SigV4, "GET Object" with a range):
        // https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
        let creds = Credentials::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "test",
        );
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600); // 20130524T000000Z
        let mut headers = vec![("range".to_owned(), "bytes=0-9".to_owned())];
        sign_request(
            &creds,
            "us-east-1",
            "GET",
            "https://examplebucket.s3.amazonaws.com/test.txt",
            &mut headers,
            b"",
            time,
        )
        .unwrap();
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("x-amz-date"), "20130524T000000Z");
        assert_eq!(
            get("x-amz-content-sha256"),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            get("authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }
}
