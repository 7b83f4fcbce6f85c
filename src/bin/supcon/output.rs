//! The output folder of `supcon run`: checked before anything is computed, and written all or
//! nothing.
//!
//! Each output goes to a temporary file in the folder first. Only when every one is complete do
//! they replace the final names, so a failed write (a full disk, a file-size limit) leaves the
//! previous run's files as they were and no truncated file behind. Then the files of a previous
//! run that this run does not produce (`loss.npy` under reduction none) are removed, so the
//! folder never mixes two runs.

use std::path::{Path, PathBuf};

use crate::npy::{self, Element};

/// Every file a run may write.
const OUTPUTS: [&str; 3] = ["loss.npy", "per_anchor.npy", "grad.npy"];

/// A folder that files can be created in.
pub struct OutputDir {
    dir: PathBuf,
}

/// Writes one output's file to the given path.
type Writer<'a> = Box<dyn Fn(&Path) -> Result<(), String> + 'a>;

/// One array to write: its name (one of [`OUTPUTS`]) and its writer.
pub struct Output<'a> {
    name: &'static str,
    write: Writer<'a>,
}

impl<'a> Output<'a> {
    /// `values` of `shape` as `name`.
    pub fn new<T: Element>(name: &'static str, shape: Vec<usize>, values: &'a [T]) -> Self {
        debug_assert!(OUTPUTS.contains(&name));
        Output {
            name,
            write: Box::new(move |path| npy::write(path, &shape, values)),
        }
    }
}

impl OutputDir {
    /// Creates `dir` if it is missing and checks that a file can be created in it.
    pub fn prepare(dir: &Path) -> Result<Self, String> {
        let fail = |message: String| Err(format!("--out {}: {message}", dir.display()));
        if dir.exists() && !dir.is_dir() {
            return fail("exists and is not a folder".into());
        }
        if let Err(e) = std::fs::create_dir_all(dir) {
            return fail(format!("cannot create it: {e}"));
        }
        let probe = dir.join(format!(".supcon-probe-{}", std::process::id()));
        if let Err(e) = std::fs::File::create(&probe) {
            return fail(format!("cannot write in it: {e}"));
        }
        let _ = std::fs::remove_file(&probe);
        Ok(OutputDir {
            dir: dir.to_path_buf(),
        })
    }

    /// Writes `outputs` (see the module docs).
    pub fn commit(&self, outputs: &[Output<'_>]) -> Result<(), String> {
        let temporary: Vec<PathBuf> = outputs
            .iter()
            .map(|output| temporary_path(&self.dir.join(output.name)))
            .collect();
        let written = outputs
            .iter()
            .zip(&temporary)
            .try_for_each(|(output, path)| (output.write)(path));
        if let Err(message) = written {
            for path in &temporary {
                let _ = std::fs::remove_file(path);
            }
            return Err(message);
        }
        for (output, path) in outputs.iter().zip(&temporary) {
            let target = self.dir.join(output.name);
            std::fs::rename(path, &target).map_err(|e| format!("{}: {e}", target.display()))?;
        }
        for stale in OUTPUTS
            .iter()
            .filter(|name| !outputs.iter().any(|output| output.name == **name))
        {
            let path = self.dir.join(stale);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(format!(
                        "{}: cannot remove the stale file: {e}",
                        path.display()
                    ))
                }
            }
        }
        Ok(())
    }
}

/// `.name.tmp-<pid>` beside `path`, so that the rename stays on one file system.
fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(
        || "output".into(),
        |name| name.to_string_lossy().into_owned(),
    );
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}
