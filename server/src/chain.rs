//! Layered test chains in e2b's layout: a base build plus N diff layers, each a packed diff with a
//! child header merged over its parent's, and the flattened image every layer must read back as.
//!
//! Every test and benchmark that serves bytes compares them with the flattened images written
//! here, so the generator goes through the same code paths as production writes: the child header
//! comes from [`thaw_codec::diff::child_header`] and every build file is stored with
//! [`crate::writer::store_build_file`].

use std::collections::BTreeMap;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thaw_codec::diff::{DiffMetadata, child_header};
use thaw_codec::{BuildId, FileKind, Header, Mapping, Metadata, NIL_BUILD, PAGE_SIZE};

use crate::store::Store;
use crate::writer::{WriteOptions, store_build_file};

/// What to generate.
#[derive(Debug, Clone)]
pub struct ChainSpec {
    /// Diff layers on top of the base build (0 = base only).
    pub layers: usize,
    /// Device size of every file, in bytes (rounded up to the block size).
    pub size: u64,
    /// Block size of the memfile (4096, or 2 MiB for a hugepage guest). The rootfs always uses
    /// 4 KiB blocks, as e2b's does.
    pub memfile_block_size: u64,
    /// Which files each build has.
    pub files: Vec<FileKind>,
    /// Seed of every random choice: the same spec gives the same bytes.
    pub seed: u64,
    /// Fraction of blocks each diff layer rewrites (in runs of 1..=16 blocks).
    pub dirty_fraction: f64,
    /// Fraction of blocks each layer (the base included) turns into zeros.
    pub zero_fraction: f64,
    /// How every build file is stored (codec, frame size, header version, workers).
    pub write: WriteOptions,
}

/// One generated build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChainLayer {
    /// The build id.
    pub build_id: BuildId,
    /// Its generation (base = 0).
    pub generation: u64,
    /// Per file: the flattened image this build must read back as.
    pub files: BTreeMap<String, ExpectedFile>,
}

/// The truth for one build file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExpectedFile {
    /// Path of the flattened image (absolute).
    pub flat: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// Bytes of this build's own (uncompressed) packed data file.
    pub diff_bytes: u64,
    /// Mapping entries in this build's header.
    pub mappings: usize,
}

/// What [`generate`] wrote: `chain.json` in the expected-images directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChainManifest {
    /// The store the builds were written to.
    pub store: String,
    /// Codec name of the stored data objects.
    pub codec: String,
    /// Header format version of the stored headers.
    pub header_version: u16,
    /// The builds, base first; each layer's parent is the one before it.
    pub layers: Vec<ChainLayer>,
}

impl ChainManifest {
    /// The manifest file name inside the expected-images directory.
    pub const FILE_NAME: &'static str = "chain.json";

    /// Reads a manifest written by [`generate`].
    pub fn load(expected_dir: &Path) -> anyhow::Result<Self> {
        let path = expected_dir.join(Self::FILE_NAME);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The top (last) layer.
    pub fn top(&self) -> Option<&ChainLayer> {
        self.layers.last()
    }
}

/// Generates a chain into `store` and its flattened images (plus `chain.json`) into
/// `expected_dir`.
pub fn generate(
    store: &dyn Store,
    expected_dir: &Path,
    spec: &ChainSpec,
) -> anyhow::Result<ChainManifest> {
    ensure!(spec.size > 0, "chain size must be positive");
    ensure!(
        (0.0..=1.0).contains(&spec.dirty_fraction) && (0.0..=1.0).contains(&spec.zero_fraction),
        "dirty and zero fractions must lie in [0, 1]"
    );
    if spec.memfile_block_size != PAGE_SIZE && spec.memfile_block_size != thaw_codec::HUGEPAGE_SIZE
    {
        bail!(
            "memfile block size must be 4096 or 2097152, not {}",
            spec.memfile_block_size
        );
    }
    fs::create_dir_all(expected_dir)
        .with_context(|| format!("creating {}", expected_dir.display()))?;

    let mut rng = SmallRng::seed_from_u64(spec.seed);
    let ids: Vec<BuildId> = (0..=spec.layers)
        .map(|_| random_build_id(&mut rng))
        .collect();
    let base_id = ids[0];
    let mut layers: Vec<ChainLayer> = ids
        .iter()
        .enumerate()
        .map(|(generation, &build_id)| ChainLayer {
            build_id,
            generation: generation as u64,
            files: BTreeMap::new(),
        })
        .collect();

    for &file in &spec.files {
        let block = match file {
            FileKind::Rootfs => PAGE_SIZE,
            FileKind::Memfile => spec.memfile_block_size,
        };
        let size = spec.size.div_ceil(block) * block;
        let blocks = size / block;
        let block_len = usize::try_from(block)?;

        // Base: a full data file; its zero runs are nil mappings (the data file holds zeros there).
        let mut flat = vec![0u8; usize::try_from(size)?];
        let zero_runs = pick_runs(&mut rng, blocks, spec.zero_fraction, &[]);
        for (i, chunk) in flat.chunks_mut(block_len).enumerate() {
            if !in_runs(&zero_runs, i as u64) {
                fill_block(&mut rng, chunk);
            }
        }
        let base_header = base_header(base_id, size, block, &zero_runs);
        let stored = store_build_file(
            store,
            file,
            &base_header,
            &mut flat.as_slice(),
            size,
            &spec.write,
        )
        .with_context(|| format!("storing base {base_id}/{file}"))?;
        layers[0].files.insert(
            file.name().to_string(),
            write_expected(expected_dir, base_id, file, &flat, size, &base_header)?,
        );
        let mut parent = stored.header;

        for (generation, layer) in layers.iter_mut().enumerate().skip(1) {
            let dirty = pick_runs(&mut rng, blocks, spec.dirty_fraction, &[]);
            let empty = pick_runs(&mut rng, blocks, spec.zero_fraction, &dirty);
            let mut packed = Vec::new();
            for run in &dirty {
                for b in run.clone() {
                    let start = usize::try_from(b * block)?;
                    let dst = &mut flat[start..start + block_len];
                    fill_block(&mut rng, dst);
                    packed.extend_from_slice(dst);
                }
            }
            for run in &empty {
                let start = usize::try_from(run.start * block)?;
                let end = usize::try_from(run.end * block)?;
                flat[start..end].fill(0);
            }
            let diff = DiffMetadata {
                block_size: block,
                dirty,
                empty,
            };
            let child = child_header(&parent, layer.build_id, &diff).with_context(|| {
                format!("building the header of generation {generation} ({file})")
            })?;
            let stored = store_build_file(
                store,
                file,
                &child,
                &mut packed.as_slice(),
                packed.len() as u64,
                &spec.write,
            )
            .with_context(|| format!("storing {}/{file}", layer.build_id))?;
            let mut expected = write_expected(
                expected_dir,
                layer.build_id,
                file,
                &flat,
                size,
                &stored.header,
            )?;
            expected.diff_bytes = packed.len() as u64;
            layer.files.insert(file.name().to_string(), expected);
            parent = stored.header;
        }
    }

    let manifest = ChainManifest {
        store: store.url(),
        codec: spec.write.codec.as_str().to_string(),
        header_version: spec.write.header_version,
        layers,
    };
    let path = expected_dir.join(ChainManifest::FILE_NAME);
    fs::write(&path, serde_json::to_vec_pretty(&manifest)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(manifest)
}

/// A random (version 4) build id drawn from the generator's own RNG, so chains are reproducible.
fn random_build_id(rng: &mut SmallRng) -> BuildId {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// The base build's header: its own data, identity-mapped, with `zero_runs` (in blocks) as nil.
pub fn base_header(build: BuildId, size: u64, block: u64, zero_runs: &[Range<u64>]) -> Header {
    let mut mappings = Vec::new();
    let mut at = 0u64;
    let push = |mappings: &mut Vec<Mapping>, start: u64, end: u64, nil: bool| {
        if end > start {
            mappings.push(Mapping {
                offset: start,
                length: end - start,
                build_id: if nil { NIL_BUILD } else { build },
                build_storage_offset: if nil { 0 } else { start },
            });
        }
    };
    for run in zero_runs {
        push(&mut mappings, at, run.start * block, false);
        push(&mut mappings, run.start * block, run.end * block, true);
        at = run.end * block;
    }
    push(&mut mappings, at, size, false);
    Header {
        metadata: Metadata {
            version: 3,
            block_size: block,
            size,
            generation: 0,
            build_id: build,
            base_build_id: build,
        },
        incomplete: false,
        builds: BTreeMap::new(),
        mappings,
    }
}

/// Sorted, non-overlapping runs of 1..=16 blocks covering about `fraction` of `blocks`, avoiding
/// the runs in `avoid`.
fn pick_runs(
    rng: &mut SmallRng,
    blocks: u64,
    fraction: f64,
    avoid: &[Range<u64>],
) -> Vec<Range<u64>> {
    // Block counts of a generated chain fit in memory as a Vec<bool>, so usize is wide enough.
    let n = usize::try_from(blocks).unwrap_or(0);
    let target = fraction_of(n, fraction);
    let mut taken = vec![false; n];
    for run in avoid {
        for b in run.clone() {
            if let Some(t) = usize::try_from(b).ok().and_then(|b| taken.get_mut(b)) {
                *t = true;
            }
        }
    }
    let mut chosen = 0usize;
    let mut attempts = 0u32;
    while chosen < target && attempts < 100_000 {
        attempts += 1;
        let len = rng.random_range(1..=16usize).min(target - chosen);
        if len > n {
            break;
        }
        let start = rng.random_range(0..=n - len);
        let range = start..start + len;
        if taken[range.clone()].iter().any(|&t| t) {
            continue;
        }
        taken[range].fill(true);
        chosen += len;
    }
    // Collect runs of blocks taken here (not in `avoid`).
    let mut runs: Vec<Range<u64>> = Vec::new();
    for (b, &t) in (0u64..).zip(taken.iter()) {
        if !t || in_runs(avoid, b) {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.end == b => last.end = b + 1,
            _ => runs.push(b..b + 1),
        }
    }
    runs
}

/// `round(n * fraction)` for a fraction in [0, 1].
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
fn fraction_of(n: usize, fraction: f64) -> usize {
    // The product is clamped to [0, n] before the cast, so it neither truncates nor loses a sign.
    (n as f64 * fraction).round().clamp(0.0, n as f64) as usize
}

fn in_runs(runs: &[Range<u64>], block: u64) -> bool {
    let i = runs.partition_point(|r| r.end <= block);
    runs.get(i).is_some_and(|r| r.contains(&block))
}

/// Fills one block with ~3x-compressible data: a mix of random bytes, short repeated patterns
/// and text-like bytes from a small alphabet, in 512-byte pieces.
fn fill_block(rng: &mut SmallRng, block: &mut [u8]) {
    for piece in block.chunks_mut(512) {
        match rng.random_range(0..8u8) {
            0 => rng.fill_bytes(piece),
            1..=4 => {
                let pattern: [u8; 8] = rng.random();
                for (i, b) in piece.iter_mut().enumerate() {
                    *b = pattern[i % 8];
                }
            }
            _ => {
                for b in piece.iter_mut() {
                    *b = b"etaoin shrdlu\n"[rng.random_range(0..14usize)];
                }
            }
        }
    }
}

fn write_expected(
    dir: &Path,
    build: BuildId,
    file: FileKind,
    flat: &[u8],
    size: u64,
    header: &Header,
) -> anyhow::Result<ExpectedFile> {
    let build_dir = dir.join(build.to_string());
    fs::create_dir_all(&build_dir)?;
    let path = build_dir.join(format!("{}.raw", file.name()));
    fs::write(&path, flat).with_context(|| format!("writing {}", path.display()))?;
    let path = fs::canonicalize(&path)?;
    Ok(ExpectedFile {
        flat: path,
        size,
        sha256: hex::encode(Sha256::digest(flat)),
        diff_bytes: size,
        mappings: header.mappings.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_sorted_disjoint_and_avoid() {
        let mut rng = SmallRng::seed_from_u64(7);
        let a = pick_runs(&mut rng, 1000, 0.1, &[]);
        let total: u64 = a.iter().map(|r| r.end - r.start).sum();
        assert!((90..=110).contains(&total), "{total}");
        assert!(a.windows(2).all(|w| w[0].end < w[1].start));
        let b = pick_runs(&mut rng, 1000, 0.1, &a);
        for r in &b {
            for x in r.clone() {
                assert!(!in_runs(&a, x));
            }
        }
    }

    #[test]
    fn base_header_covers_device() {
        let id = BuildId::from_u128(1);
        let h = base_header(id, 64 * 4096, 4096, &[2..4, 10..11]);
        let mut at = 0;
        for m in &h.mappings {
            assert_eq!(m.offset, at);
            at = m.end();
        }
        assert_eq!(at, 64 * 4096);
        assert_eq!(h.mappings.iter().filter(|m| m.is_nil()).count(), 2);
    }
}
