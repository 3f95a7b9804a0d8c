-- =====================================================================================
-- pgflow engine, migration 0006: the history of failed attempts.
--
-- pgflow 0.8.1 keeps only the last error of a task (step_tasks.error_message): each
-- failure overwrites the previous one. This migration keeps every failed attempt in
-- pgflow_ext.step_task_attempts, one row per (task, attempt), so an operator can see why
-- a task that succeeded on its third attempt failed the first two times.
--
-- The table lives in its own schema, pgflow_ext, so that `pgflow` keeps exactly pgflow
-- 0.8.1's seven tables. It is filled by a trigger on pgflow.step_tasks rather than by the
-- engine's functions, so that no function is restated:
--
--   * Every failure of a started task sets error_message in the same UPDATE that moves the
--     task out of 'started': back to 'queued' (a retry) or to 'failed' (fail_task, all its
--     forms, the worker's timeouts and permanent failures, which come through fail_task;
--     and the type violation of complete_tasks). The trigger fires on those UPDATEs.
--   * Starting a task (start_tasks) and completing it (complete_tasks) never name
--     error_message, so `UPDATE OF error_message` keeps the trigger off those paths.
--   * The WHEN clause asks for a started task leaving 'started' with a message, not for a
--     changed message: two attempts failing with the same message are two rows.
--
-- `attempt` is the task's attempts_count at the failure (1 for the first attempt). A task
-- taken again by start_tasks after its timeout, without a failure report, has no message
-- and no row here.
--
-- The trigger function runs as its owner (SECURITY DEFINER): the roles of
-- docs/security.md write step_tasks only through the engine's SECURITY DEFINER functions,
-- but a role granted UPDATE on step_tasks directly (grants from before 0004) must not fail
-- for lack of INSERT on this table. Deleting a task (so a run) deletes its attempts.
-- =====================================================================================

CREATE SCHEMA pgflow_ext;
REVOKE ALL ON SCHEMA pgflow_ext FROM public;

CREATE TABLE pgflow_ext.step_task_attempts (
  run_id         uuid        NOT NULL,
  step_slug      text        NOT NULL,
  task_index     integer     NOT NULL,
  attempt        integer     NOT NULL,
  error_message  text        NOT NULL,
  failed_at      timestamptz NOT NULL DEFAULT now(),
  last_worker_id uuid,
  CONSTRAINT step_task_attempts_pkey PRIMARY KEY (run_id, step_slug, task_index, attempt),
  CONSTRAINT step_task_attempts_task_fkey FOREIGN KEY (run_id, step_slug, task_index)
    REFERENCES pgflow.step_tasks (run_id, step_slug, task_index) ON DELETE CASCADE
);

REVOKE ALL ON TABLE pgflow_ext.step_task_attempts FROM public;

CREATE FUNCTION pgflow_private._record_failed_attempt()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  INSERT INTO pgflow_ext.step_task_attempts
    (run_id, step_slug, task_index, attempt, error_message, failed_at, last_worker_id)
  VALUES
    (NEW.run_id, NEW.step_slug, NEW.task_index, NEW.attempts_count, NEW.error_message,
     coalesce(NEW.failed_at, now()), NEW.last_worker_id)
  ON CONFLICT (run_id, step_slug, task_index, attempt) DO NOTHING;
  RETURN NULL;
END;
$$;

REVOKE EXECUTE ON FUNCTION pgflow_private._record_failed_attempt() FROM public;

CREATE TRIGGER step_tasks_record_failed_attempt
AFTER UPDATE OF error_message ON pgflow.step_tasks
FOR EACH ROW
WHEN (NEW.error_message IS NOT NULL
      AND OLD.status = 'started'
      AND NEW.status IN ('queued', 'failed'))
EXECUTE FUNCTION pgflow_private._record_failed_attempt();
