//! The dashboard in a real browser: headless Chromium (Debian's `chromium`) driven over
//! WebDriver by its `chromedriver`. What a person would see: the run page's DAG in the right
//! colours, a colour changing live while the run moves (no reload), a cancel clicked and
//! taking effect, hostile text shown as text.
//!
//! The browser must be there: `.ci/run` installs it, and a missing one fails the test rather
//! than skipping it. `PGFLOW_CHROMIUM` and `PGFLOW_CHROMEDRIVER` name other binaries. With
//! `PGFLOW_DASHBOARD_SCREENSHOTS=<dir>` the test also saves a screenshot of each page there
//! (docs/dashboard/ holds the README's).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use pgflow::dashboard::Dashboard;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Runs, complete, runs_in_every_state, status_of};
use crate::support;

/// Kills chromedriver (and with it the browser) however the test ends.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binary(variable: &str, candidates: &[&str]) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        return PathBuf::from(path);
    }
    for candidate in candidates {
        let path = Path::new(candidate);
        if path.is_file() {
            return path.to_owned();
        }
    }
    panic!(
        "the dashboard's browser test needs {} (tried {candidates:?}; set {variable} to another \
         path): install Debian's `chromium` and `chromium-driver` packages, as .ci/run does",
        candidates[0]
    );
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts chromedriver and a headless Chromium session.
async fn browser() -> (Driver, Client) {
    let chromium = binary(
        "PGFLOW_CHROMIUM",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    );
    let chromedriver = binary(
        "PGFLOW_CHROMEDRIVER",
        &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
    );
    let port = free_port();
    let driver = Driver(
        Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", chromedriver.display())),
    );
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": chromium,
            // No sandbox: CI runs as root, where Chromium refuses to start with one.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--hide-scrollbars"],
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => return (driver, client),
            Err(err) if Instant::now() > deadline => {
                panic!(
                    "no WebDriver session from {} in 30 s: {err}",
                    chromedriver.display()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Each step's fill on the page open in `client`, by slug.
async fn fills(client: &Client) -> Value {
    client
        .execute(
            "const out = {};
             document.querySelectorAll('svg.dag g.node').forEach(g => {
               out[g.getAttribute('data-step')] = g.querySelector('rect').getAttribute('fill');
             });
             return out;",
            vec![],
        )
        .await
        .expect("script runs")
}

fn colour(status: &str) -> &'static str {
    match status {
        "created" => "#9ca3af",
        "started" => "#2563eb",
        "completed" => "#16a34a",
        "failed" => "#dc2626",
        "cancelled" => "#b45309",
        "skipped" => "#8b5cf6",
        other => panic!("no colour for {other}"),
    }
}

fn expected(steps: &[(&str, &str)]) -> Value {
    steps
        .iter()
        .map(|(step, status)| ((*step).to_owned(), Value::from(colour(status))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Polls `what` in the browser until it equals `wanted`.
async fn eventually(client: &Client, script: &str, wanted: &Value, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = client.execute(script, vec![]).await.expect("script runs");
        if &now == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {now}, not {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(client: &Client, name: &str) {
    let Some(dir) = std::env::var_os("PGFLOW_DASHBOARD_SCREENSHOTS") else {
        return;
    };
    let png = client.screenshot().await.expect("screenshot");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).expect("screenshot saved");
}

#[tokio::test]
async fn a_person_in_chromium_sees_runs_coloured_live_and_cancels_one() {
    let db = support::database().await;
    let runs: Runs = runs_in_every_state(db.pool()).await;
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Dashboard::new(db.pool().clone())
            .allow_actions(true)
            .serve(listener, async move { drop(stopped.await) }),
    );
    let (_driver, client) = browser().await;
    let url = |path: &str| format!("http://{address}{path}");

    // The runs list: every run, its status as a badge.
    client.goto(&url("/runs")).await.unwrap();
    let rows = client
        .find_all(Locator::Css("table#runs tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    let row = client
        .find(Locator::Css(&format!(
            "tr[data-run='{}'] .badge",
            runs.failed
        )))
        .await
        .unwrap();
    assert_eq!(row.text().await.unwrap(), "failed");
    screenshot(&client, "runs").await;

    // Each run's DAG in its steps' colours.
    for (run, steps) in [
        (
            runs.completed,
            [
                ("validate", "completed"),
                ("items", "completed"),
                ("charge", "completed"),
                ("ship", "completed"),
            ],
        ),
        (
            runs.failed,
            [
                ("validate", "failed"),
                ("items", "created"),
                ("charge", "created"),
                ("ship", "created"),
            ],
        ),
        (
            runs.cancelled,
            [
                ("validate", "completed"),
                ("items", "cancelled"),
                ("charge", "cancelled"),
                ("ship", "created"),
            ],
        ),
    ] {
        client.goto(&url(&format!("/runs/{run}"))).await.unwrap();
        assert_eq!(fills(&client).await, expected(&steps), "run {run}");
        if run == runs.failed {
            // Hostile input and errors are text on the page, and none of them ran.
            let pwned = client
                .execute("return window.__pwned === undefined", vec![])
                .await
                .unwrap();
            assert_eq!(pwned, Value::Bool(true), "a hostile script ran");
            let shown = client
                .find(Locator::Css("pre.json"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(shown.contains(super::HOSTILE_INPUT), "{shown}");
            let attempts = client
                .find(Locator::Css("table#attempts"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(
                attempts.contains("first: card declined")
                    && attempts.contains(super::HOSTILE_ERROR)
            );
            screenshot(&client, "run-failed").await;
        }
    }

    let skipped = super::skipped_run(db.pool()).await;
    client
        .goto(&url(&format!("/runs/{skipped}")))
        .await
        .unwrap();
    assert_eq!(
        fills(&client).await,
        expected(&[("check", "started"), ("gift", "skipped")])
    );

    // A run moving while its page is open: the colours change without a reload.
    client
        .goto(&url(&format!("/runs/{}", runs.started)))
        .await
        .unwrap();
    assert_eq!(
        fills(&client).await,
        expected(&[
            ("validate", "completed"),
            ("items", "started"),
            ("charge", "started"),
            ("ship", "created")
        ])
    );
    let progress =
        "return document.querySelector(\"g.node[data-step='items'] text.step-status\").textContent";
    assert_eq!(
        client.execute(progress, vec![]).await.unwrap(),
        json!("started 1/3")
    );
    screenshot(&client, "run").await;
    eventually(
        &client,
        "return document.body.getAttribute('data-live')",
        &json!("open"),
        "live stream open",
    )
    .await;
    client
        .execute("window.__same_page = 42", vec![])
        .await
        .unwrap();
    complete(db.pool(), runs.started, "charge", 0, json!({"charged": 7})).await;
    let charge =
        "return document.querySelector(\"g.node[data-step='charge'] rect\").getAttribute('fill')";
    eventually(
        &client,
        charge,
        &json!(colour("completed")),
        "charge turns green",
    )
    .await;
    complete(db.pool(), runs.started, "items", 1, json!("B")).await;
    eventually(&client, progress, &json!("started 2/3"), "map progress").await;
    complete(db.pool(), runs.started, "items", 2, json!("C")).await;
    complete(db.pool(), runs.started, "ship", 0, json!({"shipped": true})).await;
    let run_status = "return document.getElementById('run-status').textContent";
    eventually(
        &client,
        run_status,
        &json!("completed"),
        "the run completes on screen",
    )
    .await;
    assert_eq!(
        fills(&client).await,
        expected(&[
            ("validate", "completed"),
            ("items", "completed"),
            ("charge", "completed"),
            ("ship", "completed")
        ])
    );
    let same = client
        .execute("return window.__same_page", vec![])
        .await
        .unwrap();
    assert_eq!(same, json!(42), "the page was reloaded");

    // Cancel, clicked.
    client
        .goto(&url(&format!("/runs/{}", runs.fresh)))
        .await
        .unwrap();
    // Under a loaded CI machine a WebDriver click on a page that has just loaded was seen to
    // be dropped once (the form never posted): a person clicks again. The post itself is
    // checked below, by its redirect and the run's status in the database.
    for attempt in 1..=3 {
        client
            .find(Locator::Css("button#cancel"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let posted = Instant::now() + Duration::from_secs(5);
        while Instant::now() < posted
            && !client
                .current_url()
                .await
                .unwrap()
                .as_str()
                .contains("done=")
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .contains("done=")
        {
            break;
        }
        assert!(attempt < 3, "three clicks on Cancel never posted the form");
    }
    eventually(
        &client,
        run_status,
        &json!("cancelled"),
        "the page shows the run cancelled",
    )
    .await;
    assert!(
        client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .ends_with("?done=cancelled")
    );
    assert_eq!(status_of(db.pool(), runs.fresh).await, "cancelled");
    let notice = client
        .find(Locator::Css(".notice"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(notice, "The run was cancelled.");

    for page in ["flows", "workers", "schedules", "stuck"] {
        client.goto(&url(&format!("/{page}"))).await.unwrap();
        let title = client
            .find(Locator::Css("h1"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!title.is_empty(), "{page}");
        screenshot(&client, page).await;
    }
    let unknown = Uuid::nil();
    client
        .goto(&url(&format!("/runs/{unknown}")))
        .await
        .unwrap();
    let title = client
        .find(Locator::Css("h1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(title, "404 Not Found");

    client.close().await.unwrap();
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
