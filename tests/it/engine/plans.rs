//! The plans a worker's session caches stay keyed lookups as the tables grow.
//!
//! The engine's functions run with generic plans, cached by each session the first time it
//! calls them, often on a nearly empty database. A statement that leaves the planner a choice
//! of ways into `step_tasks` can then walk an index by a non-leading column, or fetch a run's
//! every task to keep one, on every call for as long as the session lives (migration 0018).
//! These tests count the index entries the server reads during one call, which does not
//! depend on the machine's speed, against what a keyed lookup reads.

use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use super::{Engine, WORKER};

/// Index entries read in `step_tasks`' indexes so far, as the statistics system has them.
/// `conn` flushes its own counters first (`pg_stat_force_next_flush` takes effect as it goes
/// idle, before this query's answer).
async fn step_tasks_index_reads(conn: &mut PgConnection) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query_scalar(
        "SELECT coalesce(sum(idx_tup_read), 0)::bigint FROM pg_stat_user_indexes \
          WHERE schemaname = 'pgflow' AND relname = 'step_tasks'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

/// Reads up to `qty` messages of `flow` and starts their tasks on `conn`.
async fn read_and_start(conn: &mut PgConnection, flow: &str, qty: i32) -> Vec<(Uuid, String, i32)> {
    let msg_ids: Vec<i64> = sqlx::query_scalar("SELECT msg_id FROM pgmq.read($1, 30, $2)")
        .bind(flow)
        .bind(qty)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    sqlx::query_as("SELECT run_id, step_slug, task_index FROM pgflow.start_tasks($1, $2, $3)")
        .bind(flow)
        .bind(&msg_ids)
        .bind(WORKER)
        .fetch_all(&mut *conn)
        .await
        .unwrap()
}

async fn complete(conn: &mut PgConnection, (run_id, step, index): &(Uuid, String, i32)) {
    sqlx::query("SELECT pgflow.complete_task($1, $2, $3, '1'::jsonb)")
        .bind(run_id)
        .bind(step)
        .bind(index)
        .execute(&mut *conn)
        .await
        .unwrap();
}

async fn fail(conn: &mut PgConnection, (run_id, step, index): &(Uuid, String, i32)) {
    sqlx::query("SELECT pgflow.fail_task($1, $2, $3, 'boom')")
        .bind(run_id)
        .bind(step)
        .bind(index)
        .execute(&mut *conn)
        .await
        .unwrap();
}

async fn start_runs(pool: &PgPool, flow: &str, input: &str, runs: i32) {
    // The input names g.i so that start_flow runs once per row, not once for the query.
    sqlx::query(
        "SELECT count(*) FROM generate_series(1, $3) AS g(i), \
                LATERAL pgflow.start_flow($1, CASE WHEN g.i > 0 THEN $2::jsonb END) AS r",
    )
    .bind(flow)
    .bind(input)
    .bind(runs)
    .execute(pool)
    .await
    .unwrap();
}

/// A session that started tasks while the flow had one run starts ten more after 3,000 runs
/// of a three-step chain were queued: it reads a few index entries per task, not the flow's
/// thousands of tasks once per step (which the plan cached before migration 0018 did).
#[tokio::test]
async fn starting_tasks_reads_a_few_index_entries_per_task_whatever_the_table_holds() {
    let engine = Engine::new().await;
    engine
        .flow(
            "grown",
            &[
                ("a", &[], "single"),
                ("b", &["a"], "single"),
                ("c", &["b"], "single"),
            ],
        )
        .await;
    let mut session = PgConnection::connect(engine.url()).await.unwrap();
    start_runs(engine.pool(), "grown", "1", 1).await;
    // Caches the session's plans while the tables hold one run.
    assert_eq!(read_and_start(&mut session, "grown", 10).await.len(), 1);

    start_runs(engine.pool(), "grown", "1", 3000).await;
    let before = step_tasks_index_reads(&mut session).await;
    assert_eq!(read_and_start(&mut session, "grown", 10).await.len(), 10);
    let read = step_tasks_index_reads(&mut session).await - before;
    // Four entries per task when written (its message id and its key in each keyed query
    // and update): 40 for ten tasks. The plan of 0010 read 6,012: 3,000 per step walked.
    assert!(
        read <= 200,
        "starting 10 tasks read {read} index entries of step_tasks"
    );
    session.close().await.unwrap();
}

/// The same for a map over a run input of 3,000 elements: one run's tasks are many, and a
/// lookup by run_id alone, filtering the rest, reads all of them for each task started.
#[tokio::test]
async fn starting_map_tasks_does_not_read_the_whole_run_for_each_task() {
    let engine = Engine::new().await;
    engine.flow("wide", &[("each", &[], "map")]).await;
    let mut session = PgConnection::connect(engine.url()).await.unwrap();
    start_runs(engine.pool(), "wide", "[1]", 1).await;
    assert_eq!(read_and_start(&mut session, "wide", 10).await.len(), 1);

    let elements = serde_json::Value::from((0..3000).collect::<Vec<i32>>()).to_string();
    start_runs(engine.pool(), "wide", &elements, 1).await;
    let before = step_tasks_index_reads(&mut session).await;
    assert_eq!(read_and_start(&mut session, "wide", 10).await.len(), 10);
    let read = step_tasks_index_reads(&mut session).await - before;
    assert!(
        read <= 200,
        "starting 10 map tasks read {read} index entries of step_tasks"
    );
    session.close().await.unwrap();
}

/// Completing and failing tasks, the other two calls of a worker, from a session that cached
/// their plans while the flow had one run: a few index entries per task after 3,000 more.
#[tokio::test]
async fn completing_and_failing_tasks_read_a_few_index_entries_per_task() {
    let engine = Engine::new().await;
    engine
        .flow("both", &[("a", &[], "single"), ("b", &["a"], "single")])
        .await;
    let mut session = PgConnection::connect(engine.url()).await.unwrap();
    start_runs(engine.pool(), "both", "1", 1).await;
    let first = read_and_start(&mut session, "both", 10).await;
    complete(&mut session, &first[0]).await;
    let second = read_and_start(&mut session, "both", 10).await;
    fail(&mut session, &second[0]).await;

    start_runs(engine.pool(), "both", "1", 3000).await;
    let tasks = read_and_start(&mut session, "both", 10).await;
    assert_eq!(tasks.len(), 10);
    let before = step_tasks_index_reads(&mut session).await;
    for task in &tasks[..9] {
        complete(&mut session, task).await;
    }
    fail(&mut session, &tasks[9]).await;
    let read = step_tasks_index_reads(&mut session).await - before;
    // 21 when written: completing and failing already join full keys (0010).
    assert!(
        read <= 200,
        "completing 9 tasks and failing 1 read {read} index entries of step_tasks"
    );
    session.close().await.unwrap();
}

/// The helpers every worker call goes through are PL/pgSQL, which keeps their plans for the
/// session. A SQL function with a `SET` clause is never inlined and parses and plans its query
/// on every call (before PostgreSQL 18): `_caller` and `_caller_is_owner` cost about 150 µs a
/// call that way, under every checked entry point (migration 0019).
#[tokio::test]
async fn the_helpers_of_every_worker_call_keep_their_plans() {
    let engine = Engine::new().await;
    let hot = [
        "_caller",
        "_caller_is_owner",
        "_authorize_flows",
        "_authorize_worker",
        "_authorize_tasks",
        "_has_realtime",
        "_queue_function",
        "_emit_all",
        "_archive_batch",
        "_archive_messages",
    ];
    let languages: Vec<(String, String)> = sqlx::query_as(
        "SELECT p.proname::text, l.lanname::text
           FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
          WHERE p.pronamespace = 'pgflow'::regnamespace AND p.proname = ANY($1)
          ORDER BY 1",
    )
    .bind(&hot[..])
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(languages.len(), hot.len(), "{languages:?}");
    for (name, language) in languages {
        assert_eq!(
            language, "plpgsql",
            "pgflow.{name} plans its query on every call"
        );
    }
}
