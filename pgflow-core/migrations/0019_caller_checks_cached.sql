-- =====================================================================================
-- pgflow engine, migration 0019: the caller checks keep their plans.
--
-- _caller and _caller_is_owner (0004) were SQL functions with a SET clause. PostgreSQL
-- (before 18) never inlines such a function, and runs its body through the SQL-function
-- executor, which parses, analyses and plans the query again on every call. Every checked
-- entry point asks them first (_authorize_worker for start_tasks and _read_and_start,
-- _authorize_tasks for complete_task(s) and fail_task), so each worker call paid two
-- parses and two plans before touching a row: about 150 us a call on the benchmark's
-- machine, a tenth of a one-task complete_task (perf: fmgr_sql and pg_parse_query under
-- _authorize_tasks; pg_stat_user_functions: _authorize_tasks 157 us self per task).
--
-- As PL/pgSQL they plan once per session. Same answers: the session's role, else the
-- session user; the owner test is pg_has_role(USAGE) on the owner of schema pgflow, NULL
-- when that schema is missing.
-- =====================================================================================

-- The role this session acts as (0004, WHO IS CALLING).
CREATE OR REPLACE FUNCTION pgflow._caller()
RETURNS name
LANGUAGE plpgsql
STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN CASE
           WHEN pg_catalog.current_setting('role') = 'none' THEN session_user
           ELSE pg_catalog.current_setting('role')::name
         END;
END;
$$;

-- Whether the calling role has the privileges of the installer, which serves every flow
-- and skips the per-flow lookups.
CREATE OR REPLACE FUNCTION pgflow._caller_is_owner()
RETURNS boolean
LANGUAGE plpgsql
STABLE
SET search_path = ''
AS $$
BEGIN
  RETURN (SELECT pg_catalog.pg_has_role(pgflow._caller(), n.nspowner, 'USAGE')
            FROM pg_catalog.pg_namespace n
           WHERE n.nspname = 'pgflow');
END;
$$;
