//! The worker against a real database: flows end to end, the concurrency limit, failures,
//! timeouts, shutdown, untyped handlers, dispatch latency, and cancelled runs.

mod cancel;
mod concurrency;
mod end_to_end;
mod failures;
mod foreign_schema;
mod latency;
mod many_flows;
mod requeue;
mod shutdown;
mod untyped;
