//! Finding the PostgreSQL server binaries installed on the machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{ThrowawayError, ThrowawayErrorKind};
use crate::Result;

/// Where Debian and Ubuntu install each major version's server binaries, side by side.
const DEBIAN_VERSIONS: &str = "/usr/lib/postgresql";

/// Finds a directory holding `initdb` and `postgres`: `PGFLOW_PG_BIN` when set, else
/// `pg_config --bindir`, else the real directory of an `initdb` on `PATH`, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
///
/// ```no_run
/// # fn demo() -> pgflow_client::Result<()> {
/// let bin = pgflow_client::throwaway::find_bin_dir()?;
/// println!("initdb is {}", bin.join("initdb").display());
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::Throwaway`](crate::Error::Throwaway): [`PgBinInvalid`](ThrowawayErrorKind::PgBinInvalid)
/// when `PGFLOW_PG_BIN` names a directory without them, [`NoBinaries`](ThrowawayErrorKind::NoBinaries)
/// when none of the other places holds them.
pub fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PGFLOW_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if is_bin_dir(&dir) {
            Ok(dir)
        } else {
            Err(ThrowawayError::new(ThrowawayErrorKind::PgBinInvalid { dir }).into())
        };
    }
    let mut searched = Vec::new();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if is_bin_dir(&dir) {
            return Ok(dir);
        }
        searched.push(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.is_file() {
                // Debian links /usr/bin/initdb elsewhere; the real directory holds `postgres` too.
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                if let Some(parent) = real.parent()
                    && is_bin_dir(parent)
                {
                    return Ok(parent.to_path_buf());
                }
            }
            searched.push(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_VERSIONS)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            is_bin_dir(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    searched.push(Path::new(DEBIAN_VERSIONS).join("*").join("bin"));
    Err(ThrowawayError::new(ThrowawayErrorKind::NoBinaries { searched }).into())
}

fn is_bin_dir(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}
