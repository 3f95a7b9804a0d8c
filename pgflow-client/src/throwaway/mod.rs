//! A throwaway PostgreSQL server, and fresh test databases on it (feature `throwaway`, Unix
//! only).
//!
//! Examples and tests need a database with no set-up. [`ThrowawayServer::start`] runs `initdb` and
//! `postgres` from the binaries installed on the machine in a private temporary directory, on its
//! own port, with settings that trade durability for speed ([`ThrowawayServer::start_durable`]
//! keeps PostgreSQL's durable defaults, for benchmarks). When the process runs as root the server
//! runs as the unprivileged `postgres` OS user (PostgreSQL refuses root).
//!
//! The server is supervised by a small `sh` watchdog that holds the read end of a pipe whose write
//! end only this process has. When the handle drops, when the process exits, panics, gets Ctrl-C
//! or is killed outright, the pipe closes and the watchdog stops the server and deletes its
//! directory. No orphan server survives the process.
//!
//! [`TestDatabase`] builds on it: a fresh database for each test, cloned from a template that
//! already holds pgmq and the engine schema, on the server named by `DATABASE_URL` or else on a
//! throwaway server shared by the whole process. [`LocalDatabase`] is what an example connects
//! to: `DATABASE_URL`, or a throwaway server of its own.
//!
//! ```no_run
//! # async fn demo() -> pgflow_client::Result<()> {
//! use pgflow_client::throwaway::TestDatabase;
//!
//! let db = TestDatabase::new().await?;
//! let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(db.pool()).await?;
//! assert_eq!(one, 1);
//! # Ok(()) }
//! ```
//!
//! Whatever fails here before SQL is involved is an [`Error::Throwaway`] holding a
//! [`ThrowawayError`], whose [`kind`](ThrowawayError::kind) says what went wrong.

mod binaries;
mod local;
mod server;
mod test_db;
mod upstream;

use std::fmt;
use std::io;
use std::path::PathBuf;

pub use binaries::find_bin_dir;
pub use local::{LocalDatabase, database_url, database_url_from_env};
pub use server::{Shutdown, ThrowawayServer, shared_server};
pub use test_db::TestDatabase;
pub use upstream::{UPSTREAM_PACKAGE, UpstreamSchema, apply_migrations_up_to};

use crate::Error;

/// Why a throwaway server could not be found, started or restarted.
///
/// Its message says what to do about it; [`source`](std::error::Error::source) is the
/// operating system's error, when there is one.
///
/// ```no_run
/// use pgflow_client::Error;
/// use pgflow_client::throwaway::{ThrowawayErrorKind, ThrowawayServer};
///
/// match ThrowawayServer::start() {
///     Ok(server) => println!("started on port {}", server.port()),
///     Err(Error::Throwaway(err)) if matches!(err.kind(), ThrowawayErrorKind::NoBinaries { .. }) => {
///         println!("no PostgreSQL here, skipping");
///     }
///     Err(err) => panic!("{err}"),
/// }
/// ```
#[derive(Debug)]
pub struct ThrowawayError {
    kind: ThrowawayErrorKind,
    source: Option<io::Error>,
}

/// What went wrong, in a [`ThrowawayError`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ThrowawayErrorKind {
    /// No directory holding both `initdb` and `postgres` was found.
    NoBinaries {
        /// The directories looked in, in order; a `*` stands for every version directory.
        searched: Vec<PathBuf>,
    },
    /// `PGFLOW_PG_BIN` names a directory that lacks `initdb` or `postgres`.
    PgBinInvalid {
        /// The directory it names.
        dir: PathBuf,
    },
    /// The process runs as root, which PostgreSQL refuses, and no other OS user exists to run
    /// the server as.
    NoUnprivilegedUser {
        /// The user asked for (`PGFLOW_PG_USER`, by default `postgres`); `nobody` was tried too.
        user: String,
    },
    /// The server's temporary directory could not be created.
    TempDir,
    /// The server's directory could not be handed to the unprivileged user it runs as.
    Chown {
        /// The directory.
        dir: PathBuf,
        /// The user's id.
        uid: u32,
    },
    /// The watchdog (`sh`) could not be started.
    Spawn,
    /// No free TCP port on 127.0.0.1 could be found.
    FreePort,
    /// `initdb` failed to create the server's data directory.
    Initdb {
        /// The directory of the binaries.
        bin_dir: PathBuf,
        /// Its exit status as the shell saw it (128 + the signal's number when a signal ended
        /// it); `None` when it could not be read.
        status: Option<i32>,
        /// The end of its output.
        output: String,
    },
    /// The server exited, or did not accept connections in time.
    Start {
        /// The directory of the binaries.
        bin_dir: PathBuf,
        /// The port it was to listen on.
        port: u16,
        /// The end of its log.
        log: String,
    },
    /// A restart was asked of a server that was stopped, or whose watchdog is gone.
    Stopped {
        /// The server's port.
        port: u16,
    },
    /// A restart was asked, and the server did not stop in time.
    NotStopped {
        /// The server's port.
        port: u16,
    },
    /// Upstream's engine ([`UpstreamSchema`]) could not be fetched or read.
    Upstream {
        /// What failed, and what to do about it.
        detail: String,
    },
}

/// The way out that fits every failure: a server that is already running.
const USE_DATABASE_URL: &str = "or set DATABASE_URL to use a server you already have";

impl ThrowawayError {
    /// What went wrong.
    pub fn kind(&self) -> &ThrowawayErrorKind {
        &self.kind
    }

    pub(crate) fn new(kind: ThrowawayErrorKind) -> Self {
        Self { kind, source: None }
    }

    pub(crate) fn io(kind: ThrowawayErrorKind, source: io::Error) -> Self {
        Self {
            kind,
            source: Some(source),
        }
    }
}

impl fmt::Display for ThrowawayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ThrowawayErrorKind::NoBinaries { searched } => {
                let searched: Vec<String> = searched
                    .iter()
                    .map(|dir| dir.display().to_string())
                    .collect();
                write!(
                    f,
                    "no PostgreSQL server binaries (`initdb` and `postgres`) found for a \
                     throwaway server (searched {}). Install them (Debian/Ubuntu: `apt-get \
                     install postgresql`; Fedora: `dnf install postgresql-server`; macOS: `brew \
                     install postgresql`), or set PGFLOW_PG_BIN to the directory holding \
                     `initdb` and `postgres`, {USE_DATABASE_URL}",
                    searched.join(", ")
                )
            }
            ThrowawayErrorKind::PgBinInvalid { dir } => write!(
                f,
                "PGFLOW_PG_BIN={} holds no `initdb` and `postgres`: set it to the directory \
                 holding both (`pg_config --bindir` prints it), unset it to search PATH and \
                 /usr/lib/postgresql/*/bin, {USE_DATABASE_URL}",
                dir.display()
            ),
            ThrowawayErrorKind::NoUnprivilegedUser { user } => write!(
                f,
                "running as root, and PostgreSQL refuses to run as root, but there is no `{user}` \
                 user (nor `nobody`) to run the throwaway server as: create one (`useradd -r \
                 postgres`), set PGFLOW_PG_USER to an existing user, {USE_DATABASE_URL}"
            ),
            ThrowawayErrorKind::TempDir => write!(
                f,
                "cannot create a temporary directory for the throwaway server: set TMPDIR to a \
                 writable directory, {USE_DATABASE_URL}"
            ),
            ThrowawayErrorKind::Chown { dir, uid } => write!(
                f,
                "cannot hand {} to uid {uid}, the user the throwaway server runs as because \
                 PostgreSQL refuses root: set TMPDIR to a directory on a file system where root \
                 may change owners, run as an unprivileged user, {USE_DATABASE_URL}",
                dir.display()
            ),
            ThrowawayErrorKind::Spawn => write!(
                f,
                "cannot start `sh`, the throwaway server's watchdog: put `sh` on PATH, \
                 {USE_DATABASE_URL}"
            ),
            ThrowawayErrorKind::FreePort => write!(
                f,
                "cannot find a free TCP port on 127.0.0.1 for the throwaway server: bring up the \
                 loopback interface and allow binding to it, {USE_DATABASE_URL}"
            ),
            ThrowawayErrorKind::Initdb {
                bin_dir,
                status,
                output,
            } => {
                let status = status.map_or_else(|| "unknown".to_string(), |s| s.to_string());
                write!(
                    f,
                    "{}/initdb failed (exit status {status}) creating the throwaway server's \
                     data directory; fix what it reports, set PGFLOW_PG_BIN to other PostgreSQL \
                     binaries, {USE_DATABASE_URL}. Its output:\n{}",
                    bin_dir.display(),
                    output.trim()
                )
            }
            ThrowawayErrorKind::Start { bin_dir, port, log } => write!(
                f,
                "throwaway PostgreSQL from {} did not start on port {port} (it exited, or did \
                 not accept connections within {} s); fix what its log reports, set \
                 PGFLOW_PG_BIN to other PostgreSQL binaries, {USE_DATABASE_URL}. The end of its \
                 log:\n{}",
                bin_dir.display(),
                server::START_TIMEOUT.as_secs(),
                log.trim()
            ),
            ThrowawayErrorKind::Stopped { port } => write!(
                f,
                "the throwaway server on port {port} was stopped, or its watchdog is gone, so it \
                 cannot restart: start a new one with ThrowawayServer::start"
            ),
            ThrowawayErrorKind::NotStopped { port } => write!(
                f,
                "the throwaway server on port {port} did not stop within {} s of being asked to \
                 restart: drop it and start a new one with ThrowawayServer::start",
                server::START_TIMEOUT.as_secs()
            ),
            ThrowawayErrorKind::Upstream { detail } => write!(
                f,
                "upstream pgflow's engine ({UPSTREAM_PACKAGE}) is not available: {detail}"
            ),
        }
    }
}

impl std::error::Error for ThrowawayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|err| err as &(dyn std::error::Error + 'static))
    }
}

impl From<ThrowawayError> for Error {
    fn from(err: ThrowawayError) -> Self {
        Self::Throwaway(Box::new(err))
    }
}
