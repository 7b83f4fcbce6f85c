//! The ptxas resource report of the fatbin build and the policy on it.
//!
//! nvcc runs with `-Xptxas -v`; [`Report`] parses its `ptxas info` lines into a table (one row
//! per kernel and architecture: registers, shared memory, stack frame, spill stores and loads)
//! followed by a blank line and the raw nvcc logs. It is written to `OUT_DIR/ptxas-report.txt`
//! and, if `SUPCON_PTXAS_REPORT` names a file, copied there (`.ci/run` prints the table with
//! `sed -n '1,/^$/p'`, so the blank line after it is part of the format). A spill, a stack
//! frame, or a source whose report cannot be parsed is a warning; `SUPCON_DENY_SPILLS` (any
//! value but `0`) makes it a build failure, which is how CI keeps the kernels spill-free.

use crate::tracked_env;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

/// What to do with the report, from the environment.
pub struct Policy {
    /// `SUPCON_DENY_SPILLS`: fail the build on any problem instead of warning.
    deny_spills: bool,
    /// `SUPCON_PTXAS_REPORT`: where to copy the report.
    report_copy: Option<String>,
}

impl Policy {
    pub fn from_env() -> Self {
        Self {
            deny_spills: tracked_env("SUPCON_DENY_SPILLS").is_some_and(|v| v != "0"),
            report_copy: tracked_env("SUPCON_PTXAS_REPORT"),
        }
    }
}

/// The report being built up, one nvcc run at a time.
pub struct Report {
    table: String,
    raw_logs: String,
    problems: Vec<String>,
    /// Whether any target is SASS (`sm_XX`): only then does ptxas run and report; a PTX-only
    /// build has no resource lines to find.
    expects_sass: bool,
}

impl Report {
    /// An empty table, headed by the compiler and the targets.
    pub fn new(nvcc: &Path, archs: &str, expects_sass: bool) -> Self {
        let mut table = String::new();
        let _ = writeln!(
            table,
            "ptxas resource usage (nvcc {}, targets {archs})",
            nvcc.display()
        );
        let _ = writeln!(
            table,
            "{:<32} {:<8} {:>9} {:>10} {:>11} {:>12} {:>11}",
            "kernel",
            "arch",
            "registers",
            "smem bytes",
            "stack bytes",
            "spill stores",
            "spill loads"
        );
        Self {
            table,
            raw_logs: String::new(),
            problems: Vec::new(),
            expects_sass,
        }
    }

    /// Adds the rows (sorted by kernel, then architecture) and the raw log of the nvcc run
    /// that compiled `source`, noting spills, stack frames and an unparsable log.
    pub fn add(&mut self, source: &Path, log: &str) {
        let stem = source.file_stem().expect("a file name").to_string_lossy();
        let mut entries = parse(log);
        entries.sort_by(|a, b| (&a.kernel, &a.arch).cmp(&(&b.kernel, &b.arch)));
        if entries.is_empty() && self.expects_sass {
            self.problems.push(format!(
                "{stem}.cu: no ptxas resource report could be parsed"
            ));
        }
        for e in &entries {
            let _ = writeln!(
                self.table,
                "{:<32} {:<8} {:>9} {:>10} {:>11} {:>12} {:>11}",
                e.kernel,
                e.arch,
                e.registers,
                e.shared_bytes,
                e.stack_bytes,
                e.spill_store_bytes,
                e.spill_load_bytes
            );
            if e.spill_store_bytes + e.spill_load_bytes > 0 || e.stack_bytes > 0 {
                self.problems.push(format!(
                    "{} on {}: {} bytes spill stores, {} bytes spill loads, {} bytes stack",
                    e.kernel, e.arch, e.spill_store_bytes, e.spill_load_bytes, e.stack_bytes
                ));
            }
        }
        let _ = writeln!(self.raw_logs, "==== nvcc {} ====\n{log}", source.display());
    }

    /// Writes the report (and its copy), warns about each problem, and under
    /// `SUPCON_DENY_SPILLS` fails the build if there is any.
    pub fn finish(self, out_dir: &Path, policy: &Policy) {
        let report = format!("{}\n{}", self.table, self.raw_logs);
        let report_path = out_dir.join("ptxas-report.txt");
        fs::write(&report_path, &report)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", report_path.display()));
        if let Some(copy) = &policy.report_copy {
            fs::write(copy, &report).unwrap_or_else(|e| panic!("cannot write {copy}: {e}"));
        }
        for problem in &self.problems {
            println!(
                "cargo::warning=CUDA kernels: {problem} (see {})",
                report_path.display()
            );
        }
        assert!(
            !policy.deny_spills || self.problems.is_empty(),
            "SUPCON_DENY_SPILLS: register spills, stack frames or an unreadable ptxas report:\n{}",
            self.problems.join("\n")
        );
    }
}

/// One kernel's resources on one architecture, from `ptxas -v`.
#[derive(Default)]
struct Entry {
    kernel: String,
    arch: String,
    registers: u64,
    shared_bytes: u64,
    stack_bytes: u64,
    spill_store_bytes: u64,
    spill_load_bytes: u64,
}

/// Parses the `ptxas info` lines of an nvcc run with `-Xptxas -v`: a "Compiling entry function
/// 'NAME' for 'sm_XX'" line opens an entry, and the stack-frame and "Used N registers" lines
/// after it fill it in.
fn parse(log: &str) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            entries.push(Entry {
                kernel,
                arch,
                ..Entry::default()
            });
        } else if let Some(entry) = entries.last_mut() {
            if line.contains("bytes stack frame") {
                let fields: Vec<u64> = line
                    .split(',')
                    .filter_map(|part| part.split_whitespace().next()?.parse().ok())
                    .collect();
                if let [stack, stores, loads] = fields[..] {
                    entry.stack_bytes = stack;
                    entry.spill_store_bytes = stores;
                    entry.spill_load_bytes = loads;
                }
            } else if line.contains("Used") && line.contains("registers") {
                entry.registers = number_before(line, "registers").unwrap_or_default();
                entry.shared_bytes = line
                    .split(',')
                    .find(|part| part.trim_end().ends_with("bytes smem"))
                    .and_then(|part| part.split_whitespace().next()?.parse().ok())
                    .unwrap_or_default();
            }
        }
    }
    entries
}

/// The number right before `unit` in `line` ("Used 40 registers" → 40 for "registers").
fn number_before(line: &str, unit: &str) -> Option<u64> {
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .find(|pair| pair[1] == unit)
        .and_then(|pair| pair[0].parse().ok())
}
