-- =====================================================================================
-- pgflow engine, migration 0013: Indexes of the dashboard's runs page (issue 23).
-- =====================================================================================
--
-- No pgflow version has these; everything is additive (docs/sql-api.md, "Indexes").
--
-- The runs page lists runs newest first, filtered by flow, status and start time, paged by
-- key (started_at, run_id), never by OFFSET; it counts the runs of each status started in a
-- window. Over millions of runs each of these must read only the rows it shows:
--
-- - idx_runs_status_started_at (status, started_at, run_id): the list without a flow, one
--   backward range scan per status merged by the page (a status filter of PostgreSQL's
--   own, status = ANY(...), would sort every run); and the counts per status, index-only.
-- - idx_runs_flow_status_started_at (flow_slug, status, started_at, run_id): the same for
--   one flow.
--
-- What they cost the engine: two index entries per run started, and two more when its
-- status changes. A status change is already a non-HOT update (idx_runs_status holds the
-- column), and no other column of these indexes ever changes, so the updates of
-- remaining_steps stay HOT. The throughput chart of the page reads migration 0008's
-- idx_runs_ended_at.
-- =====================================================================================

CREATE INDEX idx_runs_status_started_at
  ON pgflow.runs (status, started_at, run_id);

CREATE INDEX idx_runs_flow_status_started_at
  ON pgflow.runs (flow_slug, status, started_at, run_id);
