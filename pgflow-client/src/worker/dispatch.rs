//! Running one task: its span, its context, its handler under the step timeout with panics
//! caught, and its result handed to the reporter.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use pgflow_core::{ErasedHandler, StepContext};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Shared;
use super::poll::StartedTask;
use super::registry::FlowEntry;
use super::report::{Outcome, Report, TaskKey};

/// Runs `task` in a Tokio task of its own, holding `permit` until its result is with the
/// reporter.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    flow: &Arc<FlowEntry>,
    task: StartedTask,
    permit: OwnedSemaphorePermit,
    reports: mpsc::Sender<Report>,
) {
    let span = tracing::info_span!(
        "task",
        flow_slug = %flow.slug,
        step_slug = %task.step_slug,
        run_id = %task.run_id,
        task_index = task.task_index,
        attempt = task.attempt,
    );
    shared.counters.started.fetch_add(1, Ordering::Relaxed);
    shared.counters.in_flight.fetch_add(1, Ordering::Relaxed);

    let step = flow.steps.get(&task.step_slug);
    let step_slug = step.map_or_else(
        || Arc::from(task.step_slug.as_str()),
        |step| Arc::clone(&step.slug),
    );
    let handler = match step {
        Some(step) => Ok(Arc::clone(&step.handler)),
        None => Err(format!(
            "no handler for step `{}` of flow `{}` is registered in this worker",
            task.step_slug, flow.slug
        )),
    };
    let token = shared.hard_stop.child_token();
    let ctx = StepContext::builder(task.run_id, Arc::clone(&flow.slug), Arc::clone(&step_slug))
        .task_index(u32::try_from(task.task_index).unwrap_or_default())
        .attempt(u32::try_from(task.attempt).unwrap_or(1))
        .cancellation_token(token.clone())
        .resources(Arc::clone(&shared.resources))
        .build();
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

    let run = async move {
        let began = Instant::now();
        tracing::debug!("task started");
        let outcome = match handler {
            Ok(handler) => {
                let limits = Limits {
                    timeout: task.timeout,
                    token: &token,
                    hard_stop: &hard_stop,
                    shutdown_timeout,
                };
                execute(handler, task.input, ctx, limits).await
            }
            Err(message) => Outcome::Failed {
                message,
                retry: true,
            },
        };
        let elapsed_ms = began.elapsed().as_secs_f64() * 1000.0;
        match &outcome {
            Outcome::Completed(_) => tracing::debug!(elapsed_ms, "task finished"),
            Outcome::Failed { message, retry } => {
                tracing::error!(error = %message, retry = *retry, elapsed_ms, "task failed");
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
    shutdown_timeout: Duration,
}

/// Calls the handler, catching panics (in the call itself and while polling), bounded by the
/// step timeout and the worker's shutdown deadline.
async fn execute(
    handler: Arc<dyn ErasedHandler>,
    input: Value,
    ctx: StepContext,
    limits: Limits<'_>,
) -> Outcome {
    let call = AssertUnwindSafe(async move { handler.call(input, ctx).await }).catch_unwind();
    tokio::select! {
        biased;
        result = call => match result {
            Ok(Ok(output)) => Outcome::Completed(output),
            Ok(Err(error)) => Outcome::Failed {
                message: error.to_string(),
                retry: error.is_retryable(),
            },
            Err(payload) => Outcome::Failed {
                message: format!("handler panicked: {}", panic_message(payload.as_ref())),
                retry: true,
            },
        },
        () = tokio::time::sleep(limits.timeout) => {
            limits.token.cancel();
            Outcome::Failed {
                message: format!(
                    "timed out: the handler was still running after the step timeout of {} s \
                     and was cancelled",
                    limits.timeout.as_secs()
                ),
                retry: true,
            }
        }
        () = limits.hard_stop.cancelled() => {
            limits.token.cancel();
            Outcome::Failed {
                message: format!(
                    "cancelled: the worker shut down and the handler did not finish within the \
                     shutdown timeout of {:?}",
                    limits.shutdown_timeout
                ),
                retry: true,
            }
        }
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
    use super::*;

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
