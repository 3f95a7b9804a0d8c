//! The dashboard (feature `dashboard`): its pages over HTTP, its live updates, its actions, its
//! queries' plans over many runs, and a real browser driving it.

mod browser;
#[cfg(feature = "cli")]
mod cli;
mod pages;
mod scale;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use pgflow::Client;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt;
use uuid::Uuid;

/// Flow `shop`: validate → items (a map over validate's output) and charge → ship. Two
/// attempts per task, no backoff, so that a test fails a task for good in two reports.
pub async fn shop(pool: &PgPool) {
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('shop', max_attempts => 2, base_delay => 0);
         SELECT pgflow.add_step('shop', 'validate');
         SELECT pgflow.add_step('shop', 'items', ARRAY['validate'], step_type => 'map');
         SELECT pgflow.add_step('shop', 'charge', ARRAY['validate']);
         SELECT pgflow.add_step('shop', 'ship', ARRAY['items', 'charge']);",
    )
    .execute(pool)
    .await
    .expect("flow shop");
}

/// Takes task `index` of `step` as a worker would, for one more attempt.
pub async fn take(pool: &PgPool, run: Uuid, step: &str, index: i32) {
    sqlx::query(
        "UPDATE pgflow.step_tasks
            SET status = 'started', started_at = now(), attempts_count = attempts_count + 1
          WHERE run_id = $1 AND step_slug = $2 AND task_index = $3",
    )
    .bind(run)
    .bind(step)
    .bind(index)
    .execute(pool)
    .await
    .expect("task taken");
}

/// Takes a task and completes it with `output`, as a worker reports.
pub async fn complete(pool: &PgPool, run: Uuid, step: &str, index: i32, output: Value) {
    take(pool, run, step, index).await;
    sqlx::query("SELECT pgflow.complete_task($1, $2, $3, $4)")
        .bind(run)
        .bind(step)
        .bind(index)
        .bind(output)
        .execute(pool)
        .await
        .expect("task completed");
}

/// Takes a task and fails its attempt with `error`.
pub async fn fail(pool: &PgPool, run: Uuid, step: &str, index: i32, error: &str) {
    take(pool, run, step, index).await;
    sqlx::query("SELECT pgflow.fail_task($1, $2, $3, $4)")
        .bind(run)
        .bind(step)
        .bind(index)
        .bind(error)
        .execute(pool)
        .await
        .expect("task failed");
}

/// What a hostile party puts in a run: an input and an error message that are HTML.
pub const HOSTILE_INPUT: &str = "<script>window.__pwned = 1</script>";
pub const HOSTILE_ERROR: &str =
    "</pre><img src=x onerror=\"window.__pwned=2\"><script>window.__pwned=3</script>";

/// Runs of `shop` in every state a run and its steps can be in.
#[derive(Debug, Clone, Copy)]
pub struct Runs {
    /// Every step completed.
    pub completed: Uuid,
    /// validate failed for good (two attempts, the errors hostile).
    pub failed: Uuid,
    /// Cancelled after validate: items and charge cancelled, ship created.
    pub cancelled: Uuid,
    /// validate completed, items 1 of 3 done, charge started, ship created.
    pub started: Uuid,
    /// Another started run, validate queued: for the cancel button.
    pub fresh: Uuid,
}

pub async fn start(pool: &PgPool, input: Value) -> Uuid {
    sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('shop', $1)")
        .bind(input)
        .fetch_one(pool)
        .await
        .expect("run started")
}

pub async fn runs_in_every_state(pool: &PgPool) -> Runs {
    shop(pool).await;
    let completed = start(pool, json!({"order": 1})).await;
    complete(pool, completed, "validate", 0, json!(["a", "b"])).await;
    complete(pool, completed, "items", 0, json!("A")).await;
    complete(pool, completed, "items", 1, json!("B")).await;
    complete(pool, completed, "charge", 0, json!({"charged": 10})).await;
    complete(pool, completed, "ship", 0, json!({"shipped": true})).await;

    let failed = start(pool, json!({"note": HOSTILE_INPUT})).await;
    fail(pool, failed, "validate", 0, "first: card declined").await;
    fail(pool, failed, "validate", 0, HOSTILE_ERROR).await;

    let cancelled = start(pool, json!({"order": 3})).await;
    complete(pool, cancelled, "validate", 0, json!(["x"])).await;
    Client::new(pool.clone())
        .cancel(cancelled)
        .await
        .expect("cancelled");

    let started = start(pool, json!({"order": 4})).await;
    complete(pool, started, "validate", 0, json!(["a", "b", "c"])).await;
    complete(pool, started, "items", 0, json!("A")).await;
    take(pool, started, "charge", 0).await;

    let fresh = start(pool, json!({"order": 5})).await;
    Runs {
        completed,
        failed,
        cancelled,
        started,
        fresh,
    }
}

/// A run of flow `perks` whose root step `gift` is skipped (its condition on the input is
/// unmet) while `check` is started.
pub async fn skipped_run(pool: &PgPool) -> Uuid {
    sqlx::raw_sql(
        r#"SELECT pgflow.create_flow('perks');
           SELECT pgflow.add_step('perks', 'check');
           SELECT pgflow.add_step('perks', 'gift', required_input_pattern => '{"vip": true}',
                                  when_unmet => 'skip');"#,
    )
    .execute(pool)
    .await
    .expect("flow perks");
    sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('perks', '{\"vip\": false}')")
        .fetch_one(pool)
        .await
        .expect("run started")
}

pub async fn status_of(pool: &PgPool, run: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE run_id = $1")
        .bind(run)
        .fetch_one(pool)
        .await
        .expect("run row")
}

/// A request into `router`: its status and body.
pub async fn request(router: &axum::Router, request: Request<Body>) -> (StatusCode, String) {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub async fn get(router: &axum::Router, path: &str) -> (StatusCode, String) {
    request(
        router,
        Request::get(path).body(Body::empty()).expect("request"),
    )
    .await
}
