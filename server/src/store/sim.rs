//! The simulated store (`sim:`): another store behind a simulated network, for tests and
//! benchmarks.
//!
//! `sim:ttfb=20ms,bw=100MB/s,inner=file:///dir` wraps the store named by `inner` (any URL that
//! [`open_store`] accepts, another `sim:` included). Every read request sleeps its time to first
//! byte, then delivers its body in `chunk`-sized steps paced by one simulated link of bandwidth
//! `bw` shared by all requests on the store (a token bucket refilling at `bw`, kept as a schedule
//! of absolute deadlines), reporting progress after each step. Faults (request failures, truncated
//! bodies, stalls) are injected with configured probabilities from a seeded generator, or forced
//! with [`SimStore::set_fault_mode`] / [`SimStore::inject`]. Counters ([`SimStore::stats`]) tell
//! how many requests of each kind were made, how many bytes were delivered and which faults fired.
//!
//! The URL grammar, the semantics and the mapping of e2b's benchmark parameters are in
//! `docs/sim-store.md`.

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{ObjectInfo, ObjectWriter, PutOptions, Store, StoreError, StoreErrorKind, open_store};

/// Default delivery granularity: 64 KiB.
pub const DEFAULT_CHUNK: usize = 64 * 1024;

/// Default receive window: how far (in bytes) a request that fell behind its schedule may catch
/// up at once (like the data a TCP receive buffer holds for a reader that was not scheduled).
pub const DEFAULT_WINDOW: u64 = 4 << 20;

/// Default pause of a stalled body.
pub const DEFAULT_STALL_FOR: Duration = Duration::from_secs(2);

/// How the bandwidth is shared between concurrent requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pacing {
    /// One link for the whole store: N concurrent requests share `bw`.
    #[default]
    Shared,
    /// Every request is paced at `bw` on its own (e2b's simulated backends).
    PerRequest,
}

/// The parameters of a [`SimStore`] (the `sim:` URL without `inner`).
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Time to first byte of every read, `stat`, `get` and `exists` request (`ttfb=`).
    pub ttfb: Duration,
    /// Uniform extra delay in `[0, jitter]` added to each request's TTFB (`jitter=`).
    pub jitter: Duration,
    /// Bandwidth in bytes per second; `None` is unlimited (`bw=`).
    pub bandwidth: Option<u64>,
    /// Whether the bandwidth is shared by all requests or given to each (`pacing=`).
    pub pacing: Pacing,
    /// Delivery granularity in bytes: progress is reported after each step (`chunk=`).
    pub chunk: usize,
    /// Bytes a request may receive at once when it starts on an idle link (`burst=`); `None`
    /// means one chunk (the first step lands at TTFB).
    pub burst: Option<u64>,
    /// Bytes a running request may catch up at once after its reader fell behind (`window=`).
    pub window: u64,
    /// Probability that a request fails with an I/O error before any byte (`fail=`).
    pub fail: f64,
    /// Probability that a body stops early: a prefix is delivered, then the request fails with
    /// [`StoreErrorKind::Truncated`] (`truncate=`).
    pub truncate: f64,
    /// Probability that a body pauses for `stall_for` part-way (`stall=`).
    pub stall: f64,
    /// Length of a stall (`stall_for=`).
    pub stall_for: Duration,
    /// Seed of the fault generator (`seed=`); `None` picks a random seed (see [`SimStore::seed`]).
    pub seed: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            ttfb: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth: None,
            pacing: Pacing::Shared,
            chunk: DEFAULT_CHUNK,
            burst: None,
            window: DEFAULT_WINDOW,
            fail: 0.0,
            truncate: 0.0,
            stall: 0.0,
            stall_for: DEFAULT_STALL_FOR,
            seed: None,
        }
    }
}

impl SimConfig {
    /// e2b's simulated GCS: 20 ms TTFB, 100 MB/s.
    pub fn gcs() -> Self {
        Self {
            ttfb: Duration::from_millis(20),
            bandwidth: Some(100_000_000),
            ..Self::default()
        }
    }

    /// e2b's simulated NFS: 1 ms TTFB, 500 MB/s.
    pub fn nfs() -> Self {
        Self {
            ttfb: Duration::from_millis(1),
            bandwidth: Some(500_000_000),
            ..Self::default()
        }
    }

    /// Parses the part of a `sim:` URL after the scheme: comma-separated `key=value` pairs,
    /// `inner=URL` last (its value runs to the end, commas included). Returns the configuration
    /// and the inner URL; the error is a human-readable reason.
    pub fn parse(params: &str) -> Result<(Self, String), String> {
        let mut config = Self::default();
        let mut seen: Vec<&str> = Vec::new();
        let mut rest = params;
        loop {
            if rest.is_empty() {
                return Err("missing inner=URL (the store to wrap), e.g. \
                     sim:ttfb=20ms,bw=100MB/s,inner=file:///dir"
                    .to_owned());
            }
            if let Some(inner) = rest.strip_prefix("inner=") {
                if inner.is_empty() {
                    return Err("inner= needs a store URL".to_owned());
                }
                return Ok((config, inner.to_owned()));
            }
            let (pair, tail) = rest.split_once(',').unwrap_or((rest, ""));
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("parameter {pair:?} is not key=value"))?;
            if seen.contains(&key) {
                return Err(format!("parameter {key:?} given twice"));
            }
            seen.push(key);
            let bad = |what: &str| format!("{key}={value:?}: expected {what}");
            match key {
                "ttfb" => {
                    config.ttfb = parse_duration(value).ok_or_else(|| bad("a duration"))?;
                }
                "jitter" => {
                    config.jitter = parse_duration(value).ok_or_else(|| bad("a duration"))?;
                }
                "stall_for" => {
                    config.stall_for = parse_duration(value).ok_or_else(|| bad("a duration"))?;
                }
                "bw" => {
                    config.bandwidth = if value == "unlimited" {
                        None
                    } else {
                        let bw = parse_bandwidth(value)
                            .filter(|&bw| bw > 0)
                            .ok_or_else(|| bad("a positive bandwidth or unlimited"))?;
                        Some(bw)
                    };
                }
                "pacing" => {
                    config.pacing = match value {
                        "shared" => Pacing::Shared,
                        "request" => Pacing::PerRequest,
                        _ => return Err(bad("shared or request")),
                    };
                }
                "chunk" => {
                    config.chunk = parse_size(value)
                        .and_then(|n| usize::try_from(n).ok())
                        .filter(|&n| n > 0)
                        .ok_or_else(|| bad("a positive size"))?;
                }
                "burst" => {
                    let burst = parse_size(value)
                        .and_then(|n| u64::try_from(n).ok())
                        .ok_or_else(|| bad("a size"))?;
                    config.burst = Some(burst);
                }
                "window" => {
                    config.window = parse_size(value)
                        .and_then(|n| u64::try_from(n).ok())
                        .ok_or_else(|| bad("a size"))?;
                }
                "fail" => config.fail = parse_probability(value).ok_or_else(|| bad(PROB))?,
                "truncate" => {
                    config.truncate = parse_probability(value).ok_or_else(|| bad(PROB))?;
                }
                "stall" => config.stall = parse_probability(value).ok_or_else(|| bad(PROB))?,
                "seed" => {
                    config.seed = Some(value.parse::<u64>().map_err(|_| bad("an integer"))?);
                }
                _ => {
                    return Err(format!(
                        "unknown parameter {key:?} (known: ttfb, jitter, bw, pacing, chunk, \
                         burst, window, fail, truncate, stall, stall_for, seed, inner)"
                    ));
                }
            }
            rest = tail;
        }
    }

    /// The initial allowance in bytes.
    fn burst_bytes(&self) -> u64 {
        self.burst
            .unwrap_or_else(|| u64::try_from(self.chunk).unwrap_or(u64::MAX))
    }
}

const PROB: &str = "a probability between 0 and 1";

/// The canonical parameter list (without `inner`), as it appears in [`SimStore`]'s URL.
impl fmt::Display for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ttfb={}", FmtDuration(self.ttfb))?;
        if !self.jitter.is_zero() {
            write!(f, ",jitter={}", FmtDuration(self.jitter))?;
        }
        match self.bandwidth {
            Some(bw) => write!(f, ",bw={}/s", FmtSize(u128::from(bw), true))?,
            None => f.write_str(",bw=unlimited")?,
        }
        if self.pacing == Pacing::PerRequest {
            f.write_str(",pacing=request")?;
        }
        let chunk = u128::try_from(self.chunk).unwrap_or(u128::MAX);
        write!(f, ",chunk={}", FmtSize(chunk, false))?;
        if let Some(burst) = self.burst {
            write!(f, ",burst={}", FmtSize(u128::from(burst), false))?;
        }
        if self.window != DEFAULT_WINDOW {
            write!(f, ",window={}", FmtSize(u128::from(self.window), false))?;
        }
        if self.fail > 0.0 {
            write!(f, ",fail={}", self.fail)?;
        }
        if self.truncate > 0.0 {
            write!(f, ",truncate={}", self.truncate)?;
        }
        if self.stall > 0.0 {
            write!(
                f,
                ",stall={},stall_for={}",
                self.stall,
                FmtDuration(self.stall_for)
            )?;
        }
        if let Some(seed) = self.seed {
            write!(f, ",seed={seed}")?;
        }
        Ok(())
    }
}

struct FmtDuration(Duration);

impl fmt::Display for FmtDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0.as_nanos();
        for (unit, scale) in [("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)] {
            if ns != 0 && ns.is_multiple_of(scale) {
                return write!(f, "{}{unit}", ns / scale);
            }
        }
        if ns == 0 {
            f.write_str("0ms")
        } else {
            write!(f, "{ns}ns")
        }
    }
}

/// A byte count with the largest exact unit (decimal units when `decimal`, else binary).
struct FmtSize(u128, bool);

impl fmt::Display for FmtSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units: [(&str, u128); 3] = if self.1 {
            [("GB", 1_000_000_000), ("MB", 1_000_000), ("KB", 1_000)]
        } else {
            [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        };
        for (unit, scale) in units {
            if self.0 != 0 && self.0.is_multiple_of(scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}B", self.0)
    }
}

const TIME_UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
];

const SIZE_UNITS: &[(&str, u128)] = &[
    ("B", 1),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
];

/// `20ms`, `1.5s`, `250us`: a decimal number and a unit (no floating point involved).
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let ns = parse_scaled(text, TIME_UNITS)?;
    Some(Duration::from_nanos(u64::try_from(ns).ok()?))
}

/// `64KiB`, `1MB`, `4096B`.
fn parse_size(text: &str) -> Option<u128> {
    parse_scaled(text, SIZE_UNITS)
}

/// `100MB/s`, `1.5GiB/s`: a size per second.
fn parse_bandwidth(text: &str) -> Option<u64> {
    let size = text.strip_suffix("/s")?;
    u64::try_from(parse_size(size)?).ok()
}

/// A decimal number (`12`, `0.5`, `.25`) followed by exactly one of `units`, scaled by the unit
/// and rounded down.
fn parse_scaled(text: &str, units: &[(&str, u128)]) -> Option<u128> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = units.iter().find(|(u, _)| *u == unit)?.1;
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if frac.len() > 18 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let frac_scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let whole = int.checked_mul(scale)?;
    let part = frac_value.checked_mul(scale)? / frac_scale;
    whole.checked_add(part)
}

/// A probability written as a decimal number in `[0, 1]`.
fn parse_probability(text: &str) -> Option<f64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let p: f64 = text.parse().ok()?;
    (p.is_finite() && (0.0..=1.0).contains(&p)).then_some(p)
}

/// A kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The request fails with [`StoreErrorKind::Io`] after its TTFB, before any byte.
    Fail,
    /// The body stops early: a prefix is delivered (and reported), then the request fails with
    /// [`StoreErrorKind::Truncated`]. Applies to requests with a body (reads and `get`).
    Truncate,
    /// The body pauses for `stall_for` part-way, then completes. Applies to requests with a body.
    Stall,
}

impl FaultKind {
    fn to_u8(self) -> u8 {
        match self {
            Self::Fail => 1,
            Self::Truncate => 2,
            Self::Stall => 3,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Fail),
            2 => Some(Self::Truncate),
            3 => Some(Self::Stall),
            _ => None,
        }
    }
}

/// The runtime fault switch ([`SimStore::set_fault_mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultMode {
    /// Faults fire with the probabilities of the configuration (the default).
    #[default]
    Random,
    /// No faults at all, whatever the configuration says.
    Off,
    /// Every request fails (before any byte).
    FailAll,
    /// Every body is truncated (requests without a body are unaffected).
    TruncateAll,
    /// Every body stalls for `stall_for` (requests without a body are unaffected).
    StallAll,
}

impl FaultMode {
    fn to_u8(self) -> u8 {
        match self {
            Self::Random => 0,
            Self::Off => 1,
            Self::FailAll => 2,
            Self::TruncateAll => 3,
            Self::StallAll => 4,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Off,
            2 => Self::FailAll,
            3 => Self::TruncateAll,
            4 => Self::StallAll,
            _ => Self::Random,
        }
    }
}

/// A snapshot of a [`SimStore`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimStats {
    /// `read_range` and `read_range_progress` requests.
    pub reads: u64,
    /// `stat` requests.
    pub stats: u64,
    /// `get` requests.
    pub gets: u64,
    /// `exists` requests.
    pub exists: u64,
    /// `put` requests.
    pub puts: u64,
    /// `create` requests.
    pub creates: u64,
    /// Body bytes delivered to callers (reads and `get`, truncated prefixes included).
    pub bytes_delivered: u64,
    /// Injected request failures.
    pub faults_failed: u64,
    /// Injected truncations.
    pub faults_truncated: u64,
    /// Injected stalls.
    pub faults_stalled: u64,
    /// Requests in flight now (those that pay TTFB: reads, `stat`, `get`, `exists`).
    pub in_flight: u64,
    /// The most requests ever in flight at once.
    pub in_flight_max: u64,
}

impl SimStats {
    /// All requests, every operation.
    pub fn requests(&self) -> u64 {
        [
            self.reads,
            self.stats,
            self.gets,
            self.exists,
            self.puts,
            self.creates,
        ]
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b))
    }

    /// All injected faults.
    pub fn faults(&self) -> u64 {
        self.faults_failed
            .saturating_add(self.faults_truncated)
            .saturating_add(self.faults_stalled)
    }
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    stats: AtomicU64,
    gets: AtomicU64,
    exists: AtomicU64,
    puts: AtomicU64,
    creates: AtomicU64,
    bytes_delivered: AtomicU64,
    faults_failed: AtomicU64,
    faults_truncated: AtomicU64,
    faults_stalled: AtomicU64,
    in_flight: AtomicU64,
    in_flight_max: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Decrements the in-flight counter when the request ends, however it ends.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The faults one request will suffer, drawn before it starts.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Extra TTFB from jitter.
    jitter: Duration,
    fail: bool,
    /// Truncation point as a fraction of the body (`r / 2^64`).
    truncate: Option<u64>,
    /// Stall point as a fraction of the body.
    stall: Option<u64>,
}

/// A store behind a simulated network: TTFB, shared bandwidth, injected faults, counters.
#[derive(Debug)]
pub struct SimStore {
    inner: Arc<dyn Store>,
    config: SimConfig,
    url: String,
    /// The effective fault seed (the configured one, or a random one).
    seed: u64,
    /// Time origin of `link_free`.
    epoch: Instant,
    /// The shared link's schedule: the instant (ns since `epoch`) at which it has sent every
    /// byte reserved so far. A step of `n` bytes is scheduled from `max(link_free, earliest)` to
    /// that plus `n/bw`, and delivered at its end (see [`SimStore::deliver`]).
    link_free: AtomicU64,
    /// `burst` in link time (ns).
    burst_ns: u64,
    /// `window` in link time (ns).
    window_ns: u64,
    mode: AtomicU8,
    forced_kind: AtomicU8,
    forced_left: AtomicU64,
    /// Requests that drew a fault plan (each gets its own generator, seeded from `seed` and this).
    fault_seq: AtomicU64,
    counters: Counters,
}

impl SimStore {
    /// Wraps `inner` with the simulated network described by `config`.
    pub fn new(inner: Arc<dyn Store>, config: SimConfig) -> Self {
        let seed = config.seed.unwrap_or_else(rand::random);
        let url = format!("sim:{config},inner={}", inner.url());
        let (burst_ns, window_ns) = match config.bandwidth {
            Some(bw) => (
                nanos_for(config.burst_bytes(), bw),
                nanos_for(config.window, bw),
            ),
            None => (0, 0),
        };
        Self {
            inner,
            config,
            url,
            seed,
            epoch: Instant::now(),
            link_free: AtomicU64::new(0),
            burst_ns,
            window_ns,
            mode: AtomicU8::new(FaultMode::Random.to_u8()),
            forced_kind: AtomicU8::new(0),
            forced_left: AtomicU64::new(0),
            fault_seq: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// Opens `sim:PARAMS,inner=URL` (the inner store through [`open_store`]).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let invalid = |detail: String| StoreError::new(StoreErrorKind::InvalidUrl, url, "", detail);
        let params = url
            .strip_prefix("sim:")
            .ok_or_else(|| invalid("a simulated store URL starts with sim:".to_owned()))?;
        let (config, inner_url) = SimConfig::parse(params).map_err(invalid)?;
        let inner = open_store(&inner_url)?;
        Ok(Self::new(inner, config))
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// The effective fault seed: the configured `seed=`, or the random one picked at creation
    /// (pass it as `seed=` to replay a run's fault sequence).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SimStats {
            reads: get(&c.reads),
            stats: get(&c.stats),
            gets: get(&c.gets),
            exists: get(&c.exists),
            puts: get(&c.puts),
            creates: get(&c.creates),
            bytes_delivered: get(&c.bytes_delivered),
            faults_failed: get(&c.faults_failed),
            faults_truncated: get(&c.faults_truncated),
            faults_stalled: get(&c.faults_stalled),
            in_flight: get(&c.in_flight),
            in_flight_max: get(&c.in_flight_max),
        }
    }

    /// Zeroes the counters (the in-flight maximum restarts from the requests in flight now).
    pub fn reset_stats(&self) {
        let c = &self.counters;
        for a in [
            &c.reads,
            &c.stats,
            &c.gets,
            &c.exists,
            &c.puts,
            &c.creates,
            &c.bytes_delivered,
            &c.faults_failed,
            &c.faults_truncated,
            &c.faults_stalled,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        c.in_flight_max
            .store(c.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Sets the fault switch for the requests that start from now on.
    pub fn set_fault_mode(&self, mode: FaultMode) {
        self.mode.store(mode.to_u8(), Ordering::SeqCst);
    }

    /// The current fault switch.
    pub fn fault_mode(&self) -> FaultMode {
        FaultMode::from_u8(self.mode.load(Ordering::SeqCst))
    }

    /// Forces `kind` on the next `count` requests it applies to (any paced request for
    /// [`FaultKind::Fail`], requests with a body otherwise), before the fault mode is consulted;
    /// replaces any earlier injection. `count == 0` cancels.
    pub fn inject(&self, kind: FaultKind, count: u64) {
        self.forced_left.store(0, Ordering::SeqCst);
        self.forced_kind.store(kind.to_u8(), Ordering::SeqCst);
        self.forced_left.store(count, Ordering::SeqCst);
    }

    fn err(&self, kind: StoreErrorKind, key: &str, detail: impl Into<String>) -> StoreError {
        StoreError::new(kind, self.url.clone(), key, detail)
    }

    fn in_flight(&self) -> InFlight<'_> {
        let c = &self.counters;
        let now = c
            .in_flight
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        c.in_flight_max.fetch_max(now, Ordering::Relaxed);
        InFlight(&c.in_flight)
    }

    /// A forced fault for this request, if an injection applies (consuming one of its count).
    fn take_forced(&self, has_body: bool) -> Option<FaultKind> {
        let kind = FaultKind::from_u8(self.forced_kind.load(Ordering::SeqCst))?;
        if kind != FaultKind::Fail && !has_body {
            return None;
        }
        self.forced_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .ok()
            .map(|_| kind)
    }

    /// Draws this request's jitter and faults.
    fn plan(&self, has_body: bool) -> Plan {
        let seq = self.fault_seq.fetch_add(1, Ordering::Relaxed);
        let mut rng = SmallRng::seed_from_u64(self.seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // Always draw the same values, so a request's outcome depends only on (seed, seq).
        let jitter_ns = u64::try_from(self.config.jitter.as_nanos()).unwrap_or(u64::MAX);
        let jitter = Duration::from_nanos(rng.random_range(0..=jitter_ns));
        let (p_fail, p_truncate, p_stall): (f64, f64, f64) =
            (rng.random(), rng.random(), rng.random());
        let (truncate_at, stall_at): (u64, u64) = (rng.random(), rng.random());
        let random = Plan {
            jitter,
            fail: p_fail < self.config.fail,
            truncate: (has_body && p_truncate < self.config.truncate).then_some(truncate_at),
            stall: (has_body && p_stall < self.config.stall).then_some(stall_at),
        };
        let forced = |kind: FaultKind| Plan {
            jitter,
            fail: kind == FaultKind::Fail,
            truncate: (kind == FaultKind::Truncate).then_some(truncate_at),
            stall: (kind == FaultKind::Stall).then_some(stall_at),
        };
        if let Some(kind) = self.take_forced(has_body) {
            return forced(kind);
        }
        match self.fault_mode() {
            FaultMode::Random => random,
            FaultMode::Off => forced_none(jitter),
            FaultMode::FailAll => forced(FaultKind::Fail),
            FaultMode::TruncateAll if has_body => forced(FaultKind::Truncate),
            FaultMode::StallAll if has_body => forced(FaultKind::Stall),
            FaultMode::TruncateAll | FaultMode::StallAll => forced_none(jitter),
        }
    }

    /// Waits out the request's TTFB (from `start`) and injects a request failure if planned.
    fn first_byte(&self, key: &str, start: Instant, plan: &Plan) -> Result<(), StoreError> {
        let ttfb = self.config.ttfb.saturating_add(plan.jitter);
        sleep_until(start.checked_add(ttfb).unwrap_or(start));
        if plan.fail {
            bump(&self.counters.faults_failed);
            return Err(self.err(
                StoreErrorKind::Io,
                key,
                "simulated request failure (injected fault)",
            ));
        }
        Ok(())
    }

    /// Nanoseconds since `epoch`.
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn at_ns(&self, ns: u64) -> Instant {
        self.epoch
            .checked_add(Duration::from_nanos(ns))
            .unwrap_or_else(Instant::now)
    }

    /// Schedules `cost` ns of link time starting no earlier than `earliest` on the shared link:
    /// the end of the slot (ns since `epoch`).
    fn reserve_shared(&self, earliest: u64, cost: u64) -> u64 {
        let mut cur = self.link_free.load(Ordering::Relaxed);
        loop {
            let end = cur.max(earliest).saturating_add(cost);
            match self.link_free.compare_exchange_weak(
                cur,
                end,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return end,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Delivers a body of `len` bytes: `fill(from, to)` produces bytes `[from, to)`, each step is
    /// paced by the link and reported to `progress`; applies the plan's truncation and stall.
    fn deliver(
        &self,
        key: &str,
        len: usize,
        plan: &Plan,
        fill: &mut dyn FnMut(usize, usize) -> Result<(), StoreError>,
        progress: &mut dyn FnMut(usize) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let cut = plan.truncate.map(|r| fraction_of(r, len));
        let limit = cut.unwrap_or(len);
        let mut stall_at = plan.stall.map(|r| fraction_of(r, len));
        // The end of this request's previous step (link time, ns since `epoch`), and its private
        // link for per-request pacing.
        let mut prev_end: Option<u64> = None;
        let mut own_link = 0u64;
        let mut pos = 0usize;
        while pos < limit {
            let end = pos.saturating_add(self.config.chunk).min(limit);
            if stall_at.is_some_and(|at| at < end) {
                stall_at = None;
                bump(&self.counters.faults_stalled);
                let stall_start = Instant::now();
                sleep_until(
                    stall_start
                        .checked_add(self.config.stall_for)
                        .unwrap_or(stall_start),
                );
                // The link did not send this body during the stall: no catching up over it.
                prev_end = None;
            }
            let n = end.saturating_sub(pos);
            let deadline = self.config.bandwidth.map(|bw| {
                let cost = nanos_for(u64::try_from(n).unwrap_or(u64::MAX), bw);
                let now = self.now_ns();
                // A running request continues right after its previous step, even if its reader
                // woke late (up to `window` behind); a new one may start `burst` early.
                let earliest = match prev_end {
                    Some(prev) => prev.max(now.saturating_sub(self.window_ns)),
                    None => now.saturating_sub(self.burst_ns),
                };
                let slot_end = match self.config.pacing {
                    Pacing::Shared => self.reserve_shared(earliest, cost),
                    Pacing::PerRequest => {
                        own_link = own_link.max(earliest).saturating_add(cost);
                        own_link
                    }
                };
                prev_end = Some(slot_end);
                self.at_ns(slot_end)
            });
            fill(pos, end)?;
            if let Some(deadline) = deadline {
                sleep_until(deadline);
            }
            self.counters
                .bytes_delivered
                .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
            if progress(end).is_break() {
                return Ok(());
            }
            pos = end;
        }
        if let Some(cut) = cut {
            bump(&self.counters.faults_truncated);
            return Err(self.err(
                StoreErrorKind::Truncated,
                key,
                format!(
                    "simulated truncated body: {cut} of {len} bytes delivered (injected fault)"
                ),
            ));
        }
        if len == 0 {
            let _ = progress(0);
        }
        Ok(())
    }
}

fn forced_none(jitter: Duration) -> Plan {
    Plan {
        jitter,
        fail: false,
        truncate: None,
        stall: None,
    }
}

/// `r / 2^64` of `len`: a position in `[0, len)` (0 when `len == 0`).
fn fraction_of(r: u64, len: usize) -> usize {
    let len128 = u128::try_from(len).unwrap_or(u128::MAX);
    usize::try_from((u128::from(r).saturating_mul(len128)) >> 64).unwrap_or(0)
}

/// Nanoseconds to transfer `bytes` at `bw` bytes per second (rounded up).
fn nanos_for(bytes: u64, bw: u64) -> u64 {
    let bw = u128::from(bw.max(1));
    let ns = (u128::from(bytes) * 1_000_000_000).div_ceil(bw);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Sleeps until `deadline` (absolute, so oversleeping one step does not delay the next).
fn sleep_until(deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep(deadline.saturating_duration_since(now));
    }
}

impl Store for SimStore {
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
        let start = Instant::now();
        bump(&self.counters.reads);
        let _in_flight = self.in_flight();
        let plan = self.plan(true);
        let len = buf.len();
        if offset
            .checked_add(u64::try_from(len).unwrap_or(u64::MAX))
            .is_none()
        {
            return Err(self.err(
                StoreErrorKind::InvalidKey,
                key,
                format!("range at {offset} of {len} bytes overflows"),
            ));
        }
        self.first_byte(key, start, &plan)?;
        if len == 0 {
            // Let the inner store say whether the object exists.
            self.inner.read_range(key, offset, buf)?;
        }
        let inner = &self.inner;
        let mut fill = |from: usize, to: usize| -> Result<(), StoreError> {
            let at = offset.saturating_add(u64::try_from(from).unwrap_or(u64::MAX));
            let dst = buf.get_mut(from..to).ok_or_else(|| {
                StoreError::new(StoreErrorKind::Io, inner.url(), key, "step out of range")
            })?;
            inner.read_range(key, at, dst)
        };
        self.deliver(key, len, &plan, &mut fill, &mut |n| {
            progress(n);
            ControlFlow::Continue(())
        })
    }

    /// Paced like [`Store::read_range_progress`]: each step is read from the inner store and
    /// handed to `sink` when the simulated link delivers it.
    fn read_stream(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        let start = Instant::now();
        bump(&self.counters.reads);
        let _in_flight = self.in_flight();
        let plan = self.plan(true);
        let total = usize::try_from(len).map_err(|_| {
            self.err(
                StoreErrorKind::TooLarge,
                key,
                "range does not fit in memory",
            )
        })?;
        if offset.checked_add(len).is_none() {
            return Err(self.err(
                StoreErrorKind::InvalidKey,
                key,
                format!("range at {offset} of {len} bytes overflows"),
            ));
        }
        self.first_byte(key, start, &plan)?;
        if total == 0 {
            self.inner.read_range(key, offset, &mut [])?;
            return Ok(0);
        }
        let step = std::cell::RefCell::new((vec![0u8; self.config.chunk.min(total)], 0usize));
        let inner = &self.inner;
        let mut fill = |from: usize, to: usize| -> Result<(), StoreError> {
            let at = offset.saturating_add(u64::try_from(from).unwrap_or(u64::MAX));
            let mut step = step.borrow_mut();
            let (buf, filled) = &mut *step;
            let n = to.saturating_sub(from);
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let dst = buf.get_mut(..n).unwrap_or_default();
            inner.read_range(key, at, dst)?;
            *filled = n;
            Ok(())
        };
        let mut delivered = 0u64;
        let mut progress = |end: usize| {
            let step = step.borrow();
            let (buf, filled) = &*step;
            delivered = u64::try_from(end).unwrap_or(u64::MAX);
            sink(buf.get(..*filled).unwrap_or_default())
        };
        self.deliver(key, total, &plan, &mut fill, &mut progress)?;
        Ok(delivered)
    }

    fn stat(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        let start = Instant::now();
        bump(&self.counters.stats);
        let _in_flight = self.in_flight();
        let plan = self.plan(false);
        self.first_byte(key, start, &plan)?;
        self.inner.stat(key)
    }

    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>, StoreError> {
        let start = Instant::now();
        bump(&self.counters.gets);
        let _in_flight = self.in_flight();
        let plan = self.plan(true);
        self.first_byte(key, start, &plan)?;
        let data = self.inner.get(key, max_len)?;
        self.deliver(key, data.len(), &plan, &mut |_, _| Ok(()), &mut |_| {
            ControlFlow::Continue(())
        })?;
        Ok(data)
    }

    fn put(&self, key: &str, data: &[u8], opts: &PutOptions) -> Result<(), StoreError> {
        bump(&self.counters.puts);
        self.inner.put(key, data, opts)
    }

    fn create(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        bump(&self.counters.creates);
        self.inner.create(key, opts)
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let start = Instant::now();
        bump(&self.counters.exists);
        let _in_flight = self.in_flight();
        let plan = self.plan(false);
        self.first_byte(key, start, &plan)?;
        self.inner.exists(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_units() {
        assert_eq!(parse_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration(".25ms"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("0ms"), Some(Duration::ZERO));
        for bad in ["20", "ms", "1.2.3ms", "-1ms", "20 ms", "20MS", ".ms", ""] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_bandwidth("100MB/s"), Some(100_000_000));
        assert_eq!(parse_bandwidth("1.5GiB/s"), Some(3 << 29));
        assert_eq!(parse_bandwidth("100MB"), None);
        assert_eq!(parse_size("64KiB"), Some(65_536));
        assert_eq!(
            parse_size("99999999999999999999999999999999999999999GiB"),
            None
        );
        assert_eq!(parse_probability("0.01"), Some(0.01));
        for bad in ["1.5", "-0.1", "nan", "inf", "1e-3", ""] {
            assert_eq!(parse_probability(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn positions_and_costs() {
        assert_eq!(fraction_of(0, 100), 0);
        assert_eq!(fraction_of(u64::MAX, 100), 99);
        assert_eq!(fraction_of(u64::MAX, 0), 0);
        assert_eq!(nanos_for(100_000_000, 100_000_000), 1_000_000_000);
        assert_eq!(nanos_for(1, 3), 333_333_334);
    }

    #[test]
    fn display_round_trips() {
        let (config, inner) = SimConfig::parse(
            "ttfb=20ms,jitter=5ms,bw=100MB/s,pacing=request,chunk=64KiB,burst=1MiB,window=8MiB,\
             fail=0.01,\
             truncate=0.02,stall=0.03,stall_for=2s,seed=7,inner=file:///a,b",
        )
        .unwrap();
        assert_eq!(inner, "file:///a,b");
        let text = format!("{config},inner={inner}");
        assert_eq!(SimConfig::parse(&text).unwrap(), (config, inner));
    }
}
