//! Small file-system helpers for atomic writes.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file, fsync and rename, so readers see either
/// the old file or the complete new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = hidden_sibling(path, "tmp");
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_parent(path)
}

/// Writes `value` as pretty JSON to `path`, atomically ([`write_atomic`]): every JSON file a
/// stage writes (`dataset.json`, `model.json`, manifests, reports) goes through here.
pub fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::io(path, e.into()))?;
    write_atomic(path, &bytes)
}

/// Puts the complete directory `staged` at `dest` in one step, so that a reader opening files
/// under `dest` (a server reloading a model, an indexing job) finds the old directory or the
/// new one, never a mix. Every file under `staged` is fsynced first. On Linux the two
/// directories are exchanged atomically (`renameat2` with `RENAME_EXCHANGE`) and the old one
/// is removed; a file system that cannot exchange gets two renames, with a moment where `dest`
/// is missing (readers fail that poll and retry), and a warning.
pub fn replace_dir(staged: &Path, dest: &Path) -> Result<()> {
    sync_tree(staged)?;
    if !dest.exists() {
        std::fs::rename(staged, dest).map_err(|e| Error::io(dest, e))?;
        return sync_parent(dest);
    }
    let exchanged = rustix::fs::renameat_with(
        rustix::fs::CWD,
        staged,
        rustix::fs::CWD,
        dest,
        rustix::fs::RenameFlags::EXCHANGE,
    );
    let old = match exchanged {
        Ok(()) => staged.to_path_buf(),
        Err(e)
            if e == rustix::io::Errno::INVAL
                || e == rustix::io::Errno::NOSYS
                || e == rustix::io::Errno::OPNOTSUPP =>
        {
            tracing::warn!(
                path = %dest.display(),
                "the file system cannot exchange directories atomically; replacing with two renames"
            );
            let old = hidden_sibling(dest, "old");
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
            std::fs::rename(staged, dest).map_err(|e| Error::io(dest, e))?;
            old
        }
        Err(e) => return Err(Error::io(dest, e.into())),
    };
    sync_parent(dest)?;
    std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))
}

/// Fsyncs every file and directory under `dir`.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&path, e))?;
        }
    }
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Refuses to let a stage replace `dest` unless it is new, an empty directory, or what an earlier
/// run of the stage wrote (it holds one of `markers`). The swap deletes the old directory whole,
/// so an `--out` pointed at a folder of the user's own files (their input files among them) must
/// fail before anything is written, not delete them. `flag` and `what` name the option and the
/// output in the message.
pub fn check_replaceable(dest: &Path, flag: &str, what: &str, markers: &[&str]) -> Result<()> {
    let refuse = |reason: String| {
        Err(Error::setting(
            flag,
            format!("{}: {reason}", dest.display()),
        ))
    };
    if dest.file_name().is_none() {
        return refuse("name the output directory itself (not `.` or `..`)".into());
    }
    let meta = match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dest, e)),
        Ok(meta) => meta,
    };
    if meta.file_type().is_symlink() {
        return refuse(
            "is a symbolic link, which the new output would replace: give the directory it points to"
                .into(),
        );
    }
    if !meta.is_dir() {
        return refuse(format!(
            "exists and is not a directory: give a new or empty directory, or an earlier {what}"
        ));
    }
    if is_mount_point(dest, &meta) {
        return refuse(
            "is a mount point, which a new output cannot be swapped into (the swap renames a \
             directory built beside it): give a directory inside it"
                .into(),
        );
    }
    let mut entries = std::fs::read_dir(dest).map_err(|e| Error::io(dest, e))?;
    if entries.next().is_none() || markers.iter().any(|m| dest.join(m).exists()) {
        return Ok(());
    }
    refuse(format!(
        "is not empty and is not an earlier {what} (it has no {}); writing there would delete what \
         it holds: give a new or empty directory",
        markers.join(" or ")
    ))
}

/// Holds an exclusive lock on `.NAME.lock` beside `dest` for as long as the file lives, so that
/// two runs writing one output (two `train --out model`) fail fast instead of mixing one run's
/// config with the other's weights. The second run fails at once, naming the lock.
pub fn lock_beside(dest: &Path, what: &str) -> Result<File> {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned());
    let parent = parent_dir(dest);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let path = parent.join(format!(".{}.lock", name.unwrap_or_else(|| "out".into())));
    try_lock_file(&path)?.ok_or_else(|| {
        Error::bad_file(
            &path,
            format!(
                "another run is writing {} {} (it holds this lock); try again when it ends",
                what,
                dest.display()
            ),
        )
    })
}

/// The lock file at `path` (created if missing), locked exclusively for as long as the file
/// lives, or `None` when another process holds it.
pub fn try_lock_file(path: &Path) -> Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, e)),
    }
}

/// Whether `dir` (with metadata `meta`) sits on another file system than its parent.
fn is_mount_point(dir: &Path, meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = std::fs::canonicalize(dir)
        .ok()
        .and_then(|d| d.parent().map(Path::to_path_buf));
    parent
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|p| p.dev() != meta.dev())
}

/// Fails now, naming the directory, if files cannot be created in `dir` (created if missing):
/// a job that writes its output at the end would otherwise find out after all its work.
pub fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = hidden_sibling(&dir.join("probe"), "writable");
    File::create(&probe).map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A directory built beside its destination and swapped into place by [`StagingDir::publish`]:
/// dropped before that (an error, a full disk), it is removed, so a failed run leaves nothing
/// behind. Creating one also removes what killed runs left for the same destination.
pub struct StagingDir {
    path: PathBuf,
    published: bool,
}

impl StagingDir {
    /// An empty staging directory for `dest` (`.NAME.TAG-PID`).
    pub fn create(dest: &Path, tag: &str) -> Result<StagingDir> {
        remove_stale_siblings(dest, tag);
        let path = hidden_sibling(dest, tag);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        Ok(StagingDir {
            path,
            published: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts the directory at `dest` ([`replace_dir`]).
    pub fn publish(mut self, dest: &Path) -> Result<()> {
        replace_dir(&self.path, dest)?;
        self.published = true;
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes the hidden siblings `.NAME.TAG-PID` of `path` whose process is gone: what a killed
/// run (kill -9, power loss) left, which no later run would otherwise remove, since each run
/// names its own by its process id. Those of a live process (another run) are left alone.
pub fn remove_stale_siblings(path: &Path, tag: &str) {
    let Some(name) = path.file_name() else { return };
    let prefix = format!(".{}.{tag}-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent_dir(path)) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let stale = entry.path();
        let removed = if stale.is_dir() {
            std::fs::remove_dir_all(&stale)
        } else {
            std::fs::remove_file(&stale)
        };
        if removed.is_ok() {
            tracing::info!(path = %stale.display(), "removed what a killed run left behind");
        }
    }
}

/// Whether process `pid` is running; where that cannot be told, it counts as running (nothing
/// is removed).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// A hidden path beside `path`, unique to this process (`.NAME.TAG-PID`): where a file or
/// directory is built before it is renamed into place, or where the old one waits meanwhile.
pub fn hidden_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    parent_dir(path).join(format!(".{name}.{tag}-{}", std::process::id()))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Fsyncs the directory holding `path`, so a rename into it survives a crash.
pub fn sync_parent(path: &Path) -> Result<()> {
    let parent = parent_dir(path);
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(parent, e))
}

/// sha256 of a file's bytes, hex-encoded.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn write_generation(dir: &Path, generation: u32) {
        std::fs::create_dir_all(dir.join("vocab")).unwrap();
        let body = generation.to_string().repeat(50_000);
        std::fs::write(dir.join("model.json"), &body).unwrap();
        std::fs::write(dir.join("vocab/title.json"), &body).unwrap();
    }

    /// Reads both files through one handle on the directory, as a loader that opens the
    /// directory once would: one generation, or the test fails. `dest` itself must always
    /// open; `None` when the generation it opened was replaced and deleted before its files
    /// were read (a real loader retries then).
    fn read_generation(dest: &Path) -> Option<(String, String)> {
        let dir = File::open(dest).expect("the directory is always there");
        let read = |name: &str| {
            let fd = rustix::fs::openat(
                &dir,
                name,
                rustix::fs::OFlags::RDONLY,
                rustix::fs::Mode::empty(),
            )
            .ok()?;
            let mut s = String::new();
            File::from(fd).read_to_string(&mut s).ok()?;
            Some(s)
        };
        Some((read("model.json")?, read("vocab/title.json")?))
    }

    #[test]
    fn a_second_run_on_one_output_fails_at_once_naming_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("model");
        let held = lock_beside(&dest, "model directory").unwrap();
        let err = lock_beside(&dest, "model directory")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(".model.lock") && err.contains("another run"),
            "{err}"
        );
        drop(held);
        lock_beside(&dest, "model directory").unwrap();
    }

    #[test]
    fn only_a_new_empty_or_earlier_output_directory_may_be_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let check = |p: &Path| check_replaceable(p, "out", "model directory", &["model.json"]);
        check(&tmp.path().join("new")).unwrap();
        let dir = tmp.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        check(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let err = check(&dir).unwrap_err().to_string();
        assert!(
            err.contains("`out`") && err.contains("no model.json"),
            "{err}"
        );
        std::fs::write(dir.join("model.json"), "{}").unwrap();
        check(&dir).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(check(&link)
            .unwrap_err()
            .to_string()
            .contains("symbolic link"));
        assert!(check(Path::new("..")).is_err());
        assert!(check(&dir.join("model.json"))
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
    }

    #[test]
    fn a_model_swap_under_load_shows_readers_one_whole_generation() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("model");
        write_generation(&dest, 0);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (dest, stop) = (dest.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Some((a, b)) = read_generation(&dest) else {
                        continue;
                    };
                    assert_eq!(a, b, "a mix of two generations");
                    assert_eq!(a.len(), 50_000, "a partly written file");
                    reads += 1;
                }
                reads
            })
        };
        for generation in 1..=30 {
            let staged = hidden_sibling(&dest, "staging");
            write_generation(&staged, generation % 10);
            replace_dir(&staged, &dest).unwrap();
            assert!(!staged.exists(), "the old directory is removed");
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(read_generation(&dest).unwrap().0.len(), 50_000);
    }
}
