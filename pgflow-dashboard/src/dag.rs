//! A flow's DAG as inline SVG: steps in columns by dependency depth (a root in the first, a
//! step one column right of its deepest dependency), in definition order within a column,
//! edges as curves from a dependency to its dependent. On a run page each step is filled with
//! its status's colour, and carries `data-step` for the live script.

use std::collections::HashMap;

use maud::{Markup, html};
use pgflow_core::{FlowShape, StepKind};

/// Each status's colour: the one table the SVG fills, the CSS badges and the live script read.
pub(crate) const STATUS_COLOURS: &[(&str, &str)] = &[
    ("created", "#9ca3af"),
    ("queued", "#9ca3af"),
    ("started", "#2563eb"),
    ("completed", "#16a34a"),
    ("failed", "#dc2626"),
    ("cancelled", "#b45309"),
    ("skipped", "#8b5cf6"),
];

/// The colour of a status no table row names (one a later engine adds).
pub(crate) const UNKNOWN_COLOUR: &str = "#6b7280";

/// The fill of a step on a flow page, where it has no status.
const PLAIN_FILL: &str = "#e5e7eb";

/// A status's colour.
pub(crate) fn colour(status: &str) -> &'static str {
    STATUS_COLOURS
        .iter()
        .find(|(name, _)| *name == status)
        .map_or(UNKNOWN_COLOUR, |(_, colour)| colour)
}

const NODE_W: i32 = 170;
const NODE_H: i32 = 46;
const GAP_X: i32 = 60;
const GAP_Y: i32 = 18;
const PAD: i32 = 10;
/// Characters of a slug shown in a node; the full slug is its tooltip.
const LABEL_CHARS: usize = 20;

/// What a run page knows of a step: its status and, for a started map step, its progress.
#[derive(Debug, Clone)]
pub(crate) struct StepMark {
    pub(crate) status: String,
    /// `(completed tasks, tasks)`, once the step's tasks exist.
    pub(crate) progress: Option<(i32, i32)>,
}

/// Each step's `(column, row)`.
fn layout(shape: &FlowShape) -> Vec<(i32, i32)> {
    let mut depth: HashMap<&str, i32> = HashMap::new();
    let mut rows_in_column: HashMap<i32, i32> = HashMap::new();
    shape
        .steps
        .iter()
        .map(|step| {
            // Dependencies come earlier in a stored flow; one that does not (a hand-made
            // shape) counts as a root rather than breaking the page.
            let column = step
                .dependencies
                .iter()
                .filter_map(|dep| depth.get(dep.as_str()))
                .map(|d| d + 1)
                .max()
                .unwrap_or(0);
            depth.insert(&step.slug, column);
            let row = rows_in_column.entry(column).or_insert(0);
            let at = (column, *row);
            *row += 1;
            at
        })
        .collect()
}

/// The DAG of `shape`; with `marks`, each step coloured by its status in the run.
pub(crate) fn svg(shape: &FlowShape, marks: Option<&HashMap<String, StepMark>>) -> Markup {
    let places = layout(shape);
    let columns = places.iter().map(|p| p.0).max().map_or(1, |c| c + 1);
    let rows = places.iter().map(|p| p.1).max().map_or(1, |r| r + 1);
    let width = PAD * 2 + columns * NODE_W + (columns - 1) * GAP_X;
    let height = PAD * 2 + rows * NODE_H + (rows - 1) * GAP_Y;
    let origin = |(column, row): (i32, i32)| {
        (
            PAD + column * (NODE_W + GAP_X),
            PAD + row * (NODE_H + GAP_Y),
        )
    };
    let at: HashMap<&str, (i32, i32)> = shape
        .steps
        .iter()
        .zip(&places)
        .map(|(step, place)| (step.slug.as_str(), origin(*place)))
        .collect();
    html! {
        svg.dag xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox={"0 0 " (width) " " (height)} role="img"
            aria-label={"DAG of flow " (shape.slug)} {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7"
                    markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" fill="#6b7280" {}
                }
            }
            @for step in &shape.steps {
                @for dep in &step.dependencies {
                    @if let (Some(from), Some(to)) = (at.get(dep.as_str()), at.get(step.slug.as_str())) {
                        @let (x1, y1) = (from.0 + NODE_W, from.1 + NODE_H / 2);
                        @let (x2, y2) = (to.0, to.1 + NODE_H / 2);
                        @let mid = (x1 + x2) / 2;
                        path.edge data-from=(dep) data-to=(step.slug)
                            d={"M " (x1) " " (y1) " C " (mid) " " (y1) ", " (mid) " " (y2) ", " (x2) " " (y2)}
                            fill="none" stroke="#6b7280" stroke-width="1.5"
                            marker-end="url(#arrow)" {}
                    }
                }
            }
            @for step in &shape.steps {
                @let (x, y) = at[step.slug.as_str()];
                @let mark = marks.and_then(|m| m.get(&step.slug));
                @let status = mark.map(|m| m.status.as_str());
                @let fill = status.map_or(PLAIN_FILL, colour);
                @let text_class = if status.is_some() { "on-colour" } else { "on-plain" };
                g.node data-step=(step.slug) data-status=[status] transform={"translate(" (x) "," (y) ")"} {
                    title { (step.slug) @if let Some(status) = status { ": " (status) } }
                    rect.step-box class=[status.map(|s| format!("st-{s}"))] width=(NODE_W)
                        height=(NODE_H) rx="6" fill=(fill)
                        stroke=(if step.kind == StepKind::Map { "#111827" } else { "none" })
                        stroke-dasharray=[(step.kind == StepKind::Map).then_some("4 2")] {}
                    text.(text_class) x="10" y="19" { (label(&step.slug)) }
                    text.(text_class).step-status x="10" y="36" {
                        (status.unwrap_or(step.kind.as_str()))
                        @if let Some((done, total)) = mark.and_then(|m| m.progress) {
                            " " (done) "/" (total)
                        } @else if step.kind == StepKind::Map && status.is_some() {
                            " (map)"
                        }
                    }
                }
            }
        }
    }
}

/// A slug cut to fit its box.
fn label(slug: &str) -> String {
    if slug.chars().count() <= LABEL_CHARS {
        return slug.to_owned();
    }
    let cut: String = slug.chars().take(LABEL_CHARS - 1).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn step(slug: &str, deps: &[&str]) -> Value {
        json!({"slug": slug, "dependencies": deps})
    }

    #[test]
    fn steps_sit_one_column_right_of_their_deepest_dependency() {
        // Through serde: the shape's fields grow with the engine.
        let shape: FlowShape = serde_json::from_value(json!({
            "slug": "diamond",
            "steps": [
                step("a", &[]),
                step("b", &["a"]),
                step("c", &["a"]),
                step("d", &["b", "c", "a"]),
                step("e", &[]),
            ],
        }))
        .unwrap();
        assert_eq!(layout(&shape), vec![(0, 0), (1, 0), (1, 1), (2, 0), (0, 1)]);
        let svg = svg(&shape, None).into_string();
        assert_eq!(svg.matches("class=\"edge\"").count(), 5);
        assert_eq!(svg.matches("class=\"node\"").count(), 5);
    }

    #[test]
    fn unknown_statuses_get_a_colour_too() {
        assert_eq!(colour("completed"), "#16a34a");
        assert_eq!(colour("something-new"), UNKNOWN_COLOUR);
    }
}
