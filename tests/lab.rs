//! Runs every command of docs/lab.md and checks its output, so the lab
//! never drifts from what Strata does.
//!
//! Each ```console block holds `$ command` lines, each followed by the
//! output it must print. `<...>` in an expected line matches any text.
//! All commands run in order in one bash, in a fresh directory, with the
//! freshly built `strata` first on PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Step {
    command: String,
    expected: Vec<String>,
}

fn steps(markdown: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut in_console = false;
    for line in markdown.lines() {
        if line.starts_with("```console") {
            in_console = true;
        } else if line.starts_with("```") {
            in_console = false;
        } else if in_console {
            match line.strip_prefix("$ ") {
                Some(command) => steps.push(Step { command: command.to_string(), expected: Vec::new() }),
                None => steps.last_mut().expect("output before any command").expected.push(line.to_string()),
            }
        }
    }
    steps
}

/// Whether `actual` matches `pattern`, where `<...>` stands for any text.
fn matches(pattern: &str, actual: &str) -> bool {
    let parts: Vec<&str> = pattern.split("<...>").collect();
    if parts.len() == 1 {
        return pattern == actual;
    }
    let mut rest = actual;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// Unmounts the lab's mounts even when an assertion fails.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let prefix = format!("{}/", self.0.display());
        for mountpoint in mounts.lines().filter_map(|line| line.split(' ').nth(1)).filter(|m| m.starts_with(&prefix)) {
            let strata = env!("CARGO_BIN_EXE_strata");
            let ok = Command::new(strata).arg("umount").arg(mountpoint).status().map(|s| s.success()).unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_lab_runs_as_written() {
    let lab_text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/lab.md")).unwrap();
    let steps = steps(&lab_text);
    assert!(steps.len() > 20, "the lab lost its commands");

    let dir = tempfile::Builder::new().prefix("strata-lab").tempdir_in("/var/tmp").unwrap().keep();
    let _cleanup = Cleanup(dir.clone());
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_strata")).parent().unwrap().to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());

    let mut script = String::from("set +e\n");
    for (i, step) in steps.iter().enumerate() {
        script += &format!("printf '@@@STEP {i}@@@\\n'\n{} 2>&1\n", step.command);
    }
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&dir)
        .env("PATH", path)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);

    let mut outputs: Vec<Vec<String>> = vec![Vec::new(); steps.len()];
    let mut current: Option<usize> = None;
    for line in stdout.lines() {
        if let Some(n) = line.strip_prefix("@@@STEP ").and_then(|l| l.strip_suffix("@@@")) {
            current = n.parse().ok();
        } else if let Some(i) = current {
            outputs[i].push(line.trim_end().to_string());
        }
    }
    for (i, step) in steps.iter().enumerate() {
        let actual = &outputs[i];
        let ok = actual.len() == step.expected.len()
            && step.expected.iter().zip(actual).all(|(want, got)| matches(want.trim_end(), got));
        assert!(
            ok,
            "lab step {i}: `{}`\n--- expected\n{}\n--- got\n{}\n",
            step.command,
            step.expected.join("\n"),
            actual.join("\n")
        );
    }
}

#[test]
fn wildcards_match_only_what_they_should() {
    assert!(matches("a <...> c", "a bbb c"));
    assert!(matches("<...> lookup", "12:00 lookup"));
    assert!(!matches("a <...> c", "a bbb d"));
    assert!(!matches("exact", "exact!"));
}
