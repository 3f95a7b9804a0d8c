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
    write!(out, "{}", render_run(&state))?;
    Ok(())
}
