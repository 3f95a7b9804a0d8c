use std::io::Write;

use std::pin::pin;

use chrono::Utc;
use futures_util::StreamExt;
use pgflow_client::Client;
use uuid::Uuid;

use crate::CliResult;
use crate::run_view::render_run;

pub(crate) async fn watch(
    client: &Client,
    run_id: Uuid,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    let run = client.run(run_id);
    let events = run.events().await?;
    if !json {
        let state = run.state().await?;
        write!(out, "{}", render_run(&state))?;
    }
    let mut events = pin!(events);
    while let Some(event) = events.next().await {
        let event = event?;
        if json {
            writeln!(out, "{}", serde_json::to_string(&event)?)?;
        } else {
            writeln!(out, "{} {event}", Utc::now().format("%H:%M:%S%.3f"))?;
        }
    }
    if !json {
        let state = run.state().await?;
        write!(out, "{}", render_run(&state))?;
    }
    Ok(())
}
