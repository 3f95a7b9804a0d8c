use std::io::Write;

use pgflow_client::{Client, RunStatus};

use crate::CliResult;
use crate::output::print_json;
use crate::run_view::duration;
use crate::table::table_text;

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
    let mut table = vec![[
        "RUN ID".to_string(),
        "FLOW".into(),
        "STATUS".into(),
        "STEPS LEFT".into(),
        "STARTED".into(),
        "DURATION".into(),
    ]];
    for run in &runs {
        table.push([
            run.run_id.to_string(),
            run.flow_slug.clone(),
            run.status.to_string(),
            run.remaining_steps.to_string(),
            run.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            duration(Some(run.started_at), run.ended_at),
        ]);
    }
    write!(out, "{}", table_text(&table))?;
    writeln!(out)?;
    for (flow, status, count) in counts {
        writeln!(out, "{flow}: {count} {status}")?;
    }
    Ok(())
}
