-- =====================================================================================
-- pgflow engine, migration 0004: roles that mean it.
--
-- Before this migration every engine function ran as its caller, so a role that could
-- move runs forward needed write access to every table of `pgflow` and every queue, and
-- with it could rewrite definitions, delete runs or forge the completion of any task.
-- From here on a role gets exactly its job (docs/security.md has the grants):
--
--   owner   installs and compiles; owns schema `pgflow`, its functions and the queues.
--   app     starts runs (start_flow, start_flow_with_states) and reads them.
--   worker  runs the worker protocol (_read_and_start, start_tasks, complete_task(s),
--           fail_task) for the flows it is granted, and keeps its own `workers` rows.
--   reader  reads every table and queue; changes nothing.
--
-- The functions those roles call run as their owner (SECURITY DEFINER), so the roles
-- need no write privilege on any table. The worker's functions first check that the
-- calling role serves the flow of every task or queue they are about to touch.
--
-- WHICH FLOWS A ROLE SERVES
-- -------------------------
-- A role serves flow F when it holds UPDATE on F's queue table pgmq.q_<lower(F)>: the
-- privilege reading a queue takes in pgmq, granted per flow with plain GRANT or
-- pgflow.grant_flow_to_worker. Roles with the privileges of the owner of schema `pgflow`
-- (the installer, superusers) serve every flow.
--
-- WHO IS CALLING
-- --------------
-- Inside a SECURITY DEFINER function current_user is the owner. The caller is the role
-- the session acts as: the one chosen by SET ROLE (setting `role`, which a definer function
-- cannot change: PostgreSQL refuses SET ROLE there), else the session user (the login
-- role, or the one of SET SESSION AUTHORIZATION). Limit: a SECURITY DEFINER function of
-- some other role that calls the engine is judged by the session's role, not by its
-- own owner.
--
-- HOW THE CHECKS ARE WIRED
-- ------------------------
-- The functions that take row locks (complete_tasks, fail_task with the attempt) and the
-- ones that read a queue (_read_and_start, start_tasks) are moved, unchanged, to schema
-- pgflow_private, and take their place in `pgflow` as checking wrappers with the same
-- signature. Moved, not renamed: their bodies name their parameters after the function
-- (complete_tasks.run_ids), which a rename would break. The check comes before any lock,
-- so a refused caller never holds a lock on another flow's rows. complete_task and the
-- four-argument fail_task reach the checked functions through `pgflow` and are only made
-- SECURITY DEFINER. A later migration that changes a moved function replaces
-- pgflow_private.<name>, never pgflow.<name>, or the check is lost.
-- =====================================================================================

CREATE SCHEMA pgflow_private;
REVOKE ALL ON SCHEMA pgflow_private FROM public;

-- -------------------------------------------------------------------------------------
-- The checks
-- -------------------------------------------------------------------------------------

-- The role this session acts as (see WHO IS CALLING).
CREATE FUNCTION pgflow._caller()
RETURNS name
LANGUAGE sql
STABLE
SET search_path = ''
AS $$
  SELECT CASE
           WHEN pg_catalog.current_setting('role') = 'none' THEN session_user
           ELSE pg_catalog.current_setting('role')::name
         END
$$;

-- Whether the calling role has the privileges of the installer, which serves every flow
-- and skips the per-flow lookups.
CREATE FUNCTION pgflow._caller_is_owner()
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = ''
AS $$
  SELECT pg_catalog.pg_has_role(pgflow._caller(), n.nspowner, 'USAGE')
    FROM pg_catalog.pg_namespace n
   WHERE n.nspname = 'pgflow'
$$;

-- Raises insufficient_privilege unless the calling role serves every flow of p_flows.
-- A flow whose queue table is missing is served by nobody but the owner.
CREATE FUNCTION pgflow._authorize_flows(p_flows text[])
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = ''
AS $$
DECLARE
  v_caller name;
  v_flow   text;
BEGIN
  IF pgflow._caller_is_owner() THEN
    RETURN;
  END IF;
  v_caller := pgflow._caller();
  FOR v_flow IN
    SELECT DISTINCT f.slug FROM unnest(p_flows) AS f(slug) WHERE f.slug IS NOT NULL ORDER BY 1
  LOOP
    IF NOT coalesce(pg_catalog.has_table_privilege(
         v_caller,
         pg_catalog.to_regclass(format('pgmq.%I', 'q_' || lower(v_flow))),
         'UPDATE'), false) THEN
      RAISE EXCEPTION 'permission denied for flow %', v_flow
        USING ERRCODE = 'insufficient_privilege',
              HINT = format('The owner grants it with: SELECT pgflow.grant_flow_to_worker(%L, %L)',
                            v_flow, v_caller);
    END IF;
  END LOOP;
END;
$$;

-- _authorize_flows for one flow, plus: the worker row the tasks will name as their last
-- worker is one registered for that flow (its foreign key alone would accept any row).
CREATE FUNCTION pgflow._authorize_worker(p_flow_slug text, p_worker_id uuid)
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = ''
AS $$
BEGIN
  IF pgflow._caller_is_owner() THEN
    RETURN;
  END IF;
  PERFORM pgflow._authorize_flows(ARRAY[p_flow_slug]);
  IF p_worker_id IS NOT NULL AND NOT EXISTS (
       SELECT 1 FROM pgflow.workers w
        WHERE w.worker_id = p_worker_id AND w.queue_name = p_flow_slug) THEN
    RAISE EXCEPTION 'worker % is not registered for flow %', p_worker_id, p_flow_slug
      USING ERRCODE = 'insufficient_privilege';
  END IF;
END;
$$;

-- The flows of the tasks (run_ids[i], step_slugs[i], task_indexes[i]) that exist, checked
-- with _authorize_flows. Reads, never locks.
CREATE FUNCTION pgflow._authorize_tasks(p_run_ids uuid[], p_step_slugs text[], p_task_indexes integer[])
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = ''
AS $$
BEGIN
  IF pgflow._caller_is_owner() THEN
    RETURN;
  END IF;
  PERFORM pgflow._authorize_flows(ARRAY(
    SELECT DISTINCT t.flow_slug
      FROM unnest(p_run_ids, p_step_slugs, p_task_indexes) AS b(run_id, step_slug, task_index)
      JOIN pgflow.step_tasks t
        ON t.run_id = b.run_id AND t.step_slug = b.step_slug AND t.task_index = b.task_index));
END;
$$;

-- -------------------------------------------------------------------------------------
-- The worker protocol, checked
-- -------------------------------------------------------------------------------------

ALTER FUNCTION pgflow._read_and_start(text, integer, integer, uuid) SET SCHEMA pgflow_private;
ALTER FUNCTION pgflow.start_tasks(text, bigint[], uuid) SET SCHEMA pgflow_private;
ALTER FUNCTION pgflow.complete_tasks(uuid[], text[], integer[], jsonb[]) SET SCHEMA pgflow_private;
ALTER FUNCTION pgflow.complete_tasks(uuid[], text[], integer[], jsonb[], integer[], uuid[])
  SET SCHEMA pgflow_private;
ALTER FUNCTION pgflow.fail_task(uuid, text, integer, text, integer, uuid, boolean)
  SET SCHEMA pgflow_private;

CREATE FUNCTION pgflow._read_and_start(
  p_flow_slug text, p_qty integer, p_vt integer, p_worker_id uuid
)
RETURNS SETOF pgflow._started_task
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
ROWS 10
AS $$
BEGIN
  PERFORM pgflow._authorize_worker(p_flow_slug, p_worker_id);
  RETURN QUERY
  SELECT * FROM pgflow_private._read_and_start(p_flow_slug, p_qty, p_vt, p_worker_id);
END;
$$;

CREATE FUNCTION pgflow.start_tasks(flow_slug text, msg_ids bigint[], worker_id uuid)
RETURNS SETOF pgflow.step_task_record
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
ROWS 10
AS $$
BEGIN
  PERFORM pgflow._authorize_worker(start_tasks.flow_slug, start_tasks.worker_id);
  RETURN QUERY
  SELECT * FROM pgflow_private.start_tasks(start_tasks.flow_slug, start_tasks.msg_ids,
                                           start_tasks.worker_id);
END;
$$;

CREATE FUNCTION pgflow.complete_tasks(
  run_ids      uuid[],
  step_slugs   text[],
  task_indexes integer[],
  outputs      jsonb[]
)
RETURNS SETOF pgflow.step_tasks
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
ROWS 10
AS $$
BEGIN
  PERFORM pgflow._authorize_tasks(complete_tasks.run_ids, complete_tasks.step_slugs,
                                  complete_tasks.task_indexes);
  RETURN QUERY
  SELECT * FROM pgflow_private.complete_tasks(complete_tasks.run_ids, complete_tasks.step_slugs,
                                              complete_tasks.task_indexes, complete_tasks.outputs);
END;
$$;

CREATE FUNCTION pgflow.complete_tasks(
  run_ids      uuid[],
  step_slugs   text[],
  task_indexes integer[],
  outputs      jsonb[],
  attempts     integer[],
  worker_ids   uuid[] DEFAULT NULL
)
RETURNS SETOF pgflow.step_tasks
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
ROWS 10
AS $$
BEGIN
  PERFORM pgflow._authorize_tasks(complete_tasks.run_ids, complete_tasks.step_slugs,
                                  complete_tasks.task_indexes);
  RETURN QUERY
  SELECT * FROM pgflow_private.complete_tasks(complete_tasks.run_ids, complete_tasks.step_slugs,
                                              complete_tasks.task_indexes, complete_tasks.outputs,
                                              complete_tasks.attempts, complete_tasks.worker_ids);
END;
$$;

CREATE FUNCTION pgflow.fail_task(
  run_id        uuid,
  step_slug     text,
  task_index    integer,
  error_message text,
  attempt       integer,
  worker_id     uuid DEFAULT NULL,
  permanent     boolean DEFAULT false
)
RETURNS SETOF pgflow.step_tasks
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  PERFORM pgflow._authorize_tasks(ARRAY[fail_task.run_id], ARRAY[fail_task.step_slug],
                                  ARRAY[fail_task.task_index]);
  RETURN QUERY
  SELECT * FROM pgflow_private.fail_task(fail_task.run_id, fail_task.step_slug,
                                         fail_task.task_index, fail_task.error_message,
                                         fail_task.attempt, fail_task.worker_id,
                                         fail_task.permanent);
END;
$$;

-- Delegate to the checked functions above (or, for the app, start a run of any flow).
ALTER FUNCTION pgflow.complete_task(uuid, text, integer, jsonb) SECURITY DEFINER;
ALTER FUNCTION pgflow.complete_task(uuid, text, integer, jsonb, integer, uuid) SECURITY DEFINER;
ALTER FUNCTION pgflow.fail_task(uuid, text, integer, text) SECURITY DEFINER;
ALTER FUNCTION pgflow.start_flow(text, jsonb, uuid) SECURITY DEFINER;
ALTER FUNCTION pgflow.start_flow_with_states(text, jsonb, uuid) SECURITY DEFINER;

-- -------------------------------------------------------------------------------------
-- Worker rows: a role registers, heartbeats and deprecates rows of the flows it serves
-- -------------------------------------------------------------------------------------
-- Row-level security rather than functions, so that workers written against pgflow
-- 0.8.1 (which write the table directly) keep working under a worker role. The owner
-- bypasses it, and so do the engine's functions, which run as the owner. No policy for
-- DELETE: only the owner deletes worker rows.

ALTER TABLE pgflow.workers ENABLE ROW LEVEL SECURITY;

CREATE POLICY workers_read ON pgflow.workers
  FOR SELECT
  USING (true);

CREATE POLICY workers_register ON pgflow.workers
  FOR INSERT
  WITH CHECK (coalesce(pg_catalog.has_table_privilege(
    pg_catalog.to_regclass(pg_catalog.format('pgmq.%I', 'q_' || pg_catalog.lower(queue_name))),
    'UPDATE'), false));

CREATE POLICY workers_update ON pgflow.workers
  FOR UPDATE
  USING (coalesce(pg_catalog.has_table_privilege(
    pg_catalog.to_regclass(pg_catalog.format('pgmq.%I', 'q_' || pg_catalog.lower(queue_name))),
    'UPDATE'), false))
  WITH CHECK (coalesce(pg_catalog.has_table_privilege(
    pg_catalog.to_regclass(pg_catalog.format('pgmq.%I', 'q_' || pg_catalog.lower(queue_name))),
    'UPDATE'), false));

-- -------------------------------------------------------------------------------------
-- Queue functions: their callers run as the owner now, so nobody else needs them
-- -------------------------------------------------------------------------------------
-- _create_queue_functions grants a queue's functions to whoever may execute their
-- callers, which now includes worker roles (the wrapper of _read_and_start) that never
-- call them directly. The wrapper below takes those grants back.

-- Revokes every privilege on queue p_queue's functions from every role but their owner.
CREATE FUNCTION pgflow._close_queue_functions(p_queue text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_acl record;
BEGIN
  FOR v_acl IN
    SELECT DISTINCT p.oid::regprocedure AS fn, acl.grantee::regrole AS grantee
      FROM pg_catalog.pg_proc p
     CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) AS acl
     WHERE p.pronamespace = 'pgflow'::regnamespace
       AND p.proname IN ('_queue_send_' || lower(p_queue), '_queue_read_' || lower(p_queue))
       AND acl.grantee <> 0
       AND acl.grantee <> p.proowner
     ORDER BY 1, 2
  LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %s', v_acl.fn, v_acl.grantee);
  END LOOP;
END;
$$;

ALTER FUNCTION pgflow._create_queue_functions(text) SET SCHEMA pgflow_private;

CREATE FUNCTION pgflow._create_queue_functions(p_queue text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
BEGIN
  PERFORM pgflow_private._create_queue_functions(p_queue);
  PERFORM pgflow._close_queue_functions(p_queue);
END;
$$;

-- Queues compiled before this migration.
SELECT pgflow._close_queue_functions(substr(p.proname, length('_queue_read_') + 1))
  FROM pg_catalog.pg_proc p
 WHERE p.pronamespace = 'pgflow'::regnamespace
   AND p.proname LIKE '\_queue\_read\_%';

-- -------------------------------------------------------------------------------------
-- Granting flows to worker roles (run by the owner)
-- -------------------------------------------------------------------------------------

-- The queue table of flow p_flow_slug, after checking that the flow, its queue table and
-- role p_role_name exist.
CREATE FUNCTION pgflow._queue_table_of(p_flow_slug text, p_role_name text)
RETURNS regclass
LANGUAGE plpgsql
STABLE
SET search_path = ''
AS $$
DECLARE
  v_table regclass;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pgflow.flows f WHERE f.flow_slug = p_flow_slug) THEN
    RAISE EXCEPTION 'flow "%" does not exist', p_flow_slug
      USING ERRCODE = 'undefined_object';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = p_role_name) THEN
    RAISE EXCEPTION 'role "%" does not exist', p_role_name
      USING ERRCODE = 'undefined_object';
  END IF;
  v_table := pg_catalog.to_regclass(format('pgmq.%I', 'q_' || lower(p_flow_slug)));
  IF v_table IS NULL THEN
    RAISE EXCEPTION 'flow "%" has no queue table pgmq.q_%', p_flow_slug, lower(p_flow_slug)
      USING ERRCODE = 'undefined_table';
  END IF;
  RETURN v_table;
END;
$$;

-- Lets role_name serve flow_slug: SELECT (the worker's wait for the next visible message)
-- and UPDATE (what serving checks) on the flow's queue table. Runs as its caller, who
-- must be allowed to grant on the queue table: the owner.
CREATE FUNCTION pgflow.grant_flow_to_worker(flow_slug text, role_name text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_table regclass := pgflow._queue_table_of(grant_flow_to_worker.flow_slug,
                                             grant_flow_to_worker.role_name);
BEGIN
  EXECUTE format('GRANT SELECT, UPDATE ON TABLE %s TO %I', v_table,
                 grant_flow_to_worker.role_name);
END;
$$;

-- Takes back what grant_flow_to_worker gave.
CREATE FUNCTION pgflow.revoke_flow_from_worker(flow_slug text, role_name text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_table regclass := pgflow._queue_table_of(revoke_flow_from_worker.flow_slug,
                                             revoke_flow_from_worker.role_name);
BEGIN
  EXECUTE format('REVOKE SELECT, UPDATE ON TABLE %s FROM %I', v_table,
                 revoke_flow_from_worker.role_name);
END;
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: the new functions are closed to public like the rest of the schema.
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgflow FROM public;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgflow_private FROM public;
