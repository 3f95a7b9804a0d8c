//! Starting, restarting and stopping the server, under its watchdog.

use std::fmt;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{ThrowawayError, ThrowawayErrorKind, find_bin_dir};
use crate::Result;

/// How long a fresh server may take to accept connections, and a restarted one to stop, before
/// we give up.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The watchdog: creates the cluster, starts the server, then blocks on stdin. EOF on stdin means
/// the owning process is gone or dropped its handle, so the server is stopped and its directory
/// removed. Signals are ignored so that only the pipe decides. A line `restart INT` or
/// `restart QUIT` on stdin stops the server with that signal (fast or immediate shutdown) and
/// starts it again on the same data directory and port ([`ThrowawayServer::restart`]). `$4` holds
/// extra server settings, split on spaces.
///
/// When `initdb` fails, its exit status goes to `failed`, written under another name and renamed
/// so that [`ThrowawayServer::wait_until_ready`] never reads it half-written; its output stays in
/// `initdb.log` until the pipe closes.
const WATCHDOG: &str = r#"
bin="$1"; dir="$2"; port="$3"; settings="$4"
trap '' INT TERM HUP QUIT
"$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1
status=$?
if [ "$status" -ne 0 ]; then
  echo "$status" >"$dir/failed.tmp"; mv "$dir/failed.tmp" "$dir/failed"
  read -r _ignored; rm -rf "$dir"; exit 1
fi
serve() {
  "$bin/postgres" -D "$dir/data" -p "$port" -k "$dir" -c listen_addresses=127.0.0.1 \
    $settings -c max_connections=300 -c shared_buffers=256MB -c max_locks_per_transaction=256 \
    -c log_min_messages=warning >>"$dir/postgres.log" 2>&1 &
  pid=$!
}
serve
while read -r command signal; do
  if [ "$command" = restart ]; then
    kill "-$signal" "$pid" 2>/dev/null
    wait "$pid"
    serve
  fi
done
kill -INT "$pid" 2>/dev/null
wait "$pid"
rm -rf "$dir"
"#;

/// What [`ThrowawayServer::start`] trades: a crash of the machine may lose or corrupt the data,
/// which for a throwaway server does not matter, and commits no longer wait for the disk.
const FAST_SETTINGS: &str = "-c fsync=off -c full_page_writes=off";

/// How many times a start is tried: picking a free port and binding it later is racy, and
/// another process may take the port in between.
const START_ATTEMPTS: u32 = 3;

/// How much of a log an error carries.
const LOG_TAIL: usize = 2000;

/// A PostgreSQL server started from the machine's binaries, deleted when dropped.
///
/// ```no_run
/// # fn demo() -> pgflow_client::Result<()> {
/// let server = pgflow_client::throwaway::ThrowawayServer::start()?;
/// println!("connect with {}", server.url("postgres"));
/// drop(server); // stops the server and deletes its data directory
/// # Ok(()) }
/// ```
pub struct ThrowawayServer {
    dir: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
}

impl fmt::Debug for ThrowawayServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrowawayServer")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("bin_dir", &self.bin_dir)
            .finish_non_exhaustive()
    }
}

impl ThrowawayServer {
    /// Starts a new server and waits until it accepts connections.
    ///
    /// The binaries are looked for in `PGFLOW_PG_BIN`, then next to `pg_config --bindir` or
    /// `initdb` on `PATH`, then in `/usr/lib/postgresql/*/bin`, newest version first
    /// ([`find_bin_dir`]).
    ///
    /// # Errors
    ///
    /// [`Error::Throwaway`](crate::Error::Throwaway) when no binaries are found, when the process
    /// runs as root and no other user exists to run the server as, when the operating system
    /// refuses a directory, a port or a process, or when `initdb` or the server fails (the
    /// error carries the end of their output).
    pub fn start() -> Result<Self> {
        Self::start_with(FAST_SETTINGS)
    }

    /// Starts a new server that keeps PostgreSQL's durable defaults (`fsync` and
    /// `full_page_writes` on): a commit waits for the disk, as on a production server. Slower
    /// than [`start`](Self::start); what a benchmark needs, since the cost of a commit is part of
    /// what it measures.
    ///
    /// ```no_run
    /// # fn demo() -> pgflow_client::Result<()> {
    /// let server = pgflow_client::throwaway::ThrowawayServer::start_durable()?;
    /// println!("benchmark against {}", server.url("postgres"));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_durable() -> Result<Self> {
        Self::start_with("")
    }

    fn start_with(settings: &str) -> Result<Self> {
        let bin_dir = find_bin_dir()?;
        let mut attempt = 1;
        loop {
            match Self::start_in(&bin_dir, settings) {
                Ok(server) => return Ok(server),
                Err(err) if attempt == START_ATTEMPTS => return Err(err.into()),
                Err(_) => attempt += 1,
            }
        }
    }

    fn start_in(bin_dir: &Path, settings: &str) -> Result<Self, ThrowawayError> {
        let owner = server_owner()?;
        let dir = tempfile::Builder::new()
            .prefix("pgflow-pg-")
            .tempdir()
            .map_err(|err| ThrowawayError::io(ThrowawayErrorKind::TempDir, err))?
            .keep();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|err| {
                ThrowawayError::io(
                    ThrowawayErrorKind::Chown {
                        dir: dir.clone(),
                        uid,
                    },
                    err,
                )
            })?;
        }
        let port = free_port()?;

        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg("pgflow-watchdog")
            .arg(bin_dir)
            .arg(&dir)
            .arg(port.to_string())
            .arg(settings)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C at the terminal reaches us, not the server, and
            // the server then goes down through the pipe like on every other exit path.
            .process_group(0);
        if let Some((uid, gid)) = owner {
            command.uid(uid).gid(gid);
        }
        let mut child = command
            .spawn()
            .map_err(|err| ThrowawayError::io(ThrowawayErrorKind::Spawn, err))?;
        let stdin = child.stdin.take().ok_or_else(|| {
            ThrowawayError::io(
                ThrowawayErrorKind::Spawn,
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the watchdog has no stdin"),
            )
        })?;
        let server = Self {
            dir,
            port,
            bin_dir: bin_dir.to_path_buf(),
            watchdog: Mutex::new(Some((child, stdin))),
        };
        server.wait_until_ready()?;
        tracing::debug!(port, dir = %server.dir.display(), bin = %server.bin_dir.display(), "throwaway PostgreSQL started");
        Ok(server)
    }

    fn wait_until_ready(&self) -> Result<(), ThrowawayError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = self.dir.join("data").join("postmaster.pid");
        loop {
            // postmaster.pid ends with the status line "ready" once connections are accepted.
            if let Ok(text) = std::fs::read_to_string(&pid_file)
                && text.lines().any(|line| line.trim() == "ready")
            {
                return Ok(());
            }
            if let Ok(status) = std::fs::read_to_string(self.dir.join("failed")) {
                return Err(ThrowawayError::new(ThrowawayErrorKind::Initdb {
                    bin_dir: self.bin_dir.clone(),
                    status: status.trim().parse().ok(),
                    output: tail(&self.dir.join("initdb.log")),
                }));
            }
            let exited = {
                let mut guard = self.watchdog.lock().unwrap_or_else(|p| p.into_inner());
                match guard.as_mut() {
                    Some((child, _)) => child.try_wait().ok().flatten().is_some(),
                    None => true,
                }
            };
            if exited || Instant::now() > deadline {
                return Err(ThrowawayError::new(ThrowawayErrorKind::Start {
                    bin_dir: self.bin_dir.clone(),
                    port: self.port,
                    log: tail(&self.dir.join("postgres.log")),
                }));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The connection URL of database `database` on this server (user `postgres`, no password).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's data, log and Unix socket.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of the PostgreSQL binaries this server was started from.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Stops the server and starts it again on the same data directory and port, waiting until
    /// it accepts connections again: for tests of what survives a database restart. Every
    /// connection is closed by the server; data committed before survives.
    ///
    /// [`Shutdown::Fast`] is a clean shutdown (`pg_ctl stop -m fast`: open transactions roll
    /// back, a checkpoint is written); [`Shutdown::Immediate`] is a crash as far as the data is
    /// concerned (`-m immediate`: no checkpoint, WAL replayed at the next start).
    ///
    /// ```no_run
    /// # fn demo() -> pgflow_client::Result<()> {
    /// use pgflow_client::throwaway::{Shutdown, ThrowawayServer};
    ///
    /// let server = ThrowawayServer::start()?;
    /// server.restart(Shutdown::Immediate)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Throwaway`](crate::Error::Throwaway) if the server was stopped, does not stop,
    /// or does not come back.
    pub fn restart(&self, shutdown: Shutdown) -> Result<()> {
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let old_pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().next().map(str::to_owned));
        {
            let mut guard = self.watchdog.lock().unwrap_or_else(|p| p.into_inner());
            let stopped = ThrowawayErrorKind::Stopped { port: self.port };
            let Some((_, stdin)) = guard.as_mut() else {
                return Err(ThrowawayError::new(stopped).into());
            };
            let signal = match shutdown {
                Shutdown::Fast => "INT",
                Shutdown::Immediate => "QUIT",
            };
            writeln!(stdin, "restart {signal}")
                .and_then(|()| stdin.flush())
                .map_err(|err| ThrowawayError::io(stopped, err))?;
        }
        // The new postmaster writes a postmaster.pid of its own: wait until the old one is gone.
        let deadline = Instant::now() + START_TIMEOUT;
        while old_pid.is_some()
            && std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|text| text.lines().next().map(str::to_owned))
                == old_pid
        {
            if Instant::now() > deadline {
                return Err(ThrowawayError::new(ThrowawayErrorKind::NotStopped {
                    port: self.port,
                })
                .into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.wait_until_ready()?;
        tracing::debug!(
            port = self.port,
            ?shutdown,
            "throwaway PostgreSQL restarted"
        );
        Ok(())
    }

    /// Stops the server and deletes its directory, waiting until both are done.
    pub fn stop(&self) {
        let taken = self
            .watchdog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((mut child, stdin)) = taken {
            drop(stdin);
            let _ = child.wait();
            tracing::debug!(port = self.port, "throwaway PostgreSQL stopped");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How [`ThrowawayServer::restart`] stops the server before starting it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// SIGINT: sessions are ended, open transactions roll back, a checkpoint is written.
    Fast,
    /// SIGQUIT: the server stops at once, as in a crash; recovery replays the WAL at start.
    Immediate,
}

impl Drop for ThrowawayServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The process-wide throwaway server, started on first use and stopped when the process exits.
///
/// # Errors
///
/// As [`ThrowawayServer::start`], on first use or after a first use that failed.
pub fn shared_server() -> Result<&'static ThrowawayServer> {
    static SHARED: OnceLock<ThrowawayServer> = OnceLock::new();
    static STARTING: Mutex<()> = Mutex::new(());
    if let Some(server) = SHARED.get() {
        return Ok(server);
    }
    let _guard = STARTING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(server) = SHARED.get() {
        return Ok(server);
    }
    let server = ThrowawayServer::start()?;
    Ok(SHARED.get_or_init(|| server))
}

/// The last [`LOG_TAIL`] bytes of a log, or less to start on a character; empty when unreadable.
fn tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let mut start = text.len().saturating_sub(LOG_TAIL);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

/// The uid and gid to run the server as: the `postgres` user when we are root, else ourselves.
fn server_owner() -> Result<Option<(u32, u32)>, ThrowawayError> {
    let euid = std::fs::metadata("/proc/self")
        .map(|meta| meta.uid())
        .unwrap_or(u32::MAX);
    if euid != 0 {
        return Ok(None);
    }
    let wanted = std::env::var("PGFLOW_PG_USER").unwrap_or_else(|_| "postgres".into());
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for candidate in [wanted.as_str(), "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3
                && fields[0] == candidate
                && let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse())
            {
                return Ok(Some((uid, gid)));
            }
        }
    }
    Err(ThrowawayError::new(
        ThrowawayErrorKind::NoUnprivilegedUser { user: wanted },
    ))
}

fn free_port() -> Result<u16, ThrowawayError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|err| ThrowawayError::io(ThrowawayErrorKind::FreePort, err))
}
