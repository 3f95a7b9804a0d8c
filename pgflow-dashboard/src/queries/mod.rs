//! Every query the dashboard makes of its own, by page. Statuses are read as text, not as the
//! client's enums: a status added by a later migration (a skipped step) shows as what it is
//! rather than failing the page. Rows whose columns grow with migrations are read as
//! `to_jsonb(row)` for the same reason.

pub(crate) mod run;
pub(crate) mod runs;
pub(crate) mod workers;

pub use runs::runs_page_plans;
