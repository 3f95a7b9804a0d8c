//! The `pgflow` command-line tool: install the engine, print its SQL, inspect flows and runs,
//! start, watch, cancel and retry runs.
//!
//! Every command but `schema` connects to `--database-url` or `DATABASE_URL`. Output is meant
//! for a terminal; `--json` gives the same data for scripts. Errors go to stderr, with exit
//! status 1 (`watch` tells a failed run and a timeout apart, `retry` a run it may not retry:
//! see `args::WATCH_EXIT_STATUS` and `args::RETRY_EXIT_STATUS`).

mod args;
mod commands;
mod connect;
mod failure;
mod output;
mod progress;
mod run_view;
mod style;
mod subflow_tree;
mod table;
mod time;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pgflow_client::Client;

use args::{Cli, Command};
use failure::Failure;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = output::stdout();
    let result = match run(cli, &mut out).await {
        Ok(()) => out.flush().map_err(Failure::from),
        Err(failure) => Err(failure),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

pub(crate) type CliResult = Result<(), Failure>;

async fn run(cli: Cli, out: &mut impl Write) -> CliResult {
    if let Command::Schema = cli.command {
        out.write_all(pgflow_core::schema::install_sql().as_bytes())?;
        return Ok(());
    }
    let url = cli
        .database_url
        .as_deref()
        .ok_or("no database: pass --database-url or set DATABASE_URL")?;
    let pool = connect::connect(url, Duration::from_secs(cli.connect_timeout)).await?;
    let client = Client::new(pool);
    let result = commands::dispatch(&client, cli.command, cli.json, out).await;
    client.pool().close().await;
    result
}
