-- =====================================================================================
-- pgflow engine, migration 0011: Flow shapes compared in SQL (issue 20).
-- =====================================================================================
--
-- Upstream pgflow 0.10-0.14's functions for compiling flows from the worker: a flow's
-- shape as JSON, two shapes compared in readable sentences, a flow created from a shape,
-- ensure_flow_compiled (create, verify, recompile or report a mismatch), and
-- delete_flow_and_data. Upstream's names, argument names, JSON keys, result keys and
-- difference texts (docs/sql-api.md, "Flow shapes"), so that a TypeScript worker of those
-- versions and the Rust client reach the same verdict on the same database.
--
-- THE SHAPE
-- ---------
--   {"steps": [{"slug", "stepType", "dependencies" (sorted), "whenUnmet", "whenExhausted",
--               "requiredInputPattern": {"defined": bool, "value"?},
--               "forbiddenInputPattern": {...}, "options"?}], "options"?}
-- What is compared is the structure: steps in order, their kinds, dependencies, skip
-- modes and conditions. "options" (maxAttempts, baseDelay, timeout, startDelay; and ours,
-- maxDelay and jitter, for set_retry_policy) are read when a flow is created and never
-- compared: upstream tunes them in place without recompiling. Keys a shape leaves out
-- compare as their defaults (stepType single, no dependencies, whenUnmet skip,
-- whenExhausted fail, no pattern), so that the shape of a worker older than conditions
-- matches a flow without any; upstream 0.14 reports such a shape as differing.
--
-- WHEN A DIFFERING FLOW IS RECOMPILED
-- -----------------------------------
-- Upstream recompiles (deletes the flow with all its runs, then creates it again) when
-- pgflow.is_local() says the database is a developer's, which it tells from Supabase's
-- published local JWT secret in a setting any session may set. A database cannot know
-- that; its caller can. Here ensure_flow_compiled recompiles only when called with
-- allow_data_loss => true (the Rust client's Replace::DeletingRuns); upstream's
-- two-argument form never deletes anything and reports the mismatch.
--
-- LOCKS
-- -----
-- ensure_flow_compiled, delete_flow_and_data and the Rust client's compile take
-- create_flow's advisory lock (0003: keyed by the lowercased slug) before anything else,
-- so that compilations of one flow, or of two slugs differing only in case, run one after
-- the other: the second sees the first's flow. Deleting then locks the flow's row (a run
-- being started waits, and fails on its foreign key once the flow is gone), its tasks,
-- step states and runs in 0001's order, and last the queue. A worker reading the flow's
-- queue at that moment holds a message and waits for its task, which the deletion holds:
-- PostgreSQL breaks that deadlock by failing one of the two (40P01). Delete or recompile
-- a flow when no worker serves it, or call again.
--
-- WHO MAY CALL
-- ------------
-- Creating, recompiling and deleting flows is for the owner of schema `pgflow` only, as
-- create_flow is in practice (docs/security.md). ensure_flow_compiled and
-- delete_flow_and_data run as the owner and check their caller first, so that a role
-- granted them by mistake is told why it is refused, not stopped half-way by a table
-- privilege. ensure_flow_compiled runs as the owner also so that a role granted it (a
-- TypeScript worker, which calls it at start-up) can have a flow compiled at deployment
-- verified, or its mismatch reported: reading, never writing, and only a flow the role
-- serves. Every function here is the owner's until granted.
-- =====================================================================================

-- -------------------------------------------------------------------------------------
-- Helpers
-- -------------------------------------------------------------------------------------

-- Refuses a caller that does not have the privileges of schema pgflow's owner, naming
-- what it tried (p_action). Called from functions that run as the owner, it judges the
-- role the session acts as (0004's _caller()), not the function's owner.
CREATE FUNCTION pgflow._require_owner(p_action text)
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = ''
AS $$
BEGIN
  IF NOT pgflow._caller_is_owner() THEN
    RAISE EXCEPTION 'permission denied: % is for the owner of schema pgflow, not role %',
      p_action, pgflow._caller()
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Compile and delete flows as the role that installed pgflow '
                   '(docs/security.md).';
  END IF;
END;
$$;

-- create_flow's advisory lock (0003), for the definition of flow p_flow_slug and of every
-- slug differing from it only in case. Held until the transaction ends.
CREATE FUNCTION pgflow._lock_flow_definition(p_flow_slug text)
RETURNS void
LANGUAGE sql
VOLATILE
SET search_path = ''
AS $$
  SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgflow.create_flow'),
                                          pg_catalog.hashtext(lower(p_flow_slug)))
$$;

-- The steps of shape p_shape, each in the spelling _get_flow_shape writes: every key
-- present, defaults for those left out, dependencies sorted, "options" kept as given.
-- Refuses what is not a shape, naming p_which (the first or second shape) and the step.
-- Set-based, a few statements whatever the number of steps: a worker compiles every flow
-- it serves at start-up.
CREATE FUNCTION pgflow._shape_steps(p_shape jsonb, p_which text)
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE
SET search_path = ''
AS $$
DECLARE
  v_steps jsonb;
  v_bad   record;
  v_out   jsonb;
BEGIN
  IF p_shape IS NULL OR jsonb_typeof(p_shape) <> 'object' THEN
    RAISE EXCEPTION 'the % shape must be a JSON object {"steps": [...]}, got %',
      p_which, coalesce(p_shape::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_steps := coalesce(p_shape -> 'steps', '[]'::jsonb);
  IF jsonb_typeof(v_steps) <> 'array' THEN
    RAISE EXCEPTION 'the % shape''s "steps" must be an array, got %', p_which, v_steps
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- The first step that is not an object with a string slug.
  SELECT e.n - 1 AS idx, e.step INTO v_bad
    FROM jsonb_array_elements(v_steps) WITH ORDINALITY AS e(step, n)
   WHERE jsonb_typeof(e.step) <> 'object' OR jsonb_typeof(e.step -> 'slug') IS DISTINCT FROM 'string'
   ORDER BY e.n
   LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'step at index % of the % shape must be an object with a string "slug", got %',
      v_bad.idx, p_which, v_bad.step
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- The first value of the wrong type.
  SELECT e.n - 1 AS idx, e.step -> 'slug' AS slug, k.key,
         e.step -> k.key AS value,
         CASE k.key WHEN 'dependencies' THEN 'an array of step slugs' ELSE 'a string' END AS wanted
    INTO v_bad
    FROM jsonb_array_elements(v_steps) WITH ORDINALITY AS e(step, n)
   CROSS JOIN unnest(ARRAY['stepType', 'dependencies', 'whenUnmet', 'whenExhausted'])
              WITH ORDINALITY AS k(key, m)
   WHERE e.step ? k.key
     AND CASE k.key
           WHEN 'dependencies' THEN
             jsonb_typeof(e.step -> k.key) <> 'array'
             OR EXISTS (SELECT 1 FROM jsonb_array_elements(e.step -> k.key) AS d(dep)
                         WHERE jsonb_typeof(d.dep) <> 'string')
           ELSE jsonb_typeof(e.step -> k.key) <> 'string'
         END
   ORDER BY e.n, k.m
   LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'step % (index %) of the % shape: "%" must be %, got %',
      v_bad.slug, v_bad.idx, p_which, v_bad.key, v_bad.wanted, v_bad.value
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- The first malformed pattern wrapper.
  SELECT e.n - 1 AS idx, e.step -> 'slug' AS slug, k.key, e.step -> k.key AS value,
         coalesce(jsonb_typeof(e.step -> k.key) = 'object'
                  AND jsonb_typeof(e.step -> k.key -> 'defined') = 'boolean', false) AS wrapped
    INTO v_bad
    FROM jsonb_array_elements(v_steps) WITH ORDINALITY AS e(step, n)
   CROSS JOIN unnest(ARRAY['requiredInputPattern', 'forbiddenInputPattern'])
              WITH ORDINALITY AS k(key, m)
   WHERE coalesce(e.step -> k.key, 'null') <> 'null'
     AND (jsonb_typeof(e.step -> k.key) <> 'object'
          OR jsonb_typeof(e.step -> k.key -> 'defined') IS DISTINCT FROM 'boolean'
          OR ((e.step -> k.key ->> 'defined')::boolean
              AND jsonb_typeof(e.step -> k.key -> 'value') IS DISTINCT FROM 'object'))
   ORDER BY e.n, k.m
   LIMIT 1;
  IF FOUND AND NOT v_bad.wrapped THEN
    RAISE EXCEPTION 'step % (index %) of the % shape: "%" must be {"defined": false} or '
                    '{"defined": true, "value": {...}}, got %',
      v_bad.slug, v_bad.idx, p_which, v_bad.key, v_bad.value
      USING ERRCODE = 'invalid_parameter_value';
  ELSIF FOUND THEN
    RAISE EXCEPTION 'step % (index %) of the % shape: "%" is defined, so its "value" must be '
                    'a JSON object (a pattern the input must or must not contain), got %',
      v_bad.slug, v_bad.idx, p_which, v_bad.key, coalesce(v_bad.value -> 'value', 'null')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- A pattern in its one spelling: absent is not defined, and a value beside
  -- "defined": false is ignored.
  SELECT coalesce(jsonb_agg(
           jsonb_build_object(
             'slug', e.step -> 'slug',
             'stepType', coalesce(e.step -> 'stepType', '"single"'),
             'dependencies', coalesce(
               (SELECT jsonb_agg(d.dep ORDER BY d.dep)
                  FROM jsonb_array_elements_text(e.step -> 'dependencies') AS d(dep)),
               '[]'::jsonb),
             'whenUnmet', coalesce(e.step -> 'whenUnmet', '"skip"'),
             'whenExhausted', coalesce(e.step -> 'whenExhausted', '"fail"'),
             'requiredInputPattern', CASE
               WHEN coalesce((e.step -> 'requiredInputPattern' ->> 'defined')::boolean, false)
               THEN jsonb_build_object('defined', true,
                                       'value', e.step -> 'requiredInputPattern' -> 'value')
               ELSE '{"defined": false}'::jsonb
             END,
             'forbiddenInputPattern', CASE
               WHEN coalesce((e.step -> 'forbiddenInputPattern' ->> 'defined')::boolean, false)
               THEN jsonb_build_object('defined', true,
                                       'value', e.step -> 'forbiddenInputPattern' -> 'value')
               ELSE '{"defined": false}'::jsonb
             END)
           || CASE WHEN e.step ? 'options' THEN jsonb_build_object('options', e.step -> 'options')
                   ELSE '{}'::jsonb END
           ORDER BY e.n), '[]'::jsonb)
    INTO v_out
    FROM jsonb_array_elements(v_steps) WITH ORDINALITY AS e(step, n);
  RETURN v_out;
END;
$$;

-- A JSON array of strings as upstream lists dependencies in a difference: "a, b".
CREATE FUNCTION pgflow._shape_list(p_list jsonb)
RETURNS text
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT coalesce(string_agg(e.item, ', ' ORDER BY e.n), '')
    FROM jsonb_array_elements_text(p_list) WITH ORDINALITY AS e(item, n)
$$;

-- -------------------------------------------------------------------------------------
-- Shapes
-- -------------------------------------------------------------------------------------

-- The shape of flow p_flow_slug as stored: its steps in the order of definition. A flow
-- that does not exist has no steps: {"steps": []}. No options (see THE SHAPE).
CREATE FUNCTION pgflow._get_flow_shape(p_flow_slug text)
RETURNS jsonb
LANGUAGE sql
STABLE
SET search_path = ''
AS $$
  SELECT jsonb_build_object(
           'steps',
           coalesce(jsonb_agg(
             jsonb_build_object(
               'slug', s.step_slug,
               'stepType', s.step_type,
               'dependencies', coalesce(
                 (SELECT jsonb_agg(d.dep_slug ORDER BY d.dep_slug)
                    FROM pgflow.deps d
                   WHERE d.flow_slug = s.flow_slug AND d.step_slug = s.step_slug),
                 '[]'::jsonb),
               'whenUnmet', s.when_unmet,
               'whenExhausted', s.when_exhausted,
               'requiredInputPattern', CASE
                 WHEN s.required_input_pattern IS NULL THEN '{"defined": false}'::jsonb
                 ELSE jsonb_build_object('defined', true, 'value', s.required_input_pattern)
               END,
               'forbiddenInputPattern', CASE
                 WHEN s.forbidden_input_pattern IS NULL THEN '{"defined": false}'::jsonb
                 ELSE jsonb_build_object('defined', true, 'value', s.forbidden_input_pattern)
               END)
             ORDER BY s.step_index),
           '[]'::jsonb))
    FROM pgflow.steps s
   WHERE s.flow_slug = p_flow_slug
$$;

-- The differences between two shapes, in upstream's sentences, the first shape's value
-- before the second's ("first" is the worker's, "second" the database's, in
-- ensure_flow_compiled): the step count, then each index in turn, in upstream's order
-- within a step (slug, type, dependencies, the modes, the patterns). Empty when they match.
-- Text values are quoted, dependencies listed, patterns shown as their wrappers.
CREATE FUNCTION pgflow._compare_flow_shapes(p_local jsonb, p_db jsonb)
RETURNS text[]
LANGUAGE plpgsql
IMMUTABLE
SET search_path = ''
AS $$
DECLARE
  v_local  jsonb := pgflow._shape_steps(p_local, 'first');
  v_db     jsonb := pgflow._shape_steps(p_db, 'second');
  v_nlocal integer := jsonb_array_length(v_local);
  v_ndb    integer := jsonb_array_length(v_db);
  v_diffs  text[];
BEGIN
  SELECT coalesce(array_agg(x.text ORDER BY s.n, x.k) FILTER (WHERE x.text IS NOT NULL), '{}')
    INTO v_diffs
    FROM (SELECT coalesce(a.n, b.n) AS n, a.step AS a, b.step AS b
            FROM jsonb_array_elements(v_local) WITH ORDINALITY AS a(step, n)
            FULL JOIN jsonb_array_elements(v_db) WITH ORDINALITY AS b(step, n) ON b.n = a.n) s
   CROSS JOIN LATERAL (VALUES
     (1, CASE WHEN s.a IS NULL THEN
           format('Step at index %s: missing in first shape (second has ''%s'')',
                  s.n - 1, s.b ->> 'slug') END),
     (2, CASE WHEN s.b IS NULL THEN
           format('Step at index %s: missing in second shape (first has ''%s'')',
                  s.n - 1, s.a ->> 'slug') END),
     (3, CASE WHEN (s.a ->> 'slug') <> (s.b ->> 'slug') THEN
           format('Step at index %s: slug differs ''%s'' vs ''%s''',
                  s.n - 1, s.a ->> 'slug', s.b ->> 'slug') END),
     (4, CASE WHEN (s.a ->> 'stepType') <> (s.b ->> 'stepType') THEN
           format('Step at index %s: type differs ''%s'' vs ''%s''',
                  s.n - 1, s.a ->> 'stepType', s.b ->> 'stepType') END),
     (5, CASE WHEN (s.a -> 'dependencies') <> (s.b -> 'dependencies') THEN
           format('Step at index %s: dependencies differ [%s] vs [%s]', s.n - 1,
                  pgflow._shape_list(s.a -> 'dependencies'),
                  pgflow._shape_list(s.b -> 'dependencies')) END),
     (6, CASE WHEN (s.a ->> 'whenUnmet') <> (s.b ->> 'whenUnmet') THEN
           format('Step at index %s: whenUnmet differs ''%s'' vs ''%s''',
                  s.n - 1, s.a ->> 'whenUnmet', s.b ->> 'whenUnmet') END),
     (7, CASE WHEN (s.a ->> 'whenExhausted') <> (s.b ->> 'whenExhausted') THEN
           format('Step at index %s: whenExhausted differs ''%s'' vs ''%s''',
                  s.n - 1, s.a ->> 'whenExhausted', s.b ->> 'whenExhausted') END),
     (8, CASE WHEN (s.a -> 'requiredInputPattern') <> (s.b -> 'requiredInputPattern') THEN
           format('Step at index %s: requiredInputPattern differs ''%s'' vs ''%s''', s.n - 1,
                  s.a -> 'requiredInputPattern', s.b -> 'requiredInputPattern') END),
     (9, CASE WHEN (s.a -> 'forbiddenInputPattern') <> (s.b -> 'forbiddenInputPattern') THEN
           format('Step at index %s: forbiddenInputPattern differs ''%s'' vs ''%s''', s.n - 1,
                  s.a -> 'forbiddenInputPattern', s.b -> 'forbiddenInputPattern') END)
   ) AS x(k, text);
  IF v_nlocal <> v_ndb THEN
    v_diffs := format('Step count differs: %s vs %s', v_nlocal, v_ndb) || v_diffs;
  END IF;
  RETURN v_diffs;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Creating a flow from a shape
-- -------------------------------------------------------------------------------------

-- Option p_key of an "options" object: NULL when absent, else an integer (a JSON number
-- without a fraction, within integer's range). Bounds are create_flow's and add_step's.
CREATE FUNCTION pgflow._shape_option(p_options jsonb, p_key text, p_where text)
RETURNS integer
LANGUAGE plpgsql
IMMUTABLE
SET search_path = ''
AS $$
DECLARE
  v_value jsonb := p_options -> p_key;
BEGIN
  IF v_value IS NULL OR v_value = 'null'::jsonb THEN
    RETURN NULL;
  END IF;
  IF jsonb_typeof(v_value) <> 'number'
     OR v_value::text::numeric <> trunc(v_value::text::numeric)
     OR v_value::text::numeric NOT BETWEEN -2147483648 AND 2147483647 THEN
    RAISE EXCEPTION '%: option "%" must be a whole number of integer range, got %',
      p_where, p_key, v_value
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN v_value::text::integer;
END;
$$;

-- The "options" object of a flow (p_step false) or of a step, checked: an object whose
-- keys are options the shape knows. Returns '{}' when there is none.
CREATE FUNCTION pgflow._shape_options(p_options jsonb, p_step boolean, p_where text)
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE
SET search_path = ''
AS $$
DECLARE
  v_known   text[] := CASE
                        WHEN p_step THEN ARRAY['maxAttempts', 'baseDelay', 'timeout',
                                               'startDelay', 'maxDelay', 'jitter']
                        ELSE ARRAY['maxAttempts', 'baseDelay', 'timeout', 'maxDelay', 'jitter']
                      END;
  v_unknown text;
BEGIN
  IF p_options IS NULL OR p_options = 'null'::jsonb THEN
    RETURN '{}'::jsonb;
  END IF;
  IF jsonb_typeof(p_options) <> 'object' THEN
    RAISE EXCEPTION '%: "options" must be an object, got %', p_where, p_options
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT string_agg(k.key, ', ' ORDER BY k.key) INTO v_unknown
    FROM jsonb_object_keys(p_options) AS k(key)
   WHERE k.key <> ALL (v_known);
  IF v_unknown IS NOT NULL THEN
    RAISE EXCEPTION '%: unknown option(s) %; known: %', p_where, v_unknown,
      array_to_string(v_known, ', ')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_options ? 'jitter' AND jsonb_typeof(p_options -> 'jitter') NOT IN ('boolean', 'null') THEN
    RAISE EXCEPTION '%: option "jitter" must be true or false, got %', p_where,
      p_options -> 'jitter'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN p_options;
END;
$$;

-- Creates flow p_flow_slug from shape p_shape: create_flow with the shape's options (those
-- left out take create_flow's defaults), add_step for each step in order, then
-- set_retry_policy where the shape sets maxDelay or jitter. The whole shape is checked
-- before anything is written. On a flow that exists already, create_flow and add_step
-- change nothing (as upstream's): ensure_flow_compiled calls it for a new flow only.
CREATE FUNCTION pgflow._create_flow_from_shape(p_flow_slug text, p_shape jsonb)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_steps   jsonb;
  v_step    jsonb;
  v_where   text;
  v_options jsonb;
  v_flow    jsonb;
  v_value   text;
BEGIN
  IF p_flow_slug IS NULL THEN
    RAISE EXCEPTION 'flow_slug must not be NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  v_steps := pgflow._shape_steps(p_shape, 'given');
  v_flow := pgflow._shape_options(p_shape -> 'options', false, format('flow "%s"', p_flow_slug));
  PERFORM pgflow._shape_option(v_flow, o.key, format('flow "%s"', p_flow_slug))
     FROM unnest(ARRAY['maxAttempts', 'baseDelay', 'timeout', 'maxDelay']) AS o(key);
  FOR v_step IN SELECT s.step FROM jsonb_array_elements(v_steps) AS s(step) LOOP
    v_where := format('step "%s" of flow "%s"', v_step ->> 'slug', p_flow_slug);
    IF (v_step ->> 'stepType') NOT IN ('single', 'map') THEN
      RAISE EXCEPTION '%: "stepType" must be "single" or "map", got "%"', v_where,
        v_step ->> 'stepType'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_value IN ARRAY ARRAY['whenUnmet', 'whenExhausted'] LOOP
      IF (v_step ->> v_value) NOT IN ('fail', 'skip', 'skip-cascade') THEN
        RAISE EXCEPTION '%: "%" must be "fail", "skip" or "skip-cascade", got "%"', v_where,
          v_value, v_step ->> v_value
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
    END LOOP;
    v_options := pgflow._shape_options(v_step -> 'options', true, v_where);
    PERFORM pgflow._shape_option(v_options, o.key, v_where)
       FROM unnest(ARRAY['maxAttempts', 'baseDelay', 'timeout', 'startDelay', 'maxDelay'])
            AS o(key);
  END LOOP;

  -- Only the options the shape sets are passed, so that create_flow's defaults apply to
  -- the others.
  EXECUTE format('SELECT pgflow.create_flow($1%s%s%s)',
                 CASE WHEN v_flow ? 'maxAttempts' THEN ', max_attempts => $2' ELSE '' END,
                 CASE WHEN v_flow ? 'baseDelay' THEN ', base_delay => $3' ELSE '' END,
                 CASE WHEN v_flow ? 'timeout' THEN ', timeout => $4' ELSE '' END)
    USING p_flow_slug,
          pgflow._shape_option(v_flow, 'maxAttempts', ''),
          pgflow._shape_option(v_flow, 'baseDelay', ''),
          pgflow._shape_option(v_flow, 'timeout', '');

  FOR v_step IN SELECT s.step FROM jsonb_array_elements(v_steps) AS s(step) LOOP
    v_options := coalesce(v_step -> 'options', '{}'::jsonb);
    PERFORM pgflow.add_step(
      flow_slug => p_flow_slug,
      step_slug => v_step ->> 'slug',
      deps_slugs => ARRAY(SELECT jsonb_array_elements_text(v_step -> 'dependencies')),
      max_attempts => pgflow._shape_option(v_options, 'maxAttempts', ''),
      base_delay => pgflow._shape_option(v_options, 'baseDelay', ''),
      timeout => pgflow._shape_option(v_options, 'timeout', ''),
      start_delay => pgflow._shape_option(v_options, 'startDelay', ''),
      step_type => v_step ->> 'stepType',
      required_input_pattern => v_step -> 'requiredInputPattern' -> 'value',
      forbidden_input_pattern => v_step -> 'forbiddenInputPattern' -> 'value',
      when_unmet => v_step ->> 'whenUnmet',
      when_exhausted => v_step ->> 'whenExhausted');
  END LOOP;

  -- Ours: the retry policy (migration 0007), for the flow, then for each step, where set.
  IF v_flow ? 'maxDelay' OR v_flow ? 'jitter' THEN
    PERFORM pgflow.set_retry_policy(p_flow_slug, NULL,
                                    pgflow._shape_option(v_flow, 'maxDelay', ''),
                                    (v_flow ->> 'jitter')::boolean);
  END IF;
  FOR v_step IN SELECT s.step FROM jsonb_array_elements(v_steps) AS s(step) LOOP
    v_options := coalesce(v_step -> 'options', '{}'::jsonb);
    IF v_options ? 'maxDelay' OR v_options ? 'jitter' THEN
      PERFORM pgflow.set_retry_policy(p_flow_slug, v_step ->> 'slug',
                                      pgflow._shape_option(v_options, 'maxDelay', ''),
                                      (v_options ->> 'jitter')::boolean);
    END IF;
  END LOOP;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Deleting a flow
-- -------------------------------------------------------------------------------------

-- Deletes flow p_flow_slug with its runs (their step states, tasks, attempts, retries and
-- trace contexts, which cascade) and their messages, in the lock order of LOCKS above;
-- returns how many runs it deleted, or NULL when there is no such flow. The caller holds
-- _lock_flow_definition.
--
-- p_recreating: the flow is created again in this transaction (a recompilation). Its
-- queue then stays, emptied, with its functions and the grants that let worker roles
-- serve it, and so do its schedules and worker rows; otherwise they go too. A queue that
-- a flow whose slug differs only in case shares (two such flows exist only if created
-- before migration 0003) always stays: only this flow's messages leave it.
CREATE FUNCTION pgflow._delete_flow_data(p_flow_slug text, p_recreating boolean)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_twin      text;
  v_runs      integer;
  v_run_ids   text[];
  v_suffix    text := lower(p_flow_slug);
  v_queue     text;
  v_schedules text;
BEGIN
  PERFORM 1 FROM pgflow.flows f WHERE f.flow_slug = p_flow_slug FOR UPDATE;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  SELECT f.flow_slug INTO v_twin
    FROM pgflow.flows f
   WHERE lower(f.flow_slug) = v_suffix AND f.flow_slug <> p_flow_slug
   ORDER BY f.flow_slug
   LIMIT 1;

  -- Levels 1 to 3.
  PERFORM 1 FROM pgflow.step_tasks t
    WHERE t.flow_slug = p_flow_slug
    ORDER BY t.run_id, t.step_slug, t.task_index
      FOR UPDATE;
  PERFORM 1 FROM pgflow.step_states ss
    WHERE ss.flow_slug = p_flow_slug
    ORDER BY ss.run_id, ss.step_slug
      FOR UPDATE;
  SELECT count(*)::integer, coalesce(array_agg(r.run_id::text), '{}')
    INTO v_runs, v_run_ids
    FROM (SELECT r.run_id FROM pgflow.runs r
           WHERE r.flow_slug = p_flow_slug
           ORDER BY r.run_id
             FOR UPDATE) r;

  -- Level 5: the messages, or the whole queue.
  IF v_twin IS NOT NULL THEN
    IF pg_catalog.to_regclass(format('pgmq.%I', 'q_' || v_suffix)) IS NOT NULL THEN
      EXECUTE format('DELETE FROM pgmq.%I m WHERE (m.message ->> ''run_id'') = ANY($1)',
                     'q_' || v_suffix) USING v_run_ids;
    END IF;
    IF pg_catalog.to_regclass(format('pgmq.%I', 'a_' || v_suffix)) IS NOT NULL THEN
      EXECUTE format('DELETE FROM pgmq.%I m WHERE (m.message ->> ''run_id'') = ANY($1)',
                     'a_' || v_suffix) USING v_run_ids;
    END IF;
    RAISE NOTICE 'flow "%" shares queue pgmq.q_% with flow "%" (their slugs differ only in '
                 'case): the queue stays, without this flow''s messages',
      p_flow_slug, v_suffix, v_twin;
  ELSIF p_recreating THEN
    IF pg_catalog.to_regclass(format('pgmq.%I', 'q_' || v_suffix)) IS NOT NULL THEN
      EXECUTE format('DELETE FROM pgmq.%I', 'q_' || v_suffix);
    END IF;
    IF pg_catalog.to_regclass(format('pgmq.%I', 'a_' || v_suffix)) IS NOT NULL THEN
      EXECUTE format('DELETE FROM pgmq.%I', 'a_' || v_suffix);
    END IF;
  ELSE
    FOR v_queue IN
      SELECT q.queue_name FROM pgmq.list_queues() q
       WHERE lower(q.queue_name) = v_suffix
       ORDER BY q.queue_name
    LOOP
      PERFORM pgmq.drop_queue(v_queue);
    END LOOP;
    EXECUTE format('DROP FUNCTION IF EXISTS pgflow.%I(timestamptz[], jsonb[])',
                   '_queue_send_' || v_suffix);
    EXECUTE format('DROP FUNCTION IF EXISTS pgflow.%I(text, integer, integer)',
                   '_queue_read_' || v_suffix);
  END IF;

  -- The rows, children first.
  DELETE FROM pgflow.step_tasks t WHERE t.flow_slug = p_flow_slug;
  DELETE FROM pgflow.step_states ss WHERE ss.flow_slug = p_flow_slug;
  DELETE FROM pgflow.runs r WHERE r.flow_slug = p_flow_slug;
  DELETE FROM pgflow.deps d WHERE d.flow_slug = p_flow_slug;
  DELETE FROM pgflow.steps s WHERE s.flow_slug = p_flow_slug;
  IF NOT p_recreating THEN
    DELETE FROM pgflow.workers w WHERE w.queue_name = p_flow_slug;
    WITH gone AS (
      DELETE FROM pgflow_ext.schedules s WHERE s.flow_slug = p_flow_slug
      RETURNING s.schedule_name
    )
    SELECT string_agg(g.schedule_name, ', ' ORDER BY g.schedule_name) INTO v_schedules
      FROM gone g;
    IF v_schedules IS NOT NULL THEN
      RAISE NOTICE 'deleted the schedules of flow "%": %', p_flow_slug, v_schedules;
    END IF;
  END IF;
  DELETE FROM pgflow.flows f WHERE f.flow_slug = p_flow_slug;
  RETURN v_runs;
END;
$$;

-- Deletes flow p_flow_slug and everything of it: its definition, runs, step states, tasks,
-- attempt history, retries, trace contexts, worker rows and schedules, its pgmq queue
-- (messages and archive) and the queue's functions. A flow that does not exist is a
-- notice, not an error: deleting twice is deleting once. The owner's only; it runs as the
-- owner so that a role granted it by mistake is told so, not refused half-way.
CREATE FUNCTION pgflow.delete_flow_and_data(p_flow_slug text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  PERFORM pgflow._require_owner('delete_flow_and_data');
  IF p_flow_slug IS NULL THEN
    RAISE EXCEPTION 'p_flow_slug must not be NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  PERFORM pgflow._lock_flow_definition(p_flow_slug);
  IF pgflow._delete_flow_data(p_flow_slug, false) IS NULL THEN
    RAISE NOTICE 'flow "%" does not exist: nothing deleted', p_flow_slug;
  END IF;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Compiling from the worker
-- -------------------------------------------------------------------------------------

-- Makes the database hold flow flow_slug as shape describes it. Returns
-- {"status": ..., "differences": [...]}, status one of
--   compiled    the flow did not exist and was created from the shape;
--   verified    it exists with this shape (options are not compared): nothing changed;
--   recompiled  it differed and allow_data_loss was true: it was deleted with all its
--               runs and created from the shape (its queue, grants, schedules and worker
--               rows stay); differences says what differed;
--   mismatch    it differed and nothing was changed; differences says what differs.
-- See WHEN A DIFFERING FLOW IS RECOMPILED, LOCKS and WHO MAY CALL above: compiling and
-- recompiling are the owner's; verifying and reporting a mismatch, every granted role's.
CREATE FUNCTION pgflow.ensure_flow_compiled(
  flow_slug       text,
  shape           jsonb,
  allow_data_loss boolean
)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_differences text[];
BEGIN
  IF ensure_flow_compiled.flow_slug IS NULL THEN
    RAISE EXCEPTION 'flow_slug must not be NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  -- A malformed shape, and a caller who may not have this flow compiled or verified, are
  -- refused before the lock is taken: a refused call holds nothing. A role other than the
  -- owner verifies only a flow it serves (0004's rule), so that the differences never show
  -- it the definition of another flow.
  PERFORM pgflow._shape_steps(ensure_flow_compiled.shape, 'given');
  IF EXISTS (SELECT 1 FROM pgflow.flows f WHERE f.flow_slug = ensure_flow_compiled.flow_slug) THEN
    PERFORM pgflow._authorize_flows(ARRAY[ensure_flow_compiled.flow_slug]);
  ELSE
    PERFORM pgflow._require_owner(format('compiling flow "%s" (ensure_flow_compiled)',
                                         ensure_flow_compiled.flow_slug));
  END IF;
  PERFORM pgflow._lock_flow_definition(ensure_flow_compiled.flow_slug);

  IF NOT EXISTS (SELECT 1 FROM pgflow.flows f
                  WHERE f.flow_slug = ensure_flow_compiled.flow_slug) THEN
    PERFORM pgflow._require_owner(format('compiling flow "%s" (ensure_flow_compiled)',
                                         ensure_flow_compiled.flow_slug));
    PERFORM pgflow._create_flow_from_shape(ensure_flow_compiled.flow_slug,
                                           ensure_flow_compiled.shape);
    RETURN jsonb_build_object('status', 'compiled', 'differences', '[]'::jsonb);
  END IF;

  v_differences := pgflow._compare_flow_shapes(
    ensure_flow_compiled.shape, pgflow._get_flow_shape(ensure_flow_compiled.flow_slug));
  IF cardinality(v_differences) = 0 THEN
    RETURN jsonb_build_object('status', 'verified', 'differences', '[]'::jsonb);
  END IF;
  IF coalesce(ensure_flow_compiled.allow_data_loss, false) THEN
    PERFORM pgflow._require_owner(format('recompiling flow "%s" (ensure_flow_compiled)',
                                         ensure_flow_compiled.flow_slug));
    PERFORM pgflow._delete_flow_data(ensure_flow_compiled.flow_slug, true);
    PERFORM pgflow._create_flow_from_shape(ensure_flow_compiled.flow_slug,
                                           ensure_flow_compiled.shape);
    RETURN jsonb_build_object('status', 'recompiled', 'differences', to_jsonb(v_differences));
  END IF;
  RETURN jsonb_build_object('status', 'mismatch', 'differences', to_jsonb(v_differences));
END;
$$;

-- Upstream 0.14's signature, which TypeScript workers call and tools look up
-- (ensure_flow_compiled(text, jsonb)): never recompiles. A separate function rather than a
-- default on the one above, so that both signatures exist and no call is ambiguous.
CREATE FUNCTION pgflow.ensure_flow_compiled(flow_slug text, shape jsonb)
RETURNS jsonb
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
  SELECT pgflow.ensure_flow_compiled(ensure_flow_compiled.flow_slug, ensure_flow_compiled.shape,
                                     false)
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: the owner's until granted (docs/security.md)
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION
  pgflow._require_owner(text),
  pgflow._lock_flow_definition(text),
  pgflow._shape_steps(jsonb, text),
  pgflow._shape_list(jsonb),
  pgflow._get_flow_shape(text),
  pgflow._compare_flow_shapes(jsonb, jsonb),
  pgflow._shape_option(jsonb, text, text),
  pgflow._shape_options(jsonb, boolean, text),
  pgflow._create_flow_from_shape(text, jsonb),
  pgflow._delete_flow_data(text, boolean),
  pgflow.delete_flow_and_data(text),
  pgflow.ensure_flow_compiled(text, jsonb, boolean),
  pgflow.ensure_flow_compiled(text, jsonb)
  FROM public;
