use pgflow_client::Client;
use serde_json::Value;
use uuid::Uuid;

use crate::{CliResult, print_json};

pub(crate) async fn start(
    client: &Client,
    flow: &str,
    input: &str,
    run_id: Option<Uuid>,
    json: bool,
) -> CliResult {
    let input: Value =
        serde_json::from_str(input).map_err(|err| format!("the input is not valid JSON: {err}"))?;
    let run = client
        .start_json(flow, input, run_id)
        .await
        .map_err(|err| err.to_string())?;
    if json {
        return print_json(&serde_json::json!({ "run_id": run.id() }));
    }
    println!("{}", run.id());
    Ok(())
}
