//! Integration tests: one binary, each test in its own database on a real PostgreSQL server
//! (`DATABASE_URL`, or a throwaway server started for this process).

// Test helpers are shared between modules with `pub`; the binary exports nothing.
#![allow(unreachable_pub)]

mod check;
// The CLI's tests need its binary: `cargo test --all-features` (README's test command).
#[cfg(feature = "cli")]
mod cli;
#[cfg(feature = "cli")]
mod cli_control;
#[cfg(feature = "cli")]
mod cli_operator;
#[cfg(feature = "cli")]
mod cli_skips;
mod client;
#[cfg(feature = "dashboard")]
mod dashboard;
mod engine;
mod flow_shapes;
mod install;
mod limits;
mod priority;
mod prune;
mod reliability;
mod retry_policy;
mod run_control;
mod run_skips;
mod schedules;
mod security;
mod subflows;
mod support;
mod trace_context;
mod typed_conditions;
mod worker;
