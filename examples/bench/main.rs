//! The benchmark: pgflow's throughput and latency, as a ratio to what the same PostgreSQL server
//! commits in a minimal one-transaction-per-task loop, measured in the same invocation.
//!
//! ```text
//! cargo run --release --example bench -- [--smoke] [--workload chain5|diamond|fanout1000|all]
//!     [--workers 1,4] [--json PATH] [--profile]
//! cargo run --release --example bench -- --prune-tasks 1000000 [--workers 4]
//! cargo run --release --example bench -- --executors driver --workload chain5,fanout1000 \
//!     --driver-all --engines current,upstream-0.8.1 --rounds 3
//! cargo run --release --example bench -- --workload none --curves [map,start,backlog,flows,workers]
//! ```
//!
//! With `DATABASE_URL` set it uses that server (the user needs `CREATEDB`); without it, it starts
//! a throwaway server from the PostgreSQL binaries on this machine, durable as a production
//! server is (`fsync` on) unless `--no-fsync`. Every measured row gets a fresh database. See
//! docs/performance.md for what each column means.

mod curves;
mod driver;
mod engines;
mod floors;
mod flows;
mod limited;
mod measure;
mod prune;
mod worker;

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use pgflow_client::throwaway::{TestDatabase, ThrowawayServer};
use serde_json::{Value, json};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use crate::engines::Engine;
use crate::flows::Workload;
use crate::measure::{
    BoxResult, CeilingVariant, CpuMark, CpuSpent, FunctionProfile, Percentiles, RunStats, round3,
};

/// Runs started per statement by the starter (one connection, chunks back to back).
const START_CHUNK: usize = 50;

#[derive(Debug, Parser)]
#[command(about = "pgflow benchmark: throughput and latency as a ratio to the server's ceiling")]
struct Args {
    /// A seconds-long run that only checks that everything completes (CI).
    #[arg(long)]
    smoke: bool,
    /// Workloads, comma-separated: chain5, diamond, fanout1000, mapchain1000, all, or none
    /// (only the ceiling, the floors and, with --curves, the curves).
    #[arg(long, default_value = "all", value_delimiter = ',')]
    workload: Vec<String>,
    /// Numbers of worker instances (each its own `Worker` with its own pool, in this process).
    #[arg(long, value_delimiter = ',')]
    workers: Option<Vec<usize>>,
    /// Numbers of clients of the SQL-only driver baseline (chain5 only; default: --workers).
    #[arg(long, value_delimiter = ',')]
    driver_clients: Option<Vec<usize>>,
    /// Run the driver baseline on every workload, not only chain5.
    #[arg(long)]
    driver_all: bool,
    /// Seconds a row may take before the benchmark gives up (default 900, smoke: 120).
    #[arg(long)]
    row_timeout: Option<u64>,
    /// Engines the driver rows run on, comma-separated: current, upstream-0.8.1 (fetched
    /// from npm at benchmark time), or a migration number (this engine as it left it).
    #[arg(long, default_value = "current", value_delimiter = ',')]
    engines: Vec<String>,
    /// Rounds of the driver rows, each over every engine in turn: the engine comparison
    /// takes the median of its rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// What to run: driver, worker, or both.
    #[arg(long, default_value = "driver,worker", value_delimiter = ',')]
    executors: Vec<String>,
    /// Messages read per poll, for the driver and the worker.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Handlers running at once per worker instance.
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Runs of chain5 and diamond (default 500, smoke: 20): more make steadier figures.
    #[arg(long)]
    runs: Option<usize>,
    /// Sequential single runs of chain5 for the idle latency rows.
    #[arg(long)]
    idle_runs: Option<usize>,
    /// Seconds of each ceiling measurement.
    #[arg(long)]
    ceiling_secs: Option<f64>,
    /// Also report per-function time (`track_functions = pl`) for every row; adds overhead.
    #[arg(long)]
    profile: bool,
    /// Where to write the results (default examples/bench/results/latest.json, smoke:
    /// examples/bench/results/smoke.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Start the throwaway server with `fsync=off`, as the tests do: commits stop waiting for
    /// the disk, which leaves the CPU cost alone (and makes `synchronous_commit` moot).
    #[arg(long)]
    no_fsync: bool,
    /// After the other rows, run each workload once more at the largest worker count with this
    /// batch size and concurrency (default 50, smoke: none; 0 skips them): what a worker sized
    /// for many short tasks does.
    #[arg(long)]
    tuned: Option<usize>,
    /// Instead of the rows above: seed this many task rows of chain5 runs that ended 40 days
    /// ago, then report the workers' chain5 throughput (at the first --workers count, default
    /// 4) before, during and after a prune of them (issue 21).
    #[arg(long, value_name = "TASKS")]
    prune_tasks: Option<usize>,
    /// With --prune-tasks: runs deleted per prune batch (transaction).
    #[arg(long, default_value_t = pgflow_client::PRUNE_BATCH)]
    prune_batch: u32,
    /// With --prune-tasks: milliseconds the prune sleeps between two batches.
    #[arg(long, default_value_t = 0)]
    prune_pause_ms: u64,
    /// After the rows, the cost curves (each point a fresh database): all, or any of map,
    /// start, backlog, flows, workers. `--curves` alone runs all of them.
    #[arg(long, value_delimiter = ',', num_args = 0..=1, default_missing_value = "all")]
    curves: Option<Vec<String>>,
    /// With --prune-tasks: seconds of the windows before and after the prune.
    #[arg(long, default_value_t = 20.0)]
    prune_window_secs: f64,
    /// After the rows, the fan-out flow with its map step rate limited to this many starts a
    /// second (issue 22), two worker instances: the measured starts a second against it.
    #[arg(long, value_name = "STARTS_PER_SEC")]
    limited_rate: Option<u32>,
}

/// Who executes the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Executor {
    Driver,
    Worker,
}

impl Executor {
    fn name(self) -> &'static str {
        match self {
            Self::Driver => "driver",
            Self::Worker => "worker",
        }
    }
}

/// One measured row.
#[derive(Debug)]
struct Row {
    workload: String,
    executor: Executor,
    engine: Engine,
    parallel: usize,
    /// Batch size and concurrency, when not the run's defaults (`--batch`, `--concurrency`).
    tuned: Option<Tuning>,
    idle: bool,
    stats: RunStats,
    wall_secs: f64,
    peak_rss_mib: Option<f64>,
    cpu: CpuSpent,
    calls: Option<driver::CallTimes>,
    profile: Vec<FunctionProfile>,
    /// Step tasks the database ran, warm-up included: what the profile covers (backends
    /// flush their function statistics when they get round to it, so they cannot be split).
    profile_tasks: usize,
}

impl Row {
    fn tasks_per_sec(&self) -> f64 {
        per_sec(self.stats.tasks, self.stats.span_secs)
    }

    fn runs_per_sec(&self) -> f64 {
        per_sec(self.stats.runs, self.stats.span_secs)
    }

    /// CPU microseconds per step task: (server, this process).
    fn cpu_per_task(&self) -> (Option<f64>, Option<f64>) {
        let tasks = self.stats.tasks.max(1) as f64;
        (
            self.cpu.server_secs.map(|s| s * 1e6 / tasks),
            self.cpu.own_secs.map(|s| s * 1e6 / tasks),
        )
    }

    fn label(&self) -> String {
        let unit = match self.executor {
            Executor::Driver => "client",
            Executor::Worker => "worker",
        };
        let tuned = self.tuned.map_or(String::new(), |t| {
            format!(", batch {} / concurrency {}", t.batch, t.concurrency)
        });
        let engine = if self.engine == Engine::Current {
            String::new()
        } else {
            format!(" on {}", self.engine)
        };
        format!(
            "{} {} {unit}{}{tuned}{engine}",
            self.executor.name(),
            self.parallel,
            if self.parallel == 1 { "" } else { "s" }
        )
    }
}

fn per_sec(count: usize, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// Messages per read and handlers at once, per executor instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tuning {
    batch: usize,
    concurrency: usize,
}

/// What every row needs.
#[derive(Debug)]
struct Env {
    admin: sqlx::PgPool,
    /// Where `CREATE DATABASE` runs: each row's database is made on this server.
    admin_url: String,
    /// `--batch` and `--concurrency`.
    tuning: Tuning,
    profile: bool,
    row_timeout: Duration,
    postmaster: Option<u32>,
    /// Where upstream's npm package is kept between runs.
    engine_cache: PathBuf,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let args = Args::parse();
    let command = std::env::args().collect::<Vec<_>>().join(" ");

    let workloads = select_workloads(&args.workload, args.smoke, args.runs)?;
    let workers = args
        .workers
        .clone()
        .unwrap_or_else(|| if args.smoke { vec![1, 2] } else { vec![1, 4] });
    let driver_clients = args
        .driver_clients
        .clone()
        .unwrap_or_else(|| workers.clone());
    let mut executors = Vec::new();
    for name in &args.executors {
        executors.push(match name.trim() {
            "driver" => Executor::Driver,
            "worker" => Executor::Worker,
            other => return Err(format!("unknown executor `{other}` (driver, worker)").into()),
        });
    }
    let engines = args
        .engines
        .iter()
        .map(|name| Engine::parse(name))
        .collect::<BoxResult<Vec<_>>>()?;
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    let idle_runs = args.idle_runs.unwrap_or(if args.smoke { 5 } else { 50 });
    let ceiling_secs = args
        .ceiling_secs
        .unwrap_or(if args.smoke { 0.5 } else { 3.0 });
    // Anchored at the package, not the working directory: the results sit beside the
    // benchmark's sources wherever cargo is run from.
    let json_path = args.json.clone().unwrap_or_else(|| {
        let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bench/results");
        results.join(if args.smoke {
            "smoke.json"
        } else {
            "latest.json"
        })
    });

    // DATABASE_URL, or a throwaway server of our own, stopped when `throwaway` drops. Durable
    // by default: the ceiling is commits, and a commit that need not reach the disk is not one
    // that a production server makes.
    let from_env = pgflow_client::throwaway::database_url_from_env();
    let (admin_url, throwaway) = match &from_env {
        Some(url) => (url.clone(), None),
        None => {
            let server = if args.no_fsync {
                ThrowawayServer::start()?
            } else {
                ThrowawayServer::start_durable()?
            };
            (server.url("postgres"), Some(server))
        }
    };
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&admin_url)
        .await?;
    let load_before = measure::load_average();
    let env = Env {
        admin,
        admin_url: admin_url.clone(),
        tuning: Tuning {
            batch: args.batch,
            concurrency: args.concurrency,
        },
        profile: args.profile,
        row_timeout: Duration::from_secs(args.row_timeout.unwrap_or(if args.smoke {
            120
        } else {
            900
        })),
        postmaster: throwaway.as_ref().and_then(measure::postmaster_pid),
        engine_cache: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-engines"),
    };
    let server = measure::server_settings(&env.admin).await?;
    let machine = measure::machine();
    println!(
        "pgflow benchmark{} — PostgreSQL {} ({}), {} CPUs ({}), fsync={}, synchronous_commit={}",
        if args.smoke { " (smoke)" } else { "" },
        server["server_version"].as_str().unwrap_or("?"),
        if from_env.is_some() {
            "DATABASE_URL"
        } else {
            "throwaway server"
        },
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        server["fsync"].as_str().unwrap_or("?"),
        server["synchronous_commit"].as_str().unwrap_or("?"),
    );
    println!(
        "load average before: {} (other processes on this machine compete for its CPUs)",
        load_before.map_or("?".to_owned(), |l| format!("{l:.2}"))
    );

    if let Some(tasks) = args.prune_tasks {
        let bench = prune::PruneBench {
            tasks,
            workers: args
                .workers
                .as_ref()
                .and_then(|w| w.first().copied())
                .unwrap_or(4),
            concurrency: args.concurrency,
            batch: args.batch,
            prune_batch: args.prune_batch,
            prune_pause: Duration::from_millis(args.prune_pause_ms),
            baseline_secs: args.prune_window_secs,
        };
        println!("command: {command}");
        return prune::run(&admin_url, &bench).await;
    }

    // The ceiling, on a database of its own on the same server.
    let mut ceilings = Vec::new();
    {
        let db = TestDatabase::new_in(&admin_url).await?;
        for variant in [
            CeilingVariant::Plain,
            CeilingVariant::SyncCommitOff,
            CeilingVariant::WithNotify,
        ] {
            let tps = measure::ceiling(db.url(), 4, ceiling_secs, variant).await?;
            println!("ceiling ({}, 4 clients): {tps:.0} tx/s", variant.label());
            ceilings.push((variant, tps));
        }
    }
    let ceiling = ceilings[0].1;

    let floors = floors::measure(&admin_url, args.smoke).await?;
    for floor in &floors {
        println!(
            "floor: {}: {:.3} {} (limit {} {}, {:.0}% of it)",
            floor.name,
            floor.measured,
            floor.unit,
            floor.limit,
            floor.unit,
            floor.ratio() * 100.0
        );
    }

    let mut rows = Vec::new();
    let has_chain = workloads.iter().any(|w| w.kind() == flows::Kind::Chain5);
    if has_chain && idle_runs > 0 {
        for &executor in &executors {
            let row = idle_row(&env, executor, idle_runs).await?;
            print_progress(&row);
            rows.push(row);
        }
    }
    for workload in &workloads {
        for &executor in &executors {
            let counts = match executor {
                // The driver baseline runs on chain5, where pgflow's original numbers are.
                Executor::Driver if !args.driver_all && workload.kind() != flows::Kind::Chain5 => {
                    continue;
                }
                Executor::Driver => &driver_clients,
                Executor::Worker => &workers,
            };
            // Engines alternate within each round, and every other round runs them in reverse
            // order, so that neither a drift of the machine over the rounds nor the cost of
            // going first (a cold cache, a server still flushing the previous row's writes)
            // falls on one engine more than another.
            let (rounds, row_engines) = match executor {
                Executor::Driver => (args.rounds, engines.as_slice()),
                Executor::Worker => (1, std::slice::from_ref(&Engine::Current)),
            };
            for &parallel in counts {
                for round in 0..rounds {
                    let mut order: Vec<&Engine> = row_engines.iter().collect();
                    if round % 2 == 1 {
                        order.reverse();
                    }
                    for engine in order {
                        let row =
                            load_row(&env, *workload, executor, parallel, None, engine).await?;
                        print_progress(&row);
                        rows.push(row);
                    }
                }
            }
        }
    }
    let tuned = args.tuned.unwrap_or(if args.smoke { 0 } else { 50 });
    let most_workers = workers.iter().copied().max();
    if let (true, Some(parallel)) = (tuned > 0, most_workers)
        && executors.contains(&Executor::Worker)
    {
        let tuning = Tuning {
            batch: tuned,
            concurrency: tuned,
        };
        for workload in &workloads {
            let row = load_row(
                &env,
                *workload,
                Executor::Worker,
                parallel,
                Some(tuning),
                &Engine::Current,
            )
            .await?;
            print_progress(&row);
            rows.push(row);
        }
    }

    let curves = match &args.curves {
        Some(which) => {
            let settings = curves::CurveSettings {
                which: which.clone(),
                ceiling,
                ceiling_secs,
            };
            curves::run(&env, &settings).await?
        }
        None => Vec::new(),
    };

    let limited = match args.limited_rate {
        Some(rate) => Some(limited::run(&env, rate).await?),
        None => None,
    };

    let load_after = measure::load_average();
    let table = render_table(&rows, ceiling, &ceilings);
    println!("\n{table}");
    println!("{}", render_floors(&floors));
    let comparisons = engine_comparisons(&rows);
    if !comparisons.is_empty() {
        println!("{}", render_comparisons(&comparisons));
    }
    let calls = render_calls(&rows);
    if !calls.is_empty() {
        println!("{calls}");
    }
    if env.profile {
        println!("{}", render_profiles(&rows));
    }
    for curve in &curves {
        println!("{}", curve.render());
    }
    if let Some(limited) = &limited {
        println!("{}", limited.render());
    }
    println!(
        "load average: before {}, after {}",
        load_before.map_or("?".to_owned(), |l| format!("{l:.2}")),
        load_after.map_or("?".to_owned(), |l| format!("{l:.2}"))
    );

    let results = json!({
        "format": 1,
        "command": command,
        "smoke": args.smoke,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        // The checkout's HEAD when the benchmark ran, which need not be what this binary was
        // built from; the engine it installs is named by the schema version and fingerprint.
        "git_commit": git_commit(),
        "engine": {
            "schema_version": pgflow_core::schema::SCHEMA_VERSION,
            "migrations_fingerprint": pgflow_core::schema::fingerprint(),
        },
        "machine": machine,
        "load_average": { "before": load_before, "after": load_after },
        "server": server,
        "settings": {
            "batch": env.tuning.batch,
            "worker_concurrency": env.tuning.concurrency,
            "driver_poll_interval_ms": driver::POLL_INTERVAL_MS,
            "start_chunk": START_CHUNK,
            "warm_up_runs": "20 per worker instance or driver client (chain5, diamond), 1 (fanout1000), left out of the figures",
            "profile": env.profile,
        },
        "ceiling": ceilings.iter().map(|(variant, tps)| json!({
            "variant": variant.key(),
            "description": variant.label(),
            "clients": 4,
            "seconds": ceiling_secs,
            "tx_per_sec": tps.round(),
        })).collect::<Vec<_>>(),
        "rows": rows.iter().map(|row| row_json(row, ceiling)).collect::<Vec<_>>(),
        "engine_comparisons": comparisons.iter().map(Comparison::to_json).collect::<Vec<_>>(),
        "floors": floors.iter().map(floors::Floor::to_json).collect::<Vec<_>>(),
        "curves": curves.iter().map(curves::Curve::to_json).collect::<Vec<_>>(),
        "limited": limited.as_ref().map(limited::Limited::to_json),
    });
    if let Some(dir) = json_path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("results written to {}", json_path.display());
    env.admin.close().await;
    Ok(())
}

fn select_workloads(
    names: &[String],
    smoke: bool,
    runs: Option<usize>,
) -> BoxResult<Vec<Workload>> {
    let (runs_default, fanout) = if smoke {
        (
            20,
            Workload {
                name: "fanout100",
                runs: 2,
                width: 100,
            },
        )
    } else {
        (
            500,
            Workload {
                name: "fanout1000",
                runs: 20,
                width: 1000,
            },
        )
    };
    let mapchain = Workload {
        name: if smoke { "mapchain100" } else { "mapchain1000" },
        runs: fanout.runs,
        width: fanout.width,
    };
    let runs = runs.unwrap_or(runs_default);
    let chain5 = Workload {
        name: "chain5",
        runs,
        width: 0,
    };
    let diamond = Workload {
        name: "diamond",
        runs,
        width: 0,
    };
    let mut selected = Vec::new();
    for name in names {
        match name.trim() {
            "all" => selected.extend([chain5, diamond, fanout, mapchain]),
            "chain5" => selected.push(chain5),
            "diamond" => selected.push(diamond),
            "fanout1000" | "fanout" => selected.push(fanout),
            "mapchain1000" | "mapchain" => selected.push(mapchain),
            "none" => {}
            other => {
                return Err(format!(
                    "unknown workload `{other}` (chain5, diamond, fanout1000, mapchain1000, all, none)"
                )
                .into());
            }
        }
    }
    selected.dedup_by_key(|w| w.name);
    Ok(selected)
}

/// Tasks executing, whichever executor runs them.
enum Running {
    Driver(driver::Driver),
    Worker(worker::Workers),
}

impl Running {
    async fn start(
        tuning: Tuning,
        url: &str,
        flow: &pgflow_core::Flow<u64>,
        executor: Executor,
        parallel: usize,
    ) -> BoxResult<Self> {
        Ok(match executor {
            Executor::Driver => Self::Driver(
                driver::Driver::start(url, flow, parallel, i32::try_from(tuning.batch)?).await?,
            ),
            Executor::Worker => Self::Worker(
                worker::Workers::start(url, flow, parallel, tuning.concurrency, tuning.batch)
                    .await?,
            ),
        })
    }

    /// Ends the warm-up: the driver's call times count from here.
    fn measure_from_now(&self) {
        if let Self::Driver(driver) = self {
            driver.record_from_now();
        }
    }

    async fn stop(self) -> BoxResult<Option<driver::CallTimes>> {
        match self {
            Self::Driver(driver) => Ok(Some(driver.stop().await?)),
            Self::Worker(workers) => {
                workers.stop().await?;
                Ok(None)
            }
        }
    }
}

/// A fresh database holding `engine` and `workload`'s flow, with per-function timing on if
/// asked.
async fn prepare(env: &Env, workload: &Workload, engine: &Engine) -> BoxResult<TestDatabase> {
    let db = engine
        .prepare(&env.admin_url, &env.engine_cache, &workload.flow())
        .await?;
    if env.profile {
        measure::enable_profile(&env.admin, db.name()).await?;
    }
    Ok(db)
}

/// Drains `workload.runs` runs started in a burst (chunks of [`START_CHUNK`] from one
/// connection, while the executor is already polling), after a warm-up
/// ([`Workload::warm_up_runs`]) that the figures leave out.
async fn load_row(
    env: &Env,
    workload: Workload,
    executor: Executor,
    parallel: usize,
    tuned: Option<Tuning>,
    engine: &Engine,
) -> BoxResult<Row> {
    let db = prepare(env, &workload, engine).await?;
    let flow = workload.flow();
    let rss_reset = measure::reset_peak_rss();
    let tuning = tuned.unwrap_or(env.tuning);
    let running = Running::start(tuning, db.url(), &flow, executor, parallel).await?;
    let mut starter = PgConnection::connect(db.url()).await?;

    // Left out of the figures, as a long-running worker's start-up would be.
    let warm_up = workload.warm_up_runs(parallel);
    start_burst(&mut starter, &workload, 0, warm_up).await?;
    measure::wait_for_runs(
        db.pool(),
        warm_up,
        Duration::from_millis(5),
        env.row_timeout,
    )
    .await
    .map_err(|error| format!("{} {} warm-up: {error}", workload.name, executor.name()))?;
    let since = measure::server_clock(&mut starter).await?;
    running.measure_from_now();

    let mark = CpuMark::now(env.postmaster);
    let began = Instant::now();
    start_burst(&mut starter, &workload, warm_up, workload.runs).await?;
    starter.close().await?;
    measure::wait_for_runs(
        db.pool(),
        warm_up + workload.runs,
        Duration::from_millis(10),
        env.row_timeout,
    )
    .await
    .map_err(|error| format!("{} {}: {error}", workload.name, executor.name()))?;
    let wall_secs = began.elapsed().as_secs_f64();
    let cpu = mark.spent();
    let peak_rss_mib = if rss_reset {
        measure::peak_rss_mib()
    } else {
        None
    };
    let calls = running.stop().await?;
    let stats = measure::run_stats(db.pool(), since).await?;
    let expected = workload.runs * workload.tasks_per_run();
    if stats.tasks != expected {
        return Err(format!(
            "{}: {} step tasks completed, expected {expected}",
            workload.name, stats.tasks
        )
        .into());
    }
    let profile = if env.profile {
        measure::function_profile(db.pool()).await?
    } else {
        Vec::new()
    };
    Ok(Row {
        workload: workload.name.to_owned(),
        executor,
        engine: engine.clone(),
        parallel,
        tuned,
        idle: false,
        stats,
        wall_secs,
        peak_rss_mib,
        cpu,
        calls,
        profile,
        profile_tasks: (warm_up + workload.runs) * workload.tasks_per_run(),
    })
}

/// Starts run number `i` of `workload` and waits for its `run:completed` event, then lets the
/// executor go back to idle.
async fn idle_run(
    starter: &mut PgConnection,
    listener: &mut PgListener,
    workload: &Workload,
    i: usize,
) -> BoxResult<()> {
    let run_id = start_runs(starter, workload, i, 1).await?;
    let run_id = run_id
        .first()
        .ok_or("start_flow returned no run")?
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let note = tokio::time::timeout(left, listener.recv())
            .await
            .map_err(|_| format!("idle run {run_id} did not complete within 30 s"))??;
        let event: Value = serde_json::from_str(note.payload()).unwrap_or(Value::Null);
        if event["run_id"] == run_id.as_str() {
            match event["event_type"].as_str() {
                Some("run:completed") => break,
                Some("run:failed") => return Err(format!("idle run {run_id} failed").into()),
                _ => {}
            }
        }
    }
    // Back to idle before the next run.
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(())
}

/// `runs` single runs of chain5, one at a time on an otherwise idle server: end-to-end and
/// dispatch latency without queueing.
async fn idle_row(env: &Env, executor: Executor, runs: usize) -> BoxResult<Row> {
    let workload = Workload {
        name: "chain5",
        runs,
        width: 0,
    };
    let db = prepare(env, &workload, &Engine::Current).await?;
    let flow = workload.flow();
    let rss_reset = measure::reset_peak_rss();
    let running = Running::start(env.tuning, db.url(), &flow, executor, 1).await?;
    let mut listener = PgListener::connect(db.url()).await?;
    listener.listen("pgflow").await?;
    let mut starter = PgConnection::connect(db.url()).await?;
    // Let the executor settle into its idle wait.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // One run first, left out of the figures: the first run on fresh connections pays once for
    // compiling the engine's functions and planning their statements (about 10 ms of one
    // dispatch), which would be the p99 of a hundred dispatches.
    idle_run(&mut starter, &mut listener, &workload, 0).await?;
    let since = measure::server_clock(&mut starter).await?;
    running.measure_from_now();

    let mark = CpuMark::now(env.postmaster);
    let began = Instant::now();
    for i in 1..=runs {
        idle_run(&mut starter, &mut listener, &workload, i).await?;
    }
    let wall_secs = began.elapsed().as_secs_f64();
    let cpu = mark.spent();
    let peak_rss_mib = if rss_reset {
        measure::peak_rss_mib()
    } else {
        None
    };
    starter.close().await?;
    drop(listener);
    let calls = running.stop().await?;
    let stats = measure::run_stats(db.pool(), since).await?;
    let profile = if env.profile {
        measure::function_profile(db.pool()).await?
    } else {
        Vec::new()
    };
    Ok(Row {
        workload: "chain5 idle".to_owned(),
        executor,
        engine: Engine::Current,
        parallel: 1,
        tuned: None,
        idle: true,
        stats,
        wall_secs,
        peak_rss_mib,
        cpu,
        calls,
        profile,
        profile_tasks: (runs + 1) * workload.tasks_per_run(),
    })
}

/// Starts runs `first .. first + n` of `workload` in chunks of [`START_CHUNK`], one statement
/// each.
async fn start_burst(
    conn: &mut PgConnection,
    workload: &Workload,
    first: usize,
    n: usize,
) -> BoxResult<()> {
    let mut started = 0;
    while started < n {
        let chunk = START_CHUNK.min(n - started);
        start_runs(conn, workload, first + started, chunk).await?;
        started += chunk;
    }
    Ok(())
}

/// Starts runs `first .. first + n` of `workload` in one statement; returns their ids.
async fn start_runs(
    conn: &mut PgConnection,
    workload: &Workload,
    first: usize,
    n: usize,
) -> BoxResult<Vec<uuid::Uuid>> {
    let first = i64::try_from(first)?;
    let last = first + i64::try_from(n)? - 1;
    let fixed = workload.fixed_input().map(i64::try_from).transpose()?;
    // The input must mention `g.i` even when it is fixed: a call whose arguments fold to
    // constants is not lateral any more, and would start one run for all of the series.
    let ids = sqlx::query_scalar(
        "SELECT r.run_id
           FROM generate_series($2::bigint, $3::bigint) AS g(i),
                LATERAL pgflow.start_flow($1, to_jsonb(coalesce($4::bigint, g.i) + 0 * g.i)) AS r",
    )
    .bind(workload.flow().slug())
    .bind(first)
    .bind(last)
    .bind(fixed)
    .fetch_all(conn)
    .await?;
    Ok(ids)
}

fn print_progress(row: &Row) {
    println!(
        "  {:<12} {:<17} {:>6} tasks in {:>6.2} s: {:>7.0} tasks/s, run p50 {:.1} ms, dispatch p50 {:.2} ms, pickup p50 {:.2} ms",
        row.workload,
        row.label(),
        row.stats.tasks,
        row.stats.span_secs,
        row.tasks_per_sec(),
        row.stats.run_latency_ms.p50,
        row.stats.dispatch_ms.p50,
        row.stats.pickup_ms.p50,
    );
}

fn render_table(rows: &[Row], ceiling: f64, ceilings: &[(CeilingVariant, f64)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| workload | executor | step-tasks/s | × ceiling | runs/s | run p50 / p95 / p99 (ms) | dispatch p50 / p99 (ms) | peak RSS (MiB) | CPU µs/task server / bench |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for (variant, tps) in ceilings {
        let _ = writeln!(
            out,
            "| ceiling: {} | 4 clients | {tps:.0} | {:.2} | | | | | |",
            variant.label(),
            tps / ceiling
        );
    }
    for row in rows {
        let run = row.stats.run_latency_ms;
        let dispatch = row.stats.dispatch_ms;
        let (cpu_server, cpu_own) = row.cpu_per_task();
        let (tasks, ratio, runs) = if row.idle {
            ("—".to_owned(), "—".to_owned(), "—".to_owned())
        } else {
            (
                format!("{:.0}", row.tasks_per_sec()),
                format!("{:.2}", row.tasks_per_sec() / ceiling),
                format!("{:.1}", row.runs_per_sec()),
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {tasks} | {ratio} | {runs} | {} / {} / {} | {} / {} | {} | {} / {} |",
            row.workload,
            row.label(),
            ms(run.p50),
            ms(run.p95),
            ms(run.p99),
            ms(dispatch.p50),
            ms(dispatch.p99),
            row.peak_rss_mib
                .map_or("?".to_owned(), |m| format!("{m:.0}")),
            cpu_server.map_or("?".to_owned(), |c| format!("{c:.0}")),
            cpu_own.map_or("?".to_owned(), |c| format!("{c:.0}")),
        );
    }
    out
}

/// The spec's speed floors, as a Markdown table.
fn render_floors(floors: &[floors::Floor]) -> String {
    let mut out = String::from(
        "| speed floor (SQL spec) | measured | limit | measured ÷ limit |\n|---|--:|--:|--:|\n",
    );
    for floor in floors {
        let _ = writeln!(
            out,
            "| {} | {:.3} {} | {} {} | {:.2} |",
            floor.name,
            floor.measured,
            floor.unit,
            floor.limit,
            floor.unit,
            floor.ratio()
        );
    }
    out
}

fn ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// The driver's client-side time per SQL call.
fn render_calls(rows: &[Row]) -> String {
    let mut out = String::new();
    for row in rows {
        let Some(calls) = &row.calls else { continue };
        if out.is_empty() {
            let _ = writeln!(
                out,
                "driver: client-side time per call (µs), p50 / p99 / mean, n\n"
            );
            let _ = writeln!(out, "| row | call | p50 | p99 | mean | n |");
            let _ = writeln!(out, "|---|---|--:|--:|--:|--:|");
        }
        for (call, p) in calls.summary() {
            let _ = writeln!(
                out,
                "| {} {} | {call} | {:.0} | {:.0} | {:.0} | {} |",
                row.workload,
                row.label(),
                p.p50,
                p.p99,
                p.mean,
                p.n
            );
        }
    }
    out
}

fn render_profiles(rows: &[Row]) -> String {
    let mut out = String::from("per-function time (track_functions = pl), top 8 by self time\n");
    for row in rows {
        let tasks = row.profile_tasks.max(1) as f64;
        let _ = writeln!(
            out,
            "\n{} {} ({} tasks, warm-up included)\n| function | calls | total ms | self ms | self µs/task |\n|---|--:|--:|--:|--:|",
            row.workload,
            row.label(),
            row.profile_tasks
        );
        for f in row.profile.iter().take(8) {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {:.1} |",
                f.name,
                f.calls,
                f.total_ms,
                f.self_ms,
                f.self_ms * 1000.0 / tasks
            );
        }
    }
    out
}

fn row_json(row: &Row, ceiling: f64) -> Value {
    let percentiles = |p: Percentiles| p.to_json();
    json!({
        "workload": row.workload,
        "executor": row.executor.name(),
        "engine": row.engine.to_string(),
        "parallel": row.parallel,
        // Null when the row ran with the run's `settings`.
        "tuned": row.tuned.map(|t| json!({ "batch": t.batch, "concurrency": t.concurrency })),
        "idle": row.idle,
        "runs": row.stats.runs,
        "step_tasks": row.stats.tasks,
        "span_secs": round3(row.stats.span_secs),
        "wall_secs": round3(row.wall_secs),
        "step_tasks_per_sec": row.tasks_per_sec().round(),
        "runs_per_sec": round3(row.runs_per_sec()),
        "ratio_to_ceiling": round3(row.tasks_per_sec() / ceiling),
        "run_latency_ms": percentiles(row.stats.run_latency_ms),
        "dispatch_latency_ms": percentiles(row.stats.dispatch_ms),
        "pickup_latency_ms": percentiles(row.stats.pickup_ms),
        "peak_rss_mib": row.peak_rss_mib.map(round3),
        "cpu_secs": { "server": row.cpu.server_secs.map(round3), "bench_process": row.cpu.own_secs.map(round3) },
        "cpu_us_per_task": {
            "server": row.cpu_per_task().0.map(f64::round),
            "bench_process": row.cpu_per_task().1.map(f64::round),
        },
        "driver_call_us": row.calls.as_ref().map(|calls| {
            calls.summary().into_iter().map(|(call, p)| (call.to_owned(), p.to_json()))
                .collect::<serde_json::Map<_, _>>()
        }),
        "profile_tasks": row.profile_tasks,
        "profile": row.profile.iter().map(|f| json!({
            "function": f.name,
            "calls": f.calls,
            "total_ms": round3(f.total_ms),
            "self_ms": round3(f.self_ms),
        })).collect::<Vec<_>>(),
    })
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The driver's throughput on each engine other than the current one, against the current
/// one's, for one workload and number of clients: medians over the rounds.
#[derive(Debug)]
struct Comparison {
    workload: String,
    clients: usize,
    engine: Engine,
    rounds: usize,
    median: f64,
    current_median: f64,
}

impl Comparison {
    fn ratio(&self) -> f64 {
        if self.median > 0.0 {
            self.current_median / self.median
        } else {
            0.0
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "workload": self.workload,
            "clients": self.clients,
            "engine": self.engine.to_string(),
            "rounds": self.rounds,
            "median_step_tasks_per_sec": self.median.round(),
            "current_median_step_tasks_per_sec": self.current_median.round(),
            "current_over_engine": round3(self.ratio()),
        })
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn engine_comparisons(rows: &[Row]) -> Vec<Comparison> {
    let driver = |row: &&Row| row.executor == Executor::Driver && !row.idle;
    let mut out = Vec::new();
    for row in rows.iter().filter(driver) {
        if row.engine == Engine::Current
            || out.iter().any(|c: &Comparison| {
                c.workload == row.workload && c.clients == row.parallel && c.engine == row.engine
            })
        {
            continue;
        }
        let of = |engine: &Engine| -> Vec<f64> {
            rows.iter()
                .filter(driver)
                .filter(|r| {
                    r.workload == row.workload && r.parallel == row.parallel && &r.engine == engine
                })
                .map(Row::tasks_per_sec)
                .collect()
        };
        let theirs = of(&row.engine);
        let ours = of(&Engine::Current);
        if ours.is_empty() {
            continue;
        }
        out.push(Comparison {
            workload: row.workload.clone(),
            clients: row.parallel,
            engine: row.engine.clone(),
            rounds: theirs.len().min(ours.len()),
            median: median(theirs),
            current_median: median(ours),
        });
    }
    out
}

fn render_comparisons(comparisons: &[Comparison]) -> String {
    let mut out = String::from(
        "| workload | driver clients | engine | rounds | its step-tasks/s (median) | current (median) | current ÷ it |\n|---|--:|---|--:|--:|--:|--:|\n",
    );
    for c in comparisons {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2} |",
            c.workload,
            c.clients,
            c.engine,
            c.rounds,
            c.median,
            c.current_median,
            c.ratio()
        );
    }
    out
}
