//! `prune`: delete what ended long ago (or, with `--dry-run`, count it).

use std::io::Write;
use std::time::Duration;

use pgflow_client::{Client, Error};

use crate::CliResult;
use crate::failure::Failure;
use crate::output::print_json;
use crate::time::timestamp;

/// The forms `--older-than` takes, for its help.
pub(crate) const AGE_FORMATS: &str = "\
An age is a whole number and a unit, no space: 30d (days), 12h (hours), 90m (minutes),
45s (seconds) or 2w (weeks). 0s prunes everything that has ended.";

/// An age argument (see [`AGE_FORMATS`]) as a duration.
pub(crate) fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit: write e.g. 30d, 12h, 90m or 45s"))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "`{text}` does not start with a number: write e.g. 30d, 12h, 90m or 45s"
        ));
    }
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{number}` is too large a number"))?;
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "`{unit}` is not a unit: use s, m, h, d or w (e.g. 30d, 12h, 90m)"
            ));
        }
    };
    // Within what PostgreSQL's interval holds, with room to spare (about 100,000 years).
    number
        .checked_mul(unit_secs)
        .filter(|secs| *secs <= 100_000 * 365 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long an age"))
}

pub(crate) async fn prune(
    client: &Client,
    older_than: Duration,
    dry_run: bool,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    let report = if dry_run {
        client.prune_preview(older_than).await
    } else {
        client.prune(older_than).await
    }
    .map_err(denied)?;
    if json {
        return print_json(
            out,
            &serde_json::json!({
                "dry_run": dry_run,
                "cutoff": report.cutoff,
                "runs": report.runs,
                "tasks": report.tasks,
                "messages": report.messages,
                "workers": report.workers,
            }),
        );
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    writeln!(
        out,
        "{verb} {} ended before {}: {} tasks, {} queue and archive messages; {} workers",
        plural(report.runs, "run"),
        timestamp(report.cutoff),
        report.tasks,
        report.messages,
        report.workers
    )?;
    if !dry_run && report.runs > 0 {
        writeln!(out, "in {}", plural(report.batches, "batch"))?;
    }
    Ok(())
}

fn plural(n: u64, what: &str) -> String {
    let suffix = match (n, what.ends_with('h')) {
        (1, _) => "",
        (_, true) => "es",
        _ => "s",
    };
    format!("{n} {what}{suffix}")
}

/// An error as the command's failure; a role without the right to prune is told who grants it.
fn denied(err: Error) -> Failure {
    match &err {
        Error::Database(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {
            Failure::error(format!(
                "{db}: the role may not prune; the schema's owner runs it or grants it \
                 (docs/security.md, retention)"
            ))
        }
        _ => Failure::from(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_age("90m"), Ok(Duration::from_secs(90 * 60)));
        assert_eq!(parse_age("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "30",
            "d",
            "-1d",
            "30 d",
            "30days",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }
}
