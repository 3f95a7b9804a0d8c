//! The pages over HTTP, straight into the Router: what they show, how they refuse, the
//! actions, paging by key, the mount point and the live stream.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use pgflow::dashboard::{Dashboard, router};
use serde_json::json;
use tower::ServiceExt;
use uuid::Uuid;

use super::{HOSTILE_ERROR, HOSTILE_INPUT, complete, get, request, runs_in_every_state, status_of};
use crate::support;

#[tokio::test]
async fn every_page_shows_what_the_database_holds() {
    let db = support::database().await;
    let runs = runs_in_every_state(db.pool()).await;
    let app = router(db.pool().clone());

    let (status, page) = get(&app, "/runs").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    for run in [
        runs.completed,
        runs.failed,
        runs.cancelled,
        runs.started,
        runs.fresh,
    ] {
        assert!(page.contains(&run.to_string()), "run {run} listed");
    }
    // Started in the last day, by status: 2 started, 1 each of the others.
    for (status, count) in [
        ("started", 2),
        ("completed", 1),
        ("failed", 1),
        ("cancelled", 1),
    ] {
        let card = format!("data-count=\"{status}\"");
        let at = page
            .find(&card)
            .unwrap_or_else(|| panic!("no {status} card"));
        let shown = &page[at..at + 200];
        assert!(
            shown.contains(&format!("<div class=\"n\">{count}</div>")),
            "{status}: {shown}"
        );
    }

    let (_, failed_only) = get(&app, "/runs?status=failed").await;
    assert!(failed_only.contains(&runs.failed.to_string()));
    assert!(!failed_only.contains(&runs.completed.to_string()));

    let (status, run) = get(&app, &format!("/runs/{}", runs.started)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        run.contains("data-step=\"items\" data-status=\"started\""),
        "{run}"
    );
    assert!(run.contains("1/3"), "map progress shown");

    let (status, failed) = get(&app, &format!("/runs/{}", runs.failed)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        failed.contains("first: card declined"),
        "each failed attempt's error"
    );

    let (status, flows) = get(&app, "/flows/shop").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(flows.matches("class=\"edge\"").count(), 4, "{flows}");
    assert!(flows.contains("max_attempts 2"));

    for page in ["/flows", "/workers", "/schedules", "/stuck", "/"] {
        let (status, body) = get(&app, page).await;
        assert_eq!(status, StatusCode::OK, "{page}: {body}");
    }
    // A skipped step: its own colour, and why.
    let skipped = super::skipped_run(db.pool()).await;
    let (status, page) = get(&app, &format!("/runs/{skipped}")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("data-step=\"gift\" data-status=\"skipped\""),
        "{page}"
    );
    let at = page.find("data-step=\"gift\"").expect("gift's node");
    let node = &page[at..at + page[at..].find("</g>").expect("node ends")];
    assert!(
        node.contains("fill=\"#8b5cf6\"") && node.contains("st-skipped"),
        "{node}"
    );
    assert!(page.contains("condition_unmet"));
    // No worker serves shop: the started runs are stuck.
    let (_, stuck) = get(&app, "/stuck").await;
    assert!(stuck.contains("no_live_worker") && stuck.contains(&runs.fresh.to_string()));
}

#[tokio::test]
async fn hostile_inputs_and_errors_are_shown_as_text() {
    let db = support::database().await;
    let runs = runs_in_every_state(db.pool()).await;
    let app = router(db.pool().clone());
    let (status, page) = get(&app, &format!("/runs/{}", runs.failed)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!page.contains(HOSTILE_INPUT) && !page.contains(HOSTILE_ERROR));
    assert!(page.contains("&lt;script&gt;window.__pwned = 1&lt;/script&gt;"));
    assert!(page.contains("&lt;img src=x onerror=&quot;window.__pwned=2&quot;&gt;"));
    // The one script of the page is the dashboard's own.
    assert_eq!(page.matches("<script").count(), 1);
    assert!(page.contains("<script>const PGFLOW_LIVE"));
}

#[tokio::test]
async fn bad_requests_get_a_page_that_says_why() {
    let db = support::database().await;
    let app = router(db.pool().clone());
    for (path, code, says) in [
        (
            "/runs?status=done",
            StatusCode::BAD_REQUEST,
            "is not a run status",
        ),
        (
            "/runs?limit=abc",
            StatusCode::BAD_REQUEST,
            "`limit` must be a whole number",
        ),
        ("/runs?limit=1&limit=2", StatusCode::BAD_REQUEST, "limit"),
        (
            "/runs?since=yesterday",
            StatusCode::BAD_REQUEST,
            "is not a time",
        ),
        (
            "/runs?before=x",
            StatusCode::BAD_REQUEST,
            "`before` must be a position",
        ),
        (
            "/runs?flow=%3Cscript%3E",
            StatusCode::BAD_REQUEST,
            "is not a flow slug",
        ),
        (
            "/runs/not-a-uuid",
            StatusCode::BAD_REQUEST,
            "is not a run id",
        ),
        (
            "/runs/00000000-0000-0000-0000-000000000000",
            StatusCode::NOT_FOUND,
            "no run",
        ),
        (
            "/runs/00000000-0000-0000-0000-000000000000/live",
            StatusCode::NOT_FOUND,
            "no run",
        ),
        ("/flows/no_such_flow", StatusCode::NOT_FOUND, "no flow"),
        (
            "/flows/bad%20slug",
            StatusCode::BAD_REQUEST,
            "is not a flow slug",
        ),
        ("/nothing/here", StatusCode::NOT_FOUND, "no such page"),
    ] {
        let (status, page) = get(&app, path).await;
        assert_eq!(status, code, "{path}: {page}");
        assert!(page.contains(says), "{path}: {page}");
        assert!(page.starts_with("<!DOCTYPE html>"), "{path}: an HTML page");
    }
    // A hostile parameter comes back escaped in the message.
    let (_, page) = get(&app, "/runs?status=%3Cb%3Ex").await;
    assert!(
        page.contains("&lt;b&gt;x") && !page.contains("<b>x"),
        "{page}"
    );
}

fn post(path: &str, origin: Option<&str>) -> Request<Body> {
    let mut request = Request::post(path).header(header::HOST, "dash.example");
    if let Some(origin) = origin {
        request = request.header(header::ORIGIN, origin);
    }
    request.body(Body::empty()).expect("request")
}

#[tokio::test]
async fn actions_exist_only_when_the_app_enables_them() {
    let db = support::database().await;
    let runs = runs_in_every_state(db.pool()).await;
    let read_only = router(db.pool().clone());
    let (status, _) = request(
        &read_only,
        post(&format!("/runs/{}/cancel", runs.fresh), None),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = request(
        &read_only,
        post(&format!("/runs/{}/retry", runs.failed), None),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(status_of(db.pool(), runs.fresh).await, "started");
    assert_eq!(status_of(db.pool(), runs.failed).await, "failed");
    let (_, page) = get(&read_only, &format!("/runs/{}", runs.fresh)).await;
    assert!(
        !page.contains("Cancel run"),
        "no button on a read-only dashboard"
    );

    let acting = Dashboard::new(db.pool().clone())
        .allow_actions(true)
        .router();
    let (_, page) = get(&acting, &format!("/runs/{}", runs.fresh)).await;
    assert!(page.contains("Cancel run"));
    // A form on another site, posted by an operator's browser: refused.
    let cancel = format!("/runs/{}/cancel", runs.fresh);
    let (status, _) = request(&acting, post(&cancel, Some("https://evil.example"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let mut cross = post(&cancel, None);
    cross
        .headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    assert_eq!(request(&acting, cross).await.0, StatusCode::FORBIDDEN);
    assert_eq!(status_of(db.pool(), runs.fresh).await, "started");

    let response = acting
        .clone()
        .oneshot(post(&cancel, Some("http://dash.example")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        response.headers()[header::LOCATION],
        format!("/runs/{}?done=cancelled", runs.fresh).as_str()
    );
    assert_eq!(status_of(db.pool(), runs.fresh).await, "cancelled");

    let retry = format!("/runs/{}/retry", runs.failed);
    let (status, _) = request(&acting, post(&retry, Some("http://dash.example"))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(status_of(db.pool(), runs.failed).await, "started");
    // A completed run cannot be retried: 409, and it stays completed.
    let retry = format!("/runs/{}/retry", runs.completed);
    let (status, page) = request(&acting, post(&retry, None)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert_eq!(status_of(db.pool(), runs.completed).await, "completed");
}

#[tokio::test]
async fn paging_by_key_shows_every_run_once_in_order() {
    let db = support::database().await;
    super::shop(db.pool()).await;
    // 23 runs, several sharing a start time: the run id breaks the ties.
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO pgflow.runs (flow_slug, status, input, started_at)
         SELECT 'shop', 'started', '{}', timestamptz '2026-01-01' + (i / 3) * interval '1 minute'
           FROM generate_series(1, 23) AS i
         RETURNING run_id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let expected: Vec<Uuid> =
        sqlx::query_scalar("SELECT run_id FROM pgflow.runs ORDER BY started_at DESC, run_id DESC")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(expected.len(), ids.len());
    let app = router(db.pool().clone());
    let listed = |page: &str| -> Vec<Uuid> {
        page.match_indices("<tr data-run=\"")
            .map(|(at, m)| page[at + m.len()..at + m.len() + 36].parse().unwrap())
            .collect()
    };
    let link = |page: &str, rel: &str| -> Option<String> {
        let marker = format!("rel=\"{rel}\" href=\"");
        let at = page.find(&marker)? + marker.len();
        let end = page[at..].find('"')? + at;
        Some(page[at..end].replace("&amp;", "&"))
    };
    let mut seen = Vec::new();
    let mut path = "/runs?limit=5".to_owned();
    let mut pages = Vec::new();
    loop {
        let (status, page) = get(&app, &path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        seen.extend(listed(&page));
        pages.push(page.clone());
        match link(&page, "next") {
            Some(next) => path = next,
            None => break,
        }
    }
    assert_eq!(seen, expected, "every run once, newest first");
    assert_eq!(pages.len(), 5);
    // And back: the "newer" link of the last page shows the page before it.
    let newer = link(pages.last().unwrap(), "prev").expect("a newer link");
    let (_, page) = get(&app, &newer).await;
    assert_eq!(listed(&page), expected[15..20]);
}

#[tokio::test]
async fn links_follow_the_mount_point() {
    let db = support::database().await;
    let runs = runs_in_every_state(db.pool()).await;
    let app = axum::Router::new().nest("/admin/pgflow", router(db.pool().clone()));
    let (status, page) = get(&app, "/admin/pgflow").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&format!("href=\"/admin/pgflow/runs/{}\"", runs.started)));
    assert!(page.contains("href=\"/admin/pgflow/flows\""));
    let (_, run) = get(&app, &format!("/admin/pgflow/runs/{}", runs.started)).await;
    assert!(run.contains(&format!(
        "\"url\":\"/admin/pgflow/runs/{}/live\"",
        runs.started
    )));
}

/// Reads frames of an event stream until `text` holds `wanted`.
async fn until(body: &mut Body, text: &mut String, wanted: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !text.contains(wanted) {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("no `{wanted}` in {text}"))
            .expect("stream open")
            .expect("frame");
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
}

#[tokio::test]
async fn the_live_stream_survives_its_listening_connection_being_killed() {
    let db = support::database().await;
    let runs = runs_in_every_state(db.pool()).await;
    let app = router(db.pool().clone());
    let response = app
        .oneshot(
            Request::get(format!("/runs/{}/live", runs.started))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut text = String::new();
    until(
        &mut body,
        &mut text,
        "\"slug\":\"charge\",\"status\":\"started\"",
    )
    .await;
    // The dashboard's LISTEN connection dies (a restart, an idle-connection reaper).
    let mut killed = 0;
    for _ in 0..100 {
        killed = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND query ILIKE 'LISTEN%') AS k",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if killed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        killed > 0,
        "the dashboard listens on a connection of its own"
    );
    complete(db.pool(), runs.started, "charge", 0, json!({"charged": 1})).await;
    until(
        &mut body,
        &mut text,
        "\"slug\":\"charge\",\"status\":\"completed\"",
    )
    .await;
}

#[tokio::test]
async fn the_live_stream_sends_the_new_state_when_the_run_moves() {
    let db = support::database().await;
    let runs = runs_in_every_state(db.pool()).await;
    let app = router(db.pool().clone());
    let response = app
        .oneshot(
            Request::get(format!("/runs/{}/live", runs.started))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body();
    let mut text = String::new();
    until(
        &mut body,
        &mut text,
        "\"slug\":\"charge\",\"status\":\"started\"",
    )
    .await;
    complete(db.pool(), runs.started, "charge", 0, json!({"charged": 1})).await;
    until(
        &mut body,
        &mut text,
        "\"slug\":\"charge\",\"status\":\"completed\"",
    )
    .await;
    assert!(text.contains("event: state"));
}
