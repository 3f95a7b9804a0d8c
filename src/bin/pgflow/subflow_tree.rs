//! `pgflow run`'s subflow tree (issue 22): the run's parent, if a subflow step started it,
//! and the child runs its subflow steps started, each with its own children, indented.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use pgflow_client::{ChildRun, Client, ParentLink};
use uuid::Uuid;

use crate::failure::Failure;
use crate::style;

/// Children listed per run before the rest are summed up by status: a map step may start
/// thousands.
const LISTED: usize = 20;

/// One line of the tree under a run: a child run, or the children past [`LISTED`] of one run
/// summed up by status. The number is the line's level below the run shown.
pub(crate) enum Entry {
    Child(usize, ChildRun),
    Rest(usize, BTreeMap<String, usize>),
}

/// The run's parent and the tree of runs under it.
pub(crate) struct Tree {
    pub(crate) parent: Option<ParentLink>,
    pub(crate) entries: Vec<Entry>,
}

/// What is left to do in the depth-first walk of [`read`].
enum Todo {
    /// Emit this child's line, then walk its own children.
    Visit(usize, ChildRun),
    /// List the children of this run at this level.
    Expand(usize, Uuid),
    /// Emit a summary line.
    Rest(usize, BTreeMap<String, usize>),
}

/// Reads the tree under `run_id`, depth first, each child followed by its own children.
/// Slugs are the engine's (letters, digits, `_`) and statuses its texts: nothing to escape.
pub(crate) async fn read(client: &Client, run_id: Uuid) -> Result<Tree, Failure> {
    let parent = client.parent(run_id).await.map_err(denied)?;
    let mut entries = Vec::new();
    // The engine bounds the depth (16 levels), so the walk ends.
    let mut todo = vec![Todo::Expand(0, run_id)];
    while let Some(next) = todo.pop() {
        match next {
            Todo::Visit(level, child) => {
                todo.push(Todo::Expand(level + 1, child.run_id));
                entries.push(Entry::Child(level, child));
            }
            Todo::Rest(level, rest) => entries.push(Entry::Rest(level, rest)),
            Todo::Expand(level, run) => {
                let kids = client.children(run).await.map_err(denied)?;
                let mut rest: BTreeMap<String, usize> = BTreeMap::new();
                for kid in kids.iter().skip(LISTED) {
                    *rest.entry(kid.status.to_string()).or_default() += 1;
                }
                // A stack: pushed last, popped first.
                if !rest.is_empty() {
                    todo.push(Todo::Rest(level, rest));
                }
                for kid in kids.into_iter().take(LISTED).rev() {
                    todo.push(Todo::Visit(level, kid));
                }
            }
        }
    }
    Ok(Tree { parent, entries })
}

/// The run's parent and its direct children, every one of them (`run --json`).
pub(crate) async fn links(
    client: &Client,
    run_id: Uuid,
) -> Result<(Option<ParentLink>, Vec<ChildRun>), Failure> {
    let parent = client.parent(run_id).await.map_err(denied)?;
    let children = client.children(run_id).await.map_err(denied)?;
    Ok((parent, children))
}

fn denied(err: pgflow_client::Error) -> Failure {
    match &err {
        pgflow_client::Error::Database(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("42501") =>
        {
            Failure::error(format!(
                "{db}: the subflow tree reads pgflow.run_children and pgflow_ext.subflow_runs; \
                 grant them with `GRANT EXECUTE ON FUNCTION pgflow.run_children(uuid) TO <role>; \
                 GRANT USAGE ON SCHEMA pgflow_ext TO <role>; \
                 GRANT SELECT ON pgflow_ext.subflow_runs TO <role>;`"
            ))
        }
        _ => Failure::from(err),
    }
}

/// The tree as text: a `parent:` line, then `children:` with one line per child run,
/// indented by depth below this run; empty when the run has neither.
pub(crate) fn render(tree: &Tree) -> String {
    let mut out = String::new();
    if let Some(parent) = &tree.parent {
        let _ = writeln!(
            out,
            "parent: run {} (step {}[{}], attempt {}; this run is at depth {})",
            parent.run_id, parent.step_slug, parent.task_index, parent.attempt, parent.depth
        );
    }
    if tree.entries.is_empty() {
        return out;
    }
    out.push_str("children:\n");
    for entry in &tree.entries {
        match entry {
            Entry::Child(level, child) => {
                let status = child.status.as_str();
                let _ = writeln!(
                    out,
                    "{}{}[{}] attempt {} -> run {} of flow {}: {}",
                    "  ".repeat(level + 1),
                    child.step_slug,
                    child.task_index,
                    child.attempt,
                    child.run_id,
                    child.flow_slug,
                    style::paint(style::status(status), status),
                );
            }
            Entry::Rest(level, rest) => write_rest(&mut out, *level, rest),
        }
    }
    out
}

fn write_rest(out: &mut String, level: usize, rest: &BTreeMap<String, usize>) {
    let total: usize = rest.values().sum();
    let by_status: Vec<String> = rest
        .iter()
        .map(|(status, n)| format!("{n} {status}"))
        .collect();
    let _ = writeln!(
        out,
        "{}... and {total} more ({})",
        "  ".repeat(level + 1),
        by_status.join(", ")
    );
}
