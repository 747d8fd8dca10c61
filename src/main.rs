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
mod fuse;
mod idmap;
mod inodes;
mod layers;
mod sys;
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
}

#[derive(Args)]
struct MountArgs {
    /// A lower layer; repeat for more, topmost first (like lowerdir=TOP:...:BOTTOM).
    #[arg(long = "lower", value_name = "DIR")]
    lowers: Vec<PathBuf>,
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
    const COMMANDS: &[&str] =
        &["mount", "umount", "unmount", "stats", "trace", "diff", "commit", "help", "--help", "-h", "--version", "-V"];
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
    config.validate().map_err(|err| err.to_string())?;
    daemon::run(config)
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
    let result = match cli.command {
        Command::Mount(args) => mount(args),
        Command::Umount { mountpoint } => daemon::unmount(&mountpoint),
        Command::Stats { mountpoint, format } => stats(&mountpoint, &format),
        Command::Trace { mountpoint, all, format } => trace_mount(&mountpoint, all, &format),
        Command::Diff(args) => diff::run(args),
        Command::Commit(args) => commit::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("strata: {message}");
            ExitCode::FAILURE
        }
    }
}
