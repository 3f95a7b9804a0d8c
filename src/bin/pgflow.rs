//! The `pgflow` command-line tool: install the engine, print its SQL, inspect flows and runs,
//! start and watch runs.
//!
//! Every command but `schema` connects to `--database-url` or `DATABASE_URL`. Output is meant
//! for a terminal; `--json` gives the same data for scripts. Errors go to stderr, with exit
//! status 1.

use std::fmt::Write as _;
use std::pin::pin;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use pgflow_client::{Client, RunState, RunStatus, TaskStatus};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "pgflow",
    version,
    about = "Install and operate the pgflow workflow engine"
)]
struct Cli {
    /// The database to use.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    Watch {
        /// The run's id.
        run_id: Uuid,
    },
}

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

type CliResult = Result<(), String>;

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
    let json = cli.json;
    let result = match cli.command {
        Command::Schema => Ok(()),
        Command::Install => install(&client, json).await,
        Command::Flows => flows(&client, json).await,
        Command::Runs {
            flow,
            status,
            limit,
        } => runs(&client, flow.as_deref(), status, limit, json).await,
        Command::Run { run_id } => show_run(&client, run_id, json).await,
        Command::Start {
            flow,
            input,
            run_id,
        } => start(&client, &flow, &input, run_id, json).await,
        Command::Watch { run_id } => watch(&client, run_id, json).await,
        Command::Check => check(&client, json).await,
    };
    client.pool().close().await;
    result
}

fn print_json(value: &impl Serialize) -> CliResult {
    let text = serde_json::to_string_pretty(value).map_err(|err| err.to_string())?;
    println!("{text}");
    Ok(())
}

async fn install(client: &Client, json: bool) -> CliResult {
    let report = client.install().await.map_err(|err| err.to_string())?;
    if json {
        return print_json(&serde_json::json!({
            "pgmq": report.pgmq,
            "applied": report.applied,
            "schema_version": report.schema_version,
        }));
    }
    let pgmq = match report.pgmq {
        "existing" => "pgmq was already installed",
        "extension" => "installed pgmq (extension)",
        _ => "installed pgmq (SQL-only)",
    };
    println!("{pgmq}");
    if report.applied.is_empty() {
        println!(
            "pgflow schema is up to date (version {})",
            report.schema_version
        );
    } else {
        println!(
            "applied pgflow migrations {:?}; schema version {}",
            report.applied, report.schema_version
        );
    }
    Ok(())
}

async fn flows(client: &Client, json: bool) -> CliResult {
    let flows = client.flows().await.map_err(|err| err.to_string())?;
    if json {
        return print_json(&flows);
    }
    if flows.is_empty() {
        println!("no flows");
    }
    for flow in flows {
        let o = flow.options;
        println!(
            "{}  (max_attempts {}, base_delay {}s, timeout {}s)",
            flow.slug,
            o.max_attempts.unwrap_or(3),
            o.base_delay.unwrap_or(5),
            o.timeout.unwrap_or(60)
        );
        for step in &flow.steps {
            let mut line = format!("  {} [{}]", step.slug, step.kind);
            if !step.dependencies.is_empty() {
                let _ = write!(line, " <- {}", step.dependencies.join(", "));
            }
            let so = &step.options;
            for (name, value) in [
                ("max_attempts", so.max_attempts),
                ("base_delay", so.base_delay),
                ("timeout", so.timeout),
                ("start_delay", so.start_delay),
            ] {
                if let Some(value) = value {
                    let _ = write!(line, " {name}={value}");
                }
            }
            println!("{line}");
        }
    }
    Ok(())
}

async fn runs(
    client: &Client,
    flow: Option<&str>,
    status: Option<RunStatus>,
    limit: u32,
    json: bool,
) -> CliResult {
    let runs = client
        .recent_runs(flow, status, limit)
        .await
        .map_err(|err| err.to_string())?;
    let counts = client.run_counts().await.map_err(|err| err.to_string())?;
    if json {
        let counts: Vec<_> = counts
            .iter()
            .map(|(flow, status, count)| serde_json::json!({"flow_slug": flow, "status": status, "count": count}))
            .collect();
        return print_json(&serde_json::json!({"runs": runs, "counts": counts}));
    }
    let mut table = vec![[
        "RUN ID".to_string(),
        "FLOW".into(),
        "STATUS".into(),
        "STEPS LEFT".into(),
        "STARTED".into(),
        "DURATION".into(),
    ]];
    for run in &runs {
        table.push([
            run.run_id.to_string(),
            run.flow_slug.clone(),
            run.status.to_string(),
            run.remaining_steps.to_string(),
            run.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            duration(Some(run.started_at), run.ended_at),
        ]);
    }
    print_table(&table);
    println!();
    for (flow, status, count) in counts {
        println!("{flow}: {count} {status}");
    }
    Ok(())
}

async fn show_run(client: &Client, run_id: Uuid, json: bool) -> CliResult {
    let state = client
        .run_state(run_id)
        .await
        .map_err(|err| err.to_string())?;
    if json {
        return print_json(&state);
    }
    print!("{}", render_run(&state));
    Ok(())
}

/// The run as a table of its steps, in the order of definition.
fn render_run(state: &RunState) -> String {
    let run = &state.run;
    let mut out = format!(
        "run {} of flow {}: {} ({})\n",
        run.run_id,
        run.flow_slug,
        run.status,
        duration(Some(run.started_at), run.completed_at.or(run.failed_at))
    );
    let mut table = vec![[
        "STEP".to_string(),
        "KIND".into(),
        "STATUS".into(),
        "TASKS".into(),
        "ATTEMPTS".into(),
        "DURATION".into(),
        "ERROR".into(),
    ]];
    for step in &state.steps {
        let tasks: Vec<_> = state
            .tasks
            .iter()
            .filter(|t| t.step_slug == step.step_slug)
            .collect();
        let done = tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Completed)
            .count();
        let total = step
            .initial_tasks
            .map_or_else(|| "?".to_string(), |n| n.to_string());
        let attempts = tasks.iter().map(|t| t.attempts_count).max().unwrap_or(0);
        table.push([
            step.step_slug.clone(),
            step.step_type.to_string(),
            step.status.to_string(),
            format!("{done}/{total}"),
            attempts.to_string(),
            duration(step.started_at, step.completed_at.or(step.failed_at)),
            step.error_message.clone().unwrap_or_default(),
        ]);
    }
    out.push_str(&table_text(&table));
    out
}

async fn start(
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

async fn watch(client: &Client, run_id: Uuid, json: bool) -> CliResult {
    let run = client.run(run_id);
    let events = run.events().await.map_err(|err| err.to_string())?;
    if !json {
        let state = run.state().await.map_err(|err| err.to_string())?;
        print!("{}", render_run(&state));
    }
    let mut events = pin!(events);
    while let Some(event) = events.next().await {
        let event = event.map_err(|err| err.to_string())?;
        if json {
            println!(
                "{}",
                serde_json::to_string(&event).map_err(|err| err.to_string())?
            );
        } else {
            println!("{} {event}", Utc::now().format("%H:%M:%S%.3f"));
        }
    }
    if !json {
        let state = run.state().await.map_err(|err| err.to_string())?;
        print!("{}", render_run(&state));
    }
    Ok(())
}

async fn check(client: &Client, json: bool) -> CliResult {
    let violations = client.check().await.map_err(|err| err.to_string())?;
    if json {
        print_json(&violations)?;
    } else if violations.is_empty() {
        println!("every run is consistent");
    } else {
        for violation in &violations {
            println!("{violation}");
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(format!("{} inconsistencies found", violations.len()))
    }
}

fn duration(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> String {
    let Some(start) = start else {
        return "-".into();
    };
    let end = end.unwrap_or_else(Utc::now);
    let ms = (end - start).num_milliseconds().max(0);
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
    }
}

fn table_text<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn print_table<const N: usize>(rows: &[[String; N]]) {
    print!("{}", table_text(rows));
}
