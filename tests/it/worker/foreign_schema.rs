//! A worker pointed at a database that holds pgflow 0.8.1's SQL as pgflow's TypeScript
//! migrations install it, without this engine's additions: it refuses to start and says what to
//! install, instead of retrying a function that is not there for ever. And the way out that the
//! error describes works.
//!
//! The schema comes from upstream's own migrations, `dist/supabase/migrations/*.sql` of the npm
//! package `@pgflow/core@0.8.1`, fetched with `npm pack` at test time (they are not ours to
//! commit) and kept under the target directory so that later runs do not fetch them again.

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use pgflow_client::throwaway::{TestDatabase, UPSTREAM_PACKAGE, UpstreamSchema};
use pgflow_client::{Error, Worker, WorkerHandle, install};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::support::{database, finished, start};

/// A database holding pgmq and pgflow 0.8.1's schema, applied from upstream's migrations the
/// way `supabase db push` would apply them, with nothing of this engine.
async fn typescript_database() -> TestDatabase {
    // Tests of this binary run in parallel; one fetch is enough for all of them.
    static FETCH: Mutex<()> = Mutex::new(());
    let upstream = tokio::task::block_in_place(|| {
        let _one_at_a_time = FETCH.lock().unwrap_or_else(PoisonError::into_inner);
        UpstreamSchema::fetch(Path::new(env!("CARGO_TARGET_TMPDIR")))
    })
    .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        upstream.migrations().len() >= 10,
        "{UPSTREAM_PACKAGE} should ship its migrations, found {:?}",
        upstream
            .migrations()
            .iter()
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
    );
    let db = TestDatabase::empty().await.expect("empty database");
    upstream
        .apply(db.pool())
        .await
        .unwrap_or_else(|err| panic!("upstream's migrations: {err}"));
    db
}

/// Compiles a one-step flow with upstream's own functions, as `npx pgflow compile` output does.
async fn compile_greet(pool: &PgPool) {
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('greet', max_attempts => 2, base_delay => 0);\n\
         SELECT pgflow.add_step('greet', 'hello');\n",
    )
    .execute(pool)
    .await
    .expect("flow");
}

fn greeter(pool: &PgPool) -> pgflow_client::WorkerBuilder {
    Worker::builder(pool.clone()).handler("greet", "hello", |input: Value, _ctx| async move {
        Ok(json!(format!(
            "hello, {}",
            input["run"]["name"].as_str().unwrap_or("?")
        )))
    })
}

/// The error a worker stops with at start-up; it must come quickly, not after retries.
async fn refusal(worker: WorkerHandle) -> Error {
    tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("the worker must stop at start-up, not retry for ever")
        .expect_err("the worker must refuse this database")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_pgflow_0_8_1_sql_refuses_to_start_and_says_what_to_install() {
    let db = typescript_database().await;
    let pool = db.pool();
    compile_greet(pool).await;
    let run = start(pool, "greet", json!({"name": "ana"})).await;

    let err = refusal(greeter(pool).spawn().expect("spawn")).await;
    assert!(
        matches!(
            err,
            Error::IncompatibleSchema {
                schema_exists: true,
                recorded: None,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    for needed in [
        "pgflow._read_and_start",
        "pgflow install",
        "Client::install",
        "DROP SCHEMA pgflow CASCADE",
        "pgmq.purge_queue",
    ] {
        assert!(message.contains(needed), "{needed:?} not in: {message}");
    }

    // It stopped before touching anything: no worker row, the run waits for another worker.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.workers")
        .fetch_one(pool)
        .await
        .expect("workers");
    assert_eq!(rows, 0);
    let status: String =
        sqlx::query_scalar("SELECT status FROM pgflow.step_tasks WHERE run_id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .expect("task");
    assert_eq!(status, "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_refuses_pgflow_0_8_1_sql_and_the_way_out_the_worker_names_works() {
    let db = typescript_database().await;
    let pool = db.pool();
    compile_greet(pool).await;
    let dropped = start(pool, "greet", json!({"name": "old"})).await;

    let err = install(pool)
        .await
        .expect_err("install must not adopt a foreign schema");
    assert!(matches!(err, Error::ForeignSchema), "{err}");
    let ours: bool = sqlx::query_scalar("SELECT to_regproc('pgflow._read_and_start') IS NOT NULL")
        .fetch_one(pool)
        .await
        .expect("lookup");
    assert!(!ours, "install must leave the foreign schema as it was");

    // What the worker's error says to do: drop the schema, empty the queues, install, compile
    // the flows again.
    sqlx::raw_sql("DROP SCHEMA pgflow CASCADE; SELECT pgmq.purge_queue('greet');")
        .execute(pool)
        .await
        .expect("drop");
    install(pool).await.expect("install after the drop");
    compile_greet(pool).await;
    let run = start(pool, "greet", json!({"name": "ana"})).await;
    let worker = greeter(pool).spawn().expect("spawn");
    let (status, output) = finished(pool, run, Duration::from_secs(30)).await;
    assert_eq!(status, "completed");
    assert_eq!(output, Some(json!({"hello": "hello, ana"})));
    worker.shutdown().await.expect("shutdown");
    // The purge took the message of the dropped run, which nothing would ever archive.
    let left: Vec<Value> = sqlx::query_scalar("SELECT message FROM pgmq.q_greet")
        .fetch_all(pool)
        .await
        .expect("queue");
    assert_eq!(
        left,
        Vec::<Value>::new(),
        "the dropped run {dropped} left messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_a_database_without_the_engine_says_to_install_it() {
    let db = TestDatabase::empty().await.expect("empty database");
    let err = refusal(greeter(db.pool()).spawn().expect("spawn")).await;
    assert!(
        matches!(
            err,
            Error::IncompatibleSchema {
                schema_exists: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("pgflow install"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_a_newer_schema_than_it_knows_refuses_to_start() {
    let db = database().await;
    let pool = db.pool();
    sqlx::query(
        "INSERT INTO pgflow_meta.schema_migrations (version, name, checksum) \
         VALUES (9999, 'future', 'x')",
    )
    .execute(pool)
    .await
    .expect("a future version");
    let err = refusal(greeter(pool).spawn().expect("spawn")).await;
    assert!(
        matches!(err, Error::SchemaTooNew { found: 9999, .. }),
        "{err:?}"
    );
}

/// The check reads only the catalogs: a worker's role needs no access to `pgflow_meta`, which
/// the documented roles (docs/security.md) do not get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_role_may_not_read_pgflow_meta_still_starts() {
    let db = database().await;
    let pool = db.pool();
    compile_greet(pool).await;
    // Roles are cluster-wide: named after this database so parallel tests do not collide.
    let role = format!(
        "meta_blind_{}",
        db.name().trim_start_matches("pgflow_test_")
    );
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} NOLOGIN;
         GRANT USAGE ON SCHEMA pgflow, pgmq TO {role};
         GRANT ALL ON ALL TABLES IN SCHEMA pgflow, pgmq TO {role};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA pgmq TO {role};
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgflow, pgmq TO {role};"
    ))
    .execute(pool)
    .await
    .expect("role");
    let options: PgConnectOptions = db.url().parse().expect("url");
    let as_role = PgPoolOptions::new()
        .max_connections(5)
        .connect_with(options.options([("role", role.as_str())]))
        .await
        .expect("pool");
    let denied = sqlx::query("SELECT count(*) FROM pgflow_meta.schema_migrations")
        .execute(&as_role)
        .await
        .expect_err("the role may not read pgflow_meta");
    assert!(denied.to_string().contains("permission denied"), "{denied}");

    let run = start(pool, "greet", json!({"name": "bo"})).await;
    let worker = greeter(&as_role).spawn().expect("spawn");
    let (status, output) = finished(pool, run, Duration::from_secs(30)).await;
    assert_eq!(status, "completed");
    assert_eq!(output, Some(json!({"hello": "hello, bo"})));
    worker.shutdown().await.expect("shutdown");
    as_role.close().await;
    sqlx::raw_sql(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .execute(pool)
        .await
        .expect("drop role");
}
