//! The concurrency limit holds across all flows of a worker, measured inside the handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::Worker;
use serde_json::json;

use crate::support::{compile, database, finished, start};

/// Counts handlers running at once and remembers the most seen.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
    calls: AtomicUsize,
}

impl Gauge {
    async fn hold(&self, pause: Duration) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(pause).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A root map step over the input array whose handler holds the gauge for a while.
fn fan_out(slug: &str, gauge: &Arc<Gauge>) -> Flow<Vec<u32>> {
    let gauge = Arc::clone(gauge);
    let work = step_fn("work")
        .map_over_input()
        .handler(move |x: u32, _ctx: StepContext| {
            let gauge = Arc::clone(&gauge);
            async move {
                gauge.hold(Duration::from_millis(20)).await;
                Ok::<_, StepError>(x)
            }
        });
    Flow::new(slug).step(work).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_handlers_than_the_limit_across_flows() {
    let db = database().await;
    let pool = db.pool();
    let gauge = Arc::new(Gauge::default());
    let first = fan_out("fan_a", &gauge);
    let second = fan_out("fan_b", &gauge);
    compile(pool, &first).await;
    compile(pool, &second).await;

    let worker = Worker::builder(pool.clone())
        .flow(first)
        .flow(second)
        .concurrency(4)
        .batch_size(3)
        .spawn()
        .expect("worker");

    let input = json!((0..40).collect::<Vec<u32>>());
    let mut runs = Vec::new();
    for _ in 0..2 {
        runs.push(start(pool, "fan_a", input.clone()).await);
        runs.push(start(pool, "fan_b", input.clone()).await);
    }
    for run in runs {
        let (status, output) = finished(pool, run, Duration::from_secs(60)).await;
        assert_eq!(status, "completed");
        assert_eq!(output, Some(json!({ "work": input })));
    }
    worker.shutdown().await.expect("shutdown");

    let max = gauge.max.load(Ordering::SeqCst);
    eprintln!(
        "concurrency 4: at most {max} handlers at once over {} calls",
        gauge.calls.load(Ordering::SeqCst)
    );
    assert_eq!(gauge.calls.load(Ordering::SeqCst), 160);
    assert!(max <= 4, "{max} handlers ran at once with a limit of 4");
    assert!(
        max >= 2,
        "the worker should run tasks in parallel (max {max})"
    );
}
