//! The flows: each with its options, its steps and its DAG.

use axum::extract::Path;
use maud::{Markup, html};
use pgflow_core::FlowShape;
use serde_json::Value;

use super::layout::{Base, page as frame};
use crate::{Error, Shared, dag};

pub(crate) async fn list(state: Shared, base: Base) -> Result<Markup, Error> {
    let flows = state.client.flows().await?;
    let body = html! {
        h1 { "Flows" }
        @if flows.is_empty() {
            p.muted { "No flow is defined in this database yet." }
        }
        @for flow in &flows {
            (flow_section(&base, flow, true))
        }
    };
    Ok(frame(&base, "/flows", "Flows", &body))
}

pub(crate) async fn one(
    state: Shared,
    base: Base,
    Path(slug): Path<String>,
) -> Result<Markup, Error> {
    if let Err(problem) = pgflow_core::check_slug(&slug) {
        return Err(Error::BadRequest(format!(
            "`{slug}` is not a flow slug ({problem})"
        )));
    }
    let flow = state
        .client
        .flow_shape(&slug)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no flow {slug}")))?;
    let title = format!("Flow {slug}");
    Ok(frame(
        &base,
        "/flows",
        &title,
        &flow_section(&base, &flow, false),
    ))
}

fn flow_section(base: &Base, flow: &FlowShape, linked: bool) -> Markup {
    let runs_link = format!("{}?flow={}", base.to("/runs"), flow.slug);
    html! {
        section.flow data-flow=(flow.slug) {
            @if linked {
                h2 { a href=(base.to(&format!("/flows/{}", flow.slug))) { (flow.slug) } }
            } @else {
                h1 { "Flow " (flow.slug) }
            }
            p {
                "Options: " (options(&serde_json::to_value(flow.options).unwrap_or(Value::Null)))
                " · " a href=(runs_link) { "its runs" }
            }
            (dag::svg(flow, None))
            table.steps {
                thead { tr { th { "#" } th { "step" } th { "type" } th { "depends on" } th { "options" } } }
                tbody {
                    @for (i, step) in flow.steps.iter().enumerate() {
                        tr {
                            td.num { (i) }
                            td.mono { (step.slug) }
                            td { (step.kind.as_str()) }
                            td.mono { (step.dependencies.join(", ")) }
                            td { (options(&serde_json::to_value(step.options).unwrap_or(Value::Null))) }
                        }
                    }
                }
            }
        }
    }
}

/// Options as `name value` pairs; those not set are left out (the flow's or the engine's
/// defaults apply).
fn options(value: &Value) -> Markup {
    let set: Vec<(&String, &Value)> = value
        .as_object()
        .map(|o| o.iter().filter(|(_, v)| !v.is_null()).collect())
        .unwrap_or_default();
    html! {
        @if set.is_empty() {
            span.muted { "defaults" }
        } @else {
            @for (i, (name, value)) in set.iter().enumerate() {
                @if i > 0 { ", " }
                code { (name) " " (value.to_string()) }
            }
        }
    }
}
