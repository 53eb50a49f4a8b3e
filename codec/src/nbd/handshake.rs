//! The server side of the fixed newstyle handshake, sans-io.
//!
//! ```text
//! server: greeting()                         NBDMAGIC IHAVEOPT u16-flags
//! client: u32 client flags
//! client: IHAVEOPT u32-option u32-length data     (repeated)
//! server: option replies                     (each option answered before the next is read)
//! ... until GO / EXPORT_NAME succeed (transmission), ABORT, or a violation closes the connection
//! ```
//!
//! [`ServerHandshake::feed`] takes whatever bytes arrived, appends every reply to the caller's
//! output buffer and says how many input bytes it consumed and what happens next. It keeps at
//! most one option payload (capped by [`HandshakeLimits::max_option_len`]) and skips the
//! payloads it does not need without storing them, so a hostile client costs bounded memory.

use super::consts::*;
use super::export::{BlockSize, ExportConfig};
use super::reply::encode_option_reply;
use crate::{CodecError, ErrorKind, Result};

/// The metadata context id thaw gives `base:allocation` on `NBD_OPT_SET_META_CONTEXT`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Caps on what one client may send during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandshakeLimits {
    /// Most options per handshake; one more closes the connection (DoS guard).
    pub max_options: u32,
    /// Largest option payload that is read into memory (`INFO`, `GO`, `LIST_META_CONTEXT`,
    /// `SET_META_CONTEXT`); larger ones are skipped and answered `ERR_TOO_BIG`.
    pub max_option_len: u32,
    /// Largest option payload at all: a longer declared length closes the connection before
    /// anything is read or allocated.
    pub max_skip_len: u32,
    /// Most option payload bytes (read or skipped) over the whole handshake.
    pub max_total_len: u64,
}

impl Default for HandshakeLimits {
    /// 128 options, 16 KiB read, 1 MiB skipped per option, 4 MiB in total.
    fn default() -> Self {
        Self {
            max_options: 128,
            max_option_len: 16 * 1024,
            max_skip_len: 1024 * 1024,
            max_total_len: 4 * 1024 * 1024,
        }
    }
}

/// What the server offers on this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// The exports (unique names).
    pub exports: Vec<ExportConfig>,
    /// The export an empty name selects (`None`: an empty name is unknown unless an export is
    /// named "").
    pub default_export: Option<String>,
    /// Answer `NBD_OPT_LIST` (otherwise `ERR_POLICY`).
    pub allow_list: bool,
    /// Advertise `NBD_FLAG_NO_ZEROES`.
    pub advertise_no_zeroes: bool,
    /// Caps.
    pub limits: HandshakeLimits,
}

impl HandshakeConfig {
    /// A config serving `exports`, the first one as the default, with LIST allowed, NO_ZEROES
    /// advertised and default limits.
    pub fn new(exports: Vec<ExportConfig>) -> Self {
        let default_export = exports.first().map(|e| e.name.clone());
        Self {
            exports,
            default_export,
            allow_list: true,
            advertise_no_zeroes: true,
            limits: HandshakeLimits::default(),
        }
    }
}

/// The result of a successful handshake: everything the transmission phase needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the chosen export in [`HandshakeConfig::exports`].
    pub export_index: usize,
    /// The chosen export's canonical name (the default export's name when the client sent "").
    pub export_name: String,
    /// Export size in bytes.
    pub size: u64,
    /// The transmission flags sent to the client (`TFLAG_*`).
    pub transmission_flags: u16,
    /// The export's block-size constraints (enforced whether or not the client asked).
    pub block_size: BlockSize,
    /// Structured replies are on: every READ reply (errors included) must be structured.
    pub structured_replies: bool,
    /// The context id of `base:allocation` when the last `SET_META_CONTEXT` selected it for
    /// this export; `NBD_CMD_BLOCK_STATUS` is valid only then.
    pub base_allocation: Option<u32>,
    /// The client asked for (and the server advertised) `NO_ZEROES`.
    pub no_zeroes: bool,
}

impl Negotiated {
    /// Whether `flag` (a `TFLAG_*`) was advertised.
    pub fn has_flag(&self, flag: u16) -> bool {
        self.transmission_flags & flag == flag
    }

    /// Whether the export is read-only on this connection.
    pub fn read_only(&self) -> bool {
        self.has_flag(TFLAG_READ_ONLY)
    }
}

/// Why the handshake ends without transmission: the server closes the connection (after writing
/// whatever output was produced before, if it likes; nothing is owed to a violating client).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// The client flags lack `FIXED_NEWSTYLE` (thaw speaks only fixed newstyle).
    NotFixedNewstyle {
        /// The client flags.
        flags: u32,
    },
    /// The client flags carry an unknown bit, or `NO_ZEROES` that was not advertised.
    UnknownClientFlags {
        /// The client flags.
        flags: u32,
    },
    /// An option header did not start with `IHAVEOPT`.
    BadOptionMagic {
        /// The 8 bytes found instead.
        magic: u64,
    },
    /// An option declared a payload above [`HandshakeLimits::max_skip_len`].
    OptionTooLong {
        /// The option number.
        option: u32,
        /// The declared length.
        len: u32,
    },
    /// More than [`HandshakeLimits::max_options`] options.
    TooManyOptions,
    /// More than [`HandshakeLimits::max_total_len`] option payload bytes.
    TooMuchOptionData,
    /// `NBD_OPT_EXPORT_NAME` with a name over [`MAX_STRING`] bytes (no error reply exists).
    ExportNameTooLong {
        /// The declared length.
        len: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` for an export that does not exist (no error reply exists).
    UnknownExport {
        /// The requested name (lossily decoded).
        name: String,
    },
    /// `NBD_OPT_EXPORT_NAME` while the server is shutting down (no error reply exists).
    ShuttingDown,
    /// [`ServerHandshake::feed`] was called after the handshake had already ended.
    Finished,
}

impl RejectReason {
    /// The codec error class of this reason.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFixedNewstyle { .. } | Self::UnknownClientFlags { .. } => {
                ErrorKind::Unsupported
            }
            Self::BadOptionMagic { .. } => ErrorKind::Corrupt,
            Self::OptionTooLong { .. }
            | Self::TooManyOptions
            | Self::TooMuchOptionData
            | Self::ExportNameTooLong { .. } => ErrorKind::TooLarge,
            Self::UnknownExport { .. } => ErrorKind::OutOfBounds,
            Self::ShuttingDown | Self::Finished => ErrorKind::InvalidArgument,
        }
    }

    /// A short, stable, lower-case name (for logs and metrics labels).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotFixedNewstyle { .. } => "not_fixed_newstyle",
            Self::UnknownClientFlags { .. } => "unknown_client_flags",
            Self::BadOptionMagic { .. } => "bad_option_magic",
            Self::OptionTooLong { .. } => "option_too_long",
            Self::TooManyOptions => "too_many_options",
            Self::TooMuchOptionData => "too_much_option_data",
            Self::ExportNameTooLong { .. } => "export_name_too_long",
            Self::UnknownExport { .. } => "unknown_export",
            Self::ShuttingDown => "shutting_down",
            Self::Finished => "finished",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFixedNewstyle { flags } => {
                write!(f, "client flags {flags:#x} lack FIXED_NEWSTYLE")
            }
            Self::UnknownClientFlags { flags } => {
                write!(
                    f,
                    "client flags {flags:#x} carry an unknown or unadvertised bit"
                )
            }
            Self::BadOptionMagic { magic } => write!(f, "option magic {magic:#018x}"),
            Self::OptionTooLong { option, len } => {
                write!(f, "option {option} declares {len} bytes of data")
            }
            Self::TooManyOptions => f.write_str("too many options"),
            Self::TooMuchOptionData => f.write_str("too much option data"),
            Self::ExportNameTooLong { len } => write!(f, "EXPORT_NAME of {len} bytes"),
            Self::UnknownExport { name } => write!(f, "EXPORT_NAME for unknown export {name:?}"),
            Self::ShuttingDown => f.write_str("EXPORT_NAME while shutting down"),
            Self::Finished => f.write_str("the handshake has already ended"),
        }
    }
}

impl From<RejectReason> for CodecError {
    fn from(r: RejectReason) -> Self {
        CodecError::new(r.kind(), "nbd handshake", r.to_string())
    }
}

/// What the connection does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Keep reading; send the output produced so far.
    Continue,
    /// Send the output, then enter the transmission phase with these parameters. Input bytes
    /// past [`Step::consumed`] are the first transmission bytes.
    Go(Box<Negotiated>),
    /// The client sent `NBD_OPT_ABORT`: send the output (its `ACK`; the client may already be
    /// gone, so a write error is not worth reporting), then close.
    Abort,
    /// Close the connection.
    Reject(RejectReason),
}

/// The result of one [`ServerHandshake::feed`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Input bytes consumed. Less than the input only when `progress` is not
    /// [`Progress::Continue`].
    pub consumed: usize,
    /// What happens next.
    pub progress: Progress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Read the payload into `payload` and handle the option.
    Handle,
    /// Skip the payload, then answer with this reply type and message.
    Reply(u32, &'static str),
    /// Skip the payload, answer `ACK` and abort.
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    Payload {
        option: u32,
        remaining: u32,
        action: Action,
    },
    Finished,
}

/// The metadata contexts selected by the last `SET_META_CONTEXT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MetaSelection {
    export_index: usize,
    base_allocation: bool,
}

/// The server side of one connection's handshake. See the module docs.
#[derive(Debug, Clone)]
pub struct ServerHandshake {
    config: HandshakeConfig,
    default_index: Option<usize>,
    state: State,
    fixed: [u8; OPTION_HEADER_LEN],
    fixed_len: usize,
    payload: Vec<u8>,
    options_seen: u32,
    total_len: u64,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    shutting_down: bool,
}

/// Initial capacity reserved for a buffered payload (it grows as bytes arrive, up to the
/// declared length, so memory follows what the client actually sent).
const INITIAL_PAYLOAD_CAPACITY: usize = 512;

const WHAT: &str = "nbd handshake config";

impl ServerHandshake {
    /// A handshake for `config`. Every export must validate ([`ExportConfig::validate`]), names
    /// must be unique, the default export must exist, and `max_option_len` must be at least
    /// 4 KiB + 16 (room for a maximal name) and at most `max_skip_len`.
    pub fn new(config: HandshakeConfig) -> Result<Self> {
        for (i, e) in config.exports.iter().enumerate() {
            e.validate()?;
            if config.exports[..i].iter().any(|o| o.name == e.name) {
                return Err(CodecError::new(
                    ErrorKind::InvalidArgument,
                    WHAT,
                    format!("export name {:?} appears twice", e.name),
                ));
            }
        }
        let default_index = match &config.default_export {
            None => None,
            Some(name) => Some(
                config
                    .exports
                    .iter()
                    .position(|e| &e.name == name)
                    .ok_or_else(|| {
                        CodecError::new(
                            ErrorKind::InvalidArgument,
                            WHAT,
                            format!("default export {name:?} is not an export"),
                        )
                    })?,
            ),
        };
        let l = &config.limits;
        let min_len = u32::try_from(MAX_STRING + 16).unwrap_or(u32::MAX);
        if l.max_option_len < min_len || l.max_option_len > l.max_skip_len {
            return Err(CodecError::new(
                ErrorKind::InvalidArgument,
                WHAT,
                format!(
                    "max_option_len {} must lie in {min_len}..=max_skip_len ({})",
                    l.max_option_len, l.max_skip_len
                ),
            ));
        }
        Ok(Self {
            config,
            default_index,
            state: State::ClientFlags,
            fixed: [0; OPTION_HEADER_LEN],
            fixed_len: 0,
            payload: Vec::new(),
            options_seen: 0,
            total_len: 0,
            no_zeroes: false,
            structured: false,
            meta: None,
            shutting_down: false,
        })
    }

    /// The 18-byte greeting the server sends first: `NBDMAGIC`, `IHAVEOPT`, handshake flags
    /// (`FIXED_NEWSTYLE`, plus `NO_ZEROES` when advertised).
    pub fn greeting(&self) -> [u8; GREETING_LEN] {
        let mut b = [0u8; GREETING_LEN];
        b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[16..18].copy_from_slice(&self.handshake_flags().to_be_bytes());
        b
    }

    /// The handshake flags of the greeting.
    pub fn handshake_flags(&self) -> u16 {
        if self.config.advertise_no_zeroes {
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        } else {
            FLAG_FIXED_NEWSTYLE
        }
    }

    /// The configuration.
    pub fn config(&self) -> &HandshakeConfig {
        &self.config
    }

    /// Enter shutdown mode: from now on every option but `ABORT` is answered `ERR_SHUTDOWN`
    /// (and `EXPORT_NAME`, which cannot be answered with an error, closes the connection).
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Whether structured replies have been negotiated so far.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Options received so far (including the one being read).
    pub fn options_seen(&self) -> u32 {
        self.options_seen
    }

    /// Whether the handshake has ended (a `feed` returned something other than `Continue`).
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// How many more bytes the current step needs (the client flags, an option header, or the
    /// rest of an option payload); 0 once finished. A hint for sizing reads: `feed` accepts any
    /// amount.
    pub fn wants(&self) -> usize {
        match self.state {
            State::ClientFlags => 4 - self.fixed_len,
            State::OptionHeader => OPTION_HEADER_LEN - self.fixed_len,
            State::Payload { remaining, .. } => usize::try_from(remaining).unwrap_or(usize::MAX),
            State::Finished => 0,
        }
    }

    /// Consumes bytes from the client, appends every reply to `out`, and says what happens
    /// next. Call it with whatever arrived; it consumes everything unless the handshake ends
    /// (then the rest of `input` belongs to the transmission phase or is ignored).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Step {
        if self.state == State::Finished {
            return step(0, Progress::Reject(RejectReason::Finished));
        }
        let mut pos = 0;
        loop {
            let rest = input.get(pos..).unwrap_or_default();
            match self.state {
                State::Finished => return step(pos, Progress::Reject(RejectReason::Finished)),
                State::ClientFlags => {
                    pos += self.fill(rest, 4);
                    if self.fixed_len < 4 {
                        return step(pos, Progress::Continue);
                    }
                    self.fixed_len = 0;
                    let flags = be_u32(&self.fixed, 0).unwrap_or(0);
                    if let Err(r) = self.client_flags(flags) {
                        return self.finish(pos, Progress::Reject(r));
                    }
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    pos += self.fill(rest, OPTION_HEADER_LEN);
                    if self.fixed_len < OPTION_HEADER_LEN {
                        return step(pos, Progress::Continue);
                    }
                    self.fixed_len = 0;
                    let magic = be_u64(&self.fixed, 0).unwrap_or(0);
                    let option = be_u32(&self.fixed, 8).unwrap_or(0);
                    let len = be_u32(&self.fixed, 12).unwrap_or(0);
                    if magic != IHAVEOPT {
                        return self.finish(
                            pos,
                            Progress::Reject(RejectReason::BadOptionMagic { magic }),
                        );
                    }
                    match self.begin_option(option, len) {
                        Ok(action) => {
                            self.state = State::Payload {
                                option,
                                remaining: len,
                                action,
                            }
                        }
                        Err(r) => return self.finish(pos, Progress::Reject(r)),
                    }
                }
                State::Payload {
                    option,
                    remaining,
                    action,
                } => {
                    let want = usize::try_from(remaining).unwrap_or(usize::MAX);
                    let take = want.min(rest.len());
                    if action == Action::Handle {
                        self.payload
                            .extend_from_slice(rest.get(..take).unwrap_or_default());
                    }
                    pos += take;
                    // take <= remaining, so this fits.
                    let left = remaining - u32::try_from(take).unwrap_or(remaining);
                    if left > 0 {
                        self.state = State::Payload {
                            option,
                            remaining: left,
                            action,
                        };
                        return step(pos, Progress::Continue);
                    }
                    let result = self.complete(option, action, out);
                    if self.payload.capacity() > INITIAL_PAYLOAD_CAPACITY * 8 {
                        self.payload = Vec::new();
                    } else {
                        self.payload.clear();
                    }
                    match result {
                        None => self.state = State::OptionHeader,
                        Some(progress) => return self.finish(pos, progress),
                    }
                }
            }
        }
    }

    fn finish(&mut self, consumed: usize, progress: Progress) -> Step {
        self.state = State::Finished;
        self.payload = Vec::new();
        step(consumed, progress)
    }

    /// Copies into `fixed` until it holds `need` bytes; returns the bytes taken.
    fn fill(&mut self, input: &[u8], need: usize) -> usize {
        let take = need.saturating_sub(self.fixed_len).min(input.len());
        if let (Some(dst), Some(src)) = (
            self.fixed.get_mut(self.fixed_len..self.fixed_len + take),
            input.get(..take),
        ) {
            dst.copy_from_slice(src);
        }
        self.fixed_len += take;
        take
    }

    fn client_flags(&mut self, flags: u32) -> std::result::Result<(), RejectReason> {
        let mut known = CLIENT_FIXED_NEWSTYLE;
        if self.config.advertise_no_zeroes {
            known |= CLIENT_NO_ZEROES;
        }
        if flags & !known != 0 {
            return Err(RejectReason::UnknownClientFlags { flags });
        }
        if flags & CLIENT_FIXED_NEWSTYLE == 0 {
            return Err(RejectReason::NotFixedNewstyle { flags });
        }
        self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
        Ok(())
    }

    /// Checks an option header against the caps and decides what to do with its payload.
    fn begin_option(&mut self, option: u32, len: u32) -> std::result::Result<Action, RejectReason> {
        let limits = self.config.limits;
        self.options_seen = self.options_seen.saturating_add(1);
        if self.options_seen > limits.max_options {
            return Err(RejectReason::TooManyOptions);
        }
        if len > limits.max_skip_len {
            return Err(RejectReason::OptionTooLong { option, len });
        }
        self.total_len = self.total_len.saturating_add(u64::from(len));
        if self.total_len > limits.max_total_len {
            return Err(RejectReason::TooMuchOptionData);
        }
        let action = match option {
            OPT_ABORT => Action::Abort,
            OPT_EXPORT_NAME if self.shutting_down => return Err(RejectReason::ShuttingDown),
            OPT_EXPORT_NAME if usize::try_from(len).map_or(true, |l| l > MAX_STRING) => {
                return Err(RejectReason::ExportNameTooLong { len });
            }
            OPT_EXPORT_NAME => Action::Handle,
            _ if self.shutting_down => Action::Reply(REP_ERR_SHUTDOWN, "server is shutting down"),
            OPT_LIST if len > 0 => Action::Reply(REP_ERR_INVALID, "NBD_OPT_LIST takes no data"),
            OPT_STRUCTURED_REPLY if len > 0 => {
                Action::Reply(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            OPT_LIST | OPT_STRUCTURED_REPLY => Action::Handle,
            OPT_STARTTLS => Action::Reply(REP_ERR_POLICY, "TLS is not supported"),
            OPT_INFO | OPT_GO | OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if len > limits.max_option_len {
                    Action::Reply(REP_ERR_TOO_BIG, "option data too large")
                } else {
                    Action::Handle
                }
            }
            _ => Action::Reply(REP_ERR_UNSUP, "unsupported option"),
        };
        if action == Action::Handle {
            let cap = usize::try_from(len).unwrap_or(usize::MAX);
            self.payload.reserve(cap.min(INITIAL_PAYLOAD_CAPACITY));
        }
        Ok(action)
    }

    /// Handles a complete option; `Some` ends the handshake.
    fn complete(&mut self, option: u32, action: Action, out: &mut Vec<u8>) -> Option<Progress> {
        match action {
            Action::Abort => {
                reply(out, option, REP_ACK, &[]);
                Some(Progress::Abort)
            }
            Action::Reply(rtype, msg) => {
                reply(out, option, rtype, msg.as_bytes());
                None
            }
            Action::Handle if option == OPT_EXPORT_NAME && self.shutting_down => {
                Some(Progress::Reject(RejectReason::ShuttingDown))
            }
            Action::Handle if option == OPT_EXPORT_NAME => Some(self.export_name(out)),
            Action::Handle if self.shutting_down => {
                reply(out, option, REP_ERR_SHUTDOWN, b"server is shutting down");
                None
            }
            Action::Handle => {
                let payload = std::mem::take(&mut self.payload);
                let result = match option {
                    OPT_LIST => {
                        self.list(out);
                        None
                    }
                    OPT_STRUCTURED_REPLY => {
                        if self.structured {
                            reply(
                                out,
                                option,
                                REP_ERR_INVALID,
                                b"structured replies already negotiated",
                            );
                        } else {
                            self.structured = true;
                            reply(out, option, REP_ACK, &[]);
                        }
                        None
                    }
                    OPT_INFO | OPT_GO => self.info_go(option, &payload, out),
                    OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                        self.meta_context(option, &payload, out);
                        None
                    }
                    // begin_option hands no other option to Handle.
                    _ => {
                        reply(out, option, REP_ERR_UNSUP, b"unsupported option");
                        None
                    }
                };
                self.payload = payload;
                result
            }
        }
    }

    fn lookup(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty()
            && let Some(i) = self.default_index
        {
            return Some(i);
        }
        self.config
            .exports
            .iter()
            .position(|e| e.name.as_bytes() == name)
    }

    fn negotiated(&self, index: usize) -> Option<Negotiated> {
        let export = self.config.exports.get(index)?;
        let base_allocation = self
            .meta
            .filter(|m| self.structured && m.export_index == index && m.base_allocation)
            .map(|_| BASE_ALLOCATION_ID);
        Some(Negotiated {
            export_index: index,
            export_name: export.name.clone(),
            size: export.size,
            transmission_flags: export.transmission_flags(self.structured),
            block_size: export.block_size,
            structured_replies: self.structured,
            base_allocation,
            no_zeroes: self.no_zeroes,
        })
    }

    fn export_name(&mut self, out: &mut Vec<u8>) -> Progress {
        let name = std::mem::take(&mut self.payload);
        let Some(n) = self.lookup(&name).and_then(|i| self.negotiated(i)) else {
            return Progress::Reject(RejectReason::UnknownExport {
                name: String::from_utf8_lossy(&name).into_owned(),
            });
        };
        out.extend_from_slice(&n.size.to_be_bytes());
        out.extend_from_slice(&n.transmission_flags.to_be_bytes());
        if !n.no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES]);
        }
        Progress::Go(Box::new(n))
    }

    fn list(&self, out: &mut Vec<u8>) {
        if !self.config.allow_list {
            reply(
                out,
                OPT_LIST,
                REP_ERR_POLICY,
                b"listing exports is disabled",
            );
            return;
        }
        for e in &self.config.exports {
            let name = e.name.as_bytes();
            let mut data = Vec::with_capacity(4 + name.len());
            data.extend_from_slice(&len_u32(name.len()).to_be_bytes());
            data.extend_from_slice(name);
            reply(out, OPT_LIST, REP_SERVER, &data);
        }
        reply(out, OPT_LIST, REP_ACK, &[]);
    }

    fn info_go(&mut self, option: u32, p: &[u8], out: &mut Vec<u8>) -> Option<Progress> {
        let parsed = parse_info_request(p);
        let (name, requests) = match parsed {
            Ok(v) => v,
            Err(msg) => {
                reply(out, option, REP_ERR_INVALID, msg.as_bytes());
                return None;
            }
        };
        let Some(index) = self.lookup(name) else {
            reply(out, option, REP_ERR_UNKNOWN, b"unknown export");
            return None;
        };
        let n = self.negotiated(index)?;
        let export = self.config.exports.get(index)?;
        let (mut want_name, mut want_desc, mut want_bs) = (false, false, false);
        for pair in requests.chunks_exact(2) {
            match u16::from_be_bytes([pair[0], pair[1]]) {
                INFO_NAME => want_name = true,
                INFO_DESCRIPTION => want_desc = true,
                INFO_BLOCK_SIZE => want_bs = true,
                _ => {} // INFO_EXPORT is always sent; unknown requests are ignored.
            }
        }
        if want_name {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(export.name.as_bytes());
            reply(out, option, REP_INFO, &d);
        }
        if want_desc && !export.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(export.description.as_bytes());
            reply(out, option, REP_INFO, &d);
        }
        if want_bs {
            let bs = export.block_size;
            let mut d = [0u8; 14];
            d[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            d[2..6].copy_from_slice(&bs.min.to_be_bytes());
            d[6..10].copy_from_slice(&bs.preferred.to_be_bytes());
            d[10..14].copy_from_slice(&bs.max.to_be_bytes());
            reply(out, option, REP_INFO, &d);
        }
        let mut d = [0u8; 12];
        d[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        d[2..10].copy_from_slice(&n.size.to_be_bytes());
        d[10..12].copy_from_slice(&n.transmission_flags.to_be_bytes());
        reply(out, option, REP_INFO, &d);
        reply(out, option, REP_ACK, &[]);
        (option == OPT_GO).then(|| Progress::Go(Box::new(n)))
    }

    fn meta_context(&mut self, option: u32, p: &[u8], out: &mut Vec<u8>) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the previous selection, whatever its outcome.
            self.meta = None;
        }
        if !self.structured {
            reply(
                out,
                option,
                REP_ERR_INVALID,
                b"negotiate structured replies first",
            );
            return;
        }
        let parsed = match parse_meta_request(p, set) {
            Ok(v) => v,
            Err(msg) => {
                reply(out, option, REP_ERR_INVALID, msg.as_bytes());
                return;
            }
        };
        let Some(index) = self.lookup(parsed.export) else {
            reply(out, option, REP_ERR_UNKNOWN, b"unknown export");
            return;
        };
        let supported = self
            .config
            .exports
            .get(index)
            .is_some_and(|e| e.features.base_allocation);
        let selected = supported && parsed.base_allocation;
        if selected {
            let id: u32 = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            reply(out, option, REP_META_CONTEXT, &d);
        }
        reply(out, option, REP_ACK, &[]);
        if set {
            self.meta = Some(MetaSelection {
                export_index: index,
                base_allocation: selected,
            });
        }
    }
}

fn step(consumed: usize, progress: Progress) -> Step {
    Step { consumed, progress }
}

/// Appends an option reply; handshake replies are bounded well below `u32::MAX`.
fn reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    // Cannot fail: every caller's data is at most a few KiB.
    let _ = encode_option_reply(out, option, reply_type, data);
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Reads `u32 length, bytes` at `at`; `None` when the length runs past the end.
fn length_prefixed(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = usize::try_from(be_u32(b, at)?).ok()?;
    let start = at.checked_add(4)?;
    let end = start.checked_add(len)?;
    Some((b.get(start..end)?, end))
}

/// Parses an INFO/GO payload: u32 name length, name, u16 count, count x u16 requests. Returns
/// the name and the raw request bytes, or the `ERR_INVALID` message.
fn parse_info_request(p: &[u8]) -> std::result::Result<(&[u8], &[u8]), &'static str> {
    // The spec: the name length MUST be <= option length - 6.
    let (name, end) = length_prefixed(p, 0).ok_or("export name length exceeds the option")?;
    if name.len() > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    if std::str::from_utf8(name).is_err() {
        return Err("export name is not UTF-8");
    }
    let count = be_u16(p, end).ok_or("missing information request count")?;
    let requests = p.get(end + 2..).unwrap_or_default();
    if requests.len() != usize::from(count) * 2 {
        return Err("information request list does not match the option length");
    }
    Ok((name, requests))
}

#[derive(Debug)]
struct MetaRequest<'a> {
    export: &'a [u8],
    base_allocation: bool,
}

/// Parses a LIST/SET_META_CONTEXT payload: u32 name length, name, u32 query count, then each
/// query as u32 length + string. Every query must be UTF-8, at most 4096 bytes and start with a
/// `namespace:`; unknown namespaces match nothing. For LIST, no query at all or `base:` match
/// `base:allocation` too.
fn parse_meta_request(p: &[u8], set: bool) -> std::result::Result<MetaRequest<'_>, &'static str> {
    let (export, mut at) = length_prefixed(p, 0).ok_or("export name length exceeds the option")?;
    if export.len() > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    if std::str::from_utf8(export).is_err() {
        return Err("export name is not UTF-8");
    }
    let count = be_u32(p, at).ok_or("missing query count")?;
    at += 4;
    // Every query takes at least 4 bytes: reject impossible counts before looping.
    if u64::from(count) * 4 > u64::try_from(p.len() - at.min(p.len())).unwrap_or(u64::MAX) {
        return Err("query count exceeds the option length");
    }
    let mut base_allocation = !set && count == 0;
    for _ in 0..count {
        let (query, end) = length_prefixed(p, at).ok_or("query length exceeds the option")?;
        at = end;
        if query.len() > MAX_STRING {
            return Err("query longer than 4096 bytes");
        }
        let query = std::str::from_utf8(query).map_err(|_| "query is not UTF-8")?;
        let Some((namespace, leaf)) = query.split_once(':') else {
            return Err("query lacks a namespace");
        };
        if namespace.is_empty() {
            return Err("query has an empty namespace");
        }
        if namespace == "base" && (leaf == "allocation" || (!set && leaf.is_empty())) {
            base_allocation = true;
        }
    }
    if at != p.len() {
        return Err("trailing bytes after the queries");
    }
    Ok(MetaRequest {
        export,
        base_allocation,
    })
}
