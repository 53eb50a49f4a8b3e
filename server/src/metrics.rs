//! Prometheus metrics: a global `metrics` recorder (metrics-exporter-prometheus) and a small
//! HTTP endpoint answering `GET /metrics` (and any other path) with the text exposition format.
//!
//! Without [`MetricsServer::start`] no recorder is installed and the `metrics::*!` macros in the
//! request path are no-ops.
//!
//! Names (all prefixed `thaw_`):
//! - `nbd_connections_total`, `nbd_connections_active`, `nbd_handshake_rejected_total{reason}`,
//!   `nbd_handshake_timeouts_total`;
//! - `nbd_requests_total{cmd}`, `nbd_request_errors_total{cmd,errno}`,
//!   `nbd_request_duration_seconds{cmd}` (histogram: request header read to reply queued),
//!   `nbd_read_bytes_total`, `nbd_write_bytes_total`;
//! - `engine_*`: the engine's counters (misses, sessions, store requests and bytes, tier hits,
//!   retries, read-ahead, fetch errors), sampled at each scrape;
//! - `store_*{scheme,op}`: the object stores' HTTP transport (`crate::store::http`): requests,
//!   bytes received and sent, retries, errors by kind, and the histograms
//!   `store_first_byte_seconds` and `store_operation_seconds`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::Engine;

/// Latency buckets of `thaw_nbd_request_duration_seconds` (10 µs .. 30 s).
const LATENCY_BUCKETS: &[f64] = &[
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Name of the request latency histogram.
pub const REQUEST_DURATION: &str = "thaw_nbd_request_duration_seconds";

/// Whether a recorder was installed: hot paths skip measuring what nobody records (a
/// `clock_gettime` pair per NBD request is 2 % of a warm server's CPU).
static RECORDING: AtomicBool = AtomicBool::new(false);

/// Whether a metrics recorder is installed in this process ([`MetricsServer::start`]).
#[inline]
pub fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// Starts a duration measurement when metrics are recorded (see [`recording`]).
#[inline]
pub fn start_timer() -> Option<std::time::Instant> {
    recording().then(std::time::Instant::now)
}

/// The metrics endpoint (stopped on drop).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Installs the global recorder and serves scrapes on `addr` (`HOST:PORT`; port 0 = any).
    /// `engine`'s counters are sampled at each scrape.
    ///
    /// # Errors
    /// A recorder is already installed in this process; the address cannot be bound.
    pub fn start(addr: &str, engine: Option<Arc<Engine>>) -> anyhow::Result<Self> {
        // Set before the recorder exists: a request timed just before installation is recorded
        // into the no-op recorder, which is harmless.
        RECORDING.store(true, Ordering::Relaxed);
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), LATENCY_BUCKETS)
            .context("histogram buckets")?
            .set_buckets_for_metric(Matcher::Prefix("thaw_store_".into()), LATENCY_BUCKETS)
            .context("histogram buckets")?
            .install_recorder()
            .context("installing the metrics recorder")?;
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .with_context(|| format!("resolving {addr}"))?
            .collect();
        let listener =
            TcpListener::bind(&addrs[..]).with_context(|| format!("binding metrics on {addr}"))?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("thaw-metrics".into())
            .spawn(move || serve(&listener, &handle, engine.as_deref(), &stop2))
            .context("starting the metrics thread")?;
        Ok(Self {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    listener: &TcpListener,
    handle: &PrometheusHandle,
    engine: Option<&Engine>,
    stop: &AtomicBool,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut conn) = conn else {
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        if let Some(e) = engine {
            sample_engine(e);
        }
        handle.run_upkeep();
        let body = handle.render();
        if let Err(e) = answer(&mut conn, &body) {
            tracing::debug!(error = %e, "metrics: scrape failed");
        }
    }
}

/// Reads the request head (bounded, with a deadline) and writes the exposition.
fn answer(conn: &mut TcpStream, body: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

fn sample_engine(engine: &Engine) {
    let s = engine.stats();
    for (name, v) in [
        ("thaw_engine_misses_total", s.misses),
        ("thaw_engine_sessions_total", s.sessions),
        ("thaw_engine_store_requests_total", s.store_requests),
        ("thaw_engine_store_bytes_total", s.store_bytes),
        ("thaw_engine_cache_dir_hits_total", s.cache_dir_hits),
        ("thaw_engine_shared_cache_hits_total", s.shared_cache_hits),
        ("thaw_engine_retries_total", s.retries),
        ("thaw_engine_readahead_total", s.readahead),
        ("thaw_engine_fetch_errors_total", s.fetch_errors),
        ("thaw_engine_filled_bytes_total", s.filled_bytes),
    ] {
        metrics::counter!(name).absolute(v);
    }
}
