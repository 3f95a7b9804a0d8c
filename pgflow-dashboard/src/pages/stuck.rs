//! Stuck runs, and inconsistent ones: what `pgflow check` finds (`pgflow_client::check`).

use maud::{Markup, html};
use pgflow_client::{Finding, FindingKind};

use super::layout::{Base, page as frame};
use crate::{Error, Shared};

pub(crate) async fn page(state: Shared, base: Base) -> Result<Markup, Error> {
    let findings = state.client.check().await?;
    let (stuck, inconsistent): (Vec<&Finding>, Vec<&Finding>) =
        findings.iter().partition(|f| f.kind == FindingKind::Stuck);
    let body = html! {
        h1 { "Stuck runs" }
        p.muted {
            "Runs that do not move on without someone acting (no live worker, a task past its \
             timeout, a lost message), and runs whose rows contradict each other: what "
            code { "pgflow check" } " reports."
        }
        (table(&base, "stuck", &stuck))
        h2 { "Inconsistent runs" }
        (table(&base, "inconsistent", &inconsistent))
    };
    Ok(frame(&base, "/stuck", "Stuck runs", &body))
}

fn table(base: &Base, id: &str, findings: &[&Finding]) -> Markup {
    html! {
        @if findings.is_empty() {
            p.muted #(id) { "None." }
        } @else {
            table #(id) {
                thead { tr { th { "run" } th { "flow" } th { "step" } th { "rule" } th { "what" } th { "to do" } } }
                tbody {
                    @for f in findings {
                        tr {
                            td.mono { a href=(base.to(&format!("/runs/{}", f.run_id))) { (f.run_id) } }
                            td { (f.flow_slug) }
                            td.mono {
                                @if let Some(step) = &f.step_slug { (step) }
                                @if let Some(i) = f.task_index { " #" (i) }
                            }
                            td.mono { (f.rule) }
                            td { (f.detail) }
                            td { (f.action) }
                        }
                    }
                }
            }
        }
    }
}
