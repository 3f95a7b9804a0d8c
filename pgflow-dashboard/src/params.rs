//! The runs page's query parameters, checked one by one so that a bad one gets a page naming
//! it and saying what it takes, never a 500.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use pgflow_client::RunStatus;
use serde::Deserialize;
use uuid::Uuid;

use crate::Error;

/// Runs per page unless `limit` says otherwise, and the most it may say.
pub(crate) const DEFAULT_LIMIT: i64 = 50;
pub(crate) const MAX_LIMIT: i64 = 500;

/// The raw parameters, as the query string gives them: every field is text, so that parsing
/// happens here, with messages of our own.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawRunsQuery {
    flow: Option<String>,
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<String>,
    before: Option<String>,
    after: Option<String>,
}

/// A position in the runs list: the key the list is ordered by, `(started_at, run_id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) run_id: Uuid,
}

impl Cursor {
    /// The text form used in links: `<RFC 3339, microseconds, Z>~<run id>`; no character that
    /// a query string would need to escape.
    pub(crate) fn encode(self) -> String {
        format!(
            "{}~{}",
            self.started_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            self.run_id
        )
    }

    fn decode(name: &str, text: &str) -> Result<Self, Error> {
        let bad = || {
            Error::BadRequest(format!(
                "`{name}` must be a position from a page link (`<time>~<run id>`), not `{text}`"
            ))
        };
        let (at, id) = text.split_once('~').ok_or_else(bad)?;
        Ok(Self {
            started_at: DateTime::parse_from_rfc3339(at)
                .map_err(|_| bad())?
                .with_timezone(&Utc),
            run_id: id.parse().map_err(|_| bad())?,
        })
    }
}

/// Which way a page goes from its cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Page {
    /// The newest runs.
    First,
    /// The runs older than the cursor (the "older" link).
    Before(Cursor),
    /// The runs newer than the cursor (the "newer" link).
    After(Cursor),
}

/// The runs page's filter, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunsFilter {
    pub(crate) flow: Option<String>,
    pub(crate) status: Option<RunStatus>,
    pub(crate) since: Option<DateTime<Utc>>,
    pub(crate) until: Option<DateTime<Utc>>,
    pub(crate) limit: i64,
    pub(crate) page: Page,
}

impl RunsFilter {
    /// Checks every parameter; an empty one (as an HTML form sends for "any") counts as absent.
    pub(crate) fn parse(raw: RawRunsQuery) -> Result<Self, Error> {
        let present = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
        let flow = present(raw.flow);
        if let Some(flow) = &flow
            && let Err(problem) = pgflow_core::check_slug(flow)
        {
            return Err(Error::BadRequest(format!(
                "`flow`: `{flow}` is not a flow slug ({problem})"
            )));
        }
        let status = present(raw.status)
            .map(|s| s.parse::<RunStatus>())
            .transpose()
            .map_err(|err| Error::BadRequest(format!("`status`: {err}")))?;
        let since = present(raw.since)
            .map(|t| parse_time("since", &t))
            .transpose()?;
        let until = present(raw.until)
            .map(|t| parse_time("until", &t))
            .transpose()?;
        if let (Some(since), Some(until)) = (since, until)
            && since >= until
        {
            return Err(Error::BadRequest(format!(
                "`since` ({since}) must be before `until` ({until})"
            )));
        }
        let limit = match present(raw.limit) {
            None => DEFAULT_LIMIT,
            Some(text) => text
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    Error::BadRequest(format!(
                        "`limit` must be a whole number from 1 to {MAX_LIMIT}, not `{text}`"
                    ))
                })?,
        };
        let page = match (present(raw.before), present(raw.after)) {
            (None, None) => Page::First,
            (Some(before), None) => Page::Before(Cursor::decode("before", &before)?),
            (None, Some(after)) => Page::After(Cursor::decode("after", &after)?),
            (Some(_), Some(_)) => {
                return Err(Error::BadRequest(
                    "give `before` or `after`, not both".to_owned(),
                ));
            }
        };
        Ok(Self {
            flow,
            status,
            since,
            until,
            limit,
            page,
        })
    }

    /// The query string of this filter on another page (`page`), for links.
    pub(crate) fn query_string(&self, page: Page) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(flow) = &self.flow {
            pairs.push(("flow", flow.clone()));
        }
        if let Some(status) = self.status {
            pairs.push(("status", status.to_string()));
        }
        if let Some(since) = self.since {
            pairs.push(("since", form_time(since)));
        }
        if let Some(until) = self.until {
            pairs.push(("until", form_time(until)));
        }
        if self.limit != DEFAULT_LIMIT {
            pairs.push(("limit", self.limit.to_string()));
        }
        match page {
            Page::First => {}
            Page::Before(cursor) => pairs.push(("before", cursor.encode())),
            Page::After(cursor) => pairs.push(("after", cursor.encode())),
        }
        pairs
            .iter()
            .map(|(name, value)| format!("{name}={}", percent_encoded(value)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// A time as an `<input type="datetime-local">` shows it (UTC, to the second).
pub(crate) fn form_time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// RFC 3339 (`2026-12-02T08:00:00Z`), what a `datetime-local` input sends
/// (`2026-12-02T08:00`, taken as UTC) or a date (`2026-12-02`, midnight UTC).
fn parse_time(name: &str, text: &str) -> Result<DateTime<Utc>, Error> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(at) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(at.and_utc());
        }
    }
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        && let Some(midnight) = day.and_hms_opt(0, 0, 0)
    {
        return Ok(midnight.and_utc());
    }
    Err(Error::BadRequest(format!(
        "`{name}`: `{text}` is not a time; give 2026-12-02, 2026-12-02T08:30 (UTC) or \
         2026-12-02T08:30:00+01:00"
    )))
}

/// `text` fit for a query string value: everything but unreserved characters escaped.
fn percent_encoded(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<RunsFilter, Error> {
        let query = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encoded(v)))
            .collect::<Vec<_>>()
            .join("&");
        let raw: RawRunsQuery = serde_urlencoded_like(&query);
        RunsFilter::parse(raw)
    }

    /// The same deserialization axum's `Query` does.
    fn serde_urlencoded_like(query: &str) -> RawRunsQuery {
        let uri: axum::http::Uri = format!("/runs?{query}").parse().unwrap();
        axum::extract::Query::<RawRunsQuery>::try_from_uri(&uri)
            .unwrap()
            .0
    }

    #[test]
    fn a_filter_survives_its_own_links() {
        let cursor = Cursor {
            started_at: "2026-12-02T08:00:00.123456Z".parse().unwrap(),
            run_id: Uuid::new_v4(),
        };
        let filter = parse(&[
            ("flow", "orders"),
            ("status", "failed"),
            ("since", "2026-12-01"),
            ("until", "2026-12-02T09:30"),
            ("limit", "20"),
            ("before", &cursor.encode()),
        ])
        .unwrap();
        assert_eq!(filter.page, Page::Before(cursor));
        let again = RunsFilter::parse(serde_urlencoded_like(
            &filter.query_string(Page::Before(cursor)),
        ))
        .unwrap();
        assert_eq!(again, filter);
    }

    #[test]
    fn bad_parameters_are_named_with_what_they_take() {
        for (pairs, says) in [
            (
                vec![("status", "done")],
                "`status`: `done` is not a run status",
            ),
            (
                vec![("limit", "0")],
                "`limit` must be a whole number from 1 to 500",
            ),
            (vec![("limit", "x")], "`limit` must be a whole number"),
            (
                vec![("since", "yesterday")],
                "`since`: `yesterday` is not a time",
            ),
            (vec![("before", "nope")], "`before` must be a position"),
            (
                vec![("after", "2026-12-02T08:00:00Z~x")],
                "`after` must be a position",
            ),
            (
                vec![("flow", "<script>")],
                "`flow`: `<script>` is not a flow slug",
            ),
            (
                vec![("since", "2026-12-02"), ("until", "2026-12-01")],
                "must be before `until`",
            ),
        ] {
            let error = parse(&pairs).unwrap_err();
            assert!(matches!(error, Error::BadRequest(_)), "{error}");
            assert!(error.to_string().contains(says), "{error} lacks {says}");
        }
    }

    #[test]
    fn empty_form_fields_mean_any() {
        let filter = parse(&[("flow", ""), ("status", ""), ("since", " ")]).unwrap();
        assert_eq!(filter.flow, None);
        assert_eq!(filter.status, None);
        assert_eq!(filter.since, None);
        assert_eq!(filter.limit, DEFAULT_LIMIT);
    }
}
