//! Looking inside an image: `strata whence` (which layer serves a path, what
//! it shadows) and `strata layers` (what each layer added, changed, deleted
//! and wastes). Both ask the layer stack (`layers`) and never read
//! whiteouts themselves, so they agree with what a mount shows.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use crate::daemon::MountRecord;
use crate::digest::{sha256_of, short};
use crate::layers::{LayerId, LayerStack, Presence, Resolved, Source, XattrNamespace};
use crate::store::{ImageRecord, Store, human};
use crate::sys::{self, Stat};

fn namespace() -> XattrNamespace {
    if sys::geteuid() == 0 { XattrNamespace::Trusted } else { XattrNamespace::User }
}

fn open_stack(upper: Option<&Path>, lowers: &[PathBuf]) -> Result<LayerStack, String> {
    LayerStack::open(upper, lowers, namespace()).map_err(|err| format!("cannot open the layers: {err}"))
}

/// "regular file, 42 bytes", "directory", "symlink", ...
fn describe(stat: &Stat) -> String {
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFREG => format!("regular file, {}", human(stat.st_size as u64)),
        libc::S_IFDIR => "directory".into(),
        libc::S_IFLNK => "symlink".into(),
        libc::S_IFCHR => "character device".into(),
        libc::S_IFBLK => "block device".into(),
        libc::S_IFIFO => "fifo".into(),
        libc::S_IFSOCK => "socket".into(),
        _ => "entry of unknown type".into(),
    }
}

/// The path's components inside the merged tree (`/` and `.` dropped).
fn components(path: &Path) -> Result<Vec<&OsStr>, String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("{}: give a path without `..`", path.display()));
            }
        }
    }
    Ok(parts)
}

/// The layers to inspect: an image of the store, or a live mount.
struct Target {
    stack: LayerStack,
    /// A label per layer of the stack (topmost first).
    labels: Vec<String>,
}

fn image_target(store: &Store, image: &ImageRecord) -> Result<Target, String> {
    let count = image.diff_ids.len();
    let mut lowers = Vec::new();
    let mut labels = Vec::new();
    for (index, diff_id) in image.diff_ids.iter().enumerate().rev() {
        lowers.push(store.layer_root(diff_id)?);
        labels.push(format!("layer {}/{count} {}", index + 1, short(diff_id)));
    }
    Ok(Target { stack: open_stack(None, &lowers)?, labels })
}

fn resolve_target(store: &Store, target: &str) -> Result<Target, String> {
    let path = Path::new(target);
    // A mount point, or else an image (a directory may share an image's name).
    if let Some(record) = path.is_dir().then(|| MountRecord::find(path)).flatten() {
        let layers_dir = store.root.join("layers");
        let stack = open_stack(record.upper.as_deref(), &record.lowers)?;
        let count = record.lowers.len();
        let labels = (0..stack.layers.len())
            .map(|id| {
                let path = &stack.layers[id].path;
                if stack.is_upper(id) {
                    return format!("upper {}", path.display());
                }
                // A layer of the store: numbered like `strata layers` (1 = bottom).
                let number = count + usize::from(stack.has_upper) - id;
                match path.strip_prefix(&layers_dir).ok().and_then(|rest| rest.iter().next()) {
                    Some(hex) => format!("layer {number}/{count} {}", short(&hex.to_string_lossy())),
                    None => format!("{} {}", stack.layer_name(id), path.display()),
                }
            })
            .collect();
        return Ok(Target { stack, labels });
    }
    match store.find_image(target) {
        Ok(image) => image_target(store, &image),
        Err(_) if path.is_dir() => {
            Err(format!("{target} is neither an image nor the mount point of a running Strata mount"))
        }
        Err(err) => Err(err),
    }
}

/// What one layer alone says about the path.
enum Story {
    Holds(Stat),
    /// A whiteout of the path or of a parent (the prefix given).
    Whiteout(PathBuf),
    /// An opaque directory at the path or above it.
    Opaque(PathBuf),
    /// A non-directory where a parent directory should be.
    Blocks(PathBuf, Stat),
}

fn layer_story(stack: &LayerStack, layer: LayerId, parts: &[&OsStr]) -> Result<Vec<Story>, String> {
    let mut stories = Vec::new();
    let mut dir = PathBuf::new();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let here = dir.join(part);
        match stack.presence(layer, &dir, part).map_err(|err| format!("{}: {err}", here.display()))? {
            Presence::Missing => break,
            Presence::Whiteout => {
                stories.push(Story::Whiteout(here));
                break;
            }
            Presence::Entry { stat, opaque } => {
                let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
                if last {
                    stories.push(Story::Holds(stat));
                    if is_dir && opaque {
                        stories.push(Story::Opaque(here));
                    }
                    break;
                }
                if !is_dir {
                    stories.push(Story::Blocks(here, stat));
                    break;
                }
                if opaque {
                    stories.push(Story::Opaque(here.clone()));
                }
            }
        }
        dir = here;
    }
    Ok(stories)
}

/// Where a path leads in the merged tree.
struct Walk {
    /// The path's components once symlinks of parents are followed.
    parts: Vec<OsString>,
    /// `/bin -> usr/bin` for each symlink followed.
    vias: Vec<String>,
    found: Option<Resolved>,
    /// A non-directory (not a symlink) where a directory should be.
    blocked: Option<(PathBuf, String)>,
}

/// Resolve `path` in the merged tree as a process inside the image would
/// (chroot-like): symlinks in parent components are followed inside the
/// tree, the last component is not (whence says what the path itself is).
fn resolve_path(stack: &LayerStack, path: &Path) -> Result<Walk, String> {
    let err = |e: sys::Errno| format!("{}: {e}", path.display());
    let mut pending: VecDeque<OsString> = components(path)?.into_iter().map(OsStr::to_owned).collect();
    let mut walk = Walk { parts: Vec::new(), vias: Vec::new(), found: None, blocked: None };
    let mut sources = stack.root_sources();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            walk.parts.pop();
            // Walk again from the root to the parent (every step a directory).
            sources = stack.root_sources();
            for step in &walk.parts {
                match stack.lookup(&sources, step).map_err(err)? {
                    Some(r) if r.is_dir() => sources = r.dir_sources,
                    _ => return Err(format!("{}: the tree changed while resolving it", path.display())),
                }
            }
            continue;
        }
        let Some(r) = stack.lookup(&sources, &part).map_err(err)? else {
            walk.parts.push(part);
            walk.parts.extend(pending);
            walk.found = None;
            return Ok(walk);
        };
        let is_link = r.stat.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if !pending.is_empty() && is_link {
            hops += 1;
            if hops > 40 {
                return Err(format!("{}: too many levels of symbolic links", path.display()));
            }
            let link_dir = r.top.path.parent().unwrap_or(Path::new(""));
            let dir = stack.open_dir(r.top.layer, link_dir, libc::O_PATH).map_err(err)?;
            let target = sys::readlinkat(dir.as_fd(), r.top.path.file_name().unwrap_or_default()).map_err(err)?;
            let at = Path::new("/").join(walk.parts.iter().collect::<PathBuf>()).join(&part);
            walk.vias.push(format!("{} -> {}", at.display(), Path::new(&target).display()));
            let target = PathBuf::from(target);
            if target.is_absolute() {
                walk.parts.clear();
                sources = stack.root_sources();
            }
            for component in target.components().rev() {
                match component {
                    Component::Normal(c) => pending.push_front(c.to_owned()),
                    Component::ParentDir => pending.push_front(OsString::from("..")),
                    _ => {}
                }
            }
            continue;
        }
        if !pending.is_empty() && !r.is_dir() {
            walk.parts.push(part);
            walk.blocked = Some((walk.parts.iter().collect(), describe(&r.stat)));
            walk.parts.extend(pending);
            return Ok(walk);
        }
        walk.parts.push(part);
        sources = r.dir_sources.clone();
        walk.found = Some(r);
    }
    Ok(walk)
}

/// `strata whence TARGET PATH`.
pub fn whence(store: &Store, target: &str, path: &Path) -> Result<(), String> {
    let target = resolve_target(store, target)?;
    let stack = &target.stack;
    let shown = Path::new("/").join(components(path)?.iter().collect::<PathBuf>());
    let walk = resolve_path(stack, path)?;
    let canonical = Path::new("/").join(walk.parts.iter().collect::<PathBuf>());
    let mut heading = shown.display().to_string();
    if canonical != shown {
        heading += &format!(" (as {}", canonical.display());
        for via in &walk.vias {
            heading += &format!(", via {via}");
        }
        heading += ")";
    }
    let found = walk.found;
    match (&found, &walk.blocked) {
        (Some(r), _) => println!("{heading}: {}, from {}", describe(&r.stat), target.labels[r.top.layer]),
        (None, Some((prefix, what))) => {
            println!("{heading}: not in the merged tree (/{} is a {what}, not a directory)", prefix.display())
        }
        (None, None) => println!("{heading}: not in the merged tree"),
    }
    let parts: Vec<&OsStr> = walk.parts.iter().map(OsString::as_os_str).collect();
    let serving = found.as_ref().map(|r| r.top.layer);
    let merged_dirs: Vec<LayerId> =
        found.as_ref().map(|r| r.dir_sources.iter().map(|s| s.layer).collect()).unwrap_or_default();
    let mut hidden_by: Option<String> = None;
    let width = target.labels.iter().map(String::len).max().unwrap_or(0);
    for layer in 0..stack.layers.len() {
        let label = &target.labels[layer];
        for story in layer_story(stack, layer, &parts)? {
            let text = match story {
                Story::Holds(stat) if Some(layer) == serving => format!("serves it: {}", describe(&stat)),
                Story::Holds(stat) if merged_dirs.contains(&layer) => {
                    format!("{} merged into it", describe(&stat))
                }
                Story::Holds(stat) => match &hidden_by {
                    Some(hider) => format!("holds a version hidden by {hider}: {}", describe(&stat)),
                    None => format!("holds a version it shadows: {}", describe(&stat)),
                },
                Story::Whiteout(at) => {
                    hidden_by.get_or_insert_with(|| format!("the whiteout in {label}"));
                    format!("whiteout of /{}: hides the layers below", at.display())
                }
                Story::Opaque(at) => {
                    hidden_by.get_or_insert_with(|| format!("the opaque directory in {label}"));
                    format!("opaque directory /{}: hides the layers below", at.display())
                }
                Story::Blocks(at, stat) => {
                    hidden_by.get_or_insert_with(|| format!("/{} in {label}", at.display()));
                    format!("/{} is a {} here: hides the layers below", at.display(), describe(&stat))
                }
            };
            println!("  {label:<width$}  {text}");
        }
    }
    if found.is_none() { Err(format!("{} is not in the merged tree", shown.display())) } else { Ok(()) }
}

// ----- strata layers ---------------------------------------------------------

/// One layer's row.
#[derive(Debug, Default, Serialize)]
pub struct LayerRow {
    pub index: usize,
    pub diff_id: String,
    /// The OCI chain id: this layer in its position (the layers below it).
    pub chain_id: String,
    pub size: u64,
    pub files: u64,
    pub created_by: Option<String>,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub deleted: Vec<String>,
    /// Bytes of this layer's files that a higher layer overwrites or deletes.
    pub wasted: u64,
}

#[derive(Debug, Serialize)]
struct LayersReport {
    image: String,
    id: String,
    layers: Vec<LayerRow>,
    total_size: u64,
    wasted: u64,
    /// 1 - wasted / total, as dive reports it.
    efficiency: f64,
}

/// Comparison of the stacks before and after one layer (docker diff rules).
struct Step<'a> {
    old: &'a LayerStack,
    new: &'a LayerStack,
    /// Layer numbers (1 = bottom) of the old stack's ids.
    old_count: usize,
    row: LayerRow,
    wasted: &'a mut HashMap<usize, u64>,
}

impl Step<'_> {
    fn show(path: &Path) -> String {
        format!("/{}", path.display())
    }

    /// Sizes of every file under (and at) `path` in the old stack go to
    /// the waste of the layers that served them.
    fn waste(&mut self, path: &Path, resolved: &Resolved) -> Result<(), String> {
        if resolved.is_dir() {
            let entries = self.old.list(&resolved.dir_sources).map_err(|e| format!("{}: {e}", Self::show(path)))?;
            for entry in entries {
                if let Some(child) = self.old.lookup(&resolved.dir_sources, &entry.name).map_err(|e| e.to_string())? {
                    self.waste(&path.join(&entry.name), &child)?;
                }
            }
        } else if resolved.stat.st_mode & libc::S_IFMT == libc::S_IFREG {
            let number = self.old_count - resolved.top.layer;
            *self.wasted.entry(number).or_default() += resolved.stat.st_size as u64;
        }
        Ok(())
    }

    fn added_tree(&mut self, path: &Path, resolved: &Resolved) -> Result<(), String> {
        self.row.added.push(Self::show(path));
        if resolved.is_dir() {
            let entries = self.new.list(&resolved.dir_sources).map_err(|e| format!("{}: {e}", Self::show(path)))?;
            for entry in entries {
                if let Some(child) = self.new.lookup(&resolved.dir_sources, &entry.name).map_err(|e| e.to_string())? {
                    self.added_tree(&path.join(&entry.name), &child)?;
                }
            }
        }
        Ok(())
    }

    /// A directory present in the new stack (where the new layer, id 0,
    /// has a copy), compared with the old stack's.
    fn dir(&mut self, path: &Path, old_sources: &[Source], new_sources: &[Source]) -> Result<(), String> {
        let err = |e: sys::Errno| format!("{}: {e}", Self::show(path));
        let new_entries = self.new.list(new_sources).map_err(err)?;
        let old_entries = self.old.list(old_sources).map_err(err)?;
        let mut old_names: BTreeMap<&OsStr, ()> = old_entries.iter().map(|e| (e.name.as_os_str(), ())).collect();
        for entry in &new_entries {
            let child_path = path.join(&entry.name);
            let in_old = old_names.remove(entry.name.as_os_str()).is_some();
            let Some(new) = self.new.lookup(new_sources, &entry.name).map_err(err)? else { continue };
            if new.top.layer != 0 {
                continue; // the new layer (id 0) has nothing here
            }
            let old = if in_old { self.old.lookup(old_sources, &entry.name).map_err(err)? } else { None };
            match old {
                None => self.added_tree(&child_path, &new)?,
                Some(old) => {
                    self.row.changed.push(Self::show(&child_path));
                    if new.is_dir() && old.is_dir() {
                        self.dir(&child_path, &old.dir_sources, &new.dir_sources)?;
                    } else {
                        self.waste(&child_path, &old)?;
                    }
                }
            }
        }
        for (name, ()) in old_names {
            let child_path = path.join(name);
            self.row.deleted.push(Self::show(&child_path));
            if let Some(old) = self.old.lookup(old_sources, name).map_err(err)? {
                self.waste(&child_path, &old)?;
            }
        }
        Ok(())
    }
}

/// `created_by` of each non-empty layer, from the config's history.
fn layer_history(config: &serde_json::Value, count: usize) -> Vec<Option<String>> {
    let history: Vec<&serde_json::Value> = config
        .get("history")
        .and_then(|h| h.as_array())
        .map(|h| h.iter().filter(|e| !e.get("empty_layer").and_then(|v| v.as_bool()).unwrap_or(false)).collect())
        .unwrap_or_default();
    if history.len() != count {
        return vec![None; count];
    }
    history.iter().map(|e| e.get("created_by").and_then(|v| v.as_str()).map(str::to_string)).collect()
}

/// `strata layers IMAGE [--format json]`.
pub fn layers(store: &Store, reference: &str, format: &str) -> Result<(), String> {
    if format != "table" && format != "json" {
        return Err(format!("unknown format {format:?}: use table or json"));
    }
    let image = store.find_image(reference)?;
    let roots: Vec<PathBuf> = image.diff_ids.iter().map(|d| store.layer_root(d)).collect::<Result<_, _>>()?;
    // The stack of the bottom k layers, topmost first; two at a time (each
    // caches directory descriptors).
    sys::raise_fd_limit();
    let stack_of = |k: usize| {
        let lowers: Vec<PathBuf> = roots[..k].iter().rev().cloned().collect();
        open_stack(None, &lowers)
    };
    let mut old_stack = stack_of(0)?;
    let history = layer_history(&image.config, roots.len());
    let mut wasted: HashMap<usize, u64> = HashMap::new();
    let mut rows = Vec::new();
    let mut chain_id = String::new();
    for k in 1..=roots.len() {
        let diff_id = &image.diff_ids[k - 1];
        let info = store.layer_info(diff_id);
        chain_id = if k == 1 { diff_id.clone() } else { sha256_of(format!("{chain_id} {diff_id}").as_bytes()) };
        let row = LayerRow {
            index: k,
            diff_id: diff_id.clone(),
            chain_id: chain_id.clone(),
            size: info.as_ref().map(|i| i.size).unwrap_or(0),
            files: info.as_ref().map(|i| i.entries).unwrap_or(0),
            created_by: history[k - 1].clone(),
            ..Default::default()
        };
        let new_stack = stack_of(k)?;
        let mut step = Step { old: &old_stack, new: &new_stack, old_count: k - 1, row, wasted: &mut wasted };
        let old_root = step.old.root_sources();
        let new_root = step.new.root_sources();
        step.dir(Path::new(""), &old_root, &new_root)?;
        rows.push(step.row);
        old_stack = new_stack;
    }
    for row in &mut rows {
        row.wasted = wasted.get(&row.index).copied().unwrap_or(0);
    }
    let total_size: u64 = rows.iter().map(|r| r.size).sum();
    let total_wasted: u64 = rows.iter().map(|r| r.wasted).sum();
    let efficiency = if total_size == 0 { 1.0 } else { 1.0 - total_wasted as f64 / total_size as f64 };
    let name = image.names.first().cloned().unwrap_or_else(|| short(&image.id).to_string());
    if format == "json" {
        let report = LayersReport {
            image: name,
            id: image.id.clone(),
            layers: rows,
            total_size,
            wasted: total_wasted,
            efficiency,
        };
        let text = serde_json::to_string_pretty(&report).map_err(|err| err.to_string())?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "{:>3}  {:<12}  {:>9}  {:>6}  {:>6}  {:>7}  {:>7}  {:>9}  CREATED BY",
        "#", "DIFF ID", "SIZE", "FILES", "ADDED", "CHANGED", "DELETED", "WASTED"
    );
    for row in rows.iter().rev() {
        let created_by = row.created_by.as_deref().unwrap_or("");
        let created_by: String = created_by.chars().take(60).collect();
        println!(
            "{:>3}  {:<12}  {:>9}  {:>6}  {:>6}  {:>7}  {:>7}  {:>9}  {created_by}",
            row.index,
            short(&row.diff_id),
            human(row.size),
            row.files,
            row.added.len(),
            row.changed.len(),
            row.deleted.len(),
            human(row.wasted)
        );
    }
    println!(
        "{name}: {} in {} layers, {} wasted (efficiency {:.1}%)",
        human(total_size),
        rows.len(),
        human(total_wasted),
        efficiency * 100.0
    );
    Ok(())
}
