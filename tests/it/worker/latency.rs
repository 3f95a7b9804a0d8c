//! Dispatch latency: from a handler returning to its dependent's handler starting, through the
//! report, the engine, the notification and the next read. Printed, not asserted as a time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::Worker;
use serde_json::json;
use uuid::Uuid;

use crate::support::{compile, database, finished, start};

/// (run, step number, handler start, handler end)
type Marks = Arc<Mutex<Vec<(Uuid, u32, Instant, Instant)>>>;

fn mark(marks: &Marks, ctx: &StepContext, step: u32, began: Instant) {
    marks
        .lock()
        .expect("marks")
        .push((ctx.run_id(), step, began, Instant::now()));
}

/// Five steps in a chain, each noting when it ran.
fn chain(marks: &Marks) -> Flow<u32> {
    let m = Arc::clone(marks);
    let s1 = step_fn("s1").handler(move |n: u32, ctx: StepContext| {
        let began = Instant::now();
        mark(&m, &ctx, 1, began);
        async move { Ok::<_, StepError>(n) }
    });
    let m = Arc::clone(marks);
    let s2 = step_fn("s2")
        .depends_on(&s1)
        .handler(move |_n: u32, x: u32, ctx: StepContext| {
            mark(&m, &ctx, 2, Instant::now());
            async move { Ok::<_, StepError>(x + 1) }
        });
    let m = Arc::clone(marks);
    let s3 = step_fn("s3")
        .depends_on(&s2)
        .handler(move |_n: u32, x: u32, ctx: StepContext| {
            mark(&m, &ctx, 3, Instant::now());
            async move { Ok::<_, StepError>(x + 1) }
        });
    let m = Arc::clone(marks);
    let s4 = step_fn("s4")
        .depends_on(&s3)
        .handler(move |_n: u32, x: u32, ctx: StepContext| {
            mark(&m, &ctx, 4, Instant::now());
            async move { Ok::<_, StepError>(x + 1) }
        });
    let m = Arc::clone(marks);
    let s5 = step_fn("s5")
        .depends_on(&s4)
        .handler(move |_n: u32, x: u32, ctx: StepContext| {
            mark(&m, &ctx, 5, Instant::now());
            async move { Ok::<_, StepError>(x + 1) }
        });
    Flow::new("chain5")
        .step(s1)
        .step(s2)
        .step(s3)
        .step(s4)
        .step(s5)
        .build()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_latency_on_an_idle_chain_is_printed() {
    let db = database().await;
    let pool = db.pool();
    let marks: Marks = Arc::default();
    let flow = chain(&marks);
    compile(pool, &flow).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");

    // Warm up connections and plans.
    let run = start(pool, "chain5", json!(0)).await;
    assert_eq!(
        finished(pool, run, Duration::from_secs(30)).await.0,
        "completed"
    );
    marks.lock().expect("marks").clear();

    let mut end_to_end = Vec::new();
    for _ in 0..20 {
        let began = Instant::now();
        let run = start(pool, "chain5", json!(1)).await;
        // Done when the last handler ran (the run row itself is polled, which is coarser).
        loop {
            let done = marks
                .lock()
                .expect("marks")
                .iter()
                .any(|(id, step, _, _)| *id == run && *step == 5);
            if done {
                break;
            }
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "chain did not finish"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        end_to_end.push(began.elapsed());
        let (status, output) = finished(pool, run, Duration::from_secs(30)).await;
        assert_eq!(
            (status.as_str(), output),
            ("completed", Some(json!({"s5": 5})))
        );
    }
    worker.shutdown().await.expect("shutdown");

    let marks = marks.lock().expect("marks");
    let mut hops = Vec::new();
    for &(run, step, _, end) in marks.iter() {
        if let Some(&(_, _, next_start, _)) = marks
            .iter()
            .find(|(id, next, _, _)| *id == run && *next == step + 1)
        {
            hops.push(next_start - end);
        }
    }
    hops.sort();
    end_to_end.sort();
    assert_eq!(hops.len(), 20 * 4);
    eprintln!(
        "dispatch latency (handler end → dependent's handler start), {} hops: p50 {:?}, p99 {:?}, max {:?}",
        hops.len(),
        percentile(&hops, 0.5),
        percentile(&hops, 0.99),
        hops[hops.len() - 1],
    );
    eprintln!(
        "five-step chain, start_flow → last handler: p50 {:?}, p99 {:?}",
        percentile(&end_to_end, 0.5),
        percentile(&end_to_end, 0.99),
    );
}
