//! `pgflow dashboard`: serves the pages on its address, read-only unless told, and stops on
//! Ctrl-C even while a run page's live stream is open.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::runs_in_every_state;
use crate::support;

type Http = Client<HttpConnector, Empty<Bytes>>;

async fn send(http: &Http, method: Method, url: &str) -> (StatusCode, String) {
    let response = http
        .request(
            Request::builder()
                .method(method)
                .uri(url)
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .expect("the dashboard answers");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn pgflow_dashboard_serves_read_only_and_stops_on_ctrl_c() {
    let db = support::database().await;
    let runs = runs_in_every_state(db.pool()).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .args([
            "dashboard",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            db.url(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("pgflow runs");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .expect("a first line");
    // "dashboard on http://127.0.0.1:PORT/ (read-only); Ctrl-C stops it"
    assert!(first.contains("(read-only)"), "{first}");
    let base = first
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .expect("the address")
        .trim_end_matches('/')
        .to_owned();
    let http: Http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());

    let (status, page) = send(&http, Method::GET, &format!("{base}/runs")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&runs.started.to_string()));
    let cancel = format!("{base}/runs/{}/cancel", runs.started);
    let (status, _) = send(&http, Method::POST, &cancel).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(super::status_of(db.pool(), runs.started).await, "started");

    // A live stream stays open; Ctrl-C still stops the server, after its grace.
    let live = http
        .request(
            Request::get(format!("{base}/runs/{}/live", runs.started))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pgflow dashboard still runs 15 s after Ctrl-C");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}");
    drop(live);
}
