//! The codec's one error type.

use std::fmt;

/// What went wrong, as a stable classification callers can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input ended before a structure was complete.
    Truncated,
    /// A declared length or count exceeds a cap (checked before any allocation).
    TooLarge,
    /// A version, codec id or feature this implementation does not know.
    Unsupported,
    /// The input is structurally wrong: bad ordering, overlap, bad checksum, trailing bytes.
    Corrupt,
    /// A frame decoded (or would decode) to a size other than the declared one.
    SizeMismatch,
    /// An offset or range lies outside what the structure covers.
    OutOfBounds,
    /// A caller-supplied argument is invalid (e.g. an unaligned offset, a bad frame size).
    InvalidArgument,
}

impl ErrorKind {
    /// A short, stable, lower-case name (for logs, metrics labels and JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::TooLarge => "too_large",
            Self::Unsupported => "unsupported",
            Self::Corrupt => "corrupt",
            Self::SizeMismatch => "size_mismatch",
            Self::OutOfBounds => "out_of_bounds",
            Self::InvalidArgument => "invalid_argument",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A codec failure: a kind, the structure it happened in, and a human-readable detail.
///
/// Display reads `"{what}: {detail}"`, e.g. `V4 builds section: frame 3 overlaps frame 2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError {
    kind: ErrorKind,
    what: &'static str,
    detail: String,
}

impl CodecError {
    /// A new error of `kind` in structure `what`.
    pub fn new(kind: ErrorKind, what: &'static str, detail: impl Into<String>) -> Self {
        Self {
            kind,
            what,
            detail: detail.into(),
        }
    }

    /// Shorthand for a [`ErrorKind::Truncated`] error: `need` bytes were required, `have` left.
    pub fn truncated(what: &'static str, need: u64, have: u64) -> Self {
        Self::new(
            ErrorKind::Truncated,
            what,
            format!("need {need} bytes, {have} left"),
        )
    }

    /// Shorthand for a [`ErrorKind::TooLarge`] error.
    pub fn too_large(what: &'static str, value: u64, cap: u64) -> Self {
        Self::new(
            ErrorKind::TooLarge,
            what,
            format!("{value} exceeds the cap of {cap}"),
        )
    }

    /// Shorthand for a [`ErrorKind::Corrupt`] error.
    pub fn corrupt(what: &'static str, detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, what, detail)
    }

    /// The stable classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The structure the error happened in.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// The detail text.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.detail)
    }
}

impl std::error::Error for CodecError {}

/// The codec's result type.
pub type Result<T> = std::result::Result<T, CodecError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_kind() {
        let e = CodecError::truncated("metadata", 64, 10);
        assert_eq!(e.kind(), ErrorKind::Truncated);
        assert_eq!(e.to_string(), "metadata: need 64 bytes, 10 left");
        assert_eq!(e.kind().as_str(), "truncated");
    }
}
