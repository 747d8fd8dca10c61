//! The daemon's control channel: a unix socket beside the mount record
//! (owner-only), answering `strata stats` and streaming `strata trace`.
//!
//! Protocol: the client sends one line, `stats` or `stats json`, or
//! `trace FORMAT SCOPE` (FORMAT: human, color or json; SCOPE: changes or
//! all). Stats are answered and the connection closed; a trace stays open
//! and receives one line per event until the client hangs up.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::store::human;
use crate::trace::Format;
use crate::unionfs::UnionFs;

/// Make the socket at `path` (owner-only). It is bound before the daemon
/// detaches, so it exists as soon as `strata mount` returns.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answer requests on `listener` in a background thread for the life of
/// the process.
pub fn serve(fs: Arc<UnionFs>, listener: UnixListener, mountpoint: &Path) {
    let mountpoint = mountpoint.to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let fs = fs.clone();
            let mountpoint = mountpoint.clone();
            std::thread::spawn(move || {
                if let Err(err) = answer(&fs, stream, &mountpoint) {
                    log::debug!("control client: {err}");
                }
            });
        }
    });
}

fn answer(fs: &UnionFs, stream: UnixStream, mountpoint: &Path) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut stream = stream;
    match words.as_slice() {
        ["stats"] => stream.write_all(stats_text(fs, mountpoint).as_bytes()),
        ["stats", "json"] => stream.write_all(format!("{}\n", stats_json(fs, mountpoint)).as_bytes()),
        ["trace", format, scope] => {
            let format = match *format {
                "json" => Format::Json,
                "color" => Format::Human { color: true },
                _ => Format::Human { color: false },
            };
            fs.monitor.subscribe(Box::new(stream), format, *scope == "all");
            Ok(())
        }
        _ => stream.write_all(b"error: unknown request\n"),
    }
}

/// Resident and peak memory of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn stats_json(fs: &UnionFs, mountpoint: &Path) -> serde_json::Value {
    let m = &fs.monitor;
    let lookups: Vec<serde_json::Value> = m
        .lookups_per_layer
        .iter()
        .enumerate()
        .map(|(layer, count)| {
            serde_json::json!({
                "layer": fs.stack.describe(layer),
                "dir": fs.stack.layers[layer].path,
                "lookups": count.load(Ordering::Relaxed),
            })
        })
        .collect();
    let (rss, peak) = memory();
    serde_json::json!({
        "mountpoint": mountpoint,
        "lookups": lookups,
        "copy_ups": m.copy_ups.load(Ordering::Relaxed),
        "copied_bytes": m.copied_bytes.load(Ordering::Relaxed),
        "whiteouts": m.whiteouts.load(Ordering::Relaxed),
        "opaque_dirs": m.opaque_dirs.load(Ordering::Relaxed),
        "redirects": m.redirects.load(Ordering::Relaxed),
        "created": m.creates.load(Ordering::Relaxed),
        "passthrough_opens": m.passthrough_opens.load(Ordering::Relaxed),
        "open_requests": m.open_requests.load(Ordering::Relaxed),
        "open_files": fs.open_files(),
        "inode_files": fs.inode_files(),
        "cached_inodes": fs.cached_inodes(),
        "memory_bytes": rss,
        "peak_memory_bytes": peak,
    })
}

fn stats_text(fs: &UnionFs, mountpoint: &Path) -> String {
    let m = &fs.monitor;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut text = format!("mount           {}\n", mountpoint.display());
    text += "lookups served\n";
    for (layer, count) in m.lookups_per_layer.iter().enumerate() {
        text += &format!(
            "  {:<22} {:>8}   {}\n",
            fs.stack.describe(layer),
            get(count),
            fs.stack.layers[layer].path.display()
        );
    }
    let (rss, peak) = memory();
    text += &format!("copy-ups        {} ({} copied)\n", get(&m.copy_ups), human(get(&m.copied_bytes)));
    text += &format!("whiteouts       {}\n", get(&m.whiteouts));
    text += &format!("opaque dirs     {}\n", get(&m.opaque_dirs));
    text += &format!("redirects       {}\n", get(&m.redirects));
    text += &format!("created         {}\n", get(&m.creates));
    text += &format!("passthrough     {} opens\n", get(&m.passthrough_opens));
    text += &format!("open requests   {}\n", get(&m.open_requests));
    text += &format!("open files      {} handles, {} served by inode\n", fs.open_files(), fs.inode_files());
    text += &format!("cached inodes   {}\n", fs.cached_inodes());
    text += &format!("memory          {} (peak {})\n", human(rss), human(peak));
    text
}

/// Send one request to the daemon serving `socket`; the stream carries the answer.
pub fn request(socket: &Path, line: &str) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    Ok(stream)
}
