//! What the worker logs about failed tasks: a failure the engine retries is a WARN with the
//! attempt and the delay, the last one an ERROR, and times are whole numbers.
//!
//! A test binary of its own: the subscriber is the process's global one, which no other test
//! can race (a scoped subscriber shares tracing's per-callsite interest with every test thread).

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::Worker;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

use pgflow_client::Client;
use pgflow_client::throwaway::TestDatabase;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_failure_is_a_warning_with_its_delay_and_the_last_one_an_error() {
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
    let calls = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let flaky = step_fn("flaky").max_attempts(2).base_delay(1).handler(
        move |refuse: bool, _ctx: StepContext| {
            let call = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if refuse {
                    Err(StepError::new("refused for good").no_retry())
                } else if call == 0 {
                    Err(StepError::new("flaky once"))
                } else {
                    Ok(call)
                }
            }
        },
    );
    let flow: Flow<bool> = Flow::new("logged").step(flaky).build();
    client.compile(&flow).await.expect("compile");
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");

    let within = Duration::from_secs(30);
    let retried = client.start(&flow, &false).await.expect("start");
    retried
        .wait_timeout(within)
        .await
        .expect("completes after a retry");
    let refused = client.start(&flow, &true).await.expect("start");
    let failure = refused
        .wait_timeout(within)
        .await
        .expect_err("fails for good");
    assert!(
        failure.to_string().contains("refused for good"),
        "{failure}"
    );
    worker.shutdown().await.expect("shutdown");

    let text = logs.text();
    let line = |needle: &str| {
        text.lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
            .to_owned()
    };
    // base_delay 1 s, after the first attempt: the engine waits 1 × 2^1 seconds.
    let warning = line("task failed; retrying");
    assert!(warning.contains(" WARN "), "{warning}");
    assert!(warning.contains("attempt=1"), "{warning}");
    assert!(warning.contains("error=flaky once"), "{warning}");
    let retry_in = warning
        .split("retry_in=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no retry_in in {warning}"));
    assert!(
        retry_in.ends_with('s') && retry_in.starts_with(['1', '2']),
        "about 2 s: {warning}"
    );
    let final_failure = line("task failed for good");
    assert!(final_failure.contains("ERROR"), "{final_failure}");
    assert!(
        final_failure.contains("error=refused for good"),
        "{final_failure}"
    );
    assert!(
        !text.contains("ERROR") || text.matches("ERROR").count() == 1,
        "only the final failure is an error:\n{text}"
    );
    // Times are whole milliseconds, not float noise.
    let elapsed = line("task finished");
    let value = elapsed
        .split("elapsed_ms=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no elapsed_ms in {elapsed}"));
    assert!(value.parse::<u64>().is_ok(), "a whole number: {elapsed}");
}
