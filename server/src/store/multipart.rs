//! The XML object API shared by S3 and GCS (the "XML API" of Cloud Storage speaks the same
//! dialect): error bodies, and the multipart upload protocol behind [`MultipartWriter`].
//!
//! Nothing here knows how a request is authorized or which header prefix carries custom
//! metadata: a backend implements [`XmlApi`] (S3 signs with SigV4 and uses `x-amz-meta-`;
//! [`super::gcs::GcsXmlApi`] adds a bearer token and uses `x-goog-meta-`), and the protocol runs
//! on top of it:
//!
//! 1. `POST {object}?uploads` with the metadata headers → `<InitiateMultipartUploadResult>` with
//!    the `UploadId`;
//! 2. `PUT {object}?partNumber=N&uploadId=ID` per part, each with `Content-MD5`, several at a
//!    time (the part's `ETag` answer is kept);
//! 3. `POST {object}?uploadId=ID` with `<CompleteMultipartUpload>` listing every part and ETag.
//!    A `200 OK` whose body is an `<Error>` is a failure (S3 documents this for errors found
//!    after the response started) and is retried, as e2b does;
//! 4. on any failure, and when the writer is dropped uncommitted, `DELETE {object}?uploadId=ID`
//!    (AbortMultipartUpload) so that no parts are left behind.
//!
//! An object smaller than one part never starts a multipart upload: it is sent as one `PUT` at
//! commit. Either way nothing is visible under the key before [`ObjectWriter::commit`].

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use md5::Digest as _;
use serde::{Deserialize, Serialize};

use super::{ObjectWriter, PutOptions, StoreError, StoreErrorKind};

/// Smallest part the XML API accepts (every part but the last).
pub const MIN_PART_SIZE: usize = 5 << 20;

/// Largest part the XML API accepts.
pub const MAX_PART_SIZE: usize = 5 << 30;

/// Most parts one upload may have.
pub const MAX_PARTS: u32 = 10_000;

/// Attempts of CompleteMultipartUpload when the service answers `200 OK` with an `<Error>` body.
const COMPLETE_ATTEMPTS: u32 = 4;

/// First backoff between CompleteMultipartUpload attempts (doubles, full jitter).
const COMPLETE_BACKOFF: Duration = Duration::from_millis(200);

/// Largest XML body we parse from a response (error bodies and upload results are small).
pub const MAX_XML_BODY: usize = 1 << 20;

/// An HTTP method of the XML API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `PUT`
    Put,
    /// `POST`
    Post,
    /// `DELETE`
    Delete,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Put => "PUT",
            Self::Post => "POST",
            Self::Delete => "DELETE",
        }
    }
}

/// A successful (2xx) response of the XML API with its whole body.
#[derive(Debug, Clone, Default)]
pub struct XmlResponse {
    /// The HTTP status.
    pub status: u16,
    /// Response headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl XmlResponse {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request of the XML API about an object, before the backend authorizes and sends it.
#[derive(Debug, Clone)]
pub struct XmlRequest<'a> {
    /// What the request does, for messages (`CreateMultipartUpload`, `UploadPart 3`, ...).
    pub op: &'a str,
    /// The method.
    pub method: Method,
    /// The object key, relative to the store's prefix.
    pub key: &'a str,
    /// The query string, already encoded, without `?` (empty for none).
    pub query: &'a str,
    /// Extra headers (names in lower case); the backend adds authorization and host.
    pub headers: Vec<(String, String)>,
    /// The body (empty for none).
    pub body: Vec<u8>,
}

impl XmlRequest<'_> {
    /// The request's `op` label in the store metrics: `put`, `upload_part`, `abort` or
    /// `multipart` (initiate, complete, list).
    pub fn metric_op(&self) -> &'static str {
        match self.method {
            Method::Put if self.query.is_empty() => "put",
            Method::Put => "upload_part",
            Method::Delete => "abort",
            _ => "multipart",
        }
    }

    /// Takes the headers to send, with `content-type: application/octet-stream` added to a PUT
    /// that names none: without it some servers (moto's Werkzeug) read the body as a form and
    /// drop it.
    pub fn take_headers(&mut self) -> Vec<(String, String)> {
        let mut headers = std::mem::take(&mut self.headers);
        if self.method == Method::Put && !headers.iter().any(|(n, _)| n == "content-type") {
            headers.push((
                "content-type".to_owned(),
                "application/octet-stream".to_owned(),
            ));
        }
        headers
    }
}

impl XmlResponse {
    /// The response of a sent request: its status, its headers that are valid strings, and its
    /// body.
    pub fn from_parts(status: http::StatusCode, headers: &http::HeaderMap, body: &[u8]) -> Self {
        Self {
            status: status.as_u16(),
            headers: headers
                .iter()
                .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect(),
            body: body.to_vec(),
        }
    }
}

/// A backend speaking the XML object API: it authorizes and sends requests.
pub trait XmlApi: Send + Sync + fmt::Debug + 'static {
    /// The store URL, for messages.
    fn store_url(&self) -> String;

    /// The header prefix of custom object metadata (`x-amz-meta-`, `x-goog-meta-`).
    fn meta_prefix(&self) -> &'static str;

    /// Sends `req` (authorized as the service wants) and returns the response when its status is
    /// 2xx; any other status is an error naming the store, the key, the operation and the
    /// service's `<Error><Code>` ([`StoreErrorKind::NotFound`] for 404 / `NoSuchKey`).
    fn send(&self, req: XmlRequest<'_>) -> Result<XmlResponse, StoreError>;
}

/// A parsed `<Error>` body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorBody {
    /// `NoSuchKey`, `AccessDenied`, `SignatureDoesNotMatch`, ...
    pub code: String,
    /// The service's explanation.
    pub message: String,
}

impl ErrorBody {
    /// `Code: Message` (or whichever of the two is present).
    pub fn summary(&self) -> String {
        match (self.code.is_empty(), self.message.is_empty()) {
            (false, false) => format!("{}: {}", self.code, self.message),
            (false, true) => self.code.clone(),
            (true, false) => self.message.clone(),
            (true, true) => String::new(),
        }
    }
}

/// The local name of the root element of an XML document, if it has one.
pub fn root_element(xml: &[u8]) -> Option<String> {
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut buf = Vec::new();
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e)) => {
                return Some(String::from_utf8_lossy(e.local_name().as_ref()).into_owned());
            }
            Ok(quick_xml::events::Event::Eof) | Err(_) => return None,
            Ok(_) => buf.clear(),
        }
    }
}

/// Parses an `<Error>` body; `None` when `xml` is not one (empty, HTML, another element...).
///
/// Lenient about the end: a body cut short (transports keep only the start of error bodies)
/// still yields the `Code` and `Message` read before the cut.
pub fn parse_error_body(xml: &[u8]) -> Option<ErrorBody> {
    use quick_xml::events::Event;
    if root_element(xml).as_deref() != Some("Error") {
        return None;
    }
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut buf = Vec::new();
    let mut out = ErrorBody::default();
    let mut depth = 0usize;
    // The field whose text is being read (a direct child of <Error>).
    let mut field: Option<bool> = None; // Some(true): Code, Some(false): Message
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => {
                depth += 1;
                field = match (depth, e.local_name().as_ref()) {
                    (2, b"Code") => Some(true),
                    (2, b"Message") => Some(false),
                    _ => None,
                };
            }
            Ok(Event::End(_)) => {
                depth = depth.saturating_sub(1);
                field = None;
            }
            Ok(Event::Text(t)) => {
                if let (Some(is_code), Ok(text)) = (field, t.decode()) {
                    push_field(&mut out, is_code, &text);
                }
            }
            Ok(Event::CData(t)) => {
                if let (Some(is_code), Ok(text)) = (field, t.decode()) {
                    push_field(&mut out, is_code, &text);
                }
            }
            Ok(Event::GeneralRef(r)) => {
                if let Some(is_code) = field {
                    let resolved = match r.resolve_char_ref() {
                        Ok(Some(c)) => Some(c.to_string()),
                        _ => r.decode().ok().and_then(|name| {
                            quick_xml::escape::resolve_predefined_entity(&name).map(str::to_owned)
                        }),
                    };
                    if let Some(text) = resolved {
                        push_field(&mut out, is_code, &text);
                    }
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            Ok(_) => {}
        }
        buf.clear();
    }
    out.code = out.code.trim().to_owned();
    out.message = out.message.trim().to_owned();
    Some(out)
}

fn push_field(out: &mut ErrorBody, is_code: bool, text: &str) {
    let target = if is_code {
        &mut out.code
    } else {
        &mut out.message
    };
    if target.len() < 1024 {
        target.push_str(text);
    }
}

/// `Code: Message` of an `<Error>` body, for messages; `None` when `body` is not one.
pub fn describe_error_body(body: &[u8]) -> Option<String> {
    let e = parse_error_body(body)?;
    let summary = e.summary();
    (!summary.is_empty()).then_some(summary)
}

#[derive(Debug, Deserialize)]
struct InitiateResult {
    #[serde(rename = "UploadId")]
    upload_id: String,
}

/// The `UploadId` of an `<InitiateMultipartUploadResult>` body.
pub fn parse_initiate_result(xml: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(xml).map_err(|_| "the body is not UTF-8".to_owned())?;
    match root_element(xml).as_deref() {
        Some("InitiateMultipartUploadResult") => {}
        Some("Error") => {
            let e = parse_error_body(xml).unwrap_or_default();
            return Err(format!("the service answered an error: {}", e.summary()));
        }
        other => {
            return Err(format!(
                "expected <InitiateMultipartUploadResult>, got {}",
                other.map_or_else(|| "no XML".to_owned(), |r| format!("<{r}>"))
            ));
        }
    }
    let parsed: InitiateResult = quick_xml::de::from_str(text)
        .map_err(|e| format!("malformed <InitiateMultipartUploadResult>: {e}"))?;
    if parsed.upload_id.trim().is_empty() {
        return Err("<InitiateMultipartUploadResult> has an empty UploadId".to_owned());
    }
    Ok(parsed.upload_id.trim().to_owned())
}

/// The keys of the uploads listed in a `<ListMultipartUploadsResult>` body.
pub fn parse_list_uploads(xml: &[u8]) -> Result<Vec<String>, String> {
    use quick_xml::events::Event;
    match root_element(xml).as_deref() {
        Some("ListMultipartUploadsResult") => {}
        other => {
            return Err(format!(
                "expected <ListMultipartUploadsResult>, got {}",
                other.map_or_else(|| "no XML".to_owned(), |r| format!("<{r}>"))
            ));
        }
    }
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut buf = Vec::new();
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut keys = Vec::new();
    let mut current: Option<String> = None;
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => {
                path.push(e.local_name().as_ref().to_vec());
                if path.len() == 3 && path[1] == b"Upload" && path[2] == b"Key" {
                    current = Some(String::new());
                }
            }
            Ok(Event::End(_)) => {
                if path.len() == 3
                    && let Some(key) = current.take()
                {
                    keys.push(key);
                }
                path.pop();
            }
            Ok(Event::Text(t)) => {
                if let Some(cur) = current.as_mut() {
                    cur.push_str(&t.decode().map_err(|e| format!("bad text: {e}"))?);
                }
            }
            Ok(Event::GeneralRef(r)) => {
                if let Some(cur) = current.as_mut() {
                    let name = r.decode().map_err(|e| format!("bad reference: {e}"))?;
                    let text = match r.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        _ => quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| format!("unknown entity &{name};"))?
                            .to_owned(),
                    };
                    cur.push_str(&text);
                }
            }
            Ok(Event::Eof) => break,
            Err(e) => return Err(format!("malformed XML: {e}")),
            Ok(_) => {}
        }
        buf.clear();
    }
    Ok(keys)
}

/// One part of a completed upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompletedPart {
    /// 1-based part number.
    #[serde(rename = "PartNumber")]
    pub number: u32,
    /// The `ETag` the service answered for the part (quotes included, as sent).
    #[serde(rename = "ETag")]
    pub etag: String,
}

#[derive(Debug, Serialize)]
#[serde(rename = "CompleteMultipartUpload")]
struct CompleteBody<'a> {
    #[serde(rename = "Part")]
    parts: &'a [CompletedPart],
}

/// The `<CompleteMultipartUpload>` body listing `parts` (in the order given: ascending).
pub fn complete_body(parts: &[CompletedPart]) -> Result<String, String> {
    quick_xml::se::to_string(&CompleteBody { parts })
        .map_err(|e| format!("serialising <CompleteMultipartUpload>: {e}"))
}

/// What a `200 OK` answer to CompleteMultipartUpload says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompleteOutcome {
    /// `<CompleteMultipartUploadResult>`: the object exists.
    Done,
    /// `<Error>` (or an unreadable body): the upload did not complete.
    Failed(String),
}

/// Reads the body of a `200 OK` answer to CompleteMultipartUpload.
pub fn parse_complete_result(xml: &[u8]) -> CompleteOutcome {
    match root_element(xml).as_deref() {
        Some("CompleteMultipartUploadResult") => CompleteOutcome::Done,
        Some("Error") => {
            let e = parse_error_body(xml).unwrap_or_default();
            CompleteOutcome::Failed(format!("200 OK with an <Error> body: {}", e.summary()))
        }
        Some(other) => CompleteOutcome::Failed(format!("200 OK with an unexpected <{other}> body")),
        None => CompleteOutcome::Failed("200 OK without an XML body".to_owned()),
    }
}

/// `Content-MD5` of `data`: the base64 of its MD5 digest.
pub fn content_md5(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data))
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn encode_query_value(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// Everything but RFC 3986's unreserved characters.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The metadata headers of `opts` for a backend whose prefix is `prefix`.
pub fn metadata_headers(prefix: &str, opts: &PutOptions) -> Vec<(String, String)> {
    opts.metadata
        .iter()
        .map(|(k, v)| (format!("{prefix}{}", k.to_ascii_lowercase()), v.clone()))
        .collect()
}

/// Refuses metadata that cannot travel as HTTP headers (names outside `[a-z0-9-_]`, values
/// with control characters or non-ASCII).
pub fn check_metadata(opts: &PutOptions) -> Result<(), String> {
    for (k, v) in &opts.metadata {
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!("metadata name {k:?} is not a valid header name"));
        }
        if !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(format!("metadata {k:?} value {v:?} is not printable ASCII"));
        }
    }
    Ok(())
}

/// How a [`MultipartWriter`] cuts and sends parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultipartConfig {
    /// Bytes per part (all but the last); at least [`MIN_PART_SIZE`].
    pub part_size: usize,
    /// Parts in flight at once (at least 1).
    pub concurrency: usize,
}

/// Results shared between a writer and its part uploaders.
#[derive(Debug, Default)]
struct PartResults {
    parts: Vec<CompletedPart>,
    error: Option<StoreError>,
}

/// An initiated multipart upload and its uploader threads.
#[derive(Debug)]
struct Upload {
    id: String,
    /// Parts to upload (`None` once the writer stops sending).
    tx: Option<SyncSender<(u32, Vec<u8>)>>,
    workers: Vec<JoinHandle<()>>,
    results: Arc<Mutex<PartResults>>,
    failed: Arc<AtomicBool>,
    next_part: u32,
}

/// A streaming writer over the XML API (see the module documentation).
#[derive(Debug)]
pub struct MultipartWriter<A: XmlApi> {
    api: Arc<A>,
    key: String,
    metadata: Vec<(String, String)>,
    config: MultipartConfig,
    buf: Vec<u8>,
    written: u64,
    upload: Option<Upload>,
    /// Set once the writer failed: every later call fails too.
    broken: bool,
}

impl<A: XmlApi> MultipartWriter<A> {
    /// A writer of object `key` with the metadata of `opts`.
    pub fn new(
        api: Arc<A>,
        key: &str,
        opts: &PutOptions,
        config: MultipartConfig,
    ) -> Result<Self, StoreError> {
        check_metadata(opts)
            .map_err(|e| StoreError::new(StoreErrorKind::InvalidKey, api.store_url(), key, e))?;
        let config = MultipartConfig {
            part_size: config.part_size.clamp(MIN_PART_SIZE, MAX_PART_SIZE),
            concurrency: config.concurrency.max(1),
        };
        let metadata = metadata_headers(api.meta_prefix(), opts);
        Ok(Self {
            api,
            key: key.to_owned(),
            metadata,
            config,
            buf: Vec::new(),
            written: 0,
            upload: None,
            broken: false,
        })
    }

    /// The upload id, once a multipart upload was started (tests and logs).
    pub fn upload_id(&self) -> Option<&str> {
        self.upload.as_ref().map(|u| u.id.as_str())
    }

    fn err(&self, kind: StoreErrorKind, detail: impl Into<String>) -> StoreError {
        StoreError::new(kind, self.api.store_url(), &self.key, detail)
    }

    /// CreateMultipartUpload, and the uploader threads.
    fn start(&mut self) -> Result<(), StoreError> {
        let resp = self.api.send(XmlRequest {
            op: "CreateMultipartUpload",
            method: Method::Post,
            key: &self.key,
            query: "uploads",
            headers: self.metadata.clone(),
            body: Vec::new(),
        })?;
        let id = parse_initiate_result(&resp.body).map_err(|e| {
            self.err(
                StoreErrorKind::Io,
                format!("CreateMultipartUpload answered {}: {e}", resp.status),
            )
        })?;
        let (tx, rx) = sync_channel::<(u32, Vec<u8>)>(1);
        let rx = Arc::new(Mutex::new(rx));
        let results = Arc::new(Mutex::new(PartResults::default()));
        let failed = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::with_capacity(self.config.concurrency);
        for i in 0..self.config.concurrency {
            let worker = PartUploader {
                api: Arc::clone(&self.api),
                key: self.key.clone(),
                upload_id: id.clone(),
                rx: Arc::clone(&rx),
                results: Arc::clone(&results),
                failed: Arc::clone(&failed),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("thaw-upload-{i}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    // Keep what started: the upload is aborted by the caller on this error.
                    self.upload = Some(Upload {
                        id,
                        tx: Some(tx),
                        workers,
                        results,
                        failed,
                        next_part: 1,
                    });
                    return Err(StoreError::io(
                        self.api.store_url(),
                        &self.key,
                        "starting a part uploader thread",
                        e,
                    ));
                }
            }
        }
        tracing::debug!(key = %self.key, upload_id = %id, "multipart upload started");
        self.upload = Some(Upload {
            id,
            tx: Some(tx),
            workers,
            results,
            failed,
            next_part: 1,
        });
        Ok(())
    }

    /// Hands the buffered bytes to the uploaders as the next part.
    fn send_part(&mut self) -> Result<(), StoreError> {
        if self.upload.is_none() {
            self.start()?;
        }
        let data = std::mem::take(&mut self.buf);
        let store_url = self.api.store_url();
        let Some(upload) = self.upload.as_mut() else {
            return Err(self.err(StoreErrorKind::Io, "multipart upload not started"));
        };
        if upload.failed.load(Ordering::Acquire) {
            return Err(take_error(upload, &store_url, &self.key));
        }
        let number = upload.next_part;
        if number > MAX_PARTS {
            return Err(StoreError::new(
                StoreErrorKind::TooLarge,
                store_url,
                &self.key,
                format!(
                    "more than {MAX_PARTS} parts of {} bytes: raise the part size",
                    self.config.part_size
                ),
            ));
        }
        upload.next_part = number.saturating_add(1);
        let sent = upload
            .tx
            .as_ref()
            .map(|tx| tx.send((number, data)).is_ok())
            .unwrap_or(false);
        if !sent {
            return Err(take_error(upload, &store_url, &self.key));
        }
        Ok(())
    }

    /// Stops the uploaders (after the parts already queued) and waits for them.
    fn finish_parts(upload: &mut Upload) {
        upload.tx = None;
        for handle in upload.workers.drain(..) {
            // A panicking uploader is impossible by construction (no unwrap); if it happens the
            // part is missing and CompleteMultipartUpload is refused below.
            let _ = handle.join();
        }
    }

    /// AbortMultipartUpload (after stopping the uploaders); failures are logged.
    fn abort(&mut self) {
        let Some(mut upload) = self.upload.take() else {
            return;
        };
        upload.failed.store(true, Ordering::Release);
        Self::finish_parts(&mut upload);
        let query = format!("uploadId={}", encode_query_value(&upload.id));
        let res = self.api.send(XmlRequest {
            op: "AbortMultipartUpload",
            method: Method::Delete,
            key: &self.key,
            query: &query,
            headers: Vec::new(),
            body: Vec::new(),
        });
        match res {
            Ok(_) => {
                tracing::debug!(key = %self.key, upload_id = %upload.id, "multipart upload aborted")
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(key = %self.key, upload_id = %upload.id, error = %e, "AbortMultipartUpload failed: the parts stay until a lifecycle rule removes them")
            }
        }
    }

    /// Single PUT of the whole (small) object.
    fn put_whole(&mut self) -> Result<(), StoreError> {
        let body = std::mem::take(&mut self.buf);
        let mut headers = self.metadata.clone();
        headers.push(("content-md5".to_owned(), content_md5(&body)));
        self.api.send(XmlRequest {
            op: "PutObject",
            method: Method::Put,
            key: &self.key,
            query: "",
            headers,
            body,
        })?;
        Ok(())
    }

    /// Sends the last part, waits for every part, then CompleteMultipartUpload.
    fn complete(&mut self) -> Result<(), StoreError> {
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        let store_url = self.api.store_url();
        let (upload_id, expected, mut parts) = {
            let Some(upload) = self.upload.as_mut() else {
                return Err(StoreError::new(
                    StoreErrorKind::Io,
                    store_url,
                    &self.key,
                    "multipart upload not started",
                ));
            };
            Self::finish_parts(upload);
            if upload.failed.load(Ordering::Acquire) {
                return Err(take_error(upload, &store_url, &self.key));
            }
            let parts = match upload.results.lock() {
                Ok(mut r) => std::mem::take(&mut r.parts),
                Err(_) => Vec::new(),
            };
            (upload.id.clone(), upload.next_part.saturating_sub(1), parts)
        };
        parts.sort_by_key(|p| p.number);
        let complete_set = parts.len() == usize::try_from(expected).unwrap_or(usize::MAX)
            && parts.iter().zip(1u32..).all(|(p, n)| p.number == n);
        if !complete_set {
            return Err(self.err(
                StoreErrorKind::Io,
                format!(
                    "{} of {expected} parts uploaded: refusing to complete the upload",
                    parts.len()
                ),
            ));
        }
        let body = complete_body(&parts).map_err(|e| self.err(StoreErrorKind::Io, e))?;
        let query = format!("uploadId={}", encode_query_value(&upload_id));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let resp = self.api.send(XmlRequest {
                op: "CompleteMultipartUpload",
                method: Method::Post,
                key: &self.key,
                query: &query,
                headers: vec![("content-type".to_owned(), "application/xml".to_owned())],
                body: body.clone().into_bytes(),
            })?;
            match parse_complete_result(&resp.body) {
                CompleteOutcome::Done => return Ok(()),
                CompleteOutcome::Failed(why) if attempt < COMPLETE_ATTEMPTS => {
                    tracing::warn!(key = %self.key, attempt, %why, "CompleteMultipartUpload failed; retrying");
                    let cap = COMPLETE_BACKOFF.saturating_mul(1u32 << (attempt - 1).min(8));
                    std::thread::sleep(cap.mul_f64(rand::random::<f64>()));
                }
                CompleteOutcome::Failed(why) => {
                    return Err(self.err(
                        StoreErrorKind::Io,
                        format!("CompleteMultipartUpload failed after {attempt} attempts: {why}"),
                    ));
                }
            }
        }
    }
}

/// The error an uploader recorded (or a generic one).
fn take_error(upload: &mut Upload, store_url: &str, key: &str) -> StoreError {
    let recorded = upload.results.lock().ok().and_then(|mut r| r.error.take());
    recorded.unwrap_or_else(|| {
        StoreError::new(
            StoreErrorKind::Io,
            store_url,
            key,
            "a part upload failed (multipart upload aborted)",
        )
    })
}

impl<A: XmlApi> Write for MultipartWriter<A> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::other(
                self.err(StoreErrorKind::Io, "writer failed earlier"),
            ));
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.config.part_size);
        }
        let room = self.config.part_size.saturating_sub(self.buf.len());
        let n = room.min(data.len());
        self.buf
            .extend_from_slice(data.get(..n).unwrap_or_default());
        self.written = self.written.saturating_add(n as u64);
        if self.buf.len() >= self.config.part_size
            && let Err(e) = self.send_part()
        {
            self.broken = true;
            self.abort();
            return Err(io::Error::other(e));
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<A: XmlApi> ObjectWriter for MultipartWriter<A> {
    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        if self.broken {
            return Err(self.err(StoreErrorKind::Io, "writer failed earlier"));
        }
        if self.upload.is_none() {
            return self.put_whole();
        }
        match self.complete() {
            Ok(()) => {
                // Completed: nothing to abort on drop.
                if let Some(mut upload) = self.upload.take() {
                    Self::finish_parts(&mut upload);
                }
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                self.abort();
                Err(e)
            }
        }
    }

    fn written(&self) -> u64 {
        self.written
    }
}

impl<A: XmlApi> Drop for MultipartWriter<A> {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Parts waiting for an uploader: (part number, bytes), shared by the uploader threads.
type PartQueue = Arc<Mutex<Receiver<(u32, Vec<u8>)>>>;

/// One part-uploader thread: takes parts from the channel until it closes.
struct PartUploader<A: XmlApi> {
    api: Arc<A>,
    key: String,
    upload_id: String,
    rx: PartQueue,
    results: Arc<Mutex<PartResults>>,
    failed: Arc<AtomicBool>,
}

impl<A: XmlApi> PartUploader<A> {
    fn run(self) {
        loop {
            let job = match self.rx.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok((number, data)) = job else {
                return;
            };
            if self.failed.load(Ordering::Acquire) {
                continue;
            }
            match self.upload(number, data) {
                Ok(part) => {
                    if let Ok(mut r) = self.results.lock() {
                        r.parts.push(part);
                    }
                }
                Err(e) => {
                    if let Ok(mut r) = self.results.lock() {
                        r.error.get_or_insert(e);
                    }
                    self.failed.store(true, Ordering::Release);
                }
            }
        }
    }

    fn upload(&self, number: u32, data: Vec<u8>) -> Result<CompletedPart, StoreError> {
        let query = format!(
            "partNumber={number}&uploadId={}",
            encode_query_value(&self.upload_id)
        );
        let op = format!("UploadPart {number}");
        let headers = vec![("content-md5".to_owned(), content_md5(&data))];
        let resp = self.api.send(XmlRequest {
            op: &op,
            method: Method::Put,
            key: &self.key,
            query: &query,
            headers,
            body: data,
        })?;
        let etag = resp.header("etag").map(str::to_owned).ok_or_else(|| {
            StoreError::new(
                StoreErrorKind::Io,
                self.api.store_url(),
                &self.key,
                format!("{op}: the answer has no ETag"),
            )
        })?;
        Ok(CompletedPart { number, etag })
    }
}

impl<A: XmlApi> fmt::Debug for PartUploader<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartUploader")
            .field("key", &self.key)
            .field("upload_id", &self.upload_id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_parse() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message><Key>a/b</Key><RequestId>4442587FB7D0A2F9</RequestId></Error>"#;
        let e = parse_error_body(xml).unwrap();
        assert_eq!(e.code, "NoSuchKey");
        assert_eq!(e.summary(), "NoSuchKey: The specified key does not exist.");
        // Entities are unescaped.
        let e = parse_error_body(
            b"<Error><Code>InvalidArgument</Code><Message>a &amp; b &lt;c&gt;</Message></Error>",
        )
        .unwrap();
        assert_eq!(e.message, "a & b <c>");
        // Cut short (a transport keeps only the start of an error body).
        let cut = parse_error_body(b"<Error><Code>SlowDown</Code><Message>Please reduce your req")
            .unwrap();
        assert_eq!(cut.summary(), "SlowDown: Please reduce your req");
        assert_eq!(
            describe_error_body(
                b"<?xml version=\"1.0\"?>\n<Error><Code>NoSuchBucket</Code></Error>"
            )
            .as_deref(),
            Some("NoSuchBucket")
        );
        assert_eq!(describe_error_body(b"<html>oops</html>"), None);
        // Only a code.
        assert_eq!(
            parse_error_body(b"<Error><Code>AccessDenied</Code></Error>")
                .unwrap()
                .summary(),
            "AccessDenied"
        );
        for bad in [
            &b""[..],
            b"<html><body>503</body></html>",
            b"not xml at all",
            b"<CompleteMultipartUploadResult/>",
        ] {
            let parsed = parse_error_body(bad);
            assert!(
                parsed.is_none() || parsed.as_ref().is_some_and(|e| e.code.is_empty()),
                "{:?} -> {parsed:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn initiate_result_parses() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket><Key>k/memfile.zstd</Key><UploadId>VXBsb2FkIElE&amp;x</UploadId></InitiateMultipartUploadResult>"#;
        assert_eq!(parse_initiate_result(xml).unwrap(), "VXBsb2FkIElE&x");
        let err =
            parse_initiate_result(b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>")
                .unwrap_err();
        assert!(err.contains("AccessDenied: no"), "{err}");
        let err = parse_initiate_result(b"<Other/>").unwrap_err();
        assert!(err.contains("<Other>"), "{err}");
        let err = parse_initiate_result(
            b"<InitiateMultipartUploadResult><UploadId> </UploadId></InitiateMultipartUploadResult>",
        )
        .unwrap_err();
        assert!(err.contains("empty UploadId"), "{err}");
        assert!(parse_initiate_result(b"<InitiateMultipartUploadResult/>").is_err());
        assert!(parse_initiate_result(b"\xff\xfe").is_err());
    }

    #[test]
    fn upload_lists_parse() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket><KeyMarker></KeyMarker><Upload><Key>p/a&amp;b</Key><UploadId>1</UploadId><Initiator><ID>x</ID></Initiator></Upload><Upload><Key>p/c</Key><UploadId>2</UploadId></Upload><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>"#;
        assert_eq!(parse_list_uploads(xml).unwrap(), vec!["p/a&b", "p/c"]);
        assert_eq!(
            parse_list_uploads(b"<ListMultipartUploadsResult/>").unwrap(),
            Vec::<String>::new()
        );
        assert!(parse_list_uploads(b"<Error><Code>x</Code></Error>").is_err());
        assert!(
            parse_list_uploads(b"<ListMultipartUploadsResult><Upload><Key>a</Upload>").is_err()
        );
    }

    #[test]
    fn complete_body_lists_parts_escaped() {
        let parts = [
            CompletedPart {
                number: 1,
                etag: "\"a54357aff0632cce46d942af68356b38\"".to_owned(),
            },
            CompletedPart {
                number: 2,
                etag: "\"0c78aef83f66abc1fa1e8477f296d394\"".to_owned(),
            },
        ];
        let body = complete_body(&parts).unwrap();
        assert_eq!(
            body,
            "<CompleteMultipartUpload>\
             <Part><PartNumber>1</PartNumber><ETag>\"a54357aff0632cce46d942af68356b38\"</ETag></Part>\
             <Part><PartNumber>2</PartNumber><ETag>\"0c78aef83f66abc1fa1e8477f296d394\"</ETag></Part>\
             </CompleteMultipartUpload>"
        );
    }

    #[test]
    fn complete_results_are_told_apart() {
        assert_eq!(
            parse_complete_result(
                br#"<?xml version="1.0"?><CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Location>x</Location><ETag>"e-2"</ETag></CompleteMultipartUploadResult>"#
            ),
            CompleteOutcome::Done
        );
        let CompleteOutcome::Failed(why) = parse_complete_result(
            b"<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>",
        ) else {
            panic!("an <Error> body is a failure");
        };
        assert!(why.contains("InternalError"), "{why}");
        assert!(matches!(
            parse_complete_result(b""),
            CompleteOutcome::Failed(_)
        ));
        assert!(matches!(
            parse_complete_result(b"<Whatever/>"),
            CompleteOutcome::Failed(_)
        ));
    }

    #[test]
    fn content_md5_and_query_encoding() {
        // RFC 1864's example digest of the empty string.
        assert_eq!(content_md5(b""), "1B2M2Y8AsgTpgAmY7PhCfg==");
        assert_eq!(content_md5(b"hello"), "XUFAKrxLKna5cZ2REBfFkg==");
        assert_eq!(
            encode_query_value("a+b/c=d~e_f.g-h"),
            "a%2Bb%2Fc%3Dd~e_f.g-h"
        );
    }

    #[test]
    fn metadata_is_checked_and_prefixed() {
        let opts = PutOptions::with_uncompressed_size(123);
        assert!(check_metadata(&opts).is_ok());
        assert_eq!(
            metadata_headers("x-amz-meta-", &opts),
            vec![("x-amz-meta-uncompressed-size".to_owned(), "123".to_owned())]
        );
        let mut bad = PutOptions::default();
        bad.metadata.insert("a b".to_owned(), "1".to_owned());
        assert!(check_metadata(&bad).is_err());
        let mut bad = PutOptions::default();
        bad.metadata
            .insert("ok".to_owned(), "line\nbreak".to_owned());
        assert!(check_metadata(&bad).is_err());
    }

    type Headers = Vec<(String, String)>;
    type Parts = Vec<(u32, Vec<u8>)>;

    /// An in-memory service speaking the protocol, recording every call, with failure switches.
    #[derive(Debug, Default)]
    struct FakeService {
        state: Mutex<FakeState>,
    }

    #[derive(Debug, Default)]
    struct FakeState {
        calls: Vec<String>,
        objects: std::collections::BTreeMap<String, (Vec<u8>, Headers)>,
        uploads: std::collections::BTreeMap<String, (Headers, Parts)>,
        next_id: u32,
        fail_part: Option<u32>,
        complete_errors: u32,
    }

    impl XmlApi for FakeService {
        fn store_url(&self) -> String {
            "fake://bucket".to_owned()
        }

        fn meta_prefix(&self) -> &'static str {
            "x-test-meta-"
        }

        fn send(&self, req: XmlRequest<'_>) -> Result<XmlResponse, StoreError> {
            let mut st = self.state.lock().unwrap();
            st.calls.push(format!("{} {}", req.method.as_str(), req.op));
            let fail = |detail: &str| {
                Err(StoreError::new(
                    StoreErrorKind::Io,
                    "fake://bucket",
                    req.key,
                    detail,
                ))
            };
            let ok = |body: &[u8], headers: Vec<(String, String)>| {
                Ok(XmlResponse {
                    status: 200,
                    headers,
                    body: body.to_vec(),
                })
            };
            let param = |name: &str| {
                req.query.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then(|| v.to_owned())
                })
            };
            match (req.method, req.query) {
                (Method::Put, "") => {
                    assert_eq!(
                        req.headers
                            .iter()
                            .find(|(n, _)| n == "content-md5")
                            .unwrap()
                            .1,
                        content_md5(&req.body)
                    );
                    let meta = req
                        .headers
                        .iter()
                        .filter(|(n, _)| n.starts_with("x-test-meta-"))
                        .cloned()
                        .collect();
                    st.objects.insert(req.key.to_owned(), (req.body, meta));
                    ok(b"", Vec::new())
                }
                (Method::Post, "uploads") => {
                    st.next_id += 1;
                    let id = format!("id+{}", st.next_id);
                    st.uploads
                        .insert(id.clone(), (req.headers.clone(), Vec::new()));
                    ok(
                        format!("<InitiateMultipartUploadResult><UploadId>{id}</UploadId></InitiateMultipartUploadResult>").as_bytes(),
                        Vec::new(),
                    )
                }
                (Method::Put, _) => {
                    let number: u32 = param("partNumber").unwrap().parse().unwrap();
                    let id = param("uploadId").unwrap().replace("%2B", "+");
                    if st.fail_part == Some(number) {
                        return fail("injected part failure");
                    }
                    assert_eq!(
                        req.headers
                            .iter()
                            .find(|(n, _)| n == "content-md5")
                            .unwrap()
                            .1,
                        content_md5(&req.body)
                    );
                    let etag = format!("\"{}\"", hex::encode(md5::Md5::digest(&req.body)));
                    let Some(upload) = st.uploads.get_mut(&id) else {
                        return fail("NoSuchUpload");
                    };
                    upload.1.push((number, req.body));
                    ok(b"", vec![("etag".to_owned(), etag)])
                }
                (Method::Post, _) => {
                    let id = param("uploadId").unwrap().replace("%2B", "+");
                    if st.complete_errors > 0 {
                        st.complete_errors -= 1;
                        return ok(b"<Error><Code>InternalError</Code><Message>try again</Message></Error>", Vec::new());
                    }
                    let body = String::from_utf8(req.body).unwrap();
                    let Some((headers, mut parts)) = st.uploads.remove(&id) else {
                        return fail("NoSuchUpload");
                    };
                    parts.sort_by_key(|p| p.0);
                    let listed = parts
                        .iter()
                        .map(|(n, d)| {
                            format!(
                                "<Part><PartNumber>{n}</PartNumber><ETag>\"{}\"</ETag></Part>",
                                hex::encode(md5::Md5::digest(d))
                            )
                        })
                        .collect::<String>();
                    assert_eq!(
                        body,
                        format!("<CompleteMultipartUpload>{listed}</CompleteMultipartUpload>")
                    );
                    let data = parts.into_iter().flat_map(|(_, d)| d).collect();
                    let meta = headers
                        .into_iter()
                        .filter(|(n, _)| n.starts_with("x-test-meta-"))
                        .collect();
                    st.objects.insert(req.key.to_owned(), (data, meta));
                    ok(b"<CompleteMultipartUploadResult><Key>k</Key></CompleteMultipartUploadResult>", Vec::new())
                }
                (Method::Delete, _) => {
                    let id = param("uploadId").unwrap().replace("%2B", "+");
                    st.uploads.remove(&id);
                    ok(b"", Vec::new())
                }
                _ => fail("unexpected request"),
            }
        }
    }

    fn writer(api: &Arc<FakeService>, concurrency: usize) -> Box<MultipartWriter<FakeService>> {
        Box::new(
            MultipartWriter::new(
                Arc::clone(api),
                "b/memfile.zstd",
                &PutOptions::with_uncompressed_size(42),
                MultipartConfig {
                    part_size: MIN_PART_SIZE,
                    concurrency,
                },
            )
            .unwrap(),
        )
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from((i * 7 + i / 4096) % 251).unwrap())
            .collect()
    }

    #[test]
    fn small_objects_are_one_put_at_commit() {
        let api = Arc::new(FakeService::default());
        let mut w = writer(&api, 2);
        w.write_all(&data(1000)).unwrap();
        assert!(
            api.state.lock().unwrap().calls.is_empty(),
            "nothing sent before commit"
        );
        w.commit().unwrap();
        let st = api.state.lock().unwrap();
        assert_eq!(st.calls, vec!["PUT PutObject"]);
        let (body, meta) = &st.objects["b/memfile.zstd"];
        assert_eq!(body, &data(1000));
        assert_eq!(
            meta,
            &vec![("x-test-meta-uncompressed-size".to_owned(), "42".to_owned())]
        );
    }

    #[test]
    fn large_objects_go_through_multipart() {
        let api = Arc::new(FakeService::default());
        let mut w = writer(&api, 3);
        let d = data(12 << 20);
        for piece in d.chunks(1 << 20) {
            w.write_all(piece).unwrap();
        }
        assert_eq!(w.written(), 12 << 20);
        assert!(
            api.state.lock().unwrap().objects.is_empty(),
            "invisible before commit"
        );
        w.commit().unwrap();
        let st = api.state.lock().unwrap();
        let (body, meta) = &st.objects["b/memfile.zstd"];
        assert!(body == &d, "assembled object differs");
        assert_eq!(
            meta,
            &vec![("x-test-meta-uncompressed-size".to_owned(), "42".to_owned())]
        );
        let mut calls = st.calls.clone();
        calls.sort();
        assert_eq!(
            calls,
            vec![
                "POST CompleteMultipartUpload",
                "POST CreateMultipartUpload",
                "PUT UploadPart 1",
                "PUT UploadPart 2",
                "PUT UploadPart 3",
            ]
        );
        assert!(st.uploads.is_empty());
    }

    #[test]
    fn complete_with_an_error_body_is_retried() {
        let api = Arc::new(FakeService::default());
        api.state.lock().unwrap().complete_errors = 2;
        let mut w = writer(&api, 1);
        w.write_all(&data(MIN_PART_SIZE + 10)).unwrap();
        w.commit().unwrap();
        let st = api.state.lock().unwrap();
        assert_eq!(
            st.calls.iter().filter(|c| c.contains("Complete")).count(),
            3
        );
        assert_eq!(st.objects["b/memfile.zstd"].0.len(), MIN_PART_SIZE + 10);

        drop(st);
        // Past the attempts: the upload is aborted and nothing is left.
        let api = Arc::new(FakeService::default());
        api.state.lock().unwrap().complete_errors = COMPLETE_ATTEMPTS;
        let mut w = writer(&api, 1);
        w.write_all(&data(MIN_PART_SIZE + 10)).unwrap();
        let err = w.commit().unwrap_err();
        assert!(err.to_string().contains("InternalError"), "{err}");
        let st = api.state.lock().unwrap();
        assert!(st.objects.is_empty() && st.uploads.is_empty(), "{st:?}");
        assert_eq!(st.calls.last().unwrap(), "DELETE AbortMultipartUpload");
    }

    #[test]
    fn failed_parts_and_dropped_writers_leave_nothing() {
        let api = Arc::new(FakeService::default());
        api.state.lock().unwrap().fail_part = Some(2);
        let mut w = writer(&api, 2);
        let d = data(4 * MIN_PART_SIZE);
        // The failure surfaces at a later write or at commit, never as success.
        let res = w.write_all(&d).map_err(|e| e.to_string());
        let res = match res {
            Ok(()) => w.commit().map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let err = res.unwrap_err();
        assert!(err.contains("injected part failure"), "{err}");
        let st = api.state.lock().unwrap();
        assert!(st.objects.is_empty() && st.uploads.is_empty(), "{st:?}");
        assert!(st.calls.iter().any(|c| c == "DELETE AbortMultipartUpload"));
        drop(st);

        let api = Arc::new(FakeService::default());
        let mut w = writer(&api, 2);
        w.write_all(&data(2 * MIN_PART_SIZE + 1)).unwrap();
        assert!(w.upload_id().is_some());
        drop(w);
        let st = api.state.lock().unwrap();
        assert!(st.objects.is_empty() && st.uploads.is_empty(), "{st:?}");
        assert_eq!(st.calls.last().unwrap(), "DELETE AbortMultipartUpload");
    }
}
