//! The Google Cloud Storage store (`gs://bucket/prefix`), over the JSON API through the HTTP
//! transport ([`super::http`]).
//!
//! - Reads: `GET /storage/v1/b/{bucket}/o/{object}?alt=media` with a `Range` header, streamed
//!   piece by piece to the caller ([`Store::read_stream`]); whole-object `get` refuses an
//!   announced length above its limit before reading the body.
//! - `stat`: the object resource (`GET /storage/v1/b/{bucket}/o/{object}`): `size` and the
//!   custom `metadata` (e2b's `uncompressed-size` on compressed objects).
//! - `put`: one multipart upload (`uploadType=multipart`: the JSON resource with the custom
//!   metadata and the payload's `md5Hash`, then the bytes); the MD5 the service reports is
//!   checked against ours.
//! - Uploads (`put`, `create`) take one of three paths ([`UploadMode`], URL parameter
//!   `upload=xml|compose|resumable`):
//!   - `xml` (the default against the real service, as e2b uploads): the XML API at
//!     `{xml-endpoint}/{bucket}/{object}` (default `https://storage.googleapis.com`) through
//!     [`MultipartWriter`]: up to one part a single `PUT` with `Content-MD5`; beyond, a
//!     multipart upload (`POST ?uploads` with the `x-goog-meta-*` metadata, parts of
//!     `part-size` ≥ 5 MiB with `Content-MD5`, `upload-concurrency` at a time, then complete;
//!     aborted on failure or drop). Bearer-token auth as below.
//!   - `resumable` (the default when an emulator endpoint is given): a JSON API resumable
//!     upload. `put` up to one chunk and a `create` that stays within one chunk are one JSON
//!     multipart upload. Beyond, the first full chunk (`part-size`, default 64 MiB, a multiple
//!     of 256 KiB) starts a session (`POST …?uploadType=resumable&name=…` with the resource and
//!     its custom metadata; the `Location` answered is the session URI, taken as its path and
//!     query on the endpoint), then each chunk is `PUT` with `Content-Range: bytes A-B/*` by an
//!     upload thread while the writer fills the next (at most two chunks held), answered 308
//!     with the persisted `Range`; the last chunk, at commit, carries the total (`A-B/N`) and
//!     finalizes the object, whose size and MD5 are checked against the bytes sent (a wrong one
//!     is deleted). A failed chunk attempt asks the session's status and resends from what it
//!     persisted (`Session::status`: `Content-Range: bytes */*` for the service; an MD5-telling
//!     empty `PUT` for an emulator, as fake-gcs-server finalizes the object on `*/*`). Dropped
//!     or failed, the session is cancelled (`DELETE`, answered 499).
//!   - `compose`: `put` is one JSON multipart upload; `create` streams, and beyond one
//!     part (`part-size`, default 16 MiB) uploads each part as a temporary object
//!     `{object}.thaw-part-{upload id}-{n}` (concurrently, each checked against its MD5);
//!     commit composes them into the object (≤ 32 sources per compose call; more in levels)
//!     with the custom metadata on the final compose, then deletes the temporary objects.
//!     Parts left by an upload that died before its cleanup are found by that prefix and
//!     deleted when the next upload of the same object starts ([`GcsStore::stale_parts`]).
//!
//!   Either way nothing appears under the object's name before commit.
//!
//! Endpoint and authentication: `STORAGE_EMULATOR_HOST` (`http://127.0.0.1:PORT` or
//! `127.0.0.1:PORT`, as Google's clients honour it) or the `endpoint=` URL parameter name an
//! emulator, used anonymously; otherwise `https://storage.googleapis.com` with a bearer token:
//! `THAW_GCS_TOKEN` when set, else gcp_auth's sources in order (a service-account key named by
//! `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's application-default credentials, the metadata
//! server, the gcloud CLI), asked at the first request. `THAW_GCS_TOKEN` is also sent to an
//! emulator when set.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use base64::Engine as _;
use http::{Method, StatusCode};
use md5::{Digest, Md5};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::json;

use super::http::{HttpClient, HttpConfig, HttpRequest, HttpResponse, split_query};
use super::multipart::{
    MAX_XML_BODY, Method as XmlMethod, MultipartConfig, MultipartWriter, XmlApi, XmlRequest,
    XmlResponse,
};
use super::{ObjectInfo, ObjectWriter, PutOptions, Store, StoreError, StoreErrorKind};

/// The public endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";

/// The environment variable naming an emulator (as Google's client libraries honour it).
pub const EMULATOR_ENV: &str = "STORAGE_EMULATOR_HOST";

/// The environment variable holding an explicit OAuth2 bearer token.
pub const TOKEN_ENV: &str = "THAW_GCS_TOKEN";

/// OAuth2 scope asked of gcp_auth.
const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";

/// Default part size of large uploads (`xml`, `compose`).
pub const DEFAULT_PART_SIZE: usize = 16 << 20;

/// Default chunk size of resumable uploads (`part-size` sets it too). Large: fake-gcs-server
/// rehashes the whole object at every chunk, and 64 MiB chunks measured faster than compose
/// there where 16 and 32 MiB did not (docs/benchmarks.md). A writer holds at most two.
pub const DEFAULT_CHUNK_SIZE: usize = 64 << 20;

/// A resumable upload's chunks (but the last) are whole multiples of this (the service's rule).
pub const CHUNK_QUANTUM: usize = 256 << 10;

/// The statuses a resumable upload's chunk `PUT` may answer besides 2xx: 308 Resume Incomplete.
const RESUME_INCOMPLETE: &[StatusCode] = &[StatusCode::PERMANENT_REDIRECT];

/// A cancelled resumable session answers 499 (the service and fake-gcs-server alike).
const CANCELLED: &[StatusCode] = &[StatusCode::PERMANENT_REDIRECT, CLIENT_CLOSED_REQUEST];

/// 499, GCS's answer to a session `DELETE`.
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// Smallest accepted `part-size`.
pub const MIN_PART_SIZE: usize = 256 << 10;

/// Default number of parts uploaded at once.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;

/// What names a temporary part object of a compose upload: `{object}.thaw-part-{upload id}-…`.
pub const PART_INFIX: &str = ".thaw-part-";

/// Most sources of one compose call (the service's limit).
pub const MAX_COMPOSE_SOURCES: usize = 32;

/// Largest JSON answer read (object resources, upload answers).
const MAX_JSON: u64 = 1 << 20;

/// Characters escaped in a path segment or query value: everything but unreserved ones.
const ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How requests are authorised.
enum Auth {
    /// No credentials (an emulator).
    Anonymous,
    /// A fixed bearer token.
    Token(String),
    /// gcp_auth's provider, found at the first request.
    Provider(Mutex<Option<Arc<dyn gcp_auth::TokenProvider>>>),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Anonymous => "Anonymous",
            Self::Token(_) => "Token(..)",
            Self::Provider(_) => "Provider",
        })
    }
}

/// How large objects (and, with [`UploadMode::Xml`], every object) are uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadMode {
    /// The XML API's multipart upload (`POST ?uploads`, parts with `Content-MD5`, complete), as
    /// e2b uploads; small objects are one XML `PUT`. The default for the real service.
    Xml,
    /// JSON API: parts uploaded as temporary objects, then composed (fake-gcs-server has no XML
    /// multipart upload).
    Compose,
    /// JSON API resumable upload: one session, chunks `PUT` in order as the writer fills them,
    /// the object appearing only when the last chunk finalizes it. The default when an emulator
    /// endpoint is given.
    Resumable,
}

impl UploadMode {
    /// The name in the `upload=` URL parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Xml => "xml",
            Self::Compose => "compose",
            Self::Resumable => "resumable",
        }
    }
}

/// A GCS bucket (and key prefix) as a [`Store`].
#[derive(Debug, Clone)]
pub struct GcsStore {
    url: String,
    bucket: String,
    prefix: String,
    endpoint: String,
    /// Base URL of the XML API (`https://storage.googleapis.com`: `{xml}/{bucket}/{object}`).
    xml_endpoint: String,
    upload: UploadMode,
    /// An emulator endpoint (`endpoint=` or `STORAGE_EMULATOR_HOST`).
    emulator: bool,
    http: HttpClient,
    auth: Arc<Auth>,
    part_size: usize,
    upload_concurrency: usize,
}

/// The XML API side of a [`GcsStore`] (bearer-token auth, `x-goog-meta-` metadata), driving
/// [`MultipartWriter`].
#[derive(Debug)]
pub struct GcsXmlApi {
    store: GcsStore,
}

impl GcsStore {
    /// Opens `gs://bucket[/prefix][?param=value&...]`. Parameters: the transport's
    /// ([`HttpConfig::KEYS`]), `endpoint=URL` (an emulator, anonymous),
    /// `upload=xml|compose|resumable` ([`UploadMode`]; default `xml` for the real service,
    /// `resumable` with an emulator),
    /// `xml-endpoint=URL` (the XML API's base URL; default the endpoint), `part-size=SIZE`
    /// (upload part or chunk:
    /// ≥ 256 KiB for compose, a multiple of 256 KiB for resumable, ≥ 5 MiB for xml) and `upload-concurrency=N`.
    /// Transport defaults come from the `THAW_HTTP_*` variables ([`HttpConfig::from_env`]);
    /// `STORAGE_EMULATOR_HOST` and `THAW_GCS_TOKEN` from the process environment.
    ///
    /// # Errors
    /// [`StoreErrorKind::InvalidUrl`] for a bad bucket, parameter or environment value.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with_env(url, &|name| std::env::var(name).ok())
    }

    /// [`GcsStore::open`], reading `STORAGE_EMULATOR_HOST` and `THAW_GCS_TOKEN` through `env`.
    ///
    /// # Errors
    /// As [`GcsStore::open`].
    pub fn open_with_env(
        url: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, StoreError> {
        let invalid = |detail: String| StoreError::new(StoreErrorKind::InvalidUrl, url, "", detail);
        let (base, params) = split_query(url);
        let rest = base
            .strip_prefix("gs://")
            .ok_or_else(|| invalid("a GCS URL starts with gs://".to_owned()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        check_bucket(bucket).map_err(invalid)?;
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            super::join_key(std::path::Path::new("/"), prefix)
                .map_err(|e| invalid(format!("prefix {prefix:?}: {e}")))?;
        }
        let mut config = HttpConfig::from_env().map_err(invalid)?;
        let mut endpoint = None;
        let mut xml_endpoint = None;
        let mut upload = None;
        let mut part_size = None;
        let mut upload_concurrency = DEFAULT_UPLOAD_CONCURRENCY;
        for (key, value) in &params {
            if config.set(key, value).map_err(invalid)? {
                continue;
            }
            match key.as_str() {
                "endpoint" => endpoint = Some(value.clone()),
                "xml-endpoint" => xml_endpoint = Some(value.clone()),
                "upload" => {
                    upload = Some(match value.as_str() {
                        "xml" => UploadMode::Xml,
                        "compose" => UploadMode::Compose,
                        "resumable" => UploadMode::Resumable,
                        _ => {
                            return Err(invalid(format!(
                                "upload={value:?}: expected xml, compose or resumable"
                            )));
                        }
                    });
                }
                "part-size" => {
                    part_size = Some(
                        crate::cli::parse_size(value)
                            .ok()
                            .and_then(|n| usize::try_from(n).ok())
                            .filter(|&n| n >= MIN_PART_SIZE)
                            .ok_or_else(|| {
                                invalid(format!("part-size={value:?}: expected a size >= 256KiB"))
                            })?,
                    );
                }
                "upload-concurrency" => {
                    upload_concurrency = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| {
                            invalid(format!("upload-concurrency={value:?}: expected 1 to 64"))
                        })?;
                }
                _ => {
                    return Err(invalid(format!(
                        "unknown parameter {key:?} (known: {}, endpoint, upload, \
                         xml-endpoint, part-size, upload-concurrency)",
                        HttpConfig::KEYS.join(", ")
                    )));
                }
            }
        }
        let emulator = match endpoint {
            Some(e) => Some(e),
            None => env(EMULATOR_ENV).filter(|v| !v.is_empty()),
        };
        let token = env(TOKEN_ENV).filter(|v| !v.is_empty());
        let is_emulator = emulator.is_some();
        let (endpoint, auth) = match emulator {
            Some(host) => {
                let auth = token.map_or(Auth::Anonymous, Auth::Token);
                (base_url(&host), auth)
            }
            None => {
                let auth = match token {
                    Some(t) => Auth::Token(t),
                    None => Auth::Provider(Mutex::new(None)),
                };
                (DEFAULT_ENDPOINT.to_owned(), auth)
            }
        };
        let upload = upload.unwrap_or(if is_emulator {
            UploadMode::Resumable
        } else {
            UploadMode::Xml
        });
        let part_size = part_size.unwrap_or(if upload == UploadMode::Resumable {
            DEFAULT_CHUNK_SIZE
        } else {
            DEFAULT_PART_SIZE
        });
        if upload == UploadMode::Resumable && part_size % CHUNK_QUANTUM != 0 {
            return Err(invalid(format!(
                "part-size of {part_size} bytes is not a multiple of 256 KiB, as the chunks of \
                 a resumable upload must be (upload=resumable)"
            )));
        }
        if upload == UploadMode::Xml && part_size < super::multipart::MIN_PART_SIZE {
            return Err(invalid(format!(
                "part-size of {part_size} bytes is below the XML API's 5 MiB minimum \
                 (upload=xml)"
            )));
        }
        let xml_endpoint = xml_endpoint.map_or_else(|| endpoint.clone(), |e| base_url(&e));
        // The URL names where the objects are: the endpoint is part of it when not the
        // service's own (so a reply or log naming the store can be opened again).
        let mut store_url = if prefix.is_empty() {
            format!("gs://{bucket}")
        } else {
            format!("gs://{bucket}/{prefix}")
        };
        if is_emulator {
            store_url.push_str("?endpoint=");
            store_url.push_str(&endpoint);
        }
        let http = HttpClient::new(store_url.clone(), "gs", config)?;
        Ok(Self {
            url: store_url,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint,
            xml_endpoint,
            upload,
            emulator: is_emulator,
            http,
            auth: Arc::new(auth),
            part_size,
            upload_concurrency,
        })
    }

    /// The endpoint requests go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The XML API's base URL.
    pub fn xml_endpoint(&self) -> &str {
        &self.xml_endpoint
    }

    /// How objects are uploaded.
    pub fn upload_mode(&self) -> UploadMode {
        self.upload
    }

    /// The HTTP client (its counters: [`HttpClient::stats`]).
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// The part size of large uploads.
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    fn err(&self, kind: StoreErrorKind, key: &str, detail: impl Into<String>) -> StoreError {
        StoreError::new(kind, self.url.clone(), key, detail)
    }

    /// The object name of `key` (prefix joined), after checking the key.
    fn object(&self, key: &str) -> Result<String, StoreError> {
        super::join_key(std::path::Path::new("/"), key)
            .map_err(|reason| self.err(StoreErrorKind::InvalidKey, key, reason))?;
        Ok(if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }

    fn object_url(&self, object: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.endpoint,
            self.bucket,
            utf8_percent_encode(object, ESCAPE)
        )
    }

    fn upload_url(&self, upload_type: &str) -> String {
        format!(
            "{}/upload/storage/v1/b/{}/o?uploadType={upload_type}",
            self.endpoint, self.bucket
        )
    }

    /// Adds the `Authorization` header the configured credentials call for.
    fn authorize(&self, key: &str, req: HttpRequest) -> Result<HttpRequest, StoreError> {
        let token = match self.auth.as_ref() {
            Auth::Anonymous => return Ok(req),
            Auth::Token(t) => t.clone(),
            Auth::Provider(slot) => self.provider_token(key, slot)?,
        };
        req.header("authorization", &format!("Bearer {token}"))
            .map_err(|e| self.err(StoreErrorKind::Io, key, format!("bearer token: {e}")))
    }

    fn provider_token(
        &self,
        key: &str,
        slot: &Mutex<Option<Arc<dyn gcp_auth::TokenProvider>>>,
    ) -> Result<String, StoreError> {
        let auth_err = |e: String| {
            self.err(
                StoreErrorKind::Io,
                key,
                format!(
                    "no GCS credentials: {e} (set {TOKEN_ENV}, GOOGLE_APPLICATION_CREDENTIALS, \
                     or {EMULATOR_ENV} for an emulator)"
                ),
            )
        };
        let limit = self.http.config().first_byte_timeout;
        let provider = {
            let mut guard = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match guard.as_ref() {
                Some(p) => Arc::clone(p),
                None => {
                    let p = super::http::run(async move {
                        tokio::time::timeout(limit, gcp_auth::provider()).await
                    })
                    .map_err(&auth_err)?
                    .map_err(|_| auth_err("timed out looking for credentials".to_owned()))?
                    .map_err(|e| auth_err(e.to_string()))?;
                    *guard = Some(Arc::clone(&p));
                    p
                }
            }
        };
        let token =
            super::http::run(
                async move { tokio::time::timeout(limit, provider.token(&[SCOPE])).await },
            )
            .map_err(&auth_err)?
            .map_err(|_| auth_err("timed out getting a token".to_owned()))?
            .map_err(|e| auth_err(e.to_string()))?;
        Ok(token.as_str().to_owned())
    }

    /// A buffered request through the transport, authorised per attempt.
    fn execute(
        &self,
        op: &'static str,
        key: &str,
        what: &str,
        max_body: u64,
        make: &dyn Fn() -> Result<HttpRequest, String>,
    ) -> Result<HttpResponse, StoreError> {
        self.http.execute(op, key, what, max_body, &mut || {
            let req = make().map_err(|e| self.err(StoreErrorKind::InvalidKey, key, e))?;
            self.authorize(key, req)
        })
    }

    /// The object resource of `key` as JSON.
    fn resource(&self, key: &str) -> Result<serde_json::Value, StoreError> {
        let url = self.object_url(&self.object(key)?);
        let resp = self.execute("stat", key, "stat", MAX_JSON, &|| {
            Ok(HttpRequest::new(Method::GET, url.clone()))
        })?;
        self.parse_json(key, "stat", &resp.body)
    }

    fn parse_json(
        &self,
        key: &str,
        what: &str,
        body: &[u8],
    ) -> Result<serde_json::Value, StoreError> {
        serde_json::from_slice(body).map_err(|e| {
            self.err(
                StoreErrorKind::Corrupt,
                key,
                format!("{what}: the answer is not JSON: {e}"),
            )
        })
    }

    /// Uploads `data` as `object` in one multipart request with `metadata`, and checks the MD5
    /// the service reports (absent from composite objects only, never from a plain upload).
    fn upload(
        &self,
        op: &'static str,
        key: &str,
        object: &str,
        data: bytes::Bytes,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&data));
        let resource = json!({
            "name": object,
            "contentType": "application/octet-stream",
            "md5Hash": md5,
            "metadata": metadata,
        });
        let boundary = format!("thaw-{}", uuid::Uuid::new_v4().simple());
        let mut body = Vec::with_capacity(data.len().saturating_add(1024));
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{resource}\r\n\
                 --{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(&data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let body = bytes::Bytes::from(body);
        let url = self.upload_url("multipart");
        let what = format!("upload of {} bytes", data.len());
        let resp = self.execute(op, key, &what, MAX_JSON, &|| {
            HttpRequest::new(Method::POST, url.clone())
                .header(
                    "content-type",
                    &format!("multipart/related; boundary={boundary}"),
                )
                .map(|r| r.body(body.clone()))
        })?;
        let answer = self.parse_json(key, &what, &resp.body)?;
        match answer.get("md5Hash").and_then(|v| v.as_str()) {
            Some(got) if got == md5 => Ok(()),
            Some(got) => Err(self.err(
                StoreErrorKind::Corrupt,
                key,
                format!("{what}: the service stored MD5 {got}, the data has {md5}"),
            )),
            None => Err(self.err(
                StoreErrorKind::Corrupt,
                key,
                format!("{what}: the answer carries no md5Hash"),
            )),
        }
    }

    /// Composes `sources` (≤ 32 object names) into `dest`, with `metadata` on the result.
    fn compose(
        &self,
        key: &str,
        sources: &[String],
        dest: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let url = format!("{}/compose", self.object_url(dest));
        let body = json!({
            "sourceObjects": sources.iter().map(|s| json!({"name": s})).collect::<Vec<_>>(),
            "destination": {
                "contentType": "application/octet-stream",
                "metadata": metadata,
            },
        })
        .to_string();
        let body = bytes::Bytes::from(body);
        let what = format!("compose of {} parts", sources.len());
        self.execute("compose", key, &what, MAX_JSON, &|| {
            HttpRequest::new(Method::POST, url.clone())
                .header("content-type", "application/json")
                .map(|r| r.body(body.clone()))
        })?;
        Ok(())
    }

    /// The temporary part objects a compose upload of `object` leaves behind if it dies before
    /// its cleanup (every object named `{object}.thaw-part-…`), all pages.
    pub fn stale_parts(&self, key: &str) -> Result<Vec<String>, StoreError> {
        let object = self.object(key)?;
        let prefix = format!("{object}{PART_INFIX}");
        let mut names = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/storage/v1/b/{}/o?prefix={}",
                self.endpoint,
                self.bucket,
                utf8_percent_encode(&prefix, ESCAPE)
            );
            if let Some(token) = &page {
                url.push_str("&pageToken=");
                url.push_str(&utf8_percent_encode(token, ESCAPE).to_string());
            }
            let resp =
                self.execute("list", key, "list of stale upload parts", MAX_JSON, &|| {
                    Ok(HttpRequest::new(Method::GET, url.clone()))
                })?;
            let answer = self.parse_json(key, "list", &resp.body)?;
            if let Some(items) = answer.get("items").and_then(|v| v.as_array()) {
                names.extend(
                    items
                        .iter()
                        .filter_map(|o| o.get("name").and_then(|n| n.as_str()))
                        .filter(|n| n.starts_with(&prefix))
                        .map(str::to_owned),
                );
            }
            match answer.get("nextPageToken").and_then(|v| v.as_str()) {
                Some(t) if !t.is_empty() && page.as_deref() != Some(t) => page = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(names)
    }

    /// Deletes `object`; a missing object is fine.
    fn delete(&self, key: &str, object: &str) -> Result<(), StoreError> {
        let url = self.object_url(object);
        match self.execute("delete", key, "delete", MAX_JSON, &|| {
            Ok(HttpRequest::new(Method::DELETE, url.clone()))
        }) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The XML API's streaming writer of `key` ([`UploadMode::Xml`]), with its concrete type.
    ///
    /// # Errors
    /// A bad key or metadata that cannot travel as headers.
    pub fn xml_writer(
        &self,
        key: &str,
        opts: &PutOptions,
    ) -> Result<MultipartWriter<GcsXmlApi>, StoreError> {
        self.object(key)?;
        MultipartWriter::new(
            Arc::new(GcsXmlApi {
                store: self.clone(),
            }),
            key,
            opts,
            MultipartConfig {
                part_size: self.part_size,
                concurrency: self.upload_concurrency,
            },
        )
    }

    /// The streaming writer of a resumable upload ([`UploadMode::Resumable`]).
    fn resumable_writer(&self, key: &str, object: String, opts: &PutOptions) -> ResumableWriter {
        ResumableWriter {
            store: self.clone(),
            key: key.to_owned(),
            object,
            metadata: opts.metadata.clone(),
            buf: Vec::new(),
            md5: Some(Md5::new()),
            sent: 0,
            session: None,
            inflight: None,
            failed: None,
            written: 0,
            done: false,
            finished: false,
        }
    }

    /// Starts a resumable upload session of `object` carrying `metadata` (`POST
    /// …?uploadType=resumable&name=…` with the object resource), answering its session URI.
    fn start_session(
        &self,
        key: &str,
        object: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Session, StoreError> {
        let url = format!(
            "{}&name={}",
            self.upload_url("resumable"),
            utf8_percent_encode(object, ESCAPE)
        );
        let body = bytes::Bytes::from(
            json!({
                "name": object,
                "contentType": "application/octet-stream",
                "metadata": metadata,
            })
            .to_string(),
        );
        let what = "start of a resumable upload";
        let resp = self.execute("resumable_start", key, what, MAX_JSON, &|| {
            HttpRequest::new(Method::POST, url.clone())
                .header("content-type", "application/json; charset=UTF-8")
                .map(|r| r.body(body.clone()))
        })?;
        let location = resp.header_str("location").unwrap_or_default();
        // The session URI's path and query, on the configured endpoint: an emulator may name
        // another host (its -external-url, or itself behind a proxy), and credentials only ever
        // go to the endpoint.
        let path = location
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').and_then(|i| rest.get(i..)))
            .filter(|p| p.starts_with("/upload/"))
            .ok_or_else(|| {
                self.err(
                    StoreErrorKind::Corrupt,
                    key,
                    format!("{what}: the answer names no session URI (Location {location:?})"),
                )
            })?;
        Ok(Session {
            store: self.clone(),
            key: key.to_owned(),
            object: object.to_owned(),
            uri: format!("{}{path}", self.endpoint),
        })
    }

    /// Deletes temporary objects, logging (not failing on) errors.
    fn delete_all(&self, key: &str, objects: &[String]) {
        for object in objects {
            if let Err(e) = self.delete(key, object) {
                tracing::warn!(error = %e, object, "could not delete a temporary upload part");
            }
        }
    }
}

impl XmlApi for GcsXmlApi {
    fn store_url(&self) -> String {
        self.store.url.clone()
    }

    fn meta_prefix(&self) -> &'static str {
        "x-goog-meta-"
    }

    fn send(&self, mut req: XmlRequest<'_>) -> Result<XmlResponse, StoreError> {
        let store = &self.store;
        let object = store.object(req.key)?;
        // Path-style: `{xml endpoint}/{bucket}/{object}`, each segment escaped, `/` kept.
        let path = object
            .split('/')
            .map(|seg| utf8_percent_encode(seg, ESCAPE).to_string())
            .collect::<Vec<_>>()
            .join("/");
        let mut url = format!("{}/{}/{path}", store.xml_endpoint, store.bucket);
        if !req.query.is_empty() {
            url.push('?');
            url.push_str(req.query);
        }
        let method = match req.method {
            XmlMethod::Get => Method::GET,
            XmlMethod::Head => Method::HEAD,
            XmlMethod::Put => Method::PUT,
            XmlMethod::Post => Method::POST,
            XmlMethod::Delete => Method::DELETE,
        };
        let label = req.metric_op();
        let headers = req.take_headers();
        let body = bytes::Bytes::from(req.body);
        let max = u64::try_from(MAX_XML_BODY).unwrap_or(u64::MAX);
        let resp = store.execute(label, req.key, req.op, max, &|| {
            let mut r = HttpRequest::new(method.clone(), url.clone()).body(body.clone());
            for (name, value) in &headers {
                r = r.header(name, value)?;
            }
            Ok(r)
        })?;
        Ok(XmlResponse::from_parts(
            resp.status,
            &resp.headers,
            &resp.body,
        ))
    }
}

/// `host[:port]` or a URL, as a base URL without a trailing slash (`http://` by default).
fn base_url(host: &str) -> String {
    let host = host.trim_end_matches('/');
    if host.starts_with("http://") || host.starts_with("https://") {
        host.to_owned()
    } else {
        format!("http://{host}")
    }
}

/// Checks a bucket name: 3-222 characters of `a-z0-9._-`, starting and ending with a letter or
/// digit.
fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if bucket.is_empty() {
        return Err("missing bucket name (gs://bucket/prefix)".to_owned());
    }
    if !(3..=222).contains(&bucket.len())
        || !bucket.chars().all(ok_char)
        || !edge(bucket.chars().next())
        || !edge(bucket.chars().last())
    {
        return Err(format!(
            "bucket name {bucket:?} is not valid (3-222 characters of a-z, 0-9, '.', '_', '-')"
        ));
    }
    Ok(())
}

impl Store for GcsStore {
    fn url(&self) -> String {
        self.url.clone()
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
        let url = format!("{}?alt=media", self.object_url(&self.object(key)?));
        self.http.read_stream(
            key,
            offset,
            len,
            &mut |_, _| self.authorize(key, HttpRequest::new(Method::GET, url.clone())),
            sink,
        )
    }

    fn stat(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        let resource = self.resource(key)?;
        let size = resource
            .get("size")
            .and_then(|v| match v {
                serde_json::Value::String(s) => s.parse::<u64>().ok(),
                v => v.as_u64(),
            })
            .ok_or_else(|| {
                self.err(
                    StoreErrorKind::Corrupt,
                    key,
                    "stat: the object resource has no valid size",
                )
            })?;
        let uncompressed_size = match resource
            .get("metadata")
            .and_then(|m| m.get(thaw_codec::names::UNCOMPRESSED_SIZE_METADATA))
        {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        self.err(
                            StoreErrorKind::Corrupt,
                            key,
                            format!("uncompressed-size metadata {v} is not a decimal number"),
                        )
                    })?,
            ),
        };
        Ok(ObjectInfo {
            size,
            uncompressed_size,
        })
    }

    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>, StoreError> {
        let url = format!("{}?alt=media", self.object_url(&self.object(key)?));
        let resp = self.execute("get", key, "get", max_len, &|| {
            Ok(HttpRequest::new(Method::GET, url.clone()))
        })?;
        Ok(resp.body.to_vec())
    }

    fn put(&self, key: &str, data: &[u8], opts: &PutOptions) -> Result<(), StoreError> {
        let object = self.object(key)?;
        if self.upload == UploadMode::Xml {
            // Below one part this is the XML API's single PUT (with Content-MD5).
            let mut w = self.xml_writer(key, opts)?;
            w.write_all(data)
                .map_err(|e| StoreError::io(self.url.clone(), key, "upload", e))?;
            return Box::new(w).commit();
        }
        if self.upload == UploadMode::Resumable && data.len() > self.part_size {
            let mut w = self.resumable_writer(key, object, opts);
            w.write_all(data)
                .map_err(|e| StoreError::io(self.url.clone(), key, "upload", e))?;
            return Box::new(w).commit();
        }
        self.upload(
            "put",
            key,
            &object,
            bytes::Bytes::copy_from_slice(data),
            &opts.metadata,
        )
    }

    fn create(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        let object = self.object(key)?;
        if self.upload == UploadMode::Xml {
            return Ok(Box::new(self.xml_writer(key, opts)?));
        }
        if self.upload == UploadMode::Resumable {
            return Ok(Box::new(self.resumable_writer(key, object, opts)));
        }
        Ok(Box::new(GcsWriter {
            store: self.clone(),
            key: key.to_owned(),
            object,
            metadata: opts.metadata.clone(),
            id: uuid::Uuid::new_v4().simple().to_string(),
            buf: Vec::new(),
            swept: false,
            parts: Vec::new(),
            inflight: VecDeque::new(),
            failed: None,
            written: 0,
            done: false,
        }))
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.resource(key) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The streaming writer of [`GcsStore::create`] (see the module docs).
struct GcsWriter {
    store: GcsStore,
    key: String,
    object: String,
    metadata: BTreeMap<String, String>,
    id: String,
    buf: Vec<u8>,
    /// Whether the stale parts of earlier uploads of the object were deleted.
    swept: bool,
    /// Names of the part objects started, in order.
    parts: Vec<String>,
    inflight: VecDeque<JoinHandle<Result<(), StoreError>>>,
    failed: Option<String>,
    written: u64,
    done: bool,
}

impl fmt::Debug for GcsWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcsWriter")
            .field("store", &self.store.url)
            .field("key", &self.key)
            .field("parts", &self.parts.len())
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl GcsWriter {
    /// Waits for the oldest part upload; its error is kept and returned.
    fn join_one(&mut self) -> Result<(), StoreError> {
        let Some(handle) = self.inflight.pop_front() else {
            return Ok(());
        };
        let result = handle.join().unwrap_or_else(|_| {
            Err(self.store.err(
                StoreErrorKind::Io,
                &self.key,
                "a part upload thread panicked",
            ))
        });
        if let Err(e) = &result {
            self.failed.get_or_insert_with(|| e.to_string());
        }
        result
    }

    fn join_all(&mut self) -> Result<(), StoreError> {
        let mut first = Ok(());
        while !self.inflight.is_empty() {
            if let Err(e) = self.join_one()
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    /// Starts the upload of the buffered bytes as the next part.
    fn flush_part(&mut self) -> Result<(), StoreError> {
        if let Some(f) = &self.failed {
            return Err(self.store.err(
                StoreErrorKind::Io,
                &self.key,
                format!("an earlier part failed: {f}"),
            ));
        }
        if !self.swept {
            // Parts of an earlier upload of this object that died before its cleanup (a crash):
            // deleted before this upload makes its own. A writer of the same object running at
            // this moment would lose its parts and fail at compose (never publish wrong bytes).
            self.swept = true;
            let stale = self.store.stale_parts(&self.key)?;
            if !stale.is_empty() {
                tracing::info!(key = %self.key, parts = stale.len(),
                    "deleting temporary parts left by an earlier upload");
                self.store.delete_all(&self.key, &stale);
            }
        }
        while self.inflight.len() >= self.store.upload_concurrency {
            self.join_one()?;
        }
        let data = bytes::Bytes::from(std::mem::take(&mut self.buf));
        let name = format!(
            "{}{PART_INFIX}{}-{:05}",
            self.object,
            self.id,
            self.parts.len()
        );
        self.parts.push(name.clone());
        let store = self.store.clone();
        let key = self.key.clone();
        let handle = std::thread::Builder::new()
            .name("thaw-gcs-part".into())
            .spawn(move || store.upload("upload_part", &key, &name, data, &BTreeMap::new()))
            .map_err(|e| {
                StoreError::io(
                    self.store.url.clone(),
                    &self.key,
                    "starting a part upload",
                    e,
                )
            })?;
        self.inflight.push_back(handle);
        Ok(())
    }

    /// Composes the parts into the object (levels of ≤ 32), returning every temporary object
    /// made (parts and intermediates) for deletion.
    fn compose_all(&self, temps: &mut Vec<String>) -> Result<(), StoreError> {
        let mut sources = self.parts.clone();
        let mut level = 0u32;
        while sources.len() > MAX_COMPOSE_SOURCES {
            let mut next = Vec::new();
            for (i, group) in sources.chunks(MAX_COMPOSE_SOURCES).enumerate() {
                if let [only] = group {
                    next.push(only.clone());
                    continue;
                }
                let name = format!("{}{PART_INFIX}{}-l{level}-{i:05}", self.object, self.id);
                temps.push(name.clone());
                self.store
                    .compose(&self.key, group, &name, &BTreeMap::new())?;
                next.push(name);
            }
            sources = next;
            level = level.saturating_add(1);
        }
        self.store
            .compose(&self.key, &sources, &self.object, &self.metadata)
    }
}

impl Write for GcsWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.done {
            return Err(io::Error::other("object writer already committed"));
        }
        let room = self.store.part_size.saturating_sub(self.buf.len());
        let n = data.len().min(room);
        if self.buf.capacity() == 0 {
            self.buf
                .reserve_exact(self.store.part_size.min(data.len().max(64 << 10)));
        }
        self.buf
            .extend_from_slice(data.get(..n).unwrap_or_default());
        self.written = self
            .written
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        if self.buf.len() >= self.store.part_size {
            self.flush_part().map_err(io::Error::other)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for GcsWriter {
    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        if self.done {
            return Err(self.store.err(
                StoreErrorKind::Io,
                &self.key,
                "object writer already committed",
            ));
        }
        self.done = true;
        if self.parts.is_empty() {
            let data = bytes::Bytes::from(std::mem::take(&mut self.buf));
            return self
                .store
                .upload("put", &self.key, &self.object, data, &self.metadata);
        }
        let mut temps = Vec::new();
        let result = (|| {
            if !self.buf.is_empty() {
                self.flush_part()?;
            }
            self.join_all()?;
            self.compose_all(&mut temps)
        })();
        temps.extend(self.parts.iter().cloned());
        self.store.delete_all(&self.key, &temps);
        self.parts.clear();
        result
    }

    fn written(&self) -> u64 {
        self.written
    }
}

impl Drop for GcsWriter {
    fn drop(&mut self) {
        // Uncommitted (or a failed commit that already cleaned up): wait for the part uploads
        // in flight, then delete what they made. Nothing was composed under the object's name.
        let _ = self.join_all();
        if !self.parts.is_empty() {
            let parts = std::mem::take(&mut self.parts);
            self.store.delete_all(&self.key, &parts);
        }
    }
}

/// One resumable upload session ([`UploadMode::Resumable`]): its URI on the store's endpoint.
#[derive(Debug)]
struct Session {
    store: GcsStore,
    key: String,
    object: String,
    uri: String,
}

/// What a session holds, as its status answers.
enum Persisted {
    /// The first `n` bytes of the object are persisted; the session goes on.
    Upto(u64),
    /// The session was finalized: the object resource.
    Finished(serde_json::Value),
}

/// One chunk of a resumable upload: bytes `[start, start + data.len())`, the MD5 states of the
/// object before and after them, and the object's total length if this is the last chunk.
struct Chunk<'a> {
    data: &'a bytes::Bytes,
    start: u64,
    before: &'a Md5,
    after: &'a Md5,
    total: Option<u64>,
}

impl Chunk<'_> {
    fn end(&self) -> u64 {
        self.start
            .saturating_add(u64::try_from(self.data.len()).unwrap_or(u64::MAX))
    }
}

fn md5_b64(state: &Md5) -> String {
    base64::engine::general_purpose::STANDARD.encode(state.clone().finalize())
}

/// The `md5Hash` of a JSON answer, if it is JSON and has one.
fn answer_md5(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("md5Hash")?.as_str().map(str::to_owned)
}

/// The persisted length a 308 answer's `Range: bytes=0-N` tells (`N + 1`; no header: nothing).
fn persisted_len(range: Option<&str>) -> Result<u64, String> {
    let Some(range) = range else { return Ok(0) };
    range
        .trim()
        .strip_prefix("bytes=0-")
        .and_then(|n| n.parse::<u64>().ok())
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| format!("the Range header {range:?} is not bytes=0-N"))
}

impl Session {
    fn err(&self, kind: StoreErrorKind, detail: impl Into<String>) -> StoreError {
        self.store.err(kind, &self.key, detail)
    }

    /// The session's status. The service answers `PUT` with `Content-Range: bytes */*` with
    /// 308 and the persisted `Range`. fake-gcs-server (1.54) finalizes the object on that
    /// request instead, so against an emulator the query is an empty `PUT` of a known range
    /// (appends nothing), whose 308 answer carries the MD5 of what the session holds: equal to
    /// the MD5 of the bytes before or after `chunk`, it tells which; anything else is an error.
    /// An emulator forgets a session it finalized (404): for the last chunk the object itself
    /// then tells.
    fn status(&self, chunk: &Chunk<'_>) -> Result<Persisted, StoreError> {
        let range = if self.store.emulator {
            // An empty range ending before it starts: nothing to append.
            let end = chunk.end();
            format!("bytes {end}-{}/*", end.saturating_sub(1))
        } else {
            "bytes */*".to_owned()
        };
        let answer = self.store.http.execute_accepting(
            "resumable_status",
            &self.key,
            "status query of a resumable upload",
            MAX_JSON,
            RESUME_INCOMPLETE,
            &mut || {
                let req = HttpRequest::new(Method::PUT, self.uri.clone())
                    .header("content-range", &range)
                    .map_err(|e| self.err(StoreErrorKind::Io, e))?;
                self.store.authorize(&self.key, req)
            },
        );
        let resp = match answer {
            Err(e) if e.is_not_found() && self.store.emulator && chunk.total.is_some() => {
                return Ok(Persisted::Finished(self.store.resource(&self.key)?));
            }
            other => other?,
        };
        if resp.status != StatusCode::PERMANENT_REDIRECT {
            return Ok(Persisted::Finished(self.store.parse_json(
                &self.key,
                "status query",
                &resp.body,
            )?));
        }
        if !self.store.emulator {
            let n = persisted_len(resp.header_str("range"))
                .map_err(|e| self.err(StoreErrorKind::Corrupt, format!("status query: {e}")))?;
            return Ok(Persisted::Upto(n));
        }
        let held = answer_md5(&resp.body);
        if held.as_deref() == Some(md5_b64(chunk.before).as_str()) {
            Ok(Persisted::Upto(chunk.start))
        } else if held.as_deref() == Some(md5_b64(chunk.after).as_str()) {
            Ok(Persisted::Upto(chunk.end()))
        } else {
            Err(self.err(
                StoreErrorKind::Corrupt,
                format!(
                    "status query: the session holds bytes (MD5 {held:?}) that are neither the \
                     {} bytes before this chunk nor those through its end",
                    chunk.start
                ),
            ))
        }
    }

    /// Checks the resource of the finalized object against the bytes sent: size and MD5.
    fn check_final(&self, resource: &serde_json::Value, chunk: &Chunk<'_>) -> Result<(), String> {
        let total = chunk.end();
        let size = resource.get("size").and_then(|v| match v {
            serde_json::Value::String(s) => s.parse::<u64>().ok(),
            v => v.as_u64(),
        });
        if size != Some(total) {
            return Err(format!(
                "the finalized object has size {size:?}, {total} bytes were sent"
            ));
        }
        let want = md5_b64(chunk.after);
        match resource.get("md5Hash").and_then(|v| v.as_str()) {
            Some(got) if got == want => Ok(()),
            got => Err(format!(
                "the finalized object has MD5 {got:?}, the bytes sent {want}"
            )),
        }
    }

    /// Sends `chunk` until the session has persisted all of it (and, for the last chunk, the
    /// object is finalized and checked). A failed attempt asks the session's status and resends
    /// from what it persisted, within the transport's budget and attempts.
    fn send(&self, chunk: &Chunk<'_>) -> Result<(), StoreError> {
        let end = chunk.end();
        let total = chunk
            .total
            .map_or_else(|| "*".to_owned(), |t| t.to_string());
        let what = format!("chunk {}..{end} of a resumable upload", chunk.start);
        let mut pos = chunk.start;
        let mut stalls = 0u32;
        loop {
            let mut known: Option<Persisted> = None;
            let mut first = true;
            let answer = self.store.http.execute_accepting(
                "resumable_chunk",
                &self.key,
                &what,
                MAX_JSON,
                RESUME_INCOMPLETE,
                &mut || {
                    if !first {
                        // The attempt before failed: what did the session keep?
                        match self.status(chunk)? {
                            Persisted::Upto(n) if n < chunk.start || n > end => {
                                return Err(self.err(
                                    StoreErrorKind::Corrupt,
                                    format!(
                                        "{what}: the session reports {n} bytes persisted, \
                                         outside this chunk"
                                    ),
                                ));
                            }
                            Persisted::Upto(n) if n < end || chunk.total.is_some() => pos = n,
                            p => {
                                known = Some(p);
                                return Err(self.err(StoreErrorKind::Io, "already persisted"));
                            }
                        }
                    }
                    first = false;
                    let from = usize::try_from(pos.saturating_sub(chunk.start)).unwrap_or(0);
                    let body = chunk.data.slice(from.min(chunk.data.len())..);
                    let range = if body.is_empty() {
                        format!("bytes */{total}")
                    } else {
                        format!("bytes {pos}-{}/{total}", end.saturating_sub(1))
                    };
                    let req = HttpRequest::new(Method::PUT, self.uri.clone())
                        .header("content-range", &range)
                        .map_err(|e| self.err(StoreErrorKind::Io, e))?
                        .body(body);
                    self.store.authorize(&self.key, req)
                },
            );
            let persisted = match (known, answer) {
                (Some(p), _) => p,
                (None, Err(e)) => return Err(e),
                (None, Ok(resp)) if resp.status == StatusCode::PERMANENT_REDIRECT => {
                    let n = persisted_len(resp.header_str("range"))
                        .map_err(|e| self.err(StoreErrorKind::Corrupt, format!("{what}: {e}")))?;
                    if n == end
                        && let Some(held) = answer_md5(&resp.body)
                        && held != md5_b64(chunk.after)
                    {
                        // An emulator says what it holds: it must be exactly what was sent.
                        return Err(self.err(
                            StoreErrorKind::Corrupt,
                            format!(
                                "{what}: the session holds MD5 {held}, the bytes sent {}",
                                md5_b64(chunk.after)
                            ),
                        ));
                    }
                    Persisted::Upto(n)
                }
                (None, Ok(resp)) => {
                    Persisted::Finished(self.store.parse_json(&self.key, &what, &resp.body)?)
                }
            };
            match persisted {
                Persisted::Finished(resource) => {
                    if chunk.total.is_none() {
                        return Err(self.err(
                            StoreErrorKind::Corrupt,
                            format!("{what}: the session was finalized before its last chunk"),
                        ));
                    }
                    return self.check_final(&resource, chunk).map_err(|detail| {
                        // A wrong object is not left under the name.
                        if let Err(e) = self.store.delete(&self.key, &self.object) {
                            tracing::warn!(error = %e, "could not delete a wrong upload");
                        }
                        self.err(StoreErrorKind::Corrupt, format!("{what}: {detail}"))
                    });
                }
                Persisted::Upto(n) if n < chunk.start || n > end => {
                    return Err(self.err(
                        StoreErrorKind::Corrupt,
                        format!(
                            "{what}: the session reports {n} bytes persisted, outside this chunk"
                        ),
                    ));
                }
                Persisted::Upto(n) if n == end && chunk.total.is_none() => return Ok(()),
                Persisted::Upto(n) => {
                    // Part of the chunk (or all of the last one, not yet finalized): send the
                    // rest. An answer that persists nothing new more than a few times ends it.
                    if n <= pos {
                        stalls = stalls.saturating_add(1);
                        if stalls > 3 {
                            return Err(self.err(
                                StoreErrorKind::Io,
                                format!("{what}: the session persists no more than {n} bytes"),
                            ));
                        }
                    }
                    pos = n;
                }
            }
        }
    }

    /// Cancels the session (`DELETE`, answered 499): best effort, logged.
    fn cancel(&self) {
        let result = self.store.http.execute_accepting(
            "resumable_cancel",
            &self.key,
            "cancel of a resumable upload",
            MAX_JSON,
            CANCELLED,
            &mut || {
                self.store.authorize(
                    &self.key,
                    HttpRequest::new(Method::DELETE, self.uri.clone()),
                )
            },
        );
        if let Err(e) = result
            && !e.is_not_found()
        {
            tracing::debug!(error = %e, "could not cancel a resumable upload session");
        }
    }
}

/// The streaming writer of a resumable upload ([`UploadMode::Resumable`]): bytes gather into a
/// chunk of `part-size`; when the next byte comes, the full chunk goes to an upload thread (the
/// session starts with the first one) while the writer fills the next, so at most two chunks are
/// held. The last chunk, sent at commit with the total length, finalizes the object; an object
/// that fits one chunk is a single multipart upload. Dropped or failed before that, the session
/// is cancelled and nothing appears under the name.
struct ResumableWriter {
    store: GcsStore,
    key: String,
    object: String,
    metadata: BTreeMap<String, String>,
    buf: Vec<u8>,
    /// MD5 of the bytes handed to chunks so far (`None` while a chunk upload has it).
    md5: Option<Md5>,
    /// Bytes handed to chunks so far.
    sent: u64,
    session: Option<Arc<Session>>,
    /// The chunk upload in flight; answers the MD5 state after its chunk.
    inflight: Option<JoinHandle<Result<Md5, StoreError>>>,
    failed: Option<String>,
    written: u64,
    done: bool,
    finished: bool,
}

impl fmt::Debug for ResumableWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResumableWriter")
            .field("store", &self.store.url)
            .field("key", &self.key)
            .field("sent", &self.sent)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl ResumableWriter {
    fn err(&self, detail: impl Into<String>) -> StoreError {
        self.store.err(StoreErrorKind::Io, &self.key, detail)
    }

    /// Waits for the chunk upload in flight and takes back the MD5 state.
    fn join(&mut self) -> Result<(), StoreError> {
        let Some(handle) = self.inflight.take() else {
            return Ok(());
        };
        let result = handle
            .join()
            .unwrap_or_else(|_| Err(self.err("a chunk upload thread panicked")));
        match result {
            Ok(md5) => {
                self.md5 = Some(md5);
                Ok(())
            }
            Err(e) => {
                self.failed.get_or_insert_with(|| e.to_string());
                Err(e)
            }
        }
    }

    fn check_failed(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(f) => Err(self.err(format!("an earlier chunk failed: {f}"))),
            None => Ok(()),
        }
    }

    /// Hands the buffered (full) chunk to an upload thread, after the one before is done.
    fn flush_chunk(&mut self) -> Result<(), StoreError> {
        self.check_failed()?;
        self.join()?;
        let session = match &self.session {
            Some(s) => Arc::clone(s),
            None => {
                let s = Arc::new(self.store.start_session(
                    &self.key,
                    &self.object,
                    &self.metadata,
                )?);
                self.session = Some(Arc::clone(&s));
                s
            }
        };
        let data = bytes::Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(self.store.part_size),
        ));
        let start = self.sent;
        self.sent = self
            .sent
            .saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
        let before = self.md5.take().unwrap_or_default();
        let handle = std::thread::Builder::new()
            .name("thaw-gcs-chunk".into())
            .spawn(move || {
                let mut after = before.clone();
                after.update(&data);
                session.send(&Chunk {
                    data: &data,
                    start,
                    before: &before,
                    after: &after,
                    total: None,
                })?;
                Ok(after)
            })
            .map_err(|e| {
                StoreError::io(
                    self.store.url.clone(),
                    &self.key,
                    "starting a chunk upload",
                    e,
                )
            })?;
        self.inflight = Some(handle);
        Ok(())
    }
}

impl Write for ResumableWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.done {
            return Err(io::Error::other("object writer already committed"));
        }
        if data.is_empty() {
            return Ok(0);
        }
        if self.buf.len() >= self.store.part_size {
            // More bytes after a full chunk: it is not the last one, send it.
            self.flush_chunk().map_err(io::Error::other)?;
        }
        if self.buf.capacity() == 0 {
            self.buf
                .reserve_exact(self.store.part_size.min(data.len().max(64 << 10)));
        }
        let room = self.store.part_size.saturating_sub(self.buf.len());
        let n = data.len().min(room);
        self.buf
            .extend_from_slice(data.get(..n).unwrap_or_default());
        self.written = self
            .written
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for ResumableWriter {
    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        if self.done {
            return Err(self.err("object writer already committed"));
        }
        self.done = true;
        let data = bytes::Bytes::from(std::mem::take(&mut self.buf));
        let Some(session) = self.session.clone() else {
            // One chunk or less: a single upload.
            self.finished = true;
            return self
                .store
                .upload("put", &self.key, &self.object, data, &self.metadata);
        };
        self.check_failed()?;
        self.join()?;
        let before = self.md5.take().unwrap_or_default();
        let mut after = before.clone();
        after.update(&data);
        let start = self.sent;
        let total = start.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
        session.send(&Chunk {
            data: &data,
            start,
            before: &before,
            after: &after,
            total: Some(total),
        })?;
        self.finished = true;
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }
}

impl Drop for ResumableWriter {
    fn drop(&mut self) {
        // Not finalized: wait for the chunk in flight, then cancel the session. Nothing
        // appeared under the object's name.
        let _ = self.join();
        if !self.finished
            && let Some(session) = self.session.take()
        {
            session.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn persisted_ranges_parse() {
        assert_eq!(persisted_len(None), Ok(0));
        assert_eq!(persisted_len(Some("bytes=0-0")), Ok(1));
        assert_eq!(persisted_len(Some("bytes=0-262143")), Ok(262_144));
        for bad in [
            "bytes=1-5",
            "bytes=0-",
            "0-5",
            "bytes=0-x",
            "bytes=0-18446744073709551615",
        ] {
            assert!(persisted_len(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_parse_or_fail_clearly() {
        let s =
            GcsStore::open("gs://snap/builds/v1?endpoint=http://127.0.0.1:9&budget=3s").unwrap();
        // The URL keeps the endpoint: it names where the objects are, and opens the same store.
        assert_eq!(s.url(), "gs://snap/builds/v1?endpoint=http://127.0.0.1:9");
        assert_eq!(s.endpoint(), "http://127.0.0.1:9");
        let again = GcsStore::open(&s.url()).unwrap();
        assert_eq!(
            (again.url(), again.endpoint()),
            (s.url(), "http://127.0.0.1:9")
        );
        // An emulator uploads with a resumable session by default, the service with the XML API.
        assert_eq!(s.upload_mode(), UploadMode::Resumable);
        assert_eq!(s.part_size(), DEFAULT_CHUNK_SIZE);
        assert_eq!(s.xml_endpoint(), "http://127.0.0.1:9");
        let real = GcsStore::open_with_env("gs://snap/p", &|name| {
            (name == TOKEN_ENV).then(|| "t".to_owned())
        })
        .unwrap();
        assert_eq!(real.url(), "gs://snap/p");
        assert_eq!(real.upload_mode(), UploadMode::Xml);
        assert_eq!(real.xml_endpoint(), DEFAULT_ENDPOINT);
        let x =
            GcsStore::open("gs://snap?endpoint=127.0.0.1:9&upload=xml&xml-endpoint=127.0.0.1:8")
                .unwrap();
        assert_eq!(x.upload_mode(), UploadMode::Xml);
        assert_eq!(x.xml_endpoint(), "http://127.0.0.1:8");
        assert_eq!(s.http().config().budget, Duration::from_secs(3));
        assert_eq!(s.object("b/memfile").unwrap(), "builds/v1/b/memfile");
        assert_eq!(
            s.object_url("builds/v1/b/memfile"),
            "http://127.0.0.1:9/storage/v1/b/snap/o/builds%2Fv1%2Fb%2Fmemfile"
        );
        let c = GcsStore::open("gs://snap?endpoint=127.0.0.1:9&upload=compose&part-size=300KiB")
            .unwrap();
        assert_eq!(
            (c.upload_mode(), c.part_size()),
            (UploadMode::Compose, 300 << 10)
        );
        let s = GcsStore::open("gs://snap?endpoint=127.0.0.1:9&part-size=1MiB").unwrap();
        assert_eq!(s.url(), "gs://snap?endpoint=http://127.0.0.1:9");
        assert_eq!(s.part_size(), 1 << 20);
        assert_eq!(s.object("x").unwrap(), "x");
        for bad in [
            "gs://",
            "gs:///p",
            "gs://UPPER/p",
            "gs://ab",
            "gs://b-/p",
            "gs://snap?colour=blue",
            "gs://snap?budget=never",
            "gs://snap?part-size=1KiB",
            "gs://snap?upload-concurrency=0",
            "gs://snap?upload=json",
            "gs://snap?endpoint=127.0.0.1:9&upload=xml&part-size=1MiB",
            "gs://snap?endpoint=127.0.0.1:9&part-size=300KiB",
            "gs://snap?upload=resumable&part-size=1000000",
            "gs://snap/../x",
        ] {
            let e = GcsStore::open(bad).unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::InvalidUrl, "{bad}: {e}");
        }
        let s = GcsStore::open("gs://snap?endpoint=http://127.0.0.1:9").unwrap();
        for key in ["", "/a", "a/../b", "a//b"] {
            assert_eq!(
                s.object(key).unwrap_err().kind(),
                StoreErrorKind::InvalidKey,
                "{key}"
            );
        }
    }
}
