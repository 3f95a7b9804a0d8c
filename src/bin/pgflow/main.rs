//! The `pgflow` command-line tool: install the engine, print its SQL, inspect flows and runs,
//! start and watch runs.
//!
//! Every command but `schema` connects to `--database-url` or `DATABASE_URL`. Output is meant
//! for a terminal; `--json` gives the same data for scripts. Errors go to stderr, with exit
//! status 1.

mod args;
mod commands;
mod run_view;
mod table;

use std::process::ExitCode;

use clap::Parser;
use pgflow_client::Client;
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;

use args::{Cli, Command};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) type CliResult = Result<(), String>;

async fn run(cli: Cli) -> CliResult {
    if let Command::Schema = cli.command {
        print!("{}", pgflow_core::schema::install_sql());
        return Ok(());
    }
    let url = cli
        .database_url
        .as_deref()
        .ok_or("no database: pass --database-url or set DATABASE_URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .map_err(|err| format!("cannot connect to the database: {err}"))?;
    let client = Client::new(pool);
    let result = commands::dispatch(&client, cli.command, cli.json).await;
    client.pool().close().await;
    result
}

pub(crate) fn print_json(value: &impl Serialize) -> CliResult {
    let text = serde_json::to_string_pretty(value).map_err(|err| err.to_string())?;
    println!("{text}");
    Ok(())
}
