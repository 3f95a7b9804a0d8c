use std::io::Write;

use pgflow_client::Client;
use uuid::Uuid;

use crate::CliResult;
use crate::output::print_json;
use crate::run_view::render_run;

pub(crate) async fn show_run(
    client: &Client,
    run_id: Uuid,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    let state = client.run_state(run_id).await?;
    if json {
        return print_json(out, &state);
    }
    let shape = client.flow_shape(&state.run.flow_slug).await?;
    write!(out, "{}", render_run(&state, shape.as_ref()))?;
    Ok(())
}
