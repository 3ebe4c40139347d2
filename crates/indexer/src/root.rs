//! `INDEX_ROOT`: versioned index directories and the `CURRENT` pointer the server follows.
//!
//! ```text
//! INDEX_ROOT/
//!   CURRENT                      one line: the served version
//!   20261128T181500.123456Z-3fa2c1d0/   index.faiss, embeddings.parquet, items.parquet, manifest.json
//!   .staging-20261128T190000.654321Z-…  a build in progress (invisible; removed by the next job)
//!   .leases/HOLDER               one line: the version a running server serves (its lease)
//! ```
//!
//! A version is built in a staging directory, fsynced, renamed into place, and only then named
//! in `CURRENT` (itself written to a temporary file and renamed). A crash at any point leaves
//! `CURRENT` naming the previous complete version.
//!
//! Garbage collection keeps the newest versions, the current one, and every version a running
//! server holds a fresh lease on: a server that fell back to an older version, or has not yet
//! reloaded, keeps serving from files that are still there.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const CURRENT: &str = "CURRENT";
const STAGING_PREFIX: &str = ".staging-";
const LEASES: &str = ".leases";
/// A lease not renewed for this long belongs to a server that is gone.
pub const LEASE_TTL: Duration = Duration::from_secs(300);

/// The files of one index version (or of one shard's output): every stage names them here.
#[derive(Debug, Clone)]
pub struct VersionLayout(pub PathBuf);

impl VersionLayout {
    /// `manifest.json`: what the version holds and how it was measured; written last.
    pub fn manifest(&self) -> PathBuf {
        self.0.join("manifest.json")
    }
    /// `index.faiss`: the FAISS index.
    pub fn index(&self) -> PathBuf {
        self.0.join("index.faiss")
    }
    /// `embeddings.parquet`: every item's vector, by row.
    pub fn embeddings(&self) -> PathBuf {
        self.0.join("embeddings.parquet")
    }
    /// `items.parquet`: the items, in embedding row order (titles and categories served).
    pub fn items(&self) -> PathBuf {
        self.0.join("items.parquet")
    }
    /// `shard.json`: marks a shard's output complete (sharded embedding).
    pub fn shard_info(&self) -> PathBuf {
        self.0.join("shard.json")
    }
}

/// An index root directory.
#[derive(Debug, Clone)]
pub struct IndexRoot(PathBuf);

impl IndexRoot {
    pub fn new(path: impl Into<PathBuf>) -> IndexRoot {
        IndexRoot(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The `CURRENT` file (what the server watches).
    pub fn current_path(&self) -> PathBuf {
        self.0.join(CURRENT)
    }

    /// The version `CURRENT` names, if any.
    pub fn current(&self) -> Result<Option<String>> {
        let path = self.current_path();
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let v = s.trim().to_string();
                if !is_version_name(&v) {
                    return Err(Error::BadFile {
                        path,
                        reason: format!("`{v}` is not a version name"),
                    });
                }
                Ok(Some(v))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    pub fn version_dir(&self, version: &str) -> PathBuf {
        self.0.join(version)
    }

    /// Complete versions (those with a manifest), oldest first.
    pub fn versions(&self) -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(&self.0) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&self.0, e)),
        };
        let mut versions = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.0, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_version_name(&name) && VersionLayout(entry.path()).manifest().is_file() {
                versions.push(name);
            }
        }
        versions.sort();
        Ok(versions)
    }

    /// Takes the root's job lock (`INDEX_ROOT/.lock`) for as long as the guard lives: one job
    /// at a time builds, adds to or collects in a root, so garbage collection never removes a
    /// staging directory another job is still writing. A second job fails at once, naming the
    /// lock, rather than waiting.
    pub fn lock(&self) -> Result<RootLock> {
        std::fs::create_dir_all(&self.0).map_err(|e| Error::io(&self.0, e))?;
        let path = self.0.join(".lock");
        match features::fsutil::try_lock_file(&path)? {
            Some(file) => Ok(RootLock(file)),
            None => Err(Error::invalid(format!(
                "{}: another indexing job is running on this index root (it holds the lock); try again when it ends",
                path.display()
            ))),
        }
    }

    /// Creates (or empties) the staging directory of a new version. Checks first that the root
    /// is writable, so an unwritable output fails before any work is done. Call it holding
    /// [`lock`](Self::lock): every other staging directory is then a killed job's leftover, and
    /// is removed first, so that on a tight disk one kill does not make every later job fail.
    pub fn stage(&self, version: &str) -> Result<StagingDir> {
        std::fs::create_dir_all(&self.0).map_err(|e| Error::io(&self.0, e))?;
        self.remove_leftover_staging()?;
        let dir = self.0.join(format!("{STAGING_PREFIX}{version}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(StagingDir(dir))
    }

    /// Makes a staged version visible: fsyncs its files, renames it to its final name, then
    /// points `CURRENT` at it.
    pub fn publish(&self, staged: &Path, version: &str) -> Result<PathBuf> {
        for entry in std::fs::read_dir(staged).map_err(|e| Error::io(staged, e))? {
            let path = entry.map_err(|e| Error::io(staged, e))?.path();
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&path, e))?;
        }
        sync_dir(staged)?;
        let dir = self.version_dir(version);
        std::fs::rename(staged, &dir).map_err(|e| Error::io(&dir, e))?;
        features::fsutil::sync_parent(&dir)?;
        self.set_current(version)?;
        Ok(dir)
    }

    /// Points `CURRENT` at an existing version (also: roll back).
    pub fn set_current(&self, version: &str) -> Result<()> {
        if !VersionLayout(self.version_dir(version))
            .manifest()
            .is_file()
        {
            return Err(Error::invalid(format!(
                "{}: no complete version `{version}`",
                self.0.display()
            )));
        }
        features::fsutil::write_atomic(&self.current_path(), format!("{version}\n").as_bytes())
            .map_err(Error::from)
    }

    /// Deletes all but the newest `keep` versions (never the current one, nor one a running
    /// server holds a fresh lease on), leftover staging directories, leftover temporary
    /// `CURRENT` files and expired leases. Call it holding [`lock`](Self::lock): every writer
    /// of `CURRENT` does, so no temporary file is still being written. Returns the versions
    /// removed.
    pub fn collect_garbage(&self, keep: usize) -> Result<Vec<String>> {
        let current = self.current()?;
        let leased = self.leased_versions()?;
        let versions = self.versions()?;
        let old = versions.len().saturating_sub(keep.max(1));
        let mut removed = Vec::new();
        for v in &versions[..old] {
            if Some(v) == current.as_ref() || leased.contains(v) {
                continue;
            }
            self.remove_version_dir(v)?;
            removed.push(v.clone());
        }
        let current_tmp = format!(".{CURRENT}.tmp-");
        for entry in std::fs::read_dir(&self.0).map_err(|e| Error::io(&self.0, e))? {
            let entry = entry.map_err(|e| Error::io(&self.0, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let incomplete = is_version_name(&name)
                && !VersionLayout(entry.path()).manifest().is_file()
                && Some(&name) != current.as_ref()
                && !leased.contains(&name);
            if incomplete {
                // What a garbage collection killed midway left before versions were renamed
                // away first: never loadable, never listed, never collected otherwise.
                self.remove_version_dir(&name)?;
            } else if name.starts_with(&current_tmp) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        self.remove_leftover_staging()?;
        Ok(removed)
    }

    /// Removes a version's directory: renamed out of the versions first (one atomic step), so a
    /// kill midway leaves a staging leftover for the next job to remove, never a version whose
    /// manifest outlived its index or whose files outlived its manifest.
    fn remove_version_dir(&self, version: &str) -> Result<()> {
        let dir = self.version_dir(version);
        let doomed = self.0.join(format!("{STAGING_PREFIX}gc-{version}"));
        std::fs::rename(&dir, &doomed).map_err(|e| Error::io(&dir, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
    }

    /// Removes every staging directory: under the lock, none is being written. One that cannot
    /// be removed (a file held open on NFS, permissions) is a warning, not every later job's end.
    fn remove_leftover_staging(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.0).map_err(|e| Error::io(&self.0, e))? {
            let entry = entry.map_err(|e| Error::io(&self.0, e))?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(STAGING_PREFIX)
            {
                let path = entry.path();
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover staging directory");
                }
            }
        }
        Ok(())
    }

    fn lease_path(&self, holder: &str) -> PathBuf {
        self.0.join(LEASES).join(holder)
    }

    /// Records (or renews) that `holder` serves `version`. Servers call it when they start,
    /// after every swap and periodically, well within [`LEASE_TTL`].
    pub fn write_lease(&self, holder: &str, version: &str) -> Result<()> {
        let dir = self.0.join(LEASES);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        features::fsutil::write_atomic(&self.lease_path(holder), format!("{version}\n").as_bytes())
            .map_err(Error::from)
    }

    /// Gives up `holder`'s lease (a server shutting down).
    pub fn remove_lease(&self, holder: &str) {
        let _ = std::fs::remove_file(self.lease_path(holder));
    }

    /// Versions named by leases renewed within [`LEASE_TTL`]; expired leases are deleted.
    pub fn leased_versions(&self) -> Result<HashSet<String>> {
        let dir = self.0.join(LEASES);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        let now = SystemTime::now();
        let mut leased = HashSet::new();
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue; // a lease being written
            }
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default());
            match age {
                Ok(age) if age <= LEASE_TTL => {
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        leased.insert(text.trim().to_string());
                    }
                }
                Ok(_) => {
                    let _ = std::fs::remove_file(&path);
                }
                Err(_) => {}
            }
        }
        Ok(leased)
    }
}

/// Holds `INDEX_ROOT/.lock`; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct RootLock(#[allow(dead_code)] std::fs::File);

/// A version being built. Dropped before it is published (the job failed), it removes itself;
/// a job killed outright leaves it for the next job's [`IndexRoot::collect_garbage`].
#[derive(Debug)]
pub struct StagingDir(PathBuf);

impl StagingDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        // After `publish` renamed it, nothing is left here to remove.
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A new, sortable version name: UTC time to the microsecond, then 8 hex digits of a hash of
/// `content` and the exact time. Names must sort in the order they were made, for garbage
/// collection and the start-up fallback keep "the newest": with whole seconds, two versions of
/// one second (an `index add` right after a build) sorted by their hash instead. Within a
/// process the time never repeats or goes back, even if the clock does.
pub fn new_version(content: &str) -> String {
    static LAST_MICROS: AtomicI64 = AtomicI64::new(i64::MIN);
    let now_micros = chrono::Utc::now().timestamp_micros();
    let mut micros = now_micros;
    let _ = LAST_MICROS.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
        micros = now_micros.max(last.saturating_add(1));
        Some(micros)
    });
    let at = chrono::DateTime::from_timestamp_micros(micros).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(content.as_bytes());
    h.update(micros.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    let hash = hex::encode(h.finalize());
    format!("{}-{}", at.format("%Y%m%dT%H%M%S%.6fZ"), &hash[..8])
}

/// `YYYYMMDDTHHMMSS.ffffffZ-xxxxxxxx`, or the whole-second `YYYYMMDDTHHMMSSZ-xxxxxxxx` of
/// versions published before microseconds were added (they stay valid and sort by their time).
fn is_version_name(s: &str) -> bool {
    let b = s.as_bytes();
    let stamp_end = match b.len() {
        25 => 15,
        32 if b[15] == b'.' && b[16..22].iter().all(u8::is_ascii_digit) => 22,
        _ => return false,
    };
    b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[stamp_end] == b'Z'
        && b[stamp_end + 1] == b'-'
        && b[stamp_end + 2..].iter().all(u8::is_ascii_hexdigit)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(root: &IndexRoot, tag: &str) -> String {
        let v = new_version(tag);
        let dir = root.stage(&v).unwrap();
        std::fs::write(dir.path().join("manifest.json"), "{}").unwrap();
        root.publish(dir.path(), &v).unwrap();
        v
    }

    #[test]
    fn versions_made_within_one_second_sort_in_the_order_they_were_made() {
        let names: Vec<String> = (0..200).map(|i| new_version(&i.to_string())).collect();
        for pair in names.windows(2) {
            assert!(pair[0] < pair[1], "{pair:?}");
        }
        assert!(names.iter().all(|n| is_version_name(n)), "{names:?}");
        // Names of the older whole-second format are still versions, and sort by time.
        assert!(is_version_name("20261128T181500Z-3fa2c1d0"));
        assert!("20261128T181500Z-3fa2c1d0" < "20261128T181501.000000Z-00000000");
        for bad in [
            "20261128T181500Z-3fa2c1dz",
            "20261128T181500.12345xZ-3fa2c1d0",
            "CURRENT",
        ] {
            assert!(!is_version_name(bad), "{bad}");
        }
    }

    #[test]
    fn versions_sort_by_time_and_current_follows_publish() {
        let tmp = tempfile::tempdir().unwrap();
        let root = IndexRoot::new(tmp.path().join("idx"));
        assert_eq!(root.current().unwrap(), None);
        let a = publish(&root, "a");
        assert!(is_version_name(&a), "{a}");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let b = publish(&root, "b");
        assert!(a < b);
        assert_eq!(root.current().unwrap(), Some(b.clone()));
        assert_eq!(root.versions().unwrap(), vec![a.clone(), b.clone()]);
        // An abandoned staging directory (a killed job) is invisible and collected.
        let staged = root.stage(&new_version("c")).unwrap();
        let staged_path = staged.path().to_path_buf();
        std::mem::forget(staged);
        assert_eq!(root.versions().unwrap().len(), 2);
        root.set_current(&a).unwrap();
        // Keep 1: b is newest, a is current; nothing may go.
        assert!(root.collect_garbage(1).unwrap().is_empty());
        assert!(!staged_path.exists());
        root.set_current(&b).unwrap();
        assert_eq!(root.collect_garbage(1).unwrap(), vec![a]);
    }

    #[test]
    fn what_killed_jobs_left_is_removed_by_the_next_job() {
        let tmp = tempfile::tempdir().unwrap();
        let root = IndexRoot::new(tmp.path().join("idx"));
        let a = publish(&root, "a");
        // A garbage collection killed midway: a version directory that lost its manifest, and
        // one renamed away but not yet deleted; a build killed while staging.
        let half = new_version("half");
        std::fs::create_dir(root.version_dir(&half)).unwrap();
        std::fs::write(root.version_dir(&half).join("index.faiss"), "x").unwrap();
        let renamed = root.0.join(format!("{STAGING_PREFIX}gc-{half}x"));
        std::fs::create_dir(&renamed).unwrap();
        let killed = root.stage(&new_version("killed")).unwrap();
        let killed_build = killed.path().to_path_buf();
        std::mem::forget(killed); // a kill runs no destructor
        std::fs::write(killed_build.join("big"), vec![0u8; 1024]).unwrap();
        // The next build's staging removes the killed build's and the renamed one at once.
        let next = root.stage(&new_version("next")).unwrap();
        assert!(!killed_build.exists() && !renamed.exists() && next.path().exists());
        // Garbage collection removes the version that lost its manifest, not the current one.
        assert!(root.collect_garbage(5).unwrap().is_empty());
        assert!(!root.version_dir(&half).exists());
        assert_eq!(root.versions().unwrap(), vec![a.clone()]);
        assert_eq!(root.current().unwrap(), Some(a));
    }

    #[test]
    fn one_job_at_a_time_holds_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = IndexRoot::new(tmp.path().join("idx"));
        let held = root.lock().unwrap();
        let err = root.lock().unwrap_err().to_string();
        assert!(
            err.contains(".lock") && err.contains("another indexing job"),
            "{err}"
        );
        drop(held);
        root.lock().unwrap();
    }

    #[test]
    fn a_garbled_current_file_is_a_named_error() {
        let tmp = tempfile::tempdir().unwrap();
        let root = IndexRoot::new(tmp.path());
        std::fs::write(root.current_path(), "../../etc\n").unwrap();
        let err = root.current().unwrap_err().to_string();
        assert!(
            err.contains("CURRENT") && err.contains("not a version"),
            "{err}"
        );
    }

    #[test]
    fn gc_with_a_live_lease_keeps_the_leased_version() {
        let tmp = tempfile::tempdir().unwrap();
        let root = IndexRoot::new(tmp.path().join("idx"));
        let old = publish(&root, "a");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let newer = publish(&root, "b");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let newest = publish(&root, "c");
        // A server still serves the oldest version (it fell back, or has not reloaded yet).
        root.write_lease("server-a", &old).unwrap();
        let removed = root.collect_garbage(1).unwrap();
        assert_eq!(removed, vec![newer.clone()]);
        assert_eq!(root.versions().unwrap(), vec![old.clone(), newest.clone()]);
        // Once the server is gone, the version goes with the next collection.
        root.remove_lease("server-a");
        assert_eq!(root.collect_garbage(1).unwrap(), vec![old]);
    }

    #[test]
    fn gc_removes_leftover_temporary_current_files_and_expired_leases() {
        let tmp = tempfile::tempdir().unwrap();
        let root = IndexRoot::new(tmp.path().join("idx"));
        let v = publish(&root, "a");
        let leftover = root.path().join(".CURRENT.tmp-4242");
        std::fs::write(&leftover, "junk").unwrap();
        root.write_lease("gone", &v).unwrap();
        let lease = root.path().join(".leases/gone");
        let long_ago = SystemTime::now() - LEASE_TTL - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&lease)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        root.collect_garbage(3).unwrap();
        assert!(!leftover.exists());
        assert!(!lease.exists(), "an expired lease is deleted");
        assert_eq!(root.current().unwrap(), Some(v));
    }
}
