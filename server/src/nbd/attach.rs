//! Kernel attach (`thaw serve --attach /dev/nbdN|auto`): the kernel's nbd driver is configured
//! over generic netlink to use socketpairs whose other ends thaw serves, already in the
//! transmission phase (the kernel speaks no handshake: `NBD_CMD_CONNECT` hands it the size,
//! block size and transmission flags directly).
//!
//! ```text
//! resolve the "nbd" genl family (CTRL_CMD_GETFAMILY)
//! pick the device: /dev/nbdN if free, or the lowest free one (auto); see `busy_reasons`
//! N x socketpair(AF_UNIX, SOCK_STREAM): server end -> Server::serve_negotiated
//! NBD_CMD_CONNECT  INDEX, SIZE_BYTES, BLOCK_SIZE_BYTES, SERVER_FLAGS, TIMEOUT,
//!                  DEAD_CONN_TIMEOUT, SOCKETS { SOCK_ITEM { SOCK_FD }... }
//! ...serve...
//! NBD_CMD_DISCONNECT INDEX       (SIGTERM/SIGINT, drop, failed start, DELETE over the API)
//! ```
//!
//! [`Target::resolve`] is the first half (options, netlink, the driver, the free-device rule:
//! nothing configured yet), [`Target::connect`] the second (socketpairs, `NBD_CMD_CONNECT`);
//! `thaw serve --attach` runs both at start, the control API (`POST /v1/exports` with `attach`)
//! runs the first before it opens the export and the second once the export joined the set.
//!
//! No `unsafe`: the netlink socket is rustix's, the messages are laid out here by hand (the
//! layout is unit-tested below), and the kernel reads the socket fds as plain integers in the
//! calling process's fd table (no `SCM_RIGHTS`). See `docs/nbd-server.md`.

use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};
use thaw_codec::nbd::Negotiated;
use thaw_codec::nbd::consts::{
    TFLAG_CAN_MULTI_CONN, TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_ROTATIONAL, TFLAG_SEND_FLUSH,
    TFLAG_SEND_FUA, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};

use super::{Export, KernelConns, Server};

/// The generic netlink family of the nbd driver (`include/uapi/linux/nbd-netlink.h`).
pub const NBD_GENL_FAMILY: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;

/// `NBD_CMD_*` of the nbd genl family.
pub const NBD_CMD_CONNECT: u8 = 1;
/// Disconnects a device.
pub const NBD_CMD_DISCONNECT: u8 = 2;

/// `NBD_ATTR_*` (u32 index, u64 everything else but the nested socket list).
pub const NBD_ATTR_INDEX: u16 = 1;
/// Device size in bytes (u64).
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
/// Logical block size in bytes (u64).
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
/// I/O timeout in seconds (u64).
pub const NBD_ATTR_TIMEOUT: u16 = 4;
/// The export's transmission flags (u64).
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
/// `NBD_CFLAG_*` (u64).
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
/// Nested: one `NBD_SOCK_ITEM` per connection.
pub const NBD_ATTR_SOCKETS: u16 = 7;
/// Seconds the kernel waits for a reconnection after a connection dies (u64).
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
/// Nested item of `NBD_ATTR_SOCKETS`.
pub const NBD_SOCK_ITEM: u16 = 1;
/// The socket's fd in the sender's fd table (u32), inside an `NBD_SOCK_ITEM`.
pub const NBD_SOCK_FD: u16 = 1;

// netlink / genetlink ABI (include/uapi/linux/{netlink,genetlink}.h).
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// The transmission flags the kernel's nbd client understands (it ignores the others, and never
/// negotiates structured replies, so `SEND_DF`, `SEND_CACHE` and `SEND_FAST_ZERO` are dropped).
pub const KERNEL_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_READ_ONLY
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_ROTATIONAL
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One generic netlink request being laid out: `nlmsghdr`, `genlmsghdr`, then attributes
/// (each `nlattr` header + payload, padded to 4 bytes; nests carry `NLA_F_NESTED`).
#[derive(Debug)]
pub struct GenlMsg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl GenlMsg {
    /// A request `cmd` (version `version`) to family `family`, sequence `seq`, with
    /// `NLM_F_REQUEST | NLM_F_ACK`.
    pub fn new(family: u16, cmd: u8, version: u8, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Self {
            buf,
            nests: Vec::new(),
        }
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) {
        let len = u16::try_from(NLA_HDRLEN + payload.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// A u32 attribute.
    pub fn put_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    /// A u64 attribute.
    pub fn put_u64(&mut self, ty: u16, v: u64) {
        self.attr(ty, &v.to_ne_bytes());
    }

    /// A NUL-terminated string attribute.
    pub fn put_str(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v);
    }

    /// Opens a nested attribute (closed by [`GenlMsg::end_nest`]).
    pub fn begin_nest(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    /// Closes the innermost open nest: its length covers everything added since.
    pub fn end_nest(&mut self) {
        if let Some(start) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    /// The message bytes (open nests are closed, `nlmsg_len` set).
    pub fn finish(mut self) -> Vec<u8> {
        while !self.nests.is_empty() {
            self.end_nest();
        }
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn ne_u16(b: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(..2)?.try_into().ok()?))
}

fn ne_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

/// The attributes in `buf` as `(type without flags, payload)`.
///
/// # Errors
/// An attribute whose length is shorter than its header or runs past the end.
pub fn parse_attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = usize::from(ne_u16(buf).unwrap_or(0));
        let ty = ne_u16(&buf[2..]).unwrap_or(0) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return Err(format!(
                "netlink attribute {ty} of {len} bytes in {} bytes",
                buf.len()
            ));
        }
        out.push((ty, &buf[NLA_HDRLEN..len]));
        buf = buf.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// One message of a netlink reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `NLMSG_ERROR` with error 0 for request `seq`.
    Ack {
        /// The request's sequence number.
        seq: u32,
    },
    /// `NLMSG_ERROR` with a (positive) errno for request `seq`.
    Error {
        /// The request's sequence number.
        seq: u32,
        /// The errno.
        errno: i32,
    },
    /// `NLMSG_DONE`.
    Done,
    /// A data message of family `ty`: the genl command and the attribute bytes.
    Data {
        /// The message type (the family id).
        ty: u16,
        /// Its sequence number.
        seq: u32,
        /// The genl command.
        cmd: u8,
        /// The attributes (see [`parse_attrs`]).
        attrs: &'a [u8],
    },
}

/// Splits a datagram from the kernel into its messages.
///
/// # Errors
/// A truncated or malformed message.
pub fn parse_replies(mut buf: &[u8]) -> Result<Vec<Reply<'_>>, String> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = usize::try_from(ne_u32(buf).unwrap_or(0)).unwrap_or(usize::MAX);
        let ty = ne_u16(&buf[4..]).unwrap_or(0);
        let seq = ne_u32(&buf[8..]).unwrap_or(0);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(format!(
                "netlink message of {len} bytes in {} bytes",
                buf.len()
            ));
        }
        let body = &buf[NLMSG_HDRLEN..len];
        match ty {
            NLMSG_ERROR => {
                let err = body
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(i32::from_ne_bytes)
                    .ok_or("short NLMSG_ERROR")?;
                out.push(if err == 0 {
                    Reply::Ack { seq }
                } else {
                    Reply::Error {
                        seq,
                        errno: err.saturating_neg(),
                    }
                });
            }
            NLMSG_DONE => out.push(Reply::Done),
            _ => {
                if body.len() < GENL_HDRLEN {
                    return Err(format!("genl message of {} bytes", body.len()));
                }
                out.push(Reply::Data {
                    ty,
                    seq,
                    cmd: body[0],
                    attrs: &body[GENL_HDRLEN..],
                });
            }
        }
        buf = buf.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The `NBD_CMD_CONNECT` request: device `index` (`None`: the kernel picks one), `size` bytes of
/// `block_size`, the export's transmission `flags`, timeouts in whole seconds, and the kernel
/// ends of the connections as fd numbers.
#[allow(clippy::too_many_arguments)]
pub fn connect_msg(
    family: u16,
    seq: u32,
    index: Option<u32>,
    size: u64,
    block_size: u64,
    flags: u16,
    io_timeout_secs: u64,
    dead_conn_timeout_secs: u64,
    fds: &[u32],
) -> Vec<u8> {
    let mut m = GenlMsg::new(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, seq);
    if let Some(i) = index {
        m.put_u32(NBD_ATTR_INDEX, i);
    }
    m.put_u64(NBD_ATTR_SIZE_BYTES, size);
    m.put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, block_size);
    m.put_u64(NBD_ATTR_SERVER_FLAGS, u64::from(flags));
    m.put_u64(NBD_ATTR_CLIENT_FLAGS, 0);
    m.put_u64(NBD_ATTR_TIMEOUT, io_timeout_secs);
    m.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout_secs);
    m.begin_nest(NBD_ATTR_SOCKETS);
    for &fd in fds {
        m.begin_nest(NBD_SOCK_ITEM);
        m.put_u32(NBD_SOCK_FD, fd);
        m.end_nest();
    }
    m.end_nest();
    m.finish()
}

/// The `NBD_CMD_DISCONNECT` request for device `index`.
pub fn disconnect_msg(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut m = GenlMsg::new(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, seq);
    m.put_u32(NBD_ATTR_INDEX, index);
    m.finish()
}

/// The `CTRL_CMD_GETFAMILY` request for family `name`.
pub fn getfamily_msg(seq: u32, name: &str) -> Vec<u8> {
    let mut m = GenlMsg::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, seq);
    m.put_str(CTRL_ATTR_FAMILY_NAME, name);
    m.finish()
}

/// A generic netlink socket with the nbd family resolved.
#[derive(Debug)]
pub struct NbdNetlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

/// How long one netlink request may take (the kernel answers at once; this bounds a wedge).
const NETLINK_TIMEOUT: Duration = Duration::from_secs(30);

impl NbdNetlink {
    /// Opens a `NETLINK_GENERIC` socket and resolves the `nbd` family.
    ///
    /// # Errors
    /// No netlink; the nbd driver is not loaded (`modprobe nbd`): [`AttachError::NoDriver`].
    pub fn open() -> anyhow::Result<Self> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(rustix::net::netlink::GENERIC),
        )
        .context("opening a generic netlink socket")?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0)).context("binding netlink")?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(NETLINK_TIMEOUT),
        )
        .context("netlink receive timeout")?;
        let mut nl = Self {
            fd,
            family: 0,
            seq: 1,
        };
        let seq = nl.next_seq();
        let msgs = match nl.request(&getfamily_msg(seq, NBD_GENL_FAMILY), seq) {
            Ok(m) => m,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(AttachError::NoDriver.into());
            }
            Err(e) => {
                return Err(e).context("resolving the generic netlink family \"nbd\"");
            }
        };
        let family = msgs
            .iter()
            .find_map(|(_, attrs)| {
                parse_attrs(attrs).ok()?.into_iter().find_map(|(t, p)| {
                    if t == CTRL_ATTR_FAMILY_ID {
                        ne_u16(p)
                    } else {
                        None
                    }
                })
            })
            .context("CTRL_CMD_GETFAMILY reply without a family id")?;
        nl.family = family;
        Ok(nl)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `msg` (sequence `seq`) and collects the data messages (`cmd`, attribute bytes)
    /// until the kernel's ACK; an error reply is returned as its errno.
    fn request(&mut self, msg: &[u8], seq: u32) -> io::Result<Vec<(u8, Vec<u8>)>> {
        rustix::net::sendto(
            &self.fd,
            msg,
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut data = Vec::new();
        loop {
            let (n, full) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty())?;
            if full > n {
                return Err(io::Error::other(format!(
                    "netlink reply of {full} bytes truncated"
                )));
            }
            let replies = parse_replies(&buf[..n]).map_err(io::Error::other)?;
            for r in replies {
                match r {
                    Reply::Ack { seq: s } if s == seq => return Ok(data),
                    Reply::Error { seq: s, errno } if s == seq => {
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    Reply::Data {
                        seq: s, cmd, attrs, ..
                    } if s == seq => data.push((cmd, attrs.to_vec())),
                    _ => {} // a stale reply of an earlier request
                }
            }
        }
    }

    /// `NBD_CMD_CONNECT` (see [`connect_msg`]); returns the device index (the kernel's reply
    /// names it).
    ///
    /// # Errors
    /// The kernel's errno (`EBUSY`: the device is in use).
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        &mut self,
        index: Option<u32>,
        size: u64,
        block_size: u64,
        flags: u16,
        io_timeout_secs: u64,
        dead_conn_timeout_secs: u64,
        fds: &[u32],
    ) -> io::Result<u32> {
        let seq = self.next_seq();
        let msg = connect_msg(
            self.family,
            seq,
            index,
            size,
            block_size,
            flags,
            io_timeout_secs,
            dead_conn_timeout_secs,
            fds,
        );
        let data = self.request(&msg, seq)?;
        let replied = data.iter().find_map(|(_, attrs)| {
            parse_attrs(attrs)
                .ok()?
                .into_iter()
                .find_map(|(t, p)| if t == NBD_ATTR_INDEX { ne_u32(p) } else { None })
        });
        replied
            .or(index)
            .ok_or_else(|| io::Error::other("NBD_CMD_CONNECT reply without a device index"))
    }

    /// `NBD_CMD_DISCONNECT` of device `index`: the kernel sends `NBD_CMD_DISC` on every
    /// connection, shuts its sockets down and fails what is still queued.
    ///
    /// # Errors
    /// The kernel's errno.
    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        let seq = self.next_seq();
        self.request(&disconnect_msg(self.family, seq, index), seq)
            .map(drop)
    }
}

/// Why a device is not free (one entry per failed rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Busy {
    /// `pid` exists: the device is configured (by this process, when it is still running).
    Connected {
        /// The pid file's content.
        pid: String,
        /// Whether that process exists (checked in `/proc`).
        running: bool,
    },
    /// `size` (in 512-byte sectors) is not 0.
    Size(u64),
    /// `inflight` is not "0 0".
    Inflight(String),
    /// `holders/` is not empty (device-mapper, md, a partition holder...).
    Holders(Vec<String>),
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connected { pid, running: true } => write!(f, "connected by pid {pid}"),
            Self::Connected {
                pid,
                running: false,
            } => write!(
                f,
                "connected by pid {pid}, which is gone (a killed server: `nbd-client -d` \
                 disconnects it)"
            ),
            Self::Size(s) => write!(f, "size {s} sectors"),
            Self::Inflight(s) => write!(f, "inflight {s:?}"),
            Self::Holders(h) => write!(f, "held by {}", h.join(", ")),
        }
    }
}

/// `SYSFS/block/nbdINDEX`.
pub fn device_dir(sysfs: &Path, index: u32) -> PathBuf {
    sysfs.join("block").join(format!("nbd{index}"))
}

/// Why `nbdINDEX` is not free, from sysfs under `sysfs` (normally `/sys`): empty when it is.
/// A device is free only when its `pid` file is absent, `size` is 0, `inflight` reads "0 0" and
/// `holders/` is empty (a device the kernel is still tearing down fails one of these; e2b's
/// reuse race, infra#3652). A device absent from sysfs is free: `NBD_CMD_CONNECT` creates it.
///
/// # Errors
/// A sysfs file that exists but cannot be read or parsed.
pub fn busy_reasons(sysfs: &Path, index: u32) -> io::Result<Vec<Busy>> {
    let dir = device_dir(sysfs, index);
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let read = |name: &str| -> io::Result<Option<String>> {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("{}: {e}", dir.join(name).display()),
            )),
        }
    };
    if let Some(pid) = read("pid")? {
        let running = pid
            .parse::<u32>()
            .is_ok_and(|p| Path::new("/proc").join(p.to_string()).exists());
        out.push(Busy::Connected { pid, running });
    }
    let bad = |what: &str, s: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}/{what}: {s:?}", dir.display()),
        )
    };
    match read("size")? {
        Some(s) => {
            let sectors: u64 = s.parse().map_err(|_| bad("size", &s))?;
            if sectors != 0 {
                out.push(Busy::Size(sectors));
            }
        }
        None => return Err(bad("size", "missing")),
    }
    if let Some(s) = read("inflight")? {
        let n: Vec<u64> = s
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| bad("inflight", &s))?;
        if n.len() != 2 {
            return Err(bad("inflight", &s));
        }
        if n != [0, 0] {
            out.push(Busy::Inflight(format!("{} {}", n[0], n[1])));
        }
    }
    let holders = dir.join("holders");
    if holders.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(&holders)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", holders.display())))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        if !names.is_empty() {
            names.sort();
            out.push(Busy::Holders(names));
        }
    }
    Ok(out)
}

/// The nbd devices present under `SYSFS/block` that are free (see [`busy_reasons`]), lowest
/// index first.
///
/// # Errors
/// `SYSFS/block` cannot be listed; a device's sysfs files cannot be read.
pub fn free_devices(sysfs: &Path) -> io::Result<Vec<u32>> {
    let block = sysfs.join("block");
    let mut idx: Vec<u32> = std::fs::read_dir(&block)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", block.display())))?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?.strip_prefix("nbd")?.parse().ok()
        })
        .collect();
    idx.sort_unstable();
    let mut out = Vec::new();
    for i in idx {
        if busy_reasons(sysfs, i)?.is_empty() {
            out.push(i);
        }
    }
    Ok(out)
}

/// Which device to attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// `/dev/nbdN`.
    Index(u32),
    /// The lowest free one.
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        s.strip_prefix("/dev/nbd")
            .and_then(|n| {
                (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| n.parse().ok())
                    .flatten()
            })
            .map(Self::Index)
            .ok_or_else(|| format!("{s:?}: expected /dev/nbdN or auto"))
    }
}

/// How to attach.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// The device.
    pub device: Device,
    /// Connections (socketpairs); more than one needs `CAN_MULTI_CONN` (thaw advertises it).
    pub connections: usize,
    /// The kernel's I/O timeout (whole seconds, at least 1).
    pub io_timeout: Duration,
    /// How long the kernel waits for a dead connection to come back (whole seconds).
    pub dead_conn_timeout: Duration,
    /// Where sysfs is mounted (`/sys`; a fake tree in tests).
    pub sysfs: PathBuf,
}

/// Most connections per device (the kernel has no hard limit; this bounds fds).
pub const MAX_CONNECTIONS: usize = 64;

/// What the kernel is told about `export`, and the transmission state thaw serves it with: the
/// export's flags less what the kernel does not speak, simple replies, no metadata context.
pub fn kernel_negotiated(export_index: usize, export: &Export) -> Negotiated {
    let c = &export.config;
    Negotiated {
        export_index,
        export_name: c.name.clone(),
        size: c.size,
        transmission_flags: c.transmission_flags(false) & KERNEL_FLAGS,
        block_size: c.block_size,
        structured_replies: false,
        base_allocation: None,
        no_zeroes: false,
    }
}

/// The kernel device's logical block size for an export: the preferred block size when it is
/// 512..=4096 (the kernel takes at most a page) and divides the size, else the largest power of
/// two from 4096 down to 512 that divides it.
///
/// # Errors
/// The size is not a multiple of 512 (the kernel counts 512-byte sectors).
pub fn kernel_block_size(size: u64, preferred: u32) -> anyhow::Result<u64> {
    let p = u64::from(preferred);
    if (512..=4096).contains(&p) && p.is_power_of_two() && size.is_multiple_of(p) {
        return Ok(p);
    }
    for b in [4096u64, 2048, 1024, 512] {
        if size.is_multiple_of(b) {
            return Ok(b);
        }
    }
    bail!("a kernel nbd device needs a size that is a multiple of 512 bytes, not {size}")
}

fn secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A device attached to an export of a running [`Server`]. [`Attached::detach`] (or drop)
/// disconnects it.
#[derive(Debug)]
pub struct Attached {
    nl: NbdNetlink,
    index: u32,
    export: String,
    sysfs: PathBuf,
    connected: bool,
}

impl Attached {
    /// `/dev/nbdN`.
    pub fn device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }

    /// The device index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The export's name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// `NBD_CMD_DISCONNECT`, then waits up to `wait` for the device to be free again. Returns
    /// the reasons it is still busy at the deadline (empty: free), e.g. a mount that still
    /// holds it open (the kernel keeps its configuration until the last opener closes it).
    ///
    /// # Errors
    /// The disconnect failed.
    pub fn detach(mut self, wait: Duration) -> anyhow::Result<Vec<Busy>> {
        self.disconnect()?;
        Ok(self.wait_free(wait))
    }

    /// `NBD_CMD_DISCONNECT`: the kernel sends `NBD_CMD_DISC` on every connection, shuts its
    /// sockets down (the server's ends see EOF) and fails what it still has queued. On an error
    /// the device is still attached (and disconnected on drop).
    ///
    /// # Errors
    /// The kernel's errno.
    pub fn disconnect(&mut self) -> anyhow::Result<()> {
        if !self.connected {
            return Ok(());
        }
        self.nl
            .disconnect(self.index)
            .with_context(|| format!("disconnecting /dev/nbd{}", self.index))?;
        self.connected = false;
        Ok(())
    }

    /// Waits up to `wait` for the device to be free (no pid file, size 0, ...): returns the
    /// reasons it is still busy at the deadline (empty: free).
    pub fn wait_free(&self, wait: Duration) -> Vec<Busy> {
        let deadline = Instant::now() + wait;
        loop {
            let busy = busy_reasons(&self.sysfs, self.index).unwrap_or_default();
            if busy.is_empty() || Instant::now() >= deadline {
                return busy;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.connected
            && let Err(e) = self.nl.disconnect(self.index)
        {
            tracing::warn!(device = self.index, error = %e, "nbd: disconnect failed");
        }
    }
}

/// Why an attach failed, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A bad option or an export the kernel cannot take (its size).
    #[error("{0}")]
    Invalid(String),
    /// The kernel has no nbd driver (the generic netlink family is missing).
    #[error(
        "the kernel has no nbd driver loaded (generic netlink family \"nbd\" not found; \
         modprobe nbd)"
    )]
    NoDriver,
    /// The device asked for is in use.
    #[error("{0}")]
    Busy(String),
    /// `auto` found no free device (or every free one was taken meanwhile).
    #[error("{0}")]
    NoFreeDevice(String),
    /// Netlink, socketpairs, the server, or the kernel's refusal.
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl AttachError {
    fn from_anyhow(e: anyhow::Error) -> Self {
        match e.downcast::<Self>() {
            Ok(a) => a,
            Err(e) => Self::Other(e),
        }
    }
}

/// The first half of an attach: options checked, netlink open, the nbd driver present and the
/// candidate devices free (see [`busy_reasons`]). Nothing is configured yet; [`Target::connect`]
/// does that for an export.
#[derive(Debug)]
pub struct Target {
    nl: NbdNetlink,
    candidates: Vec<u32>,
    device: Device,
    connections: usize,
    io_timeout: u64,
    dead_conn_timeout: u64,
    sysfs: PathBuf,
}

impl Target {
    /// Checks `opts`, opens netlink (the nbd driver must be loaded) and picks the candidate
    /// devices: `/dev/nbdN` if free, else every free one, lowest first (auto).
    ///
    /// # Errors
    /// A bad option; no nbd driver; a busy device; no free device; sysfs unreadable.
    pub fn resolve(opts: &AttachOptions) -> Result<Self, AttachError> {
        if opts.connections == 0 || opts.connections > MAX_CONNECTIONS {
            return Err(AttachError::Invalid(format!(
                "connections {}: expected 1..={MAX_CONNECTIONS}",
                opts.connections
            )));
        }
        let io_timeout = secs(opts.io_timeout);
        if io_timeout == 0 {
            return Err(AttachError::Invalid(
                "the nbd I/O timeout must be at least 1 s (0 means the kernel's 30 s default)"
                    .into(),
            ));
        }
        let nl = NbdNetlink::open().map_err(AttachError::from_anyhow)?;
        let candidates = match opts.device {
            Device::Index(i) => {
                let busy = busy_reasons(&opts.sysfs, i)
                    .map_err(|e| AttachError::Other(anyhow::Error::new(e)))?;
                if !busy.is_empty() {
                    let mut why = String::new();
                    for (n, b) in busy.iter().enumerate() {
                        let _ = write!(why, "{}{b}", if n > 0 { "; " } else { "" });
                    }
                    return Err(AttachError::Busy(format!("/dev/nbd{i} is busy: {why}")));
                }
                vec![i]
            }
            Device::Auto => {
                let free = free_devices(&opts.sysfs)
                    .map_err(|e| AttachError::Other(anyhow::Error::new(e)))?;
                if free.is_empty() {
                    return Err(AttachError::NoFreeDevice(format!(
                        "no free nbd device under {} (all busy, or none: modprobe nbd nbds_max=N)",
                        opts.sysfs.join("block").display()
                    )));
                }
                free
            }
        };
        Ok(Self {
            nl,
            candidates,
            device: opts.device,
            connections: opts.connections,
            io_timeout,
            dead_conn_timeout: secs(opts.dead_conn_timeout),
            sysfs: opts.sysfs.clone(),
        })
    }

    /// Attaches `export` (number `export_index` of its set; informational): hands
    /// `connections` socketpairs' server ends to `conns` in transmission phase and their kernel
    /// ends to `NBD_CMD_CONNECT`. With `Device::Auto` a device the kernel reports busy (a race
    /// with another attacher) is skipped for the next candidate. On an error nothing stays
    /// configured, and the connections already started end (their peers are closed).
    ///
    /// # Errors
    /// An export size the kernel cannot take; the server is stopping; the kernel's refusal
    /// (its log says why: `dmesg`).
    pub fn connect(
        mut self,
        conns: &KernelConns,
        export_index: usize,
        export: &Arc<Export>,
    ) -> Result<Attached, AttachError> {
        let neg = kernel_negotiated(export_index, export);
        let block = kernel_block_size(neg.size, neg.block_size.preferred)
            .map_err(|e| AttachError::Invalid(format!("{e:#}")))?;
        let mut last = None;
        for index in std::mem::take(&mut self.candidates) {
            let mut kernel_ends = Vec::with_capacity(self.connections);
            for _ in 0..self.connections {
                let (ours, theirs) = UnixStream::pair()
                    .context("socketpair")
                    .map_err(AttachError::Other)?;
                conns
                    .serve_negotiated(ours, neg.clone(), Arc::clone(export))
                    .map_err(AttachError::Other)?;
                kernel_ends.push(theirs);
            }
            let fds: Vec<u32> = kernel_ends
                .iter()
                .map(|s| u32::try_from(s.as_raw_fd()).unwrap_or(u32::MAX))
                .collect();
            let r = self.nl.connect(
                Some(index),
                neg.size,
                block,
                neg.transmission_flags,
                self.io_timeout,
                self.dead_conn_timeout,
                &fds,
            );
            // The kernel holds its own references to the sockets; on failure, closing them
            // ends the server's connections (EOF).
            drop(kernel_ends);
            match r {
                Ok(got) => {
                    return Ok(Attached {
                        nl: self.nl,
                        index: got,
                        export: neg.export_name.clone(),
                        sysfs: self.sysfs,
                        connected: true,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if self.device != Device::Auto {
                        return Err(AttachError::Busy(format!(
                            "/dev/nbd{index} is busy: the kernel refused it (EBUSY: configured \
                             meanwhile)"
                        )));
                    }
                    tracing::info!(
                        device = index,
                        "nbd: device taken meanwhile, trying the next"
                    );
                    last = Some(e);
                }
                Err(e) => {
                    let hint = match e.raw_os_error() {
                        Some(libc::EPERM) => " (needs CAP_SYS_ADMIN)",
                        Some(libc::EINVAL) => " (the kernel log says why: dmesg)",
                        _ => "",
                    };
                    return Err(AttachError::Other(
                        anyhow::Error::new(e)
                            .context(format!("NBD_CMD_CONNECT /dev/nbd{index}{hint}")),
                    ));
                }
            }
        }
        Err(AttachError::NoFreeDevice(format!(
            "every free nbd device was taken meanwhile (last: {})",
            last.map_or_else(String::new, |e| e.to_string())
        )))
    }
}

/// Attaches export `export_index` of `server` to a kernel nbd device: [`Target::resolve`],
/// then [`Target::connect`].
///
/// # Errors
/// See [`AttachError`].
pub fn attach(
    server: &Server,
    export_index: usize,
    opts: &AttachOptions,
) -> anyhow::Result<Attached> {
    let exports = server.exports();
    let export = exports
        .get(export_index)
        .with_context(|| format!("no export #{export_index}"))?;
    let conns = server.kernel_conns()?;
    let target = Target::resolve(opts)?;
    Ok(target.connect(&conns, export_index, export)?)
}

/// The devices attached in a running `thaw serve`: those `--attach` made at start and those the
/// control API made, shared by both and by the exit (which detaches whatever is left).
#[derive(Debug, Default)]
pub struct AttachedDevices(Mutex<Vec<Attached>>);

impl AttachedDevices {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Attached>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `a`.
    pub fn push(&self, a: Attached) {
        self.lock().push(a);
    }

    /// The device export `name` is attached to.
    pub fn device_of(&self, name: &str) -> Option<PathBuf> {
        self.lock()
            .iter()
            .find(|a| a.export == name)
            .map(Attached::device)
    }

    /// Takes export `name`'s device out (to detach it).
    pub fn take(&self, name: &str) -> Option<Attached> {
        let mut list = self.lock();
        let i = list.iter().position(|a| a.export == name)?;
        Some(list.remove(i))
    }

    /// Takes every device out (at exit).
    pub fn take_all(&self) -> Vec<Attached> {
        std::mem::take(&mut *self.lock())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn connect_message_layout() {
        let m = connect_msg(0x1a, 7, Some(3), 64 << 20, 4096, 0x0105, 90, 30, &[11, 12]);
        // nlmsghdr
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), 0x1a);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&m, 8), 7);
        assert_eq!(u32_at(&m, 12), 0);
        // genlmsghdr
        assert_eq!(&m[16..20], &[NBD_CMD_CONNECT, 1, 0, 0]);
        // INDEX u32: len 8
        let mut at = 20;
        assert_eq!((u16_at(&m, at), u16_at(&m, at + 2)), (8, NBD_ATTR_INDEX));
        assert_eq!(u32_at(&m, at + 4), 3);
        at += 8;
        // six u64 attributes: len 12, no padding needed
        for (ty, v) in [
            (NBD_ATTR_SIZE_BYTES, 64u64 << 20),
            (NBD_ATTR_BLOCK_SIZE_BYTES, 4096),
            (NBD_ATTR_SERVER_FLAGS, 0x0105),
            (NBD_ATTR_CLIENT_FLAGS, 0),
            (NBD_ATTR_TIMEOUT, 90),
            (NBD_ATTR_DEAD_CONN_TIMEOUT, 30),
        ] {
            assert_eq!((u16_at(&m, at), u16_at(&m, at + 2)), (12, ty), "attr {ty}");
            assert_eq!(u64_at(&m, at + 4), v);
            at += 12;
        }
        // SOCKETS nest: 4 + 2 items of (4 + 8) = 28, flagged NLA_F_NESTED
        assert_eq!(u16_at(&m, at), 28);
        assert_eq!(u16_at(&m, at + 2), NBD_ATTR_SOCKETS | NLA_F_NESTED);
        let mut item = at + 4;
        for fd in [11, 12] {
            assert_eq!(u16_at(&m, item), 12);
            assert_eq!(u16_at(&m, item + 2), NBD_SOCK_ITEM | NLA_F_NESTED);
            assert_eq!(
                (u16_at(&m, item + 4), u16_at(&m, item + 6)),
                (8, NBD_SOCK_FD)
            );
            assert_eq!(u32_at(&m, item + 8), fd);
            item += 12;
        }
        assert_eq!(item, m.len());
        // And it parses back.
        let attrs = parse_attrs(&m[20..]).unwrap();
        assert_eq!(attrs.len(), 8);
        let socks = parse_attrs(attrs[7].1).unwrap();
        assert_eq!(socks.len(), 2);
        assert!(socks.iter().all(|(t, _)| *t == NBD_SOCK_ITEM));
        assert_eq!(
            parse_attrs(socks[1].1).unwrap(),
            vec![(NBD_SOCK_FD, &12u32.to_ne_bytes()[..])]
        );
        // Auto: no INDEX attribute.
        let m = connect_msg(0x1a, 8, None, 4096, 4096, 1, 1, 0, &[5]);
        let attrs = parse_attrs(&m[20..]).unwrap();
        assert!(attrs.iter().all(|(t, _)| *t != NBD_ATTR_INDEX));
    }

    #[test]
    fn strings_are_nul_terminated_and_padded() {
        let m = getfamily_msg(1, "nbd");
        assert_eq!(u16_at(&m, 4), GENL_ID_CTRL);
        assert_eq!(&m[16..20], &[CTRL_CMD_GETFAMILY, 1, 0, 0]);
        // len 4 + "nbd\0" = 8, already aligned
        assert_eq!((u16_at(&m, 20), u16_at(&m, 22)), (8, CTRL_ATTR_FAMILY_NAME));
        assert_eq!(&m[24..28], b"nbd\0");
        assert_eq!(m.len(), 28);
        let m = getfamily_msg(1, "nbd_x");
        // len 4 + 6 = 10, padded to 12; nlmsg_len counts the padding
        assert_eq!(u16_at(&m, 20), 10);
        assert_eq!(m.len(), 32);
        assert_eq!(&m[30..32], &[0, 0]);
        assert_eq!(u32_at(&m, 0), 32);
        let m = disconnect_msg(0x22, 9, 4);
        assert_eq!(m.len(), 28);
        assert_eq!(m[16], NBD_CMD_DISCONNECT);
        assert_eq!(
            parse_attrs(&m[20..]).unwrap(),
            vec![(NBD_ATTR_INDEX, &4u32.to_ne_bytes()[..])]
        );
    }

    fn nlmsg(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&u32::try_from(16 + body.len()).unwrap().to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&0u16.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(body);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn replies_parse_acks_errors_and_data() {
        let mut dgram = Vec::new();
        // A data message: CONNECT reply with INDEX 5.
        let mut body = vec![NBD_CMD_CONNECT, 1, 0, 0];
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&NBD_ATTR_INDEX.to_ne_bytes());
        body.extend_from_slice(&5u32.to_ne_bytes());
        dgram.extend(nlmsg(0x1a, 3, &body));
        // -EBUSY for seq 4, then an ACK for seq 3.
        let mut err = (-libc::EBUSY).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0; 16]);
        dgram.extend(nlmsg(NLMSG_ERROR, 4, &err));
        dgram.extend(nlmsg(NLMSG_ERROR, 3, &[0; 20]));
        let r = parse_replies(&dgram).unwrap();
        assert_eq!(r.len(), 3);
        let Reply::Data {
            ty,
            seq,
            cmd,
            attrs,
        } = &r[0]
        else {
            panic!("{r:?}")
        };
        assert_eq!((*ty, *seq, *cmd), (0x1a, 3, NBD_CMD_CONNECT));
        assert_eq!(
            parse_attrs(attrs).unwrap(),
            vec![(NBD_ATTR_INDEX, &5u32.to_ne_bytes()[..])]
        );
        assert_eq!(
            r[1],
            Reply::Error {
                seq: 4,
                errno: libc::EBUSY
            }
        );
        assert_eq!(r[2], Reply::Ack { seq: 3 });
        // Truncated: a length past the end, an attribute shorter than its header.
        let mut bad = nlmsg(NLMSG_ERROR, 1, &[0; 20]);
        bad[0] = 200;
        assert!(parse_replies(&bad).is_err());
        assert!(parse_replies(&nlmsg(0x1a, 1, &[1, 1])).is_err());
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err());
        assert!(parse_attrs(&[40, 0, 1, 0, 0, 0, 0, 0]).is_err());
    }

    /// A fake `SYSFS/block/nbdN`.
    fn fake(root: &Path, i: u32, pid: Option<&str>, size: &str, inflight: &str, holders: &[&str]) {
        let d = device_dir(root, i);
        std::fs::create_dir_all(d.join("holders")).unwrap();
        if let Some(p) = pid {
            std::fs::write(d.join("pid"), format!("{p}\n")).unwrap();
        }
        std::fs::write(d.join("size"), format!("{size}\n")).unwrap();
        std::fs::write(d.join("inflight"), format!("{inflight}\n")).unwrap();
        for h in holders {
            std::fs::write(d.join("holders").join(h), "").unwrap();
        }
    }

    #[test]
    fn free_device_rules_on_a_fake_sysfs() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("block/sda")).unwrap();
        fake(root, 0, Some("1"), "131072", "       0        0", &[]);
        fake(root, 1, None, "0", "       0        0", &[]);
        fake(root, 2, None, "8", "       0        0", &[]);
        fake(root, 3, None, "0", "       1        0", &[]);
        fake(root, 4, None, "0", "       0        0", &["dm-0"]);
        fake(root, 10, None, "0", "0 0", &[]);
        // pid 1 (init) is running; a pid that cannot exist is not.
        fake(root, 5, Some("4294967295"), "0", "0 0", &[]);
        assert_eq!(
            busy_reasons(root, 0).unwrap(),
            vec![
                Busy::Connected {
                    pid: "1".into(),
                    running: true
                },
                Busy::Size(131_072)
            ]
        );
        assert!(busy_reasons(root, 1).unwrap().is_empty());
        assert_eq!(busy_reasons(root, 2).unwrap(), vec![Busy::Size(8)]);
        assert_eq!(
            busy_reasons(root, 3).unwrap(),
            vec![Busy::Inflight("1 0".into())]
        );
        assert_eq!(
            busy_reasons(root, 4).unwrap(),
            vec![Busy::Holders(vec!["dm-0".into()])]
        );
        let gone = busy_reasons(root, 5).unwrap();
        assert_eq!(
            gone,
            vec![Busy::Connected {
                pid: "4294967295".into(),
                running: false
            }]
        );
        assert!(gone[0].to_string().contains("nbd-client -d"));
        // Absent from sysfs: free (the kernel creates it).
        assert!(busy_reasons(root, 77).unwrap().is_empty());
        // Numeric order, not lexical (10 after 1), busy ones and sda skipped.
        assert_eq!(free_devices(root).unwrap(), vec![1, 10]);
        // Garbage is an error, not "free".
        fake(root, 6, None, "zero", "0 0", &[]);
        assert!(busy_reasons(root, 6).is_err());
        fake(root, 7, None, "0", "0", &[]);
        assert!(busy_reasons(root, 7).is_err());
        assert!(free_devices(root).is_err());
        assert!(free_devices(&root.join("nope")).is_err());
    }

    #[test]
    fn device_specs_and_block_sizes() {
        assert_eq!("auto".parse::<Device>(), Ok(Device::Auto));
        assert_eq!("/dev/nbd0".parse::<Device>(), Ok(Device::Index(0)));
        assert_eq!("/dev/nbd15".parse::<Device>(), Ok(Device::Index(15)));
        for bad in [
            "/dev/nbd",
            "/dev/nbd-1",
            "/dev/nbd1p1",
            "nbd1",
            "/dev/sda",
            "",
        ] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
        assert_eq!(kernel_block_size(64 << 20, 4096).unwrap(), 4096);
        assert_eq!(kernel_block_size(64 << 20, 2 << 20).unwrap(), 4096);
        assert_eq!(kernel_block_size(4096 + 1024, 4096).unwrap(), 1024);
        assert_eq!(kernel_block_size(512 * 3, 4096).unwrap(), 512);
        assert!(kernel_block_size(1000, 4096).is_err());
        assert_eq!(secs(Duration::from_millis(1500)), 2);
        assert_eq!(secs(Duration::from_secs(90)), 90);
    }

    #[test]
    fn kernel_flags_drop_what_the_kernel_does_not_speak() {
        use thaw_codec::nbd::consts::{TFLAG_SEND_CACHE, TFLAG_SEND_DF, TFLAG_SEND_FAST_ZERO};
        assert_eq!(
            KERNEL_FLAGS & (TFLAG_SEND_DF | TFLAG_SEND_CACHE | TFLAG_SEND_FAST_ZERO),
            0
        );
        assert_eq!(KERNEL_FLAGS & TFLAG_CAN_MULTI_CONN, TFLAG_CAN_MULTI_CONN);
    }
}
