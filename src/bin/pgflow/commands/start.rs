use std::io::Write;

use pgflow_client::{Client, StartOptions};
use serde_json::Value;
use uuid::Uuid;

use crate::CliResult;
use crate::output::print_json;

pub(crate) async fn start(
    client: &Client,
    flow: &str,
    input: &str,
    run_id: Option<Uuid>,
    priority: i16,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    let input: Value =
        serde_json::from_str(input).map_err(|err| format!("the input is not valid JSON: {err}"))?;
    let mut options = StartOptions::new().priority(priority);
    if let Some(run_id) = run_id {
        options = options.run_id(run_id);
    }
    let run = client.start_json_with(flow, input, options).await?;
    if json {
        return print_json(out, &serde_json::json!({ "run_id": run.id() }));
    }
    writeln!(out, "{}", run.id())?;
    Ok(())
}
