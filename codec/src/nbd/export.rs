//! What the server offers: exports, their sizes, features and block-size constraints, and the
//! transmission flags they turn into.

use super::consts::*;
use crate::{CodecError, ErrorKind, Result};

/// Largest maximum block size an export may advertise: the largest READ/WRITE payload thaw
/// accepts on a connection (the spec asks servers to accept at least 32 MiB).
pub const MAX_BLOCK_SIZE_CAP: u32 = 64 * 1024 * 1024;

/// The payload cap a client assumes when no block size was advertised (spec default).
pub const DEFAULT_MAX_BLOCK_SIZE: u32 = 32 * 1024 * 1024;

/// Block-size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
///
/// Valid constraints (checked by [`BlockSize::validate`]): `min` a power of two in 1..=64 KiB;
/// `preferred` a power of two >= max(`min`, 512); `max` >= `preferred`, a multiple of `min`, and
/// <= [`MAX_BLOCK_SIZE_CAP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSize {
    /// Minimum block size: offsets and lengths of data commands must be multiples of it.
    pub min: u32,
    /// Preferred block size (a hint to the client).
    pub preferred: u32,
    /// Maximum payload of a READ or WRITE.
    pub max: u32,
}

impl Default for BlockSize {
    /// The spec's defaults: 1 / 4096 / 32 MiB.
    fn default() -> Self {
        Self {
            min: 1,
            preferred: 4096,
            max: DEFAULT_MAX_BLOCK_SIZE,
        }
    }
}

impl BlockSize {
    /// Checks the spec's constraints (and thaw's payload cap); [`ErrorKind::InvalidArgument`]
    /// when one fails.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(CodecError::new(ErrorKind::InvalidArgument, WHAT, detail));
        if !self.min.is_power_of_two() || self.min > 64 * 1024 {
            return bad(format!(
                "minimum block size {} is not a power of two <= 64 KiB",
                self.min
            ));
        }
        if !self.preferred.is_power_of_two() || self.preferred < self.min.max(512) {
            return bad(format!(
                "preferred block size {} is not a power of two >= max(min, 512)",
                self.preferred
            ));
        }
        if self.max < self.preferred || !self.max.is_multiple_of(self.min) {
            return bad(format!(
                "maximum block size {} is below the preferred size or not a multiple of the \
                 minimum",
                self.max
            ));
        }
        if self.max > MAX_BLOCK_SIZE_CAP {
            return Err(CodecError::too_large(
                "maximum block size",
                u64::from(self.max),
                u64::from(MAX_BLOCK_SIZE_CAP),
            ));
        }
        Ok(())
    }
}

/// Optional features of an export, each advertised as a transmission flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ExportFeatures {
    /// `NBD_CMD_FLUSH` (`SEND_FLUSH`).
    pub flush: bool,
    /// `NBD_CMD_FLAG_FUA` (`SEND_FUA`).
    pub fua: bool,
    /// `NBD_CMD_TRIM` (`SEND_TRIM`; never advertised on a read-only export).
    pub trim: bool,
    /// `NBD_CMD_WRITE_ZEROES` (`SEND_WRITE_ZEROES`; never advertised on a read-only export).
    pub write_zeroes: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO` (`SEND_FAST_ZERO`; only together with `write_zeroes`).
    pub fast_zero: bool,
    /// `NBD_CMD_CACHE` (`SEND_CACHE`).
    pub cache: bool,
    /// `CAN_MULTI_CONN`: only when flush/FUA on one connection cover writes of every other.
    pub multi_conn: bool,
    /// `ROTATIONAL` hint.
    pub rotational: bool,
    /// `NBD_CMD_FLAG_DF` (`SEND_DF`; only advertised once structured replies are negotiated).
    pub df: bool,
    /// The `base:allocation` metadata context (`NBD_CMD_BLOCK_STATUS`).
    pub base_allocation: bool,
}

/// One export the server offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// The name clients ask for (UTF-8, at most [`MAX_STRING`] bytes, unique; may be empty).
    pub name: String,
    /// A description for `NBD_INFO_DESCRIPTION` (at most [`MAX_STRING`] bytes; empty = none).
    pub description: String,
    /// Size in bytes (a multiple of `block_size.min`).
    pub size: u64,
    /// Every write-like command fails with `EPERM`.
    pub read_only: bool,
    /// Block-size constraints.
    pub block_size: BlockSize,
    /// Optional features.
    pub features: ExportFeatures,
}

const WHAT: &str = "nbd export config";

impl ExportConfig {
    /// A read-write export with default block sizes and no optional features.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            size,
            read_only: false,
            block_size: BlockSize::default(),
            features: ExportFeatures::default(),
        }
    }

    /// Checks string lengths, block sizes and that the size is a multiple of the minimum block
    /// size ([`ErrorKind::InvalidArgument`] / [`ErrorKind::TooLarge`]).
    pub fn validate(&self) -> Result<()> {
        for (what, s) in [
            ("export name", &self.name),
            ("description", &self.description),
        ] {
            if s.len() > MAX_STRING {
                return Err(CodecError::too_large(
                    what,
                    u64::try_from(s.len()).unwrap_or(u64::MAX),
                    MAX_STRING as u64,
                ));
            }
        }
        self.block_size.validate()?;
        if !self.size.is_multiple_of(u64::from(self.block_size.min)) {
            return Err(CodecError::new(
                ErrorKind::InvalidArgument,
                WHAT,
                format!(
                    "export {:?}: size {} is not a multiple of the minimum block size {}",
                    self.name, self.size, self.block_size.min
                ),
            ));
        }
        Ok(())
    }

    /// The transmission flags of this export on a connection that did (or did not) negotiate
    /// structured replies. Write-only features are dropped on a read-only export, `SEND_DF`
    /// needs structured replies and `SEND_FAST_ZERO` needs `SEND_WRITE_ZEROES`.
    pub fn transmission_flags(&self, structured_replies: bool) -> u16 {
        let f = &self.features;
        let writable = !self.read_only;
        let mut flags = TFLAG_HAS_FLAGS;
        let mut set = |on: bool, bit: u16| {
            if on {
                flags |= bit;
            }
        };
        set(self.read_only, TFLAG_READ_ONLY);
        set(f.flush, TFLAG_SEND_FLUSH);
        set(f.fua, TFLAG_SEND_FUA);
        set(f.rotational, TFLAG_ROTATIONAL);
        set(writable && f.trim, TFLAG_SEND_TRIM);
        set(writable && f.write_zeroes, TFLAG_SEND_WRITE_ZEROES);
        set(structured_replies && f.df, TFLAG_SEND_DF);
        set(f.multi_conn, TFLAG_CAN_MULTI_CONN);
        set(f.cache, TFLAG_SEND_CACHE);
        set(
            writable && f.write_zeroes && f.fast_zero,
            TFLAG_SEND_FAST_ZERO,
        );
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_rules() {
        assert!(BlockSize::default().validate().is_ok());
        let ok = BlockSize {
            min: 4096,
            preferred: 4096,
            max: 32 << 20,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            BlockSize { min: 3, ..ok },
            BlockSize {
                min: 128 * 1024,
                preferred: 128 * 1024,
                max: 32 << 20,
            },
            BlockSize {
                min: 1,
                preferred: 256,
                max: 32 << 20,
            },
            BlockSize {
                preferred: 8192 + 4096,
                ..ok
            },
            BlockSize { max: 2048, ..ok },
            BlockSize {
                max: (32 << 20) + 512,
                ..ok
            },
            BlockSize {
                max: u32::MAX - 4095,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_follow_features() {
        let mut e = ExportConfig::new("a", 1 << 20);
        assert_eq!(e.transmission_flags(false), TFLAG_HAS_FLAGS);
        e.features = ExportFeatures {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            rotational: true,
            df: true,
            base_allocation: true,
        };
        assert_eq!(e.transmission_flags(true), 0x0dfd);
        assert_eq!(e.transmission_flags(false), 0x0dfd & !TFLAG_SEND_DF);
        e.read_only = true;
        assert_eq!(
            e.transmission_flags(true),
            TFLAG_HAS_FLAGS
                | TFLAG_READ_ONLY
                | TFLAG_SEND_FLUSH
                | TFLAG_SEND_FUA
                | TFLAG_ROTATIONAL
                | TFLAG_SEND_DF
                | TFLAG_CAN_MULTI_CONN
                | TFLAG_SEND_CACHE
        );
    }

    #[test]
    fn size_must_be_aligned() {
        let mut e = ExportConfig::new("a", 4097);
        e.block_size.min = 4096;
        assert_eq!(e.validate().unwrap_err().kind(), ErrorKind::InvalidArgument);
        e.size = 8192;
        assert!(e.validate().is_ok());
        e.name = "x".repeat(MAX_STRING + 1);
        assert_eq!(e.validate().unwrap_err().kind(), ErrorKind::TooLarge);
    }
}
