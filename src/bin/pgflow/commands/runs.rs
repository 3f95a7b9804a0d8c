use pgflow_client::{Client, RunStatus};

use crate::run_view::duration;
use crate::table::print_table;
use crate::{CliResult, print_json};

pub(crate) async fn runs(
    client: &Client,
    flow: Option<&str>,
    status: Option<RunStatus>,
    limit: u32,
    json: bool,
) -> CliResult {
    let runs = client
        .recent_runs(flow, status, limit)
        .await
        .map_err(|err| err.to_string())?;
    let counts = client.run_counts().await.map_err(|err| err.to_string())?;
    if json {
        let counts: Vec<_> = counts
            .iter()
            .map(|(flow, status, count)| serde_json::json!({"flow_slug": flow, "status": status, "count": count}))
            .collect();
        return print_json(&serde_json::json!({"runs": runs, "counts": counts}));
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
    print_table(&table);
    println!();
    for (flow, status, count) in counts {
        println!("{flow}: {count} {status}");
    }
    Ok(())
}
