//! `thaw demo`: builds a small layered, compressed image in a local directory and serves it over
//! NBD, read-write (the zero-setup main job).
//!
//! The image is a real ext4 filesystem (`mkfs.ext4 -d` from a few generated files), stored as a
//! zstd-framed base build, plus one diff layer made by changing files in a copy with `debugfs -w`
//! (only the blocks that changed go into the layer, exactly as a paused sandbox's do).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde::{Deserialize, Serialize};
use thaw_codec::diff::{DiffMetadata, child_header};
use thaw_codec::{BuildId, CompressionType, FileKind, PAGE_SIZE};

use super::serve::{ExportSpec, OverlayDir, open_exports, print_uris};
use crate::chain::base_header;
use crate::engine::{Engine, EngineConfig};
use crate::nbd::{ListenAddr, ServeOptions, Server};
use crate::store::FileStore;
use crate::writer::{WriteOptions, store_build_file};

/// Help text.
pub const LONG_ABOUT: &str = "Build a small layered, compressed disk image in --dir (an ext4 \
filesystem with a few files as a zstd-framed base build, plus one diff layer), then serve it \
read-write over NBD on a unix socket and a loopback TCP port, printing the URIs and commands to \
try. Writes go to a copy-on-write overlay; the image is never modified. Runs until \
SIGINT/SIGTERM. A second run in the same directory reuses the image.";

/// `thaw demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the image, the store and the socket go (created; default: a new directory under
    /// /tmp).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Device size of the image.
    #[arg(long, default_value = "64MiB", value_parser = super::parse_size)]
    pub size: u64,

    /// TCP port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

/// What a demo directory holds (`demo.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoManifest {
    /// The base build.
    pub base: BuildId,
    /// The diff layer on top of it.
    pub top: BuildId,
    /// Device size.
    pub size: u64,
    /// Blocks the diff layer changed.
    pub changed_blocks: u64,
    /// The raw image the top layer reads as (for comparisons).
    pub top_image: PathBuf,
    /// The raw image the base build reads as.
    pub base_image: PathBuf,
}

const MANIFEST: &str = "demo.json";

fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found (install e2fsprogs)")
}

fn run_tool(name: &str, args: &[&OsStr]) -> anyhow::Result<()> {
    let out = Command::new(tool(name)?)
        .args(args)
        .output()
        .with_context(|| format!("running {name}"))?;
    ensure!(
        out.status.success(),
        "{name} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Deterministic filler bytes (xorshift), so the demo image compresses like real data would.
fn filler(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half text-like bytes, half noise: realistic compression ratios.
        let b = x.to_le_bytes();
        v.extend_from_slice(&[b'a' + b[0] % 26, b'a' + b[1] % 26, b[2], b' ']);
    }
    v.truncate(len);
    v
}

fn write_files(src: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(src.join("etc"))?;
    fs::create_dir_all(src.join("data"))?;
    fs::write(
        src.join("README.txt"),
        "This filesystem is served by thaw over NBD, lazily, from a compressed layered image.\n",
    )?;
    fs::write(src.join("etc/hostname"), "thaw-demo\n")?;
    fs::write(src.join("hello.txt"), "hello from the base build\n")?;
    fs::write(src.join("data/blob.bin"), filler(3 << 20, 42))?;
    fs::write(src.join("data/notes.txt"), filler(200_000, 7))?;
    Ok(())
}

/// Builds the image into `dir` (see the module docs).
///
/// # Errors
/// mkfs.ext4/debugfs missing or failing, store I/O.
pub fn build(dir: &Path, size: u64) -> anyhow::Result<DemoManifest> {
    ensure!(
        size >= 8 << 20 && size.is_multiple_of(PAGE_SIZE),
        "--size must be a multiple of 4 KiB and at least 8 MiB"
    );
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let src = dir.join("files");
    write_files(&src)?;
    let base_img = dir.join("base.ext4");
    let top_img = dir.join("top.ext4");
    let _ = fs::remove_file(&base_img);
    run_tool(
        "mkfs.ext4",
        &[
            OsStr::new("-q"),
            OsStr::new("-F"),
            OsStr::new("-b"),
            OsStr::new("4096"),
            OsStr::new("-L"),
            OsStr::new("thaw-demo"),
            OsStr::new("-d"),
            src.as_os_str(),
            base_img.as_os_str(),
            OsStr::new(&format!("{}k", size / 1024)),
        ],
    )?;
    // The diff layer: what a sandbox would have changed before its pause.
    fs::copy(&base_img, &top_img)?;
    let layer_file = dir.join("layer.txt");
    fs::write(&layer_file, "written in the diff layer\n")?;
    let hello = dir.join("hello-v2.txt");
    fs::write(
        &hello,
        "hello from the diff layer (this file replaced the base's)\n",
    )?;
    let script = dir.join("debugfs.cmds");
    fs::write(
        &script,
        format!(
            "rm /hello.txt\nwrite {} /hello.txt\nwrite {} /layer.txt\nmkdir /var\n",
            hello.display(),
            layer_file.display()
        ),
    )?;
    run_tool(
        "debugfs",
        &[
            OsStr::new("-w"),
            OsStr::new("-f"),
            script.as_os_str(),
            top_img.as_os_str(),
        ],
    )?;

    let base = fs::read(&base_img)?;
    let top = fs::read(&top_img)?;
    ensure!(
        base.len() as u64 == size && top.len() == base.len(),
        "image sizes"
    );
    let bs = usize::try_from(PAGE_SIZE)?;
    let blocks = size / PAGE_SIZE;
    fn block(img: &[u8], b: u64, bs: usize) -> &[u8] {
        let s = usize::try_from(b).unwrap_or(0) * bs;
        img.get(s..s + bs).unwrap_or_default()
    }
    let is_zero = |d: &[u8]| d.iter().all(|&x| x == 0);
    let push = |runs: &mut Vec<std::ops::Range<u64>>, b: u64| match runs.last_mut() {
        Some(r) if r.end == b => r.end = b + 1,
        _ => runs.push(b..b + 1),
    };
    let mut zero_runs = Vec::new();
    let mut dirty = Vec::new();
    let mut empty = Vec::new();
    let mut packed = Vec::new();
    for b in 0..blocks {
        let (old, new) = (block(&base, b, bs), block(&top, b, bs));
        if is_zero(old) {
            push(&mut zero_runs, b);
        }
        if old != new {
            if is_zero(new) {
                push(&mut empty, b);
            } else {
                push(&mut dirty, b);
                packed.extend_from_slice(new);
            }
        }
    }
    let store = FileStore::new(dir.join("store"));
    let opts = WriteOptions {
        codec: CompressionType::Zstd,
        level: 2,
        header_version: 4,
        ..WriteOptions::default()
    };
    let base_id = uuid::Uuid::new_v4();
    let top_id = uuid::Uuid::new_v4();
    let header = base_header(base_id, size, PAGE_SIZE, &zero_runs);
    let stored = store_build_file(
        &store,
        FileKind::Rootfs,
        &header,
        &mut base.as_slice(),
        size,
        &opts,
    )
    .context("storing the base build")?;
    let changed_blocks = dirty.iter().chain(&empty).map(|r| r.end - r.start).sum();
    let diff = DiffMetadata {
        block_size: PAGE_SIZE,
        dirty,
        empty,
    };
    let child = child_header(&stored.header, top_id, &diff).context("diff header")?;
    store_build_file(
        &store,
        FileKind::Rootfs,
        &child,
        &mut packed.as_slice(),
        packed.len() as u64,
        &opts,
    )
    .context("storing the diff layer")?;
    let manifest = DemoManifest {
        base: base_id,
        top: top_id,
        size,
        changed_blocks,
        top_image: top_img,
        base_image: base_img,
    };
    fs::write(dir.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?)?;
    for p in [&script, &layer_file, &hello] {
        let _ = fs::remove_file(p);
    }
    Ok(manifest)
}

/// Runs `thaw demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("thaw-demo-{}", std::process::id())),
    };
    let dir = std::path::absolute(&dir)?;
    let manifest = match fs::read(dir.join(MANIFEST)) {
        Ok(bytes) => serde_json::from_slice::<DemoManifest>(&bytes)
            .with_context(|| format!("parsing {}", dir.join(MANIFEST).display()))?,
        Err(_) => build(&dir, args.size)?,
    };
    let store = FileStore::new(dir.join("store"));
    let stored_bytes: u64 = [manifest.base, manifest.top]
        .iter()
        .filter_map(|id| fs::read_dir(dir.join("store").join(id.to_string())).ok())
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok().map(|m| m.len()))
        .sum();
    let engine = Engine::new(std::sync::Arc::new(store), EngineConfig::default())?;
    let overlay_dir = OverlayDir::new(None)?;
    let specs = [
        ExportSpec {
            name: "demo".into(),
            build: manifest.top,
            file: FileKind::Rootfs,
        },
        ExportSpec {
            name: "base".into(),
            build: manifest.base,
            file: FileKind::Rootfs,
        },
    ];
    let exports = open_exports(&engine, &specs, false, overlay_dir.path())?;
    let sock = dir.join("nbd.sock");
    let opts = ServeOptions {
        listen: vec![
            ListenAddr::Unix(sock.clone()),
            ListenAddr::Tcp(format!("127.0.0.1:{}", args.port)),
        ],
        ..ServeOptions::default()
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    let server = Server::start(exports, &opts)?;
    let tcp = server
        .addresses()
        .iter()
        .find_map(|a| match a {
            crate::nbd::BoundAddr::Tcp(t) => Some(*t),
            crate::nbd::BoundAddr::Unix(_) => None,
        })
        .context("no TCP listener")?;
    eprintln!(
        "thaw demo: {} MiB ext4 image in {}\n  base build {} (zstd frames)\n  top build  {} \
         (diff layer: {} blocks changed)\n  stored: {:.1} MiB of objects under {}/store",
        manifest.size >> 20,
        dir.display(),
        manifest.base,
        manifest.top,
        manifest.changed_blocks,
        stored_bytes as f64 / (1024.0 * 1024.0),
        dir.display(),
    );
    eprintln!(
        "\nServing read-write (writes go to a copy-on-write overlay, dropped at exit). Try:\n  \
         nbdinfo --list nbd://{tcp}\n  \
         nbdinfo --map nbd://{tcp}/demo\n  \
         qemu-img compare -f raw -F raw {top} nbd://{tcp}/demo\n  \
         nbdcopy 'nbd+unix:///demo?socket={sock}' /tmp/demo.raw && debugfs -R 'cat /hello.txt' /tmp/demo.raw\n  \
         qemu-io -f raw -c 'write -P 0xaa 0 4096' -c 'read -P 0xaa 0 4096' nbd://{tcp}/demo\n\
         Ctrl-C to stop.\n",
        top = manifest.top_image.display(),
        sock = sock.display(),
    );
    print_uris(&server)?;
    let sig = signals
        .forever()
        .next()
        .unwrap_or(signal_hook::consts::SIGTERM);
    eprintln!("thaw demo: signal {sig}, stopping");
    let left = server.shutdown(std::time::Duration::from_secs(10));
    if left > 0 {
        eprintln!("thaw demo: {left} connections still open at the deadline");
    }
    drop(overlay_dir);
    Ok(())
}
