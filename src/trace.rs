//! Watching copy-on-write happen: the events that change the layers, and
//! the counters since mount.
//!
//! Events go to subscribers (a `--trace` file, or `strata trace` clients on
//! the control socket). With no subscriber an event costs one atomic load:
//! it is never even built.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Something that changed the layers (or, with `--trace=all`, a lookup).
#[derive(Clone, Debug)]
pub enum Event {
    CopyUp { path: String, layer: String, bytes: u64, took: Duration, data: bool },
    Whiteout { path: String },
    Opaque { path: String },
    Redirect { path: String, target: String },
    Create { path: String, kind: &'static str },
    Lookup { path: String, layer: String },
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::CopyUp { .. } => "copy-up",
            Event::Whiteout { .. } => "whiteout",
            Event::Opaque { .. } => "opaque",
            Event::Redirect { .. } => "redirect",
            Event::Create { .. } => "create",
            Event::Lookup { .. } => "lookup",
        }
    }

    fn path(&self) -> &str {
        match self {
            Event::CopyUp { path, .. }
            | Event::Whiteout { path }
            | Event::Opaque { path }
            | Event::Redirect { path, .. }
            | Event::Create { path, .. }
            | Event::Lookup { path, .. } => path,
        }
    }

    /// What the event says beyond its name and path, for people.
    fn detail(&self) -> String {
        match self {
            Event::CopyUp { layer, bytes, took, data, .. } => format!(
                "from {layer}, {} in {:.1} ms ({})",
                crate::store::human(*bytes),
                took.as_secs_f64() * 1000.0,
                if *data { "data and metadata" } else { "metadata only" }
            ),
            Event::Whiteout { .. } => "hides the lower entry".to_string(),
            Event::Opaque { .. } => "hides the lower directory's content".to_string(),
            Event::Redirect { target, .. } => format!("keeps the lower content of {target}"),
            Event::Create { kind, .. } => format!("new {kind} in the upper layer"),
            Event::Lookup { layer, .. } => format!("served by {layer}"),
        }
    }

    /// One aligned line; colored when `color`.
    pub fn human(&self, at: SystemTime, color: bool) -> String {
        let (start, end) = if color {
            let code = match self {
                Event::CopyUp { .. } => "33",
                Event::Whiteout { .. } => "31",
                Event::Opaque { .. } | Event::Redirect { .. } => "35",
                Event::Create { .. } => "32",
                Event::Lookup { .. } => "2",
            };
            (format!("\x1b[{code}m"), "\x1b[0m")
        } else {
            (String::new(), "")
        };
        format!("{} {start}{:<9}{end} {:<32} {}", clock(at), self.name(), self.path(), self.detail())
    }

    pub fn json(&self, at: SystemTime) -> String {
        let time = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut value = serde_json::json!({ "time": time, "event": self.name(), "path": self.path() });
        let extra = match self {
            Event::CopyUp { layer, bytes, took, data, .. } => serde_json::json!({
                "layer": layer, "bytes": bytes, "micros": took.as_micros() as u64, "data": data
            }),
            Event::Redirect { target, .. } => serde_json::json!({ "target": target }),
            Event::Create { kind, .. } => serde_json::json!({ "kind": kind }),
            Event::Lookup { layer, .. } => serde_json::json!({ "layer": layer }),
            Event::Whiteout { .. } | Event::Opaque { .. } => serde_json::json!({}),
        };
        if let (Some(target), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
            target.extend(extra.clone());
        }
        value.to_string()
    }
}

fn clock(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}", secs / 3600, secs / 60 % 60, secs % 60, since.subsec_millis())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Human { color: bool },
    Json,
}

struct Subscriber {
    sink: Box<dyn Write + Send>,
    format: Format,
    lookups: bool,
}

/// The counters since mount, and the event subscribers.
pub struct Monitor {
    subscribed: AtomicBool,
    lookups_subscribed: AtomicBool,
    subscribers: Mutex<Vec<Subscriber>>,
    pub lookups_per_layer: Vec<AtomicU64>,
    pub copy_ups: AtomicU64,
    pub copied_bytes: AtomicU64,
    pub whiteouts: AtomicU64,
    pub opaque_dirs: AtomicU64,
    pub redirects: AtomicU64,
    pub creates: AtomicU64,
    /// Opens the kernel serves itself (FUSE passthrough).
    pub passthrough_opens: AtomicU64,
    /// OPEN requests for files that reached the daemon: one at most when
    /// files are served by inode (the first, answered ENOSYS).
    pub open_requests: AtomicU64,
}

impl Monitor {
    pub fn new(layers: usize) -> Self {
        Monitor {
            subscribed: AtomicBool::new(false),
            lookups_subscribed: AtomicBool::new(false),
            subscribers: Mutex::new(Vec::new()),
            lookups_per_layer: (0..layers).map(|_| AtomicU64::new(0)).collect(),
            copy_ups: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
            whiteouts: AtomicU64::new(0),
            opaque_dirs: AtomicU64::new(0),
            redirects: AtomicU64::new(0),
            creates: AtomicU64::new(0),
            passthrough_opens: AtomicU64::new(0),
            open_requests: AtomicU64::new(0),
        }
    }

    pub fn subscribe(&self, sink: Box<dyn Write + Send>, format: Format, lookups: bool) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.push(Subscriber { sink, format, lookups });
        self.refresh(&subscribers);
    }

    fn refresh(&self, subscribers: &[Subscriber]) {
        self.subscribed.store(!subscribers.is_empty(), Ordering::Relaxed);
        self.lookups_subscribed.store(subscribers.iter().any(|s| s.lookups), Ordering::Relaxed);
    }

    /// Whether anyone listens to lookups (they are built only then).
    pub fn wants_lookups(&self) -> bool {
        self.lookups_subscribed.load(Ordering::Relaxed)
    }

    /// Send an event, built only if someone listens. A subscriber that
    /// cannot be written to any more (a closed client) is dropped.
    pub fn emit(&self, event: impl FnOnce() -> Event) {
        if !self.subscribed.load(Ordering::Relaxed) {
            return;
        }
        let event = event();
        let at = SystemTime::now();
        let is_lookup = matches!(event, Event::Lookup { .. });
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.retain_mut(|subscriber| {
            if is_lookup && !subscriber.lookups {
                return true;
            }
            let line = match subscriber.format {
                Format::Human { color } => event.human(at, color),
                Format::Json => event.json(at),
            };
            writeln!(subscriber.sink, "{line}").and_then(|_| subscriber.sink.flush()).is_ok()
        });
        self.refresh(&subscribers);
    }

    pub fn count(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}
