//! Feature `metrics`: a worker's counters, histograms and gauges, as an operator scrapes them from
//! the dashboard's `/metrics` route (feature `prometheus`) over HTTP.
//!
//! A test binary of its own: the worker records from Tokio tasks on every thread of the runtime,
//! which only a global recorder sees, and a process has one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::throwaway::TestDatabase;
use pgflow_client::{Client, Worker, metric_names};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

const WITHIN: Duration = Duration::from_secs(30);

/// `GET /metrics` over a real socket, as Prometheus does.
async fn scrape(address: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: pgflow\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of one series (`name{labels}` exactly as rendered), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == series).then(|| value.parse().expect("a number"))
    })
}

fn task(name: &str, flow: &str, step: &str) -> String {
    format!("{name}{{flow=\"{flow}\",step=\"{step}\"}}")
}

/// Scrapes until `series` has `expected`, or fails with the last text.
async fn wait_for(address: std::net::SocketAddr, series: &str, expected: f64) -> String {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let text = scrape(address).await;
        if value(&text, series) == Some(expected) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {expected}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_counts_its_tasks_and_samples_its_queues() {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .expect("the process's recorder");
    let db = TestDatabase::new().await.expect("test database");
    let pool = db.pool();
    let client = Client::new(pool.clone());

    // The dashboard serves the recorder, as an application mounts it.
    let router = pgflow::dashboard::Dashboard::new(pool.clone())
        .prometheus(handle)
        .router();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await });

    // Input 0 fails for good at once; 1 fails once, then completes; others complete.
    let calls = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let work = step_fn("work")
        .max_attempts(3)
        .handler(move |n: u32, _ctx: StepContext| {
            let first_of_one = n == 1 && counted.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                match n {
                    0 => Err(StepError::new("refused").no_retry()),
                    // Retried at once: the handler picks no delay.
                    1 if first_of_one => Err(StepError::new("flaky").retry_after(Duration::ZERO)),
                    _ => Ok(n),
                }
            }
        });
    let after = step_fn("after")
        .depends_on(&work)
        .handler(|_: u32, n: u32, _ctx: StepContext| async move { Ok::<_, StepError>(n) });
    let flow: Flow<u32> = Flow::new("metered").step(work).step(after).build();
    client.compile(&flow).await.expect("compile");

    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .concurrency(4)
        .spawn()
        .expect("worker");
    let failed = client.start(&flow, &0).await.expect("start");
    let retried = client.start(&flow, &1).await.expect("start");
    let plain = client.start(&flow, &2).await.expect("start");
    failed
        .wait_timeout(WITHIN)
        .await
        .expect_err("fails for good");
    retried.wait_timeout(WITHIN).await.expect("completes");
    plain.wait_timeout(WITHIN).await.expect("completes");
    // A completion is counted once the engine has applied it, a moment after the run ends.
    let text = wait_for(
        address,
        &task(metric_names::TASKS_COMPLETED, "metered", "after"),
        2.0,
    )
    .await;

    let count = |name: &str, step: &str| value(&text, &task(name, "metered", step));
    assert_eq!(
        count(metric_names::TASKS_STARTED, "work"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        count(metric_names::TASKS_COMPLETED, "work"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        count(metric_names::TASKS_RETRIED, "work"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        count(metric_names::TASKS_FAILED, "work"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        count(metric_names::TASKS_STARTED, "after"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(count(metric_names::TASKS_RETRIED, "after"), None, "{text}");
    assert_eq!(count(metric_names::TASKS_FAILED, "after"), None, "{text}");
    assert!(!text.contains(metric_names::TASKS_CANCELLED), "{text}");
    // Every attempt's handler is timed; only first attempts have a queue wait.
    let histogram_count = |name: &str, step: &str| {
        value(
            &text,
            &format!("{name}_count{{flow=\"metered\",step=\"{step}\"}}"),
        )
    };
    assert_eq!(
        histogram_count(metric_names::TASK_DURATION, "work"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        histogram_count(metric_names::TASK_DURATION, "after"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        histogram_count(metric_names::TASK_QUEUE_WAIT, "work"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        histogram_count(metric_names::TASK_QUEUE_WAIT, "after"),
        Some(2.0),
        "{text}"
    );
    let waited = value(
        &text,
        &format!(
            "{}_sum{{flow=\"metered\",step=\"work\"}}",
            metric_names::TASK_QUEUE_WAIT
        ),
    )
    .expect("a sum");
    assert!((0.0..WITHIN.as_secs_f64()).contains(&waited), "{text}");
    assert_eq!(
        value(&text, metric_names::WORKER_SLOTS),
        Some(4.0),
        "{text}"
    );
    assert!(text.contains("# HELP pgflow_tasks_started_total"), "{text}");
    worker.shutdown().await.expect("shutdown");
    let text = scrape(address).await;
    assert_eq!(
        value(&text, metric_names::WORKER_SLOTS),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, metric_names::WORKER_SLOTS_IN_USE),
        Some(0.0),
        "{text}"
    );

    // The gauges: a worker with one slot, its handler held, and two more messages waiting.
    let gate = Arc::new(Semaphore::new(0));
    let held = Arc::clone(&gate);
    let hold = step_fn("hold").handler(move |_: u32, _ctx: StepContext| {
        let held = Arc::clone(&held);
        async move {
            held.acquire().await.expect("gate").forget();
            Ok::<_, StepError>(0)
        }
    });
    let gated: Flow<u32> = Flow::new("gated").step(hold).build();
    client.compile(&gated).await.expect("compile");
    let mut runs = Vec::new();
    for n in 0..3 {
        runs.push(client.start(&gated, &n).await.expect("start"));
    }
    let worker = Worker::builder(pool.clone())
        .flow(gated.clone())
        .concurrency(1)
        .spawn()
        .expect("worker");
    let text = wait_for(address, "pgflow_queue_depth{flow=\"gated\"}", 2.0).await;
    let age = value(
        &text,
        "pgflow_queue_oldest_message_age_seconds{flow=\"gated\"}",
    )
    .expect("the age gauge");
    assert!((0.0..WITHIN.as_secs_f64()).contains(&age), "{text}");
    assert_eq!(
        value(&text, metric_names::WORKER_SLOTS_IN_USE),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, metric_names::WORKER_SLOTS),
        Some(1.0),
        "{text}"
    );
    gate.add_permits(3);
    for run in runs {
        run.wait_timeout(WITHIN).await.expect("completes");
    }
    // Sampled every few seconds: the queue empties in the next sample.
    wait_for(address, "pgflow_queue_depth{flow=\"gated\"}", 0.0).await;
    worker.shutdown().await.expect("shutdown");
}
