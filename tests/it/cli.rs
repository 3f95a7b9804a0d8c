//! The `pgflow` binary, run as a user would, against a test database.

use std::process::{Command, Output};

use pgflow_client::Client;
use pgflow_client::throwaway::TestDatabase;
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};

use crate::support::{client, database};

pub fn pgflow(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .args(args)
        .env("DATABASE_URL", url)
        .output()
        .expect("the pgflow binary runs")
}

pub fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "pgflow failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn flow() -> Flow<Value> {
    let urls = step_fn("urls")
        .handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(vec![v]) });
    let fetch = step_fn("fetch")
        .map_over(&urls)
        .max_attempts(2)
        .handler(|v: Value, _ctx| async move { Ok::<_, StepError>(v) });
    Flow::new("crawl")
        .timeout(120)
        .step(urls)
        .step(fetch)
        .build()
}

#[tokio::test]
async fn install_twice_then_the_schema_is_up_to_date() {
    let db = TestDatabase::empty().await.unwrap();
    let first = stdout(&pgflow(db.url(), &["install"]));
    assert!(first.contains("installed pgmq"), "{first}");
    let versions: Vec<i32> = pgflow_core::schema::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert!(
        first.contains(&format!("applied pgflow migrations {versions:?}")),
        "{first}"
    );
    let second = stdout(&pgflow(db.url(), &["install"]));
    assert!(second.contains("pgmq was already installed"), "{second}");
    assert!(second.contains("pgflow schema is up to date"), "{second}");
}

#[tokio::test]
async fn the_printed_schema_applied_with_psql_gives_a_working_engine() {
    let db = TestDatabase::empty().await.unwrap();
    pgflow_client::install_pgmq(db.pool()).await.unwrap();
    let schema = Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .arg("schema")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let sql = stdout(&schema);
    let file = std::env::temp_dir().join(format!("pgflow-schema-{}.sql", db.name()));
    std::fs::write(&file, &sql).unwrap();
    let psql = Command::new("psql")
        .args(["-v", "ON_ERROR_STOP=1", "--single-transaction", "-q", "-f"])
        .arg(&file)
        .arg(db.url())
        .output()
        .expect("psql runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        psql.status.success(),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );

    // The engine works, and our installer recognises the schema as its own.
    let client = Client::new(db.pool().clone());
    assert_eq!(client.install().await.unwrap().applied, Vec::<i32>::new());
    client.compile(&flow()).await.unwrap();
    let run = client.start_json("crawl", json!(1), None).await.unwrap();
    let steps: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.step_states WHERE run_id = $1")
            .bind(run.id())
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(steps, 2);
}

#[tokio::test]
async fn flows_start_runs_and_run_show_what_is_there() {
    let (db, client) = client().await;
    client.compile(&flow()).await.unwrap();

    let flows = stdout(&pgflow(db.url(), &["flows"]));
    assert_eq!(
        flows,
        "crawl  (max_attempts 3, base_delay 5s, timeout 120s)\n  urls [single]\n  fetch [map] <- urls max_attempts=2\n"
    );
    let flows_json: Value =
        serde_json::from_str(&stdout(&pgflow(db.url(), &["flows", "--json"]))).unwrap();
    assert_eq!(flows_json[0]["steps"][1]["kind"], "map");

    let run_id = stdout(&pgflow(
        db.url(),
        &["start", "crawl", r#"{"site": "example.org"}"#],
    ));
    let run_id = run_id.trim();
    let input: Value = sqlx::query_scalar("SELECT input FROM pgflow.runs WHERE run_id = $1::uuid")
        .bind(run_id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(input, json!({"site": "example.org"}));

    let runs = stdout(&pgflow(db.url(), &["runs", "--flow", "crawl"]));
    assert!(runs.starts_with("RUN ID"), "{runs}");
    assert!(
        runs.contains(run_id) && runs.contains("crawl: 1 started"),
        "{runs}"
    );
    let none = stdout(&pgflow(db.url(), &["runs", "--status", "failed", "--json"]));
    let none: Value = serde_json::from_str(&none).unwrap();
    assert_eq!(none["runs"], json!([]));

    let run = stdout(&pgflow(db.url(), &["run", run_id]));
    assert!(
        run.starts_with(&format!("run {run_id} of flow crawl: started")),
        "{run}"
    );
    let lines: Vec<&str> = run.lines().collect();
    assert!(lines[1].starts_with("STEP"), "{run}");
    assert!(
        lines[2].starts_with("urls") && lines[2].contains("started") && lines[2].contains("0/1"),
        "{run}"
    );
    // One layer below urls, which it depends on.
    assert!(
        lines[3].starts_with("  fetch  urls")
            && lines[3].contains("created")
            && lines[3].contains("0/?"),
        "{run}"
    );
}

#[tokio::test]
async fn errors_go_to_stderr_with_a_failing_status() {
    let db = database().await;
    let bad_json = pgflow(db.url(), &["start", "crawl", "{not json"]);
    assert!(!bad_json.status.success());
    assert!(bad_json.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&bad_json.stderr).starts_with("error: the input is not valid JSON")
    );

    let unknown = pgflow(db.url(), &["start", "nope", "{}"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("flow `nope` is not in the database")
    );

    let missing = pgflow(db.url(), &["run", "00000000-0000-0000-0000-000000000001"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("there is no run"));

    let no_db = Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .arg("flows")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!no_db.status.success());
    assert_eq!(
        String::from_utf8_lossy(&no_db.stderr),
        "error: no database: pass --database-url or set DATABASE_URL\n"
    );
}

#[tokio::test]
async fn watch_follows_a_run_to_its_end() {
    let (db, client) = client().await;
    client.compile(&flow()).await.unwrap();
    let run = client.start_json("crawl", json!("x"), None).await.unwrap();
    let url = db.url().to_string();
    let id = run.id().to_string();
    let watcher = std::thread::spawn(move || pgflow(&url, &["watch", &id, "--json"]));
    // Once the watcher listens (a backend whose last statement was LISTEN) and has read the
    // run as still started (its other backend ran the run's SELECT and is idle), fail the run
    // by hand: a fixed sleep let a slow watcher subscribe late and see only `run:failed`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let listening: bool = sqlx::query_scalar(
            "SELECT coalesce(bool_or(query ILIKE 'LISTEN%') \
                    AND bool_or(state = 'idle' AND query ILIKE '%FROM pgflow.runs WHERE run_id%'), \
                    false) \
               FROM pg_stat_activity \
              WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if listening {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the watcher never listened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    sqlx::query(
        "UPDATE pgflow.step_tasks SET status = 'started', attempts_count = 3 WHERE run_id = $1",
    )
    .bind(run.id())
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query("SELECT pgflow.fail_task($1, 'urls', 0, 'boom')")
        .bind(run.id())
        .execute(db.pool())
        .await
        .unwrap();
    let output = watcher.join().unwrap();
    // 3: the run failed (`pgflow watch --help`).
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let kinds: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event_type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["step:failed", "run:failed"]);
}

#[tokio::test]
async fn check_finds_nothing_on_a_sound_database_and_names_what_is_broken() {
    let (db, client) = client().await;
    client.compile(&flow()).await.unwrap();
    let run = client.start_json("crawl", json!("x"), None).await.unwrap();
    // Nothing serves the run: stuck, and said so.
    let unserved = pgflow(db.url(), &["check"]);
    assert!(!unserved.status.success());
    let text = String::from_utf8_lossy(&unserved.stdout);
    assert!(
        text.starts_with(&format!(
            "stuck [no_live_worker] run {}, flow crawl",
            run.id()
        )),
        "{text}"
    );
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
         VALUES (gen_random_uuid(), 'crawl', 'test')",
    )
    .execute(db.pool())
    .await
    .unwrap();
    assert_eq!(
        stdout(&pgflow(db.url(), &["check"])),
        "every run is consistent\n"
    );

    sqlx::query("UPDATE pgflow.runs SET remaining_steps = 5 WHERE run_id = $1")
        .bind(run.id())
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("DELETE FROM pgmq.q_crawl")
        .execute(db.pool())
        .await
        .unwrap();
    let broken = pgflow(db.url(), &["check"]);
    assert!(!broken.status.success());
    let text = String::from_utf8_lossy(&broken.stdout);
    assert!(
        text.contains(&format!(
            "inconsistent [remaining_steps] run {}, flow crawl: remaining_steps is 5 but 2 \
             steps are neither completed nor skipped",
            run.id()
        )),
        "{text}"
    );
    assert!(text.contains("stuck [queued_task_message]"), "{text}");
    assert_eq!(
        String::from_utf8_lossy(&broken.stderr),
        "error: 2 inconsistencies found\n"
    );
}

#[test]
fn an_unknown_status_filter_is_refused_with_the_valid_ones() {
    // Refused while parsing the arguments: no database is needed, none is reached.
    let output = pgflow(
        "postgres://nobody@127.0.0.1:1/none",
        &["runs", "--status", "bogus"],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`bogus` is not a run status; valid: started, completed, failed"),
        "{stderr}"
    );
}
