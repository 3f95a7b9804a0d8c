//! The workers: heartbeats, the flow each serves, live or not.

use std::collections::BTreeMap;

use maud::{Markup, html};
use pgflow_client::LIVE_WORKER_WINDOW;

use super::layout::{Base, maybe_time, page as frame, time};
use crate::queries::workers::{WORKERS_SHOWN, workers};
use crate::{Error, Shared};

pub(crate) async fn page(state: Shared, base: Base) -> Result<Markup, Error> {
    let rows = workers(state.client.pool()).await?;
    let mut by_flow: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for worker in &rows {
        let entry = by_flow.entry(&worker.queue_name).or_default();
        entry.1 += 1;
        if worker.live {
            entry.0 += 1;
        }
    }
    let body = html! {
        h1 { "Workers" }
        p.muted {
            "A worker is live when it is not deprecated and beat in the last "
            (LIVE_WORKER_WINDOW.as_secs()) " s."
        }
        h2 { "Flows served" }
        @if by_flow.is_empty() {
            p.muted { "No worker has registered yet." }
        } @else {
            div.cards {
                @for (flow, (live, all)) in &by_flow {
                    div.card data-flow=(flow) {
                        div { a href=(base.to(&format!("/flows/{flow}"))) { (flow) } }
                        div.n { (live) } div.muted { "live of " (all) }
                    }
                }
            }
        }
        h2 { "Workers" }
        table #workers {
            thead { tr {
                th { "worker" } th { "flow" } th { "function" } th { "state" } th { "last heartbeat" } th { "started" } th { "deprecated" }
            } }
            tbody {
                @for w in &rows {
                    tr data-worker=(w.worker_id) {
                        td.mono { (w.worker_id) }
                        td { (w.queue_name) }
                        td.mono { (w.function_name) }
                        td {
                            @if w.live { span.badge.st-completed { "live" } }
                            @else if w.deprecated_at.is_some() { span.badge.st-cancelled { "deprecated" } }
                            @else { span.badge.st-failed { "silent" } }
                        }
                        td { (time(w.last_heartbeat_at)) " " span.muted { "(" (w.silent_secs.max(0)) " s ago)" } }
                        td { (time(w.started_at)) }
                        td { (maybe_time(w.deprecated_at)) }
                    }
                }
            }
        }
        @if i64::try_from(rows.len()).unwrap_or(0) >= WORKERS_SHOWN {
            p.muted { "The " (WORKERS_SHOWN) " most recent." }
        }
    };
    Ok(frame(&base, "/workers", "Workers", &body))
}
