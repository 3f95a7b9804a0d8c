//! A run: its DAG with each step coloured by status (updated live), its steps with map
//! progress and timings, the input and outputs, each failed attempt's error, the retries, and
//! the cancel and retry buttons when the app allows them.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query};
use maud::{Markup, PreEscaped, html};
use pgflow_core::StepKind;
use serde::Deserialize;
use uuid::Uuid;

use super::layout::{Base, badge, duration, json, maybe_time, page as frame, time};
use crate::dag::{self, STATUS_COLOURS, StepMark, UNKNOWN_COLOUR};
use crate::queries::run::{ATTEMPTS_SHOWN, MAP_OUTPUTS_SHOWN, RunDetail, TASKS_SHOWN, run_detail};
use crate::{Error, Shared};

/// What an action leaves in the URL it redirects to, for the page to say what happened. Only
/// these words are shown, never the parameter's text.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Done {
    Cancelled,
    Ended,
    Retried,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RunQuery {
    done: Option<Done>,
}

pub(crate) async fn page(
    state: Shared,
    base: Base,
    Path(run_id): Path<String>,
    query: Result<Query<RunQuery>, QueryRejection>,
) -> Result<Markup, Error> {
    let run_id = parse_run_id(&run_id)?;
    let detail = run_detail(state.client.pool(), run_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no run {run_id}")))?;
    // The flow's shape draws the DAG; a flow deleted under its runs leaves the tables alone.
    let shape = state.client.flow_shape(&detail.run.flow_slug).await?;
    // The retries are a part of the page the rest does not need: a failure to read them
    // (a role without access to pgflow_ext.run_retries) leaves them out and is logged.
    let retries = match state.client.retry_history(run_id).await {
        Ok(retries) => retries,
        Err(err) => {
            tracing::warn!(error = %err, %run_id, "dashboard: cannot read the run's retries");
            Vec::new()
        }
    };
    // An unknown `done` is only a notice not shown.
    let done = query.ok().and_then(|Query(q)| q.done);
    let title = format!("Run {run_id}");
    Ok(frame(
        &base,
        "/runs",
        &title,
        &body(
            &base,
            &detail,
            shape.as_ref(),
            &retries,
            done,
            state.allow_actions,
        ),
    ))
}

/// A run id from the path, or a 400 naming it.
pub(crate) fn parse_run_id(text: &str) -> Result<Uuid, Error> {
    text.parse()
        .map_err(|_| Error::BadRequest(format!("`{text}` is not a run id (a UUID)")))
}

fn body(
    base: &Base,
    detail: &RunDetail,
    shape: Option<&pgflow_core::FlowShape>,
    retries: &[pgflow_client::RunRetry],
    done: Option<Done>,
    allow_actions: bool,
) -> Markup {
    let run = &detail.run;
    let marks: HashMap<String, StepMark> = detail
        .steps
        .iter()
        .map(|step| {
            (
                step.step_slug.clone(),
                StepMark {
                    status: step.status.clone(),
                    progress: progress(
                        shape,
                        &step.step_slug,
                        step.initial_tasks,
                        step.remaining_tasks,
                    ),
                },
            )
        })
        .collect();
    let live_url = base.to(&format!("/runs/{}/live", run.run_id));
    html! {
        @match done {
            Some(Done::Cancelled) => div.notice { "The run was cancelled." },
            Some(Done::Ended) => div.notice { "The run had already ended; nothing changed." },
            Some(Done::Retried) => div.notice { "The run was started again." },
            None => {},
        }
        h1 { "Run " span.mono { (run.run_id) } " " span #run-status class={"badge st-" (run.status)} data-status=(run.status) { (run.status) } }
        table.facts {
            tr { th { "flow" } td { a href=(base.to(&format!("/flows/{}", run.flow_slug))) { (run.flow_slug) } } }
            tr { th { "started" } td { (time(run.started_at)) } }
            @if let Some(at) = run.scheduled_for { tr { th { "scheduled for" } td { (time(at)) } } }
            tr { th { "ended" } td { (maybe_time(run.ended_at())) } }
            tr { th { "duration" } td { (duration(Some(run.started_at), run.ended_at())) } }
            tr { th { "steps left" } td #remaining-steps { (run.remaining_steps) } }
            tr { th { "retries" } td { (run.retry_count) } }
        }
        (actions(base, run.run_id, &run.status, allow_actions))
        h2 { "Steps" }
        @match shape {
            Some(shape) => (dag::svg(shape, Some(&marks))),
            None => p.muted { "Flow " (run.flow_slug) " is no longer defined: no DAG to draw." },
        }
        p.muted #live-note { "Live: step colours follow the run as it moves (needs JavaScript)." }
        table #steps {
            thead { tr {
                th { "step" } th { "status" } th { "tasks" } th { "started" } th { "took" } th { "error / reason" }
            } }
            tbody {
                @for step in &detail.steps {
                    tr data-step-row=(step.step_slug) {
                        td.mono { (step.step_slug) }
                        td { (badge(&step.status)) }
                        td { (tasks_cell(detail, &step.step_slug, step.initial_tasks, step.remaining_tasks)) }
                        td { (maybe_time(step.started_at)) }
                        td { (duration(step.started_at, step.ended_at())) }
                        td {
                            @if let Some(error) = &step.error_message { span.error-text { (error) } }
                            @if let Some(reason) = &step.skip_reason { span.muted { (reason) } }
                        }
                    }
                }
            }
        }
        h2 { "Failed attempts" }
        @if detail.attempts.is_empty() {
            p.muted { "None." }
        } @else {
            table #attempts {
                thead { tr {
                    th { "step" } th { "task" } th { "retry of the run" } th { "attempt" } th { "failed at" } th { "worker" } th { "error" }
                } }
                tbody {
                    @for attempt in &detail.attempts {
                        tr {
                            td.mono { (attempt.step_slug) }
                            td.num { (attempt.task_index) }
                            td.num { (attempt.run_retry) }
                            td.num { (attempt.attempt) }
                            td { (time(attempt.failed_at)) }
                            td.mono { @if let Some(w) = attempt.last_worker_id { (w) } }
                            td { pre.error-text { (attempt.error_message) } }
                        }
                    }
                }
            }
            @if i64::try_from(detail.attempts.len()).unwrap_or(0) >= ATTEMPTS_SHOWN {
                p.muted { "The first " (ATTEMPTS_SHOWN) " attempts." }
            }
        }
        @if !retries.is_empty() {
            h2 { "Retries" }
            table {
                thead { tr { th { "retry" } th { "at" } th { "the run had" } th { "step" } th { "error" } } }
                tbody {
                    @for retry in retries {
                        tr {
                            td.num { (retry.retry_number) }
                            td { (time(retry.retried_at)) }
                            td { (badge(retry.previous_status.as_str())) " " (time(retry.ended_at)) }
                            td.mono { @if let Some(step) = &retry.failed_step_slug { (step) } }
                            td.error-text { @if let Some(error) = &retry.error_message { (error) } }
                        }
                    }
                }
            }
        }
        h2 { "Input" }
        (json(&run.input))
        @if let Some(output) = &run.output {
            h2 { "Output" }
            (json(output))
        }
        @if !detail.outputs.is_empty() {
            h2 { "Step outputs" }
            @for (step, outputs) in &detail.outputs {
                h3.mono { (step) }
                @for (index, output) in outputs {
                    @if outputs.len() > 1 || *index > 0 { p.muted { "task " (index) } }
                    (json(output))
                }
                @if i32::try_from(outputs.len()).unwrap_or(0) >= MAP_OUTPUTS_SHOWN {
                    p.muted { "The first " (MAP_OUTPUTS_SHOWN) " tasks' outputs." }
                }
            }
        }
        h2 { "Tasks" }
        table #tasks {
            thead { tr {
                th { "step" } th { "task" } th { "status" } th { "attempts" } th { "queued" } th { "took" } th { "worker" } th { "error" }
            } }
            tbody {
                @for task in &detail.tasks {
                    tr {
                        td.mono { (task.step_slug) }
                        td.num { (task.task_index) }
                        td { (badge(&task.status)) }
                        td.num {
                            (task.attempts_count)
                            @if let Some(n) = task.requeued_count.filter(|n| *n > 0) { " (requeued " (n) ")" }
                        }
                        td { (time(task.queued_at)) }
                        td { (duration(task.started_at, task.completed_at.or(task.failed_at))) }
                        td.mono { @if let Some(w) = task.last_worker_id { (w) } }
                        td.error-text { @if let Some(error) = &task.error_message { (error) } }
                    }
                }
            }
        }
        @if i64::try_from(detail.tasks.len()).unwrap_or(0) >= TASKS_SHOWN {
            p.muted { "The first " (TASKS_SHOWN) " tasks (failed ones first)." }
        }
        (live_script(&live_url))
    }
}

/// A map step's `(completed, total)` tasks, once it has them.
fn progress(
    shape: Option<&pgflow_core::FlowShape>,
    slug: &str,
    initial: Option<i32>,
    remaining: Option<i32>,
) -> Option<(i32, i32)> {
    let is_map = shape?
        .steps
        .iter()
        .any(|s| s.slug == slug && s.kind == StepKind::Map);
    match (is_map, initial, remaining) {
        (true, Some(total), Some(left)) => Some((total - left, total)),
        _ => None,
    }
}

fn tasks_cell(
    detail: &RunDetail,
    slug: &str,
    initial: Option<i32>,
    remaining: Option<i32>,
) -> Markup {
    let counts = detail.task_counts.get(slug);
    html! {
        @if let (Some(total), Some(left)) = (initial, remaining) {
            @let done = total - left;
            span.progress title={(done) " of " (total) " completed"} {
                span style={"width:" (if total > 0 { done * 100 / total } else { 100 }) "%"} {}
            }
            " " span.task-progress { (done) "/" (total) }
        }
        @if let Some(counts) = counts {
            " " span.muted {
                @for (i, (status, n)) in counts.iter().enumerate() {
                    @if i > 0 { ", " }
                    (n) " " (status)
                }
            }
        }
    }
}

fn actions(base: &Base, run_id: Uuid, status: &str, allowed: bool) -> Markup {
    if !allowed {
        return html! {};
    }
    html! {
        div.actions {
            @if status == "started" {
                form.inline method="post" action=(base.to(&format!("/runs/{run_id}/cancel"))) {
                    button.danger #cancel type="submit" { "Cancel run" }
                }
            }
            @if status == "failed" || status == "cancelled" {
                form.inline method="post" action=(base.to(&format!("/runs/{run_id}/retry"))) {
                    button.primary #retry type="submit" { "Retry run" }
                }
            }
        }
    }
}

/// The live part: subscribes to the run's updates and recolours the steps in place. Text goes
/// in through `textContent` only, never as HTML.
fn live_script(url: &str) -> Markup {
    let colours: serde_json::Map<String, serde_json::Value> = STATUS_COLOURS
        .iter()
        .map(|(status, colour)| ((*status).to_owned(), (*colour).into()))
        .collect();
    // Inside <script>, `</` would end the element: JSON escapes `<` so no text can.
    let config = serde_json::json!({ "url": url, "colours": colours, "unknown": UNKNOWN_COLOUR })
        .to_string()
        .replace('<', "\\u003c");
    html! {
        script {
            (PreEscaped(format!("const PGFLOW_LIVE = {config};\n")))
            (PreEscaped(LIVE_JS))
        }
    }
}

const LIVE_JS: &str = r#"
(function () {
  var cfg = PGFLOW_LIVE;
  var colour = function (s) { return cfg.colours[s] || cfg.unknown; };
  var each = function (selector, attr, value, fn) {
    document.querySelectorAll(selector).forEach(function (el) {
      if (el.getAttribute(attr) === value) { fn(el); }
    });
  };
  var setBadge = function (el, status) {
    el.textContent = status;
    el.className = 'badge st-' + status;
    el.setAttribute('data-status', status);
  };
  var apply = function (state) {
    var run = document.getElementById('run-status');
    if (run && run.getAttribute('data-status') !== state.status) { setBadge(run, state.status); }
    var left = document.getElementById('remaining-steps');
    if (left) { left.textContent = String(state.remaining_steps); }
    state.steps.forEach(function (step) {
      var progress = '';
      if (step.initial_tasks !== null && step.remaining_tasks !== null) {
        progress = (step.initial_tasks - step.remaining_tasks) + '/' + step.initial_tasks;
      }
      each('g.node', 'data-step', step.slug, function (g) {
        g.setAttribute('data-status', step.status);
        var rect = g.querySelector('rect');
        rect.setAttribute('fill', colour(step.status));
        rect.setAttribute('class', 'step-box st-' + step.status);
        var text = g.querySelector('text.step-status');
        text.textContent = step.status + (step.map && progress ? ' ' + progress : '');
        g.querySelector('title').textContent = step.slug + ': ' + step.status;
      });
      each('tr', 'data-step-row', step.slug, function (row) {
        var b = row.querySelector('.badge');
        if (b) { setBadge(b, step.status); }
        var p = row.querySelector('.task-progress');
        if (p && progress) { p.textContent = progress; }
      });
    });
    document.body.setAttribute('data-live-updates',
      String(Number(document.body.getAttribute('data-live-updates') || 0) + 1));
  };
  if (!window.EventSource) { return; }
  var source = new EventSource(cfg.url);
  source.addEventListener('state', function (e) { apply(JSON.parse(e.data)); });
  source.addEventListener('open', function () { document.body.setAttribute('data-live', 'open'); });
  source.addEventListener('error', function () { document.body.setAttribute('data-live', 'retrying'); });
})();
"#;
