//! The schedules (`pgflow_ext.schedules`): cron flows, their state, last and next tick.

use chrono::Utc;
use maud::{Markup, html};

use super::layout::{Base, json, maybe_time, page as frame};
use crate::{Error, Shared};

pub(crate) async fn page(state: Shared, base: Base) -> Result<Markup, Error> {
    let schedules = state.client.schedules().await?;
    let now = Utc::now();
    let body = html! {
        h1 { "Schedules" }
        @if schedules.is_empty() {
            p.muted { "No schedule: workers write theirs when they start (Worker::builder(..).schedule(..))." }
        } @else {
            table #schedules {
                thead { tr {
                    th { "name" } th { "flow" } th { "cron" } th { "time zone" } th { "state" } th { "missed ticks" }
                    th { "last tick" } th { "next tick" } th { "last run" } th { "input" }
                } }
                tbody {
                    @for s in &schedules {
                        tr data-schedule=(s.schedule_name) {
                            td { (s.schedule_name) }
                            td { a href=(base.to(&format!("/flows/{}", s.flow_slug))) { (s.flow_slug) } }
                            td.mono { (s.cron) }
                            td { (s.timezone) }
                            td {
                                @if s.paused { span.badge.st-cancelled { "paused" } }
                                @else if s.firing { span.badge.st-completed { "firing" } }
                                @else { span.badge.st-created { "no worker fires it" } }
                            }
                            td { (s.missed) @if s.missed == "catch_up" { " (up to " (s.catch_up_max) ")" } }
                            td { (maybe_time(s.last_fired_tick)) }
                            td { @if s.paused { span.muted { "–" } } @else { (maybe_time(s.next_tick(now))) } }
                            td.mono {
                                @if let Some(run) = s.last_run_id {
                                    a href=(base.to(&format!("/runs/{run}"))) { (run) }
                                }
                            }
                            td { @match &s.input { Some(input) => (json(input)), None => span.muted { "computed per tick" } } }
                        }
                    }
                }
            }
        }
    };
    Ok(frame(&base, "/schedules", "Schedules", &body))
}
