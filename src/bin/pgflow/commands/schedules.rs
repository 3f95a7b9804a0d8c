//! `pgflow schedules`: list the schedules; `pgflow schedules pause|resume <name>`.

use std::io::Write;

use chrono::Utc;
use pgflow_client::Client;

use crate::CliResult;
use crate::args::ScheduleAction;
use crate::output::print_json;
use crate::style;
use crate::table::{Cell, table_text};
use crate::time::timestamp;

pub(crate) async fn schedules(
    client: &Client,
    action: Option<ScheduleAction>,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    match action {
        None => list(client, json, out).await,
        Some(ScheduleAction::Pause { name }) => {
            let changed = client.pause_schedule(&name).await?;
            report(out, json, &name, "paused", changed)
        }
        Some(ScheduleAction::Resume { name }) => {
            let changed = client.resume_schedule(&name).await?;
            report(out, json, &name, "resumed", changed)
        }
    }
}

fn report(out: &mut impl Write, json: bool, name: &str, done: &str, changed: bool) -> CliResult {
    if json {
        let paused = done == "paused";
        return print_json(
            out,
            &serde_json::json!({"schedule_name": name, "paused": paused, "changed": changed}),
        );
    }
    if changed {
        writeln!(out, "schedule {name} {done}")?;
    } else {
        writeln!(out, "schedule {name} was already {done}: nothing changed")?;
    }
    Ok(())
}

async fn list(client: &Client, json: bool, out: &mut impl Write) -> CliResult {
    let schedules = client.schedules().await?;
    let now = Utc::now();
    if json {
        let rows: Vec<_> = schedules
            .iter()
            .map(|schedule| {
                let mut row = serde_json::to_value(schedule).unwrap_or_default();
                row["next_tick"] = serde_json::json!(schedule.next_tick(now));
                row
            })
            .collect();
        return print_json(out, &rows);
    }
    if schedules.is_empty() {
        writeln!(out, "no schedules")?;
        return Ok(());
    }
    let rows: Vec<[Cell; 8]> = schedules
        .iter()
        .map(|schedule| {
            let state = if schedule.paused {
                Cell::styled("paused", style::status("cancelled"))
            } else if schedule.firing {
                Cell::styled("active", style::status("completed"))
            } else {
                Cell::styled("no worker", style::status("failed"))
            };
            let next = if schedule.paused {
                String::new()
            } else {
                schedule.next_tick(now).map(timestamp).unwrap_or_default()
            };
            let missed = match schedule.missed.as_str() {
                "catch_up" => format!("catch_up {}", schedule.catch_up_max),
                other => other.to_string(),
            };
            [
                schedule.schedule_name.as_str().into(),
                schedule.flow_slug.as_str().into(),
                schedule.cron.as_str().into(),
                schedule.timezone.as_str().into(),
                state,
                missed.into(),
                schedule
                    .last_fired_tick
                    .map(timestamp)
                    .unwrap_or_default()
                    .into(),
                next.into(),
            ]
        })
        .collect();
    let titles = [
        "NAME",
        "FLOW",
        "CRON",
        "TIMEZONE",
        "STATE",
        "MISSED",
        "LAST TICK",
        "NEXT TICK",
    ];
    write!(out, "{}", table_text(titles, &rows))?;
    Ok(())
}
