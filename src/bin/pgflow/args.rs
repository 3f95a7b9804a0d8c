//! The command line: global options and one variant per command.

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use pgflow_client::RunStatus;
use uuid::Uuid;

use crate::time::parse_time;

/// `watch`'s exit statuses, for scripts that wait on a run; the numbers are in
/// `commands::watch` and docs/operating.md.
const WATCH_EXIT_STATUS: &str = "\
Exit status:
  0  the run completed
  1  the run could not be watched (no database, no such run, connection lost)
  2  invalid arguments
  3  the run failed
  4  --timeout passed before the run ended (the run goes on)
  5  the run was cancelled";

/// `cancel`'s exit statuses; its help gives them after the forms of a time.
const CANCEL_EXIT_STATUS: &str = "\
Exit status:
  0  the run was cancelled, or had already ended (the output says which); with --flow, the
     flow's started runs were cancelled (the output says how many, maybe none)
  1  the command failed: no database, no such run or flow, the role may not cancel, or
     the connection was lost (with --flow, the runs cancelled before stay cancelled)
  2  invalid arguments";

/// `retry`'s exit statuses; its help gives them after the forms of a time.
const RETRY_EXIT_STATUS: &str = "\
Exit status:
  0  the run was retried; with --flow, the flow's failed runs were (the output says how many,
     maybe none)
  1  the command failed: no database, no such run or flow, the role may not retry, or
     the connection was lost (with --flow, the runs retried before stay retried)
  2  invalid arguments
  3  the run is started or completed: only a failed or cancelled run can be retried; nothing
     changed";

/// The forms of a time argument, then `exit_status`.
fn with_time_formats(exit_status: &str) -> String {
    format!("{}\n\n{exit_status}", crate::time::TIME_FORMATS)
}

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
        /// Only runs in this status: started, completed, failed or cancelled.
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
        /// Also list every failed attempt of every task, with its error and the run's retry
        /// it belongs to (from `pgflow_ext.step_task_attempts`), and how the run had ended
        /// before each of its retries (`pgflow_ext.run_retries`); with `--json`, under the
        /// keys `attempts` and `retries`.
        #[arg(long)]
        attempts: bool,
    },
    /// Cancel a started run (its queued and running tasks stop), or every started run of a
    /// flow. Completed steps keep their outputs; `pgflow retry` starts the run again.
    #[command(after_help = with_time_formats(CANCEL_EXIT_STATUS))]
    Cancel {
        /// The run's id.
        #[arg(required_unless_present = "flow", conflicts_with = "flow")]
        run_id: Option<Uuid>,
        /// Cancel every started run of this flow instead.
        #[arg(long)]
        flow: Option<String>,
        /// With --flow: only the runs started before this time.
        #[arg(long, requires = "flow", conflicts_with = "run_id", value_name = "TIME",
              value_parser = parse_time)]
        started_before: Option<DateTime<Utc>>,
    },
    /// Start a failed or cancelled run again from its completed steps, or every failed run of
    /// a flow. Its unfinished tasks run again with fresh attempts; completed ones do not.
    #[command(after_help = with_time_formats(RETRY_EXIT_STATUS))]
    Retry {
        /// The run's id.
        #[arg(required_unless_present = "flow", conflicts_with = "flow")]
        run_id: Option<Uuid>,
        /// Retry every failed run of this flow instead (in batches, safe while workers run).
        #[arg(long)]
        flow: Option<String>,
        /// With --flow: only the runs that failed at or after this time.
        #[arg(long, requires = "flow", conflicts_with = "run_id", value_name = "TIME",
              value_parser = parse_time)]
        failed_since: Option<DateTime<Utc>>,
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
        /// The run's priority, -32768 to 32767: among a flow's ready tasks, Rust workers
        /// start those of higher-priority runs first. 0 is the default.
        #[arg(
            long,
            default_value_t = 0,
            allow_negative_numbers = true,
            value_name = "N"
        )]
        priority: i16,
    },
    /// Check that every run is consistent (counters, statuses, queues); exit status 1 if not.
    Check,
    /// List the schedules (written by the workers that fire them): flow, cron expression,
    /// time zone, state, missed-tick policy, last and next tick. Or pause or resume one.
    Schedules {
        #[command(subcommand)]
        action: Option<ScheduleAction>,
    },
    /// Delete the runs that ended (completed, failed or cancelled) before the given age, with
    /// their steps, tasks, attempt history, queue messages and archive rows, and the workers
    /// silent as long. Never a started run. In batches, safe while workers run.
    #[command(after_help = crate::commands::prune::AGE_FORMATS)]
    Prune {
        /// What ended more than this long ago goes: 30d, 12h, 90m, 45s, 2w.
        #[arg(long, value_name = "AGE", value_parser = crate::commands::prune::parse_age)]
        older_than: std::time::Duration,
        /// Count what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Serve the web dashboard (flows, runs, workers, schedules, stuck runs) until Ctrl-C.
    /// Read-only unless --allow-actions; it has no login of its own: keep it on localhost or
    /// behind a proxy that authenticates.
    Dashboard {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDRESS")]
        listen: std::net::SocketAddr,
        /// Offer to cancel and retry runs.
        #[arg(long)]
        allow_actions: bool,
    },
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

/// `pgflow schedules pause|resume <name>`.
#[derive(Debug, Subcommand)]
pub(crate) enum ScheduleAction {
    /// Pause a schedule: no tick fires until it is resumed; ticks that fall meanwhile never do.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Resume a paused schedule from its next tick.
    Resume {
        /// The schedule's name.
        name: String,
    },
}
