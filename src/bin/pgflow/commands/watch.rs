use std::pin::pin;

use chrono::Utc;
use futures_util::StreamExt;
use pgflow_client::Client;
use uuid::Uuid;

use crate::CliResult;
use crate::run_view::render_run;

pub(crate) async fn watch(client: &Client, run_id: Uuid, json: bool) -> CliResult {
    let run = client.run(run_id);
    let events = run.events().await.map_err(|err| err.to_string())?;
    if !json {
        let state = run.state().await.map_err(|err| err.to_string())?;
        print!("{}", render_run(&state));
    }
    let mut events = pin!(events);
    while let Some(event) = events.next().await {
        let event = event.map_err(|err| err.to_string())?;
        if json {
            println!(
                "{}",
                serde_json::to_string(&event).map_err(|err| err.to_string())?
            );
        } else {
            println!("{} {event}", Utc::now().format("%H:%M:%S%.3f"));
        }
    }
    if !json {
        let state = run.state().await.map_err(|err| err.to_string())?;
        print!("{}", render_run(&state));
    }
    Ok(())
}
