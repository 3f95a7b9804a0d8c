//! What changed in a run between two reads, as `watch` tells it: tasks done of map steps, and
//! attempts that failed and will be retried. The engine sends no event for either, so `watch`
//! reads the run's state now and then and compares.

use std::collections::HashMap;

use pgflow_client::{RunState, TaskRow, TaskStatus};
use pgflow_core::StepKind;

use crate::run_view::progress;
use crate::style;

/// What `watch` has told so far.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Per map step, its last progress text.
    shown: HashMap<String, String>,
    /// Per task and retry of the run, the last failed attempt told.
    failed_attempts: HashMap<(String, i32, i32), i32>,
}

impl Progress {
    /// Starts from `state`, already shown in full.
    pub(crate) fn new(state: &RunState) -> Self {
        let mut progress = Self::default();
        progress.changes(state);
        progress
    }

    /// Lines for what changed since the last call.
    pub(crate) fn changes(&mut self, state: &RunState) -> Vec<String> {
        let mut lines = Vec::new();
        for step in &state.steps {
            let tasks: Vec<&TaskRow> = state
                .tasks
                .iter()
                .filter(|task| task.step_slug == step.step_slug)
                .collect();
            for task in &tasks {
                let Some(attempt) = retried_attempt(task) else {
                    continue;
                };
                // A retry of the run starts the task's attempts again from 1.
                let key = (
                    task.step_slug.clone(),
                    task.task_index,
                    state.run.retry_count,
                );
                if self
                    .failed_attempts
                    .get(&key)
                    .is_some_and(|&told| told >= attempt)
                {
                    continue;
                }
                self.failed_attempts.insert(key, attempt);
                let task_name = match step.step_type {
                    StepKind::Map => format!("{}[{}]", task.step_slug, task.task_index),
                    _ => task.step_slug.clone(),
                };
                let error = task.error_message.as_deref().unwrap_or_default();
                lines.push(format!(
                    "retry {task_name}: attempt {attempt} failed: {}",
                    style::paint(style::ERROR, error)
                ));
            }
            if step.step_type == StepKind::Map && step.initial_tasks.is_some() {
                let text = progress(step, &tasks);
                if self.shown.get(&step.step_slug) != Some(&text) {
                    self.shown.insert(step.step_slug.clone(), text.clone());
                    lines.push(format!("progress {} {text}", step.step_slug));
                }
            }
        }
        lines
    }
}

/// The number of the task's last failed attempt when it will be, or is being, retried. The
/// engine keeps the last attempt's error on the task until it completes or fails for good.
fn retried_attempt(task: &TaskRow) -> Option<i32> {
    task.error_message.as_ref()?;
    let attempt = match task.status {
        TaskStatus::Queued => task.attempts_count,
        TaskStatus::Started | TaskStatus::Completed => task.attempts_count - 1,
        _ => return None,
    };
    (attempt > 0).then_some(attempt)
}
