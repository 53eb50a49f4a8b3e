//! NBD test helpers shared by `nbd_interop.rs` and `nbd_catalogue.rs`: generated chains, a
//! running `thaw serve`, client tools that fail loudly when missing, and a raw-socket client
//! for the bytes libnbd cannot produce. Included with `#[path = "common/nbd.rs"] mod nbd_common;`
//! (not through `common/mod.rs`, so the other test crates do not compile it).
#![allow(dead_code, reason = "each test crate uses a part of the helpers")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thaw_codec::nbd::Request;
use thaw_codec::nbd::consts::*;
use thaw_codec::nbd::reply::encode_option;
use thaw_codec::{BuildId, CompressionType, FileKind};
use thaw_server::chain::{ChainManifest, ChainSpec, generate};
use thaw_server::store::FileStore;
use thaw_server::writer::WriteOptions;

pub use thaw_codec::nbd::Command as NbdCmd;

/// A generated rootfs chain in a file store of its own.
pub struct Chain {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub manifest: ChainManifest,
}

impl Chain {
    /// Generates `layers` diff layers over a base of `size` bytes (zstd level 1, V4 headers,
    /// frames of `frame_size` bytes).
    pub fn generate(
        layers: usize,
        size: u64,
        seed: u64,
        zero_fraction: f64,
        frame_size: u64,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        let store = FileStore::new(store_dir.clone());
        let spec = ChainSpec {
            layers,
            size,
            memfile_block_size: 4096,
            files: vec![FileKind::Rootfs],
            seed,
            dirty_fraction: 0.15,
            zero_fraction,
            write: WriteOptions {
                codec: CompressionType::Zstd,
                level: 1,
                frame_size,
                header_version: 4,
                workers: 2,
                progress: false,
            },
        };
        let manifest = generate(&store, &dir.path().join("expected"), &spec).unwrap();
        Self {
            dir,
            store: store_dir,
            manifest,
        }
    }

    /// The flattened image of a layer.
    pub fn flat(&self, layer: usize) -> Vec<u8> {
        std::fs::read(self.flat_path(layer)).unwrap()
    }

    pub fn flat_path(&self, layer: usize) -> PathBuf {
        self.manifest.layers[layer].files["rootfs.ext4"]
            .flat
            .clone()
    }

    pub fn build(&self, layer: usize) -> BuildId {
        self.manifest.layers[layer].build_id
    }

    /// The stored (compressed) data object of a layer.
    pub fn data_object(&self, layer: usize) -> PathBuf {
        self.store
            .join(self.build(layer).to_string())
            .join("rootfs.ext4.zstd")
    }

    /// Every layer as export `lN`.
    pub fn exports(&self) -> Vec<(String, BuildId)> {
        (0..self.manifest.layers.len())
            .map(|i| (format!("l{i}"), self.build(i)))
            .collect()
    }

    /// `file:///` URL of the store.
    pub fn store_url(&self) -> String {
        format!("file://{}", self.store.display())
    }
}

/// A running `thaw serve`, killed on drop.
pub struct Serve {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub port: u16,
    pub metrics: Option<String>,
}

impl Serve {
    /// Serves `exports` (name, build) of the store at `store` (a path or a store URL) on a unix
    /// socket and an ephemeral loopback TCP port, with `extra` arguments.
    pub fn start_with(store: &str, exports: &[(String, BuildId)], extra: &[&str]) -> Self {
        Self::spawn(store, exports, extra, None)
    }

    /// Like [`Serve::start_with`], with `RUST_LOG=rust_log` and the server's stderr going to a
    /// file ([`Serve::log`]).
    pub fn start_logged(
        store: &str,
        exports: &[(String, BuildId)],
        extra: &[&str],
        rust_log: &str,
    ) -> Self {
        Self::spawn(store, exports, extra, Some(rust_log))
    }

    fn spawn(
        store: &str,
        exports: &[(String, BuildId)],
        extra: &[&str],
        rust_log: Option<&str>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw"));
        cmd.arg("serve")
            .arg("--store")
            .arg(store)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--listen")
            .arg("tcp:127.0.0.1:0")
            .arg("--overlay-dir")
            .arg(dir.path().join("overlay"));
        for (name, build) in exports {
            cmd.arg("--export").arg(format!("{name}={build}"));
        }
        cmd.args(extra).stdout(Stdio::piped());
        match rust_log {
            Some(filter) => {
                let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
                cmd.env("RUST_LOG", filter).env("NO_COLOR", "1").stderr(log);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let mut port = 0;
        let mut metrics = None;
        for line in BufReader::new(out).lines() {
            let line = line.unwrap();
            if let Some(url) = line.strip_prefix("metrics http://") {
                metrics = Some(url.trim_end_matches("/metrics").to_string());
            }
            if let Some(rest) = line.split("nbd://127.0.0.1:").nth(1) {
                port = rest.split('/').next().unwrap().parse().unwrap();
            }
            if line == "ready" {
                break;
            }
        }
        assert_ne!(port, 0, "thaw serve printed no TCP address");
        Self {
            child,
            dir,
            sock,
            port,
            metrics,
        }
    }

    /// What the server logged so far (started with [`Serve::start_logged`]), ANSI colours
    /// removed.
    pub fn log(&self) -> String {
        let raw = std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(ch) = chars.next() {
            if ch == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(ch);
            }
        }
        out
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Panics when the server exited (a panic aborts the process).
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("thaw serve exited: {st}");
        }
    }

    /// Waits until the fd count is back to `at_most` (connections close asynchronously).
    pub fn wait_fds(&self, at_most: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.fd_count();
            if now <= at_most {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: fd count grew from {at_most} to {now}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One Prometheus scrape (`--metrics` must have been given).
    pub fn scrape(&self) -> String {
        let addr = self.metrics.clone().expect("no metrics address printed");
        let mut http = std::net::TcpStream::connect(&addr).unwrap();
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        http.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        body
    }

    /// A metric's value in a scrape (the first line starting with `prefix`), if present.
    pub fn metric(body: &str, prefix: &str) -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Waits until `thaw_nbd_connections_active` equals `n`.
    pub fn wait_active(&self, n: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let body = self.scrape();
            let v = Self::metric(&body, "thaw_nbd_connections_active").unwrap_or(0.0);
            if (v - n).abs() < 0.5 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "thaw_nbd_connections_active stays {v}, expected {n}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigterm(&self) {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "thaw serve did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client tool; panics (never skips) when it is missing or fails.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .env("PATH", "/usr/bin:/usr/sbin:/bin")
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required (ci/install.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn nbdcopy_to_vec(uri: &str, dir: &Path, extra: &[&str]) -> Vec<u8> {
    let dst = dir.join(format!("copy-{}.raw", uuid::Uuid::new_v4()));
    let mut args: Vec<&str> = extra.to_vec();
    let dst_s = dst.display().to_string();
    args.extend([uri, dst_s.as_str()]);
    run("nbdcopy", &args);
    let v = std::fs::read(&dst).unwrap();
    std::fs::remove_file(&dst).unwrap();
    v
}

/// One structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub data: Vec<u8>,
}

impl Chunk {
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    pub fn is_error(&self) -> bool {
        self.kind & REPLY_TYPE_FLAG_ERROR != 0
    }

    /// The error value of an error chunk.
    pub fn error(&self) -> u32 {
        u32::from_be_bytes(self.data[..4].try_into().unwrap())
    }
}

/// A reply of either kind, read without knowing which comes next.
#[derive(Debug)]
pub enum AnyReply {
    /// (error, cookie); the caller reads a READ's payload.
    Simple(u32, u64),
    Chunk(Chunk),
}

/// A raw NBD client over any byte stream (unix socket by default).
pub struct Raw<S = UnixStream> {
    pub s: S,
}

impl Raw<UnixStream> {
    /// Connects and sends fixed-newstyle client flags (no NO_ZEROES).
    pub fn connect(sock: &Path) -> Self {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self::greet(&mut s);
        Self { s }
    }
}

impl Raw<std::net::TcpStream> {
    pub fn connect_tcp(port: u16) -> Self {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw::<UnixStream>::greet(&mut s);
        Self { s }
    }
}

impl<S: Read + Write> Raw<S> {
    fn greet(s: &mut impl ReadWrite) {
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        s.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut out = Vec::new();
        encode_option(&mut out, opt, data).unwrap();
        self.s.write_all(&out).unwrap();
    }

    /// One option reply: (option, type, data).
    pub fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; usize::try_from(len).unwrap()];
        self.s.read_exact(&mut d).unwrap();
        (opt, ty, d)
    }

    /// `STRUCTURED_REPLY`, acknowledged.
    pub fn structured(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        let (opt, ty, _) = self.reply();
        assert_eq!((opt, ty), (OPT_STRUCTURED_REPLY, REP_ACK));
    }

    /// `SET_META_CONTEXT base:allocation` for `export`; returns the context id.
    pub fn meta_base_allocation(&mut self, export: &str) -> u32 {
        self.option(
            OPT_SET_META_CONTEXT,
            &meta_query(export, &[BASE_ALLOCATION]),
        );
        let (_, ty, d) = self.reply();
        assert_eq!(ty, REP_META_CONTEXT, "{}", String::from_utf8_lossy(&d));
        let id = u32::from_be_bytes(d[..4].try_into().unwrap());
        let (_, ty, _) = self.reply();
        assert_eq!(ty, REP_ACK);
        id
    }

    /// Sends `opt` (GO or INFO) for `name` with `infos` requested; returns every reply up to and
    /// including the final one.
    pub fn go_replies(&mut self, opt: u32, name: &str, infos: &[u16]) -> Vec<(u32, Vec<u8>)> {
        self.option(opt, &go_data(name, infos));
        let mut out = Vec::new();
        loop {
            let (o, ty, data) = self.reply();
            assert_eq!(o, opt);
            let last = ty != REP_INFO;
            out.push((ty, data));
            if last {
                return out;
            }
        }
    }

    /// GO for `name`; returns the export size and flags.
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.go_replies(OPT_GO, name, &[]);
        let (last, _) = replies.last().unwrap();
        assert_eq!(*last, REP_ACK, "GO failed with reply type {last:#x}");
        let info = replies
            .iter()
            .find(|(ty, d)| *ty == REP_INFO && d[..2] == INFO_EXPORT.to_be_bytes())
            .expect("GO acked without NBD_INFO_EXPORT");
        let d = &info.1;
        (
            u64::from_be_bytes(d[2..10].try_into().unwrap()),
            u16::from_be_bytes(d[10..12].try_into().unwrap()),
        )
    }

    pub fn request(&mut self, cmd: NbdCmd, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        self.request_flags(0, cmd, cookie, offset, length, payload);
    }

    pub fn request_flags(
        &mut self,
        flags: u16,
        cmd: NbdCmd,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut b = request_bytes(flags, cmd, cookie, offset, length).to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// A simple reply: (error, cookie), then `data_len` bytes when error == 0.
    pub fn simple(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            &h[..4],
            &SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "not a simple reply"
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = Vec::new();
        if err == 0 {
            d.resize(data_len, 0);
            self.s.read_exact(&mut d).unwrap();
        }
        (err, cookie, d)
    }

    /// One structured chunk.
    pub fn chunk(&mut self) -> Chunk {
        match self.any_reply() {
            AnyReply::Chunk(c) => c,
            AnyReply::Simple(e, c) => {
                panic!("simple reply (error {e}, cookie {c}) where a chunk was due")
            }
        }
    }

    /// The chunks of one structured reply, up to and including the one flagged DONE (replies
    /// to other requests must not be interleaved: the caller has one request in flight).
    pub fn chunks(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let c = self.chunk();
            assert_eq!(c.cookie, cookie, "chunk of another request: {c:?}");
            let done = c.done();
            out.push(c);
            if done {
                return out;
            }
        }
    }

    /// The next reply header of either kind (a chunk comes with its payload; a simple reply
    /// without: the caller knows whether a READ payload follows).
    pub fn any_reply(&mut self) -> AnyReply {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        let magic = u32::from_be_bytes(m);
        if magic == SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; 12];
            self.s.read_exact(&mut h).unwrap();
            return AnyReply::Simple(
                u32::from_be_bytes(h[..4].try_into().unwrap()),
                u64::from_be_bytes(h[4..12].try_into().unwrap()),
            );
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "bad reply magic {magic:#x}");
        let mut h = [0u8; CHUNK_HEADER_LEN - 4];
        self.s.read_exact(&mut h).unwrap();
        let flags = u16::from_be_bytes(h[..2].try_into().unwrap());
        let kind = u16::from_be_bytes(h[2..4].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        assert!(len <= 64 << 20, "chunk length {len}");
        let mut data = vec![0u8; usize::try_from(len).unwrap()];
        self.s.read_exact(&mut data).unwrap();
        AnyReply::Chunk(Chunk {
            flags,
            kind,
            cookie,
            data,
        })
    }

    /// True when the server closed the connection (EOF, or a reset).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// Reads until EOF: true when the server closed, false on a timeout.
    pub fn drain_to_eof(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Read + Write, for the greeting helper.
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A request header.
pub fn request_bytes(
    flags: u16,
    cmd: NbdCmd,
    cookie: u64,
    offset: u64,
    length: u32,
) -> [u8; REQUEST_LEN] {
    Request {
        flags,
        command: cmd,
        cookie,
        offset,
        length,
    }
    .to_bytes()
}

/// The data of GO / INFO: name and info requests.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&u16::try_from(infos.len()).unwrap().to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// The data of SET/LIST_META_CONTEXT: export name and queries.
pub fn meta_query(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&u32::try_from(export.len()).unwrap().to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&u32::try_from(queries.len()).unwrap().to_be_bytes());
    for q in queries {
        d.extend_from_slice(&u32::try_from(q.len()).unwrap().to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Counts per key (for cookies answered).
pub fn tally<K: Ord + Copy>(keys: impl IntoIterator<Item = K>) -> BTreeMap<K, usize> {
    let mut m = BTreeMap::new();
    for k in keys {
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// `thaw ctl --control CONTROL ARGS...`: its output, whatever the exit status.
pub fn ctl(control: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_thaw"))
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .unwrap()
}

/// `thaw ctl --control CONTROL ARGS...`, which must succeed: its JSON reply.
pub fn ctl_json(control: &Path, args: &[&str]) -> serde_json::Value {
    let out = ctl(control, args);
    assert!(
        out.status.success(),
        "thaw ctl {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
