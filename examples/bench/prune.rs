//! `--prune-tasks N`: what a prune costs the workers (issue 21). Seeds N task rows of chain5
//! runs that completed 40 days ago (with their step states and archived messages, set-based),
//! then keeps 4 workers (`--workers`) busy on chain5 and measures their throughput in three
//! windows: before the prune, while `pgflow_client::prune` deletes the seeded runs in batches,
//! and after it.

use std::time::{Duration, Instant};

use pgflow_client::Client;
use pgflow_client::throwaway::TestDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::flows::chain5;
use crate::measure::{BoxResult, server_clock};
use crate::worker::Workers;

/// Runs seeded per statement.
const SEED_CHUNK: usize = 10_000;
/// Started runs the feeder keeps waiting, so that the workers never run dry.
const BACKLOG: i64 = 400;

/// The settings of the prune scenario.
pub(crate) struct PruneBench {
    pub(crate) tasks: usize,
    pub(crate) workers: usize,
    pub(crate) concurrency: usize,
    pub(crate) batch: usize,
    pub(crate) prune_batch: u32,
    pub(crate) prune_pause: Duration,
    pub(crate) baseline_secs: f64,
}

/// Runs the scenario on a fresh database of the server at `admin_url`; prints the figures.
pub(crate) async fn run(admin_url: &str, bench: &PruneBench) -> BoxResult<()> {
    let db = TestDatabase::new_in(admin_url).await?;
    let flow = chain5();
    Client::new(db.pool().clone()).compile(&flow).await?;

    let began = Instant::now();
    let runs = bench.tasks.div_ceil(5);
    seed(db.url(), runs).await?;
    let mut conn = PgConnection::connect(db.url()).await?;
    sqlx::raw_sql(
        "VACUUM ANALYZE pgflow.runs, pgflow.step_states, pgflow.step_tasks, pgmq.a_bench_chain5",
    )
    .execute(&mut conn)
    .await?;
    println!(
        "seeded {} old completed chain5 runs ({} task rows, as many archived messages) in {:.1} s",
        runs,
        runs * 5,
        began.elapsed().as_secs_f64()
    );

    let workers = Workers::start(
        db.url(),
        &flow,
        bench.workers,
        bench.concurrency,
        bench.batch,
    )
    .await?;
    let stop_feeding = CancellationToken::new();
    let feeder = tokio::spawn(feed(db.url().to_owned(), stop_feeding.clone()));
    // A warm-up the figures leave out.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let t0 = server_clock(&mut conn).await?;
    tokio::time::sleep(Duration::from_secs_f64(bench.baseline_secs)).await;
    let t1 = server_clock(&mut conn).await?;
    let prune_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(db.url())
        .await?;
    let pruning = Instant::now();
    let report = pgflow_client::prune(
        &prune_pool,
        Duration::from_secs(30 * 86_400),
        bench.prune_batch,
        bench.prune_pause,
    )
    .await?;
    let prune_secs = pruning.elapsed().as_secs_f64();
    let t2 = server_clock(&mut conn).await?;
    tokio::time::sleep(Duration::from_secs_f64(bench.baseline_secs)).await;
    let t3 = server_clock(&mut conn).await?;

    // The runs still started finish before the workers stop: then nothing may be left over.
    stop_feeding.cancel();
    feeder.await??;
    let draining = Instant::now();
    loop {
        let started: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE status = 'started'")
                .fetch_one(&mut conn)
                .await?;
        if started == 0 {
            break;
        }
        if draining.elapsed() > Duration::from_secs(300) {
            return Err(format!("{started} runs still started after the feeding stopped").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    workers.stop().await?;
    prune_pool.close().await;

    let window = |from: f64, to: f64| {
        let pool = db.pool().clone();
        async move {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pgflow.step_tasks
                  WHERE completed_at >= to_timestamp($1) AND completed_at < to_timestamp($2)",
            )
            .bind(from)
            .bind(to)
            .fetch_one(&pool)
            .await?;
            #[allow(clippy::cast_precision_loss, reason = "task counts are far below 2^52")]
            let rate = done as f64 / (to - from);
            Ok::<f64, Box<dyn std::error::Error + Send + Sync>>(rate)
        }
    };
    let before = window(t0, t1).await?;
    let during = window(t1, t2).await?;
    let after = window(t2, t3).await?;
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.runs WHERE completed_at < now() - interval '30 days'",
    )
    .fetch_one(db.pool())
    .await?;
    if left != 0 || report.runs != u64::try_from(runs)? {
        return Err(format!("pruned {} runs of {runs}; {left} left", report.runs).into());
    }
    let findings = pgflow_client::check(db.pool()).await?;
    if let Some(finding) = findings.first() {
        return Err(format!(
            "pgflow check after the prune: {} findings, the first: {finding}",
            findings.len()
        )
        .into());
    }
    #[allow(clippy::cast_precision_loss, reason = "row counts are far below 2^52")]
    let deleted_per_sec = report.tasks as f64 / prune_secs;
    println!(
        "prune: {} runs, {} task rows, {} messages in {} batches of {} runs, {} ms apart: \
         {prune_secs:.1} s ({deleted_per_sec:.0} task rows/s)",
        report.runs,
        report.tasks,
        report.messages,
        report.batches,
        bench.prune_batch,
        bench.prune_pause.as_millis()
    );
    println!(
        "chain5 with {} workers (concurrency {}, batch {}), completed tasks/s:",
        bench.workers, bench.concurrency, bench.batch
    );
    println!("  before the prune ({:.0} s): {before:.0}", t1 - t0);
    println!(
        "  during the prune ({:.0} s): {during:.0} ({:+.0}% against before)",
        t2 - t1,
        (during / before - 1.0) * 100.0
    );
    println!("  after the prune  ({:.0} s): {after:.0}", t3 - t2);
    println!("pgflow check: clean");
    Ok(())
}

/// Inserts `runs` chain5 runs that completed 40 days ago, each with its five completed step
/// states and tasks and their archived messages, `SEED_CHUNK` runs per statement.
async fn seed(url: &str, runs: usize) -> BoxResult<()> {
    let mut conn = PgConnection::connect(url).await?;
    let mut done = 0;
    while done < runs {
        let n = SEED_CHUNK.min(runs - done);
        sqlx::query(
            "WITH r AS (
               INSERT INTO pgflow.runs
                 (flow_slug, status, input, output, remaining_steps, started_at, completed_at)
               SELECT 'bench_chain5', 'completed', to_jsonb(g.i), '{}', 0,
                      now() - interval '40 days' - make_interval(secs => g.i / 1000.0),
                      now() - interval '40 days' - make_interval(secs => g.i / 1000.0)
                        + interval '50 ms'
                 FROM generate_series($1::bigint, $2::bigint) AS g(i)
               RETURNING run_id, started_at
             ), s AS (
               INSERT INTO pgflow.step_states
                 (flow_slug, run_id, step_slug, status, remaining_tasks, initial_tasks,
                  remaining_deps, created_at, started_at, completed_at)
               SELECT 'bench_chain5', r.run_id, st.step_slug, 'completed', 0, 1, 0,
                      r.started_at, r.started_at, r.started_at + interval '10 ms'
                 FROM r CROSS JOIN pgflow.steps st
                WHERE st.flow_slug = 'bench_chain5'
               RETURNING run_id, step_slug, started_at
             ), t AS (
               INSERT INTO pgflow.step_tasks
                 (flow_slug, run_id, step_slug, message_id, task_index, status, attempts_count,
                  output, queued_at, started_at, completed_at)
               SELECT 'bench_chain5', s.run_id, s.step_slug,
                      nextval(pg_get_serial_sequence('pgmq.q_bench_chain5', 'msg_id')),
                      0, 'completed', 1, '1', s.started_at, s.started_at,
                      s.started_at + interval '10 ms'
                 FROM s
               RETURNING run_id, step_slug, message_id, queued_at
             )
             INSERT INTO pgmq.a_bench_chain5 (msg_id, vt, read_ct, enqueued_at, archived_at, message)
             SELECT t.message_id, t.queued_at, 1, t.queued_at, t.queued_at + interval '10 ms',
                    jsonb_build_object('flow_slug', 'bench_chain5', 'run_id', t.run_id,
                                       'step_slug', t.step_slug, 'task_index', 0)
               FROM t",
        )
        .bind(i64::try_from(done)?)
        .bind(i64::try_from(done + n)? - 1)
        .execute(&mut conn)
        .await?;
        done += n;
    }
    conn.close().await?;
    Ok(())
}

/// Keeps [`BACKLOG`] chain5 runs started until `stop` fires.
async fn feed(url: String, stop: CancellationToken) -> BoxResult<()> {
    let mut conn = PgConnection::connect(&url).await?;
    let mut next: i64 = 0;
    while !stop.is_cancelled() {
        let started: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE status = 'started'")
                .fetch_one(&mut conn)
                .await?;
        if started < BACKLOG {
            let n = BACKLOG - started;
            sqlx::query(
                "SELECT pgflow.start_flow('bench_chain5', to_jsonb(g.i))
                   FROM generate_series($1::bigint, $2::bigint) AS g(i)",
            )
            .bind(next)
            .bind(next + n - 1)
            .execute(&mut conn)
            .await?;
            next += n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    conn.close().await?;
    Ok(())
}
