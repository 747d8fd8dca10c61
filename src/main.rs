//! Strata: a union filesystem for container image layers.
//!
//! The flow, one module each: command line (here) -> mount configuration
//! (`config`) -> layer stack (`layers`) -> union filesystem core with its
//! inode table and copy-up (`unionfs`, `inodes`, `copyup`) -> FUSE adapter
//! (`fuse`), run by `daemon`. Raw system calls live in `sys`.

mod config;
mod copyup;
mod daemon;
mod fuse;
mod inodes;
mod layers;
mod sys;
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
    mountpoint: PathBuf,
}

/// containers-storage runs a mount program as `PROGRAM -o OPTS TARGET` and
/// mount.fuse3 as `PROGRAM SOURCE TARGET -o OPTS`: both mean `mount`.
fn normalise_args(mut args: Vec<OsString>) -> Vec<OsString> {
    const COMMANDS: &[&str] = &["mount", "umount", "unmount", "help", "--help", "-h", "--version", "-V"];
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).format_timestamp_millis().init();
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
    init_logging(args.verbose, config.debug);
    config.validate().map_err(|err| err.to_string())?;
    daemon::run(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalise_args(std::env::args_os().collect()));
    let result = match cli.command {
        Command::Mount(args) => mount(args),
        Command::Umount { mountpoint } => daemon::unmount(&mountpoint),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("strata: {message}");
            ExitCode::FAILURE
        }
    }
}
