//! Feature `otel`: the trace context of the code that starts a run travels with the run through
//! the database, and the spans of the run's tasks join that trace; a run started outside any
//! trace gets root spans; what a hostile row holds never breaks the worker.
//!
//! A test binary of its own: the subscriber (with its OpenTelemetry layer over an in-memory
//! exporter) is the process's global one. The worker runs in this process, but nothing carries
//! the context to it in memory: its tasks are spawned from the worker's own Tokio tasks, and
//! the test checks that the task spans' parents are remote ones, read back from the database.

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::throwaway::TestDatabase;
use pgflow_client::{Client, Worker};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(30);

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The finished task spans of `run_id`, once there are `count` of them (a task's span ends once
/// its result is reported, which may be just after the run is seen completed).
async fn task_spans(exporter: &InMemorySpanExporter, run_id: Uuid, count: usize) -> Vec<SpanData> {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let spans: Vec<SpanData> = exporter
            .get_finished_spans()
            .expect("spans")
            .into_iter()
            .filter(|span| {
                attribute(span, "step_slug").is_some()
                    && attribute(span, "run_id").as_deref() == Some(&run_id.to_string())
            })
            .collect();
        if spans.len() >= count || tokio::time::Instant::now() > deadline {
            assert_eq!(spans.len(), count, "task spans of run {run_id}: {spans:#?}");
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn flow() -> Flow<u32> {
    let first = step_fn("first")
        .handler(|n: u32, _ctx: StepContext| async move { Ok::<_, StepError>(n + 1) });
    let second = step_fn("second")
        .depends_on(&first)
        .handler(|_: u32, n: u32, _ctx: StepContext| async move { Ok::<_, StepError>(n * 2) });
    Flow::new("traced").step(first).step(second).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tasks_of_a_run_join_the_trace_of_the_code_that_started_it() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("pgflow-test")))
        .init();

    let db = TestDatabase::new().await.expect("test database");
    let pool = db.pool();
    let client = Client::new(pool.clone());
    let flow = flow();
    client.compile(&flow).await.expect("compile");
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");

    // A run started inside a traced request.
    let order = tracing::info_span!("start order");
    let trace_id = order.context().span().span_context().trace_id();
    assert_ne!(trace_id, TraceId::INVALID);
    let traced = client
        .start(&flow, &1)
        .instrument(order.clone())
        .await
        .expect("start");
    drop(order);
    traced.wait_timeout(WITHIN).await.expect("completes");

    // What the database holds: the starting span's context, written with the run.
    let (traceparent, tracestate): (String, Option<String>) = sqlx::query_as(
        "SELECT traceparent, tracestate FROM pgflow_ext.run_trace_context WHERE run_id = $1",
    )
    .bind(traced.id())
    .fetch_one(pool)
    .await
    .expect("the run's trace context is stored");
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{traceparent}"
    );
    assert_eq!(tracestate, None);
    let stored_parent = SpanId::from_hex(&traceparent[36..52]).expect("span id");

    let spans = task_spans(&exporter, traced.id(), 2).await;
    let all = exporter.get_finished_spans().expect("spans");
    // The stored parent is the span the application started the run in.
    let order = all
        .iter()
        .find(|span| span.span_context.span_id() == stored_parent)
        .expect("the starting span is exported");
    assert_eq!(order.name, "start order");
    assert_eq!(order.parent_span_id, SpanId::INVALID);
    for span in &spans {
        assert_eq!(span.span_context.trace_id(), trace_id, "{span:#?}");
        assert_eq!(span.parent_span_id, stored_parent, "{span:#?}");
        assert!(
            span.parent_span_is_remote,
            "the parent came from the database, not from memory: {span:#?}"
        );
        assert_eq!(attribute(span, "flow_slug").as_deref(), Some("traced"));
        assert_eq!(attribute(span, "task_index").as_deref(), Some("0"));
        assert_eq!(attribute(span, "attempt").as_deref(), Some("1"));
        let worker_id = attribute(span, "worker_id").expect("worker_id");
        assert_eq!(
            Some(worker_id),
            worker.worker_id("traced").map(|id| id.to_string()),
            "the worker row that started it"
        );
    }
    let mut steps: Vec<String> = spans
        .iter()
        .map(|span| attribute(span, "step_slug").expect("step_slug"))
        .collect();
    steps.sort();
    assert_eq!(steps, ["first", "second"]);
    let mut names: Vec<&str> = spans.iter().map(|span| &*span.name).collect();
    names.sort_unstable();
    assert_eq!(names, ["traced first", "traced second"]);
    // The client's own span is a child of the starting one, beside the tasks.
    let start = all
        .iter()
        .find(|span| span.name == "start_json")
        .expect("the client's span");
    assert_eq!(start.parent_span_id, stored_parent);

    // The other doors: a delayed start, and a start inside the caller's transaction.
    let batch = tracing::info_span!("start batch");
    let batch_cx = batch.context();
    let batch_span = batch_cx.span();
    let batch_ids = batch_span.span_context();
    let (delayed, in_tx) = async {
        let delayed = client
            .start_after(Duration::ZERO, &flow, &4)
            .await
            .expect("start_after");
        let mut tx = pool.begin().await.expect("begin");
        let in_tx = client
            .start_in(&mut *tx, &flow, &5)
            .await
            .expect("start_in");
        tx.commit().await.expect("commit");
        (delayed, in_tx)
    }
    .instrument(batch.clone())
    .await;
    drop(batch);
    for run in [&delayed, &in_tx] {
        run.wait_timeout(WITHIN).await.expect("completes");
        for span in task_spans(&exporter, run.id(), 2).await {
            assert_eq!(span.span_context.trace_id(), batch_ids.trace_id());
            assert_eq!(span.parent_span_id, batch_ids.span_id());
            assert!(span.parent_span_is_remote);
        }
    }

    // A run started outside any trace: no row, and its tasks' spans start traces of their own.
    let untraced = client.start(&flow, &2).await.expect("start");
    untraced.wait_timeout(WITHIN).await.expect("completes");
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow_ext.run_trace_context WHERE run_id = $1")
            .bind(untraced.id())
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(rows, 0);
    let roots = task_spans(&exporter, untraced.id(), 2).await;
    for span in &roots {
        assert_eq!(span.parent_span_id, SpanId::INVALID, "a root: {span:#?}");
        assert_ne!(span.span_context.trace_id(), trace_id);
    }
    assert_ne!(
        roots[0].span_context.trace_id(),
        roots[1].span_context.trace_id(),
        "two tasks without a stored context share no trace"
    );

    hostile_rows_never_break_the_worker(&client, &flow, &exporter).await;
    worker.shutdown().await.expect("shutdown");
}

/// Rows a hostile owner (or a buggy client of another language) wrote: the table refuses a
/// malformed `traceparent`; one written past the constraint, dropped for the purpose, makes a
/// root span; an unreadable `tracestate` is dropped and the parent kept. The tasks run.
async fn hostile_rows_never_break_the_worker(
    client: &Client,
    flow: &Flow<u32>,
    exporter: &InMemorySpanExporter,
) {
    let pool = client.pool();
    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    // Started and written in one transaction, so that no task starts before the row is there.
    let start_with_row = |traceparent: &'static str, tracestate: Option<&'static str>| async move {
        let mut tx = pool.begin().await.unwrap();
        let run = client.start_in(&mut *tx, flow, &3).await.expect("start");
        sqlx::query(
            "INSERT INTO pgflow_ext.run_trace_context (run_id, traceparent, tracestate) \
             VALUES ($1, $2, $3)",
        )
        .bind(run.id())
        .bind(traceparent)
        .bind(tracestate)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(run)
    };

    let refused = start_with_row("00-not-a-trace-01", None)
        .await
        .expect_err("the CHECK constraint refuses it");
    let code = refused
        .as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned());
    assert_eq!(code.as_deref(), Some("23514"), "{refused}");

    // Unreadable state: the propagator drops it, the parent stays.
    let odd_state = start_with_row(good, Some("%%%,===,=="))
        .await
        .expect("printable state passes the table");
    odd_state.wait_timeout(WITHIN).await.expect("completes");
    for span in task_spans(exporter, odd_state.id(), 2).await {
        assert_eq!(
            span.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(span.parent_span_id.to_string(), "00f067aa0ba902b7");
    }

    sqlx::query(
        "ALTER TABLE pgflow_ext.run_trace_context DROP CONSTRAINT traceparent_is_valid, \
         DROP CONSTRAINT tracestate_is_valid",
    )
    .execute(pool)
    .await
    .unwrap();
    for (traceparent, tracestate) in [
        ("garbage", Some("\u{1}\u{7f}")),
        (
            "00-00000000000000000000000000000000-0000000000000000-01",
            None,
        ),
        (
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        ),
    ] {
        let run = start_with_row(traceparent, tracestate)
            .await
            .expect("written past the constraint");
        run.wait_timeout(WITHIN)
            .await
            .unwrap_or_else(|err| panic!("{traceparent:?}: the run completes: {err}"));
        for span in task_spans(exporter, run.id(), 2).await {
            assert_eq!(
                span.parent_span_id,
                SpanId::INVALID,
                "{traceparent:?}: a root"
            );
        }
    }
}
