//! The crate's one error type.

use std::{fmt, io};

/// What went wrong, as a stable classification callers can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The peer did not connect or send its message within the deadline.
    Timeout,
    /// The handshake message was wrong: no fd, too many fds, empty, truncated.
    Handshake,
    /// The region JSON was malformed or failed validation.
    Regions,
    /// A fault outside every region, or an event the handler cannot honour.
    Protocol,
    /// The page source failed to produce a page within the retry budget.
    Source,
    /// A userfaultfd ioctl failed in a way that is not retryable, or EAGAIN outlasted its budget.
    Uffd,
    /// Any other OS error (socket, poll, eventfd).
    Io,
    /// The fault thread panicked.
    Panicked,
}

impl ErrorKind {
    /// A short, stable, lower-case name (for logs and metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Handshake => "handshake",
            Self::Regions => "regions",
            Self::Protocol => "protocol",
            Self::Source => "source",
            Self::Uffd => "uffd",
            Self::Io => "io",
            Self::Panicked => "panicked",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A handler failure: a kind, a human-readable detail and an optional OS error source.
#[derive(Debug)]
pub struct UffdError {
    kind: ErrorKind,
    detail: String,
    source: Option<io::Error>,
    peer_killed: bool,
}

impl UffdError {
    /// A new error.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            source: None,
            peer_killed: false,
        }
    }

    /// A new error caused by an OS error.
    pub fn io(kind: ErrorKind, detail: impl Into<String>, source: io::Error) -> Self {
        Self {
            kind,
            detail: detail.into(),
            source: Some(source),
            peer_killed: false,
        }
    }

    pub(crate) fn with_peer_killed(mut self, killed: bool) -> Self {
        self.peer_killed = killed;
        self
    }

    /// The stable classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The detail text (without the source).
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// Whether the handler SIGKILLed the peer (fail closed) because of this error.
    pub fn peer_killed(&self) -> bool {
        self.peer_killed
    }

    /// The OS error number, if an OS error caused this.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(io::Error::raw_os_error)
    }
}

impl fmt::Display for UffdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.detail)
    }
}

impl std::error::Error for UffdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<thaw_codec::CodecError> for UffdError {
    fn from(e: thaw_codec::CodecError) -> Self {
        Self::new(ErrorKind::Regions, e.to_string())
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, UffdError>;
