//! `pgflow cancel` and `pgflow retry` (issue 19), and how `runs`, `run` and `watch` show
//! cancelled and retried runs: output, `--json` and exit statuses.

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use pgflow_client::{Client, RunStatus, Worker};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::cli::{pgflow, stdout};
use crate::run_control::assert_no_inconsistency;
use crate::run_control::{complete, failed_in_fetch, fetching, pages};
use crate::support::{assert_consistent, client, eventually};

/// `pgflow` in UTC, with no colour.
fn pgflow_utc(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("TZ", "UTC")
        .env_remove("CLICOLOR_FORCE")
        .output()
        .expect("the pgflow binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

async fn status(client: &Client, run: Uuid) -> RunStatus {
    client.run_state(run).await.unwrap().run.status
}

#[tokio::test]
async fn cancel_a_run_then_again_and_retry_it_then_again() {
    let (db, client) = client().await;
    client.compile(&pages()).await.unwrap();
    let run = fetching(&client).await;
    let id = run.to_string();

    let output = pgflow(db.url(), &["cancel", &id]);
    assert_eq!(stdout(&output), format!("cancelled run {id}\n"));
    assert_eq!(status(&client, run).await, RunStatus::Cancelled);
    // Again: nothing to do, and it says so, with success: the run is not running.
    let output = pgflow(db.url(), &["cancel", &id]);
    assert_eq!(
        stdout(&output),
        format!("run {id} is already cancelled: nothing to cancel\n")
    );
    let json: Value =
        serde_json::from_str(&stdout(&pgflow(db.url(), &["cancel", &id, "--json"]))).unwrap();
    assert_eq!(
        json,
        json!({"run_id": id, "cancelled": false, "status": "cancelled"})
    );

    let output = pgflow(db.url(), &["retry", &id]);
    assert_eq!(
        stdout(&output),
        format!("retried run {id} (retry 1): its unfinished steps start again\n")
    );
    assert_eq!(status(&client, run).await, RunStatus::Started);
    // Again: refused with its own exit status, nothing changed.
    let output = pgflow(db.url(), &["retry", &id]);
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert_eq!(
        stderr(&output),
        format!(
            "error: run {id} is started: only a failed or cancelled run can be retried; \
             nothing changed\n"
        )
    );
    assert!(output.stdout.is_empty());
    assert_eq!(client.run_state(run).await.unwrap().run.retry_count, 1);

    let failed = failed_in_fetch(&client).await;
    let json: Value = serde_json::from_str(&stdout(&pgflow(
        db.url(),
        &["retry", &failed.to_string(), "--json"],
    )))
    .unwrap();
    assert_eq!(json, json!({"run_id": failed, "retry_count": 1}));
    let json: Value = serde_json::from_str(&stdout(&pgflow(
        db.url(),
        &["cancel", &failed.to_string(), "--json"],
    )))
    .unwrap();
    assert_eq!(
        json,
        json!({"run_id": failed, "cancelled": true, "status": "cancelled"})
    );
    assert_no_inconsistency(db.pool()).await;
}

#[tokio::test]
async fn an_unknown_run_or_flow_is_an_error_and_bad_arguments_change_nothing() {
    let (db, client) = client().await;
    client.compile(&pages()).await.unwrap();
    let run = fetching(&client).await;
    let unknown = Uuid::new_v4().to_string();
    for command in ["cancel", "retry"] {
        let output = pgflow(db.url(), &[command, &unknown]);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert_eq!(
            stderr(&output),
            format!("error: there is no run {unknown}\n")
        );

        let output = pgflow(db.url(), &[command, "--flow", "nope"]);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert!(
            stderr(&output).contains(
                "flow `nope` is not in the database (compile it first); flows there: [pages]"
            ),
            "{output:?}"
        );
    }
    let time_flag = |command| match command {
        "cancel" => "--started-before",
        _ => "--failed-since",
    };
    for command in ["cancel", "retry"] {
        let flag = time_flag(command);
        for (args, says) in [
            (vec![command], "required"),
            (vec![command, "not-a-uuid"], "invalid value 'not-a-uuid'"),
            (
                vec![command, &unknown, "--flow", "pages"],
                "cannot be used with",
            ),
            (vec![command, &unknown, flag, "1h"], "cannot be used with"),
            (vec![command, flag, "1h"], "--flow"),
            (
                vec![command, "--flow", "pages", flag, "yesterday"],
                "`yesterday` is not a time",
            ),
        ] {
            let output = pgflow(db.url(), &args);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
            assert!(
                stderr(&output).contains(says),
                "{args:?}: {}",
                stderr(&output)
            );
        }
    }
    assert_eq!(status(&client, run).await, RunStatus::Started);

    // The help tells the forms of a time and the exit statuses.
    let help = stdout(&pgflow("", &["retry", "--help"]));
    for line in ["90s, 30m, 2h, 7d", "3  the run is started or completed"] {
        assert!(help.contains(line), "{help}");
    }
}

#[tokio::test]
async fn cancel_and_retry_a_flows_runs_by_time() {
    let (db, client) = client().await;
    client.compile(&pages()).await.unwrap();
    let old = [fetching(&client).await, fetching(&client).await];
    let failed = failed_in_fetch(&client).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let boundary = chrono::Utc::now();
    let new = fetching(&client).await;
    let before = boundary.format("%Y-%m-%d %H:%M:%S%.6f").to_string();

    // Local time (TZ=UTC here), as `pgflow runs` prints it.
    let output = pgflow_utc(
        db.url(),
        &["cancel", "--flow", "pages", "--started-before", &before],
    );
    let text = stdout(&output);
    assert!(
        text.starts_with("cancelled 2 runs of flow pages started before "),
        "{text}"
    );
    for run in old {
        assert_eq!(status(&client, run).await, RunStatus::Cancelled);
    }
    assert_eq!(status(&client, new).await, RunStatus::Started);

    // The failed run failed more than a second before the boundary.
    let output = pgflow_utc(
        db.url(),
        &["retry", "--flow", "pages", "--failed-since", "1s"],
    );
    let text = stdout(&output);
    assert!(
        text.starts_with("retried 0 runs of flow pages that failed since "),
        "{text}"
    );
    assert_eq!(status(&client, failed).await, RunStatus::Failed);
    let json: Value = serde_json::from_str(&stdout(&pgflow(
        db.url(),
        &["retry", "--flow", "pages", "--failed-since", "1h", "--json"],
    )))
    .unwrap();
    assert_eq!(json, json!({"flow_slug": "pages", "retried": 1}));
    assert_eq!(status(&client, failed).await, RunStatus::Started);

    let output = pgflow(db.url(), &["cancel", "--flow", "pages"]);
    assert_eq!(stdout(&output), "cancelled 2 runs of flow pages\n");
    let output = pgflow(db.url(), &["cancel", "--flow", "pages"]);
    assert_eq!(stdout(&output), "cancelled 0 runs of flow pages\n");
    // Cancelled runs are not failed ones: a bulk retry leaves them.
    let output = pgflow(db.url(), &["retry", "--flow", "pages"]);
    assert_eq!(
        stdout(&output),
        "retried 0 runs of flow pages that failed\n"
    );
    assert_no_inconsistency(db.pool()).await;
}

#[tokio::test]
async fn runs_run_and_watch_show_cancelled_and_retried_runs() {
    let (db, client) = client().await;
    client.compile(&pages()).await.unwrap();
    let run = failed_in_fetch(&client).await;
    let id = run.to_string();
    client.retry(run).await.unwrap();
    complete(db.pool(), run, "fetch", 1, json!("b")).await;
    client.cancel(run).await.unwrap();

    // runs: the status (magenta on a terminal) and the retries.
    let listing = stdout(&pgflow_utc(db.url(), &["runs"]));
    let header: Vec<&str> = listing.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "RUN", "ID", "FLOW", "STATUS", "RETRIES", "STEPS", "LEFT", "STARTED", "DURATION"
        ]
    );
    let row: Vec<&str> = listing.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        row[..5],
        [id.as_str(), "pages", "cancelled", "1", "2"],
        "{listing}"
    );
    assert!(listing.contains("pages: 1 cancelled"), "{listing}");
    let coloured = Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .args(["runs", "--status", "cancelled"])
        .env("DATABASE_URL", db.url())
        .env("CLICOLOR_FORCE", "1")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&coloured.stdout).contains("\u{1b}[35mcancelled\u{1b}[0m"),
        "{coloured:?}"
    );
    let json: Value =
        serde_json::from_str(&stdout(&pgflow(db.url(), &["runs", "--json"]))).unwrap();
    assert_eq!(json["runs"][0]["retry_count"], json!(1));
    assert_eq!(json["runs"][0]["status"], json!("cancelled"));
    assert!(json["runs"][0]["ended_at"].is_string());

    // run: the end, the retries, the cancelled step.
    let view = stdout(&pgflow_utc(db.url(), &["run", &id]));
    let first = view.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("run {id} of flow pages: cancelled after ")),
        "{view}"
    );
    assert!(first.contains(", cancelled "), "{view}");
    assert!(first.ends_with(", retried once)"), "{view}");
    let fetch = view
        .lines()
        .find(|line| line.trim_start().starts_with("fetch "))
        .unwrap();
    assert!(fetch.contains(" cancelled "), "{view}");

    // run --attempts: the failure before the retry, and the retry's history.
    let view = stdout(&pgflow_utc(db.url(), &["run", &id, "--attempts"]));
    let (_, attempts) = view.split_once("\nfailed attempts: 1\n").unwrap();
    let lines: Vec<&str> = attempts.lines().collect();
    assert_eq!(
        lines[1].split_whitespace().take(4).collect::<Vec<_>>(),
        ["0", "fetch", "1", "1"],
        "{view}"
    );
    let (_, retries) = view
        .split_once("\nretries: 1\n")
        .unwrap_or_else(|| panic!("{view}"));
    let lines: Vec<&str> = retries.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "RETRY", "RETRIED", "AT", "WAS", "ENDED", "AT", "STEP", "ERROR"
        ]
    );
    let words: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(words[0], "1");
    // The retry's time is three words: date, time of day, offset.
    assert_eq!(words[4], "failed", "{view}");
    assert!(lines[1].ends_with(" fetch  404 not found"), "{view}");
    let json: Value = serde_json::from_str(&stdout(&pgflow(
        db.url(),
        &["run", &id, "--attempts", "--json"],
    )))
    .unwrap();
    assert_eq!(json["run"]["retry_count"], json!(1));
    assert!(json["run"]["cancelled_at"].is_string());
    assert_eq!(json["attempts"][0]["run_retry"], json!(0));
    let retry = &json["retries"][0];
    let mut keys: Vec<&str> = retry
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "ended_at",
            "error_message",
            "failed_step_slug",
            "previous_status",
            "retried_at",
            "retry_number"
        ]
    );
    assert_eq!(retry["previous_status"], json!("failed"));

    // watch: a cancelled run has its own exit status.
    let output = pgflow(db.url(), &["watch", &id]);
    assert_eq!(output.status.code(), Some(5), "{output:?}");
    assert_eq!(stderr(&output), format!("error: run {id} was cancelled\n"));
    assert!(stdout_of(&output).trim_end().ends_with(" run:cancelled"));
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One step whose handler waits until it is cancelled or `release` is set.
fn slow(release: Arc<AtomicBool>, calls: Arc<AtomicU32>) -> Flow<Value> {
    let wait = step_fn("wait").handler(move |v: Value, ctx: StepContext| {
        let release = release.clone();
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            while !release.load(Ordering::SeqCst) && !ctx.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, StepError>(v)
        }
    });
    Flow::new("slow").timeout(60).step(wait).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_run_is_cancelled_and_retried_from_the_command_line() {
    let (db, client) = client().await;
    let pool = db.pool();
    let release = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let flow = slow(release.clone(), calls.clone());
    client.compile(&flow).await.unwrap();
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .unwrap();
    let run = client.start(&flow, &json!({"n": 1})).await.unwrap();
    let id = run.id().to_string();
    eventually("the handler runs", Duration::from_secs(30), async || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;

    let output = pgflow(db.url(), &["cancel", &id]);
    assert_eq!(stdout(&output), format!("cancelled run {id}\n"));
    let err = run.wait_timeout(Duration::from_secs(10)).await.unwrap_err();
    assert!(
        matches!(err, pgflow_client::Error::RunCancelled { .. }),
        "{err}"
    );
    // Whatever the handler reports after the cancel changes nothing.
    release.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&client, run.id()).await, RunStatus::Cancelled);

    let output = pgflow(db.url(), &["retry", &id]);
    assert_eq!(
        stdout(&output),
        format!("retried run {id} (retry 1): its unfinished steps start again\n")
    );
    let done = run.wait_timeout(Duration::from_secs(30)).await.unwrap();
    assert_eq!(done.output(), &json!({"wait": {"n": 1}}));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let output = pgflow(db.url(), &["watch", &id]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    worker.shutdown().await.unwrap();
    assert_consistent(pool).await;
}
