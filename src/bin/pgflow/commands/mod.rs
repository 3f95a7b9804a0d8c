//! One module per command that talks to the database.

mod check;
mod control;
mod dashboard;
mod flows;
mod install;
pub(crate) mod prune;
pub(crate) mod run;
mod runs;
mod schedules;
mod start;
mod watch;

use std::io::Write;
use std::time::Duration;

use pgflow_client::Client;

use crate::CliResult;
use crate::args::Command;

pub(crate) async fn dispatch(
    client: &Client,
    command: Command,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    match command {
        Command::Schema => Ok(()),
        Command::Install => install::install(client, json, out).await,
        Command::Flows => flows::flows(client, json, out).await,
        Command::Runs {
            flow,
            status,
            limit,
        } => runs::runs(client, flow.as_deref(), status, limit, json, out).await,
        Command::Run { run_id, attempts } => {
            run::show_run(client, run_id, attempts, json, out).await
        }
        Command::Start {
            flow,
            input,
            run_id,
            priority,
        } => start::start(client, &flow, &input, run_id, priority, json, out).await,
        Command::Watch { run_id, timeout } => {
            watch::watch(client, run_id, timeout.map(Duration::from_secs), json, out).await
        }
        Command::Check => check::check(client, json, out).await,
        Command::Dashboard {
            listen,
            allow_actions,
        } => dashboard::serve(client, listen, allow_actions, out).await,
        Command::Schedules { action } => schedules::schedules(client, action, json, out).await,
        Command::Prune {
            older_than,
            dry_run,
        } => prune::prune(client, older_than, dry_run, json, out).await,
        Command::Cancel {
            run_id,
            flow,
            started_before,
        } => {
            let target = control::Target::new(run_id, flow, started_before)?;
            control::cancel(client, target, json, out).await
        }
        Command::Retry {
            run_id,
            flow,
            failed_since,
        } => {
            let target = control::Target::new(run_id, flow, failed_since)?;
            control::retry(client, target, json, out).await
        }
    }
}
