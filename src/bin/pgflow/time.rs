//! Times as the operator reads them: in the local time zone (`TZ`), with the zone's offset, and
//! durations that stop when what they measure has ended.

use chrono::{DateTime, Local, LocalResult, NaiveDate, NaiveDateTime, TimeDelta, TimeZone, Utc};

/// Date, time and zone offset, e.g. `2026-12-02 01:50:12.345 +00:00`.
pub(crate) fn timestamp(at: DateTime<Utc>) -> String {
    at.with_timezone(&Local)
        .format("%Y-%m-%d %H:%M:%S%.3f %:z")
        .to_string()
}

/// The time of day alone, for columns under a header that gives the date and zone.
pub(crate) fn time_of_day(at: DateTime<Utc>) -> String {
    at.with_timezone(&Local).format("%H:%M:%S%.3f").to_string()
}

/// From `start` to `end`, or to now for what has not ended; `-` for what has not started.
pub(crate) fn duration(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> String {
    let Some(start) = start else {
        return "-".into();
    };
    let end = end.unwrap_or_else(Utc::now);
    let ms = (end - start).num_milliseconds().max(0);
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
    }
}

/// The forms a time argument takes, for the commands' help.
pub(crate) const TIME_FORMATS: &str = "\
TIME is one of:
  2026-12-02T05:30:00Z, 2026-12-02 05:30:00.123 +01:00   with an offset (as `pgflow runs` prints)
  2026-12-02 05:30[:00]                                  in the local time zone (TZ)
  2026-12-02                                             that day's midnight, local time
  90s, 30m, 2h, 7d                                       that long ago";

/// A time argument (see [`TIME_FORMATS`]) as a point in time.
pub(crate) fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    parse_time_at(text, Utc::now())
}

/// [`parse_time`], with relative times counted back from `now`.
fn parse_time_at(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Some(ago) = ago(text) {
        return ago.map(|ago| now - ago);
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f %:z", "%Y-%m-%d %H:%M:%S%.f%:z"] {
        if let Ok(at) = DateTime::parse_from_str(text, format) {
            return Ok(at.with_timezone(&Utc));
        }
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let local = [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
    .or_else(|| {
        NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .and_then(|day| day.and_hms_opt(0, 0, 0))
    });
    let Some(local) = local else {
        return Err(format!(
            "`{text}` is not a time: give e.g. 2026-12-02T05:30:00Z, 2026-12-02 05:30 (local \
             time), 2026-12-02, or 2h (two hours ago)"
        ));
    };
    match Local.from_local_datetime(&local) {
        LocalResult::Single(at) => Ok(at.with_timezone(&Utc)),
        LocalResult::Ambiguous(..) => Err(format!(
            "`{text}` happens twice in the local time zone (a clock change): give its offset, \
             e.g. `{text} +01:00`"
        )),
        LocalResult::None => Err(format!(
            "`{text}` does not exist in the local time zone (a clock change skips it)"
        )),
    }
}

/// `90s`, `30m`, `2h`, `7d` (optionally followed by ` ago`) as a duration; `None` when the
/// text has no such form, `Some(Err)` when it has but is out of range.
fn ago(text: &str) -> Option<Result<TimeDelta, String>> {
    let text = text.strip_suffix("ago").map_or(text, str::trim_end);
    let unit_at = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(unit_at);
    let seconds_per: i64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    let number: i64 = number.parse().ok()?;
    Some(
        number
            .checked_mul(seconds_per)
            .and_then(TimeDelta::try_seconds)
            .ok_or_else(|| format!("`{text}` is too long ago")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn times_with_an_offset_are_taken_as_they_are() {
        let now = at("2026-12-02T06:00:00Z");
        for (text, expected) in [
            ("2026-12-02T05:30:00Z", "2026-12-02T05:30:00Z"),
            ("2026-12-02T05:30:00.5+01:00", "2026-12-02T04:30:00.5Z"),
            ("2026-12-02 05:30:00.123 +01:00", "2026-12-02T04:30:00.123Z"),
            ("2026-12-02 05:30:00+00:00", "2026-12-02T05:30:00Z"),
        ] {
            assert_eq!(parse_time_at(text, now), Ok(at(expected)), "{text}");
        }
    }

    #[test]
    fn durations_count_back_from_now() {
        let now = at("2026-12-02T06:00:00Z");
        for (text, expected) in [
            ("90s", "2026-12-02T05:58:30Z"),
            ("30m", "2026-12-02T05:30:00Z"),
            ("2h", "2026-12-02T04:00:00Z"),
            ("1d", "2026-12-01T06:00:00Z"),
            ("2h ago", "2026-12-02T04:00:00Z"),
        ] {
            assert_eq!(parse_time_at(text, now), Ok(at(expected)), "{text}");
        }
        assert!(parse_time_at("99999999999999d", now).is_err());
    }

    #[test]
    fn anything_else_is_refused_with_the_forms_that_work() {
        let now = Utc::now();
        for text in ["yesterday", "2h30m", "12:00", "2026-13-01", "5w", ""] {
            let error = parse_time_at(text, now).unwrap_err();
            assert!(error.contains("is not a time"), "{text}: {error}");
        }
    }
}
