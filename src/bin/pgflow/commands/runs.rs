use std::io::Write;

use pgflow_client::{Client, RunStatus};

use crate::CliResult;
use crate::output::print_json;
use crate::style;
use crate::table::{Cell, table_text};
use crate::time::{duration, timestamp};

pub(crate) async fn runs(
    client: &Client,
    flow: Option<&str>,
    status: Option<RunStatus>,
    limit: u32,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    let runs = client.recent_runs(flow, status, limit).await?;
    let counts = client.run_counts().await?;
    if json {
        let counts: Vec<_> = counts
            .iter()
            .map(|(flow, status, count)| serde_json::json!({"flow_slug": flow, "status": status, "count": count}))
            .collect();
        return print_json(out, &serde_json::json!({"runs": runs, "counts": counts}));
    }
    let rows: Vec<[Cell; 7]> = runs
        .iter()
        .map(|run| {
            [
                run.run_id.to_string().into(),
                run.flow_slug.as_str().into(),
                // A delayed start not yet due shows as scheduled (Client::start_at).
                match run.scheduled_for {
                    Some(at) if run.ended_at.is_none() && at > chrono::Utc::now() => Cell::styled(
                        format!("scheduled {}", timestamp(at)),
                        style::status("created"),
                    ),
                    _ => Cell::styled(run.status.as_str(), style::status(run.status.as_str())),
                },
                run.retry_count.to_string().into(),
                run.remaining_steps.to_string().into(),
                timestamp(run.started_at).into(),
                duration(Some(run.started_at), run.ended_at).into(),
            ]
        })
        .collect();
    let titles = [
        "RUN ID",
        "FLOW",
        "STATUS",
        "RETRIES",
        "STEPS LEFT",
        "STARTED",
        "DURATION",
    ];
    write!(out, "{}", table_text(titles, &rows))?;
    writeln!(out)?;
    for (flow, status, count) in counts {
        let status = style::paint(style::status(status.as_str()), status.as_str());
        writeln!(out, "{flow}: {count} {status}")?;
    }
    Ok(())
}
