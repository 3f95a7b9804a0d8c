//! A run as text: its steps with their status, tasks, attempts, duration and error.

use chrono::{DateTime, Utc};
use pgflow_client::{RunState, TaskStatus};

use crate::style;
use crate::table::{Cell, table_text};

/// The run as a table of its steps, in the order of definition.
pub(crate) fn render_run(state: &RunState) -> String {
    let run = &state.run;
    let mut out = format!(
        "run {} of flow {}: {} ({})\n",
        run.run_id,
        run.flow_slug,
        style::paint(style::status(run.status.as_str()), run.status.as_str()),
        duration(Some(run.started_at), run.completed_at.or(run.failed_at))
    );
    let mut rows: Vec<[Cell; 7]> = Vec::new();
    for step in &state.steps {
        let tasks: Vec<_> = state
            .tasks
            .iter()
            .filter(|t| t.step_slug == step.step_slug)
            .collect();
        let done = tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Completed)
            .count();
        let total = step
            .initial_tasks
            .map_or_else(|| "?".to_string(), |n| n.to_string());
        let attempts = tasks.iter().map(|t| t.attempts_count).max().unwrap_or(0);
        rows.push([
            step.step_slug.as_str().into(),
            step.step_type.to_string().into(),
            Cell::styled(step.status.as_str(), style::status(step.status.as_str())),
            format!("{done}/{total}").into(),
            attempts.to_string().into(),
            duration(step.started_at, step.completed_at.or(step.failed_at)).into(),
            Cell::styled(step.error_message.clone().unwrap_or_default(), style::ERROR),
        ]);
    }
    let titles = [
        "STEP", "KIND", "STATUS", "TASKS", "ATTEMPTS", "DURATION", "ERROR",
    ];
    out.push_str(&table_text(titles, &rows));
    out
}

pub(crate) fn duration(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> String {
    let Some(start) = start else {
        return "-".into();
    };
    let end = end.unwrap_or_else(Utc::now);
    let ms = (end - start).num_milliseconds().max(0);
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
    }
}
