//! A throwaway PostgreSQL server, and fresh test databases on it.
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
//! throwaway server shared by the whole process.
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

use std::fmt;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::{Error, Result};

/// How long a fresh server may take to accept connections before we give up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The watchdog: creates the cluster, starts the server, then blocks on stdin. EOF on stdin means
/// the owning process is gone or dropped its handle, so the server is stopped and its directory
/// removed. Signals are ignored so that only the pipe decides. A line `restart INT` or
/// `restart QUIT` on stdin stops the server with that signal (fast or immediate shutdown) and
/// starts it again on the same data directory and port ([`ThrowawayServer::restart`]). `$4` holds
/// extra server settings, split on spaces.
const WATCHDOG: &str = r#"
bin="$1"; dir="$2"; port="$3"; settings="$4"
trap '' INT TERM HUP QUIT
if ! "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1; then
  echo "initdb failed" >"$dir/failed"; cat "$dir/initdb.log" >>"$dir/failed"; read -r _ignored; rm -rf "$dir"; exit 1
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
    /// `initdb` on `PATH`, then in `/usr/lib/postgresql/*/bin`, newest version first.
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
    pub fn start_durable() -> Result<Self> {
        Self::start_with("")
    }

    fn start_with(settings: &str) -> Result<Self> {
        let bin_dir = find_bin_dir()?;
        let mut last_error = None;
        // Picking a free port and binding it later is racy; a second attempt covers the
        // rare collision with another process.
        for _ in 0..3 {
            match Self::start_in(&bin_dir, settings) {
                Ok(server) => return Ok(server),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::Throwaway("server did not start".into())))
    }

    fn start_in(bin_dir: &Path, settings: &str) -> Result<Self> {
        let owner = server_owner()?;
        let dir = tempfile::Builder::new()
            .prefix("pgflow-pg-")
            .tempdir()
            .map_err(|err| Error::Throwaway(format!("cannot create a temporary directory: {err}")))?
            .keep();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|err| {
                Error::Throwaway(format!("cannot hand {} to uid {uid}: {err}", dir.display()))
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
            .map_err(|err| Error::Throwaway(format!("cannot start sh: {err}")))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| Error::Throwaway("watchdog has no stdin".into()))?;
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

    fn wait_until_ready(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = self.dir.join("data").join("postmaster.pid");
        loop {
            // postmaster.pid ends with the status line "ready" once connections are accepted.
            if let Ok(text) = std::fs::read_to_string(&pid_file)
                && text.lines().any(|line| line.trim() == "ready")
            {
                return Ok(());
            }
            let exited = {
                let mut guard = self.watchdog.lock().unwrap_or_else(|p| p.into_inner());
                match guard.as_mut() {
                    Some((child, _)) => child.try_wait().ok().flatten().is_some(),
                    None => true,
                }
            };
            let failed = self.dir.join("failed").exists();
            if exited || failed || Instant::now() > deadline {
                let log = self.log_tail();
                return Err(Error::Throwaway(format!(
                    "PostgreSQL from {} did not start on port {}: {}",
                    self.bin_dir.display(),
                    self.port,
                    log.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        for name in ["failed", "postgres.log"] {
            if let Ok(mut file) = std::fs::File::open(self.dir.join(name)) {
                let _ = file.read_to_string(&mut text);
            }
        }
        let mut start = text.len().saturating_sub(2000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_string()
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
    /// [`Error::Throwaway`] if the server was stopped or does not come back.
    pub fn restart(&self, shutdown: Shutdown) -> Result<()> {
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let old_pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().next().map(str::to_owned));
        {
            let mut guard = self.watchdog.lock().unwrap_or_else(|p| p.into_inner());
            let Some((_, stdin)) = guard.as_mut() else {
                return Err(Error::Throwaway("the server was stopped".into()));
            };
            let signal = match shutdown {
                Shutdown::Fast => "INT",
                Shutdown::Immediate => "QUIT",
            };
            writeln!(stdin, "restart {signal}")
                .and_then(|()| stdin.flush())
                .map_err(|err| Error::Throwaway(format!("cannot reach the watchdog: {err}")))?;
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
                return Err(Error::Throwaway("the server did not stop".into()));
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

/// `DATABASE_URL`, when it is set and not blank: the server the user chose over a throwaway one.
///
/// ```
/// let chosen = pgflow_client::throwaway::database_url_from_env();
/// println!("{}", chosen.as_deref().unwrap_or("no DATABASE_URL: a throwaway server"));
/// ```
pub fn database_url_from_env() -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// Where to connect: `DATABASE_URL` when set, else a database on the shared throwaway server.
///
/// Returns the URL of an administrative database (one in which `CREATE DATABASE` may be run).
pub fn database_url() -> Result<String> {
    match database_url_from_env() {
        Some(url) => Ok(url),
        None => Ok(shared_server()?.url("postgres")),
    }
}

/// A database for an example or a local run: the one `DATABASE_URL` names, or else the
/// `postgres` database of a throwaway server that lives as long as this value.
///
/// ```no_run
/// # async fn demo() -> pgflow_client::Result<()> {
/// let db = pgflow_client::throwaway::LocalDatabase::connect().await?;
/// let client = pgflow_client::Client::new(db.pool().clone());
/// client.install().await?;
/// // ...
/// db.close().await; // closes the pool, then stops the throwaway server if there is one
/// # Ok(()) }
/// ```
pub struct LocalDatabase {
    pool: PgPool,
    url: String,
    server: Option<ThrowawayServer>,
}

impl fmt::Debug for LocalDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalDatabase")
            .field("url", &self.url)
            .field("throwaway", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

impl LocalDatabase {
    /// Connects to `DATABASE_URL`, or starts a throwaway server when it is not set.
    pub async fn connect() -> Result<Self> {
        let (url, server) = match database_url_from_env() {
            Some(url) => (url, None),
            None => {
                let server = ThrowawayServer::start()?;
                tracing::info!(
                    port = server.port(),
                    "started a throwaway PostgreSQL (DATABASE_URL is not set)"
                );
                (server.url("postgres"), Some(server))
            }
        };
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await?;
        Ok(Self { pool, url, server })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The connection URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Closes the pool, then stops the throwaway server if one was started.
    pub async fn close(self) {
        self.pool.close().await;
        drop(self.server);
    }
}

/// A fresh database with pgmq and the engine schema installed, for one test.
///
/// Each one is a clone of a template database that is built once per server and schema version,
/// so creating one costs a file copy, and tests running in parallel never see each other's data.
/// It is dropped when the value drops, unless the thread is panicking: a failed test leaves its
/// database behind for inspection (on a throwaway server it disappears with the server anyway).
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
    pool: PgPool,
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl TestDatabase {
    /// Creates a fresh database holding pgmq and the pgflow schema.
    pub async fn new() -> Result<Self> {
        Self::create_default(true).await
    }

    /// Creates a fresh, empty database (no pgmq, no schema), for testing installation itself.
    pub async fn empty() -> Result<Self> {
        Self::create_default(false).await
    }

    /// Like [`new`](Self::new), on the server that `admin_url` connects to: the URL of a
    /// database in which `CREATE DATABASE` may be run.
    ///
    /// ```no_run
    /// # async fn demo() -> pgflow_client::Result<()> {
    /// use pgflow_client::throwaway::{TestDatabase, ThrowawayServer};
    ///
    /// let server = ThrowawayServer::start_durable()?;
    /// let db = TestDatabase::new_in(&server.url("postgres")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn new_in(admin_url: &str) -> Result<Self> {
        Self::create(admin_url.to_owned(), true).await
    }

    async fn create_default(with_schema: bool) -> Result<Self> {
        Self::create(database_url()?, with_schema).await
    }

    async fn create(admin_url: String, with_schema: bool) -> Result<Self> {
        let name = format!("pgflow_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await?;
        if with_schema {
            let template = template_database(&admin_url).await?;
            let strategy = if server_version(&mut admin).await? >= 150_000 {
                // FILE_COPY skips WAL-logging every page of the copy: much faster for a test.
                " STRATEGY = FILE_COPY"
            } else {
                ""
            };
            sqlx::query(&format!(
                "CREATE DATABASE {} TEMPLATE {}{strategy}",
                quote_ident(&name),
                quote_ident(&template)
            ))
            .execute(&mut admin)
            .await?;
        } else {
            sqlx::query(&format!("CREATE DATABASE {}", quote_ident(&name)))
                .execute(&mut admin)
                .await?;
        }
        admin.close().await?;
        let url = replace_database(&admin_url, &name)?;
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await?;
        Ok(Self {
            name,
            url,
            admin_url,
            pool,
        })
    }

    /// A pool connected to this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The connection URL of this database, for other processes (CLI, workers) and tools.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("pgflow: keeping test database {} for inspection", self.url);
            return;
        }
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop cannot await, and the test's runtime may be shutting down: use a runtime of our
        // own on a plain thread. The pool is not closed from there (its connections belong to
        // the blocked runtime); FORCE ends them.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&name)
                ))
                .execute(&mut admin)
                .await
                .ok()?;
                admin.close().await.ok()
            })
        });
        let _ = dropped.join();
    }
}

/// Builds (once per server, schema version and process) the template every test database clones.
async fn template_database(admin_url: &str) -> Result<String> {
    static TEMPLATES: tokio::sync::Mutex<Vec<(String, String)>> =
        tokio::sync::Mutex::const_new(Vec::new());
    let mut known = TEMPLATES.lock().await;
    if let Some((_, name)) = known.iter().find(|(url, _)| url == admin_url) {
        return Ok(name.clone());
    }
    let fingerprint = pgflow_core::schema::fingerprint();
    let name = format!("pgflow_template_{}", &fingerprint[..12]);

    let mut admin = PgConnection::connect(admin_url).await?;
    // Other processes (test binaries sharing one DATABASE_URL) may build the same template.
    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(&name)
        .execute(&mut admin)
        .await?;
    let result = build_template(&mut admin, admin_url, &name).await;
    sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind(&name)
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    result?;
    known.push((admin_url.to_string(), name.clone()));
    Ok(name)
}

async fn build_template(admin: &mut PgConnection, admin_url: &str, name: &str) -> Result<()> {
    let ready: Option<bool> =
        sqlx::query_scalar("SELECT datistemplate FROM pg_database WHERE datname = $1")
            .bind(name)
            .fetch_optional(&mut *admin)
            .await?;
    match ready {
        Some(true) => return Ok(()),
        // A build that died half-way: start over.
        Some(false) => {
            sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", quote_ident(name)))
                .execute(&mut *admin)
                .await?;
        }
        None => {}
    }
    sqlx::query(&format!("CREATE DATABASE {}", quote_ident(name)))
        .execute(&mut *admin)
        .await?;
    let url = replace_database(admin_url, name)?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    crate::install::install(&pool).await?;
    pool.close().await;
    sqlx::query(&format!(
        "ALTER DATABASE {} WITH IS_TEMPLATE true",
        quote_ident(name)
    ))
    .execute(&mut *admin)
    .await?;
    Ok(())
}

async fn server_version(conn: &mut PgConnection) -> Result<i32> {
    let text: String = sqlx::query_scalar("SHOW server_version_num")
        .fetch_one(conn)
        .await?;
    Ok(text.trim().parse().unwrap_or(0))
}

/// The same URL with another database name, keeping host, credentials and parameters.
fn replace_database(url: &str, database: &str) -> Result<String> {
    let options: PgConnectOptions = url.parse()?;
    let current = options.get_database().unwrap_or_default().to_string();
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let base = match base.rsplit_once('/') {
        // `scheme://host/db`: the last segment is the database unless it is the authority.
        Some((head, tail)) if !head.ends_with('/') && (tail == current || current.is_empty()) => {
            format!("{head}/{database}")
        }
        _ => format!("{}/{database}", base.trim_end_matches('/')),
    };
    Ok(match query {
        Some(query) => format!("{base}?{query}"),
        None => base,
    })
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The uid and gid to run the server as: the `postgres` user when we are root, else ourselves.
fn server_owner() -> Result<Option<(u32, u32)>> {
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
    Err(Error::Throwaway(format!(
        "running as root, and PostgreSQL refuses to run as root, but there is no `{wanted}` user \
         to run it as: create one (`useradd -r postgres`), set PGFLOW_PG_USER, or set DATABASE_URL"
    )))
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|err| Error::Throwaway(format!("cannot find a free port: {err}")))?;
    Ok(listener
        .local_addr()
        .map_err(|err| Error::Throwaway(format!("cannot find a free port: {err}")))?
        .port())
}

fn is_bin_dir(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

/// Finds a directory holding `initdb` and `postgres`.
pub fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PGFLOW_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if is_bin_dir(&dir) {
            Ok(dir)
        } else {
            Err(Error::Throwaway(format!(
                "PGFLOW_PG_BIN={} holds no `initdb` and `postgres`",
                dir.display()
            )))
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
        searched.push(dir.display().to_string());
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
        }
        searched.push("PATH".into());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
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
    searched.push("/usr/lib/postgresql/*/bin".into());
    Err(Error::NoPostgres {
        searched: searched.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            replace_database("postgres://u:p@h:5432/postgres", "t1").unwrap(),
            "postgres://u:p@h:5432/t1"
        );
        assert_eq!(
            replace_database("postgres://u@h/postgres?sslmode=disable", "t1").unwrap(),
            "postgres://u@h/t1?sslmode=disable"
        );
        assert_eq!(
            replace_database("postgres://u@h:5432", "t1").unwrap(),
            "postgres://u@h:5432/t1"
        );
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
    }
}
