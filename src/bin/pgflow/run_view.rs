//! A run as text: its steps as a layered DAG, each indented one level deeper than its deepest
//! dependency and naming them, with status, tasks (a bar for map steps), attempts, start,
//! duration and the last error; a skipped step with its reason, requeued tasks in the
//! attempts, and permanently stalled tasks under the table.

use std::collections::HashMap;

use pgflow_client::{RunState, StepStateRow, StepStatus, TaskRow, TaskStatus};
use pgflow_core::{FlowShape, StepKind};

use pgflow_client::RunRetry;

use crate::commands::run::FailedAttempt;
use crate::style;
use crate::table::{Cell, table_text};
use crate::time::{duration, time_of_day, timestamp};

/// Errors longer than this are cut in the table; `run --json` has them whole.
const ERROR_WIDTH: usize = 60;
/// Cells of a map step's progress bar.
const BAR_WIDTH: usize = 10;

/// The run's header line and its steps in the order of definition. `shape` is the flow's
/// definition, for the dependencies; without it the steps are listed flat.
pub(crate) fn render_run(state: &RunState, shape: Option<&FlowShape>) -> String {
    let run = &state.run;
    let status = style::paint(style::status(run.status.as_str()), run.status.as_str());
    let ended = run.completed_at.or(run.failed_at).or(run.cancelled_at);
    let retried = match run.retry_count {
        0 => String::new(),
        1 => ", retried once".to_string(),
        n => format!(", retried {n} times"),
    };
    let mut out = match ended {
        Some(end) => format!(
            "run {} of flow {}: {status} after {} (started {}, {} {}{retried})\n",
            run.run_id,
            run.flow_slug,
            duration(Some(run.started_at), Some(end)),
            timestamp(run.started_at),
            run.status,
            timestamp(end),
        ),
        None => format!(
            "run {} of flow {}: {status} for {} (since {}{retried})\n",
            run.run_id,
            run.flow_slug,
            duration(Some(run.started_at), None),
            timestamp(run.started_at),
        ),
    };
    // A delayed start (Client::start_at): nothing of it runs before then.
    if let Some(at) = run.scheduled_for
        && ended.is_none()
        && at > chrono::Utc::now()
    {
        out.push_str(&format!(
            "scheduled: its first steps start at {}\n",
            timestamp(at)
        ));
    }
    let dependencies: HashMap<&str, &[String]> = shape
        .map(|shape| {
            shape
                .steps
                .iter()
                .map(|step| (step.slug.as_str(), step.dependencies.as_slice()))
                .collect()
        })
        .unwrap_or_default();
    let mut depths: HashMap<&str, usize> = HashMap::new();
    let mut rows: Vec<[Cell; 9]> = Vec::new();
    for step in &state.steps {
        let slug = step.step_slug.as_str();
        let after = dependencies.get(slug).copied().unwrap_or_default();
        // Steps come in the order of definition, so a dependency's depth is known.
        let depth = after
            .iter()
            .map(|dep| depths.get(dep.as_str()).map_or(0, |depth| depth + 1))
            .max()
            .unwrap_or(0);
        depths.insert(slug, depth);
        let tasks: Vec<&TaskRow> = state
            .tasks
            .iter()
            .filter(|task| task.step_slug == slug)
            .collect();
        let attempts = tasks.iter().map(|t| t.attempts_count).max().unwrap_or(0);
        // A step of a run that ended without it has stopped too.
        let end = step
            .completed_at
            .or(step.failed_at)
            .or(step.skipped_at)
            .or(ended);
        let status = match step.skip_reason {
            Some(reason) => format!("{} ({reason})", step.status),
            None => step.status.to_string(),
        };
        // A skipped step has no tasks to count (a map over a skipped dependency: none).
        let tasks_cell = if step.status == StepStatus::Skipped && tasks.is_empty() {
            "-".to_string()
        } else {
            progress(step, &tasks)
        };
        rows.push([
            format!("{}{slug}", "  ".repeat(depth)).into(),
            after.join(", ").into(),
            step.step_type.to_string().into(),
            Cell::styled(status, style::status(step.status.as_str())),
            tasks_cell.into(),
            attempts_text(attempts, &tasks).into(),
            step.started_at.map(time_of_day).unwrap_or_default().into(),
            duration(step.started_at, end).into(),
            Cell::styled(last_error(step, &tasks), style::ERROR),
        ]);
    }
    let titles = [
        "STEP", "AFTER", "KIND", "STATUS", "TASKS", "ATTEMPTS", "STARTED", "DURATION", "ERROR",
    ];
    out.push_str(&table_text(titles, &rows));
    out.push_str(&stalled(state));
    out
}

/// The attempts of a step's busiest task, and how often the stalled-task sweep requeued its
/// tasks after their worker was lost (those attempts are among the attempts).
fn attempts_text(attempts: i32, tasks: &[&TaskRow]) -> String {
    let requeues: i32 = tasks.iter().map(|task| task.requeued_count).sum();
    match requeues {
        0 => attempts.to_string(),
        1 => format!("{attempts} (1 requeue)"),
        n => format!("{attempts} ({n} requeues)"),
    }
}

/// One line per permanently stalled task, with what to do: nothing runs such a task again.
fn stalled(state: &RunState) -> String {
    let mut out = String::new();
    for task in &state.tasks {
        let Some(at) = task.permanently_stalled_at else {
            continue;
        };
        let text = format!(
            "permanently stalled: {}[{}] since {}, after {} requeues of lost attempts; nothing \
             runs it again: `pgflow cancel {run}`, then `pgflow retry {run}`",
            task.step_slug,
            task.task_index,
            timestamp(at),
            task.requeued_count,
            run = state.run.run_id,
        );
        out.push_str(&style::paint(style::ERROR, &text));
        out.push('\n');
    }
    out
}

/// Tasks done of the step's total (`?` until a map step knows it), with a bar for map steps.
pub(crate) fn progress(step: &StepStateRow, tasks: &[&TaskRow]) -> String {
    let done = tasks
        .iter()
        .filter(|task| task.status == TaskStatus::Completed)
        .count();
    let Some(total) = step.initial_tasks.and_then(|n| usize::try_from(n).ok()) else {
        return format!("{done}/?");
    };
    if step.step_type != StepKind::Map || total == 0 {
        return format!("{done}/{total}");
    }
    let filled = (done * BAR_WIDTH).div_ceil(total).min(BAR_WIDTH);
    format!(
        "{done}/{total} [{}{}]",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled)
    )
}

/// The step's error, or else the last error of its tasks: a task that failed and was retried
/// keeps its last attempt's error in `step_tasks` while the step has none.
fn last_error(step: &StepStateRow, tasks: &[&TaskRow]) -> String {
    let with_error: Vec<&&TaskRow> = tasks
        .iter()
        .filter(|task| task.error_message.is_some())
        .collect();
    // The failed task first, then the one with the most attempts.
    let task = with_error
        .iter()
        .max_by_key(|task| (task.status == TaskStatus::Failed, task.attempts_count));
    let (message, index) = match (&step.error_message, task) {
        (Some(message), task) => (message.as_str(), task.map(|task| task.task_index)),
        (None, Some(task)) => (
            task.error_message.as_deref().unwrap_or_default(),
            Some(task.task_index),
        ),
        (None, None) => return String::new(),
    };
    let mut text = String::new();
    if let (StepKind::Map, Some(index)) = (step.step_type, index) {
        text.push_str(&format!("[{index}] "));
    }
    let first_line = message.lines().next().unwrap_or_default();
    if first_line.chars().count() > ERROR_WIDTH {
        text.extend(first_line.chars().take(ERROR_WIDTH - 1));
        text.push('…');
    } else {
        text.push_str(first_line);
    }
    if step.error_message.is_none() {
        text.push_str(" (retried)");
    }
    if with_error.len() > 1 {
        text.push_str(&format!(" (+{} more)", with_error.len() - 1));
    }
    text
}

/// `run --attempts`: every failed attempt, one a line, under the DAG, each with the run's
/// retry it belongs to (0 before the first). The error's first line is shown whole;
/// `run --json --attempts` has the complete message.
pub(crate) fn render_attempts(attempts: &[FailedAttempt]) -> String {
    if attempts.is_empty() {
        return "failed attempts: none\n".to_string();
    }
    let rows: Vec<[Cell; 6]> = attempts
        .iter()
        .map(|attempt| {
            [
                attempt.run_retry.to_string().into(),
                attempt.step_slug.as_str().into(),
                attempt.task_index.to_string().into(),
                attempt.attempt.to_string().into(),
                timestamp(attempt.failed_at).into(),
                Cell::styled(
                    attempt.error_message.lines().next().unwrap_or_default(),
                    style::ERROR,
                ),
            ]
        })
        .collect();
    let mut out = format!("failed attempts: {}\n", attempts.len());
    out.push_str(&table_text(
        ["RETRY", "STEP", "TASK", "ATTEMPT", "FAILED AT", "ERROR"],
        &rows,
    ));
    out
}

/// `run --attempts` of a retried run: how the run had ended before each retry, under the
/// failed attempts; nothing for a run never retried.
pub(crate) fn render_retries(retries: &[RunRetry]) -> String {
    if retries.is_empty() {
        return String::new();
    }
    let rows: Vec<[Cell; 6]> = retries
        .iter()
        .map(|retry| {
            let error = retry.error_message.as_deref().unwrap_or_default();
            [
                retry.retry_number.to_string().into(),
                timestamp(retry.retried_at).into(),
                Cell::styled(
                    retry.previous_status.as_str(),
                    style::status(retry.previous_status.as_str()),
                ),
                timestamp(retry.ended_at).into(),
                retry.failed_step_slug.as_deref().unwrap_or_default().into(),
                Cell::styled(error.lines().next().unwrap_or_default(), style::ERROR),
            ]
        })
        .collect();
    let mut out = format!("retries: {}\n", retries.len());
    out.push_str(&table_text(
        ["RETRY", "RETRIED AT", "WAS", "ENDED AT", "STEP", "ERROR"],
        &rows,
    ));
    out
}
