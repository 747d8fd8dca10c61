//! Strata: a union filesystem for container image layers.
//!
//! The flow, one module each: command line (here) -> mount configuration
//! (`config`) -> layer stack (`layers`) -> union filesystem core with its
//! inode table and copy-up (`unionfs`, `inodes`, `copyup`) -> FUSE adapter
//! (`fuse`), run by `daemon`. Raw system calls live in `sys`.

mod commit;
mod config;
mod control;
mod copyup;
mod daemon;
mod diff;
mod digest;
mod extract;
mod fuse;
mod idmap;
mod import;
mod inodes;
mod inspect;
mod layers;
mod passthrough;
mod store;
mod sys;
mod tarball;
mod trace;
mod unionfs;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::MountConfig;

#[derive(Parser)]
#[command(name = "strata", version, about = "A union filesystem for container image layers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount lower layers (read-only) under an upper directory (writable).
    Mount(MountArgs),
    /// Unmount a Strata mount and wait for its daemon to exit.
    #[command(alias = "unmount")]
    Umount { mountpoint: PathBuf },
    /// Counters of a running mount: lookups per layer, copy-ups, whiteouts, memory.
    Stats {
        mountpoint: PathBuf,
        /// `text` or `json`.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Watch a running mount change its layers: copy-ups, whiteouts, opaque dirs.
    Trace {
        mountpoint: PathBuf,
        /// Show lookups too (which layer served each path).
        #[arg(long)]
        all: bool,
        /// `human` or `json`.
        #[arg(long, default_value = "human")]
        format: String,
    },
    /// List what a container changed (A added, C changed, D deleted), as docker diff does.
    Diff(diff::DiffArgs),
    /// Write the upper layer's changes as an OCI layer tarball.
    Commit(commit::CommitArgs),
    /// Import a docker save archive or an OCI layout (directory or tar) into the layer store.
    Import(ImportArgs),
    /// List the images in the layer store.
    Images {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Remove an image (or one of its names) and the layers no other image uses.
    Rmi {
        #[command(flatten)]
        store: StoreArg,
        /// NAME[:TAG] or image id; repeat for more.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove leftovers of interrupted imports and ephemeral mounts, and unused layers.
    Prune {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Which layer serves a path of an image or a mount, and what it shadows.
    Whence {
        #[command(flatten)]
        store: StoreArg,
        /// An image (NAME[:TAG] or id) or the mount point of a Strata mount.
        target: String,
        /// A path inside it, as seen in the merged tree.
        path: PathBuf,
    },
    /// One row per layer of an image: what it added, changed, deleted and wastes.
    Layers {
        #[command(flatten)]
        store: StoreArg,
        image: String,
        /// `table` (default) or `json`.
        #[arg(long, default_value = "table")]
        format: String,
    },
}

#[derive(Args)]
struct StoreArg {
    /// The layer store (default /var/lib/strata for root, $XDG_DATA_HOME/strata otherwise).
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
}

#[derive(Args)]
struct ImportArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Name the imported image NAME:TAG (instead of the names in the archive).
    #[arg(long, value_name = "NAME:TAG")]
    tag: Option<String>,
    /// Which image of a multi-platform index (default: this machine's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// The most bytes one layer may decompress to (suffixes K, M, G, T).
    #[arg(long, value_name = "BYTES", default_value = "64G", value_parser = parse_bytes)]
    max_layer_size: u64,
    /// A docker save archive (tar, maybe compressed) or an OCI layout (directory or tar).
    path: PathBuf,
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let shift = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?} is not a size (like 512M or 64G)")),
    };
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size (like 512M or 64G)"))?;
    value.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Args)]
struct MountArgs {
    /// A lower layer; repeat for more, topmost first (like lowerdir=TOP:...:BOTTOM).
    #[arg(long = "lower", value_name = "DIR")]
    lowers: Vec<PathBuf>,
    /// Mount an imported image's layers (read-only unless --upper/--work or --ephemeral).
    #[arg(long, value_name = "NAME[:TAG]", conflicts_with = "lowers")]
    image: Option<String>,
    #[command(flatten)]
    store: StoreArg,
    /// With --image: a temporary upper layer, removed at unmount.
    #[arg(long, requires = "image", conflicts_with_all = ["upper", "work"])]
    ephemeral: bool,
    /// The writable upper directory; without it the mount is read-only.
    #[arg(long, value_name = "DIR")]
    upper: Option<PathBuf>,
    /// Scratch directory on the upper's filesystem, for atomic copy-up.
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
    /// fuse-overlayfs style options: lowerdir=A:B,upperdir=U,workdir=W,...
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Stay in the foreground instead of detaching once mounted.
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Log every FUSE operation (implies -f).
    #[arg(short = 'd', long)]
    debug: bool,
    /// More log output (repeat for more).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
    /// Event loops serving the mount.
    #[arg(long)]
    threads: Option<usize>,
    /// Keep at most N inodes (as `-o inode_cache=N`): above it, the least
    /// recently used ones the kernel does not need are dropped.
    #[arg(long, value_name = "N")]
    inode_cache: Option<usize>,
    /// Print each event that changes the layers (copy-up, whiteout, ...):
    /// to FILE, or to this terminal (the mount then stays in the foreground).
    /// `--trace=all` adds lookups on the terminal (a file named "all": `./all`).
    #[arg(long, value_name = "FILE", num_args = 0..=1, require_equals = true, default_missing_value = "-")]
    trace: Option<PathBuf>,
    /// With --trace: lookups too, showing which layer served each path.
    #[arg(long)]
    trace_all: bool,
    /// With --trace: `human` or `json`.
    #[arg(long, default_value = "human")]
    trace_format: String,
    mountpoint: PathBuf,
}

/// containers-storage runs a mount program as `PROGRAM -o OPTS TARGET` and
/// mount.fuse3 as `PROGRAM SOURCE TARGET -o OPTS`: both mean `mount`.
fn normalise_args(mut args: Vec<OsString>) -> Vec<OsString> {
    const COMMANDS: &[&str] = &[
        "mount",
        "umount",
        "unmount",
        "stats",
        "trace",
        "diff",
        "commit",
        "import",
        "images",
        "rmi",
        "prune",
        "whence",
        "layers",
        "help",
        "--help",
        "-h",
        "--version",
        "-V",
    ];
    let Some(first) = args.get(1).and_then(|a| a.to_str()).map(str::to_owned) else { return args };
    if COMMANDS.contains(&first.as_str()) {
        return args;
    }
    if first.starts_with('-') {
        args.insert(1, "mount".into());
    } else if args.len() >= 3 {
        // SOURCE is a free-form name ("overlay"); the layers are in -o.
        args[1] = "mount".into();
    }
    args
}

fn init_logging(verbose: u8, debug: bool) {
    let level = match (debug, verbose) {
        (true, _) => "debug",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    // fuser warns when it finds the mount already gone at exit, which is
    // the normal end after `strata umount`: keep that quiet unless debugging.
    let filter = if debug { level.to_string() } else { format!("{level},fuser::session=error") };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter))
        .format_timestamp_millis()
        .init();
}

fn mount(args: MountArgs) -> Result<(), String> {
    let mut config = MountConfig { lowers: args.lowers, upper: args.upper, work: args.work, ..Default::default() };
    if let Some(reference) = &args.image {
        let store = store::Store::open(args.store.store.as_deref())?;
        let image = store.find_image(reference)?;
        // The config lists layers bottom first; a mount wants the top first.
        for diff_id in image.diff_ids.iter().rev() {
            let root = store.layer_root(diff_id)?;
            if !root.is_dir() {
                return Err(format!(
                    "layer {diff_id} of {reference} is missing from the store; import the image again"
                ));
            }
            config.lowers.push(root);
        }
        if args.ephemeral {
            let dir = store.ephemeral_dir()?;
            config.upper = Some(dir.join("upper"));
            config.work = Some(dir.join("work"));
            config.ephemeral = Some(dir);
        }
    }
    for text in &args.options {
        for item in config::split_options(text) {
            config.apply_option(&item).map_err(|err| err.to_string())?;
        }
    }
    config.mountpoint = args.mountpoint;
    config.foreground |= args.foreground || args.debug;
    config.debug |= args.debug;
    if let Some(threads) = args.threads {
        config.threads = threads.clamp(1, 64);
    }
    if let Some(cap) = args.inode_cache {
        config.inode_cache = Some(cap.max(1));
    }
    if let Some(target) = args.trace {
        let all = target.as_os_str() == "all";
        let to_terminal = target.as_os_str() == "-" || all;
        let format = trace_format(&args.trace_format, to_terminal)?;
        config.foreground |= to_terminal;
        config.trace = Some(config::TraceConfig {
            file: (!to_terminal).then_some(target),
            format,
            lookups: args.trace_all || all,
        });
    }
    init_logging(args.verbose, config.debug);
    let ephemeral = config.ephemeral.clone();
    let result = config.validate().map_err(|err| err.to_string()).and_then(|()| daemon::run(config));
    if let (Err(_), Some(dir)) = (&result, ephemeral) {
        let _ = extract::remove_path(&dir);
    }
    result
}

fn open_store(arg: &StoreArg) -> Result<store::Store, String> {
    store::Store::open(arg.store.as_deref())
}

fn import_command(args: ImportArgs) -> Result<(), String> {
    let store = open_store(&args.store)?;
    let options =
        import::ImportOptions { tag: args.tag, platform: args.platform, max_layer_bytes: args.max_layer_size };
    import::import(&store, &args.path, &options).map(|_| ())
}

fn images_command(arg: &StoreArg) -> Result<(), String> {
    let store = open_store(arg)?;
    let rows: Vec<[String; 6]> = store
        .images()
        .into_iter()
        .flat_map(|image| {
            let size: u64 = image.diff_ids.iter().filter_map(|d| store.layer_info(d)).map(|i| i.size).sum();
            let names = if image.names.is_empty() { vec!["<none>".to_string()] } else { image.names.clone() };
            // The config's creation time, a day is precise enough here.
            let created: String =
                image.config.get("created").and_then(|c| c.as_str()).unwrap_or("").chars().take(10).collect();
            names.into_iter().map(move |name| {
                [
                    name,
                    digest::short(&image.id).to_string(),
                    created.clone(),
                    image.platform.clone(),
                    image.diff_ids.len().to_string(),
                    store::human(size),
                ]
            })
        })
        .collect();
    let header = ["NAME", "IMAGE ID", "CREATED", "PLATFORM", "LAYERS", "SIZE"].map(str::to_string);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

fn rmi_command(arg: &StoreArg, images: &[String]) -> Result<(), String> {
    let store = open_store(arg)?;
    for image in images {
        for message in store.remove_image(image)? {
            println!("{message}");
        }
    }
    Ok(())
}

fn prune_command(arg: &StoreArg) -> Result<(), String> {
    let store = open_store(arg)?;
    let (messages, freed) = store.prune()?;
    for message in &messages {
        println!("{message}");
    }
    println!("Total reclaimed space: {}", store::human(freed));
    Ok(())
}

/// The event format asked for; colored only on a terminal.
fn trace_format(name: &str, to_terminal: bool) -> Result<trace::Format, String> {
    use std::io::IsTerminal;
    match name {
        "json" => Ok(trace::Format::Json),
        "human" => Ok(trace::Format::Human { color: to_terminal && std::io::stderr().is_terminal() }),
        other => Err(format!("unknown trace format {other:?} (human or json)")),
    }
}

/// `strata stats MOUNTPOINT`
fn stats(mountpoint: &std::path::Path, format: &str) -> Result<(), String> {
    let request = match format {
        "text" => "stats",
        "json" => "stats json",
        other => return Err(format!("unknown format {other:?} (text or json)")),
    };
    let socket = daemon::control_socket(mountpoint)?;
    let mut stream = control::request(&socket, request).map_err(|err| format!("{}: {err}", socket.display()))?;
    std::io::copy(&mut stream, &mut std::io::stdout()).map_err(|err| err.to_string())?;
    Ok(())
}

/// `strata trace MOUNTPOINT`: stream events until interrupted.
fn trace_mount(mountpoint: &std::path::Path, all: bool, format: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    let format = match format {
        "json" => "json",
        "human" if std::io::stdout().is_terminal() => "color",
        "human" => "human",
        other => return Err(format!("unknown format {other:?} (human or json)")),
    };
    let socket = daemon::control_socket(mountpoint)?;
    let request = format!("trace {format} {}", if all { "all" } else { "changes" });
    let mut stream = control::request(&socket, &request).map_err(|err| format!("{}: {err}", socket.display()))?;
    let mut out = std::io::stdout();
    let mut buf = [0u8; 8192];
    loop {
        use std::io::{Read, Write};
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    return Ok(()); // the reader went away (e.g. `| head`)
                }
            }
            Err(err) => return Err(err.to_string()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalise_args(std::env::args_os().collect()));
    if !matches!(cli.command, Command::Mount(_) | Command::Umount { .. }) {
        init_logging(0, false);
        sys::default_sigpipe();
    }
    let result = match cli.command {
        Command::Mount(args) => mount(args),
        Command::Umount { mountpoint } => daemon::unmount(&mountpoint),
        Command::Stats { mountpoint, format } => stats(&mountpoint, &format),
        Command::Trace { mountpoint, all, format } => trace_mount(&mountpoint, all, &format),
        Command::Diff(args) => diff::run(args),
        Command::Commit(args) => commit::run(args),
        Command::Import(args) => import_command(args),
        Command::Images { store } => images_command(&store),
        Command::Rmi { store, images } => rmi_command(&store, &images),
        Command::Prune { store } => prune_command(&store),
        Command::Whence { store, target, path } => open_store(&store).and_then(|s| inspect::whence(&s, &target, &path)),
        Command::Layers { store, image, format } => {
            open_store(&store).and_then(|s| inspect::layers(&s, &image, &format))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("strata: {message}");
            ExitCode::FAILURE
        }
    }
}
