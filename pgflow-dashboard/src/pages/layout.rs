//! What every page shares: the frame (title, navigation, style), where the router is mounted,
//! and how times, durations and JSON are shown.

use axum::extract::{FromRequestParts, OriginalUri};
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::Value;

use crate::dag::{STATUS_COLOURS, UNKNOWN_COLOUR};

/// Where the app mounted the dashboard (`""` at the root, `"/admin/pgflow"` under
/// `Router::nest("/admin/pgflow", …)`): links start with it.
#[derive(Debug, Clone)]
pub(crate) struct Base(pub(crate) String);

impl Base {
    /// The link to `path` (which starts with `/`) under the mount point.
    pub(crate) fn to(&self, path: &str) -> String {
        format!("{}{path}", self.0)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Base {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Under `nest`, the request's URI is the part below the mount point and OriginalUri
        // the whole path: the mount point is the difference.
        let inner = parts.uri.path().to_owned();
        let whole = parts.extensions.get::<OriginalUri>().map_or_else(
            || inner.clone(),
            |OriginalUri(uri): &OriginalUri| uri.path().to_owned(),
        );
        Ok(Self(mount_point(&whole, &inner)))
    }
}

fn mount_point(whole: &str, inner: &str) -> String {
    let base = if inner == "/" && !whole.ends_with('/') {
        whole
    } else {
        whole.strip_suffix(inner).unwrap_or("")
    };
    base.trim_end_matches('/').to_owned()
}

/// The pages of the navigation bar: path and title.
const NAV: &[(&str, &str)] = &[
    ("/runs", "Runs"),
    ("/flows", "Flows"),
    ("/workers", "Workers"),
    ("/schedules", "Schedules"),
    ("/stuck", "Stuck runs"),
];

/// The style sheet, inline: the dashboard serves no files.
pub(crate) const CSS: &str = "
:root { font-family: system-ui, sans-serif; color: #111827; background: #f9fafb; }
body { margin: 0; }
nav { background: #111827; padding: 0.6rem 1rem; display: flex; gap: 1.2rem; align-items: center; }
nav a { color: #d1d5db; text-decoration: none; }
nav a.here { color: #fff; font-weight: 600; }
nav .brand { color: #fff; font-weight: 700; margin-right: 1rem; }
main { padding: 1rem 1.5rem; max-width: 1400px; }
h1 { font-size: 1.4rem; margin: 0.3rem 0 1rem; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 0.5rem; }
table { border-collapse: collapse; background: #fff; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre, .mono { font-family: ui-monospace, monospace; font-size: 0.85rem; }
pre { background: #fff; border: 1px solid #e5e7eb; padding: 0.5rem; max-height: 24rem; overflow: auto; white-space: pre-wrap; word-break: break-all; }
.badge { display: inline-block; padding: 0.05rem 0.5rem; border-radius: 0.6rem; color: #fff; font-size: 0.8rem; }
.error-text { color: #b91c1c; white-space: pre-wrap; }
.muted { color: #6b7280; }
.cards { display: flex; gap: 0.8rem; flex-wrap: wrap; margin-bottom: 1rem; }
.card { background: #fff; border: 1px solid #e5e7eb; border-radius: 0.4rem; padding: 0.5rem 0.9rem; min-width: 7rem; }
.card .n { font-size: 1.3rem; font-weight: 600; }
form.filters { display: flex; gap: 0.6rem; flex-wrap: wrap; align-items: end; margin-bottom: 1rem; }
form.filters label { display: flex; flex-direction: column; font-size: 0.8rem; gap: 0.15rem; }
form.inline { display: inline; }
button { cursor: pointer; }
button.danger { background: #dc2626; color: #fff; border: 0; padding: 0.3rem 0.8rem; border-radius: 0.3rem; }
button.primary { background: #2563eb; color: #fff; border: 0; padding: 0.3rem 0.8rem; border-radius: 0.3rem; }
.notice { background: #ecfdf5; border: 1px solid #10b981; padding: 0.4rem 0.8rem; margin-bottom: 1rem; }
svg.dag, svg.throughput { background: #fff; border: 1px solid #e5e7eb; }
svg.dag text { font-size: 12px; }
svg.dag text.on-colour { fill: #fff; }
svg.dag text.on-plain { fill: #111827; }
.progress { display: inline-block; width: 6rem; height: 0.6rem; background: #e5e7eb; vertical-align: middle; }
.progress span { display: block; height: 100%; background: #16a34a; }
.pager { margin: 0.8rem 0; display: flex; gap: 1rem; }
";

/// The badge colours, from the one table of status colours.
fn status_css() -> String {
    let mut css = String::new();
    for (status, colour) in STATUS_COLOURS {
        css.push_str(&format!(".badge.st-{status} {{ background: {colour}; }}\n"));
    }
    css.push_str(&format!(".badge {{ background: {UNKNOWN_COLOUR}; }}\n"));
    css
}

/// A page: the frame around `body`, with `title` and the navigation (`here` marked).
pub(crate) fn page(base: &Base, here: &str, title: &str, body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · pgflow" }
                style { (PreEscaped(CSS)) (PreEscaped(status_css())) }
            }
            body {
                nav {
                    a.brand href=(base.to("/runs")) { "pgflow" }
                    @for (path, name) in NAV {
                        a class=[(*path == here).then_some("here")] href=(base.to(path)) { (name) }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A status as a coloured badge.
pub(crate) fn badge(status: &str) -> Markup {
    html! { span class={"badge st-" (status)} data-status=(status) { (status) } }
}

/// A time, to the second, UTC.
pub(crate) fn time(at: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339()) title=(at.to_rfc3339()) {
            (at.format("%Y-%m-%d %H:%M:%S"))
        }
    }
}

/// An optional time, `–` when absent.
pub(crate) fn maybe_time(at: Option<DateTime<Utc>>) -> Markup {
    match at {
        Some(at) => time(at),
        None => html! { span.muted { "–" } },
    }
}

/// How long from `start` to `end`, or to now when it has not ended.
pub(crate) fn duration(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> String {
    let Some(start) = start else {
        return "–".to_owned();
    };
    let running = end.is_none();
    let took = end.unwrap_or_else(Utc::now) - start;
    let ms = took.num_milliseconds().max(0);
    let text = if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m {}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h {}m", ms / 3_600_000, (ms / 60_000) % 60)
    };
    if running {
        format!("{text} so far")
    } else {
        text
    }
}

/// The largest JSON text shown in full; beyond it, the start and a note.
const JSON_SHOWN: usize = 20_000;

/// A JSON value, pretty-printed, in a `<pre>`; escaped like everything else.
pub(crate) fn json(value: &Value) -> Markup {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    let total = text.len();
    let shown = if total > JSON_SHOWN {
        let mut end = JSON_SHOWN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    } else {
        &text
    };
    html! {
        pre.json { (shown) }
        @if total > JSON_SHOWN {
            p.muted { "(the first " (JSON_SHOWN) " of " (total) " bytes)" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mount_point;

    #[test]
    fn the_mount_point_is_what_nest_stripped() {
        assert_eq!(mount_point("/runs", "/runs"), "");
        assert_eq!(mount_point("/", "/"), "");
        assert_eq!(
            mount_point("/admin/pgflow/runs/x", "/runs/x"),
            "/admin/pgflow"
        );
        assert_eq!(mount_point("/admin/pgflow", "/"), "/admin/pgflow");
        assert_eq!(mount_point("/admin/pgflow/", "/"), "/admin/pgflow");
    }
}
