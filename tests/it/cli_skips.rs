//! `pgflow run` and `pgflow check` on skipped steps, requeued tasks and a permanently stalled
//! task (migration 0010), as an operator sees them.

use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::cli::{pgflow, stdout};
use crate::support::database;

/// Flow `gate`: `root` and `stall` run; `premium` needs a premium plan and skips, with
/// `skip-cascade`, `bill` after it.
const GATE: &str = "SELECT pgflow.create_flow('gate', max_attempts => 10);
    SELECT pgflow.add_step('gate', 'root');
    SELECT pgflow.add_step('gate', 'stall');
    SELECT pgflow.add_step('gate', 'premium', required_input_pattern => '{\"plan\": \"premium\"}',
                           when_unmet => 'skip-cascade');
    SELECT pgflow.add_step('gate', 'bill', ARRAY['premium']);";

/// Reads every visible message of `gate` and starts its tasks as worker `worker`.
async fn take(pool: &PgPool, worker: Uuid) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT t.step_slug FROM pgflow.start_tasks('gate',
                  ARRAY(SELECT msg_id FROM pgmq.read('gate', 3600, 10)), $1) t
          ORDER BY t.step_slug",
    )
    .bind(worker)
    .fetch_all(pool)
    .await
    .expect("tasks start")
}

/// Moves the start of the run's started tasks back past the sweep's limit, then sweeps.
async fn lose_and_sweep(pool: &PgPool, run: Uuid) -> i32 {
    sqlx::query(
        "UPDATE pgflow.step_tasks
            SET started_at = started_at - interval '100 seconds',
                queued_at = queued_at - interval '100 seconds'
          WHERE run_id = $1 AND status = 'started'",
    )
    .bind(run)
    .execute(pool)
    .await
    .expect("aged");
    sqlx::query_scalar("SELECT pgflow.requeue_stalled_tasks()")
        .fetch_one(pool)
        .await
        .expect("swept")
}

/// A run of `gate` on a free plan: `premium` and `bill` skipped, `root` completed, `stall`
/// requeued three times and then permanently stalled.
async fn stalled_run(pool: &PgPool) -> Uuid {
    sqlx::raw_sql(GATE).execute(pool).await.expect("flow");
    let worker: Uuid = sqlx::query_scalar(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name)
         VALUES (gen_random_uuid(), 'gate', 'lost') RETURNING worker_id",
    )
    .fetch_one(pool)
    .await
    .expect("worker");
    let run: Uuid =
        sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('gate', '{\"plan\": \"free\"}')")
            .fetch_one(pool)
            .await
            .expect("run");
    assert_eq!(take(pool, worker).await, ["root", "stall"]);
    sqlx::query("SELECT pgflow.complete_task($1, 'root', 0, '{\"rows\": 3}')")
        .bind(run)
        .execute(pool)
        .await
        .expect("root completes");
    for _ in 0..3 {
        assert_eq!(lose_and_sweep(pool, run).await, 1);
        assert_eq!(take(pool, worker).await, ["stall"]);
    }
    assert_eq!(lose_and_sweep(pool, run).await, 0, "given up on");
    run
}

#[tokio::test]
async fn run_shows_skipped_steps_with_their_reasons_and_the_stalled_task() {
    let db = database().await;
    let run = stalled_run(db.pool()).await;
    let id = run.to_string();

    let text = stdout(&pgflow(db.url(), &["run", &id]));
    let line = |step: &str| {
        text.lines()
            .find(|line| line.trim_start().starts_with(&format!("{step} ")))
            .unwrap_or_else(|| panic!("a line for {step} in\n{text}"))
            .to_string()
    };
    assert!(
        line("premium").contains("skipped (condition_unmet)"),
        "{text}"
    );
    assert!(
        line("bill").contains("skipped (dependency_skipped)"),
        "{text}"
    );
    assert!(line("root").contains("completed"), "{text}");
    let stall = line("stall");
    assert!(stall.contains("started"), "{text}");
    assert!(stall.contains("4 (3 requeues)"), "{text}");
    assert!(
        stall.contains("Task did not finish within its timeout of 60 seconds"),
        "the lost attempt's error: {text}"
    );
    assert!(
        text.contains("permanently stalled: stall[0] since "),
        "{text}"
    );
    assert!(text.contains("after 3 requeues of lost attempts"), "{text}");
    assert!(
        text.contains(&format!("`pgflow cancel {id}`, then `pgflow retry {id}`")),
        "{text}"
    );

    let json: Value =
        serde_json::from_str(&stdout(&pgflow(db.url(), &["run", &id, "--json"]))).expect("JSON");
    let step = |slug: &str| {
        json["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|step| step["step_slug"] == slug)
            .unwrap_or_else(|| panic!("{slug} in {json}"))
            .clone()
    };
    assert_eq!(step("premium")["status"], "skipped");
    assert_eq!(step("premium")["skip_reason"], "condition_unmet");
    assert!(step("premium")["skipped_at"].is_string(), "{json}");
    assert_eq!(step("bill")["skip_reason"], "dependency_skipped");
    // A step not skipped has neither key; a completed one has its stored output.
    assert_eq!(step("root").get("skip_reason"), None);
    assert_eq!(step("root").get("skipped_at"), None);
    assert_eq!(step("root")["output"], json!({"rows": 3}));
    assert_eq!(step("premium")["output"], Value::Null);
    let task = |slug: &str| {
        json["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|task| task["step_slug"] == slug)
            .unwrap_or_else(|| panic!("{slug} in {json}"))
            .clone()
    };
    assert_eq!(task("stall")["requeued_count"], 3);
    assert_eq!(task("stall")["attempts_count"], 4);
    assert!(task("stall")["last_requeued_at"].is_string(), "{json}");
    assert!(
        task("stall")["permanently_stalled_at"].is_string(),
        "{json}"
    );
    assert_eq!(task("root")["requeued_count"], 0);
    assert_eq!(task("root")["permanently_stalled_at"], Value::Null);
}

#[tokio::test]
async fn check_reports_the_permanently_stalled_task_and_not_the_skipped_steps() {
    let db = database().await;
    let run = stalled_run(db.pool()).await;
    let id = run.to_string();

    let output = pgflow(db.url(), &["check"]);
    assert!(!output.status.success(), "a stuck run fails the check");
    let text = String::from_utf8_lossy(&output.stdout);
    let findings: Vec<&str> = text.lines().collect();
    assert_eq!(findings.len(), 1, "{text}");
    assert!(
        findings[0].starts_with(&format!(
            "stuck [permanently_stalled] run {id}, flow gate, step stall, task 0: task lost its \
             worker again after 3 requeues (attempt 4 of 10)"
        )),
        "{text}"
    );

    let output = pgflow(db.url(), &["check", "--json"]);
    let json: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json[0]["kind"], "stuck");
    assert_eq!(json[0]["rule"], "permanently_stalled");
    assert_eq!(json[0]["step_slug"], "stall");
    let action = json[0]["action"].as_str().unwrap();
    assert!(
        action.contains(&format!("`pgflow cancel {id}` and `pgflow retry {id}`")),
        "{action}"
    );

    // Done as said, through the CLI: the run is no longer stuck.
    stdout(&pgflow(db.url(), &["cancel", &id]));
    stdout(&pgflow(db.url(), &["retry", &id]));
    let after = pgflow(db.url(), &["check", "--json"]);
    let json: Value = serde_json::from_slice(&after.stdout).expect("JSON");
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .all(|finding| finding["rule"] != "permanently_stalled"),
        "{json}"
    );
}
