//! What the worker logs about the tasks of a cancelled run (issue 19): one INFO line per task it
//! stops, naming the run, the step and the task, and nothing louder; a result that reaches the
//! engine after the run was cancelled is not an error either. And the warning of a retried
//! failure tells the delay the handler chose with `StepError::retry_after`.
//!
//! A test binary of its own: the subscriber is the process's global one, which no other test
//! can race (a scoped subscriber shares tracing's per-callsite interest with every test thread).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::throwaway::TestDatabase;
use pgflow_client::{Client, Worker, WorkerHandle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use uuid::Uuid;

/// Log lines, shared between the subscriber and the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

async fn cancel(pool: &PgPool, run_id: Uuid) {
    let cancelled: bool = sqlx::query_scalar("SELECT pgflow.cancel_run($1)")
        .bind(run_id)
        .fetch_one(pool)
        .await
        .expect("cancel_run");
    assert!(cancelled);
}

async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn settled(worker: &WorkerHandle) {
    until("the worker to settle", || worker.stats().in_flight == 0).await;
}

/// A map step whose tasks count themselves in `entered`, then wait for `release` (when given)
/// or their token, and fail on the element `"fail"`.
fn waiting(
    slug: &str,
    entered: &Arc<AtomicUsize>,
    release: Option<&CancellationToken>,
) -> Flow<Vec<String>> {
    let (entered, release) = (Arc::clone(entered), release.cloned());
    let wait = step_fn("wait").map_over_input().max_attempts(3).handler(
        move |what: String, ctx: StepContext| {
            let (entered, release) = (Arc::clone(&entered), release.clone());
            async move {
                entered.fetch_add(1, Ordering::SeqCst);
                match release {
                    Some(release) => release.cancelled().await,
                    None => ctx.cancellation_token().cancelled().await,
                }
                if what == "fail" {
                    return Err(StepError::new("failed after the cancellation"));
                }
                Ok(what)
            }
        },
    );
    Flow::new(slug).step(wait).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_task_is_one_info_line_and_a_late_result_no_error() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_env_filter("pgflow_client=debug")
        .finish();
    subscriber.init();

    let db = TestDatabase::new().await.expect("test database");
    let pool = db.pool();
    let client = Client::new(pool.clone());

    // Stopped by the worker: it learns of the cancellation while the handlers run.
    let entered = Arc::new(AtomicUsize::new(0));
    let flow = waiting("stopped", &entered, None);
    client.compile(&flow).await.expect("compile");
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");
    let input = vec!["ok".to_owned(), "fail".to_owned()];
    let stopped = client.start(&flow, &input).await.expect("start");
    until("both handlers to run", || {
        entered.load(Ordering::SeqCst) == 2
    })
    .await;
    cancel(pool, stopped.id()).await;
    until("both tasks to be cancelled", || {
        worker.stats().cancelled == 2
    })
    .await;
    settled(&worker).await;
    worker.shutdown().await.expect("shutdown");

    // Too late to stop: the worker does not listen and learns nothing before the handlers
    // return, so their results go to the engine, which ignores them.
    let (entered, release) = (Arc::new(AtomicUsize::new(0)), CancellationToken::new());
    let flow = waiting("finished", &entered, Some(&release));
    client.compile(&flow).await.expect("compile");
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .notifications(false)
        .heartbeat_interval(Duration::from_secs(60))
        .spawn()
        .expect("worker");
    let finished = client.start(&flow, &input).await.expect("start");
    until("both handlers to run", || {
        entered.load(Ordering::SeqCst) == 2
    })
    .await;
    cancel(pool, finished.id()).await;
    release.cancel();
    settled(&worker).await;
    let stats = worker.stats();
    worker.shutdown().await.expect("shutdown");
    assert_eq!((stats.cancelled, stats.completed, stats.failed), (0, 1, 1));
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM pgflow.step_tasks WHERE run_id = $1 ORDER BY task_index",
    )
    .bind(finished.id())
    .fetch_all(pool)
    .await
    .expect("tasks");
    assert_eq!(
        statuses,
        ["cancelled", "cancelled"],
        "the results changed nothing"
    );

    let text = logs.text();
    retry_after_is_in_the_warning(&client, pool, &logs).await;

    let cancelled: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("task cancelled: its run was cancelled"))
        .collect();
    assert_eq!(cancelled.len(), 2, "one line per task:\n{text}");
    for line in &cancelled {
        assert!(line.contains(" INFO "), "{line}");
        assert!(line.contains(&format!("run_id={}", stopped.id())), "{line}");
        assert!(line.contains("step_slug=wait"), "{line}");
    }
    for index in 0..2 {
        let task = format!("task_index={index}");
        assert!(cancelled.iter().any(|line| line.contains(&task)), "{text}");
    }
    let late: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("not applied"))
        .collect();
    assert_eq!(late.len(), 2, "the completion and the failure:\n{text}");
    for line in &late {
        assert!(line.contains(" INFO "), "{line}");
        assert!(line.contains("its run was cancelled"), "{line}");
        assert!(
            line.contains(&format!("run_id={}", finished.id())),
            "{line}"
        );
    }
    for level in [" WARN ", " ERROR "] {
        assert!(!text.contains(level), "nothing{level}in:\n{text}");
    }
}

/// A failure the handler wants retried in 7 s: the warning says about 7 s, where the step's
/// backoff would say 2 s.
async fn retry_after_is_in_the_warning(client: &Client, pool: &PgPool, logs: &Captured) {
    let deferred = step_fn("deferred").max_attempts(2).base_delay(1).handler(
        |_n: u32, ctx: StepContext| async move {
            let error = StepError::new(format!("deferred attempt {}", ctx.attempt()));
            Err::<u32, _>(error.retry_after(Duration::from_secs(7)))
        },
    );
    let flow: Flow<u32> = Flow::new("deferred").step(deferred).build();
    client.compile(&flow).await.expect("compile");
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");
    client.start(&flow, &1).await.expect("start");
    until("the first failure to be reported", || {
        worker.stats().failed == 1
    })
    .await;
    worker.shutdown().await.expect("shutdown");

    let text = logs.text();
    let warning = text
        .lines()
        .find(|line| line.contains("deferred attempt 1"))
        .unwrap_or_else(|| panic!("no line about the failure in:\n{text}"));
    assert!(warning.contains(" WARN "), "{warning}");
    assert!(warning.contains("task failed; retrying"), "{warning}");
    let retry_in = warning
        .split("retry_in=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no retry_in in {warning}"));
    assert!(
        retry_in.ends_with('s') && retry_in.starts_with(['6', '7']),
        "about 7 s: {warning}"
    );
}
