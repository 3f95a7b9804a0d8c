use std::future;
use std::io::Write;
use std::pin::pin;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use pgflow_client::{Client, RunState, RunStatus};
use tokio::time::{Instant, MissedTickBehavior};
use uuid::Uuid;

use crate::CliResult;
use crate::failure::Failure;
use crate::progress::Progress;
use crate::run_view::render_run;
use crate::style;
use crate::time::time_of_day;

/// Exit status of a watched run that failed (0 is a completed run, 1 a watch that failed).
const RUN_FAILED: u8 = 3;
/// Exit status when `--timeout` passed first.
const TIMED_OUT: u8 = 4;
/// Exit status of a watched run that was cancelled.
const RUN_CANCELLED: u8 = 5;
/// How often the run's state is read for progress and retries, which have no events.
const POLL: Duration = Duration::from_millis(500);

pub(crate) async fn watch(
    client: &Client,
    run_id: Uuid,
    timeout: Option<Duration>,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    let run = client.run(run_id);
    // Subscribed before the first read: nothing that happens in between is missed.
    let events = run.events().await?;
    let first = run.state().await?;
    let shape = client.flow_shape(&first.run.flow_slug).await?;
    let shape = shape.as_ref();
    let mut progress = Progress::new(&first);
    if !json {
        write!(out, "{}", render_run(&first, shape))?;
        out.flush()?;
    }
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut events = pin!(events);
    let mut timed_out = pin!(async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => future::pending().await,
        }
    });
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                let event = event?;
                if json {
                    serde_json::to_writer(&mut *out, &event)?;
                    writeln!(out)?;
                } else {
                    writeln!(
                        out,
                        "{} {}",
                        time_of_day(Utc::now()),
                        style::visible(&event.to_string())
                    )?;
                }
                out.flush()?;
                if event.kind.ends_run() {
                    break;
                }
            }
            _ = poll.tick(), if !json => {
                for line in progress.changes(&run.state().await?) {
                    writeln!(out, "{} {line}", time_of_day(Utc::now()))?;
                }
                out.flush()?;
            }
            () = &mut timed_out => {
                let state = run.state().await?;
                if !json {
                    write!(out, "{}", render_run(&state, shape))?;
                }
                return Err(Failure::with_status(
                    TIMED_OUT,
                    format!(
                        "run {run_id} has not ended within {}s; it goes on",
                        timeout.unwrap_or_default().as_secs()
                    ),
                ));
            }
        }
    }
    let state = run.state().await?;
    // A run that had ended before the watch began is shown once.
    if !json && state != first {
        write!(out, "{}", render_run(&state, shape))?;
    }
    ended(&state)
}

/// The watch's outcome from the run's final state.
fn ended(state: &RunState) -> CliResult {
    let run = &state.run;
    match run.status {
        RunStatus::Completed => Ok(()),
        RunStatus::Failed => {
            let why = state
                .steps
                .iter()
                .find_map(|step| {
                    let error = step.error_message.as_deref()?;
                    Some(format!(" in step `{}`: {error}", step.step_slug))
                })
                .unwrap_or_default();
            Err(Failure::with_status(
                RUN_FAILED,
                format!("run {} failed{why}", run.run_id),
            ))
        }
        RunStatus::Cancelled => Err(Failure::with_status(
            RUN_CANCELLED,
            format!("run {} was cancelled", run.run_id),
        )),
        status => Err(Failure::error(format!(
            "the run's events ended while it is {status}"
        ))),
    }
}
