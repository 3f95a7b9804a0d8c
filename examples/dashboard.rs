//! The dashboard, embedded: a worker runs a few flows (one completes, one fails, one is still
//! resizing, one waits for a worker that never comes), and the dashboard shows them.
//!
//! ```text
//! cargo run --features throwaway,dashboard --example dashboard                  # renders every page once, exits
//! cargo run --features throwaway,dashboard --example dashboard -- --serve 600   # http://127.0.0.1:8080 for 10 minutes
//! cargo run --release --features throwaway,dashboard --example dashboard -- --scale 1000000
//! ```
//!
//! `--scale N` measures the runs page over N runs (inserted with `generate_series` into a
//! fresh database): the time of each filter's page through the Router, with migration 0013's
//! indexes and, as the reference measured in the same run, without them.
//!
//! With `DATABASE_URL` set it uses that server; without it, a throwaway PostgreSQL from the
//! binaries on this machine, deleted on exit.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use http_body_util::BodyExt;
use pgflow::dashboard::Dashboard;
use pgflow::prelude::*;
use pgflow::throwaway::{LocalDatabase, TestDatabase};
use serde_json::json;
use tower::ServiceExt;

#[derive(Debug, Parser)]
#[command(about = "pgflow's dashboard on a few example runs, or its runs page measured at scale")]
struct Args {
    /// Serve the dashboard (cancel and retry enabled) for this many seconds.
    #[arg(long, value_name = "SECONDS")]
    serve: Option<u64>,
    /// Where to serve it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Instead: time the runs page over this many runs.
    #[arg(long, value_name = "RUNS")]
    scale: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Album {
    name: String,
    images: Vec<String>,
}

#[step]
async fn list(album: &Album) -> Result<Vec<String>, StepError> {
    Ok(album.images.clone())
}

/// One task per image. `slow-*` images take a minute (the run stays started, its map step
/// part done); `corrupt*` ones fail both attempts.
#[step(map, depends_on = [list], max_attempts = 2, base_delay = 1, timeout = 120)]
async fn resize(image: String) -> Result<String, StepError> {
    if image.starts_with("corrupt") {
        return Err(StepError::new(format!(
            "{image}: not a PNG (bad magic bytes)"
        )));
    }
    let pause = if image.starts_with("slow") {
        60_000
    } else {
        150
    };
    tokio::time::sleep(Duration::from_millis(pause)).await;
    Ok(format!("thumb/{image}"))
}

#[step(depends_on = [list])]
async fn caption(album: &Album, list: Vec<String>) -> Result<String, StepError> {
    Ok(format!("{}: {} pictures", album.name, list.len()))
}

#[step(depends_on = [resize, caption])]
async fn publish(resize: Vec<String>, caption: String) -> Result<String, StepError> {
    Ok(format!("{caption}, {} thumbnails", resize.len()))
}

fn thumbnails() -> Flow<Album> {
    Flow::new("thumbnails")
        .step(list)
        .step(resize)
        .step(caption)
        .step(publish)
        .build()
}

#[step]
async fn report(day: &String) -> Result<String, StepError> {
    Ok(format!("report of {day}"))
}

/// A flow no worker of this example serves: its run shows on the stuck runs page.
fn nightly_report() -> Flow<String> {
    Flow::new("nightly_report").step(report).build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(runs) = args.scale {
        return scale(runs).await;
    }

    let db = LocalDatabase::connect().await?;
    let pool = db.pool().clone();
    let client = Client::new(pool.clone());
    client.install().await?;
    client.compile(&thumbnails()).await?;
    client.compile(&nightly_report()).await?;
    let worker = Worker::builder(pool.clone())
        .flow(thumbnails())
        .concurrency(8)
        .spawn()?;

    let album = |name: &str, images: &[&str]| Album {
        name: name.to_owned(),
        images: images.iter().map(ToString::to_string).collect(),
    };
    let done = client
        .start(
            &thumbnails(),
            &album("holiday", &["beach.png", "dunes.png", "sunset.png"]),
        )
        .await?;
    let failed = client
        .start(
            &thumbnails(),
            &album("scans", &["page1.png", "corrupt-page2.png"]),
        )
        .await?;
    let moving = client
        .start(
            &thumbnails(),
            &album(
                "party",
                &["cake.png", "slow-dance.png", "slow-toast.png", "guests.png"],
            ),
        )
        .await?;
    client
        .start(&nightly_report(), &"2026-12-01".to_owned())
        .await?;
    done.wait_timeout(Duration::from_secs(60)).await?;
    let _ = failed.wait_timeout(Duration::from_secs(60)).await; // it fails: that is the point
    println!(
        "runs: {} completed, {} failed, {} resizing",
        done.id(),
        failed.id(),
        moving.id()
    );

    let app = Dashboard::new(pool.clone()).allow_actions(true).router();
    for path in [
        "/runs".to_owned(),
        "/flows".to_owned(),
        format!("/runs/{}", done.id()),
        format!("/runs/{}", failed.id()),
        format!("/runs/{}", moving.id()),
        "/workers".to_owned(),
        "/schedules".to_owned(),
        "/stuck".to_owned(),
    ] {
        let (status, bytes, _) = get(&app, &path).await;
        println!("GET {path}: {status}, {bytes} bytes");
        assert_eq!(status, StatusCode::OK, "{path}");
    }

    if let Some(seconds) = args.serve {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        println!(
            "dashboard on http://{}/ for {seconds} s (cancel and retry enabled)",
            listener.local_addr()?
        );
        Dashboard::new(pool.clone())
            .allow_actions(true)
            .serve(listener, tokio::time::sleep(Duration::from_secs(seconds)))
            .await?;
    }
    // The slow images would keep the worker a minute: cancelling the run stops their handlers.
    client.cancel(moving.id()).await?;
    worker.shutdown().await?;
    db.close().await;
    Ok(())
}

/// A request into the Router: status, body size, time taken.
async fn get(app: &axum::Router, path: &str) -> (StatusCode, usize, Duration) {
    let started = Instant::now();
    let response = app
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, body.len(), started.elapsed())
}

/// `--scale`: the runs page over `runs` runs, with and without migration 0013's indexes.
async fn scale(runs: u32) -> Result<(), Box<dyn std::error::Error>> {
    // A database of its own: the reference drops indexes.
    let db = TestDatabase::new().await?;
    let pool = db.pool().clone();
    let client = Client::new(pool.clone());
    client.compile(&thumbnails()).await?;
    client.compile(&nightly_report()).await?;
    let started = Instant::now();
    // A year of runs, evenly spread; 2% failed, 1% cancelled, the newest 100 started.
    sqlx::query(
        "INSERT INTO pgflow.runs (flow_slug, status, input, started_at, completed_at, failed_at,
                                  cancelled_at)
         SELECT CASE WHEN i % 4 = 0 THEN 'nightly_report' ELSE 'thumbnails' END, s.status,
                jsonb_build_object('album', i), s.at,
                CASE WHEN s.status = 'completed' THEN s.at + interval '2 seconds' END,
                CASE WHEN s.status = 'failed' THEN s.at + interval '2 seconds' END,
                CASE WHEN s.status = 'cancelled' THEN s.at + interval '2 seconds' END
           FROM generate_series(1, $1) AS i,
                LATERAL (SELECT now() - i * (interval '365 days' / $1) AS at,
                                CASE WHEN i <= 100 THEN 'started'
                                     WHEN i % 50 = 0 THEN 'failed'
                                     WHEN i % 99 = 0 THEN 'cancelled'
                                     ELSE 'completed' END AS status) AS s",
    )
    .bind(i64::from(runs))
    .execute(&pool)
    .await?;
    sqlx::raw_sql("VACUUM ANALYZE pgflow.runs")
        .execute(&pool)
        .await?;
    println!(
        "inserted {runs} runs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let deep: String = sqlx::query_scalar(
        "SELECT to_char((now() - interval '200 days') AT TIME ZONE 'UTC',
                        'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') || '~ffffffff-ffff-ffff-ffff-ffffffffffff'",
    )
    .fetch_one(&pool)
    .await?;
    let filters = [
        "".to_owned(),
        "status=failed".to_owned(),
        "flow=thumbnails".to_owned(),
        "flow=nightly_report&status=cancelled".to_owned(),
        format!("before={deep}"),
        "since=2020-01-01".to_owned(),
    ];
    let app = pgflow::dashboard::router(pool.clone());
    let with = measure(&app, &filters, 10).await;
    sqlx::raw_sql(
        "DROP INDEX pgflow.idx_runs_status_started_at;
         DROP INDEX pgflow.idx_runs_flow_status_started_at;
         ANALYZE pgflow.runs;",
    )
    .execute(&pool)
    .await?;
    let without = measure(&app, &filters, 3).await;
    println!(
        "\nruns page over {runs} runs, median (max) ms through the Router, debug builds are slower:"
    );
    println!(
        "{:<44} {:>18} {:>26}",
        "filter", "with 0013's indexes", "without (the reference)"
    );
    for ((filter, a), (_, b)) in with.iter().zip(&without) {
        let shown = if filter.is_empty() {
            "(none)"
        } else {
            filter.as_str()
        };
        let shown: String = shown.chars().take(44).collect();
        println!(
            "{shown:<44} {:>10.1} ({:>6.1}) {:>17.1} ({:>6.1})",
            a.0, a.1, b.0, b.1
        );
    }
    println!(
        "{}",
        json!({"runs": runs, "with_ms": with, "without_ms": without})
    );
    pool.close().await;
    drop(db);
    Ok(())
}

/// Per filter: the median and the largest time of `reps` page loads, after two unmeasured.
async fn measure(app: &axum::Router, filters: &[String], reps: usize) -> Vec<(String, (f64, f64))> {
    let mut out = Vec::new();
    for filter in filters {
        let path = format!("/runs?{filter}");
        for _ in 0..2 {
            let (status, _, _) = get(app, &path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
        }
        let mut times: Vec<f64> = Vec::with_capacity(reps);
        for _ in 0..reps {
            times.push(get(app, &path).await.2.as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        out.push((
            filter.clone(),
            (times[times.len() / 2], times[times.len() - 1]),
        ));
    }
    out
}
