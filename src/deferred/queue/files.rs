//! The queue's files: listing, reading, writing durably (temp file, fsync, rename, directory fsync), and
//! setting aside what cannot be read.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{QueueError, Recovery};

pub(super) fn io(path: &Path, source: std::io::Error) -> QueueError {
    QueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `<seq>.json` files of `dir`, by sequence number. Leftover temp files are removed.
pub(super) fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, QueueError> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = e.map_err(|e| io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') && name.ends_with(".tmp") {
            remove(&path);
        } else if let Some(seq) = name.strip_suffix(".json").and_then(|s| s.parse().ok()) {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(super) fn set_aside(path: &Path, rec: &mut Recovery) {
    log::error!(path:? = path; "unreadable deferred file, moved aside as .corrupt");
    let _ = fs::rename(path, path.with_extension("corrupt"));
    rec.corrupt += 1;
}

/// Writes `name` in `dir` so that after a crash it is either absent or whole: a temp file, fsync'd, renamed
/// over, and the directory fsync'd.
pub(super) fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), QueueError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let finish = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))?;
        fs::File::open(dir)?.sync_all()
    };
    finish().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io(&dir.join(name), e)
    })
}

pub(super) fn remove(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!(path:? = path; "could not remove: {e}");
        }
    }
}

pub(super) fn sync_dir(dir: &Path) {
    if let Err(e) = fs::File::open(dir).and_then(|f| f.sync_all()) {
        log::warn!(path:? = dir; "fsync: {e}");
    }
}
