//! Untyped handlers for a flow compiled elsewhere, with the pool and state from the context.

use std::time::Duration;

use pgflow_client::{StepContextExt, Worker};
use serde_json::{Value, json};

use crate::support::{database, finished, start};

struct Greeting(&'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untyped_handlers_run_a_flow_compiled_in_sql() {
    let db = database().await;
    let pool = db.pool();
    // As the TypeScript DSL would compile it.
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('greet', max_attempts => 2);\n\
         SELECT pgflow.add_step('greet', 'names');\n\
         SELECT pgflow.add_step('greet', 'hello', ARRAY['names'], step_type => 'map');\n\
         SELECT pgflow.add_step('greet', 'count', ARRAY['hello']);\n",
    )
    .execute(pool)
    .await
    .expect("flow");

    let worker = Worker::builder(pool.clone())
        .state(Greeting("hello"))
        .handler("greet", "names", |input: Value, _ctx| async move {
            Ok(input["run"]["names"].clone())
        })
        .handler("greet", "hello", |name: Value, ctx| async move {
            let greeting = ctx.state::<Greeting>().expect("state").0;
            let name = name.as_str().unwrap_or("nobody");
            Ok(json!(format!("{greeting}, {name}")))
        })
        .handler("greet", "count", |input: Value, ctx| async move {
            // The handler's own query, through the worker's pool.
            let in_db: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'hello'",
            )
            .bind(ctx.run_id())
            .fetch_one(ctx.pool())
            .await?;
            let greetings = input["hello"].as_array().map_or(0, Vec::len);
            Ok(json!({ "greetings": greetings, "tasks": in_db }))
        })
        .spawn()
        .expect("worker");

    let run = start(pool, "greet", json!({"names": ["ana", "bo"]})).await;
    let (status, output) = finished(pool, run, Duration::from_secs(30)).await;
    assert_eq!(status, "completed");
    assert_eq!(output, Some(json!({"count": {"greetings": 2, "tasks": 2}})));
    let hello: Value = sqlx::query_scalar(
        "SELECT jsonb_agg(output ORDER BY task_index) FROM pgflow.step_tasks \
          WHERE run_id = $1 AND step_slug = 'hello'",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .expect("outputs");
    assert_eq!(hello, json!(["hello, ana", "hello, bo"]));
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_without_a_handler_fails_with_a_message_saying_so() {
    let db = database().await;
    let pool = db.pool();
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('partial', max_attempts => 1);\n\
         SELECT pgflow.add_step('partial', 'known');\n\
         SELECT pgflow.add_step('partial', 'unknown', ARRAY['known']);\n",
    )
    .execute(pool)
    .await
    .expect("flow");
    let worker = Worker::builder(pool.clone())
        .handler("partial", "known", |_input: Value, _ctx| async move {
            Ok(json!(1))
        })
        .spawn()
        .expect("worker");
    let run = start(pool, "partial", json!({})).await;
    assert_eq!(
        finished(pool, run, Duration::from_secs(30)).await.0,
        "failed"
    );
    let error: String = sqlx::query_scalar(
        "SELECT error_message FROM pgflow.step_states WHERE run_id = $1 AND step_slug = 'unknown'",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .expect("error");
    assert_eq!(
        error,
        "no handler for step `unknown` of flow `partial` is registered in this worker"
    );
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn bad_settings_and_slugs_are_refused_at_spawn() {
    let db = database().await;
    let error = Worker::builder(db.pool().clone())
        .concurrency(0)
        .spawn()
        .expect_err("concurrency 0");
    assert_eq!(
        error.to_string(),
        "worker setting `concurrency` is 0, but it must be between 1 and 1048576"
    );
    let error = Worker::builder(db.pool().clone())
        .handler(
            "ok",
            "not a slug",
            |input: Value, _ctx| async move { Ok(input) },
        )
        .spawn()
        .expect_err("bad slug");
    assert!(
        error
            .to_string()
            .starts_with("worker handler for flow `ok`, step `not a slug`: invalid slug"),
        "{error}"
    );
}
