//! One module per command that talks to the database.

mod check;
mod flows;
mod install;
mod run;
mod runs;
mod start;
mod watch;

use pgflow_client::Client;

use crate::CliResult;
use crate::args::Command;

pub(crate) async fn dispatch(client: &Client, command: Command, json: bool) -> CliResult {
    match command {
        Command::Schema => Ok(()),
        Command::Install => install::install(client, json).await,
        Command::Flows => flows::flows(client, json).await,
        Command::Runs {
            flow,
            status,
            limit,
        } => runs::runs(client, flow.as_deref(), status, limit, json).await,
        Command::Run { run_id } => run::show_run(client, run_id, json).await,
        Command::Start {
            flow,
            input,
            run_id,
        } => start::start(client, &flow, &input, run_id, json).await,
        Command::Watch { run_id } => watch::watch(client, run_id, json).await,
        Command::Check => check::check(client, json).await,
    }
}
