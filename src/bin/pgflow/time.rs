//! Times as the operator reads them: in the local time zone (`TZ`), with the zone's offset, and
//! durations that stop when what they measure has ended.

use chrono::{DateTime, Local, Utc};

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
