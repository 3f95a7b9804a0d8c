use pgflow_client::Client;
use uuid::Uuid;

use crate::run_view::render_run;
use crate::{CliResult, print_json};

pub(crate) async fn show_run(client: &Client, run_id: Uuid, json: bool) -> CliResult {
    let state = client
        .run_state(run_id)
        .await
        .map_err(|err| err.to_string())?;
    if json {
        return print_json(&state);
    }
    print!("{}", render_run(&state));
    Ok(())
}
