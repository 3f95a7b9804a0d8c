//! The runs page: a filter (flow, status, time), counts per status and throughput over a
//! window, and the runs newest first, paged by key.

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use maud::{Markup, html};
use pgflow_client::RunStatus;

use super::layout::{Base, badge, duration, page as frame, time};
use crate::params::{MAX_LIMIT, Page, RawRunsQuery, RunsFilter, form_time};
use crate::queries::runs::{BUCKETS, MAX_WINDOW_DAYS, RunsPage, runs_page};
use crate::{Error, Shared};

pub(crate) async fn page(
    state: Shared,
    base: Base,
    query: Result<Query<RawRunsQuery>, QueryRejection>,
) -> Result<Markup, Error> {
    let Query(raw) = query.map_err(|err| Error::BadRequest(err.body_text()))?;
    let filter = RunsFilter::parse(raw)?;
    let data = runs_page(state.client.pool(), &filter).await?;
    Ok(frame(&base, "/runs", "Runs", &body(&base, &filter, &data)))
}

fn body(base: &Base, filter: &RunsFilter, data: &RunsPage) -> Markup {
    let (since, until) = data.window;
    html! {
        h1 { "Runs" }
        (filters(filter, data))
        h2 { "Started between " (time(since)) " and " (time(until)) }
        p.muted { "Counts and throughput cover the filter's time range (the last day when it \
                   has no start, at most its last " (MAX_WINDOW_DAYS) " days)." }
        div.cards {
            @for (status, count) in &data.counts {
                div.card data-count=(status) {
                    div { (badge(status)) }
                    div.n { (count) }
                }
            }
            div.card {
                div.muted { "all runs (estimate)" }
                div.n {
                    @match data.estimated_total {
                        Some(total) => { "≈ " (total) },
                        None => span.muted { "not yet analyzed" },
                    }
                }
            }
        }
        (throughput(data))
        h2 { "Runs" }
        @if data.runs.is_empty() {
            p.muted { "No run matches." }
        } @else {
            table #runs {
                thead { tr {
                    th { "run" } th { "flow" } th { "status" } th { "started" }
                    th { "duration" } th { "steps left" } th { "retries" }
                } }
                tbody {
                    @for run in &data.runs {
                        tr data-run=(run.run_id) {
                            td.mono { a href=(base.to(&format!("/runs/{}", run.run_id))) { (run.run_id) } }
                            td { a href=(base.to(&format!("/flows/{}", run.flow_slug))) { (run.flow_slug) } }
                            td {
                                (badge(&run.status))
                                @if let Some(at) = run.scheduled_for.filter(|_| run.ended_at.is_none()) {
                                    " " span.muted { "scheduled for " (time(at)) }
                                }
                            }
                            td { (time(run.started_at)) }
                            td { (duration(Some(run.started_at), run.ended_at)) }
                            td.num { (run.remaining_steps) }
                            td.num { (run.retry_count) }
                        }
                    }
                }
            }
        }
        div.pager {
            @if data.has_newer {
                a rel="first" href={(base.to("/runs")) "?" (filter.query_string(Page::First))} { "« newest" }
                @if let Some(first) = data.runs.first() {
                    a rel="prev" href={(base.to("/runs")) "?" (filter.query_string(Page::After(first.cursor())))} { "‹ newer" }
                }
            }
            @if data.has_older && let Some(last) = data.runs.last() {
                a rel="next" href={(base.to("/runs")) "?" (filter.query_string(Page::Before(last.cursor())))} { "older ›" }
            }
        }
    }
}

fn filters(filter: &RunsFilter, data: &RunsPage) -> Markup {
    html! {
        form.filters method="get" {
            label { "flow"
                select name="flow" {
                    option value="" { "any" }
                    @for flow in &data.flows {
                        option value=(flow) selected[filter.flow.as_deref() == Some(flow.as_str())] { (flow) }
                    }
                }
            }
            label { "status"
                select name="status" {
                    option value="" { "any" }
                    @for status in RunStatus::ALL {
                        option value=(status) selected[filter.status == Some(*status)] { (status) }
                    }
                }
            }
            label { "started since (UTC)"
                input type="datetime-local" step="1" name="since" value=[filter.since.map(form_time)];
            }
            label { "until (UTC)"
                input type="datetime-local" step="1" name="until" value=[filter.until.map(form_time)];
            }
            label { "per page"
                input type="number" name="limit" min="1" max=(MAX_LIMIT) value=(filter.limit);
            }
            button.primary type="submit" { "Filter" }
        }
    }
}

/// Runs ended per slice of the window, as stacked bars: completed, failed, cancelled.
fn throughput(data: &RunsPage) -> Markup {
    let (since, until) = data.window;
    let slice = (until - since) / BUCKETS;
    let most = data
        .ended
        .iter()
        .map(|b| b.iter().sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let total: i64 = data.ended.iter().flatten().sum();
    let (bar_w, chart_h) = (24_i64, 80_i64);
    let colours = [
        crate::dag::colour("completed"),
        crate::dag::colour("failed"),
        crate::dag::colour("cancelled"),
    ];
    // Each bar's segments, bottom up: (x, top, height, colour, count).
    let mut segments = Vec::new();
    for (i, bucket) in data.ended.iter().enumerate() {
        let x = i64::try_from(i).unwrap_or(0) * bar_w;
        let mut bottom = chart_h;
        for (&n, colour) in bucket.iter().zip(colours) {
            let h = n * chart_h / most;
            if h > 0 {
                bottom -= h;
                segments.push((x, bottom, h, colour, n));
            }
        }
    }
    html! {
        h2 { "Throughput: " (total) " runs ended in the window" }
        p.muted { "per " (slice_text(slice)) ", completed / failed / cancelled" }
        svg.throughput xmlns="http://www.w3.org/2000/svg" width=(bar_w * i64::from(BUCKETS))
            height=(chart_h) role="img" aria-label="runs ended per time slice" {
            line x1="0" y1=(chart_h - 1) x2=(bar_w * i64::from(BUCKETS)) y2=(chart_h - 1)
                stroke="#9ca3af" {}
            @for (x, top, h, colour, n) in segments {
                rect x=(x + 2) y=(top) width=(bar_w - 4) height=(h) fill=(colour) {
                    title { (n) }
                }
            }
        }
    }
}

fn slice_text(slice: chrono::Duration) -> String {
    let minutes = slice.num_minutes();
    if minutes >= 120 {
        format!("{} hours", minutes / 60)
    } else if minutes >= 1 {
        format!("{minutes} minutes")
    } else {
        format!("{} seconds", slice.num_seconds().max(1))
    }
}
