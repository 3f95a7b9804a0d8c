//! The `pgflow` binary as an operator meets it: pipes, servers that do not answer, exit
//! statuses, argument checks, colour and the run view.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgflow_client::Client;
use pgflow_client::throwaway::TestDatabase;
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::cli::{pgflow, stdout};
use crate::support::client;

#[test]
fn a_reader_that_stops_early_ends_the_output_quietly() {
    // The schema is larger than a pipe's buffer: pgflow is still writing when the reader goes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .arg("schema")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("CREATE"), "{first}");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(stderr.is_empty(), "{stderr}");
}

/// `pgflow flows` against `url`, with how long it took.
fn flows_at(url: &str, extra: &[&str]) -> (std::process::Output, Duration) {
    let began = Instant::now();
    let output = pgflow(url, &[&["flows"], extra].concat());
    (output, began.elapsed())
}

#[test]
fn a_port_nothing_listens_on_fails_at_once_with_the_cause_and_the_masked_url() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://operator:s3cret@127.0.0.1:{port}/orders");
    let (output, took) = flows_at(&url, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(
        stderr.contains(&format!("postgres://operator:***@127.0.0.1:{port}/orders")),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn a_server_that_never_answers_is_given_up_on_after_the_connect_timeout() {
    // Accepts connections (the kernel's backlog) and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("postgres://operator@127.0.0.1:{port}/orders");
    let (output, took) = flows_at(&url, &["--connect-timeout", "1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        stderr.contains(&format!(
            "cannot connect to {url}: no answer within 1s (on a slow network, raise --connect-timeout)"
        )),
        "{stderr}"
    );
    drop(silent);
}

/// `urls` finds pages, `fetch` maps over them (two attempts each), `save` stores the lot.
fn crawl() -> Flow<Value> {
    let urls = step_fn("urls")
        .handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(vec![v]) });
    let fetch = step_fn("fetch")
        .map_over(&urls)
        .max_attempts(2)
        .handler(|v: Value, _ctx| async move { Ok::<_, StepError>(v) });
    let save = step_fn("save")
        .depends_on(&fetch)
        .handler(|_: Value, pages: Vec<Value>, _ctx| async move { Ok::<_, StepError>(pages) });
    Flow::new("crawl").step(urls).step(fetch).step(save).build()
}

/// Takes task `index` of `step` as a worker would, for one more attempt.
async fn take(pool: &PgPool, run: Uuid, step: &str, index: i32) {
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
    .unwrap();
}

/// Takes a task and completes it with `output`.
async fn complete(pool: &PgPool, run: Uuid, step: &str, index: i32, output: Value) {
    take(pool, run, step, index).await;
    sqlx::query("SELECT pgflow.complete_task($1, $2, $3, $4)")
        .bind(run)
        .bind(step)
        .bind(index)
        .bind(output)
        .execute(pool)
        .await
        .unwrap();
}

/// Takes a task and fails its attempt with `error` (a retry if attempts are left).
async fn fail(pool: &PgPool, run: Uuid, step: &str, index: i32, error: &str) {
    take(pool, run, step, index).await;
    sqlx::query("SELECT pgflow.fail_task($1, $2, $3, $4)")
        .bind(run)
        .bind(step)
        .bind(index)
        .bind(error)
        .execute(pool)
        .await
        .unwrap();
}

/// A crawl run of three pages whose `urls` step is done.
async fn crawling(db: &TestDatabase, client: &Client) -> Uuid {
    client.compile(&crawl()).await.unwrap();
    let run = client
        .start_json("crawl", json!("x"), None)
        .await
        .unwrap()
        .id();
    complete(db.pool(), run, "urls", 0, json!(["a", "b", "c"])).await;
    run
}

#[tokio::test]
async fn watch_exits_0_for_a_completed_run() {
    let (db, client) = client().await;
    let run = crawling(&db, &client).await;
    for index in 0..3 {
        complete(db.pool(), run, "fetch", index, json!(index)).await;
    }
    complete(db.pool(), run, "save", 0, json!("saved")).await;
    let output = pgflow(db.url(), &["watch", &run.to_string()]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    // Ended before the watch began: its view once, then its last event.
    let text = String::from_utf8_lossy(&output.stdout);
    let views = text.lines().filter(|line| line.starts_with("run ")).count();
    assert_eq!(views, 1, "{text}");
    assert!(text.trim_end().ends_with(" run:completed"), "{text}");
}

#[tokio::test]
async fn watch_exits_3_for_a_failed_run_and_says_where() {
    let (db, client) = client().await;
    let run = crawling(&db, &client).await;
    fail(db.pool(), run, "fetch", 1, "timeout").await;
    fail(db.pool(), run, "fetch", 1, "404 not found").await;
    let output = pgflow(db.url(), &["watch", &run.to_string()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("run {run} failed in step `fetch`: 404 not found")),
        "{stderr}"
    );
}

#[tokio::test]
async fn watch_exits_4_when_its_timeout_passes_first() {
    let (db, client) = client().await;
    let run = crawling(&db, &client).await;
    let began = Instant::now();
    let output = pgflow(db.url(), &["watch", &run.to_string(), "--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(began.elapsed() < Duration::from_secs(10));
    assert!(
        stderr.contains(&format!("run {run} has not ended within 1s; it goes on")),
        "{stderr}"
    );
}

#[test]
fn watch_help_lists_its_exit_statuses() {
    let help = stdout(&pgflow("", &["watch", "--help"]));
    for line in [
        "0  the run completed",
        "3  the run failed",
        "4  --timeout passed before the run ended",
    ] {
        assert!(help.contains(line), "{help}");
    }
}

/// `pgflow` with `env` and nothing of the caller's colour settings.
fn pgflow_in(url: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR_FORCE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn colours_show_on_demand_and_never_in_a_pipe_or_under_no_color() {
    let (db, client) = client().await;
    let run = crawling(&db, &client).await;
    fail(db.pool(), run, "fetch", 0, "timeout").await;
    fail(db.pool(), run, "fetch", 0, "404 not found").await;
    let run = run.to_string();
    for args in [&["runs"][..], &["run", &run]] {
        // CLICOLOR_FORCE stands in for a terminal.
        let forced = pgflow_in(db.url(), args, &[("CLICOLOR_FORCE", "1")]);
        assert!(forced.contains("\u{1b}[31mfailed\u{1b}[0m"), "{forced}");
        let piped = pgflow_in(db.url(), args, &[]);
        assert!(!piped.contains('\u{1b}'), "{piped}");
        assert!(piped.contains("failed"), "{piped}");
        let no_color = pgflow_in(
            db.url(),
            args,
            &[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")],
        );
        assert_eq!(no_color, piped);
    }
}

/// A handler's error is another party's text: on a terminal its escape sequences would clear
/// the screen, set the clipboard (OSC 52) or reverse what it shows. `pgflow run` shows them.
#[tokio::test]
async fn a_hostile_error_message_is_shown_on_a_terminal_not_obeyed() {
    let (db, client) = client().await;
    let run = crawling(&db, &client).await;
    let hostile = "boom\u{1b}[2J\u{1b}]52;c;cm0gLXJmIH4=\u{7}\u{202e}txt.exe";
    fail(db.pool(), run, "fetch", 0, hostile).await;
    let id = run.to_string();
    for args in [&["run", &id][..], &["run", &id, "--attempts"]] {
        let forced = pgflow_in(db.url(), args, &[("CLICOLOR_FORCE", "1")]);
        assert!(forced.contains("\u{1b}[31m"), "our colours stay: {forced}");
        for raw in ["\u{1b}[2J", "\u{1b}]52", "\u{7}", "\u{202e}"] {
            assert!(
                !forced.contains(raw),
                "{raw:?} reached the terminal: {forced:?}"
            );
        }
        assert!(
            forced.contains("boom\\u{1b}[2J\\u{1b}]52;c;cm0gLXJmIH4=\\u{7}\\u{202e}txt.exe"),
            "{forced}"
        );
    }
}

/// `pgflow watch`'s event lines carry the handler's error too (found by a hostile probe after
/// the table was fixed): on a terminal they show it escaped.
#[tokio::test]
async fn watch_shows_a_hostile_error_in_its_event_lines_escaped() {
    let (db, client) = client().await;
    let run = crawling(&db, &client).await;
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .args(["watch", &run.to_string()])
        .env("DATABASE_URL", db.url())
        .env("CLICOLOR_FORCE", "1")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    let stdout = BufReader::new(watcher.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let _ = lines.send(line.unwrap());
        }
    });
    let mut said = Vec::new();
    let mut wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = seen
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("watch never said {needle:?}: {said:?}"));
            said.push(line.clone());
            if line.contains(needle) {
                return said.join("\n");
            }
        }
    };
    // The first view's last row: the watch has its starting point.
    wait_for("save");
    let hostile = "boom\u{1b}[2J\u{1b}]52;c;cm0gLXJmIH4=\u{7}\u{202e}txt.exe";
    // Its step's last attempt: the run fails.
    for _ in 0..2 {
        fail(db.pool(), run, "fetch", 0, hostile).await;
    }
    let text = wait_for("run:failed");
    for raw in ["\u{1b}[2J", "\u{1b}]52", "\u{7}", "\u{202e}"] {
        assert!(
            !text.contains(raw),
            "{raw:?} reached the terminal: {text:?}"
        );
    }
    assert!(text.contains("boom\\u{1b}[2J"), "{text}");
    let _ = watcher.wait();
}

/// The row of `step` in `pgflow run`'s table, its indentation kept.
fn row<'a>(view: &'a str, step: &str) -> &'a str {
    view.lines()
        .find(|line| line.trim_start().starts_with(&format!("{step} ")))
        .unwrap_or_else(|| panic!("no row for {step} in\n{view}"))
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[tokio::test]
async fn run_draws_the_dag_with_map_progress_retries_and_durations_that_stop() {
    let (db, client) = client().await;
    let run = crawling(&db, &client).await;
    complete(db.pool(), run, "fetch", 0, json!("page a")).await;
    fail(db.pool(), run, "fetch", 1, "timeout").await;
    take(db.pool(), run, "fetch", 2).await;
    let id = run.to_string();
    let utc = [("TZ", "UTC")];

    let view = pgflow_in(db.url(), &["run", &id], &utc);
    let lines: Vec<&str> = view.lines().collect();
    assert!(
        lines[0].starts_with(&format!("run {id} of flow crawl: started for ")),
        "{view}"
    );
    assert!(lines[0].ends_with(" +00:00)"), "{view}");
    assert_eq!(
        words(lines[1]),
        [
            "STEP", "AFTER", "KIND", "STATUS", "TASKS", "ATTEMPTS", "STARTED", "DURATION", "ERROR"
        ]
    );
    let urls = row(&view, "urls");
    assert!(urls.starts_with("urls "), "{urls}");
    assert!(urls.contains("completed") && urls.contains("1/1"), "{urls}");
    // One layer down: after urls; one task of three done, one retried with its error.
    let fetch = row(&view, "fetch");
    assert!(fetch.starts_with("  fetch "), "{fetch}");
    assert_eq!(
        words(fetch)[..7],
        [
            "fetch",
            "urls",
            "map",
            "started",
            "1/3",
            "[####......]",
            "1"
        ]
    );
    assert!(fetch.ends_with("[1] timeout (retried)"), "{fetch}");
    let save = row(&view, "save");
    assert!(save.starts_with("    save "), "{save}");
    assert_eq!(
        words(save),
        ["save", "fetch", "single", "created", "0/1", "0", "-"]
    );

    // The second attempt fails for good: the run fails, and nothing in the view moves on.
    fail(db.pool(), run, "fetch", 1, "404 not found").await;
    let failed = pgflow_in(db.url(), &["run", &id], &utc);
    assert!(
        failed.starts_with(&format!("run {id} of flow crawl: failed after ")),
        "{failed}"
    );
    let fetch = row(&failed, "fetch");
    assert_eq!(words(fetch)[3..7], ["failed", "1/3", "[####......]", "2"]);
    assert!(fetch.ends_with("[1] 404 not found"), "{fetch}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(pgflow_in(db.url(), &["run", &id], &utc), failed);
}

#[tokio::test]
async fn watch_tells_map_progress_and_retries_as_they_happen() {
    let (db, client) = client().await;
    let run = crawling(&db, &client).await;
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .args(["watch", &run.to_string()])
        .env("DATABASE_URL", db.url())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    let stdout = BufReader::new(watcher.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let _ = lines.send(line.unwrap());
        }
    });
    let wait_for = |prefix: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = seen
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("watch never said {prefix:?}"));
            // Event and progress lines start with the time of day.
            let said = line.split_once(' ').map_or("", |(_, said)| said);
            if line.trim_start().starts_with(prefix) || said.starts_with(prefix) {
                return line;
            }
        }
    };
    // The last row of the first view: the watch has its starting point.
    wait_for("save");

    complete(db.pool(), run, "fetch", 0, json!("page a")).await;
    wait_for("progress fetch 1/3 [####......]");
    fail(db.pool(), run, "fetch", 1, "timeout").await;
    wait_for("retry fetch[1]: attempt 1 failed: timeout");
    complete(db.pool(), run, "fetch", 1, json!("page b")).await;
    complete(db.pool(), run, "fetch", 2, json!("page c")).await;
    complete(db.pool(), run, "save", 0, json!("saved")).await;
    wait_for("run:completed");
    let status = watcher.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// The keys of a JSON object, sorted.
fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[tokio::test]
async fn runs_and_run_json_keep_the_documented_keys() {
    // docs/operating.md, "JSON output": a key removed or renamed breaks scripts; a key added
    // is documented there first.
    let (db, client) = client().await;
    let run = crawling(&db, &client).await;
    fail(db.pool(), run, "fetch", 1, "timeout").await;

    let runs: Value =
        serde_json::from_str(&stdout(&pgflow(db.url(), &["runs", "--json"]))).unwrap();
    assert_eq!(keys(&runs), ["counts", "runs"]);
    assert_eq!(
        keys(&runs["runs"][0]),
        [
            "ended_at",
            "flow_slug",
            "remaining_steps",
            "retry_count",
            "run_id",
            "started_at",
            "status"
        ]
    );
    assert_eq!(keys(&runs["counts"][0]), ["count", "flow_slug", "status"]);
    assert_eq!(runs["runs"][0]["run_id"], json!(run));
    assert_eq!(
        runs["counts"][0],
        json!({"flow_slug": "crawl", "status": "started", "count": 1})
    );

    let text = stdout(&pgflow(db.url(), &["run", &run.to_string(), "--json"]));
    let state: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        keys(&state),
        ["children", "parent", "run", "steps", "tasks"]
    );
    // A run no subflow step started, with no subflow step of its own.
    assert_eq!(state["parent"], Value::Null);
    assert_eq!(state["children"], json!([]));
    assert_eq!(
        keys(&state["run"]),
        [
            "cancelled_at",
            "completed_at",
            "failed_at",
            "flow_slug",
            "input",
            "output",
            "remaining_steps",
            "retry_count",
            "run_id",
            "started_at",
            "status"
        ]
    );
    assert_eq!(
        keys(&state["steps"][1]),
        [
            "completed_at",
            "created_at",
            "error_message",
            "failed_at",
            "initial_tasks",
            "output",
            "remaining_deps",
            "remaining_tasks",
            "started_at",
            "status",
            "step_index",
            "step_slug",
            "step_type"
        ]
    );
    assert_eq!(
        keys(&state["tasks"][2]),
        [
            "attempts_count",
            "completed_at",
            "error_message",
            "failed_at",
            "last_requeued_at",
            "last_worker_id",
            "message_id",
            "output",
            "permanently_stalled_at",
            "queued_at",
            "requeued_count",
            "started_at",
            "status",
            "step_slug",
            "task_index"
        ]
    );
    // The retried task, with its last error.
    assert_eq!(state["tasks"][2]["step_slug"], "fetch");
    assert_eq!(state["tasks"][2]["task_index"], 1);
    assert_eq!(state["tasks"][2]["status"], "queued");
    assert_eq!(state["tasks"][2]["error_message"], "timeout");
}

#[tokio::test]
async fn run_attempts_lists_every_failed_attempt_with_its_message() {
    let (db, client) = client().await;
    let run = crawling(&db, &client).await;
    // fetch/1 fails on its first attempt, is retried, and fails on its second (its last).
    fail(db.pool(), run, "fetch", 1, "connection reset").await;
    fail(db.pool(), run, "fetch", 1, "404 not found\nat line 2").await;
    let id = run.to_string();
    let utc = [("TZ", "UTC")];

    let view = pgflow_in(db.url(), &["run", &id, "--attempts"], &utc);
    let (dag, attempts) = view
        .split_once("\nfailed attempts: 2\n")
        .unwrap_or_else(|| panic!("{view}"));
    // The DAG view is the one `run` draws without the flag.
    assert_eq!(dag, pgflow_in(db.url(), &["run", &id], &utc), "{view}");
    let lines: Vec<&str> = attempts.lines().collect();
    assert_eq!(lines.len(), 3, "{view}");
    assert_eq!(
        words(lines[0]),
        ["RETRY", "STEP", "TASK", "ATTEMPT", "FAILED", "AT", "ERROR"]
    );
    // Both before any retry of the run: its retry 0.
    assert_eq!(words(lines[1])[..4], ["0", "fetch", "1", "1"], "{view}");
    assert!(lines[1].ends_with(" connection reset"), "{view}");
    assert_eq!(words(lines[2])[..4], ["0", "fetch", "1", "2"], "{view}");
    // The first line of the message; --json has it whole.
    assert!(lines[2].ends_with(" 404 not found"), "{view}");

    let state: Value = serde_json::from_str(&stdout(&pgflow(
        db.url(),
        &["run", &id, "--attempts", "--json"],
    )))
    .unwrap();
    assert_eq!(
        keys(&state),
        [
            "attempts", "children", "parent", "retries", "run", "steps", "tasks"
        ]
    );
    assert_eq!(state["retries"], json!([]));
    assert_eq!(
        keys(&state["attempts"][0]),
        [
            "attempt",
            "error_message",
            "failed_at",
            "last_worker_id",
            "run_retry",
            "step_slug",
            "task_index"
        ]
    );
    let messages: Vec<&str> = state["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["error_message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["connection reset", "404 not found\nat line 2"]);
    assert_eq!(state["attempts"][1]["attempt"], json!(2));

    // A run without failures says so.
    let clean = client
        .start_json("crawl", json!("y"), None)
        .await
        .unwrap()
        .id();
    let view = pgflow_in(db.url(), &["run", &clean.to_string(), "--attempts"], &utc);
    assert!(view.ends_with("\nfailed attempts: none\n"), "{view}");
}
