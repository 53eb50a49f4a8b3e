//! The build writer: the one code path that stores a build file (used by `thaw compress`, the
//! chain generator, and later by pause/export).
//!
//! Order, as e2b's upload: the data object first (framed and compressed in parallel, or plain),
//! with the SHA-256 of the uncompressed bytes computed on the fly; then the header, whose builds
//! section (V4/V5) carries the self entry (full frame table, size, checksum) and one entry per
//! ancestor build the mappings reference. A header is never stored before its data object.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use thaw_codec::frame_table::MAX_FRAME_SIZE;
use thaw_codec::names::{data_object, header_object};
use thaw_codec::{
    BuildData, BuildId, CompressionType, FileKind, Frame, FrameEncoder, FrameTable, Header,
    PAGE_SIZE,
};

use crate::layout::{read_stored_header, self_entry};
use crate::store::{ObjectWriter, PutOptions, Store};

/// How to store a build file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOptions {
    /// Codec of the data object (`None` = plain object, no frame table).
    pub codec: CompressionType,
    /// zstd level (e2b uses 1..=4); ignored by the other codecs.
    pub level: i32,
    /// Uncompressed bytes per frame: a multiple of the header's block size and of 4096.
    pub frame_size: u64,
    /// Header format version to store: 3, 4 or 5 (3 requires `codec == None`).
    pub header_version: u16,
    /// Frame encoding threads (0 is treated as 1).
    pub workers: usize,
    /// Show a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            codec: CompressionType::Zstd,
            level: 2,
            frame_size: thaw_codec::DEFAULT_FRAME_SIZE,
            header_version: 4,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            progress: false,
        }
    }
}

/// What [`store_build_file`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// The header as stored (version, builds section).
    pub header: Header,
    /// Key of the data object.
    pub data_object: String,
    /// Uncompressed size of the data file.
    pub uncompressed_size: u64,
    /// Size of the stored data object.
    pub stored_size: u64,
    /// SHA-256 of the uncompressed data.
    pub sha256: [u8; 32],
    /// Number of frames (0 for a plain object).
    pub frames: usize,
    /// Wall time spent.
    pub elapsed: Duration,
}

/// Stores `file` of build `header.metadata.build_id`: reads `data_len` uncompressed bytes from
/// `data` (the packed data file of this build), writes the data object (framed per `opts.codec`,
/// or plain), then the header: `header` with version set to `opts.header_version`, self
/// [`BuildData`] (full frame table, size, SHA-256 computed on the fly) and ancestor entries for
/// every other non-nil build the mappings reference (loaded from that build's own header in
/// `store`: its self entry trimmed with [`FrameTable::trimmed`] to the ranges referenced, or a
/// zero `BuildData` when the ancestor's header is V3/legacy). When the ancestor has no header in
/// `store` at all (e.g. writing into another store than the chain's), the entry `header` itself
/// carries for it is kept (trimmed), else a zero entry. Data object first, header last; with
/// `header_version` 3 the codec must be `None` (V3 has no builds section).
pub fn store_build_file(
    store: &dyn Store,
    file: FileKind,
    header: &Header,
    data: &mut dyn Read,
    data_len: u64,
    opts: &WriteOptions,
) -> anyhow::Result<StoredFile> {
    let started = Instant::now();
    let build = header.metadata.build_id;
    check_inputs(header, data_len, opts)
        .with_context(|| format!("storing build {build} {file}"))?;

    let key = data_object(build, file, opts.codec);
    // `uncompressed-size` on every data object, plain ones too (where it equals the size): a
    // plain object carrying it was stored with a header, so if the header never lands (a crash
    // between the two) the object is refused rather than opened as a legacy headerless build
    // (`layout::load_header`).
    let put_opts = PutOptions::with_uncompressed_size(data_len);
    let mut writer = store.create(&key, &put_opts)?;
    let progress = progress_bar(opts.progress, data_len, &format!("{build}/{file}"));
    let (frames, sha256, writer) = if opts.codec == CompressionType::None {
        let sha = copy_plain(data, data_len, &mut *writer, &progress)?;
        (Vec::new(), sha, writer)
    } else {
        encode_frames(data, data_len, writer, opts, &progress)?
    };
    let stored_size = writer.written();
    writer
        .commit()
        .with_context(|| format!("committing {key}"))?;
    progress.finish_and_clear();

    let table = if opts.codec == CompressionType::None {
        FrameTable::uncompressed()
    } else {
        FrameTable::new(opts.codec, frames.clone())
            .with_context(|| format!("frame table of {key}"))?
    };
    let self_data = BuildData {
        size: data_len,
        checksum: sha256,
        frames: table,
    };
    let stored = stored_header(store, file, header, opts, self_data)?;
    let bytes = stored
        .to_bytes()
        .with_context(|| format!("serialising the header of build {build} {file}"))?;
    store.put(&header_object(build, file), &bytes, &PutOptions::default())?;
    tracing::info!(%build, %file, object = %key, data_len, stored_size, frames = frames.len(), "stored build file");
    Ok(StoredFile {
        header: stored,
        data_object: key,
        uncompressed_size: data_len,
        stored_size,
        sha256,
        frames: frames.len(),
        elapsed: started.elapsed(),
    })
}

fn check_inputs(header: &Header, data_len: u64, opts: &WriteOptions) -> anyhow::Result<()> {
    let build = header.metadata.build_id;
    ensure!(!build.is_nil(), "the header's build id is nil");
    ensure!(
        matches!(opts.header_version, 3..=5),
        "header version {} is not one of 3, 4, 5",
        opts.header_version
    );
    ensure!(
        opts.header_version >= 4 || opts.codec == CompressionType::None,
        "header version 3 has no builds section, so it cannot describe a {} data object",
        opts.codec.as_str()
    );
    let block = header.metadata.block_size;
    ensure!(block != 0, "the header's block size is 0");
    let fs = opts.frame_size;
    ensure!(
        fs != 0 && fs.is_multiple_of(PAGE_SIZE) && fs.is_multiple_of(block),
        "frame size {fs} must be a non-zero multiple of 4096 and of the block size {block}"
    );
    ensure!(
        fs <= u64::from(MAX_FRAME_SIZE) / 2,
        "frame size {fs} exceeds the limit of {} bytes",
        MAX_FRAME_SIZE / 2
    );
    header.validate().context("invalid header")?;
    let size = header.metadata.size;
    for (i, m) in header.mappings.iter().enumerate() {
        if m.build_id != build || m.offset >= size {
            continue;
        }
        let len = m.end().min(size) - m.offset;
        let end = m
            .build_storage_offset
            .checked_add(len)
            .with_context(|| format!("mapping #{i} overflows"))?;
        ensure!(
            end <= data_len,
            "mapping #{i} [{}, +{len}) references [{}, {end}) of this build's data, which has only {data_len} bytes",
            m.offset,
            m.build_storage_offset
        );
    }
    Ok(())
}

/// The header to store: version, builds section (self + ancestors).
fn stored_header(
    store: &dyn Store,
    file: FileKind,
    header: &Header,
    opts: &WriteOptions,
    self_data: BuildData,
) -> anyhow::Result<Header> {
    let build = header.metadata.build_id;
    let mut out = header.clone();
    out.metadata.version = u64::from(opts.header_version);
    out.incomplete = false;
    out.builds = BTreeMap::new();
    if opts.header_version >= 4 {
        let size = header.metadata.size;
        let mut refs: BTreeMap<BuildId, Vec<(u64, u64)>> = BTreeMap::new();
        for m in &header.mappings {
            if m.is_nil() || m.build_id == build || m.offset >= size {
                continue;
            }
            let len = m.end().min(size) - m.offset;
            let end = m.build_storage_offset.saturating_add(len);
            refs.entry(m.build_id)
                .or_default()
                .push((m.build_storage_offset, end));
        }
        for (ancestor, ranges) in refs {
            let entry =
                ancestor_entry(store, file, ancestor, &ranges, header.build_data(&ancestor))
                    .with_context(|| format!("builds entry of ancestor {ancestor} ({file})"))?;
            out.builds.insert(ancestor, entry);
        }
        out.builds.insert(build, self_data);
    }
    out.validate()
        .with_context(|| format!("the header to store for build {build} {file}"))?;
    Ok(out)
}

fn ancestor_entry(
    store: &dyn Store,
    file: FileKind,
    ancestor: BuildId,
    ranges: &[(u64, u64)],
    fallback: Option<&BuildData>,
) -> anyhow::Result<BuildData> {
    let trim = |e: &BuildData| BuildData {
        size: e.size,
        checksum: e.checksum,
        frames: if e.frames.is_compressed() {
            e.frames.trimmed(ranges)
        } else {
            e.frames.clone()
        },
    };
    Ok(match read_stored_header(store, ancestor, file)? {
        Some(h) => self_entry(&h).map(trim).unwrap_or_default(),
        None if store.exists(&data_object(ancestor, file, CompressionType::None))? => {
            BuildData::default()
        }
        None => fallback.map(trim).unwrap_or_default(),
    })
}

fn progress_bar(enabled: bool, len: u64, label: &str) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_owned());
    bar
}

/// Reads `len` bytes into `buf` (resized), reporting a short input clearly.
fn read_chunk(
    data: &mut dyn Read,
    buf: &mut Vec<u8>,
    len: usize,
    pos: u64,
    total: u64,
) -> anyhow::Result<()> {
    buf.resize(len, 0);
    data.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            anyhow!(
                "the data ended before byte {} of the declared {total}",
                pos.saturating_add(u64::try_from(len).unwrap_or(u64::MAX))
            )
        } else {
            anyhow::Error::new(e).context(format!("reading the data at byte {pos}"))
        }
    })
}

fn copy_plain(
    data: &mut dyn Read,
    data_len: u64,
    writer: &mut dyn ObjectWriter,
    progress: &ProgressBar,
) -> anyhow::Result<[u8; 32]> {
    const CHUNK: u64 = 4 * 1024 * 1024;
    let mut sha = Sha256::new();
    let mut buf = Vec::new();
    let mut pos = 0u64;
    while pos < data_len {
        let n = usize::try_from((data_len - pos).min(CHUNK))?;
        read_chunk(data, &mut buf, n, pos, data_len)?;
        sha.update(&buf);
        writer.write_all(&buf).context("writing the data object")?;
        pos += u64::try_from(n)?;
        progress.inc(u64::try_from(n)?);
    }
    Ok(sha.finalize().into())
}

/// Frames written, SHA-256 of the uncompressed data, and the (uncommitted) writer.
type Written = (Vec<Frame>, [u8; 32], Box<dyn ObjectWriter>);
/// A frame to encode: index and uncompressed bytes.
type Job = (usize, Vec<u8>);
/// An encoded frame: index, the uncompressed buffer (recycled) and the compressed bytes.
type Encoded = (usize, Vec<u8>, anyhow::Result<Vec<u8>>);

/// Encodes the data in frames on `opts.workers` threads; at most 2 x workers frames are in flight
/// (buffers circulate as tokens), frames are written in order. Returns the frames, the SHA-256
/// and the writer (not yet committed).
fn encode_frames(
    data: &mut dyn Read,
    data_len: u64,
    writer: Box<dyn ObjectWriter>,
    opts: &WriteOptions,
    progress: &ProgressBar,
) -> anyhow::Result<Written> {
    let workers = opts.workers.max(1);
    let in_flight = workers.saturating_mul(2);
    let frame_size = opts.frame_size;
    let n_frames = usize::try_from(data_len.div_ceil(frame_size))?;
    let (job_tx, job_rx) = sync_channel::<Job>(workers);
    let job_rx = Mutex::new(job_rx);
    let (res_tx, res_rx) = sync_channel::<Encoded>(in_flight);
    let (tok_tx, tok_rx) = sync_channel::<Vec<u8>>(in_flight);
    for _ in 0..in_flight {
        tok_tx
            .send(Vec::new())
            .map_err(|_| anyhow!("token channel closed"))?;
    }

    std::thread::scope(|s| {
        let collector = s.spawn(move || collect(res_rx, tok_tx, writer, n_frames, progress));
        for _ in 0..workers {
            let res_tx = res_tx.clone();
            let job_rx = &job_rx;
            s.spawn(move || encode_worker(job_rx, res_tx, opts.codec, opts.level));
        }
        drop(res_tx);

        let read_result = (|| -> anyhow::Result<[u8; 32]> {
            let mut sha = Sha256::new();
            let mut pos = 0u64;
            for idx in 0..n_frames {
                // A closed token channel means the collector stopped: its error explains why.
                let Ok(mut buf) = tok_rx.recv() else {
                    return Ok([0; 32]);
                };
                let n = usize::try_from((data_len - pos).min(frame_size))?;
                read_chunk(data, &mut buf, n, pos, data_len)?;
                sha.update(&buf);
                if job_tx.send((idx, buf)).is_err() {
                    return Ok([0; 32]);
                }
                pos += u64::try_from(n)?;
            }
            Ok(sha.finalize().into())
        })();
        drop(job_tx);
        drop(tok_rx);
        let collected = collector
            .join()
            .map_err(|_| anyhow!("the frame writer thread panicked"))?;
        let sha = read_result?;
        let (frames, writer) = collected?;
        Ok((frames, sha, writer))
    })
}

fn encode_worker(
    jobs: &Mutex<Receiver<Job>>,
    results: SyncSender<Encoded>,
    codec: CompressionType,
    level: i32,
) {
    let mut encoder = FrameEncoder::new(codec, level).map_err(anyhow::Error::new);
    // Once the collector is gone (it failed), keep draining jobs without encoding them, so the
    // reader never blocks on a full job channel; it stops when its tokens run out.
    let mut collector_gone = false;
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((idx, src)) = job else { return };
        if collector_gone {
            continue;
        }
        let out = match encoder.as_mut() {
            Ok(enc) => {
                let mut dst = Vec::with_capacity(src.len() / 2);
                enc.encode(&src, &mut dst)
                    .map(|_| dst)
                    .map_err(|e| anyhow::Error::new(e).context(format!("encoding frame {idx}")))
            }
            Err(e) => Err(anyhow!("creating the {} encoder: {e}", codec.as_str())),
        };
        if results.send((idx, src, out)).is_err() {
            collector_gone = true;
        }
    }
}

/// Writes encoded frames in order, building the frame entries; returns each buffer as a token.
fn collect(
    results: Receiver<Encoded>,
    tokens: SyncSender<Vec<u8>>,
    mut writer: Box<dyn ObjectWriter>,
    n_frames: usize,
    progress: &ProgressBar,
) -> anyhow::Result<(Vec<Frame>, Box<dyn ObjectWriter>)> {
    let mut frames = Vec::with_capacity(n_frames);
    let mut pending: BTreeMap<usize, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
    let mut start_u = 0u64;
    let mut start_c = 0u64;
    while frames.len() < n_frames {
        let Ok((idx, src, out)) = results.recv() else {
            bail!(
                "frame encoders stopped after {} of {n_frames} frames",
                frames.len()
            );
        };
        pending.insert(idx, (src, out?));
        while let Some((src, compressed)) = pending.remove(&frames.len()) {
            let idx = frames.len();
            writer
                .write_all(&compressed)
                .with_context(|| format!("writing frame {idx}"))?;
            let size_u = u32::try_from(src.len()).context("frame too large")?;
            let size_c = u32::try_from(compressed.len())
                .with_context(|| format!("frame {idx} compressed to more than 4 GiB"))?;
            frames.push(Frame {
                start_u,
                start_c,
                size_u,
                size_c,
            });
            start_u += u64::from(size_u);
            start_c += u64::from(size_c);
            progress.inc(u64::from(size_u));
            // The reader may already be done; then nobody needs the buffer back.
            let _ = tokens.send(src);
        }
    }
    Ok((frames, writer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use thaw_codec::{Mapping, Metadata};

    fn header(size: u64, block: u64) -> Header {
        let build = uuid::Uuid::new_v4();
        Header {
            metadata: Metadata {
                version: 4,
                block_size: block,
                size,
                generation: 0,
                build_id: build,
                base_build_id: build,
            },
            incomplete: false,
            builds: BTreeMap::new(),
            mappings: vec![Mapping {
                offset: 0,
                length: size,
                build_id: build,
                build_storage_offset: 0,
            }],
        }
    }

    #[test]
    fn frame_size_must_fit_block_size() {
        let h = header(8192, 2 * 1024 * 1024);
        let opts = WriteOptions {
            frame_size: 1024 * 1024,
            ..WriteOptions::default()
        };
        let err = check_inputs(&h, 8192, &opts).unwrap_err();
        assert!(err.to_string().contains("frame size"), "{err}");
        let opts = WriteOptions {
            frame_size: 6000,
            ..WriteOptions::default()
        };
        assert!(check_inputs(&header(8192, 4096), 8192, &opts).is_err());
    }

    #[test]
    fn v3_needs_no_codec() {
        let h = header(8192, 4096);
        let opts = WriteOptions {
            header_version: 3,
            codec: CompressionType::Lz4,
            ..WriteOptions::default()
        };
        let err = check_inputs(&h, 8192, &opts).unwrap_err();
        assert!(err.to_string().contains("version 3"), "{err}");
        let opts = WriteOptions {
            header_version: 6,
            ..WriteOptions::default()
        };
        assert!(check_inputs(&h, 8192, &opts).is_err());
    }
}
