//! Running one task: its span, its context, its handler under the step timeout with panics
//! caught, and its result handed to the reporter, unless its run was cancelled meanwhile.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use pgflow_core::{ErasedHandler, StepContext};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::registry::FlowEntry;
use super::report::{Outcome, Report, TaskKey};
use super::shared::Shared;
use super::slot::Slot;
use super::task::StartedTask;
use super::telemetry::{self, Settled};

/// Runs `task` in a Tokio task of its own, holding `permit` (its place under the concurrency
/// limit) until its result is with the reporter.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    flow: &Arc<FlowEntry>,
    mut task: StartedTask,
    permit: Slot,
    reports: mpsc::Sender<Report>,
) {
    let span = telemetry::task_span(flow, &mut task);
    let slot = telemetry::SlotInUse::take();
    shared.counters.started.fetch_add(1, Ordering::Relaxed);
    shared.counters.in_flight.fetch_add(1, Ordering::Relaxed);

    let step = flow.steps.get(&task.step_slug);
    let step_slug = step.map_or_else(
        || Arc::from(task.step_slug.as_str()),
        |step| Arc::clone(&step.slug),
    );
    telemetry::task_started(&flow.slug, &step_slug, &task.telemetry);
    let handler = match step {
        Some(step) => Ok(Arc::clone(&step.handler)),
        None => Err(format!(
            "no handler for step `{}` of flow `{}` is registered in this worker",
            task.step_slug, flow.slug
        )),
    };
    let input = task.input;
    let token = shared.hard_stop.child_token();
    let registration = shared.running.register(
        task.run_id,
        Arc::clone(&step_slug),
        task.task_index,
        task.read_at,
        token.clone(),
    );
    let mut ctx = StepContext::builder(task.run_id, Arc::clone(&flow.slug), Arc::clone(&step_slug))
        .task_index(u32::try_from(task.task_index).unwrap_or_default())
        .attempt(u32::try_from(task.attempt).unwrap_or(1))
        .cancellation_token(token.clone())
        .extension(Arc::clone(&shared.extension));
    if let Some(state) = &shared.state {
        ctx = ctx.state(Arc::clone(state));
    }
    let ctx = ctx.build();
    let key = TaskKey {
        run_id: task.run_id,
        step_slug,
        task_index: task.task_index,
        attempt: task.attempt,
        flow: Arc::clone(flow),
    };
    let hard_stop = shared.hard_stop.clone();
    let shutdown_timeout = shared.settings.shutdown_timeout;
    let counters = Arc::clone(&shared.counters);
    let mut reports_failing = shared.reports_failing.subscribe();
    let abandon = shared.abandon.clone();
    let stop = flow.stop.clone();

    let run = async move {
        let _slot = slot;
        let began = Instant::now();
        tracing::debug!("task started");
        let outcome = match (handler, input) {
            // Another worker may have the handler: worth a retry.
            (Err(message), _) => Some(Outcome::failed(message, true)),
            // The same input comes back on every attempt.
            (Ok(_), Err(message)) => Some(Outcome::failed(message, false)),
            (Ok(handler), Ok(input)) => {
                let limits = Limits {
                    timeout: task.timeout,
                    token: &token,
                    hard_stop: &hard_stop,
                    run_cancelled: registration.run_cancelled(),
                    shutdown_timeout,
                };
                let outcome = execute(handler, input, ctx, limits).await;
                telemetry::handler_finished(&key.flow.slug, &key.step_slug, began.elapsed());
                outcome
            }
        };
        // Whatever the handler made of the cancellation: the engine marked the task cancelled
        // with its run, and would ignore a report anyway. A superseded execution's report
        // would land on the new one's attempt: it must not be sent.
        let cancelled = registration.run_cancelled().is_cancelled();
        let superseded = registration.superseded();
        drop(registration);
        let Some(outcome) = outcome.filter(|_| !cancelled) else {
            counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
            let elapsed_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
            if superseded {
                tracing::info!(
                    elapsed_ms,
                    "older execution dropped unreported: this worker started the task again"
                );
            } else {
                telemetry::task_settled(&key.flow.slug, &key.step_slug, Settled::Cancelled);
                tracing::info!(elapsed_ms, "task cancelled: its run was cancelled");
            }
            drop(permit);
            return;
        };
        let outcome = storable(outcome);
        // The failure itself is logged once its report says what became of the task.
        let elapsed_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &outcome {
            Outcome::Completed(_) => tracing::debug!(elapsed_ms, "task finished"),
            Outcome::Failed { retry, .. } => {
                tracing::debug!(retry = *retry, elapsed_ms, "task failed");
            }
        }
        let report = Report {
            key,
            outcome,
            span: tracing::Span::current(),
        };
        if reports.send(report).await.is_err() {
            // Only when the reporter is gone (it panicked): the task stays `started`.
            counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("the reporter is gone; the task's result is lost");
        }
        // While reports fail, the place stays taken: a worker that read on would start tasks
        // whose messages reappear (their step timeout passing) while their results wait here,
        // and start them again itself, spending attempts on work it has done.
        // Once the flow stops reading (shutdown), the place gates nothing: the shutdown's wait
        // for every place must not turn into a wait for the database to come back.
        tokio::select! {
            _ = reports_failing.wait_for(|failing| !failing) => {}
            () = stop.cancelled() => {}
            () = abandon.cancelled() => {}
        }
        drop(permit);
    };
    tokio::spawn(run.instrument(span));
}

/// What bounds a handler's run.
struct Limits<'a> {
    /// The step timeout.
    timeout: Duration,
    /// The task's token, given to the handler in its context.
    token: &'a CancellationToken,
    /// Fires when the worker stops waiting for running handlers.
    hard_stop: &'a CancellationToken,
    /// Fires when the task's run has been cancelled, after `token`.
    run_cancelled: &'a CancellationToken,
    shutdown_timeout: Duration,
}

/// Calls the handler, catching panics (in the call itself and while polling), bounded by the
/// step timeout, the worker's shutdown deadline and the cancellation of the task's run; `None`
/// when the handler was dropped because its run was cancelled.
///
/// When the run is cancelled or the shutdown stops waiting, the handler's token has fired by
/// the time the select sees it, and the handler is polled once more first (the select is biased
/// towards it): one that watches its token returns then, one that ignores it is dropped at the
/// await it is suspended in. At the step timeout the token fires as the handler is dropped.
async fn execute(
    handler: Arc<dyn ErasedHandler>,
    input: Value,
    ctx: StepContext,
    limits: Limits<'_>,
) -> Option<Outcome> {
    let call = AssertUnwindSafe(async move { handler.call(input, ctx).await }).catch_unwind();
    let outcome = tokio::select! {
        biased;
        result = call => match result {
            Ok(Ok(output)) => Outcome::Completed(output),
            Ok(Err(error)) if error.is_retryable() => Outcome::Failed {
                retry_delay: error.retry_delay(),
                message: error.to_string(),
                retry: true,
            },
            Ok(Err(error)) => Outcome::failed(
                format!("{error} (not retried: the handler marked the error as permanent)"),
                false,
            ),
            Err(payload) => Outcome::failed(
                format!("handler panicked: {}", panic_message(payload.as_ref())),
                true,
            ),
        },
        () = tokio::time::sleep(limits.timeout) => {
            limits.token.cancel();
            Outcome::failed(
                format!(
                    "timed out: the handler was still running after the step timeout of {} s \
                     and was cancelled",
                    limits.timeout.as_secs()
                ),
                true,
            )
        }
        () = limits.hard_stop.cancelled() => {
            limits.token.cancel();
            Outcome::failed(
                format!(
                    "cancelled: the worker shut down and the handler did not finish within the \
                     shutdown timeout of {:?}",
                    limits.shutdown_timeout
                ),
                true,
            )
        }
        // The token fired first (the registry's order): the handler had its poll to see it.
        () = limits.run_cancelled.cancelled() => return None,
    };
    Some(outcome)
}

/// How deep an output may nest. serde_json reads 127 levels and refuses more (its recursion
/// limit), and the engine hands an output on at most two levels down (in a step's input object,
/// inside the array of a map step's outputs): deeper, it would fail the read of whichever batch
/// of tasks it is part of the input of.
const MAX_OUTPUT_DEPTH: usize = 125;

/// What the reporter can store and a worker can read back: an output nested deeper than
/// [`MAX_OUTPUT_DEPTH`] fails its task instead (for good: a retry would compute it again), and a
/// failure message loses its NUL characters, which PostgreSQL text cannot hold and would make
/// `fail_task` refuse the whole message.
fn storable(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Completed(output) if nests_deeper_than(&output, MAX_OUTPUT_DEPTH) => {
            Outcome::failed(
                format!(
                    "the step output is nested deeper than {MAX_OUTPUT_DEPTH} levels of arrays \
                     and objects, more than a worker can decode in the input of a later step"
                ),
                false,
            )
        }
        Outcome::Failed {
            message,
            retry,
            retry_delay,
        } => Outcome::Failed {
            message: without_nul(message),
            retry,
            retry_delay,
        },
        completed @ Outcome::Completed(_) => completed,
    }
}

/// Whether `value` has more than `levels` levels of arrays and objects; looks no deeper than
/// that, so that no output, however deep, can exhaust the stack here.
fn nests_deeper_than(value: &Value, levels: usize) -> bool {
    match value {
        Value::Array(items) => {
            levels == 0 || items.iter().any(|item| nests_deeper_than(item, levels - 1))
        }
        Value::Object(fields) => {
            levels == 0
                || fields
                    .values()
                    .any(|field| nests_deeper_than(field, levels - 1))
        }
        _ => false,
    }
}

/// `message` with each NUL shown as `\0`, the rest kept as it is.
fn without_nul(message: String) -> String {
    if message.contains('\0') {
        message.replace('\0', "\\0")
    } else {
        message
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "(a payload that is not a string)"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn nested(levels: usize) -> Value {
        let mut value = Value::from(0);
        for _ in 0..levels {
            value = Value::Array(vec![value]);
        }
        value
    }

    #[test]
    fn outputs_are_measured_in_levels_of_nesting() {
        assert!(!nests_deeper_than(&Value::from(1), 0));
        assert!(nests_deeper_than(&serde_json::json!([]), 0));
        assert!(!nests_deeper_than(&serde_json::json!({"a": [1, {}]}), 3));
        assert!(nests_deeper_than(
            &serde_json::json!({"a": [1, {"b": []}]}),
            3
        ));
        assert!(!nests_deeper_than(
            &nested(MAX_OUTPUT_DEPTH),
            MAX_OUTPUT_DEPTH
        ));
        assert!(nests_deeper_than(
            &nested(MAX_OUTPUT_DEPTH + 1),
            MAX_OUTPUT_DEPTH
        ));
    }

    #[test]
    fn the_deepest_output_kept_decodes_where_the_engine_puts_it() {
        // In a step's input, in the array of a map step's outputs: two levels more.
        let deepest = serde_json::json!({"run": 1, "map": [nested(MAX_OUTPUT_DEPTH)]});
        let text = deepest.to_string();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
        let deeper = serde_json::json!({"run": 1, "map": [nested(MAX_OUTPUT_DEPTH + 1)]});
        let error = serde_json::from_str::<Value>(&deeper.to_string()).unwrap_err();
        assert!(error.to_string().contains("recursion limit"), "{error}");
    }

    #[test]
    fn too_deep_outputs_fail_for_good() {
        let Outcome::Failed { message, retry, .. } =
            storable(Outcome::Completed(nested(MAX_OUTPUT_DEPTH + 1)))
        else {
            panic!("completed");
        };
        assert!(
            message.contains("nested deeper than 125 levels"),
            "{message}"
        );
        assert!(!retry);
        assert!(matches!(
            storable(Outcome::Completed(nested(MAX_OUTPUT_DEPTH))),
            Outcome::Completed(_)
        ));
    }

    #[test]
    fn nul_characters_leave_failure_messages() {
        let failed = Outcome::Failed {
            message: "before\0after\0".to_owned(),
            retry: true,
            retry_delay: Some(Duration::from_secs(3)),
        };
        let Outcome::Failed {
            message,
            retry,
            retry_delay,
        } = storable(failed)
        else {
            panic!("completed");
        };
        assert_eq!(message, "before\\0after\\0");
        assert!(retry);
        assert_eq!(retry_delay, Some(Duration::from_secs(3)));
        assert_eq!(without_nul("plain".to_owned()), "plain");
    }

    /// A handler that sleeps for `sleep`, or returns an error as soon as its token fires when
    /// `watch`; `dropped` is set when its future is dropped.
    fn sleeper(watch: bool, dropped: &Arc<AtomicBool>) -> Arc<dyn ErasedHandler> {
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::clone(dropped);
        Arc::new(move |_input: Value, ctx: StepContext| {
            let guard = Dropped(Arc::clone(&dropped));
            async move {
                let _guard = guard;
                let sleep = tokio::time::sleep(Duration::from_secs(60));
                if watch {
                    tokio::select! {
                        () = ctx.cancellation_token().cancelled() => {
                            Err(pgflow_core::StepError::new("saw the token"))
                        }
                        () = sleep => Ok(Value::Null),
                    }
                } else {
                    sleep.await;
                    Ok(Value::Null)
                }
            }
        })
    }

    /// Runs `handler` under [`execute`] and cancels its run as the registry does, once the
    /// handler is waiting.
    async fn cancel_while_running(handler: Arc<dyn ErasedHandler>) -> Option<Outcome> {
        let token = CancellationToken::new();
        let run_cancelled = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let ctx = StepContext::builder(uuid::Uuid::nil(), "f", "s")
            .cancellation_token(token.clone())
            .build();
        let limits = Limits {
            timeout: Duration::from_secs(60),
            token: &token,
            hard_stop: &hard_stop,
            run_cancelled: &run_cancelled,
            shutdown_timeout: Duration::from_secs(1),
        };
        let execution = execute(handler, Value::Null, ctx, limits);
        tokio::pin!(execution);
        tokio::select! {
            biased;
            _ = &mut execution => panic!("finished before the cancellation"),
            () = tokio::task::yield_now() => {}
        }
        token.cancel();
        run_cancelled.cancel();
        tokio::time::timeout(Duration::from_secs(1), execution)
            .await
            .expect("a cancelled task ends at once")
    }

    #[tokio::test]
    async fn a_handler_watching_its_token_sees_it_fire_when_its_run_is_cancelled() {
        let dropped = Arc::new(AtomicBool::new(false));
        let outcome = cancel_while_running(sleeper(true, &dropped)).await;
        let Some(Outcome::Failed { message, .. }) = outcome else {
            panic!("the handler did not get to return: {outcome:?}");
        };
        assert_eq!(message, "saw the token");
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_handler_ignoring_its_token_is_dropped_when_its_run_is_cancelled() {
        let dropped = Arc::new(AtomicBool::new(false));
        let outcome = cancel_while_running(sleeper(false, &dropped)).await;
        assert!(outcome.is_none(), "{outcome:?}");
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_retry_delay_chosen_by_the_handler_reaches_the_outcome() {
        let later = Arc::new(|_input: Value, _ctx: StepContext| async move {
            Err::<Value, _>(pgflow_core::StepError::new("busy").retry_after(Duration::from_secs(7)))
        });
        let never = CancellationToken::new();
        let limits = Limits {
            timeout: Duration::from_secs(60),
            token: &never,
            hard_stop: &never,
            run_cancelled: &never,
            shutdown_timeout: Duration::from_secs(1),
        };
        let outcome = execute(later, Value::Null, StepContext::for_test(), limits).await;
        let Some(Outcome::Failed {
            retry, retry_delay, ..
        }) = outcome
        else {
            panic!("{outcome:?}");
        };
        assert!(retry);
        assert_eq!(retry_delay, Some(Duration::from_secs(7)));
    }

    #[test]
    fn panic_payloads_become_text() {
        let literal = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(literal.as_ref()), "plain");
        let formatted = std::panic::catch_unwind(|| panic!("n = {}", 3)).unwrap_err();
        assert_eq!(panic_message(formatted.as_ref()), "n = 3");
        let other = std::panic::catch_unwind(|| std::panic::panic_any(7_u8)).unwrap_err();
        assert_eq!(
            panic_message(other.as_ref()),
            "(a payload that is not a string)"
        );
    }
}
