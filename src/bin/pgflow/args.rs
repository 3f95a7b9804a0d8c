//! The command line: global options and one variant per command.

use clap::{Parser, Subcommand};
use pgflow_client::RunStatus;
use uuid::Uuid;

/// `watch`'s exit statuses, for scripts that wait on a run; the numbers are in
/// `commands::watch` and docs/operating.md.
const WATCH_EXIT_STATUS: &str = "\
Exit status:
  0  the run completed
  1  the run could not be watched (no database, no such run, connection lost)
  2  invalid arguments
  3  the run failed
  4  --timeout passed before the run ended (the run goes on)";

#[derive(Debug, Parser)]
#[command(
    name = "pgflow",
    version,
    about = "Install and operate the pgflow workflow engine"
)]
pub(crate) struct Cli {
    /// The database to use.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub(crate) database_url: Option<String>,

    /// Seconds to wait for the database to answer before giving up.
    #[arg(long, global = true, default_value_t = 5, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) connect_timeout: u64,

    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Install pgmq (when absent) and the pgflow schema; safe to run again.
    Install,
    /// Print the complete install SQL of the pgflow schema (pgmq excluded), for your own
    /// migrations: apply it with `psql --single-transaction -f`.
    Schema,
    /// List the flows in the database with their steps.
    Flows,
    /// List recent runs and the number of runs per flow and status.
    Runs {
        /// Only runs of this flow.
        #[arg(long)]
        flow: Option<String>,
        /// Only runs in this status: started, completed or failed.
        #[arg(long)]
        status: Option<RunStatus>,
        /// How many runs to list.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one run: each step with its status, tasks, attempts, duration and error.
    Run {
        /// The run's id.
        run_id: Uuid,
        /// Also list every failed attempt of every task, with its error (from
        /// `pgflow_ext.step_task_attempts`); with `--json`, under the key `attempts`.
        #[arg(long)]
        attempts: bool,
    },
    /// Start a run of a flow with a JSON input; prints the run id.
    Start {
        /// The flow's slug.
        flow: String,
        /// The flow input, as JSON.
        input: String,
        /// A run id of your choosing (starting twice with one id starts one run).
        #[arg(long)]
        run_id: Option<Uuid>,
    },
    /// Check that every run is consistent (counters, statuses, queues); exit status 1 if not.
    Check,
    /// Follow a run's progress until it ends.
    #[command(after_help = WATCH_EXIT_STATUS)]
    Watch {
        /// The run's id.
        run_id: Uuid,
        /// Give up after this many seconds if the run has not ended (exit status 4).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
}
